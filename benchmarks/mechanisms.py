r"""The paper's three measured mechanisms (Figure 1 A, B, C), measured on one base and one task suite.

Everything is trained on the first ``--num_tasks`` tasks of the many-task letter suite
(:mod:`mtlora.data.manytask`: tasks that share their inputs, so one set of adapter weights must compromise)
with the bundled tiny base (or ``--model_name_or_path``), pre-trained once on 18 non-evaluated tasks (:func:`mtlora.demo.pretrain_base`,
cached), through ``mtlora train``'s own code path (:func:`mtlora.demo.train_method`). Accuracy is exact match
of greedy answers on unseen test inputs (:func:`mtlora.demo.evaluate_model`). The analyses reuse
:mod:`mtlora.analysis` (task gradients, SV bands, routing hooks); nothing here re-implements them.

Models (the paper's setting, E = 16 experts of rank r = 16 unless flags say otherwise):

* **component** = HydraLoRA: q_proj and v_proj adapters, one shared A, E up-projections B_e, a token-level
  scalar softmax router and the balance loss (``--method hydralora --enable_blc``);
* **block** = mtLoRA's block-level FFN adapter with the same E and router (``--method mtlora
  --enable_block_adapter --block_adapter_type ffn``), its rank chosen so that its trainable parameters are
  closest to half the component model's: the paper's "50% parameters";
* **component + regularizer**: HydraLoRA with the spectral regularizer of
  ``MtLoraConfig(enable_spectral_reg=True, spectral_reg_mode=M, spectral_reg_lambda=λ)``, M = ``uniform``
  (w ≡ 1, the orthogonality term the paper argues against) or ``spectral`` (the spectral-aware term);
  ``--method mtlora`` with no other design switched on is HydraLoRA.

Panels (see benchmarks/README.md "mechanisms" for the reading against the paper):

* **1C, gradient conflict, component vs block.** For each task t the gradient g_t of its mean loss over
  ``--grad_batches`` training batches with respect to *every adapter parameter* (A, all B_e and the router)
  of a decoder layer (q and v adapters of a layer concatenated), :func:`mtlora.analysis.gradients.task_gradients`.
  Per layer the T×T cosine matrix; the released figure's JSON keeps its mean over layers, whose off-diagonal
  entries are the distribution shown. Both readings the figure allows: the share of negative pairs ("Conflict
  60.6% -> 53.6%") and the relative shrinkage of the mean cosine ``(mean_comp - mean_block) / mean_comp``
  ("-76%"), at initialisation (B = 0: only the B's get gradient) and after training, over seeds.
* **1B, spectral alignment.** On the trained component model's B_e (SVD per expert), per SV band: the
  σ·σ-weighted cross-expert alignment share and the SV importance, exactly as the released notebook
  (:func:`mtlora.analysis.spectral.band_conflict` / ``band_importance``), for the figure's "top 10%" bands and
  the notebook's "top 20%" bands. Two diagnostics separate what the weighting does: the same share with
  every |cos| set to 1 (magnitude only) and with every σ set to 1 (direction only). The task-level variant
  uses no experts: per task t the routed up-projection :math:`B_t = \sum_e \bar π_{t,e} B_e` (π̄ = the task's
  mean routing weights, which is exact for the task's expected update because the layer is linear in π)
  and the same formula across tasks instead of experts.
* **1A, regularization-routing trade-off.** A λ sweep of both terms on HydraLoRA: accuracy and the mean
  routing entropy (:mod:`mtlora.analysis.routing`; the released notebook's formula on prompt tokens of
  ``--entropy_examples`` training examples), plus what the term did to B: the top-band SV importance and the
  orthogonality gap ``mean_e ‖B_eᵀB_e / s_e² - I‖_F / √r`` (0 = orthogonal columns of equal norm).

Other bases: ``--model_name_or_path`` (a wider llama2.c-style base or a GGUF-converted LLM from
``scripts/make_base.py``; ``--pretrain_steps 0`` uses one as it is), ``--init_only`` (panel 1C on freshly
initialised adapters, no training: a 135M model fits a CPU budget) and ``--device cuda``.

Seeds: the suite, the test inputs and the pre-trained base are fixed (``--data_seed``); ``--seeds`` change
adapter initialisation and data order. Numbers are mean ± sample std over seeds. Nothing is tuned on the
test split (no λ, step count or rank was chosen by test accuracy).

Writes ``benchmarks/results/mechanisms.json`` (``--quick``: ``mechanisms_quick.json``) and one PNG per panel
next to it (``<stem>_1A.png`` ...). The output ends with one line per panel,
``panel=<1A|1B|1C> <name>=<value> ...``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PANELS = ("1A", "1B", "1C")
MODES = ("uniform", "spectral")
#: SV band splits: the published Fig. 1B is labelled "Top-10%", the released notebook bins at 20%.
BAND_SPLITS: dict[str, tuple[float, float, float, float]] = {
    "top10": (0.0, 0.1, 0.5, 1.0),
    "top20": (0.0, 0.2, 0.5, 1.0),
}
#: The paper's numbers (shared/docs/paper_analyses.md §3; read from the published Figure 1).
PAPER: dict[str, Any] = {
    "1A": {
        "lambdas": [0.0, 0.1, 0.25, 0.5, 1.0],
        "bbh_accuracy": [36.26, 37.45, 37.97, 36.59, 36.20],
        "routing_entropy": [2.623, 2.656, 2.661, 2.669, 2.672],
        "max_entropy": math.log(16),
        "setting": "LLaMA-2-7B, component HydraLoRA E=16 r=16, uniform orthogonality term, Flan-v2 -> BBH",
    },
    "1B": {
        "band_labels": ["top 10% (figure label; notebook bins at 20%)", "10-50%", "50-100%"],
        "alignment_percent": [89.4, 7.6, 3.0],
        "importance_percent": [54.0, 24.0, 22.1],
    },
    "1C": {
        "negative_share": {"component": 0.606, "block": 0.536},
        "mean_cos": {"component": -0.055, "block": -0.015},
        "claimed_reduction": 0.76,
    },
}


# ----------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Figure 1 A/B/C of the paper measured (default: the bundled tiny base on CPU): gradient "
        "conflict component vs block, SV-band alignment, the regularization-routing trade-off.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="Smoke run (< 3 min): 6 tasks, 1 seed, λ in {0, 1}.")
    p.add_argument("--panels", default=",".join(PANELS), help="Comma list of 1A, 1B, 1C.")
    p.add_argument("--seeds", default=None, help="Training seeds (default 1,2,3; quick 1).")
    p.add_argument("--data_seed", type=int, default=42, help="Seed of the suite and the base pre-training.")
    p.add_argument("--num_tasks", type=int, default=None, help="Tasks of the letter suite (15; quick 6).")
    p.add_argument(
        "--train_per_task", type=int, default=None, help="Training examples per task (100; quick 40)."
    )
    p.add_argument("--test_per_task", type=int, default=None, help="Test inputs per task (40; quick 10).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps of every run (480; quick 60).")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--lora_rank", type=int, default=16, help="Rank r of every adapter (the paper's 16).")
    p.add_argument("--experts", type=int, default=16, help="Experts E (the paper's 16).")
    p.add_argument(
        "--block_rank",
        type=int,
        default=None,
        help="Rank of the block FFN adapter; default: the rank whose parameter count is closest to half the "
        "component model's (the paper's ratio).",
    )
    p.add_argument("--lambdas", default=None, help="λ sweep of 1A (default 0,0.1,0.25,0.5,1.0; quick 0,1.0).")
    p.add_argument("--modes", default=",".join(MODES), help="Regularizer modes of 1A: uniform, spectral.")
    p.add_argument(
        "--init_only",
        action="store_true",
        help="1C at initialisation only: no training, so any base fits a CPU budget (a real LLM with "
        "--pretrain_steps 0); implies --panels 1C.",
    )
    p.add_argument("--grad_batches", type=int, default=4, help="1C: batches per task for its gradient.")
    p.add_argument("--grad_batch_size", type=int, default=8, help="1C: examples per gradient batch.")
    p.add_argument(
        "--entropy_examples",
        type=int,
        default=None,
        help="1A/1B: training examples for routing statistics (500 as the released notebook; quick 60).",
    )
    p.add_argument(
        "--model_name_or_path",
        default=None,
        help="Base model (default: the bundled stories260k). A larger llama2.c-style base for the panels the "
        "tiny one cannot show: scripts/make_base.py.",
    )
    p.add_argument(
        "--pretrain_steps",
        type=int,
        default=None,
        help="Base pre-training steps on the non-evaluated tasks (1500; quick 300). 0 uses a non-bundled base "
        "as it is (a real LLM that already follows instructions).",
    )
    p.add_argument("--eval_batch_size", type=int, default=128)
    p.add_argument(
        "--device",
        default="cpu",
        help="Where runs train and measure (cuda for a real LLM with training, e.g. panel 1A on SmolLM2).",
    )
    p.add_argument("--num_threads", type=int, default=1, help="torch threads (1 is fastest here, see demo).")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="Runs trained side by side, one process each (default: the CPU count, at most 4; quick 1). The "
        "JSON does not depend on it; the full mode needs 2 to stay under 30 minutes on 2 cores.",
    )
    p.add_argument(
        "--cache_dir", default=None, help="Pre-trained base + work folder (default results/cache)."
    )
    p.add_argument("--out", default=None, help="JSON path (default results/mechanisms[_quick].json).")
    p.add_argument("--keep_runs", action="store_true", help="Keep the trained adapters under cache_dir/work.")
    p.add_argument(
        "--resume",
        action="store_true",
        help="Reuse the finished runs of an interrupted invocation with the same settings (each run is "
        "appended to cache_dir/<out stem>.runs.jsonl as it finishes).",
    )
    return p


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def resolve(ns: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on ``--quick`` and validate (one ``SystemExit`` line per bad flag)."""
    from mtlora.data.manytask import TASKS

    q = ns.quick
    defaults = {
        "num_tasks": 6 if q else 15,
        "train_per_task": 40 if q else 100,
        "test_per_task": 10 if q else 40,
        "steps": 60 if q else 480,
        "entropy_examples": 60 if q else 500,
        "pretrain_steps": 300 if q else 1500,
    }
    for key, value in defaults.items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    ns.panels = [x.strip().upper() for x in ns.panels.split(",") if x.strip()]
    bad = [x for x in ns.panels if x not in PANELS]
    if bad or not ns.panels:
        raise SystemExit(f"--panels {bad or ns.panels}: choose from {', '.join(PANELS)}")
    ns.panels = [x for x in PANELS if x in ns.panels]
    if ns.init_only:
        if ns.panels not in (list(PANELS), ["1C"]):
            raise SystemExit(f"--init_only measures panel 1C only (got --panels {','.join(ns.panels)})")
        ns.panels = ["1C"]
    ns.seeds = _ints(ns.seeds) if ns.seeds else ([1] if q else [1, 2, 3])
    ns.lambdas = sorted(
        set(_floats(ns.lambdas) if ns.lambdas else ([0.0, 1.0] if q else PAPER["1A"]["lambdas"]))
    )
    ns.modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    if not ns.seeds:
        raise SystemExit("--seeds: need at least one seed")
    if any(lam < 0 for lam in ns.lambdas) or not ns.lambdas:
        raise SystemExit("--lambdas: need values >= 0")
    if [m for m in ns.modes if m not in MODES] or not ns.modes:
        raise SystemExit(f"--modes {ns.modes}: choose from {', '.join(MODES)}")
    if not 2 <= ns.num_tasks <= len(TASKS):
        raise SystemExit(f"--num_tasks must be in 2..{len(TASKS)} (gradient conflict needs task pairs)")
    if ns.lora_rank < 3:
        raise SystemExit("--lora_rank must be >= 3 (three singular-value bands)")
    if ns.experts < 2:
        raise SystemExit("--experts must be >= 2 (routing and cross-expert alignment)")
    if ns.block_rank is not None and ns.block_rank < 1:
        raise SystemExit("--block_rank must be >= 1")
    for key in ("train_per_task", "test_per_task", "steps", "batch_size", "grad_batches", "grad_batch_size",
                "entropy_examples", "eval_batch_size"):  # fmt: skip
        if getattr(ns, key) < 1:
            raise SystemExit(f"--{key} must be >= 1")
    if ns.jobs is None:
        ns.jobs = 1 if q else max(1, min(4, os.cpu_count() or 1))
    if ns.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    from mtlora.demo import BUNDLED_MODEL

    ns.model_name_or_path = ns.model_name_or_path or BUNDLED_MODEL
    if ns.pretrain_steps < 0 or (ns.pretrain_steps == 0 and ns.model_name_or_path == BUNDLED_MODEL):
        raise SystemExit("--pretrain_steps must be >= 1 for the bundled base (the raw tiny base cannot learn "
                         "the tasks); 0 is for a base that already follows instructions")  # fmt: skip
    _common.resolve_device(ns.device)  # one clear line when CUDA is asked for but absent
    ns.out = Path(ns.out) if ns.out else RESULTS / ("mechanisms_quick.json" if q else "mechanisms.json")
    ns.cache_dir = Path(ns.cache_dir) if ns.cache_dir else ns.out.resolve().parent / "cache"
    return ns


