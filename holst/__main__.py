"""``python -m holst`` -> the CLI."""

import sys

from holst.cli import main

sys.exit(main())
