"""``mtlora analyze``: the paper's analysis figures (PNG + JSON) from a trained adapter and a data file.

    mtlora analyze routing   --adapter OUT/sft_lora_model --data data/ --output_dir figs/
    mtlora analyze spectral  --adapter OUT/sft_lora_model --output_dir figs/
    mtlora analyze gradients --adapter comp/sft_lora_model --adapter2 block/sft_lora_model --data data/ --output_dir figs/
    mtlora analyze all       --adapter ... [--adapter2 ...] --data ... --output_dir figs/

With one adapter everything goes to ``--output_dir``; with ``--adapter2`` each adapter's figures go to
``--output_dir/<label>/`` and the comparisons (Fig. S2 spectra, Fig. S3 gradient similarity) to
``--output_dir``. See docs/analyze.md for what each figure computes.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.atomic import write_text_atomic
from mtlora.cli_args import Parser, add_adapter, add_data, add_model, add_output, add_runtime, apply_runtime
from mtlora.errors import MtLoraError
from mtlora.outputs import add_safety_flags, check_output_dir
from mtlora.quant import add_quantization_arguments
from mtlora.quant import from_args as quantization_from_args

ANALYSES = ("routing", "spectral", "gradients", "all")
logger = logging.getLogger("mtlora.analysis")


def build_parser(prog: str = "mtlora analyze") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog, description="Analysis figures of the paper (PNG + JSON per figure) from trained adapters."
    )
    p.add_argument("analysis", choices=ANALYSES, help="which figure family to produce")
    add_adapter(p, required=True)
    p.add_argument(
        "--adapter2", default=None, help="second adapter to compare with (e.g. block vs component)"
    )
    p.add_argument("--label", default=None, help="name of --adapter in figures (default: component/block-*)")
    p.add_argument("--label2", default=None, help="name of --adapter2 in figures")
    add_model(
        p,
        help="base model (default: the one recorded in the adapter); mtlora:stories260k = bundled tiny Llama",
    )
    add_data(p, help="records file or folder (needed by routing and gradients)")
    add_output(p, help="where the PNG and JSON files go")
    p.add_argument("--max_examples", type=int, default=500, help="examples sampled, balanced over tasks")
    p.add_argument("--max_seq_length", type=int, default=512, help="tokens per example (longer are cut)")
    p.add_argument("--template", default="paper", choices=("paper", "chat"), help="prompt template")
    p.add_argument("--batch_size", type=int, default=4, help="examples per forward pass")
    p.add_argument("--grad_batches", type=int, default=4, help="batches per task for the task gradients")
    p.add_argument(
        "--layer",
        default=None,
        help="decoder layer (index, or adapter-name substring) of the Fig. S4 heatmap and the Fig. S2 "
        "correlation panel; default: the middle layer",
    )
    p.add_argument("--module", default=None, help="only adapters whose name contains this (e.g. v_proj)")
    p.add_argument(
        "--tokens",
        default="all",
        choices=("all", "prompt", "answer"),
        help="tokens the routing statistics average over (the released Fig. 1A used prompts only)",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the example sample")
    add_runtime(p)
    add_quantization_arguments(p)
    add_safety_flags(p)
    return p


SUMMARY_NAME = "analysis_summary.json"


def _check_label(flag: str, label: str) -> str:
    """A label names a sub-folder of --output_dir: one plain path component, so nothing lands outside it."""
    bad = (
        not label.strip()
        or label in (".", "..")
        or any(sep in label for sep in ("/", "\\", "\0"))
        or (os.altsep is not None and os.altsep in label)
    )
    if bad:
        raise MtLoraError(
            f"{flag} {label!r}: must be a plain name (no path separators, not '.' or '..'): it names a "
            "folder inside --output_dir"
        )
    return label


def _check_args(args: argparse.Namespace) -> None:
    needs_data = args.analysis in ("routing", "gradients", "all")
    if needs_data and not args.data:
        raise MtLoraError(f"mtlora analyze {args.analysis}: --data is required")
    for flag in ("max_examples", "max_seq_length", "batch_size", "grad_batches"):
        if getattr(args, flag) < 1:
            raise MtLoraError(f"--{flag} must be >= 1")
    if args.data and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or directory")
    for flag in ("label", "label2"):
        if getattr(args, flag) is not None:
            _check_label(f"--{flag}", getattr(args, flag))
    check_output_dir(args.output_dir, [SUMMARY_NAME], overwrite=args.overwrite_output_dir)


def _labels(args: argparse.Namespace) -> list[tuple[str, str]]:
    from mtlora.analysis.common import default_label, read_adapter_config

    dirs = [args.adapter] + ([args.adapter2] if args.adapter2 else [])
    given = [args.label, args.label2]
    labels = [
        given[i] or default_label(read_adapter_config(d), f"adapter{i + 1}") for i, d in enumerate(dirs)
    ]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]}-1", f"{labels[1]}-2"]
    for flag, label in zip(("--label", "--label2"), labels):  # defaults come from adapter configs
        _check_label(flag, label)
    return list(zip(dirs, labels))


@dataclass
class _Outputs:
    """What the analyses of one ``mtlora analyze`` run produced: files, skipped parts, results to compare."""

    written: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    spectral: list[dict[str, Any]] = field(default_factory=list)
    gradients: list[dict[str, Any]] = field(default_factory=list)

    def add(self, prefix: str, files: dict[str, Path]) -> None:
        self.written.update({prefix + k: v for k, v in files.items()})


def _run_spectral(
    args: argparse.Namespace, adapter_dir: str, label: str, sub: Path, prefix: str, acc: _Outputs
) -> None:
    """Fig. S2 / 1B from the adapter's weights alone; with ``all``, a rank below 3 skips it (no three SV bands)."""
    from mtlora.analysis import spectral

    try:
        res, files = spectral.run_spectral(
            adapter_dir, sub, label=label, layer=args.layer, module_filter=args.module
        )
    except MtLoraError as exc:
        if args.analysis != "all":
            raise
        acc.skipped[f"{label}: spectral"] = str(exc)
    else:
        acc.spectral.append(res)
        acc.add(prefix, files)


