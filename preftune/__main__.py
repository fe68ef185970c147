"""``python -m preftune ...`` is the ``preftune`` console script."""

import sys

from preftune.cli.main import main

sys.exit(main())
