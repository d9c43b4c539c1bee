"""Padding token rows into batches (right padding for teacher-forced forwards, left for HF ``generate``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtlora.data.tokenize import IGNORE_INDEX, resolve_pad_token_id

__all__ = ["pad_id", "pad_left", "pad_right"]


def pad_id(tokenizer: Any) -> int:
    """The id rows are padded with (:func:`mtlora.data.tokenize.resolve_pad_token_id`)."""
    return resolve_pad_token_id(tokenizer)


def pad_right(rows: Sequence[tuple[list[int], list[int]]], pad: int, device: Any = None) -> dict[str, Any]:
    """``(ids, labels)`` rows -> ``input_ids`` / ``labels`` (IGNORE padded) / ``attention_mask`` tensors."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    lab_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        lab_t[i, : len(labels)] = torch.tensor(labels)
        mask[i, : len(ids)] = 1
    return {"input_ids": ids_t.to(device), "labels": lab_t.to(device), "attention_mask": mask.to(device)}


def pad_left(prompts: Sequence[list[int]], pad: int, device: Any = None) -> tuple[Any, Any]:
    """Prompts -> left-padded ``(input_ids, attention_mask)``, the layout HF ``generate`` expects."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)
