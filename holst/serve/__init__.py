"""holst serve: the HTTP API, event stream and web page over one pipeline (see app.py)."""
