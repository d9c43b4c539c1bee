"""Result files and the end-of-run table.

Why: results are compared across runs, methods and papers, so every file carries its protocol, data hash,
model/adapter identity and settings next to the numbers; a number without those is how protocol mix-ups
(the most common complaint in this field) happen.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtlora.atomic import write_text_atomic
from mtlora.evaluation.scoring import mean


def category_scores(
    per_item: Mapping[str, tuple[int, int]], categories: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, float]]:
    """``(macro, micro)`` category accuracies from ``{name: (correct, total)}``.

    Macro = unweighted mean of the member accuracies (the paper's MMLU categories); micro = pooled
    questions (lm-evaluation-harness groups, ``weight_by_size``).
    """
    macro: dict[str, list[float]] = {}
    pooled: dict[str, list[int]] = {}
    for name, (correct, total) in per_item.items():
        cat = categories.get(name, "other")
        if total:
            macro.setdefault(cat, []).append(correct / total)
        acc = pooled.setdefault(cat, [0, 0])
        acc[0] += correct
        acc[1] += total
    macro_out = {c: mean(v) for c, v in sorted(macro.items())}
    micro_out = {c: (v[0] / v[1] if v[1] else 0.0) for c, v in sorted(pooled.items())}
    return macro_out, micro_out


def run_metadata(loaded: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    from mtlora import __version__

    return {
        "model_name_or_path": loaded.model_name_or_path,
        "lora_checkpoint": loaded.lora_checkpoint,
        "adapter_method": loaded.adapter_method,
        "device": loaded.device,
        "dtype": loaded.dtype,
        **settings,
        "versions": {
            "mtlora": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write atomically (a crash mid-write never leaves a truncated result file behind), umask permissions."""
    return write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def markdown_table(
    title: str,
    rows: Sequence[tuple[str, int, float]],
    summary: Sequence[tuple[str, int | None, float]],
    name_header: str,
) -> str:
    """``| name | n | accuracy |`` rows, a separator row, then the summary rows (averages, categories)."""
    width = max([len(name_header)] + [len(r[0]) for r in rows] + [len(s[0]) + 4 for s in summary])
    lines = [
        f"### {title}",
        "",
        f"| {name_header:<{width}} |     n | accuracy |",
        f"|{'-' * (width + 2)}|------:|---------:|",
    ]
    for name, n, acc in rows:
        lines.append(f"| {name:<{width}} | {n:>5} | {100 * acc:>7.2f}% |")
    for name, n, acc in summary:
        shown = f"{n:>5}" if n is not None else "     "
        bold = f"**{name}**"
        lines.append(f"| {bold:<{width}} | {shown} | {100 * acc:>7.2f}% |")
    return "\n".join(lines)


def summarize_rows(rows: Sequence[Mapping[str, Any]], category: str, num_few_shot: int) -> dict[str, Any]:
    """Per-task/subject summary shared by BBH and MMLU: accuracy, counts, category, truncation statistics."""
    correct = sum(bool(r["correct"]) for r in rows)
    return {
        "accuracy": correct / len(rows) if rows else 0.0,
        "correct": correct,
        "total": len(rows),
        "category": category,
        "prompts_with_fewer_exemplars": sum(r["num_exemplars"] < num_few_shot for r in rows),
        "questions_truncated": sum(r["question_truncated"] for r in rows),
    }
