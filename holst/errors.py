"""The errors a user can fix: every ``holst`` command prints them as one line and exits 2.

Anything else that escapes a command is a bug and keeps its traceback (``holst/cli.py``). Each
class is also a ``ValueError``, so library callers that catch ``ValueError`` keep working.

```
HolstError
├── ConfigError      an option is unknown, missing or out of range (configs, sampling settings, flags)
├── InputError       a caption, image, path or device the user gave cannot be used
│   └── MissingPackageError  an optional package a feature needs is not installed (also an ImportError)
└── CheckpointError  a model file is missing, corrupt, foreign (e.g. a pickle with code) or does not fit
```
"""

from __future__ import annotations


class HolstError(ValueError):
    """Base of the errors a user can fix; its message names the option, file or value at fault."""


class ConfigError(HolstError):
    """A configuration value (config file, sampling setting, command-line flag) is unknown, missing or out of range."""


class InputError(HolstError):
    """Something the user gave (a caption, an image, an output path, a device) cannot be used."""


class MissingPackageError(InputError, ImportError):
    """An optional package that a feature needs is not installed; the message says what to install.

    Also an ``ImportError``, so code that falls back when a package is missing keeps catching it.
    """


class CheckpointError(HolstError):
    """A checkpoint file is missing, corrupt, foreign or does not fit the model."""
