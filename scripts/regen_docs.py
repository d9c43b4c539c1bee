#!/usr/bin/env python
"""Regenerate every number that README.md and docs/*.md quote from a command of this project.

    python scripts/regen_docs.py                  # run every producer, write docs/results/*.json, rewrite docs
    python scripts/regen_docs.py --only params    # run some producers (comma list), then rewrite docs
    python scripts/regen_docs.py --render         # rewrite the docs from the committed docs/results/*.json only
    python scripts/regen_docs.py --check          # list every marked region that differs (exit 1); run by tests

(``make docs`` runs the first form.) Why: numbers copied into prose by hand drift from the code (docs/demo.md
once quoted 39.2% where the code gave 39.7%). Here every such number sits in a marked region

    <!-- regen:NAME -->...<!-- /regen:NAME -->

whose content is *rendered* (``RENDERERS[NAME]``) from a result file that the producing command wrote, and every
rendered block names that command and the date it ran. ``tests/test_docs_numbers.py`` checks that the docs say
exactly what the result files say, and that each result file's configuration is what the current code would
run (so a change of defaults shows up as a failing test until the producer is re-run).

Producers (``PRODUCERS``), run in this order; time on the 2-core development machine under other jobs' load:

* ``params``: ``mtlora params`` for the LLaMA-2 configurations of the paper's tables (meta device, seconds);
* ``demo``: ``mtlora demo`` (its default run: about 5-10 min);
* ``demo_ablation``: five ``mtlora demo --methods mtlora --train_args ...`` variants sharing the demo's
  cached base (about 2 min each);
* ``demo_raw_lora``: ``mtlora demo --methods lora --pretrain_steps 0`` (LoRA on the raw tiny base, ~2-3 min);
* ``demo_quick``: ``mtlora demo --quick`` (the test configuration, under a minute).

All of them: about 20-30 minutes. Benchmarks are not re-run here (their scripts take long and write
``benchmarks/results/*.json`` themselves); ``--render`` copies their headline numbers into README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
BENCH = REPO / "benchmarks" / "results"
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REGION = re.compile(r"<!-- regen:(?P<name>[\w.-]+) -->(?P<body>.*?)<!-- /regen:(?P=name) -->", re.S)

# ------------------------------------------------------------------------------------------------ producers
#: ``mtlora params`` configurations: (key, label, argv after ``mtlora params``).
PARAMS_7B = ["--model_name_or_path", "tests/fixtures/llama-2-7b"]
PARAMS_13B = ["--model_name_or_path", "tests/fixtures/llama-2-13b"]
BLOCK_FFN = ["--method", "mtlora", "--enable_block_adapter", "--block_adapter_type", "ffn"]
PARAMS_CONFIGS: list[tuple[str, str, list[str]]] = [
    ("hydralora_7b", "HydraLoRA q,v (7B)", [*PARAMS_7B, "--method", "hydralora"]),
    ("block_ffn_7b", "block FFN (7B)", [*PARAMS_7B, *BLOCK_FFN]),
    (
        "block_ffn_fgr_7b",
        "block FFN + FGR gs=2048 (7B)",
        [*PARAMS_7B, *BLOCK_FFN, "--enable_fine_grained_routing", "--routing_group_size", "2048"],
    ),
    (
        "block_ffn_fgr_13b",
        "block FFN + FGR gs=2560 (13B)",
        [*PARAMS_13B, *BLOCK_FFN, "--enable_fine_grained_routing", "--routing_group_size", "2560"],
    ),
]

#: The demo ablation: variants of the demo's mtlora (``--methods mtlora --train_args ...``).
ABLATION_VARIANTS: list[tuple[str, str, str]] = [
    ("block_ffn", "block FFN", "--enable_spectral_reg False --enable_fine_grained_routing False"),
    ("block_ffn_fgr", "block FFN + fine-grained routing", "--enable_spectral_reg False"),
    ("block_ffn_spectral", "block FFN + spectral reg.", "--enable_fine_grained_routing False"),
    ("block_both", "block attention + FFN (`--block_adapter_type both`)", "--block_adapter_type both"),
    ("component_spectral_fgr", "component q,v + spectral + FGR", "--enable_block_adapter False"),
]
DEMO_ARGV: dict[str, list[str]] = {
    "demo": [],
    "demo_raw_lora": ["--methods", "lora", "--pretrain_steps", "0"],
    "demo_quick": ["--quick"],
}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _stamp(command: str, t0: float, load0: tuple[float, ...]) -> dict[str, Any]:
    """How a result file was made: the command, when, on which commit, how long, under which load."""
    return {
        "command": command,
        "date": _dt.date.today().isoformat(),
        "git_commit": _git_commit(),
        "wall_seconds": round(time.time() - t0, 1),
        "load_average_1min": [round(load0[0], 1), round(os.getloadavg()[0], 1)],
        "cpu_count": os.cpu_count(),
    }


def _write(name: str, payload: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {RESULTS / f'{name}.json'}", flush=True)


def count_params(argv: list[str]) -> dict[str, Any]:
    """Run ``mtlora params ARGV`` in process (cwd = the repository) and parse the line it prints."""
    from mtlora.cli import main as cli_main

    buf = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(buf):
            rc = cli_main(["params", *argv])
    finally:
        os.chdir(cwd)
    line = buf.getvalue().strip().splitlines()[-1]
    m = re.fullmatch(r"trainable_params=(\d+) total_params=(\d+) percent=([\d.]+)", line)
    if rc != 0 or not m:
        raise SystemExit(f"mtlora params {shlex.join(argv)} failed: {buf.getvalue()}")
    return {"trainable": int(m.group(1)), "total": int(m.group(2)), "percent": float(m.group(3))}


def produce_params() -> None:
    t0, load0 = time.time(), os.getloadavg()
    configs = {}
    for key, label, argv in PARAMS_CONFIGS:
        configs[key] = {"label": label, "command": "mtlora params " + shlex.join(argv), **count_params(argv)}
    _write("params", {"generated": _stamp("mtlora params ... (one per configuration)", t0, load0), **configs})


def _mtlora(argv: list[str]) -> None:
    cmd = [sys.executable, "-m", "mtlora.cli", *argv]
    print("+ mtlora " + shlex.join(argv), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def _demo_payload(out: Path, argv: list[str], t0: float, load0: tuple[float, ...]) -> dict[str, Any]:
    """The demo's results.json without machine-local paths, stamped with how it was made.

    ``argv`` is the command line without ``--output_dir`` / ``--cache_dir`` (where files went, not what ran).
    """
    res = json.loads((out / "results.json").read_text())
    for m in res["methods"].values():
        m.pop("adapter_dir", None)
    command = "mtlora demo " + shlex.join([*argv, "--output_dir", "D"])
    return {"generated": _stamp(command, t0, load0), "argv": argv, **res}


def produce_demo(name: str, work: Path) -> None:
    t0, load0 = time.time(), os.getloadavg()
    out = work / name
    _mtlora(["demo", *DEMO_ARGV[name], "--output_dir", str(out)])
    _write(name, _demo_payload(out, DEMO_ARGV[name], t0, load0))


def produce_demo_ablation(work: Path) -> None:
    """Each variant is ``mtlora demo --methods mtlora --train_args ...``; all share the pre-trained base
    cached by the ``demo`` producer when it ran first in the same work folder (else they pre-train it)."""
    t0, load0 = time.time(), os.getloadavg()
    variants = {}
    for key, label, extra in ABLATION_VARIANTS:
        v0, vload = time.time(), os.getloadavg()
        out = work / f"ablation_{key}"
        argv = ["--methods", "mtlora", "--train_args", extra]
        _mtlora(["demo", *argv, "--output_dir", str(out), "--cache_dir", str(work / "demo" / "cache")])
        variants[key] = {"label": label, "train_args": extra, **_demo_payload(out, argv, v0, vload)}
    _write("demo_ablation", {"generated": _stamp("mtlora demo --methods mtlora --train_args ...", t0, load0),
                             "variants": variants})  # fmt: skip


PRODUCERS: dict[str, Callable[[Path], None]] = {
    "params": lambda work: produce_params(),
    "demo": lambda work: produce_demo("demo", work),
    "demo_ablation": produce_demo_ablation,
    "demo_raw_lora": lambda work: produce_demo("demo_raw_lora", work),
    "demo_quick": lambda work: produce_demo("demo_quick", work),
}


# ------------------------------------------------------------------------------------------------ renderers
def load(name: str, root: Path = RESULTS) -> dict[str, Any]:
    path = root / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.relative_to(REPO)} is missing: run scripts/regen_docs.py --only {name}"
        )
    return json.loads(path.read_text())


def _source(name: str, res: dict[str, Any]) -> str:
    g = res["generated"]
    return (
        f"_Generated {g['date']} by `scripts/regen_docs.py` (`make docs`) from `{g['command']}` "
        f"(`docs/results/{name}.json`, commit {g['git_commit']}, {g['cpu_count']} CPUs, "
        f"load average {g['load_average_1min'][0]}-{g['load_average_1min'][1]})._"
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def render_params_table() -> str:
    p = load("params")
    lines = ["| configuration | trainable | % | command |", "|---|---:|---:|---|"]
    for key, _, _ in PARAMS_CONFIGS:
        c = p[key]
        lines.append(f"| {c['label']} | {c['trainable']:,d} | {c['percent']:.3f} | `{c['command']}` |")
    return "\n" + "\n".join(lines) + "\n\n" + _source("params", p) + "\n"


def render_params_expected() -> str:
    """README's expected-results table: paper numbers (constants of mtlora.repro) + our parameter counts."""
    from mtlora.repro import PAPER_TABLE1, PAPER_TABLE2

    p = load("params")

    def par(key: str) -> str:
        return f"{_millions(p[key]['trainable'])} ({p[key]['percent']:.2f}%)"

    rows = [
        ("HydraLoRA", "hydralora_7b", "hydralora"),
        ("+ block FFN", "block_ffn_7b", "block_ffn"),
        ("+ block + spectral", "block_ffn_7b", "block_ffn_spectral"),
        ("+ block + FGR", "block_ffn_fgr_7b", "block_ffn_fgr"),
        ("mtLoRA (all three)", "block_ffn_fgr_7b", "mtlora_full"),
    ]
    lines = [
        "| configuration | params (`mtlora params`) | Dolly-15k → MMLU (paper / yours) | Flan-v2 → BBH (paper / yours) |",
        "|---|---|---|---|",
    ]
    for label, pkey, row in rows:
        mmlu, bbh = PAPER_TABLE2[row]
        if row == "hydralora":
            t1 = PAPER_TABLE1["hydralora"]
            cells = [
                f"{t1[0]} (Table 1) / {mmlu} (Table 2) / ____",
                f"{t1[1]} (Table 1) / {bbh} (Table 2) / ____",
            ]
        else:
            cells = [f"{mmlu} / ____", f"{bbh} / ____"]
        lines.append(f"| {label} | {par(pkey)} | " + " | ".join(cells) + " |")
    return "\n" + "\n".join(lines) + "\n"


