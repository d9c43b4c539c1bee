"""``mtlora repro``: the paper's tables, configuration by configuration — train, evaluate, assemble.

    mtlora repro table2 --dry-run                     # print every command of Table 2 (both setups)
    mtlora repro table2 --smoke --output_dir R        # every configuration for a few steps on the tiny model (CPU)
    mtlora repro table2 --model_name_or_path ./data/llama-2-7b --flan_dir ./data/flan_v2_subset \\
        --dolly_dir ./data/dolly-15k-converted --num_gpus 2 --output_dir R    # the real run

Tables (the paper's ``tables/*.sh`` names are accepted too):

* ``table1`` (``main``): the baselines: LoRAHub, MMoELoRA (task-id gated), HydraLoRA, full mtLoRA;
* ``table2`` (``0_main_ablation``): HydraLoRA q,v → + block FFN → + spectral → + FGR (gs 2048) → full mtLoRA;
* ``table3`` (``1_routing_granularity``): block FFN + FGR, gs ∈ {4096, 2048, 512, 256, 128};
* ``table4`` (``2_block_level``): component q,v vs block attention / ffn / both;
* ``tableS7`` (``3_llama13b``): LLaMA-2-13B: HydraLoRA q,v, block FFN, block FFN + FGR gs 2560.

Every configuration the released ``tables/*.sh`` train (31 runs: Table 2: 10, Table 3: 10, Table 4: 8,
Table S7: 3) is trained with the released flags: method, ``--enable_blc`` (every released row passes it,
baselines too), block type with ``--block_adapter_style lowrank --block_adapter_rank 16``, spectral λ and
``--spectral_reg_steps`` (1.0 / 500 for Flan-v2 → BBH, 0.5 / 280 for Dolly-15k → MMLU), group size, r 16, α 64,
E 16, dropout 0.05, lr 2e-4, max length 512, 1 epoch, seed 42, bf16, gradient checkpointing, and the row's own
per-device batch × gradient accumulation × processes (16×1×2, 8×2×2, 16×2×1 or 32×1×1; effective batch 32).
``tests/fixtures/released_table_rows.tsv`` holds the released rows and ``tests/test_repro.py`` holds these
commands against them flag by flag. Rows the released scripts do not run (Table 1's baselines; BBH for Table
S7, whose released script trains only Dolly-15k → MMLU) are *extra*: labelled so in the dry-run output, in
``result.json`` and ``results.json``.

Processes: by default every row runs with the released process count (``torchrun --nproc_per_node 2`` for the
BBH rows, one process for MMLU). ``--num_gpus N`` runs every row on N processes with the same effective batch
32: the released per-device batch is kept when it fits (at most 32/N) and the gradient accumulation makes up
the rest; 32 must be divisible by N. Group sizes are given for d=4096 (5120 for 13B) and scaled to the model's
hidden size, keeping G fixed.

Runs are resumable: a configuration whose ``result.json`` exists with the same config hash is skipped. Each
result records its config hash. ``--paper_faithful`` switches to the released code's behaviour where it differs
(docs/paper_differences.md): paper-mode spectral regularizer, pure-bf16 component adapters, MMoELoRA's extra
"general" task embedding row, and the released balance loss, which had no gradient (``--blc_alpha 0``;
``--no_blc_ignore_padding`` for its definition).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.errors import MtLoraError

ASSETS = Path(__file__).resolve().parent / "assets" / "train_data"
PAPER_HIDDEN = {"7b": 4096, "13b": 5120}

# Published numbers (README of the paper's code): (Dolly-15k → MMLU, Flan-v2 → BBH).
PAPER_TABLE1 = {
    "lorahub": (42.0, 34.9),
    "mmoelora": (42.1, 35.4),
    "hydralora": (42.4, 36.9),
    "mtlora_full": (44.5, 38.5),
}
PAPER_TABLE2 = {
    "hydralora": (41.6, 35.5),
    "block_ffn": (43.7, 37.9),
    "block_ffn_spectral": (43.6, 38.4),
    "block_ffn_fgr": (44.1, 38.2),
    "mtlora_full": (44.5, 38.5),
}


@dataclass
class Row:
    """One configuration of a table: a row id, a label and the adapter flags (paper scale).

    ``released`` maps each setup the released ``tables/*.sh`` train for this row to the experiment script
    that trains it (``A -> B``: A is a symbolic link to B); a setup not in it is an *extra* run.
    """

    id: str
    label: str
    flags: list[str]
    spectral: bool = False
    group_size: int | None = None  # at paper scale (d=4096 or 5120)
    released: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def is_extra(self, setup: str) -> bool:
        return setup not in self.released


@dataclass(frozen=True)
class Layout:
    """How one row is launched: per-device batch × gradient accumulation × processes (= effective batch)."""

    per_device: int
    grad_accum: int
    processes: int

    @property
    def effective(self) -> int:
        return self.per_device * self.grad_accum * self.processes


#: The released rows' block adapter flags (every block row passes them; they are also mtlora's defaults).
BLOCK_STYLE = ["--block_adapter_style", "lowrank", "--block_adapter_rank", "16"]


def _block(kind: str = "ffn") -> list[str]:
    return ["--method", "mtlora", "--enable_block_adapter", "--block_adapter_type", kind, *BLOCK_STYLE]


# The released train.py adapts q_proj,v_proj by default (--trainable), as mtlora does for Llama.
HYDRA = ["--method", "hydralora"]


def _both(script: str) -> dict[str, str]:
    """The released scripts of a row trained in both setups: exp/bbh/<script> and exp/mmlu/<script>."""
    return {"bbh": f"exp/bbh/{script}", "mmlu": f"exp/mmlu/{script}"}


def _table1_rows() -> list[Row]:
    """Table 1: the baselines and full mtLoRA (no released script: every run is extra)."""
    return [
        Row(
            "lorahub",
            "LoRAHub (per-task LoRAs, composed)",
            ["--method", "lorahub", "--target_modules", "q_proj,v_proj"],
        ),
        Row(
            "mmoelora",
            "MMoELoRA (task-id gated)",
            ["--method", "mmoelora", "--target_modules", "q_proj,v_proj"],
        ),
        Row("hydralora", "HydraLoRA", HYDRA),
        Row("mtlora_full", "mtLoRA (block + spectral + FGR)", _block(), spectral=True, group_size=2048),
    ]


def _table2_rows() -> list[Row]:
    """Table 2: HydraLoRA q,v, then block FFN, spectral regularization, fine-grained routing, all."""
    ffn = {s: f"exp/{s}/block/ffn/0_baseline.sh -> exp/{s}/block/position/ffn.sh" for s in SETUPS}
    return [
        Row("hydralora", "HydraLoRA (component q,v)", HYDRA, released=_both("component/0_baseline.sh")),
        Row("block_ffn", "+ block-level (FFN)", _block(), released=ffn),
        Row(
            "block_ffn_spectral",
            "+ block + spectral reg.",
            _block(),
            spectral=True,
            released={
                "bbh": "exp/bbh/block/ffn/spectral/lambda/1.0.sh",
                "mmlu": "exp/mmlu/block/ffn/spectral/lambda/0.5.sh",
            },
        ),
        Row(
            "block_ffn_fgr",
            "+ block + fine-grained routing",
            _block(),
            group_size=2048,
            released=_both("block/ffn/fgr/g2048.sh"),
        ),
        Row(
            "mtlora_full",
            "mtLoRA (block + spectral + FGR)",
            _block(),
            spectral=True,
            group_size=2048,
            released=_both("block/ffn/spectral+fgr/g2048.sh"),
        ),
    ]


def _table3_rows() -> list[Row]:
    """Table 3: block FFN + fine-grained routing over the group sizes."""
    return [
        Row(
            f"fgr_g{g}",
            f"block FFN + FGR gs={g}",
            _block(),
            group_size=g,
            released=_both(f"block/ffn/fgr/g{g}.sh"),
        )
        for g in (4096, 2048, 512, 256, 128)
    ]


def _table4_rows() -> list[Row]:
    """Table 4: component q,v against block attention / FFN / both."""
    return [
        Row("component_qv", "component (q,v)", HYDRA, released=_both("component/0_baseline.sh")),
        Row(
            "block_attention",
            "block attention",
            _block("attention"),
            released=_both("block/position/attn.sh"),
        ),
        Row("block_ffn", "block FFN", _block("ffn"), released=_both("block/position/ffn.sh")),
        Row(
            "block_both",
            "block attention + FFN",
            _block("both"),
            released=_both("block/position/both.sh"),
        ),
    ]


def _tableS7_rows() -> list[Row]:
    """Table S7: LLaMA-2-13B; the released 3_llama13b.sh trains Dolly-15k -> MMLU only: BBH is extra."""
    return [
        Row(
            "hydralora_13b",
            "HydraLoRA (component q,v)",
            HYDRA,
            released={"mmlu": "exp/llama13/0_baseline.sh"},
        ),
        Row("block_ffn_13b", "block FFN", _block(), released={"mmlu": "exp/llama13/1_block_ffn.sh"}),
        Row(
            "block_ffn_fgr_13b",
            "block FFN + FGR gs=2560",
            _block(),
            group_size=2560,
            released={"mmlu": "exp/llama13/2_fgr_g2048.sh"},
        ),
    ]


#: The rows of each table (the paper's order).
TABLE_ROWS = {
    "table1": _table1_rows,
    "table2": _table2_rows,
    "table3": _table3_rows,
    "table4": _table4_rows,
    "tableS7": _tableS7_rows,
}


def table_rows(table: str) -> list[Row]:
    """The configurations (rows) of ``table``, each with its flags and the released scripts that train it."""
    if table not in TABLE_ROWS:
        raise MtLoraError(f"unknown table {table!r}")
    return TABLE_ROWS[table]()


def released_layout(table: str, setup: str, row: Row) -> Layout:
    """The released launch of a row (extra rows: that of the same setup's 7B rows).

    BBH scripts run ``accelerate launch`` on 2 GPUs, 16×1 (8×2 with spectral regularization); MMLU scripts
    run one process, 16×2 (32×1 with spectral regularization); the 13B scripts run one process, 32×1.
    """
    if table == "tableS7" and setup == "mmlu":
        return Layout(32, 1, 1)
    if setup == "bbh":
        return Layout(8, 2, 2) if row.spectral else Layout(16, 1, 2)
    return Layout(32, 1, 1) if row.spectral else Layout(16, 2, 1)


def batch_layout(released: Layout, num_gpus: int | None) -> Layout:
    """The layout for ``num_gpus`` processes (None: the released one), keeping the effective batch.

    Why keep the released per-device batch where it fits: it is what fitted in the released runs' GPU memory;
    gradient accumulation makes up the rest of the effective batch.
    """
    if num_gpus is None or num_gpus == released.processes:
        return released
    total = released.effective
    if num_gpus < 1 or total % num_gpus:
        raise MtLoraError(
            f"--num_gpus {num_gpus}: the effective batch {total} of the released runs must be divisible by the "
            "number of processes (use 1, 2, 4, 8, 16 or 32)"
        )
    per_gpu = total // num_gpus
    per_device = min(released.per_device, per_gpu)
    while per_gpu % per_device:
        per_device -= 1
    return Layout(per_device, per_gpu // per_device, num_gpus)


TABLE_ALIASES = {
    "table1": "table1", "main": "table1",
    "table2": "table2", "0_main_ablation": "table2", "tables/0_main_ablation.sh": "table2",
    "table3": "table3", "1_routing_granularity": "table3", "tables/1_routing_granularity.sh": "table3",
    "table4": "table4", "2_block_level": "table4", "tables/2_block_level.sh": "table4",
    "tables7": "tableS7", "tableS7": "tableS7", "3_llama13b": "tableS7", "tables/3_llama13b.sh": "tableS7",
}  # fmt: skip

#: The released table script of each table (Table 1 has none).
TABLE_SCRIPTS = {
    "table2": "0_main_ablation.sh",
    "table3": "1_routing_granularity.sh",
    "table4": "2_block_level.sh",
    "tableS7": "3_llama13b.sh",
}

SETUPS = {
    # setup: (benchmark, paper spectral lambda, paper spectral steps, few-shot)
    "bbh": ("bbh", 1.0, 500, 3),
    "mmlu": ("mmlu", 0.5, 280, 5),
}


def _hidden_size(model: str) -> int:
    """The model's hidden size from its config alone (group sizes scale with it)."""
    from mtlora.hub import load_config

    # explicit: unset, transformers would ask [y/N] on stdin for a model with custom code
    return int(load_config(model, trust_remote_code=False).get_text_config().hidden_size)


def build_commands(
    row: Row, setup: str, args: argparse.Namespace, run_dir: Path, hidden: int
) -> dict[str, Any]:
    """The train and eval command lines (argv, without the program) of one configuration, and its layout."""
    bench, lam, steps, shots = SETUPS[setup]
    data_dir = args.flan_dir if setup == "bbh" else args.dolly_dir
    train = [
        "--model_name_or_path", args.model_name_or_path, "--dataset_dir", str(data_dir),
        "--output_dir", str(run_dir), *row.flags,
        "--lora_rank", "16", "--lora_alpha", "64", "--lora_nums", "16", "--lora_dropout", "0.05",
        "--learning_rate", "0.0002", "--max_seq_length", "512", "--load_in_kbits", "16",
        "--seed", "42", "--save_strategy", "no", "--logging_steps", "10",
        "--overwrite_output_dir",  # an unfinished configuration is trained again from scratch in its folder
    ]  # fmt: skip
    # The released rows pass --enable_blc everywhere; it needs a token router (not plain LoRA / MMoELoRA).
    if row.flags[1] in ("hydralora", "mtlora"):
        train += ["--enable_blc"]
    if row.spectral:
        train += [
            "--enable_spectral_reg",
            "--spectral_reg_lambda",
            str(lam),
            "--spectral_reg_steps",
            str(steps),
        ]
    if row.group_size is not None:
        paper_hidden = PAPER_HIDDEN["13b" if args.table == "tableS7" else "7b"]
        gs = max(1, row.group_size * hidden // paper_hidden)
        train += ["--enable_fine_grained_routing", "--routing_group_size", str(gs)]
    if args.paper_faithful:
        if "--enable_blc" in train:
            # The released balance loss had no gradient (reentrant checkpointing): weight 0 trains the same
            # weights; the released definition (padding included) is kept should the weight be restored.
            train += ["--blc_alpha", "0", "--no_blc_ignore_padding"]
        if row.spectral:
            train += ["--spectral_reg_mode", "paper"]
        if "--enable_block_adapter" not in row.flags:
            train += ["--adapter_dtype", "bfloat16"]
        if "mmoelora" in row.flags:  # the released task embedding: task_num + 1 rows, "general" id task_num
            train += ["--mmoelora_general_task"]
    if args.smoke:
        layout = Layout(4, 1, args.num_gpus or 1)
        train += [
            "--max_steps",
            str(args.smoke_steps),
            "--per_device_train_batch_size",
            "4",
            "--max_seq_length",
            "256",
        ]
        train += ["--disable_tqdm", "True", "--max_train_samples", "32"]
    else:
        layout = batch_layout(released_layout(args.table, setup, row), args.num_gpus)
        train += ["--num_train_epochs", "1", "--per_device_train_batch_size", str(layout.per_device)]
        train += ["--gradient_accumulation_steps", str(layout.grad_accum), "--gradient_checkpointing"]
        if args.device != "cpu":
            train += ["--bf16"]
    evaluate = [
        "--model_name_or_path", args.model_name_or_path, "--lora_checkpoint", str(run_dir / "sft_lora_model"),
        "--output_dir", str(run_dir / f"{bench}_eval"), "--num_few_shot", str(shots), "--protocol", args.protocol,
    ]  # fmt: skip
    if args.smoke:
        names = "boolean_expressions,navigate" if bench == "bbh" else "abstract_algebra,anatomy"
        evaluate += ["--tasks" if bench == "bbh" else "--subjects", names, "--limit", "2", "--no_progress"]
    if args.device:
        evaluate += ["--device", args.device]
    return {"train": train, "eval": evaluate, "benchmark": [bench], "layout": layout}


def provenance(table: str, setup: str, row: Row) -> str:
    """One line saying where a configuration comes from: the released script, or that it is an extra run."""
    if row.is_extra(setup):
        script = TABLE_SCRIPTS.get(table)
        why = f"the released tables/{script} does not train it" if script else "no released table script"
        return f"EXTRA (not a released row: {why})"
    return f"released {row.released[setup]}"


def config_hash(commands: dict[str, Any]) -> str:
    blob = json.dumps({"train": commands["train"], "eval": commands["eval"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _shell(prog: str, argv: list[str], num_gpus: int) -> str:
    launcher = f"torchrun --nproc_per_node {num_gpus} " if num_gpus > 1 and prog == "train.py" else "python "
    return launcher + prog + " " + " ".join(shlex.quote(a) for a in argv)


def _run_train(argv: list[str], num_gpus: int) -> None:
    if num_gpus > 1:
        import subprocess

        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(num_gpus),
            "-m",
            "mtlora.cli",
            "train",
            *argv,
        ]
        subprocess.run(cmd, check=True)
        return
    from mtlora.training.cli import main as train_main

    train_main(argv)


def _manifest(run_dir: Path) -> dict[str, Any]:
    """The run manifest, or (LoRAHub, which composes rather than trains one adapter) counts from the adapter."""
    from mtlora.hub import adapter_num_parameters

    path = run_dir / "run_manifest.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"trainable_params": adapter_num_parameters(run_dir), "total_params": None}


def _accuracy(run_dir: Path, bench: str) -> float | None:
    path = run_dir / f"{bench}_eval" / f"{bench}_results.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    key = "average_accuracy" if bench == "bbh" else "overall_accuracy"
    value = data.get(key)
    return None if value is None else float(value)


def _run_row(
    args: argparse.Namespace, row: Row, setup: str, run_dir: Path, cmds: dict[str, Any]
) -> dict[str, Any]:
    """Train and evaluate one configuration, or reuse its ``result.json`` when the configuration is unchanged."""
    from mtlora.evaluation.cli import run as eval_run

    bench = cmds["benchmark"][0]
    layout: Layout = cmds["layout"]
    h = config_hash(cmds)
    result_file = run_dir / "result.json"
    if result_file.is_file() and json.loads(result_file.read_text()).get("config_hash") == h:
        print(f"[skip] {args.table}/{setup}/{row.id}: done (config {h})", flush=True)
        return json.loads(result_file.read_text())
    print(f"[run] {args.table}/{setup}/{row.id} (config {h})", flush=True)
    t0 = time.time()
    _run_train(cmds["train"], layout.processes)
    t_train = time.time() - t0
    rc = eval_run(bench, cmds["eval"], prog=f"eval_{bench}.py")
    if rc:
        raise MtLoraError(f"evaluation of {run_dir} failed with exit code {rc}")
    manifest = _manifest(run_dir)
    res = {
        "config_hash": h,
        "table": args.table,
        "setup": setup,
        "row": row.id,
        "label": row.label,
        "extra": row.is_extra(setup),
        "released_script": row.released.get(setup),
        "provenance": provenance(args.table, setup, row),
        "batch": {
            "per_device": layout.per_device,
            "gradient_accumulation": layout.grad_accum,
            "processes": layout.processes,
            "effective": layout.effective,
        },
        "train_command": _shell("train.py", cmds["train"], layout.processes),
        "eval_command": _shell(f"eval_{bench}.py", cmds["eval"], 1),
        "trainable_params": manifest["trainable_params"],
        "total_params": manifest["total_params"],
        "train_seconds": round(t_train, 2),
        "accuracy": _accuracy(run_dir, bench),
        "protocol": args.protocol,
    }
    result_file.write_text(json.dumps(res, indent=2) + "\n")
    return res


def _print_row(args: argparse.Namespace, row: Row, setup: str, cmds: dict[str, Any]) -> None:
    """``--dry-run``: the row's provenance and batch as a comment, then its train and eval command lines."""
    layout: Layout = cmds["layout"]
    bench = cmds["benchmark"][0]
    print(
        f"# {args.table} {setup} {row.id}: {provenance(args.table, setup, row)}; batch "
        f"{layout.per_device}x{layout.grad_accum}x{layout.processes} = {layout.effective}"
    )
    print(_shell("train.py", cmds["train"], layout.processes))
    print(_shell(f"eval_{bench}.py", cmds["eval"], 1))


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    """Every row of ``args.table`` in every setup: printed (``--dry-run``) or run; returns ``results.json``."""
    out = Path(args.output_dir) / args.table
    hidden = (
        PAPER_HIDDEN["13b" if args.table == "tableS7" else "7b"]
        if args.dry_run
        else _hidden_size(args.model_name_or_path)
    )
    results: dict[str, Any] = {
        "table": args.table,
        "model": args.model_name_or_path,
        "protocol": args.protocol,
        "rows": [],
    }
    for row in table_rows(args.table):
        entry: dict[str, Any] = {
            "id": row.id,
            "label": row.label,
            "released": {s: row.released.get(s) for s in args.setups},
            "extra_setups": [s for s in args.setups if row.is_extra(s)],
        }
        for setup in args.setups:
            run_dir = out / setup / row.id
            cmds = build_commands(row, setup, args, run_dir, hidden)
            if args.dry_run:
                _print_row(args, row, setup, cmds)
                continue
            res = _run_row(args, row, setup, run_dir, cmds)
            entry[setup] = res["accuracy"]
            entry["trainable_params"] = res["trainable_params"]
            entry["total_params"] = res["total_params"]
        results["rows"].append(entry)
    return results


def format_table(results: dict[str, Any], setups: list[str]) -> str:
    paper = {"table1": PAPER_TABLE1, "table2": PAPER_TABLE2}.get(results["table"], {})
    head = "| configuration | params | " + " | ".join(
        f"{'Dolly→MMLU' if s == 'mmlu' else 'Flan→BBH'} (ours / paper)" for s in setups
    )
    lines = [head + " |", "|---|---:|" + "---:|" * len(setups)]
    for r in results["rows"]:
        tp, tot = r.get("trainable_params"), r.get("total_params")
        params = f"{tp:,d} ({100 * tp / tot:.2f}%)" if tp and tot else (f"{tp:,d}" if tp else "—")
        cells = []
        for s in setups:
            ours = r.get(s)
            ref = paper.get(r["id"], (None, None))[0 if s == "mmlu" else 1]
            mark = " (extra)" if s in r.get("extra_setups", ()) else ""
            cells.append(
                f"{'—' if ours is None else f'{100 * ours:.1f}'} / {'—' if ref is None else ref}{mark}"
            )
        lines.append(f"| {r['label']} | {params} | " + " | ".join(cells) + " |")
    if any(r.get("extra_setups") for r in results["rows"]):
        lines += ["", "(extra): a run the released table scripts do not make (see results.json, `released`)."]
    return "\n".join(lines)


def _check_released_launch(args: argparse.Namespace) -> None:
    """Without --num_gpus a real run uses each row's released process count: refuse it, before any training,
    on a machine with fewer GPUs (it would fail in the middle of the table otherwise)."""
    import torch

    need = max(
        released_layout(args.table, s, r).processes for r in table_rows(args.table) for s in args.setups
    )
    have = torch.cuda.device_count()
    if need > 1 and need > have:
        raise MtLoraError(
            f"the released launch of {args.table} uses {need} processes (one per GPU) and {have} GPU(s) are "
            f"visible: pass --num_gpus {max(have, 1)} (the effective batch stays 32)"
        )


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Table aliases, the setups list and the defaults that depend on ``--smoke``; refuses what cannot run."""
    table = TABLE_ALIASES.get(args.table) or TABLE_ALIASES.get(args.table.lower())
    if table is None:
        raise MtLoraError(
            f"unknown table {args.table!r}; choose from table1, table2, table3, table4, tableS7"
        )
    args.table = table
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    bad = set(args.setups) - set(SETUPS)
    if bad:
        raise MtLoraError(f"--setups: unknown setup(s) {', '.join(sorted(bad))}; choose from bbh, mmlu")
    if args.smoke:
        args.model_name_or_path = args.model_name_or_path or "mtlora:stories260k"
        args.flan_dir = args.flan_dir or str(ASSETS / "flan_cot_sample")
        args.dolly_dir = args.dolly_dir or str(ASSETS / "dolly_sample")
        args.device = args.device or "cpu"
    else:
        args.model_name_or_path = args.model_name_or_path or (
            "./data/llama-2-13b" if table == "tableS7" else "./data/llama-2-7b"
        )
        args.flan_dir = args.flan_dir or "./data/flan_v2_subset"
        args.dolly_dir = args.dolly_dir or "./data/dolly-15k-converted"
        if not args.dry_run:
            for flag, path in (("--flan_dir", args.flan_dir), ("--dolly_dir", args.dolly_dir)):
                setup = "bbh" if flag == "--flan_dir" else "mmlu"
                if setup in args.setups and not Path(path).is_dir():
                    raise MtLoraError(
                        f"{flag} {path}: not found (convert the data with `mtlora data ...`, see README)"
                    )
    if args.num_gpus is not None and args.num_gpus < 1:
        raise MtLoraError(f"--num_gpus {args.num_gpus}: must be >= 1")
    return args


def _write_table(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """``table.md`` and ``results.json`` in ``--output_dir/<table>``; the table on stdout."""
    table_md = format_table(results, args.setups)
    out = Path(args.output_dir) / args.table
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table_md + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\n{args.table} ({'smoke, tiny model' if args.smoke else args.model_name_or_path}, protocol={args.protocol})\n"
    )
    print(table_md)


def build_parser() -> argparse.ArgumentParser:
    """``mtlora repro``'s flags (the convention of :mod:`mtlora.cli_args`)."""
    from mtlora.cli_args import HelpFormatter, Parser, add_model, add_output

    class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = Parser(prog="mtlora repro", description=__doc__, formatter_class=_Formatter)
    p.add_argument(
        "table", help="table1 | table2 | table3 | table4 | tableS7 (or the paper's tables/*.sh names)"
    )
    add_output(
        p, required=False, default="repro_out", help="where each table's runs, table.md and results.json go"
    )
    add_model(
        p, help="base model (default: ./data/llama-2-7b (13b for tableS7); mtlora:stories260k with --smoke)"
    )
    p.add_argument("--flan_dir", default=None, help="converted Flan-v2 subset (records) for the BBH setup")
    p.add_argument("--dolly_dir", default=None, help="converted Dolly-15k (records) for the MMLU setup")
    p.add_argument("--setups", default="bbh,mmlu", help="comma list of bbh, mmlu")
    p.add_argument(
        "--protocol",
        choices=("paper", "harness"),
        default="paper",
        help="evaluation protocol (paper: comparable to the published numbers)",
    )
    p.add_argument(
        "--num_gpus",
        type=int,
        default=None,
        help="processes per training run (default: each row's released launch, 2 for BBH and 1 for MMLU; "
        "--smoke: 1). Any N keeps the effective batch 32 (per-device batch kept where it fits, gradient "
        "accumulation for the rest)",
    )
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if available)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads of every training and evaluation process (OMP_NUM_THREADS; default: torch's "
        "choice)",
    )
    p.add_argument("--dry_run", dest="dry_run", action="store_true", help="print every command, run nothing")
    p.add_argument(
        "--smoke", action="store_true", help="each configuration for a few steps on the tiny model (CPU)"
    )
    p.add_argument("--smoke_steps", type=int, default=2, help="--smoke: optimizer steps per configuration")
    p.add_argument(
        "--paper_faithful", action="store_true", help="the released code's behaviour where it differs"
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:  # child processes (training, evaluation) inherit OMP_NUM_THREADS
        from mtlora.cli_args import apply_runtime

        apply_runtime(args)
    args = _resolve_args(args)
    if not args.dry_run and not args.smoke and args.num_gpus is None:
        _check_released_launch(args)
    results = run_table(args)
    if not args.dry_run:
        _write_table(args, results)
    return 0
