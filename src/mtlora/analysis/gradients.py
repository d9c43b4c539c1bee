r"""Per-layer task-gradient cosine similarity (Fig. S3), the producer the released code lacks.

For each task t we run a few batches of that task only (model in eval mode: no dropout, no balance loss)
and accumulate the gradient of the mean task loss with respect to every adapter parameter (A, the B's and
the router), :math:`g_t = \nabla_θ \frac{1}{n_b}\sum_b L_t^{(b)}`. The parameters of all adapters in one
decoder layer form that layer's vector (a component model has ``q_proj`` and ``v_proj`` adapters per
layer, a block model one adapter per block), which puts component and block models on one layer axis.

* per layer l: :math:`S^{(l)}_{ij} = \cos(g^{(l)}_i, g^{(l)}_j)` (T×T), and the mean and std of its
  off-diagonal entries;
* ``similarity_matrix`` = :math:`\mathrm{mean}_l S^{(l)}`; ``overall_mean`` = its off-diagonal mean (= the
  mean of the per-layer means); ``full_similarity_matrix`` uses the concatenation of all layers instead.

The JSON follows the released Fig. S3 plotting scripts' schema
``{similarity_matrix, tasks, per_layer: {layer: {mean, std}}, overall_mean}`` (plus extra keys), and
:func:`compare_similarity` computes their "reduction" ``(mean_comp - mean_block) / mean_comp``.

Caveat (see docs/analyze.md): a *lower* positive cosine means the tasks' gradients are less aligned, not
that they conflict; conflict in the multi-task literature is a *negative* cosine. The two models also
have different parameters (different spaces), so the two numbers are descriptive, not a controlled test.
Memory: the per-task gradients are kept on the CPU in fp32, T × (trainable parameters) × 4 bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtlora.analysis.common import (
    LoadedAdapter,
    TaskBatches,
    annotate_cells,
    layer_index,
    new_figure,
    save_figure,
    short_name,
    write_json,
)
from mtlora.errors import MtLoraError


def _progress(items: Any, desc: str) -> Any:
    """A tqdm bar over ``items`` (one task's gradient batches take seconds); off after ``--no_progress``."""
    from tqdm.auto import tqdm

    from mtlora.cli_args import progress_enabled

    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True, disable=not progress_enabled())


def layer_key(name: str) -> str:
    """Group key of an adapter: its decoder-layer index, or its own name when it has none."""
    idx = layer_index(name)
    return str(idx) if idx is not None else name


def task_gradients(
    loaded: LoadedAdapter,
    data: TaskBatches,
    *,
    batch_size: int = 4,
    num_batches: int = 4,
    module_filter: str | None = None,
) -> dict[str, torch.Tensor]:
    """``{adapter name: (T, P) gradients}`` - one row per task, the gradient of its mean loss."""
    model = loaded.model
    adapters = loaded.named_adapters(module_filter)
    if not adapters:
        raise MtLoraError(f"--module {module_filter!r}: no adapter matches")
    params = {name: list(a.parameters()) for name, a in adapters}
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    out = {name: torch.zeros(data.num_tasks, sum(p.numel() for p in ps)) for name, ps in params.items()}
    model.eval()
    try:
        for t, task in enumerate(_progress(data.tasks, "task gradients")):
            for ps in params.values():
                for p in ps:
                    p.grad = None
            batches = list(data.batches(task, batch_size, num_batches))
            for batch, _ in batches:
                batch = {k: v.to(loaded.device) for k, v in batch.items()}
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise MtLoraError(f"task {task!r}: the loss is not finite ({float(loss)})")
                (loss / len(batches)).backward()
            for name, ps in params.items():
                out[name][t] = torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p))
                        .detach()
                        .float()
                        .cpu()
                        .reshape(-1)
                        for p in ps
                    ]
                )
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None
    return out


