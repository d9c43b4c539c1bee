#!/usr/bin/env python
"""BBH evaluation with the paper's command-line flags (same code as ``mtlora eval bbh``).

    python eval_bbh.py --model_name_or_path M [--lora_checkpoint A] --output_dir E --num_few_shot 3
        [--tasks a,b] [--protocol paper (default) | harness]

The paper protocol is the default here (``mtlora eval`` defaults to harness), so the paper's commands as
written give numbers comparable with the paper's. Writes E/bbh_results.json and E/bbh_results.md, both
naming the protocol. User errors print one ``error: ...`` line and exit with status 2.
"""

import sys

from mtlora.cli import run_main
from mtlora.evaluation.cli import PAPER_SCRIPT_PROTOCOL, run


def main(argv: list[str]) -> int:
    return run("bbh", argv, prog="eval_bbh.py", default_protocol=PAPER_SCRIPT_PROTOCOL)


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="eval_bbh.py"))
