"""A diverging run stops with one error line naming the step and the loss term, keeping the last good checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from mtlora.cli import main as cli_main
from mtlora.training.guards import NonFiniteGuard, TrainingDiverged

TINY = "mtlora:stories260k"


def _state(step: int) -> TrainerState:
    state = TrainerState()
    state.global_step = step
    return state


@pytest.mark.parametrize(
    ("key", "term"), [("task_loss", "task"), ("balance_loss", "balance"), ("spectral_loss", "spectral")]
)
def test_log_with_a_non_finite_term_names_it_and_the_steps(key: str, term: str, tmp_path: Path) -> None:
    (tmp_path / "checkpoint-10").mkdir()
    guard = NonFiniteGuard(str(tmp_path))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    logs = {"loss": 1.0, "task_loss": 2.0, "balance_loss": 0.1, "spectral_loss": 0.2}
    guard.on_log(args, _state(10), TrainerControl(), logs=dict(logs))  # finite: fine
    logs[key] = math.inf if term == "spectral" else math.nan
    with pytest.raises(TrainingDiverged) as info:
        guard.on_log(args, _state(20), TrainerControl(), logs=logs)
    msg = str(info.value)
    assert "step 20 (mean over steps 11-20)" in msg and f"{term} ({key}=" in msg
    assert "last good checkpoint is" in msg and "checkpoint-10" in msg


def test_non_finite_weights_veto_the_steps_checkpoint() -> None:
    guard = NonFiniteGuard()
    model = torch.nn.Linear(2, 2)
    control = guard.on_step_end(None, _state(3), TrainerControl(should_save=True), model=model)
    assert control.should_save and not control.should_log  # finite: nothing changes
    control.should_save = True
    with torch.no_grad():
        model.bias[0] = float("nan")
    control = guard.on_step_end(None, _state(4), control, model=model)
    assert control.should_log and not control.should_save  # log this step's terms, never save it
    with pytest.raises(TrainingDiverged, match=r"step 4: the update made weight 'bias' non-finite"):
        guard.on_log(None, _state(4), control, logs={"loss": 1.0, "task_loss": 1.0, "grad_norm": math.nan})


@pytest.mark.slow
def test_diverging_training_stops_before_saving_nan(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"say {w}", "input": "", "output": w * 3, "task_type": t}
            for w, t in [("ab", "x"), ("cd", "y"), ("ef", "x"), ("gh", "y")] * 4]  # fmt: skip
    (data / "train.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    argv = ["train", "--model_name_or_path", TINY, "--dataset_dir", str(data), "--output_dir", str(out),
            "--method", "hydralora", "--lora_nums", "2", "--enable_blc", "--lora_rank", "4",
            "--learning_rate", "1e30", "--max_grad_norm", "0", "--max_steps", "5", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "3",
            "--per_device_train_batch_size", "2", "--disable_tqdm", "True", "--max_seq_length", "32"]  # fmt: skip
    rc = cli_main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1, err
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps and f"training stopped at step {steps[-1] + 1}" in err[0], (steps, err)
    assert f"last good checkpoint is {out / f'checkpoint-{steps[-1]}'}" in err[0]
    assert not (out / "sft_lora_model").exists()  # the NaN adapter was never written
    from safetensors.torch import load_file

    for step in steps:  # every checkpoint on disk is finite
        tensors = load_file(str(out / f"checkpoint-{step}" / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values())
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == steps[-1] + 1  # the failing step's terms are in the log
