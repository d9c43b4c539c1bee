"""One property per test over the model x variant matrix (tests/matrix.py): method x placement x router x
architecture over tiny random models. A failure names the property, the architecture and the variant."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_model
from matrix import MATRIX, inputs_for, randomize

from mtlora import MtLoraConfig, MtLoraModel, get_mtlora_model
from mtlora.errors import PlacementError

BLC_MATRIX = [case for case in MATRIX if case.values[1][1].get("enable_blc")]


@pytest.fixture(scope="module")
def base_logits() -> dict[str, torch.Tensor]:
    """Base-model logits per architecture, computed once (the inputs are the same for every variant)."""
    cache: dict[str, torch.Tensor] = {}
    return cache


def _base_ref(cache: dict[str, torch.Tensor], arch: str) -> torch.Tensor:
    if arch not in cache:
        base = tiny_model(arch)
        inputs = inputs_for(MtLoraConfig(method="lora"))
        with torch.no_grad():
            cache[arch] = base(**inputs).logits
    return cache[arch]


def _wrapped(arch: str, kwargs: dict, *, random_b: bool = False) -> tuple[MtLoraModel, MtLoraConfig, dict]:
    cfg = MtLoraConfig(**kwargs)
    model = get_mtlora_model(tiny_model(arch), cfg)
    if random_b:
        randomize(model)
    model.eval()
    return model, cfg, inputs_for(cfg)


def _without_task_ids(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "task_ids"}


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_wrap_is_idempotent(arch, variant):
    name, kwargs = variant
    model, _, _ = _wrapped(arch, kwargs)
    assert get_mtlora_model(model, MtLoraConfig(**kwargs)) is model


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_refuses_stacked_adapters(arch, variant):
    name, kwargs = variant
    base = tiny_model(arch)
    cfg = MtLoraConfig(**kwargs)
    get_mtlora_model(base, cfg)
    with pytest.raises(PlacementError):
        MtLoraModel(base, cfg)  # never a second, stacked set of adapters


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_init_equals_base(arch, variant, base_logits):
    """B = 0 at init gives an exact zero delta."""
    model, _, inputs = _wrapped(arch, variant[1])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, _base_ref(base_logits, arch), atol=0, rtol=0)


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_gradients_reach_exactly_adapter_params(arch, variant):
    model, _, inputs = _wrapped(arch, variant[1], random_b=True)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for n, p in model.named_parameters():
        if ".mtlora." in n:
            assert p.requires_grad and p.grad is not None and torch.count_nonzero(p.grad) > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("arch,variant", BLC_MATRIX)
def test_balance_loss_in_loss(arch, variant):
    model, cfg, inputs = _wrapped(arch, variant[1], random_b=True)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.balance_loss is not None and torch.isfinite(out.balance_loss)
    torch.testing.assert_close(out.loss, out.task_loss + cfg.blc_alpha * out.balance_loss)


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_adapter_changes_output(arch, variant, base_logits):
    model, _, inputs = _wrapped(arch, variant[1], random_b=True)
    with torch.no_grad():
        assert (model(**inputs).logits - _base_ref(base_logits, arch)).abs().max() > 1e-4


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_disable_adapters_is_exact(arch, variant, base_logits):
    model, _, inputs = _wrapped(arch, variant[1], random_b=True)
    with torch.no_grad(), model.disable_adapters():
        torch.testing.assert_close(model(**inputs).logits, _base_ref(base_logits, arch), atol=0, rtol=0)


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_save_load_is_exact(arch, variant, tmp_path):
    model, cfg, inputs = _wrapped(arch, variant[1], random_b=True)
    with torch.no_grad():
        adapted = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == cfg.method and saved["peft_type"].startswith("MTLORA:")
    reloaded = MtLoraModel.from_pretrained(tiny_model(arch), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, atol=0, rtol=0)


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_unload_restores_base(arch, variant, base_logits):
    model, _, inputs = _wrapped(arch, variant[1], random_b=True)
    restored = model.unload()
    with torch.no_grad():
        logits = restored(**_without_task_ids(inputs)).logits
    torch.testing.assert_close(logits, _base_ref(base_logits, arch), atol=0, rtol=0)
    assert all(p.requires_grad for p in restored.parameters())  # requires_grad restored
    assert not any(".mtlora." in n for n, _ in restored.named_parameters())
