r"""Spectral analyses of the experts' up-projections: SV spectra with w(σ) (Fig. S2), band conflict (Fig. 1B).

Every expert e of every adapter has an up-projection :math:`B_e ∈ R^{d_{out}×r}` (MMoELoRA: its slice of
the rank). With the thin SVD :math:`B_e = U_e Σ_e V_eᵀ`, singular values :math:`σ_{e,1} ≥ … ≥ σ_{e,r}`:

* **Spectrum** (Fig. S2): mean and std of :math:`σ_{e,k}` over experts and adapters per index k, the
  spectral-regulariser weight :math:`w(σ) = \exp(-σ/\bar σ)` (:math:`\bar σ` = mean of the mean spectrum,
  as in :mod:`mtlora.losses`), per-band means, spectra of a few layers, and the cross-expert Pearson
  correlation of the flattened :math:`B_e` at the middle adapter.
* **Bands** by index percentile of r, as in the released notebook: [0, 20%), [20, 50%), [50, 100%)
  (r=16: indices 0-2, 3-7, 8-15). Boundaries are ``floor(0.2 r)`` and ``floor(0.5 r)``, moved up where
  needed so that no band is empty (so r ≥ 3 is required).
* **Conflict** of band b in one adapter: :math:`\mathrm{mean}_{k∈b}\, \mathrm{mean}_{i≠j}\, σ_{i,k} σ_{j,k}
  |\cos(u_{i,k}, u_{j,k})|` over ordered expert pairs; averaged over adapters and normalised to percent
  across bands. It measures how much experts' k-th directions *align*, weighted by their strength - an
  alignment measure, named "conflict" in the paper.
* **SV importance** of band b: :math:`100 · \sum_{k∈b} σ_k / \sum_k σ_k`, averaged over experts and adapters.

These need only the adapter weights, so they read ``adapter_model.safetensors`` alone
(:func:`mtlora.hub.read_adapter_tensors`; no base model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtlora.analysis.common import (
    annotate_cells,
    new_figure,
    read_adapter_config,
    save_figure,
    select_layer,
    short_name,
    write_json,
)
from mtlora.config import WEIGHTS_NAME, MtLoraConfig
from mtlora.errors import CheckpointError, MtLoraError
from mtlora.hub import read_adapter_tensors, resolve_adapter_dir

BAND_FRACTIONS = (0.0, 0.2, 0.5, 1.0)
BAND_NAMES = ("top 0-20%", "mid 20-50%", "tail 50-100%")
_B_SUFFIX = ".mtlora.lora_B"


def sv_bands(rank: int, fractions: Sequence[float] = BAND_FRACTIONS) -> list[tuple[int, int]]:
    """Index ranges ``[start, stop)`` of the three SV bands of a rank-``rank`` matrix (see module doc).

    ``fractions`` = ``(0, top, mid, 1)``: the released Fig. 1B is labelled "Top-10%" while its notebook bins
    at 20%, so the benchmarks evaluate both ``(0, 0.1, 0.5, 1)`` and the default ``(0, 0.2, 0.5, 1)``.
    """
    if rank < 3:
        raise MtLoraError(f"rank {rank}: the three singular-value bands need a rank of at least 3")
    if len(fractions) != 4 or not 0 <= fractions[1] < fractions[2] < 1:
        raise MtLoraError(f"band fractions {tuple(fractions)}: need (0, top, mid, 1) with 0 <= top < mid < 1")
    b1 = max(1, math.floor(fractions[1] * rank))
    b2 = max(b1 + 1, math.floor(fractions[2] * rank))
    return [(0, b1), (b1, b2), (b2, rank)]


def expert_weight(sv: torch.Tensor) -> torch.Tensor:
    """The spectral regulariser's weight ``w(σ) = exp(-σ / (mean σ + 1e-8))`` (see :mod:`mtlora.losses`)."""
    return torch.exp(-sv / (sv.mean() + 1e-8))