def cosine_matrix(g: torch.Tensor) -> torch.Tensor:
    """T×T cosine similarity of the rows of ``g`` (a zero row gives 0, not NaN)."""
    g = g.double()
    n = g.norm(dim=1).clamp_min(1e-30)
    return (g @ g.T) / (n[:, None] * n[None, :])


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The strictly upper-triangular entries (each unordered task pair once)."""
    i, j = torch.triu_indices(m.shape[0], m.shape[1], offset=1)
    return m[i, j]


def similarity_result(grads: dict[str, torch.Tensor], tasks: list[str], label: str) -> dict[str, Any]:
    """Per-layer and overall task-gradient cosine similarity in the released Fig. S3 schema (+ extras)."""
    if len(tasks) < 2:
        raise MtLoraError(f"gradient similarity needs at least two tasks in the data, got {tasks}")
    groups: dict[str, list[str]] = {}
    for name in grads:
        groups.setdefault(layer_key(name), []).append(name)
    per_layer: dict[str, dict[str, Any]] = {}
    mats = []
    for key, names in groups.items():
        m = cosine_matrix(torch.cat([grads[n] for n in names], dim=1))
        off = off_diagonal(m)
        per_layer[key] = {
            "mean": float(off.mean()),
            "std": float(off.std(unbiased=False)),
            "adapters": names,
            "similarity_matrix": m,
        }
        mats.append(m)
    sim = torch.stack(mats).mean(0)
    full = cosine_matrix(torch.cat(list(grads.values()), dim=1))
    norms = {t: float(torch.cat([g[i] for g in grads.values()]).norm()) for i, t in enumerate(tasks)}
    return {
        "figure": "Fig. S3: per-layer task-gradient cosine similarity",
        "label": label,
        "tasks": tasks,
        "similarity_matrix": sim,
        "per_layer": per_layer,
        "overall_mean": float(off_diagonal(sim).mean()),
        "overall_std": float(off_diagonal(sim).std(unbiased=False)),
        "full_similarity_matrix": full,
        "full_mean": float(off_diagonal(full).mean()),
        "gradient_norm_per_task": norms,
    }


def compare_similarity(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Fig. S3 comparison of two adapters (e.g. component vs block) with the released "reduction"."""
    ma, mb = a["overall_mean"], b["overall_mean"]
    reduction = (ma - mb) / ma if abs(ma) > 1e-12 else float("nan")
    layers = sorted(set(a["per_layer"]) | set(b["per_layer"]), key=_layer_sort_key)
    return {
        "figure": "Fig. S3 comparison: task-gradient cosine similarity",
        "labels": [a["label"], b["label"]],
        "tasks": a["tasks"],
        "overall_mean": {a["label"]: ma, b["label"]: mb},
        "reduction": reduction,
        "reduction_definition": "(mean_a - mean_b) / mean_a of the mean off-diagonal cosine similarity",
        "caveat": "lower positive cosine = less aligned task gradients, not negative (conflicting) ones",
        "per_layer": {
            key: {
                lab: {k: r["per_layer"][key][k] for k in ("mean", "std")}
                for lab, r in ((a["label"], a), (b["label"], b))
                if key in r["per_layer"]
            }
            for key in layers
        },
    }


def _layer_sort_key(key: str) -> tuple[int, int, str]:
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


# ----------------------------------------------------------------------------------------------- figures
def _masked(m: Any) -> Any:
    import numpy as np

    arr = np.array(m.tolist() if hasattr(m, "tolist") else m, dtype=float)
    np.fill_diagonal(arr, np.nan)
    return arr


def _heatmap(ax: Any, arr: Any, tasks: list[str], title: str, vlim: float) -> Any:
    from matplotlib import colormaps

    cmap = colormaps["coolwarm"].with_extremes(bad="#dddddd")
    im = ax.imshow(arr, cmap=cmap, vmin=-vlim, vmax=vlim)
    annotate_cells(ax, arr, im, max_cells=150)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_title(title, fontsize=10)
    return im


def _vlim(*arrs: Any) -> float:
    import numpy as np

    vals = np.concatenate([a[np.isfinite(a)] for a in arrs])
    return float(max(np.abs(vals).max(), 1e-6)) if vals.size else 1.0


def plot_similarity(res: dict[str, Any], path: Path) -> Path:
    import numpy as np

    tasks = res["tasks"]
    arr = _masked(res["similarity_matrix"])
    keys = sorted(res["per_layer"], key=_layer_sort_key)
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(13, 5.2), width_ratios=[1, 1.2])
    im = _heatmap(ax1, arr, tasks, "(a) cosine similarity, mean over layers (diagonal omitted)", _vlim(arr))
    fig.colorbar(im, ax=ax1, label="cos(g_i, g_j)", shrink=0.85)
    means = np.array([res["per_layer"][k]["mean"] for k in keys])
    stds = np.array([res["per_layer"][k]["std"] for k in keys])
    xs = np.arange(len(keys))
    ax2.bar(xs, means, yerr=stds, capsize=3, color="C0", alpha=0.85)
    ax2.axhline(0, color="black", lw=0.8)
    ax2.axhline(
        res["overall_mean"], color="C3", ls="--", lw=1, label=f"overall mean {res['overall_mean']:.3f}"
    )
    ax2.set_xticks(xs, [f"L{k}" if k.isdigit() else short_name(k) for k in keys], fontsize=8)
    ax2.set_xlabel("decoder layer")
    ax2.set_ylabel("mean off-diagonal cosine (± std over task pairs)")
    ax2.set_title("(b) per-layer task-gradient similarity")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Task-gradient cosine similarity (Fig. S3) - {res['label']}, {len(tasks)} tasks")
    return save_figure(fig, path)


