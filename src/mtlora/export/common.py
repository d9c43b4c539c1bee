"""Names and constants shared by the export modules (file names, format version, the block-level note)."""

from __future__ import annotations

import re

from mtlora.bundle import FORMAT, LOADER_NAME

EXPORT_VERSION = 1
REPORT_NAME = "report.json"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
BLOCK_CONFIG_NAME = "block_adapter_config.json"
BLOCK_WEIGHTS_NAME = "block_adapter.safetensors"
BLOCK_LOADER_NAME = LOADER_NAME
BLOCK_FORMAT = FORMAT
DEFAULT_EXPORT = "default"  # directory name of the single export of an adapter without a router
IGNORE_INDEX = -100
PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)

BLOCK_NOT_PEFT = (
    "block-level adapters add a parallel low-rank path over a whole attention/MLP block "
    "(h' = h + F(LN h) + Delta(LN h)); that is not a LoRA on any existing nn.Linear, so neither peft nor a "
    "merged checkpoint can express it. The export is a small extra module attached with forward hooks "
    "(load_block_export)."
)
