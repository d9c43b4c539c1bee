"""A native mtlora adapter handed to peft's own loaders fails with a message naming the mtlora call that loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny import bundled_base

from mtlora import MtLoraConfig, MtLoraModel, get_mtlora_model
from mtlora.hub import load_model

TINY = "mtlora:stories260k"


_base = bundled_base


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    cfg = MtLoraConfig(method="hydralora", lora_rank=4, lora_nums=2, base_model_name_or_path=TINY)
    model = get_mtlora_model(_base(), cfg)
    out = tmp_path_factory.mktemp("native") / "adapter"
    model.save_pretrained(out)
    return out


def _says_what_loads_it(exc: BaseException) -> None:
    text = str(exc)
    assert "an mtlora multi-task adapter" in text and "which peft cannot load" in text, text
    assert "mtlora.hub.load_model(None, ADAPTER_DIR)" in text and "mtlora export" in text, text


def test_peft_model_from_pretrained_names_the_mtlora_loader(native: Path) -> None:
    from peft import PeftModel

    with pytest.raises(KeyError) as info:
        PeftModel.from_pretrained(_base(), str(native))
    _says_what_loads_it(info.value)


def test_auto_peft_model_names_the_mtlora_loader(native: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    with pytest.raises(KeyError) as info:
        AutoPeftModelForCausalLM.from_pretrained(str(native))
    _says_what_loads_it(info.value)


def test_the_named_call_loads_it_and_old_configs_still_load(native: Path, tmp_path: Path) -> None:
    loaded = load_model(None, native, device="cpu")  # the one-liner the message names
    assert isinstance(loaded.model, MtLoraModel) and loaded.method == "hydralora"
    # adapters saved before the descriptive value (peft_type "MTLORA") load unchanged
    old = tmp_path / "old"
    old.mkdir()
    for f in native.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((old / "adapter_config.json").read_text())
    cfg["peft_type"] = "MTLORA"
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    MtLoraModel.from_pretrained(_base(), old)
    cfg["peft_type"] = "LORA"
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="is not an mtlora adapter"):
        MtLoraModel.from_pretrained(_base(), old)
