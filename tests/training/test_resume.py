"""Exact kill-and-resume (issue 15 items 1, 4 and 9's resume parts; issue 12 item 2's resume requirement).

Every test trains the bundled tiny model through the real ``train()`` / ``train.py``. A run of 6 optimizer steps
with checkpoints at steps 3 and 6 is the "uninterrupted" reference; resuming from its ``checkpoint-3`` must give
the same adapter **bitwise** (``torch.equal`` on every tensor), for every method and every spectral mode. One test
SIGKILLs a real training subprocess after a checkpoint and resumes it with ``train.py --resume_from_checkpoint
True``. The rest check what a resume refuses: incomplete checkpoints, a missing path, a differing configuration.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtlora.cli import main as cli_main
from mtlora.cli import run_main
from mtlora.errors import ConfigError
from mtlora.losses import STATE_FILE
from mtlora.training import cli as training_cli
from mtlora.training.arguments import parse_train_args
from mtlora.training.run import train

REPO = Path(__file__).resolve().parents[2]
TINY = "mtlora:stories260k"

MTLORA_FULL = [
    "--method", "mtlora", "--lora_nums", "4", "--enable_blc", "--enable_block_adapter", "--block_adapter_type", "ffn",
    "--enable_fine_grained_routing", "--routing_group_size", "32", "--enable_spectral_reg", "--spectral_reg_lambda", "0.5",
]  # fmt: skip
CONFIGS = {
    "lora": ["--method", "lora"],
    "hydralora": ["--method", "hydralora", "--lora_nums", "4", "--enable_blc"],
    "mmoelora": ["--method", "mmoelora", "--expert_num", "4"],
    "mtlora_spectral": MTLORA_FULL,
    "mtlora_spectral_refresh": [*MTLORA_FULL, "--spectral_reg_refresh_steps", "2"],
    "mtlora_paper": [*MTLORA_FULL, "--spectral_reg_mode", "paper", "--spectral_reg_steps", "3"],
    "mtlora_uniform": [*MTLORA_FULL, "--spectral_reg_mode", "uniform"],
}
#: Configurations whose regularizer state changes what later steps compute.
STATEFUL = ("mtlora_spectral_refresh", "mtlora_paper")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread here and in the subprocesses (OMP_NUM_THREADS=1 in :func:`_env`): on this shared 2-core
    machine two threads under load make these runs ~8x slower, and the uninterrupted and resumed runs of a
    comparison must use the same thread count for a bitwise comparison to be meaningful."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dolly_dir(tmp_path_factory) -> Path:
    shared = REPO.parent / "shared" / "data" / "dolly15k_sample" / "dolly_sample.jsonl"
    if not shared.is_file():
        pytest.skip(f"shared data not found at {shared}")
    out = tmp_path_factory.mktemp("dolly")
    assert cli_main(["data", "dolly", str(shared), str(out)]) == 0
    return out


def _argv(data: Path, out: Path, config: str, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", TINY, "--dataset_dir", str(data), "--output_dir", str(out),
        "--max_seq_length", "128", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--disable_tqdm", "True", "--max_train_samples", "48", "--dataloader_drop_last", "True",
        "--data_cache_dir", str(data.parent / "resume_tokenized_cache"),
        "--lora_rank", "4", "--lora_dropout", "0.1", "--learning_rate", "5e-3",
        "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "3",
        *CONFIGS[config], *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(dolly_dir: Path, tmp_path_factory):
    """``get(config)`` -> output folder of one uninterrupted 6-step run (trained once per module)."""
    runs: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in runs:
            out = tmp_path_factory.mktemp(f"full_{config}") / "run"
            train(*parse_train_args(_argv(dolly_dir, out, config)))
            runs[config] = out
        return runs[config]

    return get


def _assert_same_adapter(a: Path, b: Path) -> None:
    x = load_file(str(a / "adapter_model.safetensors"))
    y = load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k}: max |diff| {(x[k] - y[k]).abs().max().item():.3e}"


def _differs(a: Path, b: Path) -> bool:
    x = load_file(str(a / "adapter_model.safetensors"))
    y = load_file(str(b / "adapter_model.safetensors"))
    return any(not torch.equal(x[k], y[k]) for k in x)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _step_losses(out: Path) -> dict[int, tuple]:
    keys = ("loss", "task_loss", "balance_loss", "spectral_loss", "grad_norm", "learning_rate")
    return {r["step"]: tuple(r.get(k) for k in keys) for r in _log(out) if "task_loss" in r}


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_from_mid_checkpoint_is_bitwise_exact(
    config: str, uninterrupted, dolly_dir: Path, tmp_path: Path
) -> None:
    full = uninterrupted(config)
    ckpt = full / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file() and (full / "checkpoint-6").is_dir()
    if config.startswith("mtlora"):
        assert (ckpt / STATE_FILE).is_file()
    out = tmp_path / "resumed"
    adapter = train(*parse_train_args(_argv(dolly_dir, out, config, "--resume_from_checkpoint", str(ckpt))))
    _assert_same_adapter(full / "sft_lora_model", adapter)
    # the continuation logs the same numbers for steps 4-6, and only those steps
    full_steps, resumed_steps = _step_losses(full), _step_losses(out)
    assert sorted(resumed_steps) == [4, 5, 6]
    assert {s: full_steps[s] for s in resumed_steps} == resumed_steps
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert (
        manifest["spectral_applications"]
        == json.loads((full / "run_manifest.json").read_text())["spectral_applications"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("config", STATEFUL)
def test_without_the_regularizer_state_the_resume_differs(
    config: str, uninterrupted, dolly_dir: Path, tmp_path: Path, caplog
) -> None:
    """Control for the test above: the saved regularizer state is what makes these resumes exact."""
    full = uninterrupted(config)
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(full / "checkpoint-3", ckpt)
    (ckpt / STATE_FILE).unlink()
    with pytest.raises(ConfigError, match=f"missing {STATE_FILE}.*Add --force"):
        train(
            *parse_train_args(_argv(dolly_dir, tmp_path / "r", config, "--resume_from_checkpoint", str(ckpt)))
        )
    with caplog.at_level(logging.WARNING, logger="mtlora.training"):
        adapter = train(
            *parse_train_args(
                _argv(dolly_dir, tmp_path / "r", config, "--resume_from_checkpoint", str(ckpt), "--force")
            )
        )
    assert any(STATE_FILE in r.getMessage() and "--force" in r.getMessage() for r in caplog.records)
    assert _differs(full / "sft_lora_model", adapter)


@pytest.mark.slow
def test_sigkilled_training_resumes_exactly(uninterrupted, dolly_dir: Path, tmp_path: Path) -> None:
    """SIGKILL a real training process after checkpoint-3 (with log records of steps 4 and 5 already written),
    then ``train.py --resume_from_checkpoint True``: same adapter as the uninterrupted run, each step logged once."""
    config = "mtlora_spectral_refresh"
    full = uninterrupted(config)
    out = tmp_path / "killed"
    env = _env()
    worker = [sys.executable, str(REPO / "tests" / "_resume_worker.py"), "5", *_argv(dolly_dir, out, config)]
    proc = subprocess.Popen(
        worker, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        deadline = time.monotonic() + 240
        line = ""
        assert proc.stdout is not None
        while time.monotonic() < deadline and not line.startswith("PAUSED"):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert line.startswith("PAUSED 5"), f"worker did not reach step 5 (rc={proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoint-3" / "trainer_state.json").is_file() and not (out / "sft_lora_model").exists()
    assert 5 in {r["step"] for r in _log(out)}  # records past the checkpoint, to be dropped on resume

    res = subprocess.run(
        [sys.executable, "train.py", *_argv(dolly_dir, out, config, "--resume_from_checkpoint", "True")],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_adapter(full / "sft_lora_model", out / "sft_lora_model")
    steps = [r["step"] for r in _log(out) if "task_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert _step_losses(out) == _step_losses(full)


# ------------------------------------------------------------------------------------------ what is refused
@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt", "rng_state.pth", STATE_FILE])
def test_incomplete_checkpoint_is_refused_without_force(
    missing: str, uninterrupted, dolly_dir: Path, tmp_path: Path, caplog
) -> None:
    full = uninterrupted("mtlora_paper")
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(full / "checkpoint-3", ckpt)
    (ckpt / missing).unlink()
    argv = _argv(dolly_dir, tmp_path / "r", "mtlora_paper", "--resume_from_checkpoint", str(ckpt))
    with pytest.raises(ConfigError, match=rf"incomplete checkpoint, missing {missing}: .*Add --force"):
        train(*parse_train_args(argv))
    assert not (tmp_path / "r" / "run_config.json").exists()  # refused before anything was written
    with caplog.at_level(logging.WARNING, logger="mtlora.training"):
        train(*parse_train_args([*argv, "--force"]))
    warned = [r.getMessage() for r in caplog.records if missing in r.getMessage()]
    assert len(warned) == 1 and "without" in warned[0], caplog.text
    assert (tmp_path / "r" / "sft_lora_model" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "missing", ["trainer_state.json", "adapter_model.safetensors", "adapter_config.json"]
)
def test_checkpoint_without_state_or_weights_is_refused_even_with_force(
    missing: str, uninterrupted, dolly_dir: Path, tmp_path: Path
) -> None:
    full = uninterrupted("mtlora_paper")
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(full / "checkpoint-3", ckpt)
    (ckpt / missing).unlink()
    argv = _argv(dolly_dir, tmp_path / "r", "mtlora_paper", "--resume_from_checkpoint", str(ckpt), "--force")
    with pytest.raises(ConfigError, match=rf"cannot resume, missing {missing} .*--peft_path"):
        train(*parse_train_args(argv))


def test_resume_true_is_the_latest_complete_checkpoint(
    uninterrupted, dolly_dir: Path, tmp_path: Path, caplog
) -> None:
    """``True`` = latest checkpoint in --output_dir; one left incomplete by a kill during its save is skipped with a
    warning. The copied train_log.jsonl (steps 1-6) is cut back to step 3 before steps 4-6 are logged again."""
    config = "mtlora_paper"
    full = uninterrupted(config)
    out = tmp_path / "run"
    shutil.copytree(full, out)
    shutil.rmtree(out / "sft_lora_model")
    (out / "checkpoint-6" / "rng_state.pth").unlink()  # as if killed while checkpoint-6 was being written
    with caplog.at_level(logging.WARNING, logger="mtlora.training"):
        adapter = train(*parse_train_args(_argv(dolly_dir, out, config, "--resume_from_checkpoint", "True")))
    assert any(
        "checkpoint-6 is incomplete" in r.getMessage() and "checkpoint-3" in r.getMessage()
        for r in caplog.records
    )
    _assert_same_adapter(full / "sft_lora_model", adapter)
    steps = [r["step"] for r in _log(out) if "task_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_true_without_checkpoints_and_missing_paths_are_errors(
    dolly_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "empty"
    with pytest.raises(
        ConfigError, match=r"--resume_from_checkpoint True: no checkpoint-<step> folder in --output_dir"
    ):
        train(*parse_train_args(_argv(dolly_dir, out, "lora", "--resume_from_checkpoint", "True")))
    missing = tmp_path / "nowhere" / "checkpoint-3"
    with pytest.raises(ConfigError, match=rf"--resume_from_checkpoint {missing}: no such checkpoint folder"):
        train(*parse_train_args(_argv(dolly_dir, out, "lora", "--resume_from_checkpoint", str(missing))))
    # through train.py's entry point (run_main, as `python train.py` runs it): one error line, exit 2
    argv = _argv(dolly_dir, out, "lora", "--resume_from_checkpoint", str(missing))
    assert run_main(training_cli.main, argv, prog="train.py") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [x for x in err.splitlines() if x.startswith("error:")] == [
        f"error: --resume_from_checkpoint {missing}: no such checkpoint folder"
    ]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--lora_alpha", "32"], ["--lora_alpha 32.0 (checkpoint: 64.0)"]),
        (["--lora_rank", "8"], ["--lora_rank 8 (checkpoint: 4)"]),
        (
            ["--spectral_reg_lambda", "0.1", "--spectral_reg_steps", "2"],
            ["--spectral_reg_lambda", "--spectral_reg_steps"],
        ),
        (["--learning_rate", "1e-3"], ["--learning_rate 0.001 (checkpoint: 0.005)"]),
        (["--max_seq_length", "96"], ["--max_seq_length 96 (checkpoint's run: 128)"]),
    ],
)
def test_resume_with_a_different_config_is_refused(
    change: list[str], named: list[str], uninterrupted, dolly_dir: Path, tmp_path: Path
) -> None:
    full = uninterrupted("mtlora_paper")
    argv = _argv(
        dolly_dir,
        tmp_path / "r",
        "mtlora_paper",
        "--resume_from_checkpoint",
        str(full / "checkpoint-3"),
        *change,
    )
    with pytest.raises(ConfigError, match="configuration differs from the checkpoint's run") as exc:
        train(*parse_train_args(argv))
    for text in named:
        assert text in str(exc.value), str(exc.value)


def test_resume_with_another_method_or_without_fgr_is_refused(
    uninterrupted, dolly_dir: Path, tmp_path: Path
) -> None:
    full = uninterrupted("mtlora_paper")
    ckpt = str(full / "checkpoint-3")
    argv = _argv(dolly_dir, tmp_path / "r", "hydralora", "--resume_from_checkpoint", ckpt)
    with pytest.raises(ConfigError) as exc:
        train(*parse_train_args(argv))
    msg = str(exc.value)
    for flag in (
        "--enable_block_adapter",
        "--enable_fine_grained_routing",
        "--enable_spectral_reg",
        "--routing_group_size",
    ):
        assert flag in msg, msg


def test_spectral_reg_steps_outside_paper_mode_is_noted_once(tmp_path: Path, caplog) -> None:
    """The released scripts pass --spectral_reg_steps with the default mode: no effect there, and one note says so."""
    from _tiny import tiny_model

    from mtlora import MtLoraConfig, get_mtlora_model
    from mtlora.training.arguments import MtLoraTrainingArguments
    from mtlora.training.trainer import MtLoraTrainer

    def make(**kw) -> None:
        cfg = MtLoraConfig(method="mtlora", lora_rank=4, lora_nums=2, enable_spectral_reg=True, **kw)
        args = MtLoraTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        MtLoraTrainer(model=get_mtlora_model(tiny_model("llama"), cfg), args=args)

    with caplog.at_level(logging.WARNING, logger="mtlora.training"):
        make(spectral_reg_steps=500)
    notes = [
        r.getMessage() for r in caplog.records if "--spectral_reg_steps 500 has no effect" in r.getMessage()
    ]
    assert len(notes) == 1 and "--spectral_reg_mode paper" in notes[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtlora.training"):
        make(spectral_reg_steps=500, spectral_reg_mode="paper")
        make()
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_checkpoint_problems_per_rank_rng_and_deepspeed(tmp_path: Path) -> None:
    """Which files count: this rank's rng_state_<rank>.pth under DDP; DeepSpeed's engine folder for the optimizer."""
    from types import SimpleNamespace

    from mtlora.training.trainer import checkpoint_problems

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt",
                 "scheduler.pt", "rng_state_0.pth"):  # fmt: skip
        (ckpt / name).write_text("x")
    ddp = SimpleNamespace(world_size=2, process_index=0, deepspeed=None)
    assert checkpoint_problems(ckpt, ddp) == ([], [])
    fatal, soft = checkpoint_problems(ckpt, SimpleNamespace(world_size=2, process_index=1, deepspeed=None))
    assert fatal == [] and [s.split(":")[0] for s in soft] == ["rng_state_1.pth"]
    fatal, soft = checkpoint_problems(ckpt, SimpleNamespace(world_size=1, process_index=0, deepspeed=None))
    assert [s.split(":")[0] for s in soft] == ["rng_state.pth"]
    (ckpt / "optimizer.pt").unlink()
    ds = SimpleNamespace(world_size=2, process_index=0, deepspeed="ds.json")
    assert [s.split(":")[0] for s in checkpoint_problems(ckpt, ds)[1]] == ["optimizer.pt"]
    (ckpt / "global_step3").mkdir()
    assert checkpoint_problems(ckpt, ds) == ([], [])
