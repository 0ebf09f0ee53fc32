"""`python -m deltatune ...` runs the command line (see deltatune.cli)."""

import sys

from .cli import main

sys.exit(main())
