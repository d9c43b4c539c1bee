"""Shared plumbing of the analyses: loading an adapter, preparing per-task batches, naming, JSON, figures.

Why a separate module: routing, spectral and gradient analyses all need the same "adapter + base model +
task-labelled batches" view of a run, and must agree on how an adapter is named on an axis (``L3.q_proj``)
and on which decoder layer it belongs to (the gradient comparison groups component adapters by layer so
that a component model and a block model share one x-axis).

Figures are drawn with matplotlib's object-oriented API on an explicit Agg canvas (no ``pyplot``), so the
analyses never change the global backend of a notebook or a GUI session that imports them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtlora import hub
from mtlora.atomic import atomic_file, write_text_atomic
from mtlora.errors import DataError, MtLoraError
from mtlora.hub import Loaded, load_model

logger = logging.getLogger("mtlora.analysis")

TOKEN_SELECTIONS = ("all", "prompt", "answer")


# ----------------------------------------------------------------------------------------------- naming
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Decoder-layer index in an adapter's host path (``model.layers.3.mlp`` -> 3), None if there is none."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def short_name(name: str) -> str:
    """Axis label for an adapter: ``model.layers.3.self_attn.q_proj`` -> ``L3.q_proj``."""
    idx = layer_index(name)
    tail = name.rsplit(".", 1)[-1]
    return f"L{idx}.{tail}" if idx is not None else name


def select_layer(names: Sequence[str], layer: str | None) -> list[str]:
    """Adapters of one decoder layer: ``layer`` is an index (default: the middle layer) or a name substring.

    The released Fig. S4 looks at "the middle layer"; for component adapters a layer has several adapters
    (``q_proj``, ``v_proj``), and each gets its own heatmap because their group counts differ.
    """
    if not names:
        return []
    if layer is not None and not layer.lstrip("-").isdigit():
        chosen = [n for n in names if layer in n]
        if not chosen:
            raise MtLoraError(f"--layer {layer!r}: no adapter name contains it (e.g. {names[0]!r})")
        return chosen
    indices = sorted({i for i in (layer_index(n) for n in names) if i is not None})
    if not indices:
        return [names[len(names) // 2]]
    if layer is None:
        target = indices[len(indices) // 2]
    else:
        target = int(layer)
        if target < 0:  # -1 = last layer with adapters
            if target < -len(indices):
                raise MtLoraError(f"--layer {layer}: only {len(indices)} layers have adapters")
            target = indices[target]
        if target not in indices:
            raise MtLoraError(f"--layer {layer}: no adapter in that layer (layers with adapters: {indices})")
    return [n for n in names if layer_index(n) == target]


# ----------------------------------------------------------------------------------------------- json
def clean_json(obj: Any) -> Any:
    """Make ``obj`` strict JSON: tensors to lists, non-finite floats to ``None`` (NaN is not valid JSON)."""
    if isinstance(obj, torch.Tensor):
        return clean_json(obj.detach().cpu().tolist())
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(clean_json(obj), indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------- figures
def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (7.0, 4.5), **kw: Any):
    """``(fig, axes)`` on an Agg canvas; ``axes`` is always a flat list."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig: Any, path: Path, dpi: int = 150) -> Path:
    with atomic_file(path) as tmp:  # the temporary name has no image suffix: name the format
        fig.savefig(tmp, dpi=dpi, facecolor="white", format=Path(path).suffix.lstrip(".") or "png")
    return path


def annotate_cells(ax: Any, values: Any, im: Any, fmt: str = "{:.2f}", max_cells: int = 120) -> None:
    """Print each cell's value on a heatmap (readable only for small matrices, hence ``max_cells``).

    The text is black or white by the luminance of the cell's own colour, so it stays legible on both
    ends of a diverging map and on its pale middle.
    """
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if arr.size > max_cells:
        return
    for (i, j), v in np.ndenumerate(arr):
        if not np.isfinite(v):
            continue
        r, g, b, _ = im.cmap(im.norm(v))
        color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=color)


# ----------------------------------------------------------------------------------------------- loading
def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """An mtlora adapter's config (a plain peft adapter is an error: the analyses need experts and routers)."""
    return hub.read_adapter_config(adapter_dir, mtlora_only=True)


#: What :func:`load_adapter` returns: :class:`mtlora.hub.Loaded` (``config``, ``label``, ``needs_task_ids`` and
#: ``named_adapters`` are there for the analyses; ``device`` is the device's name, as ``.to()`` takes it).
LoadedAdapter = Loaded


def default_label(config: Mapping[str, Any], fallback: str) -> str:
    """``block-<type>`` / ``component`` (what the paper compares), ``lora`` for plain LoRA, else ``fallback``."""
    if config.get("enable_block_adapter"):
        return f"block-{config.get('block_adapter_type', 'ffn')}"
    if config.get("method") == "lora":
        return "lora"
    return "component" if config.get("method") else fallback


def load_adapter(
    adapter_dir: str | Path,
    model_name_or_path: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    label: str | None = None,
    quantization: Any = None,
    trust_remote_code: bool = False,
) -> LoadedAdapter:
    """Base model + adapter in eval mode, all parameters frozen (gradients re-enable the adapter's).

    ``model_name_or_path`` defaults to the base model the adapter records (``mtlora train`` writes it), so a
    trained folder analyses with no other flag. fp32 on CPU (bf16 matmuls are slow there), bf16 on GPU.
    ``quantization`` (:class:`mtlora.quant.Quantization`) loads a 4/8-bit base (``--load_in_kbits``).
    """
    loaded = load_model(
        model_name_or_path,
        adapter_dir,
        device=device,
        dtype=dtype,
        mtlora_only=True,
        freeze=False,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
    )
    assert loaded.adapter_dir is not None
    loaded.label = label or default_label(loaded.config, loaded.adapter_dir.name)
    return loaded


