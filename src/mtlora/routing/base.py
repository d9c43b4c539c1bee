"""The router interface, the routing state every adapter of a model shares, and the shared routing math.

A router decides how much each of the E experts (up-projections ``B_e``) of a
:class:`~mtlora.layers.MultiExpertLoRA` contributes, and it also owns everything that follows from that
decision: how ``lora_B`` is laid out, how ``A`` is initialised, how the routing weights mix the shared
activations ``h = A x`` before the up-projection, what is recorded for the balance loss, and how the experts
collapse into one ``B`` for a static (exported) routing. The layer therefore runs one forward for every
method and asks its router instead of branching on a kind string; a new router is one new module plus one
registry entry (:mod:`mtlora.routing`).

Every router returns probabilities in fp32, shaped ``(N, G, E)`` for N flattened tokens, G routing groups and
E experts (G=1 is the classic scalar router). The softmax always runs in fp32, also under bf16 autocast,
because tiny logit differences decide the routing and bf16 has 8 mantissa bits.

The capability flags (``is_routed``, ``needs_task_ids``, ``needs_calibration``, ``has_balance``,
``static_source``) are class constants, so ``torch.compile`` specialises on them instead of guarding on
tensors, and the commands (training, export, analysis, evaluation) read them instead of method names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import MtLoraError


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


def softmax_topk(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """fp32 softmax over the last dim; with ``top_k`` only the k largest logits survive (renormalised)."""
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def masked_mean_probs(
    probs: torch.Tensor, batch_shape: tuple[int, ...], attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean routing distribution ``(E,)`` over tokens and groups; real tokens only when a mask of the
    batch's shape is given (the padding-aware balance loss), else every position (the paper's average)."""
    p = probs.mean(dim=1)  # (N, E): average over groups, as the paper does
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(batch_shape):
        w = attention_mask.reshape(-1, 1).to(p.dtype)
        return (p * w).sum(0) / w.sum().clamp_min(1.0)
    return p.mean(0)


#: The ``bad(field, message)`` callback of :meth:`mtlora.config.MtLoraConfig.validate` (it raises).
BadField = Callable[[str, str], None]


