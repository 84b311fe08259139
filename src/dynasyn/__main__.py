"""``python -m dynasyn`` = the ``dynasyn`` command."""

import sys

from dynasyn.cli import main

sys.exit(main())
