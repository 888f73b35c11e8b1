"""``python -m lmedit ...`` (and ``torchrun ... -m lmedit ...``): the command-line interface."""

import sys

from lmedit.cli import main

sys.exit(main())
