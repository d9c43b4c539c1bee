"""LoRAHub: gradient-free composition finds the right LoRA; outputs are plain peft LoRAs; training mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import bundled_base

from mtlora.data import save_records
from mtlora.errors import MtLoraError
from mtlora.export import read_peft_lora, write_peft_lora
from mtlora.hub import load_tokenizer
from mtlora.lorahub import (
    _align,
    _NllProbe,
    combine_loras,
    compose,
    lorahub_train_argv,
    main,
    run_lorahub_method,
    save_composed,
    score_weights,
)

TINY = "mtlora:stories260k"
WORDS = ["cat", "dog", "sun", "tree", "fish", "bird", "moon", "star"]


_base = bundled_base


def _random_lora(base: torch.nn.Module, out: Path, seed: int, std: float = 0.15) -> Path:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, mod in base.named_modules():
        if name.endswith(("q_proj", "v_proj", "down_proj")):
            modules[name] = (
                torch.randn(4, mod.in_features, generator=gen) * std,
                torch.randn(mod.out_features, 4, generator=gen) * std,
            )
    return write_peft_lora(
        out,
        modules,
        lora_alpha=8.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        base_model_name_or_path=TINY,
    )


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    """Two random LoRAs and target examples = greedy continuations of base + LoRA 'right' (so it is exact)."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("hub")
    base = _base()
    right = _random_lora(base, root / "right", seed=1)
    wrong = _random_lora(base, root / "wrong", seed=2)
    tok = load_tokenizer(TINY)
    gen_model = PeftModel.from_pretrained(_base(), right).eval()
    records = []
    for w in WORDS[:5]:
        prompt = tok(f"Tell a story about a {w}.</s>", return_tensors="pt")
        with torch.no_grad():
            out = gen_model.generate(
                **prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2
            )
        text = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip() or "x"
        records.append(
            {"instruction": f"Tell a story about a {w}.", "input": "", "output": text, "task_type": "t"}
        )
    examples = root / "examples.json"
    save_records(records, examples)
    return {"root": root, "right": right, "wrong": wrong, "examples": examples, "records": records}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["lorahub", "token_nll_l1sum"])
def test_compose_weights_up_the_right_lora(library: dict, objective: str) -> None:
    base, tok = _base(), load_tokenizer(TINY)
    before = {n: p.clone() for n, p in base.state_dict().items()}
    result, composed = compose(
        base, tok, [library["wrong"], library["right"]], library["records"], budget=20, seed=0,
        objective=objective,
    )  # fmt: skip
    w_wrong, w_right = result.weights
    assert w_right > 0.5 and w_right > abs(w_wrong) + 0.3, result.weights
    start = result.history[0]  # nevergrad starts at w = 0, i.e. the base model
    assert start["weights"] == [0.0, 0.0]
    assert result.objective_name == objective and result.objective == pytest.approx(result.loss + result.l1)
    if objective == "lorahub":  # 5 examples in one batch: loss = (batch-mean CE) / 5, l1 = 0.05 mean|w|
        assert result.loss == pytest.approx(result.nll / 5, rel=1e-6)
        assert result.l1 == pytest.approx(0.05 * (abs(w_wrong) + abs(w_right)) / 2)
        assert result.objective < start["objective"] - 0.1
    else:
        assert result.loss == result.nll and result.l1 == pytest.approx(0.05 * (abs(w_wrong) + abs(w_right)))
        assert result.objective < start["objective"] - 0.5
    assert len(result.history) >= 20
    # the base model is handed back untouched (no adapter, same weights)
    assert not any("mtlora" in n for n, _ in base.named_modules())
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())
    # element-wise composition A = sum w A_k, B = sum w B_k
    loras = [read_peft_lora(library["wrong"]), read_peft_lora(library["right"])]
    name = next(iter(composed.modules))
    a = result.weights[0] * loras[0].modules[name][0] + result.weights[1] * loras[1].modules[name][0]
    assert torch.allclose(composed.modules[name][0], a, atol=1e-6)


