"""``python -m mtlora.export``: the ``mtlora export`` command."""

import sys

from mtlora.export.cli import main

sys.exit(main())