# ----------------------------------------------------------------------------------------------- weights
def experts_from_adapter_dir(adapter_dir: str | Path) -> dict[str, list[torch.Tensor]]:
    """``{adapter name: [B_e (d_out, r_e) for each expert]}`` read from the safetensors file, in file order."""
    folder = resolve_adapter_dir(adapter_dir)
    cfg = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder)
    config = MtLoraConfig.from_dict(cfg, source=str(folder / "adapter_config.json"))
    router = config.router_class  # knows its B layout (MMoELoRA: experts own column blocks of one B)
    experts: dict[str, list[torch.Tensor]] = {}
    for key in sorted(k for k in tensors if k.endswith(_B_SUFFIX)):
        view = router.experts_view(tensors[key].float(), config.num_experts)  # (d_out, E, r_e)
        experts[key[: -len(_B_SUFFIX)]] = [view[:, i] for i in range(view.shape[1])]
    if not experts:
        raise CheckpointError(f"{folder / WEIGHTS_NAME}: no '*{_B_SUFFIX}' tensors (not an mtlora adapter)")
    return dict(sorted(experts.items(), key=lambda kv: _natural_key(kv[0])))


def experts_from_model(model: Any) -> dict[str, list[torch.Tensor]]:
    """Same as :func:`experts_from_adapter_dir` from a live :class:`~mtlora.model.MtLoraModel`."""
    return {
        name: [a.expert_B(e).detach().float().cpu() for e in range(a.num_experts)]
        for name, a in model.named_adapters()
    }


def _natural_key(name: str) -> list[Any]:
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------------- stats
@dataclass
class AdapterSpectrum:
    name: str
    sv: torch.Tensor  # (E, k) singular values, descending
    u: torch.Tensor  # (E, d_out, k) left singular vectors
    flat: torch.Tensor  # (E, d_out * r) flattened B_e (for the cross-expert correlation)


def adapter_spectra(experts: dict[str, list[torch.Tensor]]) -> list[AdapterSpectrum]:
    out = []
    for name, bs in experts.items():
        b = torch.stack([x.double() for x in bs])  # (E, d_out, r)
        u, s, _ = torch.linalg.svd(b, full_matrices=False)
        out.append(AdapterSpectrum(name, s, u, b.reshape(b.shape[0], -1)))
    return out


def band_conflict(spec: AdapterSpectrum, bands: Sequence[tuple[int, int]]) -> list[float] | None:
    """Per band: mean over k in the band and ordered pairs i≠j of ``σ_ik σ_jk |u_ikᵀ u_jk|`` (None if E=1)."""
    e = spec.sv.shape[0]
    if e < 2:
        return None
    off = ~torch.eye(e, dtype=torch.bool)
    per_k = []
    for k in range(spec.sv.shape[1]):
        cos = (spec.u[:, :, k] @ spec.u[:, :, k].T).abs()  # unit columns: |cos|
        weight = spec.sv[:, k, None] * spec.sv[None, :, k]
        per_k.append(float((cos * weight)[off].mean()))
    return [sum(per_k[a:b]) / (b - a) for a, b in bands]


def band_importance(spec: AdapterSpectrum, bands: Sequence[tuple[int, int]]) -> list[float]:
    """Per band: ``100 Σ_band σ / Σ σ`` averaged over experts (experts with B = 0 are skipped)."""
    total = spec.sv.sum(1)
    keep = total > 0
    if not bool(keep.any()):
        return [float("nan")] * len(bands)
    share = torch.stack([spec.sv[:, a:b].sum(1) for a, b in bands], 1)[keep] / total[keep, None]
    return (100 * share.mean(0)).tolist()


def pearson(flat: torch.Tensor) -> torch.Tensor:
    """E×E Pearson correlation of the flattened experts (0 where an expert is constant)."""
    x = flat - flat.mean(1, keepdim=True)
    n = x.norm(dim=1).clamp_min(1e-12)
    return (x @ x.T) / (n[:, None] * n[None, :])


