r"""Routing analyses: entropy per layer (Fig. 1A), expert usage per task, fine-grained routing maps (Fig. S4).

For every routed adapter we record the router's output ``π ∈ R^{N×G×E}`` (N tokens, G routing groups,
E experts) with a forward hook on the router module itself, so nothing is recomputed and the numbers are
exactly what the forward used. Only the selected tokens count (real tokens by default, see
:func:`mtlora.analysis.common.token_mask`). Per adapter and task t:

* entropy :math:`H_t = \mathrm{mean}_{n∈t,\,g} \; -\sum_e π_{nge} \log(π_{nge} + 10^{-10})` (nats; the
  released notebook's formula, per token and group); the uniform router has :math:`H = \ln E`;
* mean routing weights :math:`\bar π_t = \mathrm{mean}_{n∈t}\, π_n ∈ R^{G×E}` (the Fig. S4 heatmap);
* expert usage :math:`\mathrm{mean}_g \bar π_t ∈ R^E` (each row sums to 1) and the top-1 share, the
  fraction of (token, group) pairs whose largest weight is expert e.

"All tasks" values pool every selected token (token-weighted), like the released notebook's per-batch
average over a random sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mtlora.analysis.common import (
    LoadedAdapter,
    TaskBatches,
    annotate_cells,
    new_figure,
    save_figure,
    select_layer,
    short_name,
    token_mask,
    write_json,
)
from mtlora.cli_args import progress_enabled
from mtlora.errors import MtLoraError
from mtlora.inference import RoutingProbe

EPS = 1e-10


@dataclass
class AdapterRouting:
    """Per-task sums for one adapter (float64 so long runs do not lose precision)."""

    name: str
    num_groups: int
    num_experts: int
    prob_sum: torch.Tensor  # (T, G, E)
    top1_sum: torch.Tensor  # (T, G, E)
    entropy_sum: torch.Tensor  # (T,) sum over tokens of the group-mean entropy
    count: torch.Tensor  # (T,) tokens

    def group_probs(self, t: int | None = None) -> torch.Tensor:
        """Mean routing weights (G, E) of task ``t`` (None = all tasks pooled)."""
        if t is None:
            return self.prob_sum.sum(0) / self.count.sum().clamp_min(1)
        return self.prob_sum[t] / self.count[t].clamp_min(1)

    def entropy(self, t: int | None = None) -> float:
        if t is None:
            return float(self.entropy_sum.sum() / self.count.sum().clamp_min(1))
        return float(self.entropy_sum[t] / self.count[t].clamp_min(1))

    def top1(self, t: int | None = None) -> torch.Tensor:
        s = self.top1_sum.sum(0) if t is None else self.top1_sum[t]
        n = self.count.sum() if t is None else self.count[t]
        return (s / (n * self.num_groups).clamp_min(1)).sum(0)  # (E,)


@dataclass
class RoutingStats:
    label: str
    method: str
    tasks: list[str]
    tokens: str
    adapters: list[AdapterRouting]

    @property
    def num_experts(self) -> int:
        return self.adapters[0].num_experts


def collect_routing(
    loaded: LoadedAdapter,
    data: TaskBatches,
    *,
    batch_size: int = 4,
    tokens: str = "all",
    module_filter: str | None = None,
) -> RoutingStats:
    """Run the model over ``data`` and accumulate routing statistics of every routed adapter."""
    routed = [(n, a) for n, a in loaded.named_adapters(module_filter) if a.router.is_routed]
    if not routed:
        raise MtLoraError(
            f"{loaded.adapter_dir}: adapter method {loaded.method!r} has no router "
            f"({'no adapter matches --module' if module_filter else 'single-expert LoRA'}); nothing to analyse"
        )
    num_tasks = data.num_tasks
    stats: list[AdapterRouting] = []
    for name, a in routed:
        g, e = a.num_groups, a.num_experts
        z = dict(dtype=torch.float64)
        stats.append(
            AdapterRouting(
                name,
                g,
                e,
                torch.zeros(num_tasks, g, e, **z),
                torch.zeros(num_tasks, g, e, **z),
                torch.zeros(num_tasks, **z),
                torch.zeros(num_tasks, **z),
            )
        )
    by_name = {s.name: s for s in stats}

    def on_probs(name: str, probs: torch.Tensor, batch: Mapping[str, Any]) -> None:
        acc = by_name[name]
        task_of_token, keep = batch["_task_of_token"], batch["_keep"]
        if probs.shape[0] != keep.numel():
            raise MtLoraError(
                f"{acc.name}: router saw {probs.shape[0]} tokens but the batch has {keep.numel()}"
            )
        p = probs.double().cpu()[keep]  # (M, G, E)
        t = task_of_token[keep]
        ent = -(p * (p + EPS).log()).sum(-1).mean(-1)  # (M,)
        top = torch.nn.functional.one_hot(p.argmax(-1), acc.num_experts).double()
        acc.prob_sum.index_add_(0, t, p)
        acc.top1_sum.index_add_(0, t, top)
        acc.entropy_sum.index_add_(0, t, ent)
        acc.count.index_add_(0, t, torch.ones_like(ent))

    def batches() -> Any:
        for batch, task_index in data.batches(None, batch_size):
            mask = token_mask(batch, tokens)
            yield {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "task_ids": batch["task_ids"],
                "_keep": mask.reshape(-1),
                "_task_of_token": task_index[:, None].expand_as(mask).reshape(-1),
            }

    with RoutingProbe(routed, on_probs, hook="router") as probe:  # the figures' numbers, as always
        bar = tqdm(batches(), desc="routing", unit="batch", disable=not progress_enabled(), leave=False)
        probe.run(loaded.model, bar, device=loaded.device)
    if float(stats[0].count.sum()) == 0:
        raise MtLoraError(f"--tokens {tokens}: no token of the data was selected")
    return RoutingStats(loaded.label, loaded.method, list(data.tasks), tokens, stats)


# ----------------------------------------------------------------------------------------------- results
def entropy_result(rs: RoutingStats) -> dict[str, Any]:
    """Fig. 1A data: one entropy per adapter (overall and per task), their mean, and the ln E bound."""
    e = rs.num_experts
    per_layer = [a.entropy() for a in rs.adapters]
    return {
        "figure": "Fig. 1A: routing entropy per layer",
        "label": rs.label,
        "method": rs.method,
        "tokens": rs.tokens,
        "num_experts": e,
        "max_entropy": math.log(e),
        "layers": [a.name for a in rs.adapters],
        "entropy_per_layer": per_layer,
        "normalized_entropy_per_layer": [h / math.log(e) for h in per_layer],
        "entropy_per_task": {t: [a.entropy(i) for a in rs.adapters] for i, t in enumerate(rs.tasks)},
        "overall_mean": sum(per_layer) / len(per_layer),
        "num_tokens": {t: int(rs.adapters[0].count[i]) for i, t in enumerate(rs.tasks)},
    }


def usage_result(rs: RoutingStats) -> dict[str, Any]:
    """Expert usage: mean routing weight per task (averaged over adapters and groups) and per adapter."""
    per_task = {
        t: torch.stack([a.group_probs(i).mean(0) for a in rs.adapters]).mean(0)
        for i, t in enumerate(rs.tasks)
    }
    top1 = {t: torch.stack([a.top1(i) for a in rs.adapters]).mean(0) for i, t in enumerate(rs.tasks)}
    return {
        "figure": "expert usage per task",
        "label": rs.label,
        "method": rs.method,
        "tokens": rs.tokens,
        "tasks": rs.tasks,
        "num_experts": rs.num_experts,
        "usage_per_task": per_task,
        "top1_fraction_per_task": top1,
        "layers": [a.name for a in rs.adapters],
        "usage_per_layer": [a.group_probs().mean(0) for a in rs.adapters],
        "usage_per_layer_and_task": {
            a.name: {t: a.group_probs(i).mean(0) for i, t in enumerate(rs.tasks)} for a in rs.adapters
        },
    }


def fgr_result(rs: RoutingStats, name: str) -> dict[str, Any]:
    """Fig. S4 data for one adapter: the G×E mean routing weights, pooled and per task."""
    a = next(x for x in rs.adapters if x.name == name)
    return {
        "figure": "Fig. S4: fine-grained routing weights (groups x experts)",
        "label": rs.label,
        "layer": name,
        "num_groups": a.num_groups,
        "num_experts": a.num_experts,
        "tasks": rs.tasks,
        "mean": a.group_probs(),
        "mean_per_task": {t: a.group_probs(i) for i, t in enumerate(rs.tasks)},
    }


def routing_weights_pt(rs: RoutingStats) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """The released Fig. S4 script's input format ``{task: {layer_name: {"mean": Tensor[G, E]}}}``."""
    return {
        t: {a.name: {"mean": a.group_probs(i).float()} for a in rs.adapters} for i, t in enumerate(rs.tasks)
    }


