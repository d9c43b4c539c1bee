"""``mtlora demo``: train lora, hydralora and mtlora on one multi-task set and compare them per task.

What it does (see ``docs/demo.md``):

1. builds the many-task suite (:mod:`mtlora.data.manytask`: 36 letter-list tasks that share their inputs,
   so one set of adapter weights has to compromise between them) and writes it to ``OUT/data``;
2. on the bundled tiny model only, *pre-trains the base* (full fine-tuning, cached): stories260k was trained
   on children's stories and cannot learn letter-list tasks through adapters alone in CPU minutes
   (measured: plain LoRA stays at chance, loss ~3.5 nats/token after 1500 steps). A real LLM can already
   read and write such lists, so the tiny base first learns that on 18 *other* tasks over the same inputs
   (:data:`~mtlora.data.manytask.PRETRAIN_TASKS`; none is evaluated);
3. trains every method with the library's own training path (``parse_train_args`` + ``train``, i.e. exactly
   ``mtlora train``), with the same data, steps, batch size, learning rate, rank and seed;
4. evaluates each adapter with batched greedy generation (left padding) through ``MtLoraModel.generate``,
   exact match per task, on test inputs never seen in training;
5. prints a markdown table and writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/results.png``.

On a CPU the default run takes about 7 minutes on 2 cores; ``--quick`` (used by the tests) about a minute.
``--device cuda --model_name_or_path <hf model>`` runs the same comparison on a GPU with a real model (no base
pre-training; ``--suite niv1`` uses the Natural Instructions v1 tasks instead of the letter tasks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mtlora.atomic import atomic_dir
from mtlora.errors import ConfigError
from mtlora.hub import default_device
from mtlora.outputs import add_safety_flags

BUNDLED_MODEL = "mtlora:stories260k"

#: Adapter flags of each method (``mtlora train`` syntax). Rank and learning rate are common flags.
#: mtlora is the full design: block-level FFN adapter + spectral regularisation + fine-grained routing.
METHOD_FLAGS: dict[str, list[str]] = {
    "lora": ["--method", "lora"],
    "hydralora": ["--method", "hydralora", "--lora_nums", "4", "--enable_blc"],
    "mmoelora": ["--method", "mmoelora", "--expert_num", "4"],
    "lorahub": ["--method", "lorahub"],
    "mtlora": [
        "--method", "mtlora", "--lora_nums", "4", "--enable_blc",
        "--enable_block_adapter", "--block_adapter_type", "ffn",
        "--enable_spectral_reg", "--enable_fine_grained_routing",
    ],
}  # fmt: skip
DEFAULT_METHODS = ("lora", "hydralora", "mtlora")

#: Row label of the reference evaluation of the (pre-trained) base model without any adapter.
BASE_ROW = "base (no adapter)"

_PRETRAIN_REASON = (
    "The bundled base (stories260k, 260K parameters) was trained only on children's stories; through "
    "adapters alone it stays at chance on letter-list tasks within a CPU budget (measured: LoRA r=8, 1500 "
    "steps, loss ~3.5 nats/token, 0% exact match). A real LLM can already read and write such lists, so the "
    "tiny base is first fully fine-tuned on 18 different tasks over the same inputs (PRETRAIN_TASKS, none of "
    "them evaluated, no test input used). Every method then starts from this same base."
)


# ----------------------------------------------------------------------------------------------- arguments
def build_parser(prog: str = "mtlora demo") -> argparse.ArgumentParser:
    from mtlora.cli_args import Parser, add_model, add_output, add_runtime

    p = Parser(
        prog=prog,
        description="Train lora / hydralora / mtlora on a multi-task suite with the bundled tiny model "
        "(CPU, ~7 min) and compare per-task exact-match accuracy, trainable parameters and time.",
    )
    add_output(p, required=False, default="demo_out", help="Where results.json, results.png and runs go.")
    add_model(p, default=BUNDLED_MODEL, help="Base model (bundled name, folder or hub id).")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"Comma list of {', '.join(METHOD_FLAGS)}."
    )
    p.add_argument("--suite", default="manytask", choices=("manytask", "niv1"), help="Task suite.")
    p.add_argument("--niv1_dir", default=None, help="--suite niv1: folder of Natural Instructions v1 tasks.")
    p.add_argument("--num_tasks", type=int, default=None, help="Number of tasks (manytask: 36, niv1: 30).")
    p.add_argument("--train_per_task", type=int, default=None, help="Training examples per task (200).")
    p.add_argument("--test_per_task", type=int, default=None, help="Test examples per task (50).")
    p.add_argument("--max_steps", type=int, default=None, help="Optimizer steps per method (1500).")
    p.add_argument(
        "--epochs", type=float, default=None, help="Train for this many epochs instead of --max_steps."
    )
    p.add_argument("--batch_size", type=int, default=16, help="Training batch size (all methods).")
    p.add_argument(
        "--learning_rate", type=float, default=None, help="Adapter learning rate (3e-3 tiny, 2e-4 else)."
    )
    p.add_argument("--lora_rank", type=int, default=8, help="Rank of every method's adapters.")
    p.add_argument(
        "--pretrain_steps",
        type=int,
        default=None,
        help="Base pre-training steps (full fine-tuning on PRETRAIN_TASKS); default 1500 for the bundled "
        "tiny model with the manytask suite, else 0 (off).",
    )
    p.add_argument(
        "--cache_dir", default=None, help="Cache of the pre-trained base (default OUTPUT_DIR/cache)."
    )
    p.add_argument("--seed", type=int, default=42, help="Seed of data generation, training and evaluation.")
    p.add_argument("--eval_batch_size", type=int, default=128, help="Prompts per generation batch.")
    add_runtime(
        p,
        device_choices=("auto", "cpu", "cuda"),
        device_default="auto",
        dtype=False,
        threads_default=1,
        threads_aliases=("--num_threads",),
        threads_dest="num_threads",
        threads_help="CPU threads for torch (on --device cpu). 1 on purpose: the tiny model's matrices are too "
        "small to gain from threads, and with other jobs on a 2-core machine 2 threads measured 7-13x slower "
        "than 1.",
    )
    p.add_argument(
        "--train_args", default="", help="Extra `mtlora train` flags for every method, e.g. '--bf16 True'."
    )
    p.add_argument(
        "--quick", action="store_true", help="A ~1-minute smoke run (tiny budgets; used by tests)."
    )
    add_safety_flags(p, overwrite=False)
    return p


def _trust(ns: argparse.Namespace) -> bool:
    """``--trust_remote_code``; False for namespaces built without it (benchmarks/scaling.py builds its own)."""
    return bool(getattr(ns, "trust_remote_code", False))


def _resolve(ns: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick / --suite / the model, and validate."""
    tiny = ns.model_name_or_path.strip().lower() == BUNDLED_MODEL
    quick = ns.quick
    defaults = {
        "num_tasks": (30 if quick else 36) if ns.suite == "manytask" else (4 if quick else 30),
        "train_per_task": 24 if quick else (200 if ns.suite == "manytask" else 80),
        "test_per_task": 4 if quick else (50 if ns.suite == "manytask" else 20),
        "max_steps": 30 if quick else 1500,
        "learning_rate": 3e-3 if tiny else 2e-4,
        "pretrain_steps": (60 if quick else 1500) if tiny and ns.suite == "manytask" else 0,
    }
    for key, value in defaults.items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    ns.methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    unknown = [m for m in ns.methods if m not in METHOD_FLAGS]
    if unknown or not ns.methods:
        raise ConfigError(f"--methods {unknown or ns.methods}: choose from {', '.join(METHOD_FLAGS)}")
    for key in ("num_tasks", "train_per_task", "test_per_task", "max_steps", "batch_size", "eval_batch_size"):
        if getattr(ns, key) < 1:
            raise ConfigError(f"--{key} must be >= 1")
    if ns.pretrain_steps < 0:
        raise ConfigError("--pretrain_steps must be >= 0")
    if ns.epochs is not None and ns.epochs <= 0:
        raise ConfigError("--epochs must be > 0")
    if ns.suite == "niv1" and not ns.niv1_dir:
        raise ConfigError("--suite niv1 needs --niv1_dir (a folder of Natural Instructions v1 task folders)")
    import torch

    if ns.device == "auto":
        ns.device = default_device()
    if ns.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return ns


