"""Observe routing during plain forward passes: export's calibration and ``mtlora analyze``'s routing.

Why a forward pre-hook on each adapter that recomputes its routing (``MultiExpertLoRA.routing_probs`` on the
adapter's own input) rather than a hook on the router: observing must not change what is observed. A hooked
router turns off the fused ``[A; W_router]`` GEMM (``MultiExpertLoRA._shared_router_weight``), which moves
every later layer's input by float rounding; the pre-hook leaves the forward exactly as in inference. The
router is deterministic and sees no dropout, so the recomputed probabilities are the ones the adapter mixes
its experts with. ``hook="router"`` instead observes the router's own call (the unfused forward), which is
what ``mtlora analyze`` has always reported; its figures stay exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["FORWARD_KEYS", "RoutingProbe"]

#: Batch keys passed to the model; other keys (masks, task indices) travel with the batch to the callback.
FORWARD_KEYS = ("input_ids", "attention_mask", "task_ids")

ProbsCallback = Callable[[str, Any, Mapping[str, Any]], None]


class RoutingProbe:
    """``with RoutingProbe(adapters, on_probs) as probe: probe.run(model, batches)``.

    ``adapters`` are ``(name, MultiExpertLoRA)`` pairs; ``on_probs(name, probs, batch)`` is called for every
    adapter call with the fp32 ``(N, G, E)`` routing of its input and the batch being run (``N`` = the
    batch's tokens).
    """

    def __init__(
        self, adapters: Sequence[tuple[str, Any]], on_probs: ProbsCallback, *, hook: str = "adapter"
    ) -> None:
        if hook not in ("adapter", "router"):
            raise ValueError(f"RoutingProbe(hook={hook!r}): use 'adapter' or 'router'")
        self.adapters = list(adapters)
        self.on_probs = on_probs
        self.hook = hook
        self.batch: Mapping[str, Any] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingProbe:
        def pre_hook(name: str) -> Any:
            def hook(module: Any, args: tuple[Any, ...]) -> None:
                x = args[0]
                probs = module.routing_probs(x.reshape(-1, module.in_features), tuple(x.shape[:-1]))
                if probs is not None:
                    self.on_probs(name, probs.detach(), self.batch)

            return hook

        def router_hook(name: str) -> Any:
            def hook(_module: Any, _args: Any, probs: Any) -> None:
                self.on_probs(name, probs.detach(), self.batch)

            return hook

        if self.hook == "adapter":
            self._handles = [a.register_forward_pre_hook(pre_hook(n)) for n, a in self.adapters]
        else:
            self._handles = [a.router.register_forward_hook(router_hook(n)) for n, a in self.adapters]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, model: Any, batches: Iterable[Mapping[str, Any]], *, device: Any = None) -> None:
        """No-grad forward of every batch (its :data:`FORWARD_KEYS` moved to ``device``)."""
        import torch

        with torch.no_grad():
            for batch in batches:
                moved = {
                    k: (v.to(device) if device is not None and k in FORWARD_KEYS else v)
                    for k, v in batch.items()
                }
                self.batch = moved
                model(**{k: moved[k] for k in FORWARD_KEYS if k in moved})
        self.batch = {}