def test_objective_equals_the_original_by_hand(library: dict, tmp_path: Path) -> None:
    """The default objective against the original's formula computed independently: plain peft with the
    composed LoRA, Hugging Face's own ``labels`` loss per batch (as ``default_get_loss``), summed, divided by
    the number of examples, plus ``0.05 * mean|w|`` (``default_l1_regularization``)."""
    from peft import PeftModel

    from mtlora.inference import encode_examples, pad_right

    tok = load_tokenizer(TINY)
    loras = [read_peft_lora(library["wrong"]), read_peft_lora(library["right"])]
    weights = [0.4, -0.9]
    combined = write_peft_lora(
        tmp_path / "w", combine_loras(loras, weights).modules, lora_alpha=8.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )  # fmt: skip
    model = PeftModel.from_pretrained(_base(), combined).eval()
    enc = encode_examples(library["records"], tok, 512, "paper")
    batch_losses = []
    for i in range(0, len(enc), 2):  # batches of 2: 2 + 2 + 1 examples
        batch = pad_right([(e.ids, e.labels) for e in enc[i : i + 2]], 0, "cpu")
        with torch.no_grad():
            batch_losses.append(float(model(**batch).loss))
    by_hand = sum(batch_losses) / 5 + 0.05 * (0.4 + 0.9) / 2
    got = score_weights(_base(), tok, loras, library["records"], weights, batch_size=2)
    assert len(batch_losses) == 3 and got["objective"] == pytest.approx(by_hand, rel=1e-5)
    assert got["l1"] == pytest.approx(0.05 * 0.65)
    # the earlier form, kept as an option: token-mean NLL of all targets + 0.05 * sum|w|
    old = score_weights(_base(), tok, loras, library["records"], weights, objective="token_nll_l1sum")
    assert old["objective"] == pytest.approx(old["nll"] + 0.05 * 1.3)
    assert old["nll"] == pytest.approx(got["nll"])
    with pytest.raises(MtLoraError, match="unknown LoRAHub objective"):
        score_weights(_base(), tok, loras, library["records"], weights, objective="nll")


def test_cli_saves_a_plain_peft_lora(library: dict, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "composed"
    argv = ["--lora_dirs", f"{library['wrong']},{library['right']}", "--model_name_or_path", TINY,
            "--examples", str(library["examples"]), "--output_dir", str(out), "--budget", "6", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    info = json.loads((out / "lorahub.json").read_text())
    assert len(info["weights"]) == 2 and info["budget"] == 6 and info["seed"] == 3
    assert info["lora_dirs"] == [str(library["wrong"]), str(library["right"])]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    # plain peft reproduces the composition the search scored
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    peft_model = PeftModel.from_pretrained(_base(), out).eval()
    loras = [read_peft_lora(library["wrong"]), read_peft_lora(library["right"])]
    stacked, scaling, _ = _align(loras)
    probe = _NllProbe(_base(), load_tokenizer(TINY), stacked, scaling)
    probe.set_weights(info["weights"])
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, probe.model(input_ids=ids).logits, atol=1e-5)
    probe.close()
    # same seed and examples -> the same search as the CLI's
    again, _ = compose(_base(), load_tokenizer(TINY), loras, library["records"], budget=6, seed=3)
    assert again.weights == info["weights"]
    assert info["objective_name"] == "lorahub" and info["alpha"] == 0.05 and info["batch_size"] is None


def test_composition_rules(tmp_path: Path) -> None:
    base = _base()
    a = read_peft_lora(_random_lora(base, tmp_path / "a", seed=5))
    b = read_peft_lora(_random_lora(base, tmp_path / "b", seed=6))
    b.scaling = dict.fromkeys(b.scaling, 4.0)  # differing scalings are folded into B
    folded = combine_loras([a, b], [1.0, 0.0])
    name = next(iter(a.modules))
    assert next(iter(folded.scaling.values())) == 1.0
    assert torch.allclose(folded.modules[name][1], 2.0 * a.modules[name][1])
    a.modules.pop(name)  # a module missing from one LoRA is zero there
    only_b = combine_loras([a, b], [1.0, 1.0])
    assert torch.allclose(only_b.modules[name][0], b.modules[name][0])
    c = read_peft_lora(_random_lora(base, tmp_path / "c", seed=7))
    c.rank, c.modules = (
        8,
        {n: (torch.zeros(8, x.shape[1]), torch.zeros(y.shape[0], 8)) for n, (x, y) in c.modules.items()},
    )
    with pytest.raises(MtLoraError, match="same rank"):
        combine_loras([b, c], [1.0, 1.0])


def test_lorahub_train_argv(tmp_path: Path) -> None:
    assert lorahub_train_argv(["--method", "hydralora", "--output_dir", "x"]) is None
    assert lorahub_train_argv(["--method", "lorahub", "--lora_rank", "4"]) == [
        "--method",
        "lora",
        "--lora_rank",
        "4",
    ]
    assert lorahub_train_argv(["--method=lorahub"]) == ["--method=lora"]
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"method": "lorahub", "lora_rank": 4}))
    assert lorahub_train_argv(["--config", str(cfg), "--seed", "1"]) == [
        "--method",
        "lora",
        "--lora_rank",
        "4",
        "--seed",
        "1",
    ]
    assert lorahub_train_argv(["--config", str(cfg), "--method", "mtlora"]) is None  # flags win over the file