# ----------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide library warnings and weight-loading bars (keep training/eval bars); restore state afterwards.

    Restoring matters because the tests run the demo in-process, next to other tests.
    """
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    ds_bars = datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()


def _say(msg: str) -> None:
    print(msg, flush=True)


def _file_fingerprint(folder: Path) -> str:
    """Content hash of a model folder (small files fully, large ones by size: the tiny model is 1 MB)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f.name.encode())
        size = f.stat().st_size
        if size <= 64 << 20:
            h.update(f.read_bytes())
        else:
            h.update(str(size).encode())
    return h.hexdigest()


def _device_flags(device: str) -> list[str]:
    import torch

    return ["--use_cpu", "True"] if device == "cpu" and torch.cuda.is_available() else []


# ----------------------------------------------------------------------------------------------- suite
def build_demo_suite(ns: argparse.Namespace):
    """The suite the demo trains and tests on (letter tasks, or NI v1 tasks for real models)."""
    from mtlora.data.manytask import build_suite, suite_from_niv1

    if ns.suite == "niv1":
        return suite_from_niv1(
            ns.niv1_dir, ns.num_tasks, ns.train_per_task, ns.test_per_task, ns.seed, max_output_words=5
        )
    return build_suite(ns.num_tasks, ns.train_per_task, ns.test_per_task, ns.seed)


