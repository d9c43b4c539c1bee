"""``python -m mtlora <command> ...``: the same entry point as the ``mtlora`` console script."""

import sys

from mtlora.cli import main

if __name__ == "__main__":
    sys.exit(main())