@pytest.mark.slow
def test_train_method_lorahub(tmp_path: Path) -> None:
    """`--method lorahub`: per-task LoRAs trained with the library trainer, composed per task and default."""
    from peft import PeftModel

    from mtlora.training.arguments import parse_train_args

    recs = [{"instruction": "Repeat.", "input": w, "output": w, "task_type": "repeat"} for w in WORDS[:4]]
    recs += [
        {"instruction": "Shout.", "input": w, "output": w.upper(), "task_type": "shout"} for w in WORDS[:4]
    ]
    data = tmp_path / "data"
    data.mkdir()
    save_records(recs, data / "train.json")
    out = tmp_path / "run"
    argv = lorahub_train_argv(
        ["--method", "lorahub", "--model_name_or_path", TINY, "--dataset_dir", str(data), "--output_dir", str(out),
         "--lora_rank", "4", "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
         "--save_strategy", "no", "--disable_tqdm", "True", "--max_seq_length", "64"]
    )  # fmt: skip
    assert argv is not None
    default = run_lorahub_method(*parse_train_args(argv), examples_per_task=2, budget=4)
    assert default == out / "sft_lora_model"
    for task in ("repeat", "shout"):
        assert (out / "lorahub" / "loras" / task / "adapter_model.safetensors").is_file()
        assert (out / "lorahub" / task / "lorahub.json").is_file()
    summary = json.loads((out / "lorahub" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"repeat", "shout"} and len(summary["default"]["weights"]) == 2
    assert json.loads((default / "task_map.json").read_text()) == {"repeat": 0, "shout": 1}
    assert (default / "tokenizer_config.json").is_file()
    PeftModel.from_pretrained(_base(), default)  # loads with plain peft


def test_save_composed_roundtrip(tmp_path: Path, library: dict) -> None:
    loras = [read_peft_lora(library["wrong"]), read_peft_lora(library["right"])]
    composed = combine_loras(loras, [0.25, -0.5])
    from mtlora.lorahub import LoraHubResult

    res = LoraHubResult([0.25, -0.5], 1.0, 0.9, 0.1, [], "NGOpt", 1, 0, 0.05, 1)
    out = save_composed(tmp_path / "c", composed, res, base_model_name_or_path=TINY)
    back = read_peft_lora(out)
    assert back.scaling == composed.scaling and set(back.modules) == set(composed.modules)
    for n, (a, b) in composed.modules.items():
        assert torch.equal(back.modules[n][0], a) and torch.equal(back.modules[n][1], b)


def test_cli_trains_the_library_first(tmp_path: Path) -> None:
    recs = [{"instruction": "Repeat.", "input": w, "output": w, "task_type": "repeat"} for w in WORDS[:2]]
    save_records(recs, tmp_path / "train.json")
    out = tmp_path / "hub"
    argv = ["--train_dataset", str(tmp_path / "train.json"), "--model_name_or_path", TINY,
            "--train_args", "--max_steps 1 --lora_rank 4 --per_device_train_batch_size 2 --disable_tqdm True",
            "--examples", str(tmp_path / "train.json"), "--output_dir", str(out), "--budget", "2"]  # fmt: skip
    assert main(argv) == 0
    lora = read_peft_lora(out / "loras" / "repeat")
    assert lora.rank == 4 and sorted(lora.config["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((out / "lorahub.json").read_text())["lora_dirs"] == [str(out / "loras" / "repeat")]


def test_cli_keeps_an_earlier_composition(library: dict, tmp_path: Path) -> None:
    """Issue 15: a second run into the same --output_dir needs --overwrite_output_dir (checked first)."""
    out = tmp_path / "composed"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    argv = ["--lora_dirs", f"{library['wrong']},{library['right']}", "--examples", str(library["examples"]),
            "--model_name_or_path", TINY, "--output_dir", str(out), "--budget", "2"]  # fmt: skip
    with pytest.raises(MtLoraError, match=r"already holds adapter_config\.json.*--overwrite_output_dir"):
        main(argv)
    assert (out / "adapter_config.json").read_text() == "{}"
