"""``python -m preftune ...`` is the ``preftune`` console script."""

import sys

from preftune.cli.launch import entry

sys.exit(entry())
