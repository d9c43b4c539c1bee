"""``mtlora demo --quick``: exits 0, writes results.json (schema below) and a PNG; reuses its cached base."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mtlora.cli import main as cli_main

METHODS = ("lora", "hydralora", "mtlora")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    assert cli_main(["demo", "--quick", "--output_dir", str(out)]) == 0
    return out, time.time() - t0


@pytest.mark.slow
def test_results_schema(quick_run: tuple[Path, float]) -> None:
    out, seconds = quick_run
    results = json.loads((out / "results.json").read_text())
    tasks = [t["name"] for t in results["suite"]["tasks"]]
    assert len(tasks) >= 30 and len(set(tasks)) == len(tasks)
    assert list(results["methods"])[1:] == list(METHODS)
    for name in METHODS:
        row = results["methods"][name]
        assert set(row["per_task"]) == set(tasks)
        assert all(0.0 <= v <= 1.0 for v in row["per_task"].values())
        assert row["average"] == pytest.approx(sum(row["per_task"].values()) / len(tasks))
        assert isinstance(row["trainable_params"], int) and row["trainable_params"] > 0
        assert row["seconds"] > 0
        assert Path(row["adapter_dir"], "adapter_model.safetensors").is_file()
    # equal budgets: every method ran the same number of optimizer steps
    assert {results["methods"][m]["global_steps"] for m in METHODS} == {results["config"]["max_steps"]}
    # different designs, different parameter counts (lora < mtlora < hydralora at these settings)
    params = {m: results["methods"][m]["trainable_params"] for m in METHODS}
    assert len(set(params.values())) == 3
    pre = results["base_pretraining"]
    assert pre["steps"] > 0 and pre["cached"] is False and "stories" in pre["reason"]
    print(f"quick demo: {seconds:.0f} s")  # ~30 s on an idle 2-core CPU; not asserted (shared machines)


@pytest.mark.slow
def test_outputs_written(quick_run: tuple[Path, float]) -> None:
    out, _ = quick_run
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (out / "results.md").read_text()
    assert "| **average** |" in md and "trainable params" in md
    lines = (out / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert set(first["predictions"]) == {"base (no adapter)", *METHODS}
    assert (out / "data" / "train.json").is_file() and (out / "data" / "test.json").is_file()


@pytest.mark.slow
def test_batched_generation_matches_one_by_one(quick_run: tuple[Path, float]) -> None:
    """Left padding must not change greedy answers."""
    import torch
    from transformers import AutoModelForCausalLM

    from mtlora.data import load_records
    from mtlora.demo import generate_answers
    from mtlora.hub import load_tokenizer
    from mtlora.model import MtLoraModel

    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    base = next((out / "cache").glob("pretrained_base-*"))
    tok = load_tokenizer(str(base))
    model = MtLoraModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        results["methods"]["mtlora"]["adapter_dir"],
    )
    records = load_records(out / "data" / "test.json")[::4][:24]
    batched = generate_answers(model, tok, records, device="cpu", batch_size=24, max_new_tokens=12)
    single = generate_answers(model, tok, records, device="cpu", batch_size=1, max_new_tokens=12)
    assert batched == single


@pytest.mark.slow
def test_cached_base_is_reused(quick_run: tuple[Path, float], tmp_path: Path) -> None:
    out, _ = quick_run
    argv = ["demo", "--quick", "--output_dir", str(tmp_path), "--cache_dir", str(out / "cache")]
    assert cli_main([*argv, "--methods", "lora"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["base_pretraining"]["cached"] is True
    assert list(results["methods"]) == ["base (no adapter)", "lora"]
    first = json.loads((out / "results.json").read_text())
    assert results["methods"]["lora"]["per_task"] == first["methods"]["lora"]["per_task"]  # fixed seeds


def test_bad_arguments(tmp_path: Path, capsys) -> None:
    assert cli_main(["demo", "--methods", "nope", "--output_dir", str(tmp_path)]) == 2
    assert "--methods" in capsys.readouterr().err
    assert cli_main(["demo", "--suite", "niv1", "--output_dir", str(tmp_path)]) == 2
