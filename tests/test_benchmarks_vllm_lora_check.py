"""benchmarks/vllm_lora_check.py off the GPU: the preparation (base + per-task exports) runs, and without vLLM
the check says it was skipped instead of failing (gpu_check.sh runs it only where vllm is importable)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from _tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import vllm_lora_check  # noqa: E402


def test_prepare_only_writes_rank8_peft_exports(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert vllm_lora_check.main(["--prepare_only", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["vllm"] == "not run (--prepare_only)"
    for task, folder in result["exports"].items():
        cfg = json.loads((tmp_path / "w" / "exported" / folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8, task  # a rank vLLM's LoRA kernels accept
        assert cfg["base_model_name_or_path"] == result["base"]


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vllm installed: the real check applies"
)
def test_without_vllm_the_check_is_skipped_loudly(tmp_path, capsys) -> None:
    assert vllm_lora_check.main(["--out", str(tmp_path / "r.json")]) == 0
    assert "vllm is not installed: vLLM multi-LoRA check skipped" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()
