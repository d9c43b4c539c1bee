"""Smoke test of benchmarks/scaling.py at a tiny size (JSON schema and closing lines; no timing assertions)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from _tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import scaling  # noqa: E402


def test_steps_budget_is_clamped_and_equal_across_methods() -> None:
    ns = scaling.resolve(
        scaling.build_parser().parse_args(
            ["--steps_per_task", "20", "--min_steps", "50", "--max_steps", "300"]
        )
    )
    assert [scaling.steps_for(n, ns) for n in (1, 5, 10, 25)] == [50, 100, 200, 300]
    assert ns.methods == list(scaling.DEFAULT_METHODS) and ns.ns == [5, 10, 15, 25]
    quick = scaling.resolve(scaling.build_parser().parse_args(["--quick", "--extended"]))
    assert quick.ns == [5, 15, 36] and quick.methods == list(scaling.QUICK_METHODS) and len(quick.seeds) == 1
    with pytest.raises(SystemExit):
        scaling.resolve(scaling.build_parser().parse_args(["--methods", "nope"]))


def test_mean_std() -> None:
    assert scaling.mean_std([0.5]) == (0.5, 0.0)
    m, s = scaling.mean_std([0.2, 0.4])
    assert m == pytest.approx(0.3) and s == pytest.approx(0.1414, abs=1e-3)


def test_scaling_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "scaling.json"
    argv = ["--ns", "2,3", "--methods", "lora,block_ffn", "--seeds", "0", "--steps_per_task", "5",
            "--min_steps", "10", "--max_steps", "10", "--train_per_task", "8", "--test_per_task", "2",
            "--pretrain_steps", "4", "--cache_dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    assert scaling.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 2
    for line, method in zip(lines[-2:], ("lora", "block_ffn")):
        assert re.fullmatch(rf"method={method} tasks=3 acc=[0-9.]+±[0-9.]+", line), line
    data = json.loads(out.read_text())
    assert data["benchmark"] == "scaling" and out.with_suffix(".png").is_file()
    assert data["config"]["ns"] == [2, 3] and data["config"]["steps"] == {"2": 10, "3": 10}
    assert set(data["summary"]) == {"lora", "block_ffn"}
    for rows in data["summary"].values():
        assert set(rows) == {"2", "3"}
        for r in rows.values():
            assert 0.0 <= r["mean"] <= 1.0 and r["std"] == 0.0 and len(r["per_seed"]) == 1
            assert 0.0 <= r["common_mean"] <= 1.0 and len(r["common_per_seed"]) == 1
    assert len(data["runs"]) == 4
    for r in data["runs"]:
        assert r["steps"] == 10 and len(r["per_task"]) == r["tasks"] and r["trainable_params"] > 0
    assert "cpu_count" in data["machine"] and data["total_seconds"] > 0
    assert not (tmp_path / "cache" / "work").exists()  # trained adapters are removed unless --keep_runs


def test_scaling_runs_the_baselines(tmp_path, capsys) -> None:
    """LoRAHub (per-task LoRAs, composed) and MMoELoRA (task-id gate) take part in the scaling benchmark."""
    out = tmp_path / "scaling.json"
    argv = ["--ns", "2", "--methods", "lorahub,mmoelora", "--seeds", "0", "--steps_per_task", "5",
            "--min_steps", "20", "--max_steps", "20", "--train_per_task", "8", "--test_per_task", "2",
            "--pretrain_steps", "4", "--cache_dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    assert scaling.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("method=lorahub tasks=2 acc=") and lines[-1].startswith(
        "method=mmoelora tasks=2 acc="
    )
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["runs"]} == {"lorahub", "mmoelora"}
    assert all(r["trainable_params"] > 0 for r in data["runs"])
