"""`mtlora train` / `train.py` on the bundled tiny model: every method, outputs, resume, DDP, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mtlora.cli import main as cli_main
from mtlora.training.arguments import parse_train_args
from mtlora.training.run import train

REPO = Path(__file__).resolve().parents[2]
TINY = "mtlora:stories260k"


@pytest.fixture(scope="module")
def dolly_dir(tmp_path_factory) -> Path:
    shared = REPO.parent / "shared" / "data" / "dolly15k_sample" / "dolly_sample.jsonl"
    if not shared.is_file():
        pytest.skip(f"shared data not found at {shared}")
    out = tmp_path_factory.mktemp("dolly")
    assert cli_main(["data", "dolly", str(shared), str(out)]) == 0
    return out


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", TINY, "--dataset_dir", str(data), "--output_dir", str(out),
        "--max_seq_length", "192", "--per_device_train_batch_size", "8", "--logging_steps", "1",
        "--disable_tqdm", "True", "--max_train_samples", "160", "--dataloader_drop_last", "True", *extra,
    ]  # fmt: skip


def _losses(out: Path) -> list[float]:
    return [
        json.loads(line)["task_loss"]
        for line in (out / "train_log.jsonl").read_text().splitlines()
        if '"task_loss"' in line
    ]


METHODS = {
    "lora": ["--method", "lora"],
    "hydralora": ["--method", "hydralora", "--lora_nums", "4", "--enable_blc"],
    "mmoelora": ["--method", "mmoelora", "--expert_num", "4"],
    "mtlora": [
        "--method", "mtlora", "--lora_nums", "4", "--enable_blc", "--enable_block_adapter", "--block_adapter_type", "ffn",
        "--enable_spectral_reg", "--spectral_reg_lambda", "0.5", "--enable_fine_grained_routing", "--routing_group_size", "32",
    ],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_saves(method: str, dolly_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = _argv(
        dolly_dir,
        out,
        "--lora_rank",
        "8",
        "--num_train_epochs",
        "2",
        "--learning_rate",
        "3e-3",
        *METHODS[method],
    )
    adapter_dir = train(*parse_train_args(argv))
    losses = _losses(out)
    assert len(losses) >= 20
    half = len(losses) // 2
    assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half - 0.1, (
        losses
    )  # epoch 2 < epoch 1
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "task_map.json",
        "tokenizer_config.json",
    ):
        assert (adapter_dir / name).is_file(), name
    for name in ("run_config.json", "run_manifest.json", "task_map.json", "train_log.jsonl"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["data_files"] and manifest["trainable_params"] > 0
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["method"] == method and cfg["base_model_name_or_path"] == TINY
    if method == "mmoelora":
        assert cfg["task_num"] == 8  # inferred from the Dolly categories
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    if method in ("hydralora", "mtlora"):
        assert any("balance_loss" in r and "routing_entropy" in r and "expert_usage_max" in r for r in log)
    if method == "mtlora":
        assert manifest["spectral_applications"] > 0 and any(r.get("spectral_loss", 0) > 0 for r in log)

    # the adapter reloads onto a fresh base and reproduces the trained model's logits
    from transformers import AutoModelForCausalLM

    from mtlora.hub import resolve_model_path
    from mtlora.model import MtLoraModel

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))
    model = MtLoraModel.from_pretrained(base, adapter_dir)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    kw = {"task_ids": torch.tensor([3])} if method == "mmoelora" else {}
    with torch.no_grad():
        adapted = model(input_ids=ids, **kw).logits
        with model.disable_adapters():
            plain = model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-4


class _StopAt(TrainerCallback):
    """Simulates a killed run: stop right after the checkpoint at ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resume_from_checkpoint_matches_uninterrupted_run(
    dolly_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    common = ("--method", "mtlora", "--lora_rank", "4", "--lora_nums", "2", "--enable_blc", "--enable_block_adapter",
              "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "3",
              "--lora_dropout", "0.1")  # fmt: skip
    full = train(*parse_train_args(_argv(dolly_dir, tmp_path / "full", *common)))

    import mtlora.training.trainer as trainer_mod

    original_init = trainer_mod.MtLoraTrainer.__init__

    def init_with_stop(self, *a, **kw):
        kw["callbacks"] = [*kw.get("callbacks", []), _StopAt(3)]
        original_init(self, *a, **kw)

    monkeypatch.setattr(trainer_mod.MtLoraTrainer, "__init__", init_with_stop)
    train(*parse_train_args(_argv(dolly_dir, tmp_path / "killed", *common)))
    monkeypatch.undo()
    ckpt = tmp_path / "killed" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    assert not (tmp_path / "killed" / "checkpoint-6").exists()
    resumed = train(
        *parse_train_args(
            _argv(dolly_dir, tmp_path / "killed", *common, "--resume_from_checkpoint", str(ckpt))
        )
    )
    from safetensors.torch import load_file

    a, b = (
        load_file(str(full / "adapter_model.safetensors")),
        load_file(str(resumed / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=lambda s, k=k: f"{k}: {s}")


def test_config_file_and_flag_precedence(dolly_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {TINY}\ndataset_dir: {dolly_dir}\noutput_dir: {tmp_path / 'o'}\n"
        "method: hydralora\nlora_nums: 4\nenable_blc: true\ntarget_modules: [q_proj, k_proj]\nlearning_rate: 0.001\n"
    )
    m, d, a, t = parse_train_args(["--config", str(cfg), "--lora_nums", "6"])
    assert (
        a.method == "hydralora"
        and a.lora_nums == 6
        and a.enable_blc
        and a.target_modules == ["q_proj", "k_proj"]
    )
    assert t.learning_rate == 1e-3 and m.model_name_or_path == TINY


def _run_train_py(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_train_py_contract_and_errors(dolly_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    ok = _run_train_py(
        *_argv(dolly_dir, out, "--method", "hydralora", "--lora_nums", "2", "--max_steps", "2")
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (out / "sft_lora_model" / "adapter_config.json").is_file()
    assert (out / "sft_lora_model" / "adapter_model.safetensors").is_file()

    bad_flag = _run_train_py(*_argv(dolly_dir, tmp_path / "x", "--lora_rnk", "8"))
    assert bad_flag.returncode != 0
    assert "Traceback" not in bad_flag.stderr and "lora_rnk" in bad_flag.stderr

    bad_data = tmp_path / "bad"
    bad_data.mkdir()
    (bad_data / "train.jsonl").write_text(
        '{"instruction": "a", "input": "", "output": "b", "task_type": "t"}\n{"instruction": "a", "input": ""}\n'
    )
    res = _run_train_py(*_argv(bad_data, tmp_path / "y"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "train.jsonl" in err[0] and ":2" in err[0] and "output" in err[0], res.stderr[
        -1500:
    ]

    bad_cfg = _run_train_py(
        *_argv(dolly_dir, tmp_path / "z", "--method", "hydralora", "--enable_block_adapter")
    )
    assert (
        bad_cfg.returncode != 0
        and "use --method mtlora" in bad_cfg.stderr
        and "Traceback" not in bad_cfg.stderr
    )

    helptext = _run_train_py("--help")
    assert helptext.returncode == 0
    for flag in (
        "--enable_fine_grained_routing",
        "--spectral_reg_lambda",
        "--gradient_accumulation_steps",
        "--deepspeed",
    ):
        assert flag in helptext.stdout


def test_peft_path_continues_the_saved_adapter(dolly_dir: Path, tmp_path: Path) -> None:
    """``--peft_path`` (through mtlora.hub.attach_adapter) starts from the saved weights, trainable: with a zero
    learning rate the continued run saves them back bit for bit; another --method is refused up front."""
    from safetensors.torch import load_file

    from mtlora.errors import ConfigError

    first = train(*parse_train_args(_argv(dolly_dir, tmp_path / "a", "--method", "hydralora", "--lora_nums", "2",
                                          "--max_steps", "2", "--learning_rate", "3e-3")))  # fmt: skip
    argv = _argv(dolly_dir, tmp_path / "b", "--method", "hydralora", "--lora_nums", "2", "--max_steps", "1",
                 "--learning_rate", "0", "--peft_path", str(first))  # fmt: skip
    again = train(*parse_train_args(argv))
    before, after = (
        load_file(str(first / "adapter_model.safetensors")),
        load_file(str(again / "adapter_model.safetensors")),
    )
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    manifest = json.loads((tmp_path / "b" / "run_manifest.json").read_text())
    assert manifest["trainable_params"] == sum(t.numel() for t in before.values())
    other = _argv(
        dolly_dir, tmp_path / "c", "--method", "lora", "--max_steps", "1", "--peft_path", str(first)
    )
    with pytest.raises(ConfigError, match=r"--peft_path .*: adapter method 'hydralora' != --method 'lora'"):
        train(*parse_train_args(other))


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun missing",
)
@pytest.mark.slow
def test_two_process_ddp_training(dolly_dir: Path, tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    args = _argv(
        dolly_dir, out, "--method", "mtlora", "--lora_rank", "4", "--lora_nums", "4", "--enable_blc",
        "--enable_block_adapter", "--enable_spectral_reg", "--enable_fine_grained_routing", "--routing_group_size", "32",
        "--max_steps", "3", "--gradient_checkpointing", "True",
    )  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "train.py", *args],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_steps"] == 3
    assert (out / "sft_lora_model" / "adapter_model.safetensors").is_file()
    # every step logged its auxiliary terms (means over both ranks: the log's all_reduce ran on every rank)
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if "loss" in r and "task_loss" in r]
    assert len(train_logs) == 3
    for r in train_logs:
        assert r["balance_loss"] >= 0 and r["routing_entropy"] > 0 and 0 < r["expert_usage_min"] <= 0.25


def test_logged_auxiliary_means_single_process() -> None:
    """Without a process group the logged means are local; unknown-to-all keys are left out (the 2-rank case
    is checked in tests/_ddp_worker.py under torchrun)."""
    from mtlora.training.trainer import mean_over_ranks

    got = mean_over_ranks(
        {"balance_loss": 3.0, "spectral_loss": 0.5}, {"balance_loss": 4, "spectral_loss": 1}
    )
    assert got == {"balance_loss": 0.75, "spectral_loss": 0.5}
