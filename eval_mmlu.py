#!/usr/bin/env python
"""MMLU evaluation with the paper's command-line flags (same code as ``mtlora eval mmlu``).

    python eval_mmlu.py --model_name_or_path M [--lora_checkpoint A] --output_dir E --num_few_shot 5
        [--subjects a,b] [--protocol paper (default) | harness]

The paper protocol is the default here (``mtlora eval`` defaults to harness), so the paper's commands as
written give numbers comparable with the paper's. Writes E/mmlu_results.json and E/mmlu_results.md, both
naming the protocol. User errors print one ``error: ...`` line and exit with status 2.
"""

import sys

from mtlora.cli import run_main
from mtlora.evaluation.cli import PAPER_SCRIPT_PROTOCOL, run


def main(argv: list[str]) -> int:
    return run("mmlu", argv, prog="eval_mmlu.py", default_protocol=PAPER_SCRIPT_PROTOCOL)


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="eval_mmlu.py"))