def spectral_result(
    experts: dict[str, list[torch.Tensor]], label: str, layer: str | None = None
) -> dict[str, Any]:
    """Everything Fig. S2 and Fig. 1B plot, for one adapter (see the module docstring for the formulas)."""
    specs = adapter_spectra(experts)
    ranks = {s.sv.shape[1] for s in specs}
    if len(ranks) != 1:
        raise MtLoraError(f"adapters have different expert ranks {sorted(ranks)}; analyse them with --module")
    rank = ranks.pop()
    bands = sv_bands(rank)
    all_sv = torch.cat([s.sv for s in specs])  # (adapters*E, r)
    mean_sv = all_sv.mean(0)
    conflicts = [band_conflict(s, bands) for s in specs]
    importances = [band_importance(s, bands) for s in specs]
    conflict_raw = None
    conflict_pct = None
    if all(c is not None for c in conflicts):
        conflict_raw = torch.tensor(conflicts, dtype=torch.float64).mean(0)
        total = float(conflict_raw.sum())
        conflict_pct = (100 * conflict_raw / total).tolist() if total > 0 else None
        conflict_raw = conflict_raw.tolist()
    imp = torch.tensor(importances, dtype=torch.float64)
    imp = imp[~imp.isnan().any(1)]
    mid = select_layer([s.name for s in specs], layer)[0]
    mid_spec = next(s for s in specs if s.name == mid)
    picks = _spread([s.name for s in specs], 3)
    return {
        "figure": "Fig. S2 (SV spectra, w(sigma)) and Fig. 1B (band conflict / importance)",
        "label": label,
        "rank": rank,
        "num_experts": specs[0].sv.shape[0],
        "layers": [s.name for s in specs],
        "bands": [{"name": n, "start": a, "stop": b} for n, (a, b) in zip(BAND_NAMES, bands)],
        "mean_spectrum": mean_sv,
        "std_spectrum": all_sv.std(0, unbiased=False),
        "w_sigma": expert_weight(mean_sv),
        "band_mean_sv": [float(mean_sv[a:b].mean()) for a, b in bands],
        "per_layer_spectrum": {s.name: s.sv.mean(0) for s in specs},
        "per_layer_spectrum_shown": picks,
        "singular_values": {s.name: s.sv for s in specs},
        "conflict_raw": conflict_raw,
        "conflict_percent": conflict_pct,
        "conflict_per_layer": {s.name: c for s, c in zip(specs, conflicts)},
        "importance_percent": imp.mean(0).tolist() if len(imp) else None,
        "importance_per_layer": {s.name: i for s, i in zip(specs, importances)},
        "correlation_layer": mid,
        "expert_correlation": pearson(mid_spec.flat),
    }


def _spread(names: Sequence[str], n: int) -> list[str]:
    """First, middle and last (n evenly spaced) names: the released script shows layers 5, 15 and 25."""
    if len(names) <= n:
        return list(names)
    return [names[round(i * (len(names) - 1) / (n - 1))] for i in range(n)]


