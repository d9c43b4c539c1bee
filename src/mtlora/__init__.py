"""mtLoRA: scalable multi-task low-rank adaptation (ICLR 2026) on stock PyTorch + transformers/peft.

Public API::

    from mtlora import MtLoraConfig, get_mtlora_model, MtLoraModel
"""

from __future__ import annotations

__version__ = "0.1.0"

from mtlora.config import MtLoraConfig  # noqa: E402
from mtlora.model import MtLoraModel, get_mtlora_model  # noqa: E402

__all__ = ["MtLoraConfig", "MtLoraModel", "get_mtlora_model", "__version__"]
