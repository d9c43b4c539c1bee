"""Routers: how much each expert contributes, per token (and per group of output dimensions) or per task.

One class per router kind, each a collaborator of :class:`~mtlora.layers.MultiExpertLoRA` (see
:mod:`mtlora.routing.base` for the interface and why):

* :class:`NoRouter` (``none``) - plain LoRA, one expert;
* :class:`TokenRouter` (``token``) - HydraLoRA / mtLoRA, a softmax over the experts from each token's input;
  :class:`FineGrainedTokenRouter` (same kind) is its fine-grained form, one softmax per group of outputs (G>1);
* :class:`TaskRouter` (``task``) - MMoELoRA's task gate, one softmax per sample from a task embedding;
* :class:`StaticRouting` - frozen per-task weights in place of a router (export, static-routing evaluation).

``REGISTRY`` maps each kind to its class; a method's kind comes from ``mtlora.config.METHOD_SPECS`` and
:func:`router_class` resolves it for a config. Adding a router is one new module, one ``REGISTRY`` entry and
its tests; nothing outside this package branches on kind names.
"""

from __future__ import annotations

from typing import Any

from mtlora.errors import MtLoraError
from mtlora.routing.base import (
    Router,
    RoutingState,
    cv_squared,
    masked_mean_probs,
    softmax_topk,
)
from mtlora.routing.none import NoRouter
from mtlora.routing.static import StaticRouting, static_routing, static_up_projection
from mtlora.routing.task import TaskRouter
from mtlora.routing.token import FineGrainedTokenRouter, TokenRouter, num_groups_for

__all__ = [
    "REGISTRY",
    "FineGrainedTokenRouter",
    "NoRouter",
    "Router",
    "RoutingState",
    "StaticRouting",
    "TaskRouter",
    "TokenRouter",
    "cv_squared",
    "make_router",
    "masked_mean_probs",
    "num_groups_for",
    "resolve",
    "router_class",
    "softmax_topk",
    "static_routing",
    "static_up_projection",
]

REGISTRY: dict[str, type[Router]] = {cls.kind: cls for cls in (NoRouter, TokenRouter, TaskRouter)}


def resolve(kind: str, num_experts: int) -> type[Router]:
    """The router class of ``kind`` for ``num_experts`` experts (a token router over one expert is none)."""
    if kind not in REGISTRY:
        raise MtLoraError(f"unknown router kind {kind!r}")
    return REGISTRY[kind].for_experts(num_experts)


def router_class(cfg: Any) -> type[Router]:
    """The router class of an :class:`~mtlora.config.MtLoraConfig` (its method's kind, its expert count)."""
    return resolve(cfg.method_spec.router, cfg.num_experts)


def make_router(kind: str, **kwargs: Any) -> Router:
    """Build a router of ``kind`` (``none`` | ``token`` | ``task``) with :meth:`Router.build`'s arguments."""
    if kind not in REGISTRY:
        raise MtLoraError(f"unknown router kind {kind!r}")
    return REGISTRY[kind].build(**kwargs)