def render_params_list() -> str:
    p = load("params")
    return " / ".join(f"{p[k]['trainable']:,d}" for k, _, _ in PARAMS_CONFIGS)


def render_analyze_memory() -> str:
    """Task gradients kept on the CPU: T x trainable x 4 bytes, for the 7B component model and 27 BBH tasks."""
    n = load("params")["hydralora_7b"]["trainable"]
    return f"a 7B component model ({_millions(n)} parameters) with 27 BBH tasks needs about {27 * n * 4 / 1e9:.1f} GB"


def render_demo_timing() -> str:
    d = load("demo")
    m = {k: v for k, v in d["methods"].items() if v.get("seconds") is not None}
    pre = d.get("base_pretraining") or {}
    evals = [v["eval_seconds"] for v in d["methods"].values()]
    wall = d["generated"]["wall_seconds"]
    trains = " / ".join(f"{k} {v['seconds']:.0f} s" for k, v in m.items())
    return (
        f"\n**{int(wall // 60)} min {int(wall % 60)} s wall** ({d['total_seconds']:.0f} s in the demo, the rest "
        f"start-up). Stage times: base pre-training {pre.get('seconds', 0):.0f} s"
        f"{' (cached)' if pre.get('cached') else ' (0 s when cached)'}, training {trains}, evaluation "
        f"{min(evals):.0f}-{max(evals):.0f} s per method.\n\n{_source('demo', d)}\n"
    )


