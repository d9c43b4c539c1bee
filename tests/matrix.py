"""The model x variant matrix shared by ``test_model_matrix.py`` (peft ``testing_common`` style).

``VARIANTS`` covers each method and placement once: method x placement (component / block ffn / attention /
both) x router (dense, fine-grained, top-k, none) x balance loss. At import time we check that no two variants
build the same configuration (a duplicate adds run time and tests nothing new: the old ``block_lora_e1``
equalled ``lora`` because ``enable_block_adapter`` defaults to False).
"""

from __future__ import annotations

import pytest
import torch
from _tiny import ARCHS

from mtlora import MtLoraConfig, MtLoraModel

# (id, config kwargs). Ranks/experts small so every case runs in well under a second.
VARIANTS: list[tuple[str, dict]] = [
    ("lora", dict(method="lora", lora_rank=4)),
    ("hydralora", dict(method="hydralora", lora_rank=4, lora_nums=3)),
    ("mmoelora", dict(method="mmoelora", lora_rank=4, expert_num=2, task_num=3)),
    (
        "comp_fgr",
        dict(
            method="mtlora", lora_rank=4, lora_nums=3, enable_fine_grained_routing=True, routing_group_size=16
        ),
    ),
    ("comp_topk", dict(method="mtlora", lora_rank=4, lora_nums=4, router_top_k=2, enable_blc=True)),
    (
        "block_ffn",
        dict(method="mtlora", lora_rank=4, lora_nums=3, enable_block_adapter=True, block_adapter_type="ffn"),
    ),
    (
        "block_attn_fgr",
        dict(
            method="mtlora",
            lora_rank=4,
            lora_nums=3,
            enable_block_adapter=True,
            block_adapter_type="attention",
            enable_fine_grained_routing=True,
            routing_group_size=32,
            enable_blc=True,
        ),
    ),
    (
        "block_both_bottleneck",
        dict(
            method="mtlora",
            lora_rank=4,
            lora_nums=2,
            enable_block_adapter=True,
            block_adapter_type="both",
            block_adapter_style="bottleneck",
        ),
    ),
    # a block placement with a single expert: no router at all (NoRouter), unlike every other block variant
    ("block_single_expert", dict(method="mtlora", lora_rank=4, lora_nums=1, enable_block_adapter=True)),
]


def _check_distinct(variants: list[tuple[str, dict]]) -> None:
    """Fail at import time when two variants are the same configuration (or share an id)."""
    seen: dict[str, str] = {}
    ids = [name for name, _ in variants]
    assert len(ids) == len(set(ids)), f"duplicate variant ids: {ids}"
    for name, kwargs in variants:
        key = repr(sorted(MtLoraConfig(**kwargs).to_dict().items(), key=lambda kv: kv[0]))
        assert key not in seen, f"variant {name!r} has the same configuration as {seen[key]!r}"
        seen[key] = name


_check_distinct(VARIANTS)

#: (arch, variant) pairs; every arch other than llama is marked slow (7 archs x 9 variants = 63 cases).
MATRIX = [
    pytest.param(arch, variant, id=f"{arch}-{variant[0]}", marks=() if arch == "llama" else pytest.mark.slow)
    for arch in ARCHS
    for variant in VARIANTS
]


def inputs_for(cfg: MtLoraConfig) -> dict:
    """A padded batch of two; mmoelora gets task ids."""
    torch.manual_seed(1)
    kw = {
        "input_ids": torch.randint(3, 128, (2, 6)),
        "attention_mask": torch.tensor([[1] * 6, [0, 0] + [1] * 4]),
    }
    if cfg.method == "mmoelora":
        kw["task_ids"] = torch.tensor([0, 2])
    return kw


def randomize(model: MtLoraModel) -> None:
    """Non-zero B matrices, so that the adapter changes the output (B = 0 at init)."""
    torch.manual_seed(2)
    for a in model.adapters():
        torch.nn.init.normal_(a.lora_B, std=0.2)
