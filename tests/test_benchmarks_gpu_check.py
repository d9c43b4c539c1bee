"""benchmarks/gpu_check.sh runs on scarce GPU time: every flag it passes must exist in the script it calls."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from _tiny import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _invocations() -> list[tuple[str, list[str]]]:
    text = SCRIPT.read_text().replace("\\\n", " ")  # join continued lines
    calls = []
    for line in text.splitlines():
        m = re.search(r"\$PY (benchmarks/\S+\.py)(.*?)(\|\||$)", line)
        if m:
            calls.append((m.group(1), re.findall(r"(?<!\S)(--[\w-]+)", m.group(2))))
    return calls


@pytest.mark.slow
def test_gpu_check_flags_exist_in_each_benchmark() -> None:
    calls = _invocations()
    assert {c[0] for c in calls} == {
        "benchmarks/layer_speed.py",
        "benchmarks/train_step.py",
        "benchmarks/eval_speed.py",
        "benchmarks/qlora_memory.py",
        "benchmarks/vllm_lora_check.py",
    }
    for script, flags in calls:
        helptext = subprocess.run(
            [sys.executable, str(REPO / script), "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        ).stdout
        missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", helptext)]
        assert not missing, f"{script}: gpu_check.sh passes unknown flags {missing}"
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_gpu_check_step_limits_fit_one_device_command() -> None:
    """A device command may run 600 s; the steps' ``timeout`` limits must leave room for start-up."""
    text = SCRIPT.read_text()
    limits = [int(x) for x in re.findall(r"(?m)^\s*timeout (\d+) ", text)]
    assert len(limits) == 4 and sum(limits) <= 560, limits
    # the optional vLLM step gets only what the fixed steps left of the same 560 s budget
    assert "left=$((560 - SECONDS))" in text and 'timeout "$left" $PY benchmarks/vllm_lora_check.py' in text
    assert len(re.findall(r"(?m)^\s*timeout ", text)) == 5
