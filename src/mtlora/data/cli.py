"""``mtlora data <fmt> INPUT OUTDIR``: convert a public dataset to ``OUTDIR/train.json``.

Kept free of torch/transformers imports so conversion starts instantly and runs on any machine.
"""

from __future__ import annotations

import argparse

from mtlora.cli_args import Parser
from mtlora.data.converters import CONVERTERS, TRAIN_FILENAME, convert
from mtlora.outputs import check_output_dir

_FORMAT_HELP = {
    "dolly": "Dolly-15k JSONL {instruction, context, response, category} (a file or a directory of them)",
    "flan-cot": "Flan v2 CoT <task>_train.tsv files: question<TAB>answer<TAB>rationale (a .tsv or a directory)",
    "niv1": "Natural Instructions v1 / BIG-bench task.json (a task.json, a task dir, or a dir of task dirs)",
    "flan": "Muennighoff/flan JSONL {inputs, targets, task} (a file or a directory of them)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mtlora data",
        description="Convert instruction data to the training format: OUTDIR/train.json, a JSON array of "
        "{instruction, input, output, task_type} records.",
    )
    sub = parser.add_subparsers(dest="fmt", required=True, metavar="FORMAT")
    for name in CONVERTERS:
        cmd = sub.add_parser(name, help=_FORMAT_HELP[name], description=_FORMAT_HELP[name])
        cmd.add_argument("input", metavar="INPUT", help="input file or directory")
        cmd.add_argument("outdir", metavar="OUTDIR", help="output directory (train.json is written there)")
        cmd.add_argument(
            "--max_per_task",
            type=int,
            default=None,
            metavar="N",
            help="keep at most N examples per task, a seeded random sample in original order",
        )
        cmd.add_argument("--seed", type=int, default=42, help="seed for --max_per_task sampling (default 42)")
        cmd.add_argument(
            "--skip_empty",
            action="store_true",
            help="drop (and count) examples with an empty target instead of failing",
        )
        cmd.add_argument(
            "--overwrite_output_dir",
            action="store_true",
            help="replace an existing OUTDIR/train.json (default: refuse)",
        )
    return parser


def main(argv: list[str]) -> int:
    """Parse ``argv``, convert, print one summary line; user errors raise :class:`mtlora.errors.DataError`."""
    args = build_parser().parse_args(argv)
    check_output_dir(args.outdir, [TRAIN_FILENAME], overwrite=args.overwrite_output_dir, flag="OUTDIR")
    summary = convert(
        args.fmt,
        args.input,
        args.outdir,
        max_per_task=args.max_per_task,
        seed=args.seed,
        skip_empty=args.skip_empty,
    )
    print(summary.line())
    return 0