def render_demo_family() -> str:
    d = load("demo")
    rows = d["methods"]
    cols = list(rows)
    fams = list(dict.fromkeys(t["family"] for t in d["suite"]["tasks"]))
    lines = ["| family | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(_pct(rows[c]["per_family"][f]) for c in cols) + " |")
    n = len(d["suite"]["tasks"])
    lines.append(
        f"| **average ({n} tasks)** | " + " | ".join(f"**{_pct(rows[c]['average'])}**" for c in cols) + " |"
    )

    def cell(c: str, key: str, fmt: str) -> str:
        v = rows[c].get(key)
        return "-" if v is None else format(v, fmt)

    lines.append("| trainable params | " + " | ".join(cell(c, "trainable_params", ",d") for c in cols) + " |")
    lines.append("| train seconds | " + " | ".join(cell(c, "seconds", ".0f") for c in cols) + " |")
    return "\n" + "\n".join(lines) + "\n"


def render_demo_base_average() -> str:
    from mtlora.demo import BASE_ROW

    return f"{_pct(load('demo')['methods'][BASE_ROW]['average'])}%"


def render_demo_comparison() -> str:
    """The mtlora-vs-hydralora sentence: averages, the tasks mtlora wins, the four largest losses."""
    d = load("demo")
    mt, hy, lo = (d["methods"][k] for k in ("mtlora", "hydralora", "lora"))
    diffs = {t: mt["per_task"][t] - hy["per_task"][t] for t in mt["per_task"]}
    wins = [t for t, x in diffs.items() if x > 0]
    worst = sorted(diffs, key=lambda t: diffs[t])[:4]

    def beats(a: dict[str, Any], b: dict[str, Any]) -> str:
        return "beats" if a["average"] > b["average"] else "does not beat"

    lose = ", ".join(f"`{t}` {_pct(mt['per_task'][t])}% vs {_pct(hy['per_task'][t])}%" for t in worst)
    return (
        f"**mtlora {beats(mt, hy)} hydralora here** ({_pct(mt['average'])}% vs {_pct(hy['average'])}%); it "
        f"{beats(mt, lo)} plain LoRA ({_pct(lo['average'])}%), and hydralora {beats(hy, lo)} plain LoRA. mtlora wins "
        f"over hydralora on {len(wins)} tasks"
        + (f" ({', '.join(f'`{t}`' for t in wins)})" if wins else "")
        + f" and loses most on {lose}."
    )


def render_demo_headroom() -> str:
    """The tasks no method learns (every trained method at most 5%): the suite's headroom at this budget."""
    from mtlora.demo import BASE_ROW

    d = load("demo")
    trained = [v for k, v in d["methods"].items() if k != BASE_ROW]
    low = [t["name"] for t in d["suite"]["tasks"] if all(m["per_task"][t["name"]] <= 0.05 for m in trained)]
    names = ", ".join(f"`{t}`" for t in low) if low else "none"
    return (
        f"Tasks at or below 5% for every trained method at this budget ({len(low)}): {names}. They are the "
        "suite's headroom, not a bug."
    )


def render_demo_raw_lora() -> str:
    d = load("demo_raw_lora")
    lo = d["methods"]["lora"]
    zero = sum(1 for v in lo["per_task"].values() if v == 0)
    return (
        f"LoRA r=8 on the raw model for {d['config']['max_steps']} steps ends at an average training loss of "
        f"{lo['train_loss']:.2f} nats per answer token (uniform over 20 letters would be 3.0) and "
        f"**{_pct(lo['average'])}% exact match** ({zero} of {len(lo['per_task'])} tasks at 0%; "
        f"`{d['generated']['command']}`, {d['generated']['date']})"
    )


def render_demo_quick() -> str:
    d = load("demo_quick")
    return f"{d['generated']['wall_seconds']:.0f} s ({d['generated']['date']}, load average {d['generated']['load_average_1min'][0]})"


def render_demo_ablation() -> str:
    d, a = load("demo"), load("demo_ablation")
    rows = [("hydralora (component q,v)", d["methods"]["hydralora"])]
    for key, label, _ in ABLATION_VARIANTS[:3]:
        rows.append((label, a["variants"][key]["methods"]["mtlora"]))
    rows.append(("block FFN + spectral + FGR (= demo's mtlora)", d["methods"]["mtlora"]))
    for key, label, _ in ABLATION_VARIANTS[3:]:
        rows.append((label, a["variants"][key]["methods"]["mtlora"]))
    lines = [
        "| variant | avg % | params | `--train_args` of `mtlora demo --methods mtlora` |",
        "|---|---:|---:|---|",
    ]
    extra = {label: f"`{tr}`" for _, label, tr in ABLATION_VARIANTS}
    for label, m in rows:
        how = extra.get(label, "(the demo itself)")
        lines.append(f"| {label} | {_pct(m['average'])} | {m['trainable_params']:,d} | {how} |")
    ffn = a["variants"]["block_ffn"]["methods"]["mtlora"]["average"]
    fgr = a["variants"]["block_ffn_fgr"]["methods"]["mtlora"]["average"]
    spec = a["variants"]["block_ffn_spectral"]["methods"]["mtlora"]["average"]
    both = a["variants"]["block_both"]["methods"]["mtlora"]["average"]
    hy = d["methods"]["hydralora"]["average"]
    text = (
        f"\n\nOn top of the FFN block, fine-grained routing changes the average by {100 * (fgr - ffn):+.1f} points "
        f"and spectral regularization by {100 * (spec - ffn):+.1f}; moving the block to attention + FFN changes "
        f"it by {100 * (both - ffn):+.1f} (block `both`: {_pct(both)}% vs HydraLoRA {_pct(hy)}%)."
    )
    return "\n" + "\n".join(lines) + text + "\n\n" + _source("demo_ablation", a) + "\n"


def _bench(name: str) -> dict[str, Any]:
    return load(name, BENCH)


def render_readme_benchmarks() -> str:
    ls = _bench("layer_speed")["summary"]
    ts = _bench("train_step")
    full = ts["results"]["mtlora_full"]
    cfg = ts["config"]
    sc = _bench("scaling")
    ns = sc["config"]["ns"]
    last = str(ns[-1])
    at = {m: sc["summary"][m][last] for m in sc["summary"]}
    seeds = len(sc["config"]["seeds"])
    order = (
        ", ".join(
            f"{m} {_pct(v['mean'])} ± {_pct(v['std'])}%"
            for m, v in sorted(at.items(), key=lambda kv: -kv[1]["mean"])
        )
        + f" (mean ± std over {seeds} seeds; differences under ~3 points are noise)"
    )
    lines = [
        "| benchmark (`benchmarks/results/*.json`) | result |",
        "|---|---|",
        f"| `layer_speed.py` ({ls['config'].replace('_', ', ')}) | fused layer **{ls['fused_vs_naive_speedup']:.1f}×** "
        f"faster than the released per-expert loop, **{ls['memory_ratio']:.2f}×** its extra peak memory, "
        f"**{ls['fused_vs_flop_bound']:.2f}×** its FLOP-bound time |",
        f"| `train_step.py` (one LLaMA-7B-shaped layer, {cfg['tokens']} tokens) | full mtLoRA step "
        f"**{full['time_vs_hydralora']:.2f}×** HydraLoRA's time, {full['memory_vs_hydralora']:.2f}× its extra memory |",
        f"| `scaling.py` ({ns[0]}–{ns[-1]} synthetic tasks, tiny model) | at {last} tasks: {order} |",
    ]
    bs = _bench("bundle_speed")
    st = bs["settings"]
    lines.append(
        f"| `bundle_speed.py` (block-FFN+FGR bundle, d{st['hidden']}, {st['layers']} layers, batch {st['batch']} × "
        f"{st['new_tokens']} new tokens) | greedy `generate` at **{bs['bundle_vs_base']:.2f}×** the unadapted base's "
        f"tokens/s (mtlora's routed model: {bs['routed_vs_base']:.2f}×) |"
    )
    return "\n" + "\n".join(lines) + "\n"


def render_bundle_speed() -> str:
    bs = _bench("bundle_speed")
    st, res, m = bs["settings"], bs["results"], bs["machine"]
    return (
        f"\nSpeed (`python benchmarks/bundle_speed.py`, `benchmarks/results/bundle_speed.json`): greedy `generate` "
        f"(batch {st['batch']}, {st['prompt_tokens']}-token prompts, {st['new_tokens']} new tokens, KV cache) with a "
        f"block-FFN+FGR bundle (rank {st['rank']}) runs at **{bs['bundle_vs_base']:.2f}×** the unadapted base's "
        f"tokens/s ({res['bundle']['tokens_per_s']:.1f} vs {res['base']['tokens_per_s']:.1f}); mtlora's routed model "
        f"({st['experts']} experts) at {bs['routed_vs_base']:.2f}×. Random-initialised LLaMA-shaped model, "
        f"d={st['hidden']}, {st['layers']} layers, {st['dtype']} on {m['device']} ({m['cpu_count']} shared cores, "
        f"load average {m['load_average_1_5_15min'][0]}); on a GPU: `--device cuda --dtype bfloat16` and LLaMA-7B "
        "shapes (`--hidden 4096 --inter 11008 --heads 32 --layers 32`).\n"
    )


RENDERERS: dict[str, Callable[[], str]] = {
    "bundle_speed": render_bundle_speed,
    "params_table": render_params_table,
    "params_expected": render_params_expected,
    "params_list": render_params_list,
    "analyze_memory": render_analyze_memory,
    "demo_timing": render_demo_timing,
    "demo_family": render_demo_family,
    "demo_base_average": render_demo_base_average,
    "demo_comparison": render_demo_comparison,
    "demo_headroom": render_demo_headroom,
    "demo_raw_lora": render_demo_raw_lora,
    "demo_quick": render_demo_quick,
    "demo_ablation": render_demo_ablation,
    "readme_benchmarks": render_readme_benchmarks,
}


# ------------------------------------------------------------------------------------------------ render/check
def regions(text: str) -> list[re.Match[str]]:
    return list(REGION.finditer(text))


def render_text(text: str, path: Path, missing: list[str] | None = None) -> str:
    """``text`` with every region re-rendered; a region whose result file is missing is left as it is and
    named in ``missing`` (if given; else the error propagates)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise SystemExit(
                f"{path.relative_to(REPO)}: unknown region {name!r} (known: {', '.join(RENDERERS)})"
            )
        try:
            body = RENDERERS[name]()
        except FileNotFoundError as exc:
            if missing is None:
                raise
            missing.append(f"{path.relative_to(REPO)}: {name}: {exc}")
            return m.group(0)
        return f"<!-- regen:{name} -->{body}<!-- /regen:{name} -->"

    return REGION.sub(sub, text)


def check() -> list[str]:
    """Every marked region that differs from its rendering (``file: region``); an empty list means all agree."""
    problems = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for m in regions(text):
            name = m.group("name")
            if name not in RENDERERS:
                problems.append(f"{path.relative_to(REPO)}: unknown region {name!r}")
                continue
            try:
                want = RENDERERS[name]()
            except FileNotFoundError as exc:
                problems.append(f"{path.relative_to(REPO)}: {name}: {exc}")
                continue
            if m.group("body") != want:
                problems.append(
                    f"{path.relative_to(REPO)}: region {name} differs from docs/results (run --render)"
                )
    return problems


def render_all() -> int:
    """Rewrite every region that has its result file; returns 1 (and says which) if some had none."""
    missing: list[str] = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        new = render_text(text, path, missing)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(REPO)}")
    for x in missing:
        print(f"not rendered: {x}")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--render", action="store_true", help="only rewrite the docs from docs/results")
    mode.add_argument("--check", action="store_true", help="exit 1 if a region differs from docs/results")
    p.add_argument("--only", default=None, help=f"comma list of producers: {', '.join(PRODUCERS)}")
    p.add_argument("--work_dir", default=None, help="where the runs write (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.check:
        problems = check()
        for x in problems:
            print(x)
        return 1 if problems else 0
    if not args.render:
        names = [x.strip() for x in (args.only or ",".join(PRODUCERS)).split(",") if x.strip()]
        unknown = [x for x in names if x not in PRODUCERS]
        if unknown:
            p.error(f"--only: unknown producer(s) {unknown}; choose from {', '.join(PRODUCERS)}")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with tempfile.TemporaryDirectory(prefix="regen_docs_") as tmp:
            work = Path(args.work_dir) if args.work_dir else Path(tmp)
            for name in names:
                t0 = time.time()
                PRODUCERS[name](work)
                print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
    return render_all()


if __name__ == "__main__":
    sys.exit(main())
