"""The block-adapter bundle: how block-level mtLoRA is deployed (``mtlora export`` writes one per task).

Block-level adapters cannot become a peft LoRA, a vLLM LoRA or a merged checkpoint (see
:data:`mtlora.export.BLOCK_NOT_PEFT`). The bundle is their deployment format: the task's static weights, the
config, the tokenizer, a model card and a loader that needs no mtlora (:mod:`mtlora.bundle.loader`, copied
verbatim into the bundle as ``load_block_export.py``; its docstring is the format's specification, and
docs/export.md documents it for users).
"""

from __future__ import annotations

from pathlib import Path

from mtlora.bundle.loader import CONFIG_NAME, FORMAT, SUPPORTED_VERSIONS, load_block_export, load_bundle

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "LOADER_NAME",
    "SUPPORTED_VERSIONS",
    "load_block_export",
    "load_bundle",
    "loader_source",
]

#: file name of the standalone loader inside a bundle
LOADER_NAME = "load_block_export.py"


def loader_source() -> str:
    """The text of ``load_block_export.py`` as shipped in every bundle (this package's ``loader.py``)."""
    return (Path(__file__).resolve().parent / "loader.py").read_text(encoding="utf-8")
