"""Per-task static routing estimated on calibration records (token routers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mtlora.dtypes import model_device
from mtlora.errors import MtLoraError
from mtlora.inference import RoutingProbe, encode_examples, pad_id, pad_right

if TYPE_CHECKING:
    from mtlora.model import MtLoraModel


@dataclass
class TaskRouting:
    """Static routing of one task: ``probs[adapter name]`` is ``(G, E)`` (empty for an unrouted adapter)."""

    probs: dict[str, torch.Tensor]
    source: str  # "calibration" | "task_gate" | "none"
    examples: int = 0
    tokens: int = 0


def estimate_task_routing(
    model: MtLoraModel,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    max_seq_length: int = 512,
    template: str = "paper",
    batch_size: int = 8,
) -> TaskRouting:
    """Mean routing weights ``(G, E)`` per token-routed adapter over the real tokens of ``records``.

    Why a routing probe instead of ``collect_routing_stats``: that one averages over groups, and fine-grained
    routing needs one mean per group. The probe (:class:`mtlora.inference.RoutingProbe`) sees each router's
    ``(N, G, E)`` output (the router is deterministic and sees no dropout); it is accumulated weighted by the
    attention mask, so padding never enters the mean.
    """
    routed = [(n, a) for n, a in model.named_adapters() if a.router.needs_calibration]
    if not routed:
        return TaskRouting(probs={}, source="none")
    examples = encode_examples(records, tokenizer, max_seq_length, template)
    if not examples:
        raise MtLoraError("no calibration example survives tokenisation (targets truncated away?)")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}

    def on_probs(name: str, probs: torch.Tensor, batch: Mapping[str, Any]) -> None:
        p = probs.double()
        mask = batch["attention_mask"]
        if mask.numel() == p.shape[0]:
            w = mask.reshape(-1).to(p)
        else:
            w = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
        s = (p * w[:, None, None]).sum(0)
        sums[name] = sums[name] + s if name in sums else s
        counts[name] = counts.get(name, 0.0) + float(w.sum())

    device, pad = model_device(model), pad_id(tokenizer)
    batches = [
        pad_right([(e.ids, e.labels) for e in examples[i : i + batch_size]], pad, device)
        for i in range(0, len(examples), batch_size)
    ]
    with RoutingProbe(routed, on_probs) as probe:
        probe.run(
            model, ({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches)
        )
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    probs = {n: (sums[n] / max(counts[n], 1.0)).float().cpu() for n, _ in routed}
    return TaskRouting(probs=probs, source="calibration", examples=len(examples), tokens=tokens)
