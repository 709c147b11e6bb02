"""``python -m policysearch.schema [--check]``: regenerate the policy schema's enums."""
from __future__ import annotations

import sys

from policysearch.schema import main

if __name__ == "__main__":
    sys.exit(main())
