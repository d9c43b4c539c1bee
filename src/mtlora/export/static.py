"""Static routing math beyond :mod:`mtlora.routing.static`: weight deltas and exact task-gate routings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mtlora.errors import MtLoraError
from mtlora.routing.static import static_up_projection

if TYPE_CHECKING:
    from mtlora.layers import MultiExpertLoRA
    from mtlora.model import MtLoraModel


def static_delta_weight(adapter: MultiExpertLoRA, probs: torch.Tensor | None) -> torch.Tensor:
    """``scaling · B_t A`` (d_out, d_in) in fp32: the weight update a frozen routing gives (low-rank style)."""
    if adapter.style != "lowrank":
        raise MtLoraError(f"{adapter.name}: a bottleneck adapter (B ReLU(A x)) has no weight delta")
    return adapter.scaling * (static_up_projection(adapter, probs) @ adapter.lora_A.detach().float())


def task_gate_routing(model: MtLoraModel, task_id: int) -> dict[str, torch.Tensor]:
    """The exact per-task routing of routers that have one (MMoELoRA's task gate): ``(1, E)`` per adapter."""
    out: dict[str, torch.Tensor] = {}
    for name, adapter in model.named_adapters():
        probs = adapter.router.static_for_task(task_id)
        if probs is not None:
            out[name] = probs
    return out