# ----------------------------------------------------------------------------------------------- figures
def plot_entropy(res: dict[str, Any], path: Path) -> Path:
    import numpy as np

    fig, (ax,) = new_figure(figsize=(max(7.0, 0.45 * len(res["layers"]) + 3), 4.5))
    x = np.arange(len(res["layers"]))
    tasks = list(res["entropy_per_task"])
    cmap = _task_colors(len(tasks))
    for i, t in enumerate(tasks):
        ax.plot(x, res["entropy_per_task"][t], lw=1, alpha=0.6, color=cmap[i], label=t)
    ax.plot(x, res["entropy_per_layer"], lw=2.5, color="black", marker="o", label="all tasks")
    ax.axhline(res["max_entropy"], ls="--", color="grey", lw=1)
    ax.annotate(
        f"uniform routing: ln {res['num_experts']} = {res['max_entropy']:.2f}",
        (0, res["max_entropy"]),
        xytext=(2, 3),
        textcoords="offset points",
        fontsize=8,
        color="grey",
    )
    ax.set_xticks(x, [short_name(n) for n in res["layers"]], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, res["max_entropy"] * 1.15)
    ax.set_xlabel("adapter (decoder layer . module)")
    ax.set_ylabel("routing entropy H (nats)")
    ax.set_title(
        f"Routing entropy per layer (Fig. 1A) - {res['label']} ({res['method']}), "
        f"mean {res['overall_mean']:.3f} nats"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=min(4, len(tasks) + 1), loc="lower right")
    return save_figure(fig, path)