class Router(nn.Module):
    """Base class of every router (see the module docstring). Subclasses set ``kind`` and the flags.

    Only :meth:`forward` is an ``nn.Module`` call (so forward hooks on ``adapter.router`` observe the routing
    probabilities, which ``mtlora analyze`` relies on); the other methods are plain calls from the layer's
    forward and add no hook overhead.
    """

    #: Registry key; also written to ``config_signature()["router"]`` and to the export report.
    kind: ClassVar[str] = ""
    #: False only for the single-expert "router" (plain LoRA): nothing to route, analyse or calibrate.
    is_routed: ClassVar[bool] = True
    #: The forward reads ``task_ids`` (one per sample) from the routing state.
    needs_task_ids: ClassVar[bool] = False
    #: A static (exported) routing must be estimated on data (the mean router output per task).
    needs_calibration: ClassVar[bool] = False
    #: Routes per token from the input: the load-balancing loss and the routing statistics apply.
    has_balance: ClassVar[bool] = False
    #: Where a static routing comes from (``report.json``'s ``routing_source``): none | calibration | task_gate.
    static_source: ClassVar[str] = "none"
    #: Whether the adaptformer style's per-expert scales ``s_e`` can fold into this router's weights.
    supports_expert_scales: ClassVar[bool] = True

    num_experts: int
    num_groups: int = 1

    # ------------------------------------------------------------------ configuration
    @classmethod
    def validate_config(cls, cfg: Any, bad: BadField) -> None:
        """Reject settings of an :class:`~mtlora.config.MtLoraConfig` this router cannot run (``bad`` raises).

        The base rule: the task gate's "general" row exists only for the task gate.
        """
        if cfg.mmoelora_general_task:
            bad("mmoelora_general_task", f"applies to method mmoelora only, not {cfg.method}")

    @classmethod
    def for_experts(cls, num_experts: int) -> type[Router]:
        """The class that actually routes ``num_experts`` experts (a token router over one expert is none)."""
        return cls

    @classmethod
    def prepare_config(cls, cfg: Any, task_map: Mapping[str, int] | None) -> None:
        """Fill what the config leaves to the training data (the task gate's ``task_num``), before the build."""

    @classmethod
    def build(
        cls,
        *,
        in_features: int,
        out_features: int,
        rank: int,
        num_experts: int,
        num_groups: int = 1,
        top_k: int | None = None,
        task_num: int | None = None,
        task_embedding_dim: int = 64,
        general_task: bool = False,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Router:
        """The router of one adapter (a subclass may return a more specific class, e.g. fine-grained)."""
        raise NotImplementedError

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        num_groups: int = 1,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Router:
        """The router of one adapter of ``d_in -> d_out`` and rank ``rank`` described by an
        :class:`~mtlora.config.MtLoraConfig` (read duck-typed: the core config module imports this one)."""
        return cls.build(
            in_features=in_features,
            out_features=out_features,
            rank=rank,
            num_experts=cfg.num_experts,
            num_groups=num_groups,
            top_k=cfg.router_top_k,
            task_num=cfg.task_num,
            task_embedding_dim=cfg.task_embedding_dim,
            general_task=cfg.mmoelora_general_task,
            name=name,
            device=device,
            dtype=dtype,
        )

    # ------------------------------------------------------------------ parameter layout
    def b_shape(self, out_features: int, rank: int) -> tuple[int, int, int]:
        """Shape of the layer's ``lora_B``: ``(d_out, E, r)``, one ``r``-column block per expert."""
        return (out_features, self.num_experts, rank)

    def init_lora_A(self, lora_A: torch.Tensor, relu: bool) -> None:
        """Initialise the shared down-projection (kaiming-uniform as the paper code; ReLU gain before a ReLU)."""
        if relu:
            nn.init.kaiming_uniform_(lora_A, nonlinearity="relu")
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))

    @classmethod
    def experts_view(cls, lora_B: torch.Tensor, num_experts: int) -> torch.Tensor:
        """``lora_B`` as a ``(d_out, E, r_e)`` view: expert e's up-projection is ``[:, e]`` (no copy).

        A classmethod so that saved tensors can be split without building a model (``mtlora analyze``).
        """
        return lora_B

    # ------------------------------------------------------------------ forward collaboration
    def forward(
        self, x2: torch.Tensor, state: RoutingState | None = None, batch_shape: tuple[int, ...] = ()
    ) -> torch.Tensor | None:
        """fp32 routing probabilities ``(N, G, E)`` for flattened inputs ``x2`` ``(N, d_in)`` (None: unrouted)."""
        raise NotImplementedError

    def fused_weight(self) -> torch.Tensor | None:
        """Rows that can join ``A`` in one GEMM (``[A; W]``) to produce the routing logits; None if none."""
        return None

    def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from the logits of :meth:`fused_weight` (only routers that have one)."""
        raise MtLoraError(f"{type(self).__name__} computes no routing logits from the input")

    def mix(self, h: torch.Tensor, probs: torch.Tensor | None, scales: torch.Tensor | None) -> torch.Tensor:
        """The up-projection's input ``z`` from the shared activations ``h`` ``(N, r)`` and the routing
        (``scales``: the adaptformer style's per-expert ``s_e``, folded in here)."""
        raise NotImplementedError

    def up_project(
        self,
        z: torch.Tensor,
        lora_B: torch.Tensor,
        base: torch.Tensor | None,
        batch_shape: tuple[int, ...],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``y = z · B^T`` (one GEMM over ``lora_B`` viewed ``(d_out, -1)``), accumulated into ``base`` if given.

        With ``base`` the GEMM accumulates into it (``addmm``) instead of materialising ``Delta`` and then the
        sum; under autocast that is also one bf16 rounding instead of two.
        """
        d_out, n_tok = lora_B.shape[0], z.shape[0]
        w = lora_B.view(d_out, -1)
        if base is not None and base.dtype == z.dtype:
            return torch.addmm(base.reshape(n_tok, d_out), z, w.t()).view(base.shape)
        y = F.linear(z, w).reshape(*batch_shape, d_out).to(out_dtype)
        return y if base is None else base + y

    def observe(
        self,
        probs: torch.Tensor | None,
        state: RoutingState,
        batch_shape: tuple[int, ...],
        training: bool,
        name: str,
    ) -> None:
        """Record what the routing state asks for (balance terms, statistics); nothing by default."""

    # ------------------------------------------------------------------ static form (export)
    def static_for_task(self, task_id: int) -> torch.Tensor | None:
        """The exact static routing ``(G, E)`` of one task, if the router has one (the task gate); else None."""
        return None

    def check_static(self, probs: torch.Tensor, name: str) -> None:
        """Raise unless ``probs`` has this router's static shape ``(G, E)``."""
        g, e = self.num_groups, self.num_experts
        if tuple(probs.shape) != (g, e):
            raise MtLoraError(
                f"{name}: static routing has shape {tuple(probs.shape)}, the adapter needs ({g}, {e}) "
                "(groups, experts)"
            )

    def collapse_B(self, b: torch.Tensor, probs: torch.Tensor | None, name: str) -> torch.Tensor:
        """``Σ_e diag(π_e) B_e`` as one ``(d_out, r)`` matrix for the static routing ``probs`` ``(G, E)``.

        ``b`` is the layer's ``lora_B`` (fp32, expert scales already applied); output dim j of group g weighs
        expert e by ``probs[g, e]``.
        """
        if probs is None:
            raise MtLoraError(f"{name}: a routed adapter needs static routing weights to export")
        self.check_static(probs, name)
        w = probs.float().to(b.device).repeat_interleave(b.shape[0] // self.num_groups, dim=0)  # (d_out, E)
        return torch.einsum("je,jer->jr", w, b)
