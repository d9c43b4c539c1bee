"""``mtlora eval bbh|mmlu`` (and the top-level ``eval_bbh.py`` / ``eval_mmlu.py`` wrappers).

Everything a user can get wrong (task names, data location, few-shot count, adapter folder) is checked
*before* the model is loaded, so mistakes cost a second and produce one ``error:`` line (raised as
:class:`MtLoraError`; ``mtlora.cli.run_main`` prints it and exits 2).

The paper's flag names (``--model_name_or_path``, ``--lora_checkpoint``, ``--output_dir``,
``--num_few_shot``, ``--mmlu_data_dir``/``--bbh_data_dir``, ``--batch_size``, ``--logging_dir``,
``--num_gpus``, ``--auto_batch``, ``--fallback_batch_size``, ``--adaptive_max_length``) are accepted as is,
so the released experiment scripts run unchanged. ``--mmlu_data_dir ./data/mmlu_dataset`` as shipped (the
``save_to_disk`` skeleton whose ``.arrow`` files were never committed) falls back to the bundled copy of the
same 14,042 questions, with a note; the released code failed on every subject there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from mtlora.errors import MtLoraError
from mtlora.outputs import add_safety_flags, check_output_dir
from mtlora.quant import add_quantization_arguments
from mtlora.quant import from_args as quantization_from_args

USAGE = """usage: mtlora eval {mmlu,bbh} --model_name_or_path M [--lora_checkpoint A] --output_dir E [options]

  mmlu   MMLU, 57 subjects (5-shot from dev; --subjects s1,s2)
  bbh    BIG-Bench Hard, 27 tasks (3-shot; --tasks t1,t2; --cot for bbh_cot_fewshot)
  lm_eval_tasks   write lm-evaluation-harness task YAMLs over the bundled data (run `lm_eval` offline on them)

  --protocol harness (default, lm-evaluation-harness conventions) | paper (the released mtLoRA scripts;
             the default of eval_bbh.py / eval_mmlu.py)
  mtlora eval mmlu --help   for every option"""


#: Default ``--protocol`` of each entry point. The paper's own scripts (``eval_bbh.py`` / ``eval_mmlu.py``) must
#: give numbers comparable with the paper when run "as written", so they default to the paper protocol;
#: ``mtlora eval`` defaults to lm-evaluation-harness conventions. Every result names the protocol it used.
PAPER_SCRIPT_PROTOCOL = "paper"
MTLORA_EVAL_PROTOCOL = "harness"


def build_parser(
    benchmark: str, prog: str | None = None, default_protocol: str = MTLORA_EVAL_PROTOCOL
) -> argparse.ArgumentParser:
    """Options shared by both benchmarks plus the benchmark's own (names follow the paper's scripts)."""
    p = argparse.ArgumentParser(
        prog=prog or f"mtlora eval {benchmark}",
        description=f"Evaluate a base model, optionally with an adapter of any method, on {benchmark.upper()}.",
    )
    p.add_argument(
        "--model_name_or_path",
        default=None,
        help="base model: mtlora:<name>, a folder or a hub id (default: the base recorded in the adapter)",
    )
    p.add_argument(
        "--lora_checkpoint", default=None, help="adapter folder (method read from adapter_config.json)"
    )
    p.add_argument(
        "--output_dir", required=True, help=f"writes {benchmark}_results.json and {benchmark}_results.md"
    )
    p.add_argument(
        "--protocol",
        choices=("harness", "paper"),
        default=default_protocol,
        help=f"harness: lm-evaluation-harness conventions; paper: the released mtLoRA eval scripts "
        f"(default here: {default_protocol})",
    )
    p.add_argument(
        "--num_few_shot", type=int, default=5 if benchmark == "mmlu" else 3, help="exemplars per prompt"
    )
    alias = "--mmlu_data_dir" if benchmark == "mmlu" else "--bbh_data_dir"
    hub = " or hf:cais/mmlu (needs network)" if benchmark == "mmlu" else ""
    p.add_argument(
        "--data_dir",
        alias,
        dest="data_dir",
        default=None,
        help=f"another copy of the data{hub} (default: bundled)",
    )
    if benchmark == "mmlu":
        p.add_argument(
            "--subjects", "--tasks", dest="names", default=None, help="comma list (default: all 57)"
        )
        p.add_argument(
            "--split", choices=("test", "val"), default="test", help="evaluated split (default test)"
        )
    else:
        p.add_argument("--tasks", dest="names", default=None, help="comma list (default: all 27)")
        p.add_argument(
            "--cot",
            action="store_true",
            help="harness bbh_cot_fewshot (chain of thought) instead of bbh_fewshot",
        )
        p.add_argument(
            "--max_new_tokens", type=int, default=None, help="default: paper 32, harness 256, --cot 1024"
        )
    p.add_argument(
        "--task_id",
        type=int,
        default=None,
        help="mmoelora: task id for every prompt (default: the task's id in the adapter's task_map.json, "
        "else 0 as the paper's scripts do)",
    )
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    p.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N items of each task/subject"
    )
    p.add_argument("--max_length", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--no_prefix_cache", action="store_true", help="re-encode the shared few-shot prefix every time"
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--logging_dir", default=None, help="also copy the result files here (paper flag)")
    add_quantization_arguments(p)
    # Paper flag, accepted so the released scripts run; evaluation uses one device.
    p.add_argument("--num_gpus", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--auto_batch",
        action="store_true",
        help="on out-of-memory retry the task/subject with half the batch, down to --fallback_batch_size (paper flag)",
    )
    p.add_argument(
        "--fallback_batch_size",
        type=int,
        default=1,
        help="smallest batch --auto_batch goes down to (default 1)",
    )
    if benchmark == "mmlu":
        p.add_argument(
            "--adaptive_max_length",
            action="store_true",
            help="context window from the shot count as released (768 + 256 per exemplar: 2048 at 5-shot), "
            "at most the model's; --max_length wins",
        )
    p.add_argument(
        "--allow_beyond_positions",
        action="store_true",
        help="accept a --max_length beyond the model's position table (RoPE extrapolates; e.g. to cross-check "
        "with lm-evaluation-harness at the same length); default: refuse",
    )
    add_safety_flags(p)
    return p


#: ``--adaptive_max_length``: the released eval_mmlu.py's window per shot count (2048 otherwise).
ADAPTIVE_MAX_LENGTH = {0: 768, 1: 1024, 2: 1280, 3: 1536, 4: 1792, 5: 2048}


def released_mmlu_skeleton(root: Path, names: list[str]) -> bool:
    """Whether every selected subject folder under ``root`` is a ``save_to_disk`` skeleton without data.

    That is the released ``data/mmlu_dataset`` as shipped: ``dataset_dict.json`` and per-split metadata whose
    ``.arrow`` files were gitignored and never committed (spec section 8.3).
    """
    folders = [root / n for n in names]
    return bool(folders) and all(
        (f / "dataset_dict.json").is_file() and not any(f.rglob("*.arrow")) for f in folders
    )


def _result_files(benchmark: str) -> list[str]:
    return [f"{benchmark}_results.json", f"{benchmark}_results.md"]


def _check_max_length(
    max_length: int | None,
    model_name_or_path: str | None,
    lora_checkpoint: str | None,
    trust_remote_code: bool,
    allow: bool = False,
) -> None:
    """Refuse a ``--max_length`` beyond the model's position table before the weights are loaded: prompts
    past it run on positions the model never had (learned tables fail, RoPE silently extrapolates). With
    ``allow`` (``--allow_beyond_positions``) it is only noted on stderr."""
    if max_length is None:
        return
    from mtlora.evaluation.loading import config_max_positions
    from mtlora.hub import read_adapter_config

    name = model_name_or_path
    if name is None and lora_checkpoint:
        name = read_adapter_config(lora_checkpoint).get("base_model_name_or_path")
    if not name:
        return
    limit = config_max_positions(name, trust_remote_code=trust_remote_code)
    if limit is not None and max_length > limit:
        if allow:
            print(
                f"note: --max_length {max_length} exceeds the model's {limit} positions (--allow_beyond_positions)",
                file=sys.stderr,
            )
            return
        raise MtLoraError(
            f"--max_length {max_length}: the model has {limit} positions (max_position_embeddings); "
            f"use --max_length {limit} or less (default: {limit}), or --allow_beyond_positions"
        )


def _positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise MtLoraError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def run(
    benchmark: str,
    argv: list[str],
    prog: str | None = None,
    default_protocol: str = MTLORA_EVAL_PROTOCOL,
) -> int:
    """Parse, validate, load data and model, evaluate, write ``<output_dir>/<benchmark>_results.json``.

    ``default_protocol`` is the entry point's ``--protocol`` default (``paper`` for the paper's scripts).
    """
    from mtlora.evaluation import data as D

    if "torch" not in sys.modules:
        # OpenMP threads that spin while waiting make a shared CPU crawl: on a 2-core machine under
        # foreign load we measured 22 s instead of 1.8 s for the same run. Sleeping waiters cost almost
        # nothing on an idle machine. Only effective before torch is imported; a user's setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser(benchmark, prog, default_protocol).parse_args(argv)
    _positive("num_few_shot", args.num_few_shot, allow_zero=True)
    _positive("batch_size", args.batch_size)
    _positive("limit", args.limit)
    _positive("max_length", args.max_length)
    _positive("threads", args.threads)
    _positive("fallback_batch_size", args.fallback_batch_size)
    if benchmark == "bbh":
        _positive("max_new_tokens", args.max_new_tokens)
        if args.cot and args.protocol == "paper":
            raise MtLoraError(
                "--cot is a harness variant (bbh_cot_fewshot); the paper protocol has no CoT "
                "(add --protocol harness)"
            )
    known = D.MMLU_SUBJECTS if benchmark == "mmlu" else D.BBH_TASKS
    flag = "--subjects" if benchmark == "mmlu" else "--tasks"
    names = D.select_names(args.names, known, "subject" if benchmark == "mmlu" else "task", flag)
    root = D.resolve_data_dir(benchmark, args.data_dir)
    data_label = str(root) if args.data_dir else "bundled"
    if benchmark == "mmlu" and isinstance(root, Path) and released_mmlu_skeleton(root, names):
        print(
            f"note: {root} is the released mmlu_dataset skeleton without its .arrow data files; using the "
            "bundled MMLU (the same 57 subjects, 14,042 test questions)",
            file=sys.stderr,
        )
        root, data_label = (
            D.resolve_data_dir(benchmark, None),
            f"bundled (fallback: {root} has no .arrow files)",
        )
    if args.lora_checkpoint:
        from mtlora.evaluation.loading import read_adapter_config

        read_adapter_config(args.lora_checkpoint)  # missing folder / config: fail before loading anything
    for flag, folder in (("--output_dir", args.output_dir), ("--logging_dir", args.logging_dir)):
        if folder:
            check_output_dir(folder, _result_files(benchmark), overwrite=args.overwrite_output_dir, flag=flag)
    _check_max_length(
        args.max_length,
        args.model_name_or_path,
        args.lora_checkpoint,
        args.trust_remote_code,
        allow=args.allow_beyond_positions,
    )

    t0 = time.perf_counter()
    if benchmark == "mmlu":
        dataset: list[Any] = [D.load_mmlu_subject(root, n, args.split) for n in names]
        max_shots = min(len(s.dev) for s in dataset)
        if args.num_few_shot > max_shots:
            raise MtLoraError(
                f"--num_few_shot {args.num_few_shot}: MMLU dev has {max_shots} exemplars per subject"
            )
    else:
        dataset = [D.load_bbh_task(Path(root), n, need_cot=args.protocol == "harness") for n in names]
        if args.protocol == "harness" and args.num_few_shot > 3:
            raise MtLoraError(
                f"--num_few_shot {args.num_few_shot}: the harness protocol has 3 fixed exemplars per task"
            )

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from mtlora.atomic import write_text_atomic
    from mtlora.evaluation.autobatch import RetryingEngine
    from mtlora.evaluation.loading import load_model_for_eval, model_max_length
    from mtlora.evaluation.report import markdown_table, run_metadata, write_json

    quant = quantization_from_args(args)
    loaded = load_model_for_eval(
        args.model_name_or_path,
        args.lora_checkpoint,
        args.device,
        args.dtype,
        task_id=args.task_id,
        quantization=quant,
        trust_remote_code=args.trust_remote_code,
    )
    load_seconds = time.perf_counter() - t0
    max_length = args.max_length or model_max_length(loaded)
    adaptive = getattr(args, "adaptive_max_length", False)
    if adaptive and not args.max_length:
        max_length = min(max_length, ADAPTIVE_MAX_LENGTH.get(args.num_few_shot, 2048))
    engine = RetryingEngine(
        loaded,
        batch_size=args.batch_size,
        prefix_cache=not args.no_prefix_cache,
        progress=not args.no_progress,
        auto_batch=args.auto_batch,
        fallback_batch_size=args.fallback_batch_size,
    )
    settings = {
        "num_few_shot": args.num_few_shot,
        "max_length": max_length,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "prefix_cache": not args.no_prefix_cache,
        "data_dir": data_label,
        "auto_batch": args.auto_batch,
        "fallback_batch_size": args.fallback_batch_size,
        "base_quantization": quant.record(),
    }
    if benchmark == "mmlu":
        settings["adaptive_max_length"] = adaptive
    if benchmark == "mmlu":
        from mtlora.evaluation.mmlu import evaluate_mmlu

        settings["split"] = args.split
        result = evaluate_mmlu(engine, dataset, args.protocol, args.num_few_shot, max_length, args.limit)
        head_keys = ["overall_accuracy", "micro_average", "macro_average"]
        rows = [(s, d["total"], d["accuracy"]) for s, d in result["subject_details"].items()]
        name_header = "subject"
    else:
        from mtlora.evaluation.bbh import evaluate_bbh

        result = evaluate_bbh(
            engine,
            dataset,
            args.protocol,
            args.num_few_shot,
            max_length,
            args.cot,
            args.max_new_tokens,
            args.limit,
        )
        head_keys = ["average_accuracy", "macro_average", "micro_average"]
        rows = [(t, r["total"], r["accuracy"]) for t, r in result["task_results"].items()]
        name_header = "task"
    timing = {"load_seconds": round(load_seconds, 3), "eval_seconds": result.pop("eval_seconds")}
    timing["total_seconds"] = round(time.perf_counter() - t0, 3)
    bulky = "predictions" if benchmark == "mmlu" else "task_results"
    payload = {k: v for k, v in result.items() if k != bulky}
    payload.update(run_metadata(loaded, settings))
    if loaded.needs_task_ids:
        payload["task_ids_used"] = dict(loaded.task_ids_used)
        payload["task_id_fallbacks"] = list(loaded.task_id_fallbacks)
    payload["timing"] = timing
    payload["engine_stats"] = dict(engine.stats)
    payload[bulky] = result[bulky]

    out_dir = Path(args.output_dir)
    json_path = write_json(out_dir / f"{benchmark}_results.json", payload)
    summary: list[tuple[str, int | None, float]] = []
    total_key = "total_questions" if benchmark == "mmlu" else "total_samples"
    for key in head_keys:
        summary.append((key, result[total_key] if key != "macro_average" else None, result[key]))
    for cat, acc in result["category_scores"].items():
        summary.append((f"category {cat}", None, acc))
    title = (
        f"{benchmark.upper()} - protocol {args.protocol}"
        + (f" ({result['harness_task']})" if benchmark == "bbh" and result.get("harness_task") else "")
        + f", {args.num_few_shot}-shot - {loaded.model_name_or_path}"
        + (f" + {loaded.lora_checkpoint} ({loaded.adapter_method})" if loaded.lora_checkpoint else "")
    )
    table = markdown_table(title, rows, summary, name_header)
    write_text_atomic(out_dir / f"{benchmark}_results.md", table + "\n")
    if args.logging_dir:
        import shutil

        Path(args.logging_dir).mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md"):
            shutil.copy2(out_dir / f"{benchmark}_results{suffix}", Path(args.logging_dir))
    print(table)
    per = result["subject_details"] if benchmark == "mmlu" else result["task_results"]
    fewer = sum(d["prompts_with_fewer_exemplars"] for d in per.values())
    if fewer:
        cut = sum(d["questions_truncated"] for d in per.values())
        print(
            f"note: {fewer} of {result[total_key]} prompts kept fewer than {args.num_few_shot} exemplars to fit the "
            f"{max_length}-token window"
            + (f"; {cut} questions alone were longer and were cut" if cut else ""),
            file=sys.stderr,
        )
    if benchmark == "bbh" and result["max_new_tokens"] < result["max_new_tokens_requested"]:
        print(
            f"note: generation limited to {result['max_new_tokens']} new tokens (requested "
            f"{result['max_new_tokens_requested']}) so that prompts keep half of the {max_length}-token window",
            file=sys.stderr,
        )
    if loaded.task_id_fallbacks:
        print(
            f"note: {', '.join(loaded.task_id_fallbacks)} not in the adapter's task_map.json; used task id "
            f"{loaded.fallback_task_id} ("
            + ("the general task id" if loaded.fallback_task_id else "what the paper's eval scripts pass")
            + "); --task_id overrides",
            file=sys.stderr,
        )
    print(f"\nprotocol: {args.protocol}; results: {json_path}  ({timing['total_seconds']:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point used by ``mtlora eval``: ``argv[0]`` picks the benchmark."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    benchmark, rest = argv[0], argv[1:]
    if benchmark == "lm_eval_tasks":
        from mtlora.evaluation.lm_eval_tasks import main as tasks_main

        return tasks_main(rest)
    if benchmark not in ("mmlu", "bbh"):
        raise MtLoraError(f"unknown benchmark {benchmark!r}; use: mtlora eval mmlu|bbh ...")
    return run(benchmark, rest)
