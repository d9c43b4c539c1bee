"""``mtlora export``: the command line (``build_parser`` / ``main``) over :func:`mtlora.export.export_adapter`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtlora.deploy import FORM_TITLES
from mtlora.errors import MtLoraError
from mtlora.export.common import REPORT_NAME
from mtlora.export.driver import export_adapter
from mtlora.hub import default_device
from mtlora.outputs import add_safety_flags
from mtlora.quant import add_quantization_arguments
from mtlora.quant import from_args as quantization_from_args


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def build_parser(prog: str = "mtlora export") -> argparse.ArgumentParser:
    from mtlora.cli_args import Parser, add_adapter, add_data, add_model, add_output, add_runtime

    p = Parser(
        prog=prog,
        description="Export an mtlora adapter per task (static routing): a plain peft LoRA (component level; "
        "optionally a merged full model) or a block-adapter bundle (block level), each with its tokenizer and a "
        "model card, and a report of the forms, their load commands and the routed vs exported accuracy.",
    )
    p.add_argument(
        "adapter_pos",
        nargs="?",
        default=None,
        metavar="ADAPTER_DIR",
        help="mtlora adapter folder (e.g. OUTPUT/sft_lora_model); same as --adapter",
    )
    add_adapter(
        p, dest="adapter_dir", help="mtlora adapter folder (or give it as the positional ADAPTER_DIR)"
    )
    add_output(p, help="where X/<task>/ and X/report.json go")
    add_model(p, help="base model (default: the adapter's recorded one)")
    add_data(
        p,
        aliases=("--calibration_data",),
        dest="calibration_data",
        help="records file/dir (task_type per record) to estimate each task's mean routing; required for token "
        "routers",
    )
    p.add_argument(
        "--eval_data", default=None, help="records for the report (default: held-out calibration records)"
    )
    p.add_argument(
        "--merged", action="store_true", help="also save base + static delta per task under X/<task>/merged"
    )
    p.add_argument("--tasks", default=None, help="comma-separated subset of tasks to export (default: all)")
    p.add_argument(
        "--max_calibration_per_task", type=int, default=64, help="calibration records per task (routing mean)"
    )
    p.add_argument("--max_eval_per_task", type=int, default=16, help="evaluation records per task (report)")
    p.add_argument("--eval_fraction", type=float, default=0.2, help="held-out share of calibration records")
    p.add_argument("--no_eval", action="store_true", help="skip the routed vs exported evaluation")
    p.add_argument("--max_seq_length", type=int, default=512, help="tokens per record (longer are cut)")
    p.add_argument("--template", default="paper", choices=("paper", "chat"), help="prompt template")
    p.add_argument("--batch_size", type=int, default=8, help="records per forward pass")
    p.add_argument("--max_new_tokens", type=int, default=64, help="generation budget of the evaluation")
    add_runtime(p, dtype_default="float32", dtype_choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--push_to_hub",
        default=None,
        metavar="REPO",
        help="after a complete export, upload the output folder (every task, report, model cards) to this Hub "
        "model repo (owner/name) with huggingface_hub",
    )
    p.add_argument("--hub_private", action="store_true", help="with --push_to_hub: create the repo private")
    add_quantization_arguments(p)
    add_safety_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mtlora.cli_args import apply_runtime

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.adapter_pos and args.adapter_dir and args.adapter_pos != args.adapter_dir:
        raise MtLoraError("give the adapter once: positional ADAPTER_DIR or --adapter, not both")
    args.adapter_dir = args.adapter_dir or args.adapter_pos
    if not args.adapter_dir:
        raise MtLoraError("--adapter (or the positional ADAPTER_DIR) is required")
    for name in (
        "max_calibration_per_task",
        "max_eval_per_task",
        "batch_size",
        "max_new_tokens",
        "max_seq_length",
    ):
        if getattr(args, name) < 1:
            raise MtLoraError(f"--{name} must be >= 1")
    apply_runtime(args)
    if args.push_to_hub:  # an impossible push (offline, bad repo id) fails before any work
        from mtlora.publish import check_push_target

        check_push_target(args.push_to_hub)
    device = args.device or default_device()
    report = export_adapter(
        args.adapter_dir,
        args.output_dir,
        model_name_or_path=args.model_name_or_path,
        calibration_data=args.calibration_data,
        eval_data=args.eval_data,
        merged=args.merged,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        max_calibration_per_task=args.max_calibration_per_task,
        max_eval_per_task=args.max_eval_per_task,
        eval_fraction=args.eval_fraction,
        evaluate=not args.no_eval,
        max_seq_length=args.max_seq_length,
        template=args.template,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=device,
        dtype=args.dtype,
        quantization=quantization_from_args(args),
        overwrite=args.overwrite_output_dir,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"{report['method']} ({report['level']}) -> {report['export_format']} in {args.output_dir}")
    for task, e in report["tasks"].items():
        if "skipped" in e:
            print(f"  {task:<24} skipped: {e['skipped']}")
            continue
        line = f"  {task:<24} {e['dir']}"
        if "routed" in e:
            r, x = e["routed"], e["exported"]
            line += f"  acc routed {_fmt(r['accuracy'])} exported {_fmt(x['accuracy'])}"
            line += f"  nll routed {_fmt(r['nll'])} exported {_fmt(x['nll'])} base {_fmt(e['base']['nll'])}"
        print(line)
    for task, e in report["tasks"].items():  # per task: each form written and the command that loads it
        for a in e.get("artifacts", []):
            print(f"  {task} -> {FORM_TITLES[a['form']]} in {a['path']}/\n      load: {a['load_command']}")
    print(f"report: {Path(args.output_dir) / REPORT_NAME}")
    if args.push_to_hub:
        from mtlora.publish import push_folder

        url = push_folder(args.output_dir, args.push_to_hub, private=args.hub_private or None)
        print(f"pushed {args.output_dir} to {url}")
    return 0
