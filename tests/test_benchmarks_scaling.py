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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_fixed_budget_and_output_names() -> None:
    fixed = scaling.resolve(scaling.build_parser().parse_args(["--budget", "fixed", "--total_steps", "50"]))
    assert [scaling.steps_for(n, fixed) for n in (1, 5, 36)] == [50, 50, 50]
    assert fixed.out.name == "scaling_fixed.json"
    assert scaling.resolve(
        scaling.build_parser().parse_args(["--budget", "fixed", "--quick"])
    ).total_steps == (scaling.QUICK_FIXED_TOTAL_STEPS)
    assert scaling.resolve(scaling.build_parser().parse_args([])).out.name == "scaling.json"
    assert scaling.resolve(scaling.build_parser().parse_args(["--quick"])).out.name == "scaling_quick.json"
    with pytest.raises(SystemExit):  # beyond the letter suite without Natural Instructions tasks
        scaling.resolve(scaling.build_parser().parse_args(["--ns", "40"]))
    with pytest.raises(SystemExit):
        scaling.resolve(scaling.build_parser().parse_args(["--budget", "fixed", "--total_steps", "0"]))


def test_suite_beyond_36_appends_short_natural_instructions_tasks(shared_dir) -> None:
    niv1 = str(shared_dir / "data" / "natural_instructions_v1")
    ns = scaling.resolve(
        scaling.build_parser().parse_args(["--ns", "5,38,39", "--niv1_dir", niv1, "--train_per_task", "10"])
    )
    s38, s39 = scaling.build_scaling_suite(38, ns), scaling.build_scaling_suite(39, ns)
    names = s39.task_names
    assert names[:36] == list(scaling_tasks()) and len(names) == 39 and s38.task_names == names[:38]
    # prefix-stable: the first tasks' examples do not depend on N
    for task in names[:38]:
        a = sorted(json.dumps(dict(r), sort_keys=True) for r in s38.train if r["task_type"] == task)
        b = sorted(json.dumps(dict(r), sort_keys=True) for r in s39.train if r["task_type"] == task)
        assert a == b and a
    for r in s39.train + s39.test:
        if r["task_type"] in names[36:]:
            assert len(r["input"].split()) <= scaling.NIV1_INPUT_WORDS and len(r["output"].split()) <= 3
            assert not r["instruction"].startswith("subtask") and len(r["instruction"]) < 80
    with pytest.raises(SystemExit):
        scaling.resolve(scaling.build_parser().parse_args(["--ns", "1000", "--niv1_dir", niv1]))


def scaling_tasks() -> list[str]:
    from mtlora.data.manytask import task_names

    return task_names()


@pytest.mark.slow
def test_scaling_fixed_budget_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "fixed.json"
    argv = ["--budget", "fixed", "--total_steps", "6", "--ns", "2,3", "--methods", "lora,hydralora", "--seeds",
            "0", "--train_per_task", "8", "--test_per_task", "2", "--pretrain_steps", "4", "--first_tasks", "5",
            "--cache_dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    # an interrupted earlier invocation finished one run: --resume reuses it instead of training again
    ns = scaling.resolve(scaling.build_parser().parse_args(argv))
    fake = {"tasks": 2, "budget": "fixed", "method": "lora", "seed": 0, "steps": 6, "accuracy": 0.125,
            "per_task": {t: 0.125 for t in scaling_tasks()[:2]}, "train_loss": 1.0, "trainable_params": 1,
            "train_seconds": 0.0, "eval_seconds": 0.0, "wall_seconds": 0.0}  # fmt: skip
    journal = tmp_path / "cache" / "fixed.runs.jsonl"
    scaling._common.journal_append(journal, {"key": "not-this-config", "row": dict(fake, accuracy=0.5)})
    scaling._common.journal_append(journal, {"key": scaling.run_key(ns, 2, "lora", 0), "row": fake})
    journal.write_text(journal.read_text() + '{"key": "torn')  # a write cut short by a kill
    assert scaling.main([*argv, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "N=2 lora seed=0: reused from" in text
    assert (
        len(scaling._common.journal_read(journal)) == 4
    )  # kept (cache): a later --resume with more seeds reuses it
    lines = text.strip().splitlines()
    for line, method in zip(lines[-2:], ("lora", "hydralora")):
        assert re.fullmatch(rf"method={method} tasks=3 acc=[0-9.]+±[0-9.]+", line), line
    assert "fixed budget: 6 steps at every N" in text
    data = json.loads(out.read_text())
    assert data["config"]["budget"] == "fixed" and data["config"]["steps"] == {"2": 6, "3": 6}
    assert all(r["steps"] == 6 and r["budget"] == "fixed" for r in data["runs"])
    assert data["runs"][0] == fake and all(r["trainable_params"] > 1 for r in data["runs"][1:])
    for rows in data["summary"].values():
        # the first tasks are those of the smallest N (2 here), each with its own accuracy per N
        assert list(rows["2"]["first_tasks"]) == list(rows["3"]["first_tasks"]) == scaling_tasks()[:2]
        for cell in rows["3"]["first_tasks"].values():
            assert 0 <= cell["mean"] <= 1 and len(cell["per_seed"]) == 1
    assert out.with_suffix(".png").is_file() and (tmp_path / "fixed_first_tasks.png").is_file()
