"""mtLoRA: scalable multi-task low-rank adaptation (ICLR 2026) on stock PyTorch + transformers/peft.

Public API::

    from mtlora import MtLoraConfig, get_mtlora_model, MtLoraModel

The names are imported lazily so that light commands (``mtlora --help``, ``mtlora data``) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtlora._version import __version__

__all__ = ["MtLoraConfig", "MtLoraModel", "get_mtlora_model", "__version__"]

_LAZY = {"MtLoraConfig": "mtlora.config", "MtLoraModel": "mtlora.model", "get_mtlora_model": "mtlora.model"}

if TYPE_CHECKING:  # pragma: no cover
    from mtlora.config import MtLoraConfig
    from mtlora.model import MtLoraModel, get_mtlora_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtlora' has no attribute {name!r}")
