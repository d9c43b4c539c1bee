"""README.md model cards: in every training output and export folder, with the facts they must state, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.cli import main as cli_main
from mtlora.data import save_records, save_task_map
from mtlora.hub import resolve_model_path
from mtlora.model_card import main as card_main
from mtlora.model_card import tensor_count

TINY = "mtlora:stories260k"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A two-step hydralora run on two tasks (training output folder)."""
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    data.mkdir()
    recs = []
    for i, w in enumerate(["cat", "dog", "sun", "tree", "fish", "bird", "moon", "star"]):
        recs.append({"instruction": "Repeat the word.", "input": w, "output": w, "task_type": "repeat"})
        recs.append({"instruction": "Count.", "input": w, "output": str(i), "task_type": "count"})
    save_records(recs, data / "train.json")
    out = root / "OUT"
    argv = ["train", "--model_name_or_path", TINY, "--dataset_dir", str(data), "--output_dir", str(out),
            "--method", "hydralora", "--lora_nums", "2", "--lora_rank", "4", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--max_seq_length", "64", "--disable_tqdm", "True",
            "--learning_rate", "0.001", "--save_strategy", "steps", "--save_steps", "2"]  # fmt: skip
    assert cli_main(argv) == 0
    return out


def test_checkpoint_folders_carry_a_card(trained: Path) -> None:
    """A ``checkpoint-N/`` folder is a loadable adapter too: it says what it is and how to load it."""
    card = (trained / "checkpoint-2" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mtlora\n") and "| method | hydralora |" in card
    assert "load_model(None, 'checkpoint-2')" in card


def test_training_output_card_states_the_facts(trained: Path) -> None:
    adapter = trained / "sft_lora_model"
    card = (adapter / "README.md").read_text()
    manifest = json.loads((trained / "run_manifest.json").read_text())
    task_map = json.loads((adapter / "task_map.json").read_text())
    assert card.startswith("---\nlibrary_name: mtlora\n")  # hub metadata; no base_model: not a hub id
    assert f"`{TINY}`" in card and "| method | hydralora |" in card
    assert "| router | token router, one scalar per expert |" in card and "| experts | 2 |" in card
    for task, tid in task_map.items():
        assert f"| {task} | {tid} |" in card
    for path, digest in manifest["data_files"].items():
        assert f"| {path} | {digest} |" in card
    assert (
        "| learning_rate | 0.001 |" in card
        and "| lora_rank | 4 |" in card
        and "| max_seq_length | 64 |" in card
    )
    assert (
        f"| adapter tensors (elements in adapter_model.safetensors) | {tensor_count(adapter / 'adapter_model.safetensors')} |"
        in card
    )
    assert f"{manifest['trainable_params']:,}" in card
    assert "| train_loss |" in card
    assert "load_model(None, 'sft_lora_model')" in card and "mtlora export sft_lora_model" in card
    assert "No benchmark results found" in card
    # deterministic: rewriting gives the same bytes
    before = (adapter / "README.md").read_bytes()
    assert card_main([str(trained)]) == 0  # the run folder is accepted too
    assert (adapter / "README.md").read_bytes() == before


def test_card_picks_up_evaluations_of_this_adapter(trained: Path) -> None:
    adapter = trained / "sft_lora_model"
    argv = ["eval", "mmlu", "--lora_checkpoint", str(trained), "--output_dir", str(trained / "eval_mmlu"),
            "--subjects", "anatomy", "--limit", "2", "--no_progress"]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads((trained / "eval_mmlu" / "mmlu_results.json").read_text())
    assert card_main([str(adapter)]) == 0
    card = (adapter / "README.md").read_text()
    score = f"{result['overall_accuracy']:.4g}"
    assert (
        f"| MMLU | {result['protocol']} | {result['num_few_shot']} | overall_accuracy | {score} | eval_mmlu/mmlu_results.json |"
        in card
    )


def test_export_cards_in_every_artefact_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))
    model = get_mtlora_model(
        base, MtLoraConfig(method="hydralora", lora_rank=4, lora_nums=2, base_model_name_or_path=TINY)
    )
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(0, 0.3)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    save_task_map({"a": 0, "b": 1}, adapter / "task_map.json")
    recs = [
        {"instruction": "Say it.", "input": w, "output": w, "task_type": t}
        for t in "ab"
        for w in ["x", "yy", "zzz"]
    ]
    save_records(recs, tmp_path / "recs.json")
    out = tmp_path / "x"
    argv = ["export", str(adapter), "--calibration_data", str(tmp_path / "recs.json"), "--output_dir", str(out),
            "--merged", "--max_new_tokens", "2", "--eval_fraction", "0.34"]  # fmt: skip
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    index = (out / "README.md").read_text()
    assert "Deployable as: plain peft LoRA, merged model" in index
    for task, entry in report["tasks"].items():
        peft_card = (out / entry["dir"] / "README.md").read_text()
        merged_card = (out / entry["dir"] / "merged" / "README.md").read_text()
        assert peft_card.startswith("---\nlibrary_name: peft\n") and merged_card.startswith(
            "---\nlibrary_name: transformers\n"
        )
        assert f"This artefact: `{task}` (task id {entry['task_id']})" in peft_card
        assert entry["calibration_sha256"] in peft_card and entry["eval_sha256"] in peft_card
        assert (
            f"| this export | {entry['exported']['accuracy']:.4f} | {entry['exported']['nll']:.4f} |"
            in peft_card
        )
        n = tensor_count(out / entry["dir"] / "adapter_model.safetensors")
        assert f"| elements in adapter_model.safetensors | {n:,} |" in peft_card
        assert "AutoPeftModelForCausalLM.from_pretrained('.')" in peft_card
        assert str((out / "base_model").resolve()) in peft_card
        assert f"| {task} | {entry['task_id']} |" in index