# ----------------------------------------------------------------------------------------------- data
@dataclass
class TaskBatches:
    """Tokenised examples grouped by task, in task-id order.

    ``tasks[i]`` is the i-th task's name and ``model_task_ids[i]`` the id the model routes it with (the
    adapter's task map when it has one, so MMoELoRA sees the ids it was trained with).
    """

    tasks: list[str]
    model_task_ids: list[int]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    collator: Any = None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def num_examples(self) -> dict[str, int]:
        return {t: len(self.rows[t]) for t in self.tasks}

    def batches(
        self, task: str | None = None, batch_size: int = 4, max_batches: int | None = None
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Yield ``(collated batch, analysis task index per row)`` for one task or, with None, all tasks."""
        if task is None:
            rows = [(r, i) for i, t in enumerate(self.tasks) for r in self.rows[t]]
        else:
            index = self.tasks.index(task)
            rows = [(r, index) for r in self.rows[task]]
        for n, start in enumerate(range(0, len(rows), batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            chunk = rows[start : start + batch_size]
            batch = self.collator([r for r, _ in chunk])
            yield batch, torch.tensor([i for _, i in chunk], dtype=torch.long)


def _round_robin(per_task: dict[str, list[Any]], limit: int | None) -> dict[str, list[Any]]:
    """Take examples task by task in turn so a cap keeps every task represented (not the first few tasks)."""
    if limit is None:
        return per_task
    out: dict[str, list[Any]] = {t: [] for t in per_task}
    taken, depth = 0, 0
    longest = max((len(v) for v in per_task.values()), default=0)
    while taken < limit and depth < longest:
        for t, items in per_task.items():
            if depth < len(items) and taken < limit:
                out[t].append(items[depth])
                taken += 1
        depth += 1
    return {t: v for t, v in out.items() if v}


def prepare_task_batches(
    data: str | Path,
    tokenizer: Any,
    adapter_task_map: Mapping[str, int],
    *,
    max_examples: int | None = 500,
    max_seq_length: int = 512,
    template: str = "paper",
    seed: int = 42,
    known_tasks_only: bool = False,
) -> TaskBatches:
    """Load records, sample up to ``max_examples`` (balanced over tasks, seeded) and tokenise them.

    Task ids come from the adapter's task map when it has one; data tasks missing from it get new ids
    after the known ones (fine for token routers, which never see the id), or are dropped with a warning
    when ``known_tasks_only`` (MMoELoRA cannot route a task it has no embedding for).
    """
    from mtlora.data import DataCollatorForInstructions, build_task_map, load_records, tokenize_records

    records = load_records(data)
    data_map = build_task_map(records)
    task_map = dict(adapter_task_map)
    unknown = [t for t in data_map if t not in task_map]
    if unknown and task_map:
        if known_tasks_only:
            logger.warning(
                "dropping %d task(s) the adapter was not trained on: %s", len(unknown), unknown[:10]
            )
            records = [r for r in records if r["task_type"] in task_map]
            if not records:
                raise DataError(
                    f"{data}: none of the data's tasks is in the adapter's task map ({sorted(task_map)[:10]})"
                )
        else:
            for name in unknown:
                task_map[name] = len(task_map)
    elif not task_map:
        task_map = data_map
    per_task: dict[str, list[Any]] = {}
    for r in records:
        per_task.setdefault(str(r["task_type"]), []).append(r)
    rng = random.Random(seed)
    ordered = dict(sorted(per_task.items(), key=lambda kv: task_map[kv[0]]))
    for items in ordered.values():
        rng.shuffle(items)
    chosen = _round_robin(ordered, max_examples)
    flat = [r for items in chosen.values() for r in items]
    dataset = tokenize_records(flat, tokenizer, max_seq_length, template, task_map)
    by_id = {v: k for k, v in task_map.items()}
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in dataset:
        rows.setdefault(by_id[int(row["task_ids"])], []).append(row)
    tasks = [t for t in chosen if t in rows]
    return TaskBatches(
        tasks=tasks,
        model_task_ids=[task_map[t] for t in tasks],
        rows=rows,
        collator=DataCollatorForInstructions.from_tokenizer(tokenizer),
    )


def token_mask(batch: Mapping[str, torch.Tensor], which: str = "all") -> torch.Tensor:
    """Boolean ``(B, L)`` mask of the tokens an analysis averages over: real tokens, or prompt/answer only.

    The released Fig. 1A notebook fed prompts only (instruction + input); ``prompt`` reproduces that on
    the training format, ``answer`` looks at the supervised tokens, ``all`` at every non-padding token.
    """
    from mtlora.data import IGNORE_INDEX

    real = batch["attention_mask"].bool()
    if which == "all":
        return real
    if which == "prompt":
        return real & (batch["labels"] == IGNORE_INDEX)
    if which == "answer":
        return real & (batch["labels"] != IGNORE_INDEX)
    raise MtLoraError(f"--tokens {which!r}: use one of {', '.join(TOKEN_SELECTIONS)}")