def compare_spectra(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two adapters' spectra and the per-index relative change ``(σ_b - σ_a) / σ_a`` (Fig. S2 comparison)."""
    if a["rank"] != b["rank"]:
        raise MtLoraError(f"cannot compare spectra of rank {a['rank']} and {b['rank']}")
    sa, sb = a["mean_spectrum"], b["mean_spectrum"]
    return {
        "figure": "Fig. S2 comparison: mean singular-value spectra",
        "labels": [a["label"], b["label"]],
        "rank": a["rank"],
        "bands": a["bands"],
        "mean_spectrum": {a["label"]: sa, b["label"]: sb},
        "std_spectrum": {a["label"]: a["std_spectrum"], b["label"]: b["std_spectrum"]},
        "w_sigma": {a["label"]: a["w_sigma"], b["label"]: b["w_sigma"]},
        "band_mean_sv": {a["label"]: a["band_mean_sv"], b["label"]: b["band_mean_sv"]},
        "relative_change": (sb - sa) / sa.clamp_min(1e-12),
    }


# ----------------------------------------------------------------------------------------------- figures
_BAND_COLORS = ("#4c72b0", "#dd8452", "#55a868")


def _k_range(band: dict[str, Any]) -> str:
    """1-based index range of a band for tick labels: ``k=1`` or ``k=2..4``."""
    a, b = band["start"] + 1, band["stop"]
    return f"k={a}" if a == b else f"k={a}..{b}"


def _shade_bands(ax: Any, bands: list[dict[str, Any]]) -> None:
    for band, color in zip(bands, _BAND_COLORS):
        ax.axvspan(band["start"] + 0.5, band["stop"] + 0.5, color=color, alpha=0.08, lw=0)


def plot_spectrum(res: dict[str, Any], path: Path) -> Path:
    """Fig. S2 for one adapter: mean spectrum ± std with w(σ), band means, a few layers, expert correlation."""
    import numpy as np

    fig, axes = new_figure(2, 2, figsize=(12, 8.5))
    k = np.arange(1, res["rank"] + 1)
    mean = np.array(res["mean_spectrum"].tolist())
    std = np.array(res["std_spectrum"].tolist())
    ax = axes[0]
    _shade_bands(ax, res["bands"])
    ax.plot(k, mean, marker="o", color="C0", label="mean σ_k (experts x layers)")
    ax.fill_between(k, mean - std, mean + std, color="C0", alpha=0.2, label="± 1 std")
    ax.set_xlabel("singular value index k")
    ax.set_ylabel("singular value σ_k of B_e")
    ax.set_title("(a) mean singular-value spectrum and w(σ)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(k, res["w_sigma"].tolist(), color="C3", ls="--", marker=".", label="w(σ) = exp(-σ/σ̄)")
    ax2.set_ylabel("spectral weight w(σ)", color="C3")
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper right")

    ax = axes[1]
    bars = ax.bar(
        range(3),
        res["band_mean_sv"],
        color=_BAND_COLORS,
        tick_label=[f"{b['name']}\n({_k_range(b)})" for b in res["bands"]],
    )
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel("mean σ in band")
    ax.set_title("(b) mean singular value per band")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[2]
    _shade_bands(ax, res["bands"])
    for name in res["per_layer_spectrum_shown"]:
        ax.plot(k, res["per_layer_spectrum"][name].tolist(), marker="o", ms=3, label=short_name(name))
    ax.set_xlabel("singular value index k")
    ax.set_ylabel("σ_k (mean over experts)")
    ax.set_title("(c) spectra of early / middle / late adapters")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[3]
    corr = np.array(res["expert_correlation"].tolist())
    im = ax.imshow(corr, cmap="coolwarm", vmin=-1, vmax=1)
    annotate_cells(ax, corr, im, max_cells=100)
    e = corr.shape[0]
    ax.set_xticks(range(e), [str(i) for i in range(e)])
    ax.set_yticks(range(e), [str(i) for i in range(e)])
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    ax.set_title(f"(d) Pearson correlation of flattened B_i, {short_name(res['correlation_layer'])}")
    fig.colorbar(im, ax=ax, label="correlation")
    fig.suptitle(
        f"Singular-value spectra of the experts' B (Fig. S2) - {res['label']}: rank {res['rank']}, "
        f"{res['num_experts']} experts, {len(res['layers'])} adapters"
    )
    return save_figure(fig, path)


def plot_spectrum_comparison(res: dict[str, Any], path: Path) -> Path:
    import numpy as np

    la, lb = res["labels"]
    k = np.arange(1, res["rank"] + 1)
    fig, axes = new_figure(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    _shade_bands(ax, res["bands"])
    ax2 = ax.twinx()
    for label, color in ((la, "C0"), (lb, "C1")):
        mean = np.array(res["mean_spectrum"][label].tolist())
        std = np.array(res["std_spectrum"][label].tolist())
        ax.plot(k, mean, marker="o", color=color, label=f"{label}: mean σ_k")
        ax.fill_between(k, mean - std, mean + std, color=color, alpha=0.15)
        ax2.plot(k, res["w_sigma"][label].tolist(), color=color, ls="--", lw=1, label=f"{label}: w(σ)")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("w(σ) (dashed)")
    ax.set_xlabel("singular value index k")
    ax.set_ylabel("σ_k (mean ± std over experts x layers)")
    ax.set_title("(a) mean spectra and w(σ)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    rel = 100 * np.array(res["relative_change"].tolist())
    ax.bar(k, rel, color=["C2" if v >= 0 else "C3" for v in rel])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("singular value index k")
    ax.set_ylabel("relative change of σ_k (%)")
    ax.set_title(f"(b) per-index change ({lb} - {la}) / {la}")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    x = np.arange(3)
    for i, (label, color) in enumerate(((la, "C0"), (lb, "C1"))):
        bars = ax.bar(x + (i - 0.5) * 0.38, res["band_mean_sv"][label], 0.38, color=color, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(x, [b["name"] for b in res["bands"]])
    ax.set_ylabel("mean σ in band")
    ax.set_title("(c) mean singular value per band")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Singular-value spectra of the experts' B: {la} vs {lb} (Fig. S2)")
    return save_figure(fig, path)


def plot_conflict(res: dict[str, Any], path: Path) -> Path:
    """Fig. 1B: conflict share vs SV importance per band, and the per-layer conflict share."""
    import numpy as np

    fig, (ax1, ax2) = new_figure(1, 2, figsize=(13, 4.8), width_ratios=[1, 1.4])
    names = [b["name"] for b in res["bands"]]
    x = np.arange(3)
    series = [("SV importance", res["importance_percent"], "#8c8c8c")]
    if res["conflict_percent"] is not None:
        series.insert(0, ("cross-expert conflict", res["conflict_percent"], "#c44e52"))
    width = 0.8 / len(series)
    for i, (label, values, color) in enumerate(series):
        if values is None:
            continue
        bars = ax1.bar(x + (i - (len(series) - 1) / 2) * width, values, width, color=color, label=label)
        ax1.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax1.set_xticks(x, [f"{n}\n({_k_range(b)})" for n, b in zip(names, res["bands"])])
    ax1.set_ylabel("share across bands (%)")
    ax1.set_title(
        "(a) conflict vs importance per SV band"
        if res["conflict_percent"] is not None
        else "(a) SV importance per band (no expert pairs: no conflict)"
    )
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3, axis="y")
    layers = res["layers"]
    per_layer = [res["conflict_per_layer"][n] for n in layers]
    if all(c is not None for c in per_layer):
        arr = np.array(per_layer, dtype=float)
        share = 100 * arr / np.clip(arr.sum(1, keepdims=True), 1e-30, None)
        ylabel, title = "conflict share (%)", "(b) conflict share per band, by adapter"
    else:
        share = np.array([res["importance_per_layer"][n] for n in layers], dtype=float)
        ylabel, title = "SV importance (%)", "(b) SV importance per band, by adapter (1 expert: no conflict)"
    xs = np.arange(len(layers))
    bottom = np.zeros(len(layers))
    for j, (n, color) in enumerate(zip(names, _BAND_COLORS)):
        ax2.bar(xs, share[:, j], bottom=bottom, color=color, label=n)
        bottom += share[:, j]
    ax2.set_xticks(xs, [short_name(n) for n in layers], rotation=45, ha="right", fontsize=8)
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("adapter (decoder layer . module)")
    ax2.set_ylabel(ylabel)
    ax2.set_title(title)
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="SV band", title_fontsize=8)
    fig.suptitle(
        f"Spectral conflict / SV-band importance of the experts (Fig. 1B) - {res['label']}, rank {res['rank']}"
    )
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- driver
def run_spectral(
    adapter_dir: str | Path,
    out_dir: Path,
    *,
    label: str,
    layer: str | None = None,
    module_filter: str | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write ``sv_spectrum`` (Fig. S2) and ``spectral_conflict`` (Fig. 1B) PNG + JSON; return the result too."""
    experts = experts_from_adapter_dir(adapter_dir)
    if module_filter:
        experts = {n: b for n, b in experts.items() if module_filter in n}
        if not experts:
            raise MtLoraError(f"--module {module_filter!r}: no adapter matches")
    res = spectral_result(experts, label, layer)
    spectrum = {
        "figure": "Fig. S2: singular-value spectra of B with w(sigma)",
        **_subset(res, _SPECTRUM_KEYS),
    }
    conflict = {"figure": "Fig. 1B: spectral conflict / SV-band importance", **_subset(res, _CONFLICT_KEYS)}
    written = {
        "sv_spectrum.json": write_json(out_dir / "sv_spectrum.json", spectrum),
        "sv_spectrum.png": plot_spectrum(res, out_dir / "sv_spectrum.png"),
        "spectral_conflict.json": write_json(out_dir / "spectral_conflict.json", conflict),
        "spectral_conflict.png": plot_conflict(res, out_dir / "spectral_conflict.png"),
    }
    return res, written


_COMMON_KEYS = ("label", "rank", "num_experts", "layers", "bands")
_SPECTRUM_KEYS = _COMMON_KEYS + (
    "mean_spectrum",
    "std_spectrum",
    "w_sigma",
    "band_mean_sv",
    "per_layer_spectrum",
    "singular_values",
    "correlation_layer",
    "expert_correlation",
)
_CONFLICT_KEYS = _COMMON_KEYS + (
    "conflict_percent",
    "conflict_raw",
    "importance_percent",
    "conflict_per_layer",
    "importance_per_layer",
)


def _subset(res: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: res[k] for k in keys}


def run_spectral_comparison(a: dict[str, Any], b: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    res = compare_spectra(a, b)
    return {
        "sv_spectrum_compare.json": write_json(out_dir / "sv_spectrum_compare.json", res),
        "sv_spectrum_compare.png": plot_spectrum_comparison(res, out_dir / "sv_spectrum_compare.png"),
    }
