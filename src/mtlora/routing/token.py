"""Token routers (HydraLoRA, mtLoRA): a bias-free ``Linear(d_in -> E*G)`` on each token's input.

The logits are laid out **group-major**: logit ``j = g*E + e``, i.e. ``view(..., G, E)``, and the softmax
runs over experts inside each group. Group g covers output dimensions ``[g*gs, (g+1)*gs)`` with
``gs = d_out / G``. G=1 is the scalar router (one weight per expert); G>1 is mtLoRA's fine-grained routing.
``top_k`` keeps the k largest logits per (token, group) and renormalises over them (others get 0).

Layout of the fused forward (see :mod:`mtlora.layers`): ``z = π ⊗ h`` is ``(N, G*E*r)``; with G=1 the
up-projection is one GEMM against ``lora_B.view(d_out, E*r)``, with G>1 one batched matmul against the
contiguous view ``lora_B.view(G, gs, E*r)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import ConfigError
from mtlora.routing.base import Router, RoutingState, cv_squared, masked_mean_probs, softmax_topk
from mtlora.routing.none import NoRouter


def num_groups_for(out_features: int, group_size: int | None, fine_grained: bool, where: str = "") -> int:
    """Number of routing groups G; a group size that does not divide ``out_features`` is an error."""
    if not fine_grained:
        return 1
    gs = group_size if group_size is not None else max(out_features // 2, 1)
    if out_features % gs != 0:
        raise ConfigError(
            f"routing_group_size={gs} does not divide the output size {out_features}"
            + (f" of {where}" if where else "")
            + f"; valid group sizes are divisors of {out_features}"
        )
    return out_features // gs


class TokenRouter(Router):
    """Token-level router: scalar (``num_groups=1``) or fine-grained (``num_groups=G``).

    ``TokenRouter(d_in, E, G)`` with G > 1 gives a :class:`FineGrainedTokenRouter` (same parameters and kind;
    only the up-projection differs), so either spelling builds the right object.
    """

    kind = "token"
    needs_calibration = True
    has_balance = True
    static_source = "calibration"

    def __new__(cls, in_features: int = 0, num_experts: int = 1, num_groups: int = 1, *args: Any, **kw: Any):
        if cls is TokenRouter and num_groups > 1:
            cls = FineGrainedTokenRouter
        return super().__new__(cls)

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        num_groups: int = 1,
        top_k: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_groups = num_groups
        self.top_k = top_k
        self.weight = nn.Parameter(
            torch.empty(num_experts * num_groups, in_features, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def for_experts(cls, num_experts: int) -> type[Router]:
        return NoRouter if num_experts == 1 else cls

    @classmethod
    def build(  # type: ignore[override]
        cls,
        *,
        in_features: int,
        num_experts: int,
        num_groups: int = 1,
        top_k: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        **_: Any,
    ) -> Router:
        if num_experts == 1:  # a token router over one expert routes nothing
            return NoRouter()
        return cls(
            in_features, num_experts, num_groups, top_k, device=device, dtype=dtype
        )  # G > 1: fine-grained

    @classmethod
    def from_config(cls, cfg: Any, in_features: int, out_features: int, rank: int, **kw: Any) -> Router:
        groups = num_groups_for(
            out_features, cfg.routing_group_size, cfg.enable_fine_grained_routing, where=kw.get("name", "")
        )
        return super().from_config(cfg, in_features, out_features, rank, num_groups=groups, **kw)

    # ------------------------------------------------------------------ routing
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``(N, G, E)`` (autocast disabled so the router never runs in bf16)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = F.linear(x.float(), self.weight.float())
        return flat.view(x.shape[0], self.num_groups, self.num_experts)

    def forward(
        self, x2: torch.Tensor, state: RoutingState | None = None, batch_shape: tuple[int, ...] = ()
    ) -> torch.Tensor:
        return self.probs_from_logits(self.logits(x2))

    def fused_weight(self) -> torch.Tensor:
        return self.weight

    def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 probabilities ``(N, G, E)`` from logits laid out ``(N, G*E)`` or ``(N, G, E)`` (group-major).

        Split from :meth:`forward` so that :class:`mtlora.layers.MultiExpertLoRA` can compute the logits in
        the same GEMM as its down-projection and still route exactly like this module.
        """
        return softmax_topk(logits.reshape(logits.shape[0], self.num_groups, self.num_experts), self.top_k)

    def mix(self, h: torch.Tensor, probs: torch.Tensor | None, scales: torch.Tensor | None) -> torch.Tensor:
        """``z = π ⊗ h`` ``(N, G*E*r)`` as a batched outer product: unlike a broadcast multiply, its backward
        (two small batched matmuls) never materialises ``(N, G, E, r)`` temporaries."""
        assert probs is not None
        n_tok, ge = h.shape[0], self.num_groups * self.num_experts
        mix = probs.to(h.dtype)
        if scales is not None:  # adaptformer: sum_e pi_e s_e B_e h, s_e folded into pi_e
            mix = mix * scales.to(h.dtype)
        return torch.bmm(mix.reshape(n_tok, ge, 1), h.unsqueeze(1)).view(n_tok, ge * h.shape[1])

    def observe(
        self,
        probs: torch.Tensor | None,
        state: RoutingState,
        batch_shape: tuple[int, ...],
        training: bool,
        name: str,
    ) -> None:
        """Append this layer's balance term (training only) and, if asked, detached routing statistics.

        What is computed depends only on static flags, the module's mode and the routing state, never on
        whether we are inside a checkpoint recomputation: non-reentrant checkpointing requires the recomputed
        forward to save exactly the same tensors as the original one.
        """
        assert probs is not None
        if state.collect_balance and training:
            state.balance_terms.append(
                cv_squared(masked_mean_probs(probs, batch_shape, state.attention_mask))
            )
        if state.collect_stats:  # toggled per call: must save nothing for backward (see above)
            with torch.no_grad():
                ent = -(probs * probs.clamp_min(1e-10).log()).sum(-1).mean()
                state.stats[name] = {
                    "mean_probs": masked_mean_probs(probs, batch_shape, state.attention_mask),
                    "entropy": ent,
                }

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, experts={self.num_experts}, groups={self.num_groups}, top_k={self.top_k}"


class FineGrainedTokenRouter(TokenRouter):
    """mtLoRA's fine-grained routing (G > 1): one weight per expert and group of ``d_out / G`` output dims.

    The routing itself is :class:`TokenRouter`'s (group-major logits, softmax per group); ``z`` is
    ``(N, G*E*r)`` and the up-projection is one batched matmul over the groups instead of one GEMM.
    """

    def up_project(
        self,
        z: torch.Tensor,
        lora_B: torch.Tensor,
        base: torch.Tensor | None,
        batch_shape: tuple[int, ...],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Group g = output dims ``[g*gs, (g+1)*gs)``: a contiguous view of B, one batched matmul."""
        g = self.num_groups
        d_out, n_tok = lora_B.shape[0], z.shape[0]
        er = lora_B.shape[1] * lora_B.shape[2]
        b = lora_B.view(g, d_out // g, er)
        y = torch.bmm(z.view(n_tok, g, er).transpose(0, 1), b.transpose(1, 2)).transpose(0, 1)
        if base is not None:  # (N, G, gs) view: the sum is the single (N, d_out) copy it needs
            return (base.reshape(n_tok, g, -1) + y.to(out_dtype)).reshape(base.shape)
        return y.reshape(*batch_shape, d_out).to(out_dtype)
