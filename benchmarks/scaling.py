"""Accuracy vs number of tasks: does multi-task adaptation collapse as N grows, and does mtLoRA reduce it?

For each N in ``--ns`` (default 5, 10, 15, 25; ``--extended`` adds 36, the whole suite) this trains every
method on the first N tasks of the many-task letter suite (:mod:`mtlora.data.manytask`) and scores exact match
on unseen test inputs. With ``--niv1_dir`` an N above 36 appends that many Natural Instructions v1 tasks
(short-answer examples only) after the 36 letter tasks. Methods (``--methods``): ``lora``, ``hydralora`` and the
rows of the paper's Table 2 ablation -- HydraLoRA -> ``block_ffn`` -> ``block_ffn_spectral`` / ``block_ffn_fgr``
-> ``mtlora`` (block FFN + spectral + FGR); ``mmoelora`` and ``lorahub`` are optional.

Budget protocols (``--budget``), the same for every method at a given N (one batch size, learning rate, rank):

* ``per_task`` (default, the original protocol): ``steps(N) = clamp(steps_per_task * N, min_steps,
  max_steps)``, i.e. a fixed number of steps per task, so the budget grows with N;
* ``fixed``: every N gets the same ``--total_steps``, so each added task takes steps away from the others.
  This is the protocol under which a collapse with N can show at all (the per-task protocol adds training
  with every task).

For every N the summary keeps the per-task accuracy of the first ``--first_tasks`` (5) tasks, which are in
every N: how the tasks one started with fare as tasks are added.

Reuses :mod:`mtlora.demo` (no copies): the tiny bundled base (stories260k) is pre-trained once on 18
non-evaluated tasks (``pretrain_base``, cached under ``--cache_dir``), each method is trained through
``mtlora train``'s code path (``train_method``) and evaluated with batched greedy generation
(``evaluate_model``). Why the tiny base and not a random-initialised Llama: the demo measured that the
pre-trained tiny base learns these tasks through adapters in CPU minutes (docs/demo.md); a random Llama has no
notion of reading or writing letter lists, so adapters on it stay at chance for any CPU budget.

Seeds: the suite (data, test inputs) and the pre-trained base are fixed (``--data_seed``); ``--seeds``
changes the training seed (adapter initialisation, data order). Mean +- sample std over seeds is reported.
Nothing is tuned on the test split. Besides the average over all N tasks, the summary has ``common_mean``:
the average over the first ``min(N)`` tasks only, which are present at every N (task difficulty cancels).

Writes ``benchmarks/results/scaling.json`` (``--budget fixed``: ``scaling_fixed.json``; ``--quick`` adds
``_quick``, so a smoke run never replaces full results), the PNG next to it and ``<name>_first_tasks.png``;
the output ends with one line per method, ``method=<m> tasks=<N> acc=<mean>±<std>`` (exact match in %, for
the largest N).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_BLOCK = ["--method", "mtlora", "--lora_nums", "4", "--enable_blc", "--enable_block_adapter"]
#: Adapter flags per method (``mtlora train`` syntax); lora/hydralora/mtlora/mmoelora are the demo's.
METHODS: dict[str, list[str]] = {
    "lora": ["--method", "lora"],
    "hydralora": ["--method", "hydralora", "--lora_nums", "4", "--enable_blc"],
    "block_ffn": [*_BLOCK, "--block_adapter_type", "ffn"],
    "block_ffn_spectral": [*_BLOCK, "--block_adapter_type", "ffn", "--enable_spectral_reg"],
    "block_ffn_fgr": [*_BLOCK, "--block_adapter_type", "ffn", "--enable_fine_grained_routing"],
    "mtlora": [
        *_BLOCK,
        "--block_adapter_type",
        "ffn",
        "--enable_spectral_reg",
        "--enable_fine_grained_routing",
    ],
    "mmoelora": ["--method", "mmoelora", "--expert_num", "4"],
    "lorahub": ["--method", "lorahub"],  # one LoRA per task (budget split across tasks), LoRAHub-composed
}
DEFAULT_METHODS = ("lora", "hydralora", "block_ffn", "block_ffn_spectral", "block_ffn_fgr", "mtlora")
QUICK_METHODS = ("lora", "hydralora", "mtlora")
RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = ("per_task", "fixed")
#: Default total steps of ``--budget fixed`` (full / quick): the per-task protocol's budget at N = 25 / N = 7.5.
FIXED_TOTAL_STEPS, QUICK_FIXED_TOTAL_STEPS = 800, 240
#: Natural Instructions examples kept for the suite: exact match is only meaningful for short answers.
NIV1_MAX_OUTPUT_WORDS = 3
#: Their prompts are cut to the task's name and the last words of the input (see ``compact_niv1``).
NIV1_INPUT_WORDS = 12


def default_out(budget: str, quick: bool) -> Path:
    """``results/scaling[_fixed][_quick].json``: each protocol and the smoke runs keep their own file."""
    return RESULTS / f"scaling{'_fixed' if budget == 'fixed' else ''}{'_quick' if quick else ''}.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Average exact match vs number of tasks N, per method, mean ± std over seeds (CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ns", default=None, help="Comma list of task counts (default 5,10,15,25; quick 5,15).")
    p.add_argument("--extended", action="store_true", help="Also run N=36 (the whole suite).")
    p.add_argument("--methods", default=None, help=f"Comma list of {', '.join(METHODS)}.")
    p.add_argument("--seeds", default=None, help="Comma list of training seeds (default 1,2; quick 1).")
    p.add_argument(
        "--data_seed", type=int, default=42, help="Seed of the suite and of the base pre-training."
    )
    p.add_argument(
        "--budget",
        choices=BUDGETS,
        default="per_task",
        help="per_task: steps = clamp(steps_per_task*N, min, max) (grows with N); fixed: --total_steps at every N.",
    )
    p.add_argument(
        "--total_steps",
        type=int,
        default=None,
        help=f"--budget fixed: optimizer steps of every run (default {FIXED_TOTAL_STEPS}; quick "
        f"{QUICK_FIXED_TOTAL_STEPS}).",
    )
    p.add_argument(
        "--steps_per_task", type=int, default=32, help="--budget per_task: optimizer steps per task."
    )
    p.add_argument("--min_steps", type=int, default=100, help="Lower clamp on the steps of one run.")
    p.add_argument(
        "--max_steps", type=int, default=1000, help="Upper clamp (in the default grid only N=36 hits it)."
    )
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--train_per_task", type=int, default=100, help="Training examples per task.")
    p.add_argument("--test_per_task", type=int, default=20, help="Test inputs per task (same for all tasks).")
    p.add_argument("--pretrain_steps", type=int, default=1500, help="Base pre-training steps (cached).")
    p.add_argument("--eval_batch_size", type=int, default=128)
    p.add_argument("--num_threads", type=int, default=1, help="torch threads (1 is fastest here, see demo).")
    p.add_argument(
        "--cache_dir", default=None, help="Pre-trained base + work folder (default results/cache)."
    )
    p.add_argument(
        "--niv1_dir",
        default=None,
        help="Natural Instructions v1 folder (e.g. ../shared/data/natural_instructions_v1): N above 36 "
        "appends N - 36 of its tasks (answers of at most 3 words) after the letter tasks.",
    )
    p.add_argument(
        "--niv1_input_words",
        type=int,
        default=NIV1_INPUT_WORDS,
        help="Natural Instructions prompts: the task's name as instruction and the last this-many words of "
        "the input (the full prompts are 300-1700 tokens, beyond the tiny base's 512 positions).",
    )
    p.add_argument(
        "--first_tasks", type=int, default=5, help="Report the per-task accuracy of this many first tasks."
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON path; the PNGs go next to it (default results/scaling[_fixed][_quick].json).",
    )
    p.add_argument("--keep_runs", action="store_true", help="Keep the trained adapters under cache_dir/work.")
    p.add_argument(
        "--resume",
        action="store_true",
        help="Reuse the finished runs of an interrupted invocation with the same settings (each run is "
        "appended to cache_dir/<out stem>.runs.jsonl as it finishes).",
    )
    p.add_argument("--quick", action="store_true", help="N=5,15, lora/hydralora/mtlora, 1 seed (< 5 min).")
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def resolve(ns: argparse.Namespace) -> argparse.Namespace:
    from mtlora.data.manytask import TASKS

    q = ns.quick
    ns.ns = _ints(ns.ns) if ns.ns else ([5, 15] if q else [5, 10, 15, 25])
    if ns.extended and len(TASKS) not in ns.ns:
        ns.ns.append(len(TASKS))
    ns.ns = sorted(set(ns.ns))
    ns.methods = [
        m.strip() for m in (ns.methods or ",".join(QUICK_METHODS if q else DEFAULT_METHODS)).split(",")
    ]
    ns.methods = [m for m in ns.methods if m]
    ns.seeds = _ints(ns.seeds) if ns.seeds else ([1] if q else [1, 2])
    bad = [m for m in ns.methods if m not in METHODS]
    if bad or not ns.methods:
        raise SystemExit(f"--methods {bad or ns.methods}: choose from {', '.join(METHODS)}")
    limit = len(TASKS) + (len(niv1_tasks(ns)) if ns.niv1_dir else 0)
    if not ns.ns or min(ns.ns) < 1 or max(ns.ns) > limit:
        hint = "" if ns.niv1_dir else " (--niv1_dir adds Natural Instructions tasks beyond the letter suite)"
        raise SystemExit(f"--ns must be in 1..{limit}{hint}")
    if not ns.seeds:
        raise SystemExit("--seeds: need at least one seed")
    if ns.min_steps < 1 or ns.max_steps < ns.min_steps or ns.steps_per_task < 1:
        raise SystemExit("need 1 <= --min_steps <= --max_steps and --steps_per_task >= 1")
    if ns.total_steps is None:
        ns.total_steps = QUICK_FIXED_TOTAL_STEPS if q else FIXED_TOTAL_STEPS
    if ns.total_steps < 1:
        raise SystemExit("--total_steps must be >= 1")
    if ns.first_tasks < 1:
        raise SystemExit("--first_tasks must be >= 1")
    if ns.niv1_input_words < 1:
        raise SystemExit("--niv1_input_words must be >= 1")
    ns.out = Path(ns.out) if ns.out else default_out(ns.budget, q)
    ns.cache_dir = Path(ns.cache_dir) if ns.cache_dir else ns.out.resolve().parent / "cache"
    return ns


def niv1_tasks(ns: argparse.Namespace) -> list[str]:
    """The Natural Instructions tasks usable as tasks 37, 38, ... (enough short-answer examples), in order."""
    from mtlora.data.manytask import suite_from_niv1
    from mtlora.errors import MtLoraError

    folder = Path(ns.niv1_dir)
    if not folder.is_dir():
        raise SystemExit(f"--niv1_dir {folder}: not a directory")
    try:
        suite = suite_from_niv1(
            folder, 10**6, 1, ns.test_per_task, ns.data_seed, max_output_words=NIV1_MAX_OUTPUT_WORDS
        )
    except MtLoraError as exc:
        raise SystemExit(f"--niv1_dir {folder}: {exc}") from None
    return suite.task_names


def build_scaling_suite(n: int, ns: argparse.Namespace) -> Any:
    """The first ``n`` tasks: letter tasks, then (beyond the 36 of them) Natural Instructions tasks.

    Both generators are prefix-stable (the first k tasks' examples do not depend on n), so the tasks of a
    smaller N are exactly the first tasks of a larger one.
    """
    import random

    from mtlora.data.manytask import TASKS, Suite, build_suite, suite_from_niv1

    letters = build_suite(min(n, len(TASKS)), ns.train_per_task, ns.test_per_task, ns.data_seed)
    if n <= len(TASKS):
        return letters
    extra = compact_niv1(
        suite_from_niv1(
            ns.niv1_dir,
            n - len(TASKS),
            ns.train_per_task,
            ns.test_per_task,
            ns.data_seed,
            max_output_words=NIV1_MAX_OUTPUT_WORDS,
        ),
        ns.niv1_input_words,
    )
    train = letters.train + extra.train
    random.Random(f"scaling-{ns.data_seed}-{n}").shuffle(train)
    return Suite(
        tasks=letters.tasks + extra.tasks,
        train=train,
        test=letters.test + extra.test,
        name="manytask+niv1",
        meta={"letters": letters.meta, "niv1": extra.meta},
    )


def compact_niv1(suite: Any, input_words: int) -> Any:
    """Short prompts for the tiny base: the task's name (``subtask004_mctaco_answer_generation_event_duration``
    -> ``mctaco answer generation event duration``) as the instruction and the last ``input_words`` words of
    the input (the question usually comes last).

    Why: the full Natural Instructions prompts (definition, examples, passage) take 300-1700 tokens of the
    512-piece vocabulary, more than the tiny base's 512 positions, and would make every step 10-40x more
    expensive. Cut this way the tasks still load the shared adapter with different inputs and answer
    formats, which is what the first tasks' accuracy as N grows measures; their own accuracy on a
    260K-parameter base means little beyond majority labels (yes/no, a letter).
    """
    import dataclasses

    from mtlora.data.records import Record

    def short(name: str) -> str:
        parts = name.split("_")
        return " ".join(parts[1:] if parts[0].startswith("subtask") else parts)

    def cut(r: Any) -> Record:
        words = str(r["input"]).split()
        return Record(
            instruction=short(str(r["task_type"])),
            input=" ".join(words[-input_words:]),
            output=str(r["output"]),
            task_type=str(r["task_type"]),
        )

    tasks = [dataclasses.replace(t, instruction=short(t.name)) for t in suite.tasks]
    meta = dict(suite.meta, prompt="task name + last words of the input", input_words=input_words)
    return dataclasses.replace(
        suite, tasks=tasks, train=[cut(r) for r in suite.train], test=[cut(r) for r in suite.test], meta=meta
    )


def steps_for(n: int, ns: argparse.Namespace) -> int:
    """Equal budget of every method at N tasks: ``--total_steps`` (fixed), else proportional to N, clamped."""
    if ns.budget == "fixed":
        return ns.total_steps
    return max(ns.min_steps, min(ns.max_steps, ns.steps_per_task * n))


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]], ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per method and N: mean ± std over seeds of the average over all N tasks, of the average over the
    tasks of the smallest N only (``common_*``: the same tasks at every N, so task difficulty cancels), and
    of each of the first ``--first_tasks`` tasks on its own (``first_tasks``)."""
    from mtlora.data.manytask import task_names

    common = task_names()[: min(ns.ns)]
    first = task_names()[: min(ns.first_tasks, min(ns.ns))]
    summary: dict[str, dict[str, Any]] = {}
    for method in ns.methods:
        summary[method] = {}
        for n in ns.ns:
            rows = [r for r in runs if r["method"] == method and r["tasks"] == n]
            accs = [r["accuracy"] for r in rows]
            common_accs = [statistics.fmean(r["per_task"][t] for t in common) for r in rows]
            m, s = mean_std(accs)
            cm, cs = mean_std(common_accs)
            first_tasks = {}
            for t in first:
                tm, ts = mean_std([r["per_task"][t] for r in rows])
                first_tasks[t] = {"mean": tm, "std": ts, "per_seed": [r["per_task"][t] for r in rows]}
            summary[method][str(n)] = {
                "mean": m, "std": s, "per_seed": accs, "common_mean": cm, "common_std": cs,
                "common_per_seed": common_accs, "first_tasks": first_tasks, "steps": steps_for(n, ns),
            }  # fmt: skip
    return summary


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    titles = ("average over all N tasks", f"average over the first {min(cfg['ns'])} tasks (in every N)")
    for ax, prefix, title in zip(axes, ("", "common_"), titles):
        for method, rows in results["summary"].items():
            ns_ = sorted(int(n) for n in rows)
            means = [100 * rows[str(n)][prefix + "mean"] for n in ns_]
            stds = [100 * rows[str(n)][prefix + "std"] for n in ns_]
            ax.errorbar(ns_, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xlabel("number of tasks N")
        ax.set_ylabel("exact match (%), mean ± std over seeds")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"scaling: {cfg['model']}, {len(cfg['seeds'])} seed(s), {budget_text(cfg)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_text(cfg: dict[str, Any]) -> str:
    """The protocol in words, for titles and the printed summary."""
    if cfg.get("budget") == "fixed":
        return f"fixed budget: {cfg['total_steps']} steps at every N"
    return f"steps=clamp({cfg['steps_per_task']}·N, {cfg['min_steps']}, {cfg['max_steps']})"


def plot_first_tasks(results: dict[str, Any], path: Path) -> None:
    """One panel per method: the accuracy of each of the first tasks vs N (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    methods = list(results["summary"])
    cols = min(3, len(methods))
    rows_ = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.6 * rows_), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, method in zip(flat, methods):
        rows = results["summary"][method]
        ns_ = sorted(int(n) for n in rows)
        for task in rows[str(ns_[0])]["first_tasks"]:
            means = [100 * rows[str(n)]["first_tasks"][task]["mean"] for n in ns_]
            stds = [100 * rows[str(n)]["first_tasks"][task]["std"] for n in ns_]
            ax.errorbar(ns_, means, yerr=stds, marker="o", ms=3, capsize=2, label=task)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("number of tasks N")
        ax.set_ylabel("exact match (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in flat[len(methods) :]:
        ax.set_axis_off()
    flat[0].legend(fontsize=7)
    fig.suptitle(
        f"per-task accuracy of the first tasks as N grows: {cfg['model']}, {len(cfg['seeds'])} seed(s), "
        f"{budget_text(cfg)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ns: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mtlora.data.manytask import macro_average, score
    from mtlora.demo import BUNDLED_MODEL, _answer_budget, evaluate_model, pretrain_base, train_method
    from mtlora.hub import load_tokenizer

    t_start = time.time()
    torch.set_num_threads(ns.num_threads)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine = _common.machine_info("cpu")
    cache_dir: Path = ns.cache_dir
    # one work folder per output file, so that two protocols can run side by side on one cache
    work = cache_dir / ("work" if ns.out.stem == "scaling" else f"work-{ns.out.stem}")
    common = dict(
        model_name_or_path=BUNDLED_MODEL, device="cpu", train_per_task=ns.train_per_task,
        test_per_task=ns.test_per_task, batch_size=ns.batch_size, learning_rate=ns.learning_rate,
        lora_rank=ns.lora_rank, eval_batch_size=ns.eval_batch_size, epochs=None, train_args="--disable_tqdm True",
    )  # fmt: skip
    journal = cache_dir / f"{ns.out.stem}.runs.jsonl"
    done = {k: e["row"] for k, e in _common.journal_read(journal).items()} if ns.resume else {}
    if not ns.resume:
        journal.unlink(missing_ok=True)

    # The base is pre-trained once: the test inputs depend only on (data_seed, test_per_task), so every N
    # excludes the same inputs and shares one cached base.
    largest = build_scaling_suite(max(ns.ns), ns)
    pre_ns = argparse.Namespace(
        **{**common, "batch_size": 16}, seed=ns.data_seed, pretrain_steps=ns.pretrain_steps
    )
    print(
        f"[base] pre-training / loading the tiny base ({ns.pretrain_steps} steps, cache {cache_dir})",
        flush=True,
    )
    base_path, pretrain_info = pretrain_base(pre_ns, largest, cache_dir)
    tokenizer = load_tokenizer(base_path)

    runs: list[dict[str, Any]] = []
    total = len(ns.ns) * len(ns.methods) * len(ns.seeds)
    suites: dict[int, tuple[Path, Path, list[Any], int]] = {}
    for n in ns.ns:
        suite = build_scaling_suite(n, ns)
        out = work / f"n{n}"
        suites[n] = (
            out,
            suite.write(out / "data"),
            suite.test_records(),
            _answer_budget(suite.train, tokenizer),
        )
    # Seed-major order: each seed completes a whole curve over N before the next one starts, so an
    # interrupted invocation (see --resume) already holds complete curves.
    for seed in ns.seeds:
        for n in ns.ns:
            out, data_dir, test, budget = suites[n]
            steps = steps_for(n, ns)
            for method in ns.methods:
                key = run_key(ns, n, method, seed)
                if key in done:
                    runs.append(done[key])
                    print(
                        f"[{len(runs)}/{total}] N={n} {method} seed={seed}: reused from {journal}", flush=True
                    )
                    continue
                t0 = time.time()
                run_ns = argparse.Namespace(**common, seed=seed, max_steps=steps)
                manifest = train_method(method, base_path, data_dir, out, run_ns, flags=METHODS[method])
                answers, eval_s = evaluate_model(
                    base_path,
                    Path(manifest["adapter_dir"]),
                    test,
                    run_ns,
                    budget,
                    desc=f"eval {method} N={n}",
                )
                per_task = score(answers, test)
                row = {
                    "tasks": n,
                    "budget": ns.budget,
                    "method": method,
                    "seed": seed,
                    "steps": steps,
                    "accuracy": macro_average(per_task),
                    "per_task": per_task,
                    "train_loss": manifest.get("train_loss"),
                    "trainable_params": manifest.get("trainable_params"),
                    "train_seconds": manifest.get("seconds"),
                    "eval_seconds": round(eval_s, 2),
                    "wall_seconds": round(time.time() - t0, 2),
                }
                runs.append(row)
                _common.journal_append(journal, {"key": key, "row": row})
                print(
                    f"[{len(runs)}/{total}] N={n} {method} seed={seed} steps={steps}: "
                    f"acc={100 * row['accuracy']:.1f}% "
                    + (f"loss={row['train_loss']:.3f} " if row["train_loss"] is not None else "")
                    + f"({row['wall_seconds']:.0f} s)",
                    flush=True,
                )
                if not ns.keep_runs:
                    shutil.rmtree(out / "runs" / method, ignore_errors=True)

    summary = summarize(runs, ns)
    results: dict[str, Any] = {
        "benchmark": "scaling",
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": {
            "model": BUNDLED_MODEL,
            "ns": ns.ns,
            "methods": ns.methods,
            "method_flags": {m: METHODS[m] for m in ns.methods},
            "seeds": ns.seeds,
            "data_seed": ns.data_seed,
            "budget": ns.budget,
            "total_steps": ns.total_steps if ns.budget == "fixed" else None,
            "steps_per_task": ns.steps_per_task,
            "min_steps": ns.min_steps,
            "max_steps": ns.max_steps,
            "steps": {str(n): steps_for(n, ns) for n in ns.ns},
            "batch_size": ns.batch_size,
            "learning_rate": ns.learning_rate,
            "lora_rank": ns.lora_rank,
            "train_per_task": ns.train_per_task,
            "test_per_task": ns.test_per_task,
            "num_threads": ns.num_threads,
            "niv1_dir": ns.niv1_dir,
            "niv1_max_output_words": NIV1_MAX_OUTPUT_WORDS if ns.niv1_dir else None,
            "niv1_input_words": ns.niv1_input_words if ns.niv1_dir else None,
            "tasks": [t.name for t in largest.tasks],
            "first_tasks": ns.first_tasks,
            "quick": ns.quick,
        },
        "base_pretraining": {k: v for k, v in pretrain_info.items() if k != "tasks"},
        "summary": summary,
        "runs": runs,
        "total_seconds": round(time.time() - t_start, 2),
    }
    out_json = _common.write_json(ns.out, results)
    plot(results, out_json.with_suffix(".png"))
    plot_first_tasks(results, first_tasks_png(out_json))
    if not ns.keep_runs:
        shutil.rmtree(work, ignore_errors=True)
    return results


def run_key(ns: argparse.Namespace, n: int, method: str, seed: int) -> str:
    """Everything that determines one run's result (for ``--resume``): a finished run is reused only when
    its data, base, budget and flags are exactly those of this invocation."""
    import hashlib
    import json

    from mtlora.data.manytask import TASKS

    fields = {
        "n": n, "method": method, "flags": METHODS[method], "seed": seed, "steps": steps_for(n, ns),
        "data_seed": ns.data_seed, "train_per_task": ns.train_per_task, "test_per_task": ns.test_per_task,
        "batch_size": ns.batch_size, "learning_rate": ns.learning_rate, "lora_rank": ns.lora_rank,
        "pretrain_steps": ns.pretrain_steps,
    }  # fmt: skip
    if n > len(TASKS):  # only then do the Natural Instructions tasks take part
        fields |= {"niv1": str(Path(ns.niv1_dir).resolve()), "niv1_input_words": ns.niv1_input_words}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def report(results: dict[str, Any]) -> list[str]:
    """The closing lines: one per method at the largest N (accuracy in %)."""
    n = str(max(results["config"]["ns"]))
    return [
        f"method={m} tasks={n} acc={100 * rows[n]['mean']:.1f}±{100 * rows[n]['std']:.1f}"
        for m, rows in results["summary"].items()
    ]


def first_tasks_png(out_json: Path) -> Path:
    return out_json.with_name(out_json.stem + "_first_tasks.png")


def first_tasks_table(results: dict[str, Any]) -> str:
    """Markdown table (method, N) x first task of ``mean ± std`` (%): do the first tasks survive added ones?"""
    ns_ = [str(n) for n in results["config"]["ns"]]
    methods = list(results["summary"])
    tasks = list(results["summary"][methods[0]][ns_[0]]["first_tasks"])
    lines = ["| method | N | " + " | ".join(tasks) + " |", "|---|---:|" + "---:|" * len(tasks)]
    for m in methods:
        for n in ns_:
            cells = results["summary"][m][n]["first_tasks"]
            vals = [f"{100 * cells[t]['mean']:.1f} ± {100 * cells[t]['std']:.1f}" for t in tasks]
            lines.append(f"| {m} | {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def table(results: dict[str, Any], prefix: str = "") -> str:
    """Markdown table method x N of ``mean ± std`` (%); ``prefix="common_"`` for the first-tasks view."""
    ns_ = [str(n) for n in results["config"]["ns"]]
    lines = ["| method | " + " | ".join(f"N={n}" for n in ns_) + " |", "|---|" + "---:|" * len(ns_)]
    for m, rows in results["summary"].items():
        cells = [f"{100 * rows[n][prefix + 'mean']:.1f} ± {100 * rows[n][prefix + 'std']:.1f}" for n in ns_]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = resolve(build_parser().parse_args(argv))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mtlora.demo import _quiet_libraries

    with _quiet_libraries():
        results = run(ns)
    print("\naverage exact match (%) over all N tasks\n" + table(results))
    print(f"\nexact match (%) over the first {min(ns.ns)} tasks only\n" + table(results, "common_"))
    print("\nper-task exact match (%) of the first tasks\n" + first_tasks_table(results))
    print(f"\nprotocol: {budget_text(results['config'])}")
    print(
        f"total {results['total_seconds']:.0f} s; wrote {ns.out}, {ns.out.with_suffix('.png')} and "
        f"{first_tasks_png(ns.out)}"
    )
    print("\n".join(report(results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