def plot_usage(res: dict[str, Any], path: Path) -> Path:
    import numpy as np

    tasks, e = res["tasks"], res["num_experts"]
    layers = res["layers"]
    by_task = np.array([res["usage_per_task"][t].tolist() for t in tasks])
    by_layer = np.array([u.tolist() for u in res["usage_per_layer"]])
    vmin = float(min(by_task.min(), by_layer.min()))
    vmax = float(max(by_task.max(), by_layer.max()))
    height = max(3.5, 0.3 * max(len(tasks), len(layers)) + 1.5)
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(max(9.0, 0.5 * e * 2 + 4), height))
    im = ax1.imshow(by_task, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    annotate_cells(ax1, by_task, im)
    ax1.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax1.set_title("per task (mean over layers and groups)")
    im2 = ax2.imshow(by_layer, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    annotate_cells(ax2, by_layer, im2)
    ax2.set_yticks(range(len(layers)), [short_name(n) for n in layers], fontsize=8)
    ax2.set_title("per layer (mean over tasks and groups)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(e), [str(i) for i in range(e)])
        ax.set_xlabel("expert")
    fig.colorbar(im, ax=[ax1, ax2], label="mean routing weight (uniform = 1/E)")
    fig.suptitle(f"Expert usage - {res['label']} ({res['method']}), uniform = {1 / e:.3f}")
    return save_figure(fig, path)


def plot_fgr(res: dict[str, Any], path: Path) -> Path:
    import numpy as np

    panels = [("all tasks", np.array(res["mean"].tolist()))] + [
        (t, np.array(m.tolist())) for t, m in res["mean_per_task"].items()
    ]
    g, e = res["num_groups"], res["num_experts"]
    nrows = math.ceil(len(panels) / 4)
    ncols = math.ceil(len(panels) / nrows)  # balanced rows: 5 panels -> 3 + 2, not 4 + 1
    cell = 0.45
    w = max(2.6, e * cell + 0.8)
    h = max(1.6, g * cell + 0.9)
    fig, axes = new_figure(nrows, ncols, figsize=(ncols * w + 1.2, nrows * h + 0.8))
    vmin = min(float(p.min()) for _, p in panels)
    vmax = max(float(p.max()) for _, p in panels)
    im = None
    for ax, (title, mat) in zip(axes, panels):
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        annotate_cells(ax, mat, im, max_cells=64)
        ax.set_title(title, fontsize=9, fontweight="bold" if title == "all tasks" else "normal")
        ax.set_xticks(range(e), [str(i) for i in range(e)], fontsize=7)
        ax.set_yticks(range(g), [str(i) for i in range(g)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("routing group", fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, label="mean routing weight", shrink=0.9)
    kind = f"Fine-grained routing weights, {g} groups" if g > 1 else "Routing weights, 1 group (no FGR)"
    fig.suptitle(f"{kind} x {e} experts, {short_name(res['layer'])} (Fig. S4) - {res['label']}")
    return save_figure(fig, path)


def _task_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------------------------- driver
def run_routing(
    loaded: LoadedAdapter,
    data: TaskBatches,
    out_dir: Path,
    *,
    batch_size: int = 4,
    tokens: str = "all",
    layer: str | None = None,
    module_filter: str | None = None,
) -> dict[str, Path]:
    """Write entropy, usage and per-layer FGR figures (+ JSON) and ``routing_weights.pt`` into ``out_dir``."""
    rs = collect_routing(loaded, data, batch_size=batch_size, tokens=tokens, module_filter=module_filter)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    ent = entropy_result(rs)
    written["routing_entropy.json"] = write_json(out_dir / "routing_entropy.json", ent)
    written["routing_entropy.png"] = plot_entropy(ent, out_dir / "routing_entropy.png")
    usage = usage_result(rs)
    written["expert_usage.json"] = write_json(out_dir / "expert_usage.json", usage)
    written["expert_usage.png"] = plot_usage(usage, out_dir / "expert_usage.png")
    for name in select_layer([a.name for a in rs.adapters], layer):
        res = fgr_result(rs, name)
        stem = f"fgr_routing_{short_name(name).replace('.', '_')}"
        written[f"{stem}.json"] = write_json(out_dir / f"{stem}.json", res)
        written[f"{stem}.png"] = plot_fgr(res, out_dir / f"{stem}.png")
    torch.save(routing_weights_pt(rs), out_dir / "routing_weights.pt")
    written["routing_weights.pt"] = out_dir / "routing_weights.pt"
    return written


__all__ = [
    "AdapterRouting",
    "RoutingStats",
    "collect_routing",
    "entropy_result",
    "fgr_result",
    "plot_entropy",
    "plot_fgr",
    "plot_usage",
    "routing_weights_pt",
    "run_routing",
    "usage_result",
]
