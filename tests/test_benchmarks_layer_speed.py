"""benchmarks/layer_speed.py at tiny shapes: JSON schema, fused == paper loop, the last-line contract.

No timing assertions: on a shared 2-core machine timings are noise at these sizes. What matters here is
that the benchmark runs end to end, that the paper-loop baseline really computes the fused layer's function
(otherwise the speedup would be meaningless), and that the output keeps the format other tools parse.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--d", "64", "--rank", "4", "--experts", "4", "--tokens", "16", "--spectral-matrices", "4"]
LAST_LINE = re.compile(r"fused_vs_naive_speedup=\d+\.\d{2} memory_ratio=\d+\.\d{2}")


@pytest.fixture
def ls(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The benchmark module, trimmed for speed: few repeats, short sweeps, one thread.

    One thread because at these sizes every op is a few microseconds and, on a busy 2-core machine, a
    2-thread parallel region can wait a whole scheduler slice for its second thread (restored afterwards).
    """
    if str(BENCH_DIR) not in sys.path:
        monkeypatch.syspath_prepend(str(BENCH_DIR))
    mod = importlib.import_module("layer_speed")
    monkeypatch.setattr(mod, "MAX_REPEATS", 2)
    monkeypatch.setattr(mod, "TOKEN_FACTORS", (0.5, 1.0))
    monkeypatch.setattr(mod, "EXPERT_SWEEP", (2, 4))
    monkeypatch.setattr(mod, "GROUP_SWEEP", (1, 8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield mod
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_paper_loop_matches_fused_layer(ls: ModuleType, groups: int) -> None:
    """Outputs and every gradient (x, A, router, each B_e) of the loop equal the fused layer's."""
    bundle = ls.build(
        ls.Shape(d=32, r=4, experts=3, groups=groups, tokens=10), torch.device("cpu"), torch.float32
    )
    layer, loop, x, gy = bundle["layer"], bundle["loop"], bundle["x"], bundle["grad_out"]
    assert all(b.data_ptr() == layer.lora_B[:, e, :].data_ptr() for e, b in enumerate(loop.experts))  # shared
    errs = ls.check_agreement(bundle, tol=1e-5)
    assert errs["max_rel_err_output"] < 1e-5 and errs["max_rel_err_grads"] < 1e-5
    y = loop(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-6)
    assert y.abs().max() > 0  # B was made non-zero, so the check is not vacuous
    y.backward(gy)
    assert all(b.grad is not None and b.grad.shape == (32, 4) for b in loop.experts)


def test_flop_count_matches_the_layers_gemms(ls: ModuleType) -> None:
    shape = ls.Shape(d=4096, r=16, experts=16, groups=2, tokens=2048)
    f = ls.layer_flops(shape)
    n, d, r, e, g = 2048, 4096, 16, 16, 2
    assert f["forward"] == {"A": 2 * n * d * r, "router": 2 * n * d * e * g, "experts": 2 * n * e * r * d}
    assert f["total"] == 3 * f["forward_total"] == f["forward_total"] + f["backward_total"]


def _check_schema(data: dict, quick: bool) -> None:
    assert data["benchmark"] == "layer_speed" and data["quick"] is quick
    for key in ("machine", "method", "summary", "configs", "sweeps", "spectral", "plot"):
        assert key in data, key
    s = data["summary"]
    for key in (
        "fused_vs_naive_speedup",
        "memory_ratio",
        "fused_vs_flop_bound",
        "gemm_gflops",
        "targets_met",
    ):
        assert key in s, key
    assert s["fused_vs_naive_speedup"] > 0 and s["memory_ratio"] > 0
    for rec in data["configs"]:
        assert rec["check"]["max_rel_err_output"] <= rec["check"]["tolerance"]
        for impl in ("fused", "naive"):
            assert rec["time_s"][impl]["median_s"] > 0
            assert rec["memory_bytes"][impl]["peak_extra"] > 0
            assert rec["memory_bytes"][impl]["saved_for_backward"] > 0
        assert rec["flop_bound_s"] > 0 and rec["layer_gemms_s"] > 0
        assert 0 < rec["best"]["fused_s"] <= rec["time_s"]["fused"]["median_s"]
        assert 0 < rec["best"]["naive_s"] <= rec["time_s"]["naive"]["median_s"]
    assert data["configs"][0]["name"] == s["config"]


def test_quick_run_writes_json_and_prints_contract_line_last(
    ls: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quick.json"
    assert ls.main([*TINY, "--quick", "--repeats", "1", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert LAST_LINE.fullmatch(lines[-1]), lines[-1]
    data = json.loads(out.read_text())
    _check_schema(data, quick=True)
    assert len(data["configs"]) == 1 and data["configs"][0]["groups"] == 1
    assert data["sweeps"] == {} and data["spectral"] is None and data["plot"] is None
    assert data["allocator_variants"] == {}
    assert set(data["allocator"]) == {"huge_pages", "THP_MEM_ALLOC_ENABLE", "kernel_transparent_hugepage"}
    s = data["summary"]
    assert (
        lines[-1]
        == f"fused_vs_naive_speedup={s['fused_vs_naive_speedup']:.2f} memory_ratio={s['memory_ratio']:.2f}"
    )


@pytest.mark.slow
def test_full_run_has_sweeps_spectral_and_plot(ls: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "full.json"
    result = ls.run(ls.parse_args([*TINY, "--repeats", "1", "--out", str(out)]), log=lambda _: None)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    _check_schema(data, quick=False)
    assert LAST_LINE.fullmatch(ls.summary_line(data))
    assert [row["groups"] for row in data["sweeps"]["groups"]["rows"]] == [1, 8]
    assert [row["experts"] for row in data["sweeps"]["experts"]["rows"]] == [2, 4]
    assert [row["tokens"] for row in data["sweeps"]["tokens"]["rows"]] == [8, 16]
    assert {r["name"] for r in data["configs"]} == {
        r["config"] for sw in data["sweeps"].values() for r in sw["rows"]
    }
    for sweep in data["sweeps"].values():
        assert set(sweep["growth_exponent"]) == {"fused", "naive", "flop_bound", "layer_gemms"}
    spec = data["spectral"]
    assert spec["matrices"] == 4 and spec["shape"] == [64, 4]
    for name in ("paper_term_loop", "paper_term_batched", "spectral_weights_refresh", "spectral_term_step"):
        assert spec["time_s"][name]["median_s"] > 0
    assert (tmp_path / data["plot"]).stat().st_size > 0
    # The main config again, in children under the other allocator settings. torch was imported before the
    # benchmark module here, so this process runs under torch's default (4 KiB pages) and that one is skipped.
    assert all(set(env) <= set(ls.ALLOCATOR_DEFAULTS) for env in ls.ALLOCATOR_VARIANTS.values())
    variants = data["allocator_variants"]
    assert set(variants) == {"huge_pages", "glibc_buffer_reuse"}
    for name, variant in variants.items():
        assert variant["env"] == ls.ALLOCATOR_VARIANTS[name]
        assert variant["summary"]["config"] == data["summary"]["config"]
        assert (
            variant["summary"]["fused_vs_naive_speedup"] > 0 and variant["summary"]["fused_vs_flop_bound"] > 0
        )
    assert variants["huge_pages"]["summary"]["huge_pages"] == (
        data["machine"]["kernel_transparent_hugepage"] in ("madvise", "always")
    )
    assert variants["glibc_buffer_reuse"]["summary"]["huge_pages"] is False


@pytest.mark.slow
@pytest.mark.parametrize("env_value", [None, "0"])
def test_script_turns_on_huge_pages_unless_told_otherwise(tmp_path: Path, env_value: str | None) -> None:
    """Run as a script, the benchmark sets THP_MEM_ALLOC_ENABLE=1 before importing torch; an explicit 0 wins."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = tmp_path / "q.json"
    cmd = [sys.executable, str(BENCH_DIR / "layer_speed.py"), *TINY, "--quick", "--repeats", "1"]
    proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    expected = "1" if env_value is None else env_value
    assert data["allocator"]["THP_MEM_ALLOC_ENABLE"] == expected
    assert data["machine"]["thp_mem_alloc_enable"] == expected
    kernel_grants = data["machine"]["kernel_transparent_hugepage"] in ("madvise", "always")
    assert data["summary"]["huge_pages"] is (expected == "1" and kernel_grants)
    assert data["allocator"]["huge_pages"] is data["summary"]["huge_pages"]


def test_quick_run_does_not_overwrite_the_full_results_by_default(ls: ModuleType) -> None:
    assert ls.parse_args([]).out == ls.DEFAULT_OUT
    assert ls.parse_args(["--quick"]).out == ls.DEFAULT_QUICK_OUT != ls.DEFAULT_OUT
    assert ls.parse_args(["--quick", "--out", "x.json"]).out == Path("x.json")