def _load_with_data(args: argparse.Namespace, adapter_dir: str, label: str) -> tuple[Any, Any]:
    """``(loaded adapter, per-task batches)`` for the analyses that run the model."""
    from mtlora.analysis.common import load_adapter, prepare_task_batches

    loaded = load_adapter(
        adapter_dir,
        args.model_name_or_path,
        device=args.device,
        dtype=args.dtype,
        label=label,
        quantization=quantization_from_args(args),
        trust_remote_code=args.trust_remote_code,
    )
    data = prepare_task_batches(
        args.data,
        loaded.tokenizer,
        loaded.task_map,
        max_examples=args.max_examples,
        max_seq_length=args.max_seq_length,
        template=args.template,
        seed=args.seed,
        known_tasks_only=loaded.needs_task_ids,
    )
    logger.info("%s: %d tasks, examples per task %s", label, data.num_tasks, data.num_examples())
    return loaded, data


def _run_routing(
    args: argparse.Namespace, loaded: Any, data: Any, sub: Path, prefix: str, acc: _Outputs, args_adapter: str
) -> None:
    """Fig. 1A / S4 for a routed adapter; an unrouted one is an error for ``routing``, skipped for ``all``."""
    from mtlora.analysis import routing

    if any(a.router.is_routed for _, a in loaded.named_adapters(args.module)):
        files = routing.run_routing(
            loaded,
            data,
            sub,
            batch_size=args.batch_size,
            tokens=args.tokens,
            layer=args.layer,
            module_filter=args.module,
        )
        acc.add(prefix, files)
    elif args.analysis == "routing":
        raise MtLoraError(
            f"--adapter {loaded.adapter_dir}: method {loaded.method!r} has no router to analyse"
        )
    else:
        acc.skipped[f"{loaded.label}: routing"] = f"method {loaded.method} has no router"


def _run_gradients(
    args: argparse.Namespace, loaded: Any, data: Any, sub: Path, prefix: str, acc: _Outputs
) -> None:
    """Fig. 1C / S3 (needs two tasks: an error for ``gradients``, skipped for ``all``)."""
    from mtlora.analysis import gradients

    if data.num_tasks >= 2:
        res, files = gradients.run_gradients(
            loaded,
            data,
            sub,
            batch_size=args.batch_size,
            num_batches=args.grad_batches,
            module_filter=args.module,
        )
        acc.gradients.append(res)
        acc.add(prefix, files)
    elif args.analysis == "gradients":
        raise MtLoraError(f"--data {args.data}: gradient similarity needs at least two tasks")
    else:
        acc.skipped[f"{loaded.label}: gradients"] = "the data has fewer than two tasks"


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Run the requested analyses; returns every written file by its path relative to ``--output_dir``."""
    import torch

    from mtlora.analysis import gradients, spectral

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = _labels(args)
    todo = {"routing", "spectral", "gradients"} if args.analysis == "all" else {args.analysis}
    acc = _Outputs()
    for adapter_dir, label in pairs:
        sub = out / label if len(pairs) > 1 else out
        prefix = f"{label}/" if len(pairs) > 1 else ""
        if "spectral" in todo:
            _run_spectral(args, adapter_dir, label, sub, prefix, acc)
        if not todo & {"routing", "gradients"}:
            continue
        loaded, data = _load_with_data(args, adapter_dir, label)
        if "routing" in todo:
            _run_routing(args, loaded, data, sub, prefix, acc, adapter_dir)
        if "gradients" in todo:
            _run_gradients(args, loaded, data, sub, prefix, acc)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if len(acc.spectral) == 2:
        try:
            acc.written.update(spectral.run_spectral_comparison(*acc.spectral, out))
        except MtLoraError as exc:
            acc.skipped["spectral comparison"] = str(exc)
    if len(acc.gradients) == 2:
        acc.written.update(gradients.run_gradient_comparison(*acc.gradients, out))
    summary = {
        "analysis": args.analysis,
        "adapters": {label: str(d) for d, label in pairs},
        "data": args.data,
        "files": sorted(acc.written),
        "skipped": acc.skipped,
    }
    write_text_atomic(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return acc.written


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    apply_runtime(args)
    written = run(args)
    for name in sorted(written):
        print(f"wrote {Path(args.output_dir) / name}")
    return 0
