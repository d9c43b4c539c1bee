"""Model behaviour beyond the matrix (the matrix itself, one property per test: tests/test_model_matrix.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import tiny_model
from matrix import randomize

from mtlora import MtLoraConfig, MtLoraModel, get_mtlora_model
from mtlora.errors import CheckpointError, ConfigError, PlacementError


def test_block_ffn_adds_delta_of_normalized_input() -> None:
    """x' = x + F(LN(x)) + Delta(LN(x)): layer-0 output moves by exactly Delta(post_attention_layernorm(h))."""
    base = tiny_model("llama")
    model = get_mtlora_model(
        base, MtLoraConfig(method="mtlora", lora_rank=4, lora_nums=2, enable_block_adapter=True)
    )
    randomize(model)
    ids = torch.randint(3, 128, (1, 5))
    seen = {}
    layer0 = base.model.layers[0]
    h1 = layer0.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("ln", o))
    h2 = layer0.register_forward_hook(
        lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o)
    )
    assert not model.training and not layer0.mlp.mtlora.training  # follows the base model's eval mode
    with torch.no_grad():
        with model.disable_adapters():
            model(input_ids=ids)
        before = seen["out"]
        model(input_ids=ids)
        after = seen["out"]
        delta = layer0.mlp.mtlora(seen["ln"])
    h1.remove()
    h2.remove()
    torch.testing.assert_close(after - before, delta, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_single_expert() -> None:
    base = tiny_model("llama")
    model = get_mtlora_model(
        base, MtLoraConfig(method="lora", lora_rank=4, target_modules="q_proj,v_proj,down_proj")
    )
    randomize(model)
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_merge_refuses_routed_and_block() -> None:
    for kw in (
        dict(method="hydralora", lora_nums=2),
        dict(method="mtlora", lora_nums=2, enable_block_adapter=True),
    ):
        model = get_mtlora_model(tiny_model("llama"), MtLoraConfig(lora_rank=4, **kw))
        with pytest.raises(Exception, match="cannot be merged"):
            model.merge_and_unload()


def test_reapply_after_unload_and_different_config() -> None:
    base = tiny_model("llama")
    m1 = get_mtlora_model(base, MtLoraConfig(method="hydralora", lora_rank=4, lora_nums=2))
    with pytest.raises(PlacementError, match="different config"):
        get_mtlora_model(m1, MtLoraConfig(method="hydralora", lora_rank=8, lora_nums=2))
    m1.unload()
    m2 = get_mtlora_model(
        base, MtLoraConfig(method="mtlora", lora_rank=4, lora_nums=2, enable_block_adapter=True)
    )
    assert len(list(m2.adapters())) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="nope"), "method"),
        (dict(lora_rank=0), "lora_rank"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(block_adapter_type="mlp"), "block_adapter_type"),
        (dict(method="hydralora", enable_block_adapter=True), "use --method mtlora"),
        (dict(method="mmoelora", lora_rank=6, expert_num=4), "divisible by expert_num"),
        (dict(method="lora", enable_blc=True), "more than one expert"),
        (dict(enable_block_adapter=True, target_modules="q_proj"), "target_modules"),
        (dict(router_top_k=99), "router_top_k"),
        (dict(spectral_reg_mode="fancy"), "spectral_reg_mode"),
    ],
)
def test_bad_configs_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MtLoraConfig(**kwargs)


def test_bad_placements_raise() -> None:
    base = tiny_model("llama")
    with pytest.raises(PlacementError, match="no nn.Linear .* matches target_modules=\\['wq'\\].*q_proj"):
        get_mtlora_model(base, MtLoraConfig(method="lora", target_modules="wq"))
    with pytest.raises(PlacementError, match="'model.layers.0.input_layernorm' is a LlamaRMSNorm"):
        get_mtlora_model(base, MtLoraConfig(method="lora", target_modules="input_layernorm"))
    with pytest.raises(
        ConfigError, match="does not divide the output size 64 of model.layers.0.self_attn.q_proj"
    ):
        get_mtlora_model(
            base, MtLoraConfig(lora_nums=2, enable_fine_grained_routing=True, routing_group_size=48)
        )
    assert not any(
        ".mtlora." in n for n, _ in base.named_parameters()
    )  # failed injection left nothing behind
    with pytest.raises(PlacementError, match="cannot place block adapters into Sequential"):
        MtLoraModel(
            torch.nn.Sequential(torch.nn.Linear(4, 4)), MtLoraConfig(lora_nums=2, enable_block_adapter=True)
        )
    with pytest.raises(Exception, match="task_num"):
        get_mtlora_model(base, MtLoraConfig(method="mmoelora", lora_rank=4, expert_num=2))


