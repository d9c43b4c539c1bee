"""Smoke test of benchmarks/train_step.py at tiny shapes (schema and last line only; no timing assertions)."""

from __future__ import annotations

import json
import re
import sys

from _tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import train_step  # noqa: E402


def test_train_step_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "train_step.json"
    argv = ["--hidden", "64", "--inter", "96", "--heads", "4", "--layers", "1", "--tokens", "16", "--vocab", "64",
            "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert train_step.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"hydralora_s=[0-9.]+ mtlora_s=[0-9.]+ mtlora_vs_hydralora_time=[0-9.]+ mtlora_vs_hydralora_memory=[0-9.]+",
        last,
    )
    data = json.loads(out.read_text())
    assert set(data["results"]) == set(train_step.METHODS)
    for r in data["results"].values():
        assert r["step_s"] > 0 and r["trainable_params"] > 0 and r["peak_extra_bytes"] >= 0
