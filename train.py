#!/usr/bin/env python
"""The paper's training entry point: ``python train.py --method mtlora --model_name_or_path ... [flags]``.

Same as ``mtlora train``; ``--help`` lists every flag with its default. Add ``--debug`` for tracebacks.
"""

import sys

from mtlora.cli import run_main
from mtlora.training.cli import main

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="train.py"))
