"""Adapters saved by an older mtlora load and compute what they computed then (issue 16's safety net).

The fixtures (tests/fixtures/golden/, written by ``make_golden.py`` with main @ 0c55750, before the router
objects) cover every method and placement. Refactors of the layers, routers or loading must keep: the saved
key names and shapes (existing adapter files must load strictly, and a re-save writes the same keys and
tensors), and the numbers (the logits match; bit for bit on the machine that wrote them, to 1e-5 elsewhere,
since GEMM summation order differs between CPUs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtlora.config import CONFIG_NAME, WEIGHTS_NAME, MtLoraConfig
from mtlora.model import MtLoraModel

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402

VARIANTS = sorted(make_golden.VARIANTS)


def test_every_variant_has_a_fixture() -> None:
    assert VARIANTS and all((GOLDEN / v / WEIGHTS_NAME).is_file() for v in VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_adapter_loads_strictly_and_reproduces_its_logits(variant: str, tmp_path: Path) -> None:
    folder = GOLDEN / variant
    saved = load_file(str(folder / WEIGHTS_NAME))
    model = MtLoraModel.from_pretrained(make_golden.base_model(), folder)  # strict keys and shapes
    state = model.adapter_state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in saved.items()}
    with torch.no_grad():
        logits = model(**make_golden.inputs(model.mtlora_config)).logits[..., : make_golden.VOCAB]
    want = load_file(str(folder / "logits.safetensors"))["logits"]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    resaved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert resaved.keys() == saved.keys() and all(torch.equal(resaved[k], saved[k]) for k in saved)
    assert MtLoraConfig.from_json_file(tmp_path / CONFIG_NAME).to_dict() == model.mtlora_config.to_dict()
