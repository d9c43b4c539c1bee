"""QLoRA: every method and placement on a 4-bit / 8-bit (bitsandbytes) base, on CPU in fp32 compute.

A tiny random Llama (hidden 64: bitsandbytes' 4-bit blocks are 64 values) is saved once and loaded through
the product's own loader (:func:`mtlora.hub.load_model`) with ``--load_in_kbits`` 4 or 8, so the tests run the
same quantization path as ``mtlora train`` / ``eval`` / ``export``.

Measured tolerances (``rel`` = ||q - f|| / ||f|| of the logits against the unquantized model, fp32 compute;
deterministic, as quantization is):

==========================  ========================  ==========================================
base                        tiny random Llama, 2x16   bundled stories260K, a 39-token story
==========================  ========================  ==========================================
4-bit nf4 + double quant    rel 0.109                 rel 0.122, greedy next token kept 90%
4-bit fp4                   rel 0.135                 rel 0.169, 90%
8-bit LLM.int8              rel 0.010                 rel 0.013, 100%
==========================  ========================  ==========================================

Double quantization changes these by < 0.002. Models this small (hidden 64) are a worst case for 4 bit: each
64-value block has one absmax scale and nothing averages the per-weight error out. The asserted bounds
leave ~1.4x headroom.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import REPO

pytest.importorskip("bitsandbytes", reason="the qlora extra (pip install -e '.[qlora]') is not installed")

from mtlora import MtLoraConfig, MtLoraModel, get_mtlora_model  # noqa: E402
from mtlora.errors import ConfigError, MtLoraError  # noqa: E402
from mtlora.hub import load_model, resolve_model_path  # noqa: E402
from mtlora.losses import SpectralRegularizer  # noqa: E402
from mtlora.quant import (  # noqa: E402
    Quantization,
    check_backend,
    is_quantized_linear,
    quantization_of,
)

TINY = "mtlora:stories260k"
IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80, 9, 10, 11, 12, 13, 14, 15, 16]] * 2)
IDS[1, 1:] = torch.arange(90, 105)
TASK_IDS = torch.tensor([0, 1])

CASES = {
    "lora": dict(method="lora", lora_rank=4),
    "hydralora": dict(method="hydralora", lora_rank=4, lora_nums=3, enable_blc=True),
    "mmoelora": dict(method="mmoelora", lora_rank=4, expert_num=2, task_num=2),
    "mtlora_component": dict(
        method="mtlora", lora_rank=4, lora_nums=3, enable_blc=True, enable_fine_grained_routing=True,
        routing_group_size=16, enable_spectral_reg=True, spectral_reg_lambda=0.5,
        target_modules=["q_proj", "v_proj", "down_proj"],
    ),
    "mtlora_block": dict(
        method="mtlora", lora_rank=4, lora_nums=3, enable_blc=True, enable_block_adapter=True,
        block_adapter_type="both", enable_fine_grained_routing=True, routing_group_size=32,
        enable_spectral_reg=True, spectral_reg_lambda=0.5,
    ),
}  # fmt: skip


def _tiny_llama() -> torch.nn.Module:
    """tests/_tiny's Llama shape (hidden 64, 2 layers) with the bundled tokenizer's 512-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Llama as a model folder, with the bundled tokenizer (load_model needs one)."""
    from mtlora.hub import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(out)
    load_tokenizer(TINY).save_pretrained(out)
    return out


def _load(path: Path | str, kbits: int, adapter: Path | None = None, **quant) -> torch.nn.Module:
    loaded = load_model(
        str(path), adapter, device="cpu", dtype="float32", quantization=Quantization(kbits, **quant)
    )
    return loaded.model


def _step_inputs(cfg: MtLoraConfig) -> dict:
    kw = {"input_ids": IDS, "labels": IDS}
    if cfg.method == "mmoelora":
        kw["task_ids"] = TASK_IDS
    return kw


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------- flags and errors
def test_flags_and_defaults_match_the_released_script() -> None:
    from functools import partial

    from mtlora.training.arguments import parse_train_args

    parse_train_args = partial(parse_train_args, check_paths=False)  # flags only: "d" and "o" need not exist
    base = ["--model_name_or_path", TINY, "--dataset_dir", "d", "--output_dir", "o"]
    model_args = parse_train_args(base)[0]
    assert (model_args.load_in_kbits, model_args.double_quant, model_args.quant_type) == (16, True, "nf4")
    model_args = parse_train_args(
        base + ["--load_in_kbits", "4", "--double_quant", "False", "--quant_type", "fp4"]
    )[0]
    assert (model_args.load_in_kbits, model_args.double_quant, model_args.quant_type) == (4, False, "fp4")
    with pytest.raises(ConfigError, match=r"--load_in_kbits 3"):
        parse_train_args(base + ["--load_in_kbits", "3"])
    with pytest.raises(ConfigError, match=r"--quant_type 'int4'"):
        parse_train_args(base + ["--load_in_kbits", "4", "--quant_type", "int4"])
    q = Quantization(4, double_quant=False, quant_type="fp4")
    assert q.record() == {"load_in_kbits": 4, "quant_type": "fp4", "double_quant": False}
    assert Quantization.from_record(q.record()) == q
    assert Quantization(8).record() == {"load_in_kbits": 8} and not Quantization().enabled
    bnb = Quantization(4).bnb_config(torch.bfloat16)
    assert bnb.load_in_4bit and bnb.bnb_4bit_use_double_quant and bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16 and Quantization().bnb_config(torch.float32) is None


def test_missing_bitsandbytes_is_one_error_naming_package_and_flag(monkeypatch, tiny_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(
        MtLoraError, match=r"--load_in_kbits 4 needs the bitsandbytes package.*mtlora\[qlora\]"
    ):
        load_model(str(tiny_dir), device="cpu", quantization=Quantization(4))
    check_backend(Quantization(16))  # not quantized: bitsandbytes is not needed


def test_unsupported_device_is_one_error_naming_the_flag() -> None:
    with pytest.raises(
        MtLoraError,
        match=r"--load_in_kbits 8: bitsandbytes .* cannot run 8-bit LLM.int8 on xla \(Could not run",
    ):
        check_backend(Quantization(8), "xla")  # a torch device without kernels here


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--model_name_or_path", TINY, "--dataset_dir", str(tmp_path),
         "--output_dir", str(tmp_path / "o"), "--load_in_kbits", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --load_in_kbits 2")


# ------------------------------------------------------------------------------------- hosts and storage
@pytest.mark.parametrize("kbits", [4, 8])
def test_quantized_linears_host_component_adapters(tiny_dir: Path, kbits: int) -> None:
    base = _load(tiny_dir, kbits)
    q = quantization_of(base)
    assert q == (Quantization(4) if kbits == 4 else Quantization(8))
    model = get_mtlora_model(base, MtLoraConfig(**CASES["hydralora"]))
    hosts = [(n, h) for n, h, _ in __import__("mtlora.placement").placement.iter_hosts(model.base_model)]
    assert hosts and all(is_quantized_linear(h) for _, h in hosts)
    for _, adapter in model.named_adapters():
        assert adapter.lora_A.dtype == torch.float32 and adapter.in_features == 64
    full = get_mtlora_model(_load(tiny_dir, 16), MtLoraConfig(**CASES["hydralora"]))
    assert model.get_nb_trainable_parameters() == full.get_nb_trainable_parameters()  # weights, not bytes
    # the adapted model equals the quantized base at init (B = 0), through the base= accumulation path
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
        with model.disable_adapters():
            plain = model(input_ids=IDS).logits
    assert torch.equal(adapted, plain)


@pytest.mark.parametrize("kbits", [4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_trains_saves_and_reloads(tiny_dir: Path, tmp_path: Path, kbits: int, case: str) -> None:
    torch.manual_seed(0)
    cfg = MtLoraConfig(lora_dropout=0.0, **CASES[case])
    model = get_mtlora_model(_load(tiny_dir, kbits), cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for n, p in model.base_model.named_parameters() if ".mtlora." not in n)
    reg = SpectralRegularizer(cfg) if cfg.enable_spectral_reg else None
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(8):
        out = model(**_step_inputs(cfg))
        loss = out.loss
        if cfg.enable_blc:  # the balance term is there and has a gradient, as in 16 bit
            assert out.balance_loss is not None and out.loss.requires_grad
        if reg is not None:
            spec = reg(model, step)
            assert spec is not None and spec.requires_grad and torch.isfinite(spec)
            loss = loss + spec
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float((out.task_loss if cfg.enable_blc else out.loss).detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    with torch.no_grad():
        expected = model(**{k: v for k, v in _step_inputs(cfg).items() if k != "labels"}).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_quantization"] == Quantization(kbits).record()
    again = _load(tiny_dir, kbits, tmp_path / "adapter")
    with torch.no_grad():
        got = again(**{k: v for k, v in _step_inputs(cfg).items() if k != "labels"}).logits
    assert torch.equal(got, expected)


def test_balance_and_spectral_terms_match_16bit(tiny_dir: Path) -> None:
    """Same adapter init on a 16-bit and a 4-bit base: the spectral term (adapter weights only) is identical;
    the balance loss (routing of the quantized activations) differs only by the quantization noise."""
    cfg = MtLoraConfig(lora_dropout=0.0, **CASES["mtlora_block"])
    terms = {}
    for kbits in (16, 4):
        torch.manual_seed(3)
        model = get_mtlora_model(_load(tiny_dir, kbits), cfg)
        model.train()
        out = model(**_step_inputs(cfg))
        spec = SpectralRegularizer(cfg)(model, 0)
        terms[kbits] = (float(out.balance_loss), float(spec.detach()))
        grads = torch.autograd.grad(out.loss, [a.router.weight for a in model.adapters()])
        assert all(g.abs().sum() > 0 for g in grads)  # the balance loss reaches every router
    assert terms[4][1] == terms[16][1]
    assert terms[4][0] == pytest.approx(terms[16][0], rel=0.5)


@pytest.mark.parametrize(
    ("kbits", "quant", "bound"),
    [(4, {}, 0.16), (4, {"quant_type": "fp4", "double_quant": False}, 0.19), (8, {}, 0.015)],
)
def test_quantized_logits_stay_close_to_16bit(tiny_dir: Path, kbits: int, quant: dict, bound: float) -> None:
    with torch.no_grad():
        full = _load(tiny_dir, 16)(input_ids=IDS).logits
        low = _load(tiny_dir, kbits, **quant)(input_ids=IDS).logits
    assert 0 < _rel(low, full) < bound


def test_trained_model_keeps_most_greedy_choices_at_4bit() -> None:
    from mtlora.hub import load_tokenizer

    text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine."
    ids = load_tokenizer(TINY)(text, return_tensors="pt").input_ids
    path = resolve_model_path(TINY)
    with torch.no_grad():
        full = _load(path, 16)(input_ids=ids).logits
        nf4 = _load(path, 4)(input_ids=ids).logits
        int8 = _load(path, 8)(input_ids=ids).logits
    assert _rel(nf4, full) < 0.17 and _rel(int8, full) < 0.02
    assert (nf4.argmax(-1) == full.argmax(-1)).float().mean() >= 0.8
    assert (int8.argmax(-1) == full.argmax(-1)).float().mean() >= 0.95


# ------------------------------------------------------------------------------------- precision changes
def test_adapter_loads_onto_another_precision_and_says_so_once(
    tiny_dir: Path, tmp_path: Path, caplog
) -> None:
    torch.manual_seed(0)
    model = get_mtlora_model(_load(tiny_dir, 4), MtLoraConfig(lora_dropout=0.0, **CASES["hydralora"]))
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(std=0.2)
        on_4bit = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING, logger="mtlora"):
        full = _load(tiny_dir, 16, tmp_path / "adapter")
    notes = [r.getMessage() for r in caplog.records if r.name == "mtlora"]
    assert len(notes) == 1 and "4-bit nf4 + double quant base" in notes[0] and "16-bit" in notes[0]
    with torch.no_grad():
        on_16bit = full(input_ids=IDS).logits
    assert (
        0 < _rel(on_16bit, on_4bit) < 0.3
    )  # measured 0.20: the same adapter, only the base's storage differs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtlora"):
        _load(tiny_dir, 4, tmp_path / "adapter")  # same precision: nothing to say
    assert not [r for r in caplog.records if r.name == "mtlora"]


def test_old_adapter_without_a_record_loads_silently(tiny_dir: Path, tmp_path: Path, caplog) -> None:
    model = get_mtlora_model(_tiny_llama(), MtLoraConfig(**CASES["lora"]))
    model.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg.pop("base_quantization") == {"load_in_kbits": 16}
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="mtlora"):
        _load(tiny_dir, 4, tmp_path / "adapter")
    assert not [r for r in caplog.records if r.name == "mtlora"]
    cfg["base_quantization"] = {"load_in_kbits": 5}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"adapter_config.json: base_quantization: --load_in_kbits 5"):
        MtLoraModel.from_pretrained(_tiny_llama(), tmp_path / "adapter")


# ------------------------------------------------------------------------------------- merging
def test_merge_refuses_packed_weights_or_dequantizes_explicitly(tiny_dir: Path) -> None:
    torch.manual_seed(0)
    model = get_mtlora_model(_load(tiny_dir, 4), MtLoraConfig(lora_dropout=0.0, **CASES["lora"]))
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(std=0.2)
        adapted = model(input_ids=IDS).logits
    with pytest.raises(MtLoraError, match=r"q_proj: the base is quantized \(4-bit nf4.*dequantize=True"):
        model.merge_and_unload()
    assert len(list(model.adapters())) > 0  # the refusal changed nothing
    merged = model.merge_and_unload(dequantize=True)
    assert not quantization_of(merged).enabled
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, adapted, atol=1e-4)


# ------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def trained_4bit(tmp_path_factory) -> dict:
    """`train.py ... --load_in_kbits 4 --enable_block_adapter --block_adapter_type ffn` (the interface contract),
    on the bundled model, with non-reentrant gradient checkpointing."""
    from mtlora.data import save_records
    from mtlora.training.arguments import parse_train_args
    from mtlora.training.run import train

    root = tmp_path_factory.mktemp("qlora_train")
    words = ["cat", "dog", "sun", "tree", "fish", "bird", "moon", "star"]
    recs = [
        {"instruction": "Repeat the word.", "input": w, "output": w, "task_type": "repeat"} for w in words
    ]
    recs += [
        {"instruction": "Say it twice.", "input": w, "output": f"{w} {w}", "task_type": "twice"}
        for w in words
    ]
    save_records(recs, root / "data" / "train.json")
    out = root / "out"
    argv = [
        "--method", "mtlora", "--model_name_or_path", TINY, "--dataset_dir", str(root / "data"), "--output_dir",
        str(out), "--load_in_kbits", "4", "--enable_block_adapter", "--block_adapter_type", "ffn", "--lora_nums", "4",
        "--lora_rank", "4", "--enable_blc", "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--disable_tqdm", "True", "--gradient_checkpointing",
        "--max_seq_length", "64",
    ]  # fmt: skip
    adapter_dir = train(*parse_train_args(argv))
    return {"out": out, "adapter": adapter_dir, "data": root / "data" / "train.json"}


@pytest.mark.slow
def test_train_contract_4bit_block_ffn(trained_4bit: dict) -> None:
    adapter = trained_4bit["adapter"]
    assert adapter == trained_4bit["out"] / "sft_lora_model"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_quantization"] == {"load_in_kbits": 4, "quant_type": "nf4", "double_quant": True}
    assert cfg["enable_block_adapter"] and cfg["block_adapter_type"] == "ffn"
    run_cfg = json.loads((trained_4bit["out"] / "run_config.json").read_text())
    assert run_cfg["model"]["load_in_kbits"] == 4
    log = [json.loads(x) for x in (trained_4bit["out"] / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "task_loss" in r]
    assert len(steps) == 6 and all(r["balance_loss"] > 0 for r in steps)
    # loads back onto a 4-bit base (eval, analysis and export all go through load_model)
    loaded = load_model(None, adapter, device="cpu", quantization=Quantization(4))
    assert loaded.quantization == Quantization(4) and loaded.method == "mtlora"


@pytest.mark.slow
def test_eval_analyze_export_accept_the_flags(trained_4bit: dict, tmp_path: Path) -> None:
    from mtlora.cli import main as cli_main

    adapter = str(trained_4bit["adapter"])
    quant = ["--load_in_kbits", "4", "--quant_type", "nf4", "--double_quant", "True"]
    assert cli_main(["eval", "mmlu", "--lora_checkpoint", adapter, "--output_dir", str(tmp_path / "mmlu"),
                     "--subjects", "anatomy", "--limit", "2", "--num_few_shot", "1", "--no_progress", *quant]) == 0  # fmt: skip
    res = json.loads((tmp_path / "mmlu" / "mmlu_results.json").read_text())
    assert res["base_quantization"] == Quantization(4).record()
    assert cli_main(["analyze", "routing", "--adapter", adapter, "--data", str(trained_4bit["data"]),
                     "--output_dir", str(tmp_path / "an"), "--max_examples", "4", *quant]) == 0  # fmt: skip
    assert any((tmp_path / "an").iterdir())
    # block adapters export from a 4-bit base too (a module attached with hooks, not a peft LoRA)
    assert cli_main(["export", adapter, "--output_dir", str(tmp_path / "x"), "--calibration_data",
                     str(trained_4bit["data"]), "--max_eval_per_task", "1", "--max_new_tokens", "2", *quant]) == 0  # fmt: skip
    report = json.loads((tmp_path / "x" / "report.json").read_text())
    assert report["settings"]["base_quantization"] == Quantization(4).record()
    assert set(report["tasks"]) == {"repeat", "twice"}


def test_export_from_4bit_base_equals_plain_peft_on_4bit(tiny_dir: Path, tmp_path: Path) -> None:
    """Per-task peft LoRAs exported from a 4-bit base load with plain peft (its bitsandbytes LoRA layers) onto
    the same 4-bit base and reproduce mtlora's static-routing forward there."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from mtlora.data import save_records
    from mtlora.export import estimate_task_routing, export_adapter, static_routing
    from mtlora.hub import load_tokenizer

    torch.manual_seed(0)
    model = get_mtlora_model(_tiny_llama(), MtLoraConfig(lora_dropout=0.0, **CASES["hydralora"]))
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(std=0.3)
    model.save_pretrained(tmp_path / "adapter")
    recs = [
        {"instruction": "Repeat.", "input": w, "output": w, "task_type": "repeat"} for w in ("a", "b", "c")
    ]
    save_records(recs, tmp_path / "calib.json")
    reports = {}
    for kbits in (4, 16):
        reports[kbits] = export_adapter(
            tmp_path / "adapter", tmp_path / f"x{kbits}", model_name_or_path=str(tiny_dir),
            calibration_data=tmp_path / "calib.json", eval_data=tmp_path / "calib.json", evaluate=False,
            quantization=Quantization(kbits),
        )  # fmt: skip
    assert reports[4]["settings"]["base_quantization"] == Quantization(4).record()
    with pytest.raises(MtLoraError, match=r"--merged with --load_in_kbits 4: .* --load_in_kbits 16"):
        export_adapter(tmp_path / "adapter", tmp_path / "xm", model_name_or_path=str(tiny_dir),
                       calibration_data=tmp_path / "calib.json", merged=True, quantization=Quantization(4))  # fmt: skip
    assert not (tmp_path / "xm").exists()  # refused before anything was loaded or written
    x4 = tmp_path / "x4" / reports[4]["tasks"]["repeat"]["dir"]
    # what the export computed its routing from: mtlora on the 4-bit base, routing frozen per task
    routed = _load(tiny_dir, 4, tmp_path / "adapter")
    probs = estimate_task_routing(routed, load_tokenizer(str(tiny_dir)), recs).probs
    with torch.no_grad(), static_routing(routed, probs):
        expected = routed(input_ids=IDS).logits
    peft_model = PeftModel.from_pretrained(_load(tiny_dir, 4), x4).eval()
    with torch.no_grad():
        got = peft_model(input_ids=IDS).logits
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, _load(tiny_dir, 4)(input_ids=IDS).logits, atol=1e-3)
    # the files are a 16-bit export's up to the routing estimate (made on quantized activations)
    a4 = load_file(x4 / "adapter_model.safetensors")
    a16 = load_file(tmp_path / "x16" / reports[16]["tasks"]["repeat"]["dir"] / "adapter_model.safetensors")
    assert a4.keys() == a16.keys() and all(torch.allclose(a4[k], a16[k], atol=0.05) for k in a4)


