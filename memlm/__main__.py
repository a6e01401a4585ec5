"""``python -m memlm`` = the ``memlm`` console script."""

import sys

from memlm.cli import main

sys.exit(main())