def test_load_checks_keys_and_shapes(tmp_path) -> None:
    model = get_mtlora_model(tiny_model("llama"), MtLoraConfig(method="hydralora", lora_rank=4, lora_nums=2))
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["lora_rank"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for 'model.layers.0.self_attn.q_proj.mtlora.lora_A': checkpoint \(4, 64\) vs model \(8, 64\)",
    ):
        MtLoraModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    cfg["lora_rank"], cfg["target_modules"] = 4, ["q_proj"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected key .*v_proj"):
        MtLoraModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    cfg["target_modules"] = ["q_proj", "v_proj", "k_proj"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing key .*k_proj"):
        MtLoraModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    cfg["bogus_field"] = 1
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown field.*bogus_field"):
        MtLoraModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    with pytest.raises(CheckpointError, match="not found"):
        MtLoraModel.from_pretrained(tiny_model("llama"), tmp_path / "missing")


def test_generate_with_task_ids() -> None:
    base = tiny_model("llama")
    model = get_mtlora_model(base, MtLoraConfig(method="mmoelora", lora_rank=4, expert_num=2, task_num=2))
    randomize(model)
    ids = torch.randint(3, 128, (2, 4))
    out_a = model.generate(input_ids=ids, task_ids=torch.tensor([0, 0]), max_new_tokens=5, do_sample=False)
    out_beam = model.generate(input_ids=ids, task_ids=[0, 1], max_new_tokens=3, num_beams=2, do_sample=False)
    assert out_a.shape == (2, 9) and out_beam.shape == (2, 7)
    with pytest.raises(Exception, match="task_ids"):
        model.generate(input_ids=ids, max_new_tokens=2)


@pytest.mark.slow
def test_torch_compile_matches_eager_loss_and_gradients() -> None:
    """``torch.compile`` (what ``--torch_compile`` does) traces the hooks, the shared A/router GEMM, FGR and the
    balance loss: same loss and gradients as eager (one tiny model; compiling costs ~20-40 s on 2 CPU cores)."""
    torch.manual_seed(0)
    cfg = MtLoraConfig(
        method="mtlora",
        lora_rank=4,
        lora_nums=4,
        enable_blc=True,
        enable_block_adapter=True,
        block_adapter_type="both",
        enable_fine_grained_routing=True,
        routing_group_size=32,
        lora_dropout=0.0,  # dropout masks would differ between the two runs
    )
    model = get_mtlora_model(tiny_model("llama"), cfg).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    ids = torch.randint(3, 128, (2, 12))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    results = []
    for fn in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        out = fn(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append(
            (out.loss.detach(), out["balance_loss"].detach(), [p.grad.clone() for _, p in trainable])
        )
    (loss, blc, grads), (c_loss, c_blc, c_grads) = results
    assert blc > 0
    torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_blc, blc, atol=1e-6, rtol=1e-4)
    for (name, _), a, b in zip(trainable, c_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda s, n=name: f"{n}: {s}")


def test_save_pretrained_is_a_unit_keeps_other_files_and_refuses_nan_on_load(tmp_path: Path) -> None:
    """Issue 15/12: the adapter files replace the old ones together (other files stay), with umask modes;
    an adapter holding NaN is refused by name instead of loading (and silently scoring 0.0)."""
    from mtlora.atomic import current_umask
    from mtlora.errors import CheckpointError

    out = tmp_path / "adapter"
    model = get_mtlora_model(tiny_model(), MtLoraConfig(method="lora", lora_rank=4))
    model.save_pretrained(out)
    (out / "tokenizer_config.json").write_text("{}")
    with torch.no_grad():
        next(model.adapters()).lora_B.fill_(float("nan"))
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~current_umask(), p  # safetensors alone writes 0600
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\..*lora_B' holds non-finite values"):
        MtLoraModel.from_pretrained(tiny_model(), out)
