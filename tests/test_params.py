"""Parameter counts reproduce the paper's table exactly (LLaMA-2 configs on the meta device, no weights)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from _tiny import REPO

from mtlora.cli import main as cli_main
from mtlora.config import MtLoraConfig
from mtlora.params import count_parameters

L7 = str(REPO / "tests" / "fixtures" / "llama-2-7b")
L13 = str(REPO / "tests" / "fixtures" / "llama-2-13b")
BASE_7B = 6_738_415_616


@pytest.mark.parametrize(
    "model,kwargs,expected",
    [
        (L7, dict(method="hydralora"), 75_497_472),
        (L7, dict(method="mtlora", enable_block_adapter=True, block_adapter_type="ffn"), 37_748_736),
        (L7, dict(method="mtlora", enable_block_adapter=True, block_adapter_type="attention"), 37_748_736),
        (L7, dict(method="mtlora", enable_block_adapter=True, block_adapter_type="both"), 75_497_472),
        (
            L7,
            dict(
                method="mtlora",
                enable_block_adapter=True,
                enable_fine_grained_routing=True,
                routing_group_size=2048,
            ),
            39_845_888,
        ),
        (
            L7,
            dict(
                method="mtlora",
                enable_block_adapter=True,
                enable_fine_grained_routing=True,
                routing_group_size=512,
            ),
            52_428_800,
        ),
        (
            L7,
            dict(
                method="mtlora",
                enable_block_adapter=True,
                enable_fine_grained_routing=True,
                routing_group_size=128,
            ),
            102_760_448,
        ),
        (L13, dict(method="hydralora"), 117_964_800),
        (L13, dict(method="mtlora", enable_block_adapter=True), 58_982_400),
        (
            L13,
            dict(
                method="mtlora",
                enable_block_adapter=True,
                enable_fine_grained_routing=True,
                routing_group_size=2560,
            ),
            62_259_200,
        ),
    ],
)
def test_paper_table_counts(model: str, kwargs: dict, expected: int) -> None:
    trainable, total = count_parameters(model, MtLoraConfig(**kwargs))
    assert trainable == expected
    if model == L7:
        assert total == BASE_7B + expected


def test_params_cli_line(capsys) -> None:
    argv = [
        "params",
        "--model_name_or_path",
        L7,
        "--method",
        "hydralora",
        "--lora_rank",
        "16",
        "--lora_nums",
        "16",
    ]
    assert cli_main(argv) == 0
    line = capsys.readouterr().out.strip()
    m = re.fullmatch(r"trainable_params=(\d+) total_params=(\d+) percent=([0-9.]+)", line)
    assert m and int(m[1]) == 75_497_472 and int(m[2]) == BASE_7B + 75_497_472
    assert abs(float(m[3]) - 1.108) < 1e-3


@pytest.mark.slow
def test_params_cli_errors_are_one_line(tmp_path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mtlora.cli", "params", *args], capture_output=True, text=True, timeout=120
        )

    bad_gs = run(
        "--model_name_or_path",
        L7,
        "--method",
        "mtlora",
        "--enable_fine_grained_routing",
        "--routing_group_size",
        "1000",
    )
    assert (
        bad_gs.returncode == 2
        and bad_gs.stderr.strip().count("\n") == 0
        and "routing_group_size=1000" in bad_gs.stderr
    )
    empty = run("--model_name_or_path", str(tmp_path), "--method", "lora")
    assert empty.returncode == 2 and "no config.json" in empty.stderr
    wrong = run("--model_name_or_path", L7, "--method", "hydralora", "--enable_block_adapter")
    assert wrong.returncode == 2 and "use --method mtlora" in wrong.stderr


def test_params_reads_the_config_through_the_hub_and_never_runs_remote_code(tmp_path, capsys) -> None:
    """``mtlora:`` names work, and a config that needs shipped code is one error line unless
    ``--trust_remote_code`` is given (stdin is never asked)."""
    import json
    import shutil

    from mtlora.hub import resolve_model_path

    assert cli_main(["params", "--model_name_or_path", "mtlora:stories260k", "--method", "lora"]) == 0
    assert capsys.readouterr().out.startswith("trainable_params=")
    custom = tmp_path / "custom"
    shutil.copytree(resolve_model_path("mtlora:stories260k"), custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["model_type"] = "mtlora_custom_test"
    cfg["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig"}
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    assert cli_main(["params", "--model_name_or_path", str(custom), "--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert f"--model_name_or_path {custom}: the model needs Python code shipped with it" in err
    assert "custom code ran" not in err
