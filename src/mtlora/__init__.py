"""mtLoRA: scalable multi-task low-rank adaptation (ICLR 2026) on stock PyTorch + transformers/peft."""

from __future__ import annotations

__version__ = "0.1.0"
