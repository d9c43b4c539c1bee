"""``modules_to_save``: base-model modules trained in full and saved with the adapter (the paper's flag).

The released ``train.py`` passed ``--modules_to_save embed_tokens,lm_head`` (for example) to peft, which
trains those modules and stores their weights in the adapter file. mtlora does the same for its own adapters:

* the named modules' parameters become trainable (everything else of the base stays frozen);
* their tensors are part of :meth:`mtlora.model.MtLoraModel.adapter_state_dict`, so they are saved in
  ``adapter_model.safetensors`` and loaded back with the same strict key/shape checks as the adapter;
* a copy of the original values is kept, because two contracts of ``MtLoraModel`` are about the *base*
  model: ``disable_adapters()`` must compute exactly the base model's outputs and ``unload()`` must return
  the exact base model (peft keeps the original module next to the trained copy for the same reason).
  ``merge_and_unload()`` keeps the trained values, as peft's does.

Tied parameters (``lm_head`` sharing ``embed_tokens``' weight) are stored once, under the first name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mtlora.errors import PlacementError
from mtlora.placement import ADAPTER_ATTR


class SavedModules:
    """The ``modules_to_save`` of one wrapped model: matching, trainability, tensors and original values."""

    def __init__(self, base_model: nn.Module, names: list[str] | None) -> None:
        self.names = list(names or [])
        self.params: dict[str, nn.Parameter] = {}
        self._originals: dict[str, torch.Tensor] = {}
        if not self.names:
            return
        matched: set[str] = set()
        seen: set[int] = set()
        for qual, module in base_model.named_modules():
            if not qual or f".{ADAPTER_ATTR}." in f".{qual}.":
                continue
            hit = [n for n in self.names if qual == n or qual.endswith("." + n)]
            if not hit:
                continue
            matched.update(hit)
            for pname, p in module.named_parameters():
                if f".{ADAPTER_ATTR}." in f".{pname}." or pname.startswith(f"{ADAPTER_ATTR}."):
                    continue  # an adapter attached under this module is not a base weight
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params[f"{qual}.{pname}"] = p
        missing = [n for n in self.names if n not in matched]
        if missing:
            raise PlacementError(
                f"modules_to_save={self.names}: no module of {type(base_model).__name__} is named "
                f"{missing[0]!r} (a module matches if its qualified name equals it or ends with '.'+name)"
            )
        self._originals = {k: p.detach().clone() for k, p in self.params.items()}

    def __bool__(self) -> bool:
        return bool(self.params)

    def mark_trainable(self) -> None:
        for p in self.params.values():
            p.requires_grad_(True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, keyed by their name in the base model (``model.embed_tokens.weight``)."""
        return dict(self.params)

    def restore_originals(self) -> None:
        """Put the base model's original values back (``unload``)."""
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self._originals[k].to(device=p.device, dtype=p.dtype))

    def keep_trained(self) -> None:
        """Make the trained values the ones :meth:`restore_originals` restores (``merge_and_unload``)."""
        self._originals = {k: p.detach().clone() for k, p in self.params.items()}

    @contextlib.contextmanager
    def originals(self) -> Iterator[None]:
        """Within the context the modules hold their original values; the trained ones come back after."""
        if not self.params:
            yield
            return
        trained = {k: p.detach().clone() for k, p in self.params.items()}
        self.restore_originals()
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(trained[k])
