"""The multi-expert LoRA unit shared by every method, and the routing state it reads.

One module, :class:`MultiExpertLoRA`, computes the adapter's additive output Delta(x) for all methods:

    h     = A · drop(x)                     A: (r, d_in), computed ONCE per call
    h     = ReLU(h)                         (bottleneck and adaptformer styles)
    y     = (alpha / r) · sum_e  pi_e (.) B_e h
    y     = sum_e  pi_e (.) s_e B_e h       (adaptformer style: learnable per-expert scalars s_e, no alpha/r)

with E up-projections B_e (d_out, r) stored as ONE parameter ``lora_B`` of shape ``(d_out, E, r)``. That
layout makes the fused forward free of copies:

* scalar routing (G=1): ``z = (pi ⊗ h).reshape(N, E*r)`` and ``y = z @ lora_B.view(d_out, E*r)^T`` - one GEMM;
* fine-grained routing (G groups of gs = d_out/G dims): ``lora_B.view(G, gs, E*r)`` is a contiguous view,
  ``z`` is ``(G, N, E*r)`` and ``y`` is one batched matmul ``(G, N, E*r) x (G, E*r, gs)``;
* no router (plain LoRA, E=1): ``y = h @ lora_B.view(d_out, r)^T``;
* MMoELoRA splits the rank across experts: expert e owns rows ``[e*r/E, (e+1)*r/E)`` of A and the matching
  columns of B, so ``y = B (gate ⊙ h)`` with the per-sample gate repeated over each expert's rank slice.

The same FLOPs as a single LoRA of rank E*r, no Python loop over experts, and no ``(N, E, d_out)`` tensor of
per-expert outputs (which is what made the released code's per-expert loop slow and memory hungry). Two more
savings: when it is exact (fp32, dropout inactive, nothing hooked on the router) ``A`` and the token router share
one GEMM against ``[A; W_router]``; and the placement hooks pass the host's output as ``base`` so the last GEMM
accumulates into it (``addmm``) instead of materialising ``Delta(x)`` and then the sum.

Initialisation follows the paper code: A and the router kaiming-uniform(a=sqrt 5), every B zero, so the
adapted model equals the base model at init. The adaptformer style (the released ``MoEAdaptFormerBlockAdapter``)
uses kaiming-uniform(ReLU) for A, zero B and ``expert_scales`` initialised to ``adaptformer_init_scale``; the
scales fold into the routing weights (``pi_e s_e``), so it runs the same fused GEMMs as the other styles. Trainable parameters are kept in ``adapter_dtype`` (fp32 by
default); activations are cast to it unless autocast is active, and the output is cast back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import MtLoraError
from mtlora.routing import Router, RoutingState, StaticRouting, cv_squared, make_router

__all__ = ["STYLES", "MultiExpertLoRA", "RoutingState", "cv_squared"]

STYLES = ("lowrank", "bottleneck", "adaptformer")


class MultiExpertLoRA(nn.Module):
    """Additive multi-expert low-rank path ``Delta(x)`` (see the module docstring for the math).

    The router (:mod:`mtlora.routing`) is a collaborator, not a branch: it owns ``lora_B``'s layout, A's
    initialisation, the routing weights, how they mix ``h`` and how ``z`` is up-projected. ``router`` is a
    :class:`~mtlora.routing.Router` or a kind name (``none`` | ``token`` | ``task``) built from the keyword
    arguments here. It is always the child module ``router`` (with no parameters for one expert), so the
    saved keys are ``...mtlora.lora_A``, ``...mtlora.lora_B`` and ``...mtlora.router.<its parameters>``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_experts: int = 1,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        router: str | Router = "token",
        num_groups: int = 1,
        top_k: int | None = None,
        style: str = "lowrank",
        task_num: int | None = None,
        task_embedding_dim: int = 64,
        bottleneck_init: str = "zeros",
        adaptformer_init_scale: float = 0.1,
        general_task: bool = False,
        state: RoutingState | None = None,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(router, str):  # built first: its init draws from the RNG before A's, as it always has
            router = make_router(
                router,
                in_features=in_features,
                out_features=out_features,
                rank=rank,
                num_experts=num_experts,
                num_groups=num_groups,
                top_k=top_k,
                task_num=task_num,
                task_embedding_dim=task_embedding_dim,
                general_task=general_task,
                name=name,
                device=device,
                dtype=dtype,
            )
        elif router.num_experts != num_experts:
            raise MtLoraError(
                f"{name}: the router has {router.num_experts} experts, the adapter {num_experts}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.num_experts = num_experts
        if style not in STYLES:
            raise MtLoraError(f"unknown adapter style {style!r} (lowrank, bottleneck or adaptformer)")
        if style == "adaptformer" and not router.supports_expert_scales:
            raise MtLoraError("the adaptformer style has token-routed or single experts, not a task gate")
        # AdaptFormer has no alpha/r: its learnable expert_scales play that role (released code, spec 5.3).
        self.scaling = 1.0 if style == "adaptformer" else float(scaling)
        self.style = style
        self.name = name
        self.state = state if state is not None else RoutingState()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(
            torch.empty(router.b_shape(out_features, rank), device=device, dtype=dtype)
        )
        self.router: Router = router
        self.bottleneck_init = bottleneck_init
        self.adaptformer_init_scale = float(adaptformer_init_scale)
        # One learnable scalar per expert (adaptformer style only); None for the other styles, so their
        # state dicts and parameter counts are unchanged.
        self.expert_scales: nn.Parameter | None = None
        if style == "adaptformer":
            self.expert_scales = nn.Parameter(torch.empty(num_experts, device=device, dtype=dtype))
        # Fixed routing that stands in for the router while set (static-routing evaluation and export, see
        # mtlora.routing.static); a plain object, never part of the state dict. None = route with the router.
        self._override: StaticRouting | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        self.router.init_lora_A(self.lora_A, self.has_relu)
        if self.style == "bottleneck" and self.bottleneck_init == "paper":
            nn.init.normal_(self.lora_B, std=0.02)
        else:
            nn.init.zeros_(self.lora_B)
        if self.expert_scales is not None:
            nn.init.constant_(self.expert_scales, self.adaptformer_init_scale)

    # ------------------------------------------------------------------ routing
    @property
    def router_kind(self) -> str:
        """The router's kind (``none`` | ``token`` | ``task``), as in ``config_signature()``."""
        return self.router.kind

    @property
    def num_groups(self) -> int:
        return self.router.num_groups

    @property
    def fixed_routing(self) -> torch.Tensor | None:
        """Fixed ``(G, E)`` routing weights used instead of the router's output (None: route normally)."""
        o = self._override
        return o.probs if o is not None and not o.replaces_forward else None

    @fixed_routing.setter
    def fixed_routing(self, probs: torch.Tensor | None) -> None:
        self._override = None if probs is None else StaticRouting(self.router, probs)

    def routing_probs(self, x2: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor | None:
        """fp32 routing probabilities ``(N, G, E)`` for flattened inputs ``x2`` of shape ``(N, d_in)``."""
        router = self.router if self._override is None else self._override
        return router(x2, self.state, batch_shape)

    def _shared_router_weight(self, x2: torch.Tensor) -> torch.Tensor | None:
        """The router rows to stack under A for one ``[A; W_router]`` GEMM, or None when that is not exact.

        Both read the same ``x2`` (N, d_in): one GEMM reads it once instead of twice and, in backward,
        produces ``dL/dx`` from one GEMM instead of two summed ones (about 10% of the layer's time at
        LLaMA-7B shapes on CPU). It is exact only when A sees undropped input and both run in fp32 (the
        router never runs in reduced precision), and it is skipped when something observes or replaces
        the router's call (forward hooks, e.g. ``mtlora analyze``; fixed routing weights). The hook check
        also keeps it off under DeepSpeed ZeRO-3, whose per-module pre-forward hooks gather the router's
        sharded weight only when the router itself is called; an instance-level ``forward`` (accelerate's
        device-map/offload hooks replace ``module.forward``) does the same.
        """
        router = self.router
        w = router.fused_weight()
        if (
            w is not None
            and self._override is None
            and not (self.training and isinstance(self.dropout, nn.Dropout))
            and x2.dtype == torch.float32
            and self.lora_A.dtype == torch.float32
            and not torch.is_autocast_enabled(x2.device.type)
            and w.dtype == torch.float32
            and not (router._forward_hooks or router._forward_pre_hooks or "forward" in vars(router))
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        ):
            return w
        return None

    def _router_shares_gemm(self, x2: torch.Tensor) -> bool:
        """Whether the router's logits come out of A's GEMM (see :meth:`_shared_router_weight`)."""
        return self._shared_router_weight(x2) is not None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``Delta(x)``; or ``base + Delta(x)`` when the host's output ``base`` (same shape) is given.

        With ``base`` the last GEMM accumulates into it (``addmm``) instead of materialising ``Delta`` and then
        the sum: one (N, d_out) tensor and one pass over it fewer per adapted module and call.
        """
        override = self._override
        if override is not None and override.replaces_forward:  # collapsed static export form
            return override.layer_forward(self, x, base)
        router = self.router if override is None else override
        out_dtype = x.dtype if base is None else base.dtype
        batch_shape = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        if not torch.is_autocast_enabled(x.device.type):
            x2 = x2.to(self.lora_A.dtype)
        probs: torch.Tensor | None = None
        w_router = self._shared_router_weight(x2)
        if w_router is not None:  # [A; W_router] x: A and the router logits in one GEMM
            hl = F.linear(x2, torch.cat([self.lora_A, w_router]))
            h, probs = hl[:, : self.rank], self.router.probs_from_logits(hl[:, self.rank :])
        else:
            h = F.linear(self.dropout(x2), self.lora_A)  # (N, r) - A once for all experts
        if self.has_relu:
            h = F.relu(h)
        if self.scaling != 1.0:
            h = h * self.scaling  # scale the (N, r) activations, not the (N, d_out) output: d_out/r cheaper
        if probs is None and router.is_routed:
            probs = router(x2, self.state, batch_shape)  # (N, G, E) fp32
        router.observe(probs, self.state, batch_shape, self.training, self.name)
        z = router.mix(h, probs, self.expert_scales)
        return router.up_project(z, self.lora_B, base, batch_shape, out_dtype)

    # ------------------------------------------------------------------ helpers
    @property
    def has_relu(self) -> bool:
        """Whether a ReLU follows A (bottleneck and adaptformer styles): such an adapter is not linear in x."""
        return self.style in ("bottleneck", "adaptformer")

    def expert_B(self, e: int) -> torch.Tensor:
        """Up-projection of expert ``e`` as a ``(d_out, r_e)`` view (for analysis, export, regularization)."""
        return self.router.experts_view(self.lora_B, self.num_experts)[:, e]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` for a single-expert low-rank adapter (merging)."""
        if self.router.is_routed or self.style != "lowrank":
            raise MtLoraError(
                f"{self.name}: only a single-expert low-rank adapter has a static weight delta "
                f"(router={self.router_kind}, style={self.style}); routed adapters cannot be merged"
            )
        return self.scaling * (self.lora_B.view(self.out_features, self.rank) @ self.lora_A)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, experts={self.num_experts}, "
            f"router={self.router_kind}, groups={self.num_groups}, style={self.style}, scaling={self.scaling:g}"
        )

    def config_signature(self) -> dict[str, Any]:
        return {
            "in": self.in_features,
            "out": self.out_features,
            "rank": self.rank,
            "experts": self.num_experts,
            "router": self.router_kind,
            "groups": self.num_groups,
            "style": self.style,
            "scaling": self.scaling,
        }
