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
import sys
import time
from pathlib import Path
from typing import Any

from mtlora.cli_args import Parser, add_adapter, add_data, add_model, add_output, add_runtime, apply_runtime
from mtlora.errors import MtLoraError
from mtlora.evaluation.benchmarks import (  # noqa: F401 - ADAPTIVE_MAX_LENGTH, released_mmlu_skeleton: public here
    ADAPTIVE_MAX_LENGTH,
    BENCHMARKS,
    Benchmark,
    get_benchmark,
    positive,
    released_mmlu_skeleton,
)
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
    """Options shared by every benchmark plus the benchmark's own (names follow the paper's scripts)."""
    bench = get_benchmark(benchmark)
    p = Parser(
        prog=prog or f"mtlora eval {benchmark}",
        description=f"Evaluate a base model, optionally with an adapter of any method, on {benchmark.upper()}.",
    )
    add_model(
        p, help="base model: mtlora:<name>, a folder or a hub id (default: the base recorded in the adapter)"
    )
    add_adapter(
        p,
        aliases=("--lora_checkpoint",),
        dest="lora_checkpoint",
        help="adapter folder (method read from adapter_config.json)",
    )
    add_output(p, help=f"writes {benchmark}_results.json and {benchmark}_results.md")
    p.add_argument(
        "--protocol",
        choices=("harness", "paper"),
        default=default_protocol,
        help=f"harness: lm-evaluation-harness conventions; paper: the released mtLoRA eval scripts "
        f"(default here: {default_protocol})",
    )
    p.add_argument("--num_few_shot", type=int, default=bench.few_shot_default, help="exemplars per prompt")
    add_data(
        p,
        aliases=("--data_dir", bench.data_alias),
        dest="data_dir",
        help=f"another copy of the data{bench.data_note} (default: bundled)",
    )
    bench.add_arguments(p)
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
    add_runtime(p)
    p.add_argument(
        "--no_prefix_cache", action="store_true", help="re-encode the shared few-shot prefix every time"
    )
    p.add_argument("--logging_dir", default=None, help="also copy the result files here (paper flag)")
    add_quantization_arguments(p)
    # Paper flag, accepted so the released scripts run; evaluation uses one device.
    p.add_argument("--num_gpus", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--auto_batch",
        action="store_true",
        help="on out-of-memory retry the task/subject with half the batch, down to --fallback_batch_size "
        "(paper flag)",
    )
    p.add_argument(
        "--fallback_batch_size",
        type=int,
        default=1,
        help="smallest batch --auto_batch goes down to (default 1)",
    )
    bench.add_late_arguments(p)
    p.add_argument(
        "--allow_beyond_positions",
        action="store_true",
        help="accept a --max_length beyond the model's position table (RoPE extrapolates; e.g. to cross-check "
        "with lm-evaluation-harness at the same length); default: refuse",
    )
    add_safety_flags(p)
    return p


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


def _validate(bench: Benchmark, args: argparse.Namespace) -> tuple[list[Any], str]:
    """Every check that needs no model, then the data: (dataset, data label). Errors cost a second."""
    from mtlora.evaluation import data as D

    positive("num_few_shot", args.num_few_shot, allow_zero=True)
    for name in ("batch_size", "limit", "max_length", "threads", "fallback_batch_size"):
        positive(name, getattr(args, name))
    bench.validate(args)
    names = D.select_names(args.names, bench.known_names(), bench.names_label, bench.names_flag)
    root, data_label = bench.resolve_root(args, names)
    if args.lora_checkpoint:
        from mtlora.evaluation.loading import read_adapter_config

        read_adapter_config(args.lora_checkpoint)  # missing folder / config: fail before loading anything
    for flag, folder in (("--output_dir", args.output_dir), ("--logging_dir", args.logging_dir)):
        if folder:
            check_output_dir(
                folder, _result_files(bench.name), overwrite=args.overwrite_output_dir, flag=flag
            )
    _check_max_length(
        args.max_length,
        args.model_name_or_path,
        args.lora_checkpoint,
        args.trust_remote_code,
        allow=args.allow_beyond_positions,
    )
    return bench.load_data(root, names, args), data_label


def _settings(
    bench: Benchmark, args: argparse.Namespace, max_length: int, data_label: str, quant: Any
) -> dict:
    """The run settings recorded in the results file (keys and order as before the Benchmark objects)."""
    return {
        "num_few_shot": args.num_few_shot,
        "max_length": max_length,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "prefix_cache": not args.no_prefix_cache,
        "data_dir": data_label,
        "auto_batch": args.auto_batch,
        "fallback_batch_size": args.fallback_batch_size,
        "base_quantization": quant.record(),
        **bench.extra_settings(args),
    }


