"""Static (frozen) routing: fixed per-task routing weights in place of a router's output (export).

Why: a token router prevents merging and no server runs router + experts, so ``mtlora export`` freezes each
task's routing to constant weights ``π̄`` ``(G, E)`` and collapses the experts into one up-projection
``B_t = Σ_e diag(π̄_e) B_e``. Evaluating that static model must use exactly the adapter's own math, so the
frozen routing is a router-like collaborator of :class:`~mtlora.layers.MultiExpertLoRA`:

* :class:`StaticRouting` is a plain Python object (not an ``nn.Module``: it never enters the state dict and
  is never hooked) held in the layer's ``_override`` slot while it applies;
* ``collapse=False`` runs the fused multi-expert forward unchanged with the router's output replaced by the
  fixed weights (what ``MultiExpertLoRA.fixed_routing`` sets);
* ``collapse=True`` replaces the layer's forward by ``scaling · B_t act(A x)``, in the same operation order
  as peft's LoRA layer (``lora_B(lora_A(x)) * scaling``) and the block export's loader, so the static model
  and the exported artefact agree to rounding at worst (bit for bit in the CPU tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from mtlora.errors import MtLoraError
from mtlora.routing.base import Router, RoutingState


def static_up_projection(adapter: Any, probs: torch.Tensor | None) -> torch.Tensor:
    """``Σ_e diag(π̄_e) B_e`` of a :class:`~mtlora.layers.MultiExpertLoRA` as one ``(d_out, r)`` fp32 matrix.

    ``probs`` is ``(G, E)`` (None: an adapter without a router). For a token router output dim j of group g
    gets weight ``probs[g, e]`` on expert e; for MMoELoRA's task gate (``probs`` ``(1, E)``) expert e scales
    its rank slice of B's columns.
    """
    b = adapter.lora_B.detach().float()  # (d_out, E_b, r)
    if adapter.expert_scales is not None:  # adaptformer: expert e's up-projection is s_e B_e
        b = b * adapter.expert_scales.detach().float().to(b.device)[None, :, None]
    return adapter.router.collapse_B(b, probs, adapter.name)


class StaticRouting:
    """Fixed routing weights ``probs`` ``(G, E)`` standing in for ``router`` (see the module docstring)."""

    def __init__(self, router: Router, probs: torch.Tensor, *, b_static: torch.Tensor | None = None) -> None:
        self.router = router
        self.probs = probs
        #: The collapsed up-projection (``collapse=True``): the layer's whole forward is replaced.
        self.b_static = b_static

    @property
    def replaces_forward(self) -> bool:
        return self.b_static is not None

    @property
    def is_routed(self) -> bool:
        return self.router.is_routed

    def __call__(
        self, x2: torch.Tensor, state: RoutingState | None = None, batch_shape: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """The fixed weights for every token, ``(N, G, E)`` fp32 (an expanded view, no copy)."""
        return self.probs.float().unsqueeze(0).expand(x2.shape[0], *self.probs.shape)

    def fused_weight(self) -> None:
        return None

    def mix(self, h: torch.Tensor, probs: torch.Tensor | None, scales: torch.Tensor | None) -> torch.Tensor:
        return self.router.mix(
            h, probs, scales
        )  # the wrapped router's layout (e.g. the task gate's rank split)

    def up_project(
        self,
        z: torch.Tensor,
        lora_B: torch.Tensor,
        base: torch.Tensor | None,
        batch_shape: tuple[int, ...],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return self.router.up_project(z, lora_B, base, batch_shape, out_dtype)

    def observe(
        self,
        probs: torch.Tensor | None,
        state: RoutingState,
        batch_shape: tuple[int, ...],
        training: bool,
        name: str,
    ) -> None:
        # statistics collected under a frozen routing describe the routing actually used
        self.router.observe(probs, state, batch_shape, training, name)

    def layer_forward(self, layer: Any, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``scaling · B_t act(A x)`` (+ ``base``): the layer's own forward with the experts collapsed to ``B_t``."""
        assert self.b_static is not None
        out_dtype = x.dtype
        batch_shape = tuple(x.shape[:-1])
        x2 = x.reshape(-1, layer.in_features)
        if not torch.is_autocast_enabled(x.device.type):
            x2 = x2.to(layer.lora_A.dtype)
        h = F.linear(layer.dropout(x2), layer.lora_A)
        if layer.has_relu:
            h = F.relu(h)
        y = F.linear(h, self.b_static) * layer.scaling
        y = y.reshape(*batch_shape, layer.out_features).to(out_dtype if base is None else base.dtype)
        return y if base is None else base + y


@contextlib.contextmanager
def static_routing(
    model: Any, routing: Mapping[str, torch.Tensor], *, collapse: bool = True
) -> Iterator[None]:
    """Run ``model`` (an :class:`~mtlora.model.MtLoraModel`) with every router frozen to fixed weights
    (``routing[name]``: ``(G, E)``).

    * ``collapse=True`` (default): each routed adapter computes ``scaling · B_t A x`` with the collapsed
      up-projection ``B_t = Σ_e diag(π̄_e) B_e`` (snapshot at entry), i.e. exactly what the export ships;
    * ``collapse=False``: the fused multi-expert forward runs unchanged with the router's output replaced
      by the fixed weights (``MultiExpertLoRA.fixed_routing``) - an independent computation of the same
      function (differs by float rounding).

    Either way only the adapters' ``_override`` slots are set (cleared on exit); no class changes.
    """
    swapped: list[Any] = []
    try:
        for name, adapter in model.named_adapters():
            if not adapter.router.is_routed:
                continue
            if name not in routing:
                raise MtLoraError(f"{name}: no static routing weights given for this adapter")
            probs = routing[name].to(device=adapter.lora_A.device, dtype=torch.float32)
            if tuple(probs.shape) != (adapter.num_groups, adapter.num_experts):
                raise MtLoraError(
                    f"{name}: static routing has shape {tuple(probs.shape)}, expected "
                    f"({adapter.num_groups}, {adapter.num_experts})"
                )
            b_static = None
            if collapse:
                b_static = static_up_projection(adapter, probs).to(adapter.lora_B.dtype)
            adapter._override = StaticRouting(adapter.router, probs, b_static=b_static)
            swapped.append(adapter)
        yield
    finally:
        for adapter in swapped:
            adapter._override = None
