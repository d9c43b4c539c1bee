"""Merged checkpoints: base + a task's static weight delta, saved as a plain model (component level)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtlora.atomic import atomic_dir
from mtlora.errors import MtLoraError
from mtlora.export.peft import component_adapters
from mtlora.export.static import static_delta_weight
from mtlora.quant import is_quantized_linear

if TYPE_CHECKING:
    from mtlora.model import MtLoraModel


def save_merged_model(
    model: MtLoraModel,
    routing: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
) -> Path:
    """``save_pretrained`` of base + static ``Delta W`` (component level), the simplest deployment.

    The base weights are added to in place, saved, then restored from a copy (not by subtraction, which
    would leave rounding residue for the next task). Adapter tensors are filtered out of the saved state.
    """
    from mtlora.placement import ADAPTER_ATTR

    hosts = component_adapters(model)
    quantized = [name for name, host, _ in hosts if is_quantized_linear(host)]
    if quantized:
        raise MtLoraError(
            f"{quantized[0]}: cannot save a merged model of a quantized base (packed weights take no delta); "
            "merge into the unquantized base (--load_in_kbits 16)"
        )
    base = model.base_model
    backups = [(host, host.weight.detach().clone()) for _, host, _ in hosts]
    # the whole folder is this model's (a merged model is not saved beside other files): replace it as a unit
    with atomic_dir(out_dir) as out:
        try:
            with torch.no_grad():
                for name, host, adapter in hosts:
                    dw = static_delta_weight(adapter, routing.get(name))
                    host.weight.add_(dw.to(device=host.weight.device, dtype=host.weight.dtype))
            marker = f".{ADAPTER_ATTR}."
            state = {k: v for k, v in base.state_dict().items() if marker not in f".{k}"}
            base.save_pretrained(str(out), state_dict=state)
        finally:
            with torch.no_grad():
                for host, w in backups:
                    host.weight.copy_(w)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    return Path(out_dir)
