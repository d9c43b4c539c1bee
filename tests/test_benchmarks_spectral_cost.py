"""Smoke test of benchmarks/spectral_cost.py at tiny shapes (schema and last line only; no timing assertions)."""

from __future__ import annotations

import json
import re
import sys

from _tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import spectral_cost  # noqa: E402


def test_spectral_cost_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "spectral_cost.json"
    argv = [
        "--layers",
        "2",
        "--experts",
        "3",
        "--rank",
        "4",
        "--hidden",
        "32",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    assert spectral_cost.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"matrices=6 eigh_ms=[0-9.]+ term_cached_w_ms=[0-9.]+ term_fresh_w_ms=[0-9.]+ eigh_share=[0-9.]+",
        last,
    )
    data = json.loads(out.read_text())
    assert data["config"]["matrices"] == 6
    assert set(data["median_ms"]) == {
        "eigh", "eigh_per_module", "grams_only", "term_cached_w", "term_fresh_w", "term_uniform"
    }  # fmt: skip
    assert all(v > 0 for v in data["median_ms"].values())
