"""``--push_to_hub REPO`` (mtlora.publish): refused offline before any work, one clear line; failures keep the folder.

No test reaches the network: offline mode is the real huggingface_hub switch, and the upload failure path
talks to a closed local port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtlora.cli import main as cli_main
from mtlora.errors import ConfigError
from mtlora.publish import check_push_target
from mtlora.training.arguments import parse_train_args

TINY = "mtlora:stories260k"


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_push_offline_is_refused_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "x"
    rc = cli_main(
        ["export", str(tmp_path / "missing_adapter"), "--output_dir", str(out), "--push_to_hub", "me/tiny"]
    )
    assert rc == 2
    line = _one_error_line(capsys)
    assert "--push_to_hub me/tiny" in line and "HF_HUB_OFFLINE=1" in line and "hf upload" in line
    assert not out.exists()  # refused before the (here impossible) export started


def test_train_push_offline_is_refused_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "d.json"
    data.write_text('[{"instruction": "a", "input": "", "output": "b", "task_type": "t"}]')
    out = tmp_path / "OUT"
    argv = ["train", "--model_name_or_path", TINY, "--train_file", str(data), "--output_dir", str(out),
            "--push_to_hub", "me/tiny"]  # fmt: skip
    assert cli_main(argv) == 2
    assert "HF_HUB_OFFLINE=1" in _one_error_line(capsys)
    assert not (out / "sft_lora_model").exists()


def test_push_to_hub_spellings(tmp_path: Path) -> None:
    data = tmp_path / "d.json"
    data.write_text('[{"instruction": "a", "input": "", "output": "b", "task_type": "t"}]')
    common = ["--model_name_or_path", TINY, "--train_file", str(data), "--output_dir", str(tmp_path / "o")]
    # check_paths=False: flag parsing only (the offline check belongs to the machine that trains)
    for extra in (
        ["--push_to_hub", "me/tiny"],
        ["--push_to_hub=me/tiny"],
        ["--push_to_hub", "--hub_model_id", "me/tiny"],
    ):
        _, _, _, t = parse_train_args(common + extra, check_paths=False)
        assert t.push_to_hub is True and t.hub_model_id == "me/tiny", extra
    _, _, _, t = parse_train_args(common + ["--push_to_hub", "false"], check_paths=False)
    assert t.push_to_hub is False
    with pytest.raises(ConfigError, match="name the Hub repo"):
        parse_train_args(common + ["--push_to_hub"], check_paths=False)
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        check_push_target("me/a b")


_PUSH = """
import sys
from mtlora.errors import MtLoraError
from mtlora.publish import push_folder
try:
    push_folder(sys.argv[1], "me/tiny")
except MtLoraError as exc:
    print(exc)
    sys.exit(3)
"""


def test_upload_failure_is_one_line_and_keeps_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("card\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_real_token", HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run(
        [sys.executable, "-c", _PUSH, str(folder)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    msg = proc.stdout.strip()
    assert "\n" not in msg and msg.startswith("--push_to_hub me/tiny: upload failed")
    assert f"{folder} is complete on disk" in msg and f"hf upload me/tiny {folder}" in msg
    assert (folder / "README.md").read_text() == "card\n"