def run(
    benchmark: str,
    argv: list[str],
    prog: str | None = None,
    default_protocol: str = MTLORA_EVAL_PROTOCOL,
) -> int:
    """Parse, validate, load data and model, evaluate, write ``<output_dir>/<benchmark>_results.json``.

    ``default_protocol`` is the entry point's ``--protocol`` default (``paper`` for the paper's scripts).
    """
    bench = get_benchmark(benchmark)
    args = build_parser(benchmark, prog, default_protocol).parse_args(argv)
    apply_runtime(args)  # OMP_WAIT_POLICY=PASSIVE before torch is imported, --threads, --no_progress
    t0 = time.perf_counter()
    dataset, data_label = _validate(bench, args)

    from mtlora.evaluation.autobatch import RetryingEngine
    from mtlora.evaluation.loading import load_model_for_eval, model_max_length
    from mtlora.evaluation.report import run_metadata, write_json

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
    max_length = bench.max_length(args, model_max_length(loaded))
    engine = RetryingEngine(
        loaded,
        batch_size=args.batch_size,
        prefix_cache=not args.no_prefix_cache,
        progress=not args.no_progress,
        auto_batch=args.auto_batch,
        fallback_batch_size=args.fallback_batch_size,
    )
    settings = _settings(bench, args, max_length, data_label, quant)
    result = bench.evaluate(engine, dataset, args, max_length)
    timing = {"load_seconds": round(load_seconds, 3), "eval_seconds": result.pop("eval_seconds")}
    timing["total_seconds"] = round(time.perf_counter() - t0, 3)
    payload = {k: v for k, v in result.items() if k != bench.bulky_key}
    payload.update(run_metadata(loaded, settings))
    if loaded.needs_task_ids:
        payload["task_ids_used"] = dict(loaded.task_ids_used)
        payload["task_id_fallbacks"] = list(loaded.task_id_fallbacks)
    payload["timing"] = timing
    payload["engine_stats"] = dict(engine.stats)
    payload[bench.bulky_key] = result[bench.bulky_key]
    json_path = write_json(Path(args.output_dir) / f"{benchmark}_results.json", payload)
    _write_table(bench, args, loaded, result)
    for note in bench.notes(result, args, max_length) + _task_id_notes(loaded):
        print(note, file=sys.stderr)
    print(f"\nprotocol: {args.protocol}; results: {json_path}  ({timing['total_seconds']:.1f} s)")
    return 0


def _write_table(bench: Benchmark, args: argparse.Namespace, loaded: Any, result: dict) -> None:
    """``<benchmark>_results.md`` (printed too), and both result files copied to ``--logging_dir``."""
    from mtlora.atomic import write_text_atomic
    from mtlora.evaluation.report import markdown_table

    title = (
        f"{bench.name.upper()} - protocol {args.protocol}"
        + bench.title_suffix(result)
        + f", {args.num_few_shot}-shot - {loaded.model_name_or_path}"
        + (f" + {loaded.lora_checkpoint} ({loaded.adapter_method})" if loaded.lora_checkpoint else "")
    )
    table = markdown_table(title, bench.rows(result), bench.summary_rows(result), bench.name_header)
    out_dir = Path(args.output_dir)
    write_text_atomic(out_dir / f"{bench.name}_results.md", table + "\n")
    if args.logging_dir:
        import shutil

        Path(args.logging_dir).mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md"):
            shutil.copy2(out_dir / f"{bench.name}_results{suffix}", Path(args.logging_dir))
    print(table)


def _task_id_notes(loaded: Any) -> list[str]:
    if not loaded.task_id_fallbacks:
        return []
    return [
        f"note: {', '.join(loaded.task_id_fallbacks)} not in the adapter's task_map.json; used task id "
        f"{loaded.fallback_task_id} ("
        + ("the general task id" if loaded.fallback_task_id else "what the paper's eval scripts pass")
        + "); --task_id overrides"
    ]


#: ``mtlora eval <name>`` commands that are not a benchmark: name -> module with ``main(argv)``.
TOOLS = {"lm_eval_tasks": "mtlora.evaluation.lm_eval_tasks"}


def main(argv: list[str] | None = None) -> int:
    """Entry point used by ``mtlora eval``: ``argv[0]`` picks the benchmark."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv:  # like `mtlora` without a command: usage on stderr, status 2
        print(USAGE, file=sys.stderr)
        return 2
    benchmark, rest = argv[0], argv[1:]
    if benchmark in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[benchmark]).main(rest)
    get_benchmark(benchmark)  # unknown name: one error line
    return run(benchmark, rest)
