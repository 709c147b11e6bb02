"""``python -m policysearch ...``: the same command line as the ``policysearch`` script."""
from __future__ import annotations

import sys

from policysearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
