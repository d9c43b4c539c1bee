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

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import MtLoraError
from mtlora.routing import TaskRouter, TokenRouter


@dataclass
class RoutingState:
    """Per-model mutable state shared by all adapter modules of one wrapped model.

    The wrapper (:class:`mtlora.model.MtLoraModel`) sets it at the start of each forward/generate call, which
    is how task ids and the attention mask reach every adapted module without changing any library
    signature. The values stay until the next call so that a checkpointed layer recomputed during backward
    sees exactly what its original forward saw. ``collect_balance`` is a static switch (``enable_blc``).
    """

    enabled: bool = True
    task_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    collect_balance: bool = False
    collect_stats: bool = False
    balance_terms: list[torch.Tensor] = field(default_factory=list)
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def cv_squared(p: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``Var_unbiased(p) / (mean(p)^2 + eps)``, in fp32 (0 for one element)."""
    p = p.float()
    if p.numel() <= 1:
        return p.new_zeros(())
    return p.var() / (p.mean() ** 2 + eps)


class MultiExpertLoRA(nn.Module):
    """Additive multi-expert low-rank path ``Delta(x)`` (see the module docstring for the math)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_experts: int = 1,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        router: str = "token",
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
        if router not in ("none", "token", "task"):
            raise MtLoraError(f"unknown router kind {router!r}")
        if router == "none" and num_experts != 1:
            raise MtLoraError("router='none' needs exactly one expert")
        if router == "token" and num_experts == 1:
            router = "none"
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.num_experts = num_experts
        self.router_kind = router
        self.num_groups = num_groups if router == "token" else 1
        if style not in ("lowrank", "bottleneck", "adaptformer"):
            raise MtLoraError(f"unknown adapter style {style!r} (lowrank, bottleneck or adaptformer)")
        if style == "adaptformer" and router == "task":
            raise MtLoraError("the adaptformer style has token-routed or single experts, not a task gate")
        # AdaptFormer has no alpha/r: its learnable expert_scales play that role (released code, spec 5.3).
        self.scaling = 1.0 if style == "adaptformer" else float(scaling)
        self.style = style
        self.name = name
        self.state = state if state is not None else RoutingState()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Rank-split experts (MMoELoRA) keep one B column block per expert; otherwise each expert has r columns.
        b_experts, b_rank = (1, rank) if router == "task" else (num_experts, rank)
        if router == "task" and rank % num_experts != 0:
            raise MtLoraError(f"mmoelora rank {rank} is not divisible by {num_experts} experts")
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, b_experts, b_rank, device=device, dtype=dtype))
        self.router: nn.Module | None
        if router == "token":
            self.router = TokenRouter(
                in_features, num_experts, self.num_groups, top_k, device=device, dtype=dtype
            )
        elif router == "task":
            if not task_num:
                raise MtLoraError("mmoelora needs task_num (number of tasks) to build the task gate")
            self.router = TaskRouter(
                task_num,
                num_experts,
                task_embedding_dim,
                top_k,
                general_task=general_task,
                device=device,
                dtype=dtype,
            )
        else:
            self.router = None
        self.bottleneck_init = bottleneck_init
        self.adaptformer_init_scale = float(adaptformer_init_scale)
        # One learnable scalar per expert (adaptformer style only); None for the other styles, so their
        # state dicts and parameter counts are unchanged.
        self.expert_scales: nn.Parameter | None = None
        if style == "adaptformer":
            self.expert_scales = nn.Parameter(torch.empty(num_experts, device=device, dtype=dtype))
        # Fixed (G, E) routing weights that replace the router's output when set (static-routing evaluation
        # and export, see mtlora.export.static_routing); None = route with the router.
        self.fixed_routing: torch.Tensor | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        if self.router_kind == "task":  # MMoELoRA: A ~ N(0, 0.01^2), B = 0
            nn.init.normal_(self.lora_A, std=0.01)
        elif self.has_relu:
            nn.init.kaiming_uniform_(self.lora_A, nonlinearity="relu")
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.style == "bottleneck" and self.bottleneck_init == "paper":
            nn.init.normal_(self.lora_B, std=0.02)
        else:
            nn.init.zeros_(self.lora_B)
        if self.expert_scales is not None:
            nn.init.constant_(self.expert_scales, self.adaptformer_init_scale)

    # ------------------------------------------------------------------ routing
    def routing_probs(self, x2: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
        """fp32 routing probabilities ``(N, G, E)`` for flattened inputs ``x2`` of shape ``(N, d_in)``."""
        if self.fixed_routing is not None:
            return self.fixed_routing.float().unsqueeze(0).expand(x2.shape[0], *self.fixed_routing.shape)
        if self.router_kind == "token":
            assert isinstance(self.router, TokenRouter)
            return self.router(x2)
        assert isinstance(self.router, TaskRouter)
        task_ids = self.state.task_ids
        if task_ids is None and not self.router.general_task:
            raise MtLoraError(
                f"{self.name or 'mmoelora adapter'}: this adapter routes by task id; pass task_ids=<LongTensor (batch,)> "
                "to the model's forward()/generate()"
            )
        batch = batch_shape[0] if batch_shape else 1
        tokens = x2.shape[0] // max(batch, 1)
        return self.router(task_ids, batch, tokens)

    def _record(self, probs: torch.Tensor, batch_shape: tuple[int, ...]) -> None:
        """Append this layer's balance term (training only) and, if asked, detached routing statistics.

        What is computed depends only on static flags, the module's mode and the routing state, never on
        whether we are inside a checkpoint recomputation: non-reentrant checkpointing requires the recomputed
        forward to save exactly the same tensors as the original one.
        """
        st = self.state
        if self.router_kind != "token":
            return
        if st.collect_balance and self.training:
            st.balance_terms.append(cv_squared(self._mean_probs(probs, batch_shape)))
        if st.collect_stats:  # toggled per call: must save nothing for backward (see above)
            with torch.no_grad():
                ent = -(probs * probs.clamp_min(1e-10).log()).sum(-1).mean()
                st.stats[self.name] = {"mean_probs": self._mean_probs(probs, batch_shape), "entropy": ent}

    def _mean_probs(self, probs: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
        """Mean routing distribution over tokens (real tokens only if a matching mask is set) and groups."""
        p = probs.mean(dim=1)  # (N, E): average over groups, as the paper does
        mask = self.state.attention_mask
        if mask is not None and tuple(mask.shape) == tuple(batch_shape):
            w = mask.reshape(-1, 1).to(p.dtype)
            return (p * w).sum(0) / w.sum().clamp_min(1.0)
        return p.mean(0)

    def _router_shares_gemm(self, x2: torch.Tensor) -> bool:
        """Whether the token router's logits can come out of A's GEMM (one ``[A; W_router]`` matmul).

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
        return (
            self.router_kind == "token"
            and self.fixed_routing is None
            and not (self.training and isinstance(self.dropout, nn.Dropout))
            and x2.dtype == torch.float32
            and self.lora_A.dtype == torch.float32
            and not torch.is_autocast_enabled(x2.device.type)
            and isinstance(router, TokenRouter)
            and router.weight.dtype == torch.float32
            and not (router._forward_hooks or router._forward_pre_hooks or "forward" in vars(router))
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``Delta(x)``; or ``base + Delta(x)`` when the host's output ``base`` (same shape) is given.

        With ``base`` the last GEMM accumulates into it (``addmm``) instead of materialising ``Delta`` and then
        the sum: one (N, d_out) tensor and one pass over it fewer per adapted module and call.
        """
        out_dtype = x.dtype if base is None else base.dtype
        batch_shape = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:
            x2 = x2.to(self.lora_A.dtype)
        probs: torch.Tensor | None = None
        if self._router_shares_gemm(x2):  # [A; W_router] x: A and the router logits in one GEMM
            assert isinstance(self.router, TokenRouter)
            hl = F.linear(x2, torch.cat([self.lora_A, self.router.weight]))
            h, probs = hl[:, : self.rank], self.router.probs_from_logits(hl[:, self.rank :])
        else:
            h = F.linear(self.dropout(x2), self.lora_A)  # (N, r) - A once for all experts
        if self.has_relu:
            h = F.relu(h)
        if self.scaling != 1.0:
            h = h * self.scaling  # scale the (N, r) activations, not the (N, d_out) output: d_out/r cheaper
        d_out, n_tok = self.out_features, x2.shape[0]
        z, w = h, self.lora_B.view(d_out, -1)  # y = z w^T; (d_out, r) unless token-routed (d_out, E*r)
        if self.expert_scales is not None and self.router_kind == "none":
            z = h * self.expert_scales.to(h.dtype)  # one expert: s_0 B_0 ReLU(A x)
        if self.router_kind == "task":
            gate = self.routing_probs(x2, batch_shape)[:, 0, :].to(h.dtype)  # (N, E)
            z = h * gate.repeat_interleave(self.rank // self.num_experts, dim=-1)
        elif self.router_kind == "token":
            if probs is None:
                probs = self.routing_probs(x2, batch_shape)  # (N, G, E) fp32
            self._record(probs, batch_shape)
            g, er = self.num_groups, self.num_experts * self.rank
            # z = pi (x) h, (N, G*E*r), as a batched outer product: unlike a broadcast multiply, its backward
            # (two small batched matmuls) never materialises (N, G, E, r) temporaries
            ge = g * self.num_experts
            mix = probs.to(h.dtype)
            if self.expert_scales is not None:  # adaptformer: sum_e pi_e s_e B_e h, s_e folded into pi_e
                mix = mix * self.expert_scales.to(h.dtype)
            z = torch.bmm(mix.reshape(n_tok, ge, 1), h.unsqueeze(1)).view(n_tok, g * er)
            if g > 1:  # group g = dims [g*gs, (g+1)*gs): a contiguous view of B, one batched matmul
                b = self.lora_B.view(g, d_out // g, er)
                y = torch.bmm(z.view(n_tok, g, er).transpose(0, 1), b.transpose(1, 2)).transpose(0, 1)
                if base is not None:  # (N, G, gs) view: the sum is the single (N, d_out) copy it needs
                    return (base.reshape(n_tok, g, -1) + y.to(out_dtype)).reshape(base.shape)
                return y.reshape(*batch_shape, d_out).to(out_dtype)
        if base is not None and base.dtype == z.dtype:  # (under autocast: one bf16 rounding instead of two)
            return torch.addmm(base.reshape(n_tok, d_out), z, w.t()).view(base.shape)
        y = F.linear(z, w).reshape(*batch_shape, d_out).to(out_dtype)
        return y if base is None else base + y

    # ------------------------------------------------------------------ helpers
    @property
    def has_relu(self) -> bool:
        """Whether a ReLU follows A (bottleneck and adaptformer styles): such an adapter is not linear in x."""
        return self.style in ("bottleneck", "adaptformer")

    def expert_B(self, e: int) -> torch.Tensor:
        """Up-projection of expert ``e`` as a ``(d_out, r_e)`` view (for analysis, export, regularization)."""
        if self.router_kind == "task":
            rs = self.rank // self.num_experts
            return self.lora_B[:, 0, e * rs : (e + 1) * rs]
        return self.lora_B[:, e, :]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` for a single-expert low-rank adapter (merging)."""
        if self.router_kind != "none" or self.style != "lowrank":
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
