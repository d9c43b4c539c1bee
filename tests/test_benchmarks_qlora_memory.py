"""Smoke test of benchmarks/qlora_memory.py at tiny shapes: schema, last line, and the storage ordering."""

from __future__ import annotations

import json
import re
import sys

import pytest
from _tiny import REPO

pytest.importorskip("bitsandbytes", reason="the qlora extra (pip install -e '.[qlora]') is not installed")
sys.path.insert(0, str(REPO / "benchmarks"))
import qlora_memory  # noqa: E402


@pytest.mark.slow
def test_qlora_memory_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "qlora_memory.json"
    argv = ["--hidden", "128", "--inter", "256", "--heads", "4", "--layers", "2", "--tokens", "16", "--vocab", "64",
            "--adapter", "hydralora", "--out", str(out)]  # fmt: skip
    assert qlora_memory.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"peak_16bit_gib=[0-9.]+ peak_8bit_gib=[0-9.]+ peak_4bit_gib=[0-9.]+ "
        r"peak_8bit_vs_16bit=[0-9.]+ peak_4bit_vs_16bit=[0-9.]+",
        last,
    )
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"16bit", "8bit", "4bit"}
    for r in res.values():
        assert r["base_weights"] > 0 and r["adapter_and_optimizer"] > 0 and r["step_extra"] >= 0
        assert r["peak"] == r["base_weights"] + r["adapter_and_optimizer"] + r["step_extra"]
    # the same adapter on every base; the stored base shrinks with the bits (bf16: 2 bytes per weight)
    assert len({r["adapter_and_optimizer"] for r in res.values()}) == 1
    assert res["16bit"]["bytes_per_linear_weight"] == 2.0  # bf16
    assert 1.0 < res["8bit"]["bytes_per_linear_weight"] < 1.1  # int8 + an fp32 scale per row
    assert 0.5 < res["4bit"]["bytes_per_linear_weight"] < 0.6  # 4 bit + 8-bit absmax per 64 (double quant)
    assert res["4bit"]["base_weights_vs_16bit"] < res["8bit"]["base_weights_vs_16bit"] < 1.0
