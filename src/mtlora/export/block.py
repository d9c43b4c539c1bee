"""Block-level exports: a self-contained bundle (weights, config, standalone loader) per task."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from mtlora.atomic import atomic_dir
from mtlora.bundle import loader_source
from mtlora.errors import MtLoraError
from mtlora.export.common import (
    BLOCK_CONFIG_NAME,
    BLOCK_FORMAT,
    BLOCK_LOADER_NAME,
    BLOCK_NOT_PEFT,
    BLOCK_WEIGHTS_NAME,
    EXPORT_VERSION,
)
from mtlora.export.peft import refuse_saved_modules
from mtlora.hub import resolve_model_path
from mtlora.routing.static import static_up_projection

if TYPE_CHECKING:
    from mtlora.layers import MultiExpertLoRA
    from mtlora.model import MtLoraModel


def export_block_adapter(
    model: MtLoraModel,
    routing: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task: str | None = None,
) -> Path:
    """Write a static block-level adapter: A, ``B_t`` and scaling per block + config + standalone loader.

    The folder is self-contained: ``load_block_export.py`` inside it needs only torch and safetensors.
    """
    refuse_saved_modules(model, "a block-adapter export")
    from safetensors.torch import save_file

    from mtlora.placement import iter_hosts

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for name, host, module in iter_hosts(model.base_model):
        if isinstance(host, nn.Linear):
            raise MtLoraError(f"{name}: component-level adapter; export it as a peft LoRA instead")
        adapter = cast("MultiExpertLoRA", module)
        a = adapter.lora_A.detach()
        b_static = static_up_projection(adapter, routing.get(name)).to(a.dtype)
        tensors[f"{name}.lora_A"] = a.cpu().contiguous()
        tensors[f"{name}.lora_B"] = b_static.cpu().contiguous()
        entries.append(
            {
                "name": name,
                "in_features": adapter.in_features,
                "out_features": adapter.out_features,
                "rank": adapter.rank,
                "scaling": float(adapter.scaling),
                "style": adapter.style,
            }
        )
    if not entries:
        raise MtLoraError("the model has no block-level adapters")
    base = base_model_name_or_path or model.mtlora_config.base_model_name_or_path
    if base and base.lower().startswith("mtlora:"):  # the bundle's loader has no mtlora to resolve the prefix
        base = resolve_model_path(base)
    config = {
        "format": BLOCK_FORMAT,
        "version": EXPORT_VERSION,
        "task": task,
        "base_model_name_or_path": base,
        "weights": BLOCK_WEIGHTS_NAME,
        "placement": "forward hook on each named block; adds scaling * B act(A x) to the block output, "
        "x = the block input (the pre-norm output); act = identity (lowrank) or ReLU (bottleneck, adaptformer)",
        "modules": entries,
    }
    with atomic_dir(out_dir, keep_existing=True) as out:  # the four files appear together or not at all
        save_file(
            tensors,
            str(out / BLOCK_WEIGHTS_NAME),
            metadata={"format": "pt", "mtlora_export": str(EXPORT_VERSION)},
        )
        (out / BLOCK_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (out / BLOCK_LOADER_NAME).write_text(loader_source())
        (out / "README.md").write_text(_block_readme(task))
    return Path(out_dir)


def _block_readme(task: str | None) -> str:
    """A minimal README for a bundle written through the Python API (``mtlora export`` writes a full model card)."""
    return (
        f"# mtlora block-adapter bundle{f' (task {task})' if task else ''}\n\n"
        "No peft LoRA here: " + BLOCK_NOT_PEFT + "\n\n"
        "```python\n"
        "import sys; sys.path.insert(0, 'path/to/this/folder')\n"
        "from load_block_export import load_bundle  # this folder's file; no mtlora import needed\n\n"
        "model, tokenizer = load_bundle('path/to/this/folder')\n"
        "```\n\n"
        "`block_adapter_config.json` lists every block (module path, rank, scaling, style); "
        "`block_adapter.safetensors` holds `<module>.lora_A` (r, d) and the task's static "
        "`<module>.lora_B` (d, r).\n"
    )