def plot_comparison(cmp: dict[str, Any], a: dict[str, Any], b: dict[str, Any], path: Path) -> Path:
    import numpy as np

    la, lb = cmp["labels"]
    tasks = cmp["tasks"]
    keys = list(cmp["per_layer"])
    fig, axes = new_figure(1, 3, figsize=(17, 5.2), width_ratios=[1.3, 1, 1])
    ax = axes[0]
    xs = np.arange(len(keys))
    for off, (lab, color) in zip((-0.1, 0.1), ((la, "C0"), (lb, "C1"))):
        pts = [(i, cmp["per_layer"][k][lab]) for i, k in enumerate(keys) if lab in cmp["per_layer"][k]]
        if not pts:
            continue
        x = np.array([i for i, _ in pts]) + off
        m = np.array([p["mean"] for _, p in pts])
        s = np.array([p["std"] for _, p in pts])
        ax.errorbar(
            x,
            m,
            yerr=s,
            marker="o",
            capsize=3,
            color=color,
            label=f"{lab} (mean {cmp['overall_mean'][lab]:.3f})",
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(xs, [f"L{k}" if k.isdigit() else short_name(k) for k in keys], fontsize=8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean off-diagonal cosine (± std)")
    red = cmp["reduction"]
    red_text = f"{100 * red:.1f}%" if red == red else "n/a"
    ax.set_title(f"(a) per layer; reduction (a-b)/a = {red_text}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    arr_a, arr_b = _masked(a["similarity_matrix"]), _masked(b["similarity_matrix"])
    vlim = _vlim(arr_a, arr_b)
    _heatmap(axes[1], arr_a, tasks, f"(b) {la}", vlim)
    im = _heatmap(axes[2], arr_b, tasks, f"(c) {lb}", vlim)
    fig.colorbar(im, ax=axes[1:], label="cos(g_i, g_j), mean over layers", shrink=0.85)
    fig.suptitle(
        f"Task-gradient cosine similarity: {la} vs {lb} (Fig. S3). "
        "Lower similarity = less aligned, not necessarily less conflict"
    )
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- driver
def run_gradients(
    loaded: LoadedAdapter,
    data: TaskBatches,
    out_dir: Path,
    *,
    batch_size: int = 4,
    num_batches: int = 4,
    module_filter: str | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    grads = task_gradients(
        loaded, data, batch_size=batch_size, num_batches=num_batches, module_filter=module_filter
    )
    res = similarity_result(grads, list(data.tasks), loaded.label)
    res["num_batches_per_task"] = num_batches
    res["batch_size"] = batch_size
    written = {
        "gradient_similarity.json": write_json(out_dir / "gradient_similarity.json", res),
        "gradient_similarity.png": plot_similarity(res, out_dir / "gradient_similarity.png"),
    }
    return res, written


def align_tasks(res: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """``res`` with its matrices permuted to the task order ``tasks`` (two adapters' task maps may differ)."""
    if res["tasks"] == tasks:
        return res
    if sorted(res["tasks"]) != sorted(tasks):
        raise MtLoraError(f"the two adapters saw different tasks ({tasks} vs {res['tasks']})")
    perm = torch.tensor([res["tasks"].index(t) for t in tasks])

    def p(m: torch.Tensor) -> torch.Tensor:
        return m[perm][:, perm]

    out = dict(res, tasks=list(tasks))
    out["similarity_matrix"] = p(res["similarity_matrix"])
    out["full_similarity_matrix"] = p(res["full_similarity_matrix"])
    out["per_layer"] = {
        k: dict(v, similarity_matrix=p(v["similarity_matrix"])) for k, v in res["per_layer"].items()
    }
    return out


def run_gradient_comparison(a: dict[str, Any], b: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    b = align_tasks(b, a["tasks"])
    cmp = compare_similarity(a, b)
    return {
        "gradient_similarity_compare.json": write_json(out_dir / "gradient_similarity_compare.json", cmp),
        "gradient_similarity_compare.png": plot_comparison(
            cmp, a, b, out_dir / "gradient_similarity_compare.png"
        ),
    }
