"""``python -m personavec.cli``."""

import sys

from . import main

sys.exit(main())