def test_lorahub_composes_on_a_4bit_base(tiny_dir: Path, tmp_path: Path) -> None:
    from mtlora.data import save_records
    from mtlora.export import write_peft_lora
    from mtlora.lorahub import main as lorahub_main

    base = _tiny_llama()
    dirs = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        modules = {
            name: (torch.randn(4, m.in_features, generator=gen) * 0.1, torch.randn(m.out_features, 4, generator=gen) * 0.1)
            for name, m in base.named_modules()
            if name.endswith(("q_proj", "v_proj"))
        }  # fmt: skip
        dirs.append(
            write_peft_lora(
                tmp_path / f"lora{seed}", modules, lora_alpha=8.0, target_modules=["q_proj", "v_proj"]
            )
        )
    recs = [{"instruction": "Repeat.", "input": w, "output": w, "task_type": "t"} for w in ("a", "b", "c")]
    save_records(recs, tmp_path / "examples.json")
    out = tmp_path / "composed"
    argv = ["--lora_dirs", ",".join(map(str, dirs)), "--model_name_or_path", str(tiny_dir), "--examples",
            str(tmp_path / "examples.json"), "--output_dir", str(out), "--budget", "4", "--load_in_kbits", "4"]  # fmt: skip
    assert lorahub_main(argv) == 0
    info = json.loads((out / "lorahub.json").read_text())
    assert len(info["weights"]) == 2 and all(isinstance(w, float) for w in info["weights"])
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
