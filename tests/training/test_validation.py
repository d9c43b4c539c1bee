"""Training command-line checks that run before anything is loaded (mtlora.training.validation).

Each bad input of issue 15 gives exactly one ``error:`` line naming the flag, exit status 2, no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlora.cli import main as cli_main
from mtlora.errors import ConfigError
from mtlora.training.arguments import parse_train_args

TINY = "mtlora:stories260k"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    rows = [
        {"instruction": f"say {w}", "input": "", "output": w, "task_type": t}
        for w, t in [("a", "x"), ("b", "y")]
    ]
    (d / "train.json").write_text(json.dumps(rows))
    return d


def _argv(data: Path, out: Path | None, *extra: str) -> list[str]:
    argv = ["--model_name_or_path", TINY, "--dataset_dir", str(data), "--max_steps", "1", *extra]
    return argv + (["--output_dir", str(out)] if out is not None else [])


def _error_line(capsys, argv: list[str]) -> str:
    rc = cli_main(["train", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lora_alpha", "nan"),
        ("--blc_alpha", "inf"),
        ("--lora_dropout", "nan"),
        ("--spectral_reg_lambda", "-inf"),
        ("--learning_rate", "nan"),
        ("--weight_decay", "inf"),
        ("--max_grad_norm", "nan"),
        ("--adam_epsilon", "nan"),
        ("--num_train_epochs", "inf"),
        ("--warmup_steps", "nan"),
    ],
)
def test_non_finite_hyper_parameters_rejected_at_parse_time(
    flag: str, value: str, data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=rf"{flag.lstrip('-')}.*{value}.*finite"):
        parse_train_args(
            _argv(data_dir, tmp_path / "o", f"{flag}={value}", "--enable_blc", "--lora_nums", "2")
        )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--gradient_accumulation_steps", "0"],
            "--gradient_accumulation_steps 0: must be a positive integer",
        ),
        (
            ["--per_device_train_batch_size", "0"],
            "--per_device_train_batch_size 0: must be a positive integer",
        ),
        (["--max_train_samples", "0"], "--max_train_samples 0: must be a positive integer"),
        (["--max_train_samples", "-1"], "--max_train_samples -1: must be a positive integer"),
        (["--max_seq_length", "1"], "--max_seq_length 1: must be >= 2"),
        (["--learning_rate=-1e-4"], "--learning_rate -0.0001: must be >= 0"),
        (["--adam_beta2", "1.0"], "--adam_beta2 1.0: must be in [0, 1)"),
        (["--peft_path", "/nonexistent/adapter"], "--peft_path /nonexistent/adapter: not an adapter folder"),
    ],
)
def test_range_checks_name_the_flag(
    extra: list[str], expected: str, data_dir: Path, tmp_path: Path, capsys
) -> None:
    assert expected in _error_line(capsys, _argv(data_dir, tmp_path / "o", *extra))
    assert not (tmp_path / "o").exists()  # nothing was created or loaded


def test_output_dir_is_required_not_trainer_output(
    data_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # transformers 5 would default to ./trainer_output
    assert "--output_dir is required" in _error_line(capsys, _argv(data_dir, None))
    assert not (tmp_path / "trainer_output").exists()
    cfg = tmp_path / "run.json"  # given through --config it counts
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "o")}))
    _, _, _, train_args = parse_train_args(["--config", str(cfg), *_argv(data_dir, None)])
    assert train_args.output_dir == str(tmp_path / "o")


def test_output_dir_paths_are_checked(data_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    line = _error_line(capsys, _argv(data_dir, tmp_path / "afile"))
    assert "--output_dir" in line and "afile: exists and is not a folder" in line
    line = _error_line(capsys, _argv(data_dir, tmp_path / "afile" / "sub"))
    assert "--output_dir" in line and "is a file" in line
    line = _error_line(capsys, _argv(data_dir, tmp_path / "o", "--data_cache_dir", str(tmp_path / "afile")))
    assert "--data_cache_dir" in line and "not a folder" in line


def test_missing_data_and_model_paths(data_dir: Path, tmp_path: Path, capsys) -> None:
    line = _error_line(capsys, ["--model_name_or_path", TINY, "--dataset_dir", str(tmp_path / "nodata"),
                                "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert "--dataset_dir" in line and "nodata" in line
    line = _error_line(capsys, _argv(data_dir, tmp_path / "o", "--validation_file", str(tmp_path / "v.json")))
    assert "--validation_file" in line
    argv = _argv(data_dir, tmp_path / "o2")
    argv[1] = str(tmp_path / "no_model_here")
    line = _error_line(capsys, argv)
    assert line == f"error: --model_name_or_path {tmp_path / 'no_model_here'}: no such folder"


def test_deepspeed_without_the_package_is_one_line(data_dir: Path, tmp_path: Path, capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    line = _error_line(capsys, _argv(data_dir, tmp_path / "o", "--deepspeed", str(ds)))
    assert "--deepspeed" in line and "not installed" in line


def test_deeply_nested_config_file(data_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "deep.json"
    cfg.write_text("[" * 100_000 + "]" * 100_000)
    line = _error_line(capsys, ["--config", str(cfg), *_argv(data_dir, tmp_path / "o")])
    assert "deep.json" in line