# ----------------------------------------------------------------------------------------------- base pre-training
def _pretrain_cache_key(
    ns: argparse.Namespace, model_path: Path, records: Sequence[Any]
) -> tuple[str, dict[str, Any]]:
    """``(key, hyper-parameters)`` of a pre-training: the key hashes the base's files, the records and the
    hyper-parameters, so a stale cached base is never reused."""
    from mtlora.data.tokenize import records_fingerprint

    hparams = {
        "steps": ns.pretrain_steps,
        "learning_rate": 3e-3,
        "batch_size": ns.batch_size,
        "warmup_steps": min(50, ns.pretrain_steps // 10),
        "seed": ns.seed,
        "per_task": max(ns.train_per_task * 2, 16),
    }
    key_src = json.dumps(
        {"model": _file_fingerprint(model_path), "data": records_fingerprint(records), **hparams},
        sort_keys=True,
    )
    return hashlib.sha256(key_src.encode()).hexdigest()[:16], hparams


def _run_pretraining(
    ns: argparse.Namespace, model_path: Path, records: Sequence[Any], hparams: dict[str, Any], workdir: Path
) -> tuple[Any, Any, Any]:
    """Full fine-tuning of the base on ``records``: ``(model, tokenizer, trainer result)`` (fp32, cache on)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from mtlora.data import DataCollatorForInstructions, build_task_map, tokenize_records
    from mtlora.hub import load_base

    torch.manual_seed(ns.seed)  # seeds the load (the Trainer seeds again for training)
    model, tokenizer = load_base(
        model_path, dtype=torch.float32, trust_remote_code=_trust(ns), use_cache=False
    )
    dataset = tokenize_records(records, tokenizer, 128, "paper", build_task_map(records))
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=ns.batch_size,
        learning_rate=hparams["learning_rate"],
        max_steps=ns.pretrain_steps,
        lr_scheduler_type="cosine",
        warmup_steps=hparams["warmup_steps"],
        weight_decay=0.0,
        logging_steps=max(ns.pretrain_steps // 5, 1),
        save_strategy="no",
        report_to="none",
        seed=ns.seed,
        disable_tqdm=bool(getattr(ns, "no_progress", False)),
        dataloader_pin_memory=False,
        remove_unused_columns=False,  # keep task_ids for the collator; dropped in compute_loss
        use_cpu=ns.device == "cpu",
    )

    class _BaseTrainer(Trainer):
        """Plain causal-LM fine-tuning; the collator's task ids are for routed adapters, not for a base."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            inputs = {k: v for k, v in inputs.items() if k != "task_ids"}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = _BaseTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForInstructions.from_tokenizer(tokenizer),
    )
    result = trainer.train()
    model.config.use_cache = True
    return model, tokenizer, result