# ----------------------------------------------------------------------------------------------- models
def component_flags(ns: argparse.Namespace, mode: str | None = None, lam: float = 0.0) -> list[str]:
    """HydraLoRA (component q,v, scalar routing, balance loss), with the spectral regularizer when λ > 0."""
    flags = ["--lora_nums", str(ns.experts), "--enable_blc"]
    if mode is None or lam == 0:
        return ["--method", "hydralora", *flags]
    return ["--method", "mtlora", *flags, "--enable_spectral_reg", "--spectral_reg_mode", mode,
            "--spectral_reg_lambda", str(lam)]  # fmt: skip


def block_flags(ns: argparse.Namespace, block_rank: int) -> list[str]:
    """mtLoRA's block-level FFN adapter alone, same experts and router as the component model."""
    return ["--method", "mtlora", "--lora_nums", str(ns.experts), "--enable_blc", "--enable_block_adapter",
            "--block_adapter_type", "ffn", "--block_adapter_rank", str(block_rank)]  # fmt: skip


def adapter_config(flags: Sequence[str], ns: argparse.Namespace) -> Any:
    """The :class:`~mtlora.config.MtLoraConfig` a flag list trains (the same parser as ``mtlora train``)."""
    from mtlora.config import MtLoraConfig, adapter_argument_parser

    (cfg,) = adapter_argument_parser("mechanisms").parse_args_into_dataclasses(
        [*flags, "--lora_rank", str(ns.lora_rank)]
    )
    assert isinstance(cfg, MtLoraConfig)
    return cfg


def trainable_params(base: Any, cfg: Any) -> int:
    """Trainable parameters of ``cfg`` on a copy of the loaded ``base`` model (the base stays unwrapped)."""
    import copy

    from mtlora.model import get_mtlora_model

    return get_mtlora_model(copy.deepcopy(base), cfg).get_nb_trainable_parameters()[0]


