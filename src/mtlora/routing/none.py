"""The single-expert "router" of plain LoRA (E=1): nothing to route, but the same collaborator interface.

Having an object here (instead of ``router = None``) lets :class:`~mtlora.layers.MultiExpertLoRA` run one
forward for every method. It has no parameters, so it adds nothing to the state dict: saved adapters keep
their keys (``...mtlora.lora_A`` / ``.lora_B`` only).
"""

from __future__ import annotations

import torch

from mtlora.errors import MtLoraError
from mtlora.routing.base import Router, RoutingState


class NoRouter(Router):
    """One expert, no routing: ``z = h`` (times the adaptformer scale ``s_0`` if the style has one)."""

    kind = "none"
    is_routed = False
    static_source = "none"

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 1
        self.num_groups = 1

    @classmethod
    def build(cls, *, num_experts: int = 1, **_: object) -> NoRouter:  # type: ignore[override]
        if num_experts != 1:
            raise MtLoraError("router='none' needs exactly one expert")
        return cls()

    def forward(
        self, x2: torch.Tensor, state: RoutingState | None = None, batch_shape: tuple[int, ...] = ()
    ) -> None:
        return None

    def mix(self, h: torch.Tensor, probs: torch.Tensor | None, scales: torch.Tensor | None) -> torch.Tensor:
        return h if scales is None else h * scales.to(h.dtype)  # one expert: s_0 B_0 ReLU(A x)

    def collapse_B(self, b: torch.Tensor, probs: torch.Tensor | None, name: str) -> torch.Tensor:
        return b[:, 0, :].clone()  # already one (d_out, r) up-projection; any routing is irrelevant
