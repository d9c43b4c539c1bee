"""mtlora.hub.load_model: the one loader behind evaluation, analysis, export, the demo and LoRAHub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import bundled_base

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.errors import CheckpointError, MtLoraError
from mtlora.hub import load_model, read_adapter_config, resolve_adapter_dir, resolve_model_path

TINY = "mtlora:stories260k"
IDS = torch.tensor([[1, 45, 89, 120, 7, 300, 12]])


_base = bundled_base


def _mtlora_adapter(path: Path, method: str = "hydralora", **config: object) -> torch.Tensor:
    """Save a non-trivial adapter (base recorded as mtlora:stories260k); return its logits on IDS."""
    torch.manual_seed(0)
    model = get_mtlora_model(
        _base(), MtLoraConfig(method=method, lora_nums=2, lora_rank=4, base_model_name_or_path=TINY, **config)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
        task_ids = torch.zeros(1, dtype=torch.long) if model.needs_task_ids else None
        logits = model.eval()(input_ids=IDS, task_ids=task_ids).logits
    model.save_pretrained(path)
    return logits


def test_base_only_is_frozen_eval_fp32_on_cpu() -> None:
    loaded = load_model(TINY, device="cpu")
    assert loaded.method is None and loaded.adapter_dir is None and loaded.dtype == "float32"
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token is not None


def test_mtlora_adapter_from_recorded_base_and_training_output_dir(tmp_path: Path) -> None:
    want = _mtlora_adapter(tmp_path / "run" / "sft_lora_model")
    (tmp_path / "run" / "sft_lora_model" / "task_map.json").write_text(json.dumps({"navigate": 2}))
    loaded = load_model(None, tmp_path / "run", device="cpu")  # base from the config, sft_lora_model found
    assert loaded.method == "hydralora" and loaded.model_name_or_path == TINY
    assert loaded.adapter_dir == tmp_path / "run" / "sft_lora_model"
    assert loaded.task_map == {"navigate": 2}  # a partial, hand-written map is accepted here
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=IDS).logits, want, atol=0, rtol=0)
    unfrozen = load_model(None, tmp_path / "run", device="cpu", freeze=False)
    assert not unfrozen.model.training  # eval mode either way


def test_plain_peft_adapter(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        _base(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        want = peft_model.eval()(input_ids=IDS).logits
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_model(TINY, tmp_path / "peft", device="cpu")
    assert loaded.method == "peft:LORA"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=IDS).logits, want)
    with pytest.raises(CheckpointError, match="plain peft adapter"):
        load_model(TINY, tmp_path / "peft", mtlora_only=True)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="adapter directory not found"):
        resolve_adapter_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        read_adapter_config(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "adapter_config.json").write_text('{\n  "r": 4,\n')
    with pytest.raises(CheckpointError, match=r"adapter_config.json:3: invalid JSON"):
        read_adapter_config(tmp_path / "odd")
    (tmp_path / "odd" / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(CheckpointError, match="neither 'method'"):
        read_adapter_config(tmp_path / "odd")
    with pytest.raises(MtLoraError, match="--dtype 'int8'"):
        load_model(TINY, dtype="int8")
    _mtlora_adapter(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MtLoraError, match="--model_name_or_path is required"):
        load_model(None, tmp_path / "a")
    (tmp_path / "a" / "task_map.json").write_text('["navigate"]')
    with pytest.raises(CheckpointError, match="task_map.json: expected a JSON object"):
        load_model(TINY, tmp_path / "a")
    (tmp_path / "a" / "task_map.json").unlink()
    with pytest.raises(MtLoraError, match="cannot load model"):
        load_model(str(tmp_path / "no_such_model"), device="cpu")


def test_adapter_for_another_base_is_a_checkpoint_error(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    other = get_mtlora_model(
        LlamaForCausalLM(cfg), MtLoraConfig(method="hydralora", lora_nums=2, lora_rank=4)
    )
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(TINY, tmp_path / "other", device="cpu")


# ----------------------------------------------------------------------------------------------- the loading API
def test_load_base_matches_from_pretrained_and_names_the_flag_in_errors(tmp_path: Path) -> None:
    from mtlora.errors import ConfigError
    from mtlora.hub import load_base

    model, tokenizer = load_base(TINY, dtype=torch.float32, use_cache=False)
    assert model.config.use_cache is False and tokenizer.pad_token is not None
    ref = _base()
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(input_ids=IDS).logits, ref(input_ids=IDS).logits, atol=0, rtol=0
        )
    with pytest.raises(ConfigError, match=r"^--tokenizer_name_or_path .*no_tok: cannot load the tokenizer"):
        load_base(TINY, dtype=torch.float32, tokenizer_name_or_path=str(tmp_path / "no_tok"))
    with pytest.raises(ConfigError, match=r"^--tokenizer_name .*no_tok: cannot load the tokenizer"):
        load_base(
            TINY,
            dtype=torch.float32,
            tokenizer_name_or_path=tmp_path / "no_tok",
            tokenizer_flag="--tokenizer_name",
        )
    with pytest.raises(ConfigError, match=r"^--config_name .*no_cfg: cannot load a model config"):
        load_base(TINY, dtype=torch.float32, config_name=str(tmp_path / "no_cfg"))
    with pytest.raises(ConfigError, match=r"^--model_name_or_path .*no_model: cannot load model"):
        load_base(tmp_path / "no_model", dtype=torch.float32)


def test_check_model_path(tmp_path: Path) -> None:
    from mtlora.errors import ConfigError
    from mtlora.hub import check_model_path

    assert check_model_path(TINY) == resolve_model_path(TINY)
    assert check_model_path("org/name") == "org/name"  # a hub id passes (offline: the load reports it)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--model_name_or_path .*empty: no config.json in this folder$"):
        check_model_path(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"--base .*missing: no such folder$"):
        check_model_path(tmp_path / "missing", flag="--base")


def test_attach_adapter_trainable_and_frozen(tmp_path: Path) -> None:
    from mtlora.hub import attach_adapter

    want = _mtlora_adapter(tmp_path / "a", "mmoelora", task_num=2)
    (tmp_path / "a" / "task_map.json").write_text(json.dumps({"x": 0, "y": 1}))
    model, method, cfg, task_map = attach_adapter(_base(), tmp_path / "a", trainable=True)
    assert method == "mmoelora" and cfg["method"] == "mmoelora" and task_map == {"x": 0, "y": 1}
    assert any(p.requires_grad for p in model.parameters())  # --peft_path continues training it
    with torch.no_grad():
        got = model.eval()(input_ids=IDS, task_ids=torch.zeros(1, dtype=torch.long)).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    frozen, *_ = attach_adapter(_base(), tmp_path / "a")
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(CheckpointError, match="shape mismatch|does not fit"):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg2 = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
        attach_adapter(LlamaForCausalLM(cfg2), tmp_path / "a", base_name="mybase", flag="--peft_path")


def test_adapter_tensors_and_parameter_count(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mtlora.hub import adapter_num_parameters, read_adapter_tensors

    _mtlora_adapter(tmp_path / "run" / "sft_lora_model")
    want = load_file(str(tmp_path / "run" / "sft_lora_model" / "adapter_model.safetensors"))
    got = read_adapter_tensors(tmp_path / "run")  # a training output directory works too
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert adapter_num_parameters(tmp_path / "run") == sum(t.numel() for t in want.values()) > 0
    (tmp_path / "run" / "sft_lora_model" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_adapter_tensors(tmp_path / "run")
    (tmp_path / "run" / "sft_lora_model" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        adapter_num_parameters(tmp_path / "run")


def test_one_loaded_class_for_every_caller(tmp_path: Path) -> None:
    """LoadedBase and the analyses' LoadedAdapter are hub.Loaded; evaluation's LoadedModel extends it with the
    fields its reports write, and keeps their names (lora_checkpoint, adapter_method)."""
    from mtlora.analysis.common import LoadedAdapter, load_adapter
    from mtlora.evaluation.loading import LoadedModel, load_model_for_eval
    from mtlora.hub import Loaded, LoadedBase

    assert LoadedBase is Loaded and LoadedAdapter is Loaded and issubclass(LoadedModel, Loaded)
    _mtlora_adapter(tmp_path / "a", "mmoelora", task_num=2)
    analysed = load_adapter(tmp_path / "a", device="cpu")
    assert analysed.label == "component" and analysed.config["method"] == "mmoelora"
    assert (
        analysed.needs_task_ids and len(analysed.named_adapters()) == len(analysed.named_adapters("proj")) > 0
    )
    assert analysed.named_adapters("no_such_module") == []
    evaluated = load_model_for_eval(None, str(tmp_path / "a"), device="cpu", task_id=1)
    assert evaluated.lora_checkpoint == str(tmp_path / "a") and evaluated.adapter_method == "mmoelora"
    assert evaluated.needs_task_ids and evaluated.task_id_for("anything") == 1
    base = load_model_for_eval(TINY, device="cpu")
    assert base.lora_checkpoint is None and base.adapter_method is None and not base.needs_task_ids
    assert base.task_id_for("anything") is None and base.named_adapters() == [] and base.config == {}