def pretrain_base(ns: argparse.Namespace, suite: Any, cache_dir: Path) -> tuple[str, dict[str, Any]]:
    """Full fine-tuning of the tiny base on PRETRAIN_TASKS, cached by content; returns (folder, info).

    The cache key covers the base model's files, the pre-training records (hence the excluded test inputs)
    and every hyper-parameter, so a stale base is never reused.
    """
    from mtlora.data import build_task_map
    from mtlora.data.manytask import pretrain_records
    from mtlora.hub import resolve_model_path

    model_path = Path(resolve_model_path(ns.model_name_or_path))
    records = pretrain_records(max(ns.train_per_task * 2, 16), ns.seed, exclude=suite.test)
    key, hparams = _pretrain_cache_key(ns, model_path, records)
    folder = cache_dir / f"pretrained_base-{key}"
    info_file = folder / "pretrain.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        info["cached"] = True
        _say(
            f"      reusing the cached pre-trained base {folder} ({info['seconds']:.0f} s when it was built)"
        )
        return str(folder), info

    t0 = time.time()
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}"
    model, tokenizer, result = _run_pretraining(ns, model_path, records, hparams, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    info = {
        "key": key,
        "base_model": ns.model_name_or_path,
        "tasks": sorted(build_task_map(records)),
        "num_examples": len(records),
        "train_loss": result.training_loss,
        "seconds": round(time.time() - t0, 2),
        "reason": _PRETRAIN_REASON,
        **hparams,
    }
    with atomic_dir(folder) as pub:  # complete or absent, with umask permissions (mtlora.atomic)
        model.save_pretrained(pub)
        tokenizer.save_pretrained(pub)
        (pub / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    info["cached"] = False
    return str(folder), info


# ----------------------------------------------------------------------------------------------- evaluation
def prompt_ids(record: Any, tokenizer: Any) -> list[int]:
    """The training prompt of ``record`` (:func:`mtlora.inference.prompt_ids`, the rule ``train`` uses)."""
    from mtlora.inference import prompt_ids as _prompt_ids

    return _prompt_ids(record, tokenizer)


def generate_answers(
    model: Any,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    device: str,
    batch_size: int = 128,
    max_new_tokens: int = 32,
    task_map: dict[str, int] | None = None,
    desc: str = "eval",
) -> list[str]:
    """Greedy answers for ``records`` (:func:`mtlora.inference.answer_records` on the shared engine).

    Decoding stops at the first EOS-like id of the tokenizer or the generation config (stories260k ends with
    BOS as well as EOS). ``task_map`` passes per-row task ids (needed by mmoelora's task gate).
    """
    from mtlora.inference import Engine, answer_records

    model.eval()
    engine = Engine(model, tokenizer, device=device, batch_size=batch_size)
    return answer_records(engine, records, max_new_tokens=max_new_tokens, task_map=task_map, desc=desc)


def _answer_budget(records: Sequence[Any], tokenizer: Any) -> int:
    """max_new_tokens from the *training* answers' lengths (+ slack), never from the test answers."""
    longest = max(len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in records)
    return min(longest + 4, 256)


def evaluate_model(
    base_path: str,
    adapter_dir: Path | None,
    records: Sequence[Any],
    ns: argparse.Namespace,
    max_new_tokens: int,
    desc: str,
) -> tuple[list[str], float]:
    """Load base (+ adapter), generate answers for ``records``; returns (answers, seconds)."""
    from mtlora.hub import load_model
    from mtlora.model import needs_task_ids

    t0 = time.time()
    # LoRAHub's composed adapter is a plain peft LoRA; every other method's is an mtlora adapter
    loaded = load_model(base_path, adapter_dir, device=ns.device, trust_remote_code=_trust(ns))
    model, tokenizer = loaded.model, loaded.tokenizer
    task_map = loaded.task_map if needs_task_ids(loaded.model) else None
    answers = generate_answers(
        model,
        tokenizer,
        records,
        device=ns.device,
        batch_size=ns.eval_batch_size,
        max_new_tokens=max_new_tokens,
        task_map=task_map,
        desc=desc,
    )
    return answers, time.time() - t0


# ----------------------------------------------------------------------------------------------- training
def train_method(
    method: str,
    base_path: str,
    data_dir: Path,
    out: Path,
    ns: argparse.Namespace,
    flags: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train one method through ``mtlora train``'s own code path; returns its run manifest plus the folder.

    ``flags`` replaces ``METHOD_FLAGS[method]`` (then ``method`` only names the run folder): the benchmarks
    train ablation rows and regularizer sweeps through this same path without editing the demo's table.
    """
    from mtlora.training.arguments import parse_train_args
    from mtlora.training.run import train

    method_flags = list(METHOD_FLAGS[method] if flags is None else flags)
    run_dir = out / "runs" / method
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale train_log.jsonl would be appended to
    budget = ["--num_train_epochs", str(ns.epochs)] if ns.epochs else ["--max_steps", str(ns.max_steps)]
    total = ns.max_steps if not ns.epochs else 0
    argv = [
        "--model_name_or_path", base_path, "--dataset_dir", str(data_dir), "--output_dir", str(run_dir),
        "--data_cache_dir", str(out / "cache" / "tokenized"), "--max_seq_length", "512",
        "--per_device_train_batch_size", str(ns.batch_size), "--learning_rate", str(ns.learning_rate),
        "--lora_rank", str(ns.lora_rank), "--lr_scheduler_type", "cosine", "--warmup_steps", str(max(1, round(0.03 * total)) if total else 30),
        "--logging_steps", str(max(total // 5, 1) if total else 50), "--save_strategy", "no",
        "--seed", str(ns.seed), "--data_seed", str(ns.seed), "--disable_tqdm", str(bool(getattr(ns, "no_progress", False))),
        "--report_to", "none", *budget, *_device_flags(ns.device), *method_flags,
        *shlex.split(ns.train_args), *(["--trust_remote_code", "True"] if _trust(ns) else []),
    ]  # fmt: skip
    if method_flags[:2] == ["--method", "lorahub"]:
        return _train_lorahub(argv, run_dir, data_dir)
    adapter_dir = train(*parse_train_args(argv, prog="mtlora demo"))
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    manifest["adapter_dir"] = str(adapter_dir)
    manifest["argv"] = argv
    return manifest


def _train_lorahub(argv: list[str], run_dir: Path, data_dir: Path) -> dict[str, Any]:
    """LoRAHub: one plain LoRA per task, then composed per task. Equal total budget: the step budget is split
    across the tasks' LoRAs (each gets ``max_steps / num_tasks``, at least 10)."""
    from mtlora.data import build_task_map, load_records
    from mtlora.lorahub import lorahub_train_argv, run_lorahub_method
    from mtlora.training.arguments import parse_train_args

    t0 = time.time()
    num_tasks = len(build_task_map(load_records(data_dir)))
    argv = list(argv)
    if "--max_steps" in argv:
        i = argv.index("--max_steps") + 1
        argv[i] = str(max(int(argv[i]) // max(num_tasks, 1), 10))
    hub_argv = lorahub_train_argv(argv)
    assert hub_argv is not None
    adapter_dir = run_lorahub_method(*parse_train_args(hub_argv, prog="mtlora demo"))
    from mtlora.hub import adapter_num_parameters

    trainable = adapter_num_parameters(adapter_dir)
    return {
        "adapter_dir": str(adapter_dir),
        "argv": argv,
        "trainable_params": trainable,
        "seconds": time.time() - t0,
    }


# ----------------------------------------------------------------------------------------------- reporting
def markdown_table(results: dict[str, Any]) -> str:
    """Tasks x methods accuracy (%), then the average, trainable parameters and training seconds."""
    rows = results["methods"]
    cols = list(rows)
    tasks = [t["name"] for t in results["suite"]["tasks"]]
    lines = ["| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{100 * rows[c]['per_task'][t]:.0f}" for c in cols) + " |")

    def cell(c: str, key: str, fmt: str) -> str:
        v = rows[c].get(key)
        return "-" if v is None else format(v, fmt)

    avg = [f"**{100 * rows[c]['average']:.1f}**" for c in cols]
    lines.append("| **average** | " + " | ".join(avg) + " |")
    lines.append("| trainable params | " + " | ".join(cell(c, "trainable_params", ",d") for c in cols) + " |")
    lines.append("| train seconds | " + " | ".join(cell(c, "seconds", ".0f") for c in cols) + " |")
    return "\n".join(lines)


def family_table(results: dict[str, Any]) -> str:
    """Per-family average accuracy (%), the compact view of where methods differ."""
    rows = results["methods"]
    cols = list(rows)
    fams = list(dict.fromkeys(t["family"] for t in results["suite"]["tasks"]))
    lines = ["| family | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(f"{100 * rows[c]['per_family'][f]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Left: per-task accuracy heat map (tasks x methods). Right: average accuracy bars, annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = results["methods"]
    cols = list(rows)
    tasks = [t["name"] for t in results["suite"]["tasks"]]
    grid = np.array([[rows[c]["per_task"][t] for c in cols] for t in tasks])
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(11, max(4.0, 0.22 * len(tasks) + 1.5)), gridspec_kw={"width_ratios": [1.2, 1]}
    )
    im = ax1.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax1.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax1.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax1.set_title("exact match per task")
    fig.colorbar(im, ax=ax1, fraction=0.05)
    avgs = [100 * rows[c]["average"] for c in cols]
    bars = ax2.bar(range(len(cols)), avgs, color=plt.cm.tab10(np.arange(len(cols)) % 10))
    for b, c in zip(bars, cols):
        tp = rows[c].get("trainable_params")
        label = f"{b.get_height():.1f}%" + (f"\n{tp:,d} params\n{rows[c]['seconds']:.0f} s" if tp else "")
        ax2.annotate(
            label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7
        )
    ax2.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("average exact match (%)")
    ax2.set_ylim(0, max(avgs + [1.0]) * 1.35)
    meta = results["suite"]
    ax2.set_title(f"{meta['name']}: {len(tasks)} tasks, {results['config']['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_family(per_task: dict[str, float], tasks: Sequence[Any]) -> dict[str, float]:
    fams: dict[str, list[float]] = {}
    for t in tasks:
        fams.setdefault(t.family, []).append(per_task[t.name])
    return {f: sum(v) / len(v) for f, v in fams.items()}


# ----------------------------------------------------------------------------------------------- main
def _evaluate_row(
    answers: list[str],
    eval_s: float,
    test: Sequence[Any],
    tasks: Sequence[Any],
    manifest: dict[str, Any] | None,
) -> dict[str, Any]:
    """One row of the results: scores of ``answers`` on ``test``, plus the training run's facts (None: the base)."""
    from mtlora.data.manytask import macro_average, score

    per_task = score(answers, test)
    row: dict[str, Any] = {
        "per_task": per_task,
        "per_family": _per_family(per_task, tasks),
        "average": macro_average(per_task),
        "trainable_params": manifest["trainable_params"] if manifest else None,
        "seconds": manifest["seconds"] if manifest else None,
        "eval_seconds": round(eval_s, 2),
    }
    if manifest:
        row.update({k: manifest[k] for k in ("train_loss", "global_steps")})
    return row


def _results(
    ns: argparse.Namespace,
    suite: Any,
    test: Sequence[Any],
    budget: int,
    rows: dict[str, Any],
    pretrain_info: dict[str, Any] | None,
) -> dict[str, Any]:
    """``results.json`` without its total time: the suite, the run's configuration and the rows."""
    return {
        "suite": {
            "name": suite.name,
            "meta": suite.meta,
            "tasks": [dataclasses.asdict(t) for t in suite.tasks],
            "num_train": len(suite.train),
            "num_test": len(test),
        },
        "config": {
            "model": ns.model_name_or_path,
            "device": ns.device,
            "methods": ns.methods,
            "max_steps": None if ns.epochs else ns.max_steps,
            "epochs": ns.epochs,
            "batch_size": ns.batch_size,
            "learning_rate": ns.learning_rate,
            "lora_rank": ns.lora_rank,
            "seed": ns.seed,
            "num_threads": ns.num_threads if ns.device == "cpu" else None,
            "quick": ns.quick,
            "train_args": ns.train_args,
            "max_new_tokens": budget,
        },
        "base_pretraining": pretrain_info,
        "methods": rows,
    }


def _write_results(
    ns: argparse.Namespace,
    out: Path,
    results: dict[str, Any],
    test: Sequence[Any],
    predictions: dict[str, list[str]],
) -> None:
    """``results.json``, ``predictions.jsonl``, ``results.md`` and ``results.png`` in ``out``; the tables on stdout."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as fh:
        for i, rec in enumerate(test):
            fh.write(json.dumps({**rec, "predictions": {m: p[i] for m, p in predictions.items()}}) + "\n")
    table = markdown_table(results)
    families = family_table(results)
    budget_text = f"{ns.epochs} epochs" if ns.epochs else f"{ns.max_steps} steps"
    pretrain_info = results["base_pretraining"]
    header = (
        f"# mtlora demo: {results['suite']['name']}, {len(results['suite']['tasks'])} tasks, "
        f"{ns.model_name_or_path} on {ns.device}\n\n"
        f"Exact match (%) on {ns.test_per_task} unseen test inputs per task; every method: "
        f"{budget_text}, batch {ns.batch_size}, "
        f"lr {ns.learning_rate:g}, rank {ns.lora_rank}, seed {ns.seed}.\n"
    )
    if pretrain_info:
        header += (
            f"\nBase pre-training: {pretrain_info['steps']} steps of full fine-tuning on "
            f"{len(pretrain_info['tasks'])} non-evaluated tasks ({pretrain_info['seconds']:.0f} s"
            f"{', cached' if pretrain_info['cached'] else ''}). {_PRETRAIN_REASON}\n"
        )
    (out / "results.md").write_text(f"{header}\n## Per family\n\n{families}\n\n## Per task\n\n{table}\n")
    plot_results(results, out / "results.png")
    _say("\n" + table + "\n\n" + families)
    _say(f"\ntotal {results['total_seconds']:.0f} s; wrote {out / 'results.json'}, {out / 'results.md'}, "
         f"{out / 'results.png'}")  # fmt: skip


def run_demo(ns: argparse.Namespace) -> dict[str, Any]:
    """Everything after argument parsing; returns the results dict (also written to OUTPUT_DIR)."""
    import torch

    from mtlora.hub import load_tokenizer

    t_start = time.time()
    out = Path(ns.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(ns.cache_dir) if ns.cache_dir else out / "cache"
    if ns.device == "cpu":
        torch.set_num_threads(ns.num_threads)
    steps = 2 + (ns.pretrain_steps > 0) + len(ns.methods)
    step = 0

    def stage(text: str) -> None:
        nonlocal step
        step += 1
        _say(f"\n[{step}/{steps}] {text}")

    stage(f"building the {ns.suite} suite ({ns.num_tasks} tasks, {ns.train_per_task} train / "
          f"{ns.test_per_task} test per task, seed {ns.seed})")  # fmt: skip
    suite = build_demo_suite(ns)
    data_dir = suite.write(out / "data")
    _say(f"      {len(suite.train)} training and {len(suite.test)} test records in {data_dir}")

    base_path, pretrain_info = ns.model_name_or_path, None
    if ns.pretrain_steps > 0:
        stage(
            f"pre-training the base ({ns.pretrain_steps} steps of full fine-tuning on 18 non-evaluated tasks)"
        )
        _say("      why: " + _PRETRAIN_REASON)
        base_path, pretrain_info = pretrain_base(ns, suite, cache_dir)

    tokenizer = load_tokenizer(base_path, trust_remote_code=_trust(ns))
    test = suite.test_records()
    budget = _answer_budget(suite.train, tokenizer)
    methods: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[str]] = {}

    stage("evaluating the base model without adapters (reference)")
    answers, eval_s = evaluate_model(base_path, None, test, ns, budget, desc="eval base")
    methods[BASE_ROW] = _evaluate_row(answers, eval_s, test, suite.tasks, None)
    predictions[BASE_ROW] = answers

    for method in ns.methods:
        stage(f"training {method} ({' '.join(METHOD_FLAGS[method][1:]) or 'defaults'})")
        manifest = train_method(method, base_path, data_dir, out, ns)
        answers, eval_s = evaluate_model(
            base_path, Path(manifest["adapter_dir"]), test, ns, budget, desc=f"eval {method}"
        )
        methods[method] = _evaluate_row(answers, eval_s, test, suite.tasks, manifest)
        methods[method].update(flags=METHOD_FLAGS[method], adapter_dir=manifest["adapter_dir"])
        predictions[method] = answers
        _say(f"      {method}: average exact match {100 * methods[method]['average']:.1f}% "
             f"({manifest['trainable_params']:,d} trainable params, {manifest['seconds']:.0f} s)")  # fmt: skip

    results = _results(ns, suite, test, budget, methods, pretrain_info)
    results["total_seconds"] = round(time.time() - t_start, 2)
    _write_results(ns, out, results, test, predictions)
    return results


def main(argv: list[str] | None = None) -> int:
    from mtlora.cli_args import apply_runtime

    ns = _resolve(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    apply_runtime(ns)  # --no_progress; the demo sets its own thread count (--threads, CPU only)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _quiet_libraries():
        run_demo(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
