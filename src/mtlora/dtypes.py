"""dtype and device names shared by the core and the commands: a leaf module (it imports only torch).

Why a module of its own: the adapter layers need :func:`torch_dtype` for ``adapter_dtype``, and taking it from
:mod:`mtlora.hub` (the loader, which imports :mod:`mtlora.model` to attach adapters) made the core import
the loading layer and closed an import cycle. :mod:`mtlora.hub` re-exports these names, so
``from mtlora.hub import torch_dtype`` keeps working.
"""

from __future__ import annotations

from typing import Any

from mtlora.errors import MtLoraError

__all__ = ["DTYPES", "default_device", "default_dtype", "model_device", "torch_dtype"]

DTYPES = ("float32", "bfloat16", "float16")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """fp32 on CPU (bf16 matmuls are 10-30x slower there), bf16 on accelerators (the paper's choice)."""
    return "float32" if device == "cpu" else "bfloat16"


def torch_dtype(name: str, flag: str = "--dtype") -> Any:
    """``float32`` / ``bfloat16`` / ``float16`` (or fp32 / bf16 / fp16) as a torch dtype; else an error naming
    ``flag`` (the option or config field the name came from)."""
    import torch

    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise MtLoraError(f"{flag} {name!r}: use float32, bfloat16 or float16")
    return getattr(torch, name)


def model_device(model: Any) -> Any:
    """The device of ``model``'s first parameter (CPU for a model without parameters): where inputs go."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")
