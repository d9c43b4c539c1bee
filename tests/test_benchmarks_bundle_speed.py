"""Smoke test of benchmarks/bundle_speed.py at tiny shapes (schema and last line only; no timing assertions)."""

from __future__ import annotations

import json
import re
import sys

from _tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bundle_speed  # noqa: E402


def test_bundle_speed_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "bundle_speed.json"
    argv = ["--hidden", "64", "--inter", "96", "--heads", "4", "--layers", "2", "--vocab", "64", "--rank", "4",
            "--experts", "2", "--batch", "2", "--prompt_tokens", "4", "--new_tokens", "3", "--repeats", "1",
            "--out", str(out)]  # fmt: skip
    assert bundle_speed.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"base_tok_s=[0-9.]+ bundle_tok_s=[0-9.]+ bundle_vs_base=[0-9.]+ routed_vs_base=[0-9.]+", last
    )
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"base", "bundle", "routed"} and data["hooks"] == 2  # one per FFN block
    assert all(r["tokens_per_s"] > 0 for r in data["results"].values())