def pick_block_rank(base_path: str, ns: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The block rank whose trainable parameters are closest to half the component model's (paper: 50%)."""
    from mtlora.hub import load_model

    base = load_model(base_path, device="cpu", freeze=False).model  # loaded once: a 135M base takes seconds
    comp = trainable_params(base, adapter_config(component_flags(ns), ns))
    candidates = [ns.block_rank] if ns.block_rank else list(range(1, 2 * ns.lora_rank + 1))
    counts = {r: trainable_params(base, adapter_config(block_flags(ns, r), ns)) for r in candidates}
    rank = min(counts, key=lambda r: (abs(counts[r] / comp - 0.5), r))
    return rank, {
        "component_params": comp,
        "block_params": counts[rank],
        "block_rank": rank,
        "ratio": counts[rank] / comp,
        "chosen_by": "flag --block_rank" if ns.block_rank else "closest to 0.5 x the component parameters",
    }


def untrained_like(adapter_dir: Path, base_path: str, seed: int, label: str, device: str = "cpu") -> Any:
    """A freshly initialised adapter with the trained one's config (B = 0, A and router random, ``seed``)."""
    from mtlora.config import MtLoraConfig
    from mtlora.hub import load_model

    cfg = MtLoraConfig.from_json_file(adapter_dir / "adapter_config.json")
    trained_map = load_model(base_path, adapter_dir, device="cpu").task_map
    return fresh_adapter(base_path, cfg, trained_map, seed, label, adapter_dir, device=device)


def fresh_adapter(
    base_path: str,
    cfg: Any,
    task_map: dict[str, int],
    seed: int,
    label: str,
    adapter_dir: Path | None = None,
    device: str = "cpu",
) -> Any:
    """``cfg`` freshly initialised on the base (B = 0, A and router random from ``seed``), in eval mode."""
    import torch

    from mtlora.analysis.common import LoadedAdapter
    from mtlora.hub import load_model
    from mtlora.model import get_mtlora_model

    base = load_model(base_path, device=device, freeze=False)
    torch.manual_seed(seed)
    model = get_mtlora_model(base.model, cfg).to(device)
    model.eval()
    return LoadedAdapter(
        model=model,
        tokenizer=base.tokenizer,
        device=device,
        dtype=base.dtype,
        model_name_or_path=base.model_name_or_path,
        adapter_dir=adapter_dir,
        adapter_config=cfg.to_dict(),
        method=cfg.method,
        task_map=task_map,
        label=label,
    )


# ----------------------------------------------------------------------------------------------- 1C
def conflict_readings(res: dict[str, Any]) -> dict[str, Any]:
    """Both readings of Fig. 1C for one model: share of negative task pairs and mean cosine.

    ``layer_mean``: off-diagonal entries of the per-layer cosine matrices' mean (the released Fig. S3/1C
    JSON's ``similarity_matrix``, whose entries the figure's density shows); ``pooled``: every layer's pairs
    together; ``concatenated``: one gradient vector over all layers.
    """
    import torch

    from mtlora.analysis.gradients import off_diagonal

    def stats(values: torch.Tensor) -> dict[str, float]:
        return {"negative_share": float((values < 0).double().mean()), "mean_cos": float(values.mean())}

    layer_mean = off_diagonal(res["similarity_matrix"])
    pooled = torch.cat([off_diagonal(v["similarity_matrix"]) for v in res["per_layer"].values()])
    return {
        "layer_mean": stats(layer_mean),
        "pooled": stats(pooled),
        "concatenated": stats(off_diagonal(res["full_similarity_matrix"])),
        "values": [round(float(v), 5) for v in layer_mean],
        "per_layer_mean": {k: v["mean"] for k, v in res["per_layer"].items()},
    }


def gradient_share_by_kind(loaded: Any, grads: dict[str, Any]) -> dict[str, float]:
    """Share of the squared task-gradient norm (all tasks and adapters) held by A, the B's and the router:
    which adapter parameters the cosines are really about (at initialisation B = 0, so only B moves)."""
    totals: dict[str, float] = {}
    for name, adapter in loaded.named_adapters():
        g = grads[name]
        start = 0
        for pname, param in adapter.named_parameters():  # the order task_gradients concatenates in
            kind = "router" if pname.startswith("router") else pname.replace("lora_", "")
            part = g[:, start : start + param.numel()]
            totals[kind] = totals.get(kind, 0.0) + float((part.double() ** 2).sum())
            start += param.numel()
    whole = sum(totals.values())
    return {k: (v / whole if whole > 0 else 0.0) for k, v in totals.items()}


def measure_gradients(loaded: Any, data: Any, ns: argparse.Namespace) -> dict[str, Any]:
    """Per-task adapter gradients of one model, then :func:`conflict_readings` (+ which parameters move)."""
    from mtlora.analysis.gradients import similarity_result, task_gradients

    grads = task_gradients(loaded, data, batch_size=ns.grad_batch_size, num_batches=ns.grad_batches)
    res = similarity_result(grads, list(data.tasks), loaded.label)
    return conflict_readings(res) | {"gradient_norm_share": gradient_share_by_kind(loaded, grads)}


def reduction(comp: float, block: float) -> float | None:
    """The released ``(mean_comp - mean_block) / mean_comp`` (None when the component mean is ~0)."""
    return (comp - block) / comp if abs(comp) > 1e-12 else None


# ----------------------------------------------------------------------------------------------- 1B
def band_shares(
    specs: Sequence[Any], bands: Sequence[tuple[int, int]], *, use_sigma: bool = True, use_cos: bool = True
) -> list[float] | None:
    """Per band, in percent: ``mean_k∈b mean_i≠j σ_ik σ_jk |cos(u_ik, u_jk)|``, averaged over adapters and
    normalised across bands, as the released notebook. ``use_cos=False`` sets every |cos| to 1 (what σ·σ
    alone gives), ``use_sigma=False`` every σ to 1 (direction agreement alone). With both on this is
    :func:`mtlora.analysis.spectral.band_conflict` normalised (the tests check it)."""
    import torch

    from mtlora.analysis.spectral import AdapterSpectrum, band_conflict

    raws = []
    for spec in specs:
        sv = spec.sv if use_sigma else torch.ones_like(spec.sv)
        u = spec.u
        if not use_cos:  # |cos| = 1: identical unit vectors per (expert, k)
            u = torch.zeros_like(spec.u)
            u[:, 0, :] = 1.0
        raw = band_conflict(AdapterSpectrum(spec.name, sv, u, spec.flat), bands)
        if raw is None:
            return None
        raws.append(raw)
    mean = torch.tensor(raws, dtype=torch.float64).mean(0)
    total = float(mean.sum())
    return (100 * mean / total).tolist() if total > 0 else None


def band_importance_percent(specs: Sequence[Any], bands: Sequence[tuple[int, int]]) -> list[float]:
    """SV importance per band (``100 Σ_band σ / Σ σ``), averaged over experts and adapters (the notebook)."""
    import torch

    from mtlora.analysis.spectral import band_importance

    imp = torch.tensor([band_importance(s, bands) for s in specs], dtype=torch.float64)
    imp = imp[~imp.isnan().any(1)]
    return imp.mean(0).tolist() if len(imp) else [float("nan")] * len(bands)


def spectral_panel(experts: dict[str, list[Any]], rank: int) -> dict[str, Any]:
    """Fig. 1B readings for one set of matrices per adapter (experts, or per-task routed B's)."""
    from mtlora.analysis.spectral import adapter_spectra, sv_bands

    specs = adapter_spectra(experts)
    out: dict[str, Any] = {}
    for split, fractions in BAND_SPLITS.items():
        bands = sv_bands(rank, fractions)
        out[split] = {
            "bands": [list(b) for b in bands],
            "alignment_percent": band_shares(specs, bands),
            "importance_percent": band_importance_percent(specs, bands),
            "magnitude_only_percent": band_shares(specs, bands, use_cos=False),
            "direction_only_percent": band_shares(specs, bands, use_sigma=False),
        }
    return out


def routed_task_matrices(loaded: Any, usage: dict[str, Any]) -> dict[str, list[Any]]:
    """Per adapter, ``B_t = Σ_e π̄_{t,e} B_e`` for each task t (π̄ = the task's mean routing weights)."""
    from mtlora.analysis.spectral import experts_from_model

    experts = experts_from_model(loaded.model)
    out = {}
    for name, bs in experts.items():
        per_task = usage["usage_per_layer_and_task"][name]
        out[name] = [sum(float(w) * b for w, b in zip(per_task[t].tolist(), bs)) for t in usage["tasks"]]
    return out


def orthogonality_gap(experts: dict[str, list[Any]]) -> float:
    """``mean_e ‖B_eᵀB_e / s_e² - I‖_F / √r`` with ``s_e² = ‖B_e‖²_F / r``: 0 for orthogonal columns of
    equal norm (what the uniform term pushes towards); larger = a more spread spectrum."""
    import torch

    gaps = []
    for bs in experts.values():
        for b in bs:
            b = b.double()
            r = b.shape[1]
            s2 = float((b * b).sum()) / r
            if s2 <= 0:
                continue
            gram = b.T @ b / s2
            gaps.append(float(torch.linalg.matrix_norm(gram - torch.eye(r, dtype=b.dtype))) / math.sqrt(r))
    return statistics.fmean(gaps) if gaps else float("nan")


# ----------------------------------------------------------------------------------------------- stats
def mean_std(xs: Iterable[float | None]) -> dict[str, Any]:
    """``{mean, std, n}`` over seeds (sample std; 0 for one seed; None values skipped)."""
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def vector_mean_std(rows: Sequence[Sequence[float] | None]) -> dict[str, Any]:
    """Element-wise :func:`mean_std` of equally long lists (the per-band percentages of each seed)."""
    rows = [r for r in rows if r is not None]
    if not rows:
        return {"mean": None, "std": None, "n": 0}
    cols = [mean_std(col) for col in zip(*rows)]
    return {"mean": [c["mean"] for c in cols], "std": [c["std"] for c in cols], "n": len(rows)}


# ----------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class RunContext:
    """What every run shares; plain data, so a ``--jobs`` worker process receives it whole."""

    ns: argparse.Namespace
    base_path: str
    data_dir: str
    work: str
    common: dict[str, Any]
    budget: int


@functools.lru_cache(maxsize=2)
def _run_data(
    base_path: str,
    data_dir: str,
    num_tasks: int,
    train_per_task: int,
    test_per_task: int,
    grad_examples: int,
    entropy_examples: int,
    data_seed: int,
) -> tuple[Any, Any, list[Any]]:
    """Gradient batches, routing batches and test records: built once per process (a ``--jobs`` worker too),
    not once per run."""
    from mtlora.analysis.common import prepare_task_batches
    from mtlora.data.manytask import build_suite
    from mtlora.hub import load_tokenizer

    tokenizer = load_tokenizer(base_path)
    grad = prepare_task_batches(data_dir, tokenizer, {}, max_examples=grad_examples, seed=data_seed)
    route = prepare_task_batches(data_dir, tokenizer, {}, max_examples=entropy_examples, seed=data_seed)
    test = build_suite(num_tasks, train_per_task, test_per_task, data_seed).test_records()
    return grad, route, test


def measure_run(
    ctx: RunContext, seed: int, name: str, mode: str | None, lam: float, flags: list[str]
) -> dict[str, Any]:
    """Train one model of the plan, evaluate it and take every panel's measurements on it.

    Returns the journal entry (``key``, ``row``, ``gradients``, ``spectral``). Runs one thread of torch, so
    ``--jobs`` processes run side by side without oversubscribing the cores.
    """
    import torch

    from mtlora.analysis.common import load_adapter
    from mtlora.analysis.routing import collect_routing, entropy_result, usage_result
    from mtlora.analysis.spectral import experts_from_model
    from mtlora.data.manytask import macro_average, score
    from mtlora.demo import evaluate_model, train_method

    ns = ctx.ns
    torch.set_num_threads(ns.num_threads)
    grad_data, route_data, test = _run_data(
        ctx.base_path, ctx.data_dir, ns.num_tasks, ns.train_per_task, ns.test_per_task,
        ns.num_tasks * ns.grad_batches * ns.grad_batch_size, ns.entropy_examples, ns.data_seed,
    )  # fmt: skip
    work = Path(ctx.work)
    t0, c0 = time.time(), time.process_time()
    run_ns = argparse.Namespace(**ctx.common, seed=seed, max_steps=ns.steps)
    manifest = train_method(f"{name}-s{seed}", ctx.base_path, Path(ctx.data_dir), work, run_ns, flags=flags)
    adapter_dir = Path(manifest["adapter_dir"])
    answers, eval_s = evaluate_model(
        ctx.base_path, adapter_dir, test, run_ns, ctx.budget, desc=f"eval {name} s{seed}"
    )
    per_task = score(answers, test)
    row: dict[str, Any] = {
        "run": name, "seed": seed, "mode": mode, "lambda": lam, "flags": flags,
        "accuracy": macro_average(per_task), "per_task": per_task,
        "train_loss": manifest.get("train_loss"), "trainable_params": manifest.get("trainable_params"),
        "train_seconds": manifest.get("seconds"), "eval_seconds": round(eval_s, 2),
    }  # fmt: skip
    gradients: list[dict[str, Any]] = []
    spectral: list[dict[str, Any]] = []
    kind = "block" if name == "block" else "component"
    loaded = load_adapter(adapter_dir, ctx.base_path, device=ns.device, label=kind)
    rs_prompt = collect_routing(loaded, route_data, tokens="prompt")
    rs_all = collect_routing(loaded, route_data, tokens="all")
    ent = entropy_result(rs_prompt)
    row["routing_entropy"] = ent["overall_mean"]
    row["routing_entropy_all_tokens"] = entropy_result(rs_all)["overall_mean"]
    row["max_entropy"] = ent["max_entropy"]
    experts = experts_from_model(loaded.model)
    row["orthogonality_gap"] = orthogonality_gap(experts)
    if kind == "component":
        expert_level = spectral_panel(experts, ns.lora_rank)
        row["top_band_importance"] = {s: v["importance_percent"][0] for s, v in expert_level.items()}
        row["top_band_alignment"] = {
            s: (v["alignment_percent"] or [None])[0] for s, v in expert_level.items()
        }
        if name == "component" and "1B" in ns.panels:
            task_level = spectral_panel(routed_task_matrices(loaded, usage_result(rs_all)), ns.lora_rank)
            spectral.append({"seed": seed, "expert_level": expert_level, "task_level": task_level})
    if name in ("component", "block") and "1C" in ns.panels:
        trained = measure_gradients(loaded, grad_data, ns)
        fresh = untrained_like(adapter_dir, ctx.base_path, seed, kind, ns.device)
        init = measure_gradients(fresh, grad_data, ns)
        gradients.append({"seed": seed, "model": kind, "trained": trained, "init": init})
    del loaded
    row["wall_seconds"] = round(time.time() - t0, 2)
    row["cpu_seconds"] = round(time.process_time() - c0, 2)
    if not ns.keep_runs:
        shutil.rmtree(work / "runs" / f"{name}-s{seed}", ignore_errors=True)
    key = run_key(ns, name, flags, seed)
    return {"key": key, "row": row, "gradients": gradients, "spectral": spectral}


def prepare_base(ns: argparse.Namespace, common: dict[str, Any], suite: Any) -> tuple[str, dict[str, Any]]:
    """The base every run adapts: ``--model_name_or_path`` pre-trained on the non-evaluated tasks (cached by
    content), or as it is with ``--pretrain_steps 0``. Sets ``ns.base_key`` for :func:`run_key` when the base
    is not the bundled one (the bundled base keeps the run keys it always had)."""
    import hashlib

    from mtlora.demo import BUNDLED_MODEL, _file_fingerprint, pretrain_base
    from mtlora.hub import load_model, resolve_model_path

    if ns.pretrain_steps == 0:
        base_path = resolve_model_path(ns.model_name_or_path)
        info: dict[str, Any] = {"steps": 0, "base_model": ns.model_name_or_path, "cached": True}
        local = Path(base_path).is_dir()
        key = hashlib.sha256(
            (_file_fingerprint(Path(base_path)) if local else base_path).encode()
        ).hexdigest()[:16]
    else:
        pre_ns = argparse.Namespace(**common, seed=ns.data_seed, pretrain_steps=ns.pretrain_steps)
        print(f"[base] pre-training / loading {ns.model_name_or_path} ({ns.pretrain_steps} steps, cache "
              f"{ns.cache_dir})", flush=True)  # fmt: skip
        base_path, info = pretrain_base(pre_ns, suite, ns.cache_dir)
        key = Path(base_path).name
    ns.base_key = None if ns.model_name_or_path == BUNDLED_MODEL else key
    model = load_model(base_path, device="cpu").model
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["architecture"] = {k: getattr(model.config, k, None) for k in ("hidden_size", "intermediate_size",
                                                                         "num_hidden_layers", "num_attention_heads")}  # fmt: skip
    return str(base_path), info


def measure_init(ctx: RunContext, seed: int, name: str, flags: list[str]) -> dict[str, Any]:
    """``--init_only``: panel 1C's gradients of one freshly initialised model, no training and no evaluation
    (the journal entry has the shape :func:`measure_run` gives, with the ``init`` stage only)."""
    import torch

    from mtlora.data import build_task_map, load_records

    ns = ctx.ns
    torch.set_num_threads(ns.num_threads)
    grad_data, _, _ = _run_data(
        ctx.base_path, ctx.data_dir, ns.num_tasks, ns.train_per_task, ns.test_per_task,
        ns.num_tasks * ns.grad_batches * ns.grad_batch_size, 1, ns.data_seed,
    )  # fmt: skip
    t0, c0 = time.time(), time.process_time()
    cfg = adapter_config(flags, ns)
    task_map = build_task_map(load_records(ctx.data_dir))  # the map `mtlora train` would give these tasks
    model = fresh_adapter(ctx.base_path, cfg, task_map, seed, name, device=ns.device)
    params = model.model.get_nb_trainable_parameters()[0]
    init = measure_gradients(model, grad_data, ns)
    row = {"run": name, "seed": seed, "mode": None, "lambda": 0.0, "flags": flags, "trainable_params": params,
           "wall_seconds": round(time.time() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)}  # fmt: skip
    return {
        "key": run_key(ns, name, flags, seed),
        "row": row,
        "gradients": [{"seed": seed, "model": name, "init": init}],
        "spectral": [],
    }


def _measure(ctx: RunContext, seed: int, name: str, mode: str | None, lam: float, flags: list[str]) -> dict:
    """One run of the plan (a ``--jobs`` worker's entry point): trained and measured, or ``--init_only``."""
    if ctx.ns.init_only:
        return measure_init(ctx, seed, name, flags)
    return measure_run(ctx, seed, name, mode, lam, flags)


def run(ns: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mtlora.analysis.common import clean_json
    from mtlora.data.manytask import build_suite
    from mtlora.demo import _answer_budget
    from mtlora.hub import load_tokenizer

    t_start, cpu_start = time.time(), time.process_time()
    torch.set_num_threads(ns.num_threads)
    machine = _common.machine_info(ns.device)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    # one work folder per output file: a --quick run next to a full one must not delete its runs
    work = ns.cache_dir / f"work-{ns.out.stem}"
    shutil.rmtree(work, ignore_errors=True)
    common = dict(
        model_name_or_path=ns.model_name_or_path, device=ns.device, train_per_task=ns.train_per_task,
        test_per_task=ns.test_per_task, batch_size=ns.batch_size, learning_rate=ns.learning_rate,
        lora_rank=ns.lora_rank, eval_batch_size=ns.eval_batch_size, epochs=None, train_args="--disable_tqdm True",
    )  # fmt: skip

    suite = build_suite(ns.num_tasks, ns.train_per_task, ns.test_per_task, ns.data_seed)
    data_dir = suite.write(work / "data")
    base_path, pretrain_info = prepare_base(ns, common, suite)
    tokenizer = load_tokenizer(base_path)
    budget = _answer_budget(suite.train, tokenizer)  # (unused by --init_only, which generates nothing)
    block_rank, ratio = pick_block_rank(base_path, ns)
    print(f"[setup] block FFN rank {block_rank}: {ratio['block_params']:,d} vs {ratio['component_params']:,d} "
          f"component parameters (ratio {ratio['ratio']:.3f})", flush=True)  # fmt: skip

    plan: list[tuple[str, str | None, float, list[str]]] = [("component", None, 0.0, component_flags(ns))]
    if "1C" in ns.panels:
        plan.append(("block", None, 0.0, block_flags(ns, block_rank)))
    if "1A" in ns.panels:
        plan += [
            (f"{m}_{lam:g}", m, lam, component_flags(ns, m, lam))
            for m in ns.modes
            for lam in ns.lambdas
            if lam > 0
        ]
    total = len(plan) * len(ns.seeds)
    journal = ns.cache_dir / f"{ns.out.stem}.runs.jsonl"
    done = _common.journal_read(journal) if ns.resume else {}
    if not ns.resume:
        journal.unlink(missing_ok=True)
    ctx = RunContext(ns, str(base_path), str(data_dir), str(work), common, budget)
    todo = [(seed, item) for seed in ns.seeds for item in plan]
    entries: dict[tuple[int, str], dict[str, Any]] = {}
    for seed, (name, _mode, _lam, flags) in todo:
        key = run_key(ns, name, flags, seed)
        if key in done:
            entries[(seed, name)] = done[key]
            print(f"[{len(entries)}/{total}] {name} seed={seed}: reused from {journal}", flush=True)
    pending = [(seed, item) for seed, item in todo if (seed, item[0]) not in entries]

    def finished(seed: int, entry: dict[str, Any]) -> None:
        row = entry["row"]
        entries[(seed, row["run"])] = entry
        _common.journal_append(journal, clean_json(entry))
        if ns.init_only:
            init = entry["gradients"][0]["init"]["layer_mean"]
            print(f"[{len(entries)}/{total}] {row['run']} seed={seed} at init: negative pairs "
                  f"{100 * init['negative_share']:.1f}%, mean cos {init['mean_cos']:.4f} "
                  f"({row['wall_seconds']:.0f} s)", flush=True)  # fmt: skip
            return
        print(f"[{len(entries)}/{total}] {row['run']} seed={seed}: acc={100 * row['accuracy']:.1f}% "
              f"H={row['routing_entropy']:.3f} gap={row['orthogonality_gap']:.3f} "
              f"loss={row['train_loss']:.3f} ({row['wall_seconds']:.0f} s)", flush=True)  # fmt: skip

    if ns.jobs > 1 and len(pending) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: a fresh interpreter per worker (fork after torch has started threads is unsafe)
        with ProcessPoolExecutor(ns.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_measure, ctx, seed, *item): seed for seed, item in pending}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())
    else:
        for seed, item in pending:
            finished(seed, _measure(ctx, seed, *item))
    # plan order, whatever order the runs finished in: the JSON does not depend on --jobs
    ordered = [entries[(seed, item[0])] for seed, item in todo]
    runs = [entry["row"] for entry in ordered]
    gradients = [g for entry in ordered for g in entry["gradients"]]
    spectral = [s for entry in ordered for s in entry["spectral"]]

    panels: dict[str, Any] = {}
    if "1C" in ns.panels:
        panels["1C"] = summarize_1c(gradients, ratio, ns)
    if "1B" in ns.panels:
        panels["1B"] = summarize_1b(spectral, ns)
    if "1A" in ns.panels:
        panels["1A"] = summarize_1a(runs, ns)
    results: dict[str, Any] = {
        "benchmark": "mechanisms",
        "machine": machine,
        "config": {
            "model": ns.model_name_or_path,
            "suite": "manytask",
            "num_tasks": ns.num_tasks,
            "tasks": suite.task_names,
            "train_per_task": ns.train_per_task,
            "test_per_task": ns.test_per_task,
            "steps": ns.steps,
            "batch_size": ns.batch_size,
            "learning_rate": ns.learning_rate,
            "lora_rank": ns.lora_rank,
            "experts": ns.experts,
            "block_rank": block_rank,
            "lambdas": ns.lambdas,
            "modes": ns.modes,
            "seeds": ns.seeds,
            "data_seed": ns.data_seed,
            "grad_batches": ns.grad_batches,
            "grad_batch_size": ns.grad_batch_size,
            "entropy_examples": ns.entropy_examples,
            "num_threads": ns.num_threads,
            "device": ns.device,
            "jobs": ns.jobs,
            "quick": ns.quick,
            "init_only": ns.init_only,
            "panels": ns.panels,
            "flags": {name: flags for name, _, _, flags in plan},
        },  # fmt: skip
        "base_pretraining": {k: v for k, v in pretrain_info.items() if k != "tasks"},
        "paper": PAPER,
        "panels": panels,
        "runs": runs,
        "total_seconds": round(time.time() - t_start, 2),
        # one torch thread: the process's CPU time is about what the run takes on an otherwise idle machine
        "total_cpu_seconds": round(time.process_time() - cpu_start, 2),
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    results["lines"] = report(results)
    out_json = _common.write_json(ns.out, results)
    for panel in panels:
        PLOTS[panel](results, panel_png(out_json, panel))
    if not ns.keep_runs:
        shutil.rmtree(work, ignore_errors=True)
    return results


def run_key(ns: argparse.Namespace, name: str, flags: Sequence[str], seed: int) -> str:
    """Everything that determines one run's measurements (``--resume`` reuses a run only on an exact match)."""
    import hashlib
    import json

    fields = {
        "name": name, "flags": list(flags), "seed": seed, "panels": ns.panels,
        **{k: getattr(ns, k) for k in ("num_tasks", "train_per_task", "test_per_task", "steps", "batch_size",
                                       "learning_rate", "lora_rank", "experts", "grad_batches", "grad_batch_size",
                                       "entropy_examples", "pretrain_steps", "data_seed")},
    }  # fmt: skip
    if ns.init_only:
        fields["init_only"] = True
    if getattr(ns, "base_key", None):  # a non-bundled base: its content (not its path) names the runs
        fields["base"] = ns.base_key
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def panel_png(out_json: Path, panel: str) -> Path:
    return out_json.with_name(f"{out_json.stem}_{panel}.png")


# ----------------------------------------------------------------------------------------------- summaries
def _stages(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The 1C stages measured: ``init`` always, ``trained`` unless ``--init_only``."""
    return [s for s in ("init", "trained") if rows and s in rows[0]]


def summarize_1c(rows: list[dict[str, Any]], ratio: dict[str, Any], ns: argparse.Namespace) -> dict[str, Any]:
    """Per stage and reading: component and block over seeds, and their per-seed differences."""
    out: dict[str, Any] = {
        "what": "pairwise cosine of per-task gradients of every adapter parameter (A, B_e, router) of a decoder "
        "layer; component = q_proj+v_proj adapters of the layer, block = its FFN adapter",
        "tasks": ns.num_tasks,
        "pairs_per_layer": ns.num_tasks * (ns.num_tasks - 1) // 2,
        "gradient_examples_per_task": ns.grad_batches * ns.grad_batch_size,
        "parameter_ratio": ratio,
        "per_seed": rows,
    }
    for stage in _stages(rows):
        stage_out: dict[str, Any] = {}
        for reading in ("layer_mean", "pooled", "concatenated"):
            by_model = {
                m: [r[stage][reading] for r in rows if r["model"] == m] for m in ("component", "block")
            }
            seeds = sorted({r["seed"] for r in rows})
            pairs = [
                (next(r for r in rows if r["seed"] == s and r["model"] == "component")[stage][reading],
                 next(r for r in rows if r["seed"] == s and r["model"] == "block")[stage][reading])
                for s in seeds
            ]  # fmt: skip
            stage_out[reading] = {
                "negative_share": {m: mean_std(x["negative_share"] for x in v) for m, v in by_model.items()},
                "mean_cos": {m: mean_std(x["mean_cos"] for x in v) for m, v in by_model.items()},
                "negative_share_drop": mean_std(c["negative_share"] - b["negative_share"] for c, b in pairs),
                "mean_cos_reduction": mean_std(reduction(c["mean_cos"], b["mean_cos"]) for c, b in pairs),
            }
        out[stage] = stage_out
    return out


def summarize_1b(rows: list[dict[str, Any]], ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": "trained component model's B_e (SVD per expert); task level: B_t = sum_e mean_pi_{t,e} B_e",
        "rank": ns.lora_rank,
        "experts": ns.experts,
        "per_seed": rows,
    }
    for level in ("expert_level", "task_level"):
        out[level] = {}
        for split in BAND_SPLITS:
            cells = [r[level][split] for r in rows]
            out[level][split] = {"bands": cells[0]["bands"]} | {
                key: vector_mean_std([c[key] for c in cells])
                for key in ("alignment_percent", "importance_percent", "magnitude_only_percent", "direction_only_percent")
            }  # fmt: skip
    return out


def summarize_1a(runs: list[dict[str, Any]], ns: argparse.Namespace) -> dict[str, Any]:
    """Per mode and λ over seeds; λ = 0 is the same HydraLoRA runs for both modes."""
    summary: dict[str, Any] = {}
    baseline = {r["seed"]: r["accuracy"] for r in runs if r["run"] == "component"}
    for mode in ns.modes:
        summary[mode] = {}
        for lam in ns.lambdas:
            rows = [
                r
                for r in runs
                if (r["run"] == "component" if lam == 0 else (r["mode"] == mode and r["lambda"] == lam))
            ]
            summary[mode][f"{lam:g}"] = {
                "accuracy": mean_std(r["accuracy"] for r in rows),
                # paired by seed (same initialisation and data order as the λ = 0 run): less noisy
                "accuracy_delta": mean_std(r["accuracy"] - baseline[r["seed"]] for r in rows),
                "routing_entropy": mean_std(r["routing_entropy"] for r in rows),
                "routing_entropy_all_tokens": mean_std(r["routing_entropy_all_tokens"] for r in rows),
                "orthogonality_gap": mean_std(r["orthogonality_gap"] for r in rows),
                "top_band_importance_top20": mean_std(r["top_band_importance"]["top20"] for r in rows),
                "top_band_alignment_top20": mean_std(r["top_band_alignment"]["top20"] for r in rows),
                "train_loss": mean_std(r["train_loss"] for r in rows),
                "seeds": [r["seed"] for r in rows],
            }
    return {
        "what": "HydraLoRA + spectral regularizer (uniform: w = 1; spectral: the spectral-aware term) at each "
        "lambda: exact-match accuracy on the test split, mean routing entropy (nats, prompt tokens)",
        "lambdas": ns.lambdas,
        "modes": ns.modes,
        "max_entropy": math.log(ns.experts),
        "summary": summary,
    }


# ----------------------------------------------------------------------------------------------- report
def _fmt(x: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "nan" if x is None else f"{scale * x:.{digits}f}"


def report(results: dict[str, Any]) -> list[str]:
    """The closing lines: one per panel, ``panel=<id> name=value ...`` (percentages in %)."""
    p = results["panels"]
    seeds = len(results["config"]["seeds"])
    lines = []
    if "1A" in p:
        s = p["1A"]["summary"]
        lams = ",".join(f"{lam:g}" for lam in p["1A"]["lambdas"])
        parts = [f"panel=1A seeds={seeds} lambdas={lams}"]
        for mode in p["1A"]["modes"]:
            acc = ",".join(_fmt(s[mode][f"{lam:g}"]["accuracy"]["mean"], 100) for lam in p["1A"]["lambdas"])
            ent = ",".join(
                _fmt(s[mode][f"{lam:g}"]["routing_entropy"]["mean"], 1, 3) for lam in p["1A"]["lambdas"]
            )
            parts.append(f"acc_{mode}={acc} entropy_{mode}={ent}")
        lines.append(" ".join(parts))
    if "1B" in p:
        parts = [f"panel=1B seeds={seeds}"]
        for level, prefix in (("expert_level", ""), ("task_level", "task_")):
            for split in BAND_SPLITS:
                cell = p["1B"][level][split]
                al = "/".join(_fmt(v) for v in (cell["alignment_percent"]["mean"] or [None] * 3))
                parts.append(f"{prefix}{split}_alignment={al}")
                if level == "expert_level":
                    imp = "/".join(_fmt(v) for v in (cell["importance_percent"]["mean"] or [None] * 3))
                    parts.append(f"{split}_importance={imp}")
        lines.append(" ".join(parts))
    if "1C" in p:
        parts = [f"panel=1C seeds={seeds}"]
        for stage, prefix in (("trained", ""), ("init", "init_")):
            if stage not in p["1C"]:  # --init_only
                continue
            r = p["1C"][stage]["layer_mean"]
            parts += [
                f"{prefix}neg_share_component={_fmt(r['negative_share']['component']['mean'], 100)}",
                f"{prefix}neg_share_block={_fmt(r['negative_share']['block']['mean'], 100)}",
                f"{prefix}mean_cos_component={_fmt(r['mean_cos']['component']['mean'], 1, 4)}",
                f"{prefix}mean_cos_block={_fmt(r['mean_cos']['block']['mean'], 1, 4)}",
                f"{prefix}mean_cos_reduction={_fmt(r['mean_cos_reduction']['mean'], 100)}",
            ]
        lines.append(" ".join(parts))
    return lines


# ----------------------------------------------------------------------------------------------- figures
def plot_1c(results: dict[str, Any], path: Path) -> Path:
    """Densities of the task-pair cosines (component vs block) at init and trained, and per-layer means."""
    import numpy as np

    from mtlora.analysis.common import new_figure, save_figure

    panel = results["panels"]["1C"]
    rows = panel["per_seed"]
    stages = _stages(rows)
    fig, axes = new_figure(2, len(stages), figsize=(max(9, 6 * len(stages)), 8))
    colors = {"component": "C0", "block": "C1"}
    for ax, stage in zip(axes[: len(stages)], stages):
        vals = {m: np.array([v for r in rows if r["model"] == m for v in r[stage]["values"]]) for m in colors}
        lo = min(-0.05, *(float(v.min()) for v in vals.values() if v.size))
        hi = max(0.05, *(float(v.max()) for v in vals.values() if v.size))
        bins = np.linspace(lo, hi, 41)
        summ = panel[stage]["layer_mean"]
        for m, color in colors.items():
            ns_ = summ["negative_share"][m]
            mc = summ["mean_cos"][m]
            label = (f"{m}: negative {100 * ns_['mean']:.1f} ± {100 * ns_['std']:.1f}%, "
                     f"mean {mc['mean']:.3f} ± {mc['std']:.3f}")  # fmt: skip
            ax.hist(vals[m], bins=bins, density=True, alpha=0.45, color=color, label=label)
        ax.axvline(0, color="black", ls="--", lw=1)
        red = summ["mean_cos_reduction"]
        red_text = "n/a" if red["mean"] is None else f"{100 * red['mean']:.0f} ± {100 * red['std']:.0f}%"
        ax.set_title(
            f"({'a' if stage == 'init' else 'b'}) {stage}: mean-cosine reduction {red_text}", fontsize=10
        )
        ax.set_xlabel("cosine of two tasks' gradients (layer-mean matrix, off-diagonal)")
        ax.set_ylabel("density (pairs x seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax, stage in zip(axes[len(stages) :], stages):
        for off, (m, color) in zip((-0.12, 0.12), colors.items()):
            per = [r[stage]["per_layer_mean"] for r in rows if r["model"] == m]
            keys = sorted(per[0], key=int)
            arr = np.array([[p[k] for k in keys] for p in per])
            x = np.arange(len(keys)) + off
            ax.errorbar(x, arr.mean(0), yerr=arr.std(0, ddof=1) if len(arr) > 1 else None, marker="o",
                        capsize=3, color=color, ls="none", label=m)  # fmt: skip
        ax.set_xticks(range(len(keys)), [f"L{k}" for k in keys])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean off-diagonal cosine (± std over seeds)")
        ax.set_title(f"({'c' if stage == 'init' else 'd'}) per layer, {stage}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    cfg, ratio = results["config"], panel["parameter_ratio"]
    fig.suptitle(
        f"Fig. 1C measured: task-gradient conflict, component q,v (HydraLoRA) vs block FFN "
        f"({ratio['ratio']:.2f}x the parameters); {cfg['num_tasks']} tasks, {len(cfg['seeds'])} seed(s)\n"
        f"paper: negative pairs 60.6% -> 53.6%, mean cosine -0.055 -> -0.015 (reported as -76%)",
        fontsize=9,
    )
    return save_figure(fig, path, dpi=110)


def plot_1b(results: dict[str, Any], path: Path) -> Path:
    """Per band: alignment share (expert and task level), SV importance, and the two diagnostics."""
    import numpy as np

    from mtlora.analysis.common import new_figure, save_figure

    panel = results["panels"]["1B"]
    fig, axes = new_figure(1, 2, figsize=(13, 4.8))
    series = (
        ("expert_level", "alignment_percent", "alignment (experts)"),
        ("expert_level", "importance_percent", "SV importance"),
        ("expert_level", "magnitude_only_percent", "σ·σ only (|cos| = 1)"),
        ("expert_level", "direction_only_percent", "|cos| only (σ = 1)"),
        ("task_level", "alignment_percent", "alignment (tasks, routed B_t)"),
    )
    width = 0.8 / (len(series) + 1)
    for ax, split in zip(axes, BAND_SPLITS):
        bands = panel["expert_level"][split]["bands"]
        labels = [f"k={a + 1}" + (f"..{b}" if b - a > 1 else "") for a, b in bands]
        x = np.arange(3)
        for i, (level, key, label) in enumerate(series):
            cell = panel[level][split][key]
            if cell["mean"] is None:
                continue
            ax.bar(x + (i - len(series) / 2) * width, cell["mean"], width, yerr=cell["std"], capsize=2,
                   label=label, color=f"C{i}")  # fmt: skip
        if split == "top10":
            ax.scatter(x + (len(series) / 2) * width, PAPER["1B"]["alignment_percent"], marker="*", s=90,
                       color="black", zorder=3, label="paper alignment (labelled top 10%)")  # fmt: skip
            ax.scatter(x + (len(series) / 2) * width, PAPER["1B"]["importance_percent"], marker="x", s=50,
                       color="black", zorder=3, label="paper SV importance")  # fmt: skip
        ax.set_xticks(x, [f"{n}\n({lab})" for n, lab in zip(("top", "middle", "tail"), labels)])
        ax.set_ylabel("share across bands (%), mean ± std over seeds")
        ax.set_title(f"bands {split} (r = {panel['rank']})", fontsize=10)
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    cfg = results["config"]
    fig.suptitle(
        f"Fig. 1B measured: SV-band alignment of the trained HydraLoRA's B_e (E={panel['experts']}, "
        f"r={panel['rank']}), {cfg['num_tasks']} tasks, {len(cfg['seeds'])} seed(s)",
        fontsize=10,
    )
    return save_figure(fig, path, dpi=110)


def plot_1a(results: dict[str, Any], path: Path) -> Path:
    """Accuracy, routing entropy and the orthogonality gap vs λ for both terms (paper curve for reference)."""
    from mtlora.analysis.common import new_figure, save_figure

    panel = results["panels"]["1A"]
    lams = panel["lambdas"]
    fig, axes = new_figure(1, 3, figsize=(15, 4.5))
    specs = (
        ("accuracy_delta", 100, "exact match minus λ = 0, same seed (points)", "(a) accuracy change"),
        ("routing_entropy", 1, "routing entropy (nats, prompt tokens)", "(b) mean routing entropy"),
        ("orthogonality_gap", 1, "mean ||B^T B / s^2 - I||_F / sqrt(r)", "(c) what the term did to B"),
    )
    for ax, (key, scale, ylabel, title) in zip(axes, specs):
        for i, mode in enumerate(panel["modes"]):
            cells = [panel["summary"][mode][f"{lam:g}"][key] for lam in lams]
            ax.errorbar(lams, [scale * c["mean"] for c in cells], yerr=[scale * c["std"] for c in cells],
                        marker="o", capsize=3, color=f"C{i}", label=f"{mode} term")  # fmt: skip
        ax.set_xlabel("λ")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].axhline(
        panel["max_entropy"],
        color="grey",
        ls="--",
        lw=1,
        label=f"uniform routing ln E = {panel['max_entropy']:.3f}",
    )
    paper_delta = [a - PAPER["1A"]["bbh_accuracy"][0] for a in PAPER["1A"]["bbh_accuracy"]]
    axes[0].plot(PAPER["1A"]["lambdas"], paper_delta, color="black", ls=":", marker="x",
                 label="paper: BBH accuracy minus λ = 0 (uniform term, LLaMA-2-7B)")  # fmt: skip
    axes[0].axhline(0, color="black", lw=0.8)
    axes[1].plot(PAPER["1A"]["lambdas"], PAPER["1A"]["routing_entropy"], color="black", ls=":", marker="x",
                 label="paper (E = 16, LLaMA-2-7B)")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    cfg = results["config"]
    fig.suptitle(
        f"Fig. 1A measured: regularization strength vs accuracy and routing entropy, HydraLoRA E={cfg['experts']} "
        f"r={cfg['lora_rank']}, {cfg['num_tasks']} tasks, {cfg['steps']} steps, {len(cfg['seeds'])} seed(s)",
        fontsize=10,
    )
    return save_figure(fig, path, dpi=110)


PLOTS = {"1A": plot_1a, "1B": plot_1b, "1C": plot_1c}


def _pm(cell: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{scale * cell['mean']:.{digits}f} ± {scale * cell['std']:.{digits}f}"


def _bands_pm(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "n/a"
    return " / ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(cell["mean"], cell["std"]))


def tables(results: dict[str, Any]) -> str:
    """Markdown tables of every panel (mean ± std over seeds), as benchmarks/README.md quotes them."""
    p, out = results["panels"], []
    seeds = ",".join(str(s) for s in results["config"]["seeds"])
    if "1C" in p:
        out.append(f"1C: task-gradient cosines, component vs block (seeds {seeds})\n")
        out.append(
            "| stage | reading | negative pairs comp (%) | block (%) | mean cos comp | block | reduction (%) |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for stage in _stages(p["1C"]["per_seed"]):
            for reading in ("layer_mean", "pooled", "concatenated"):
                r = p["1C"][stage][reading]
                out.append(
                    f"| {stage} | {reading} | {_pm(r['negative_share']['component'])} | "
                    f"{_pm(r['negative_share']['block'])} | {_pm(r['mean_cos']['component'], 1, 4)} | "
                    f"{_pm(r['mean_cos']['block'], 1, 4)} | {_pm(r['mean_cos_reduction'], 100, 0)} |"
                )
    if "1B" in p:
        out.append(f"\n1B: shares per band top / middle / tail in % (seeds {seeds})\n")
        out.append("| level | bands | alignment | SV importance | σ·σ only | abs cos only |")
        out.append("|---|---|---|---|---|---|")
        for level in ("expert_level", "task_level"):
            for split in BAND_SPLITS:
                c = p["1B"][level][split]
                out.append(
                    f"| {level} | {split} | {_bands_pm(c['alignment_percent'])} | "
                    f"{_bands_pm(c['importance_percent'])} | {_bands_pm(c['magnitude_only_percent'])} | "
                    f"{_bands_pm(c['direction_only_percent'])} |"
                )
    if "1A" in p:
        out.append(f"\n1A: λ sweep on HydraLoRA (seeds {seeds})\n")
        out.append("| term | λ | exact match (%) | change vs λ=0 (points) | routing entropy | orthogonality gap |"
                   " top-20% SV importance (%) |")  # fmt: skip
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for mode in p["1A"]["modes"]:
            for lam in p["1A"]["lambdas"]:
                c = p["1A"]["summary"][mode][f"{lam:g}"]
                out.append(
                    f"| {mode} | {lam:g} | {_pm(c['accuracy'])} | {_pm(c['accuracy_delta'])} | "
                    f"{_pm(c['routing_entropy'], 1, 3)} | {_pm(c['orthogonality_gap'], 1, 3)} | "
                    f"{_pm(c['top_band_importance_top20'], 1, 1)} |"
                )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ns = resolve(build_parser().parse_args(argv))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mtlora.demo import _quiet_libraries

    with _quiet_libraries():
        results = run(ns)
    print("\n" + tables(results))
    pngs = ", ".join(str(panel_png(ns.out, p)) for p in results["panels"])
    print(f"\ntotal {results['total_seconds']:.0f} s; wrote {ns.out} and {pngs}")
    print("\n".join(results["lines"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
