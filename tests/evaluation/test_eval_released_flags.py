"""The released eval scripts' flags (issue 13): ``--auto_batch`` halves the batch on out-of-memory down to
``--fallback_batch_size``; ``--adaptive_max_length``; the released ``mmlu_dataset`` skeleton."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtlora.errors import MtLoraError
from mtlora.evaluation.autobatch import RetryingEngine
from mtlora.evaluation.cli import ADAPTIVE_MAX_LENGTH, released_mmlu_skeleton, run
from mtlora.evaluation.engine import Engine, GenRequest

TINY = "mtlora:stories260k"


class _DeviceFits:
    """Fault injection on the real model: an out-of-memory error for any forward over more than ``rows``
    sequences, the way a CUDA device that fits ``rows`` sequences fails (torch.OutOfMemoryError)."""

    def __init__(self, model: torch.nn.Module, rows: int) -> None:
        self.rows, self.calls = rows, []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append(int(ids.shape[0]))
        if ids.shape[0] > self.rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {ids.shape[0]} > {self.rows} rows)")


@pytest.fixture
def prompts(tiny_loaded) -> list[GenRequest]:
    texts = [f"Q: what comes after {n}?\nA:" for n in range(1, 9)]
    return [GenRequest(tiny_loaded.tokenizer(t)["input_ids"], group="g") for t in texts]


def test_auto_batch_halves_on_oom_and_gives_the_small_batch_results(tiny_loaded, prompts) -> None:
    expected = Engine(tiny_loaded, batch_size=2, prefix_cache=False, progress=False).generate(prompts, 4)
    fits = _DeviceFits(tiny_loaded.model, rows=2)
    try:
        engine = RetryingEngine(
            tiny_loaded,
            batch_size=8,
            prefix_cache=False,
            progress=False,
            auto_batch=True,
            fallback_batch_size=1,
        )
        got = engine.generate(prompts, 4)
        argmax = engine.next_token_argmax(prompts)
    finally:
        fits.handle.remove()
    assert [g.tokens for g in got] == [g.tokens for g in expected]
    assert engine.batch_size == 2 and engine.stats["oom_retries"] == 2  # 8 -> 4 -> 2
    assert engine.stats["batch_size_requested"] == 8 and engine.stats["batch_size_final"] == 2
    assert max(fits.calls[-4:]) <= 2
    plain = Engine(tiny_loaded, batch_size=2, prefix_cache=False, progress=False).next_token_argmax(prompts)
    assert argmax == plain


def test_oom_without_auto_batch_or_below_the_fallback_is_one_clear_error(tiny_loaded, prompts) -> None:
    fits = _DeviceFits(tiny_loaded.model, rows=2)
    try:
        plain = RetryingEngine(tiny_loaded, batch_size=8, prefix_cache=False, progress=False)
        with pytest.raises(
            MtLoraError, match="out of memory at --batch_size 8; lower it or pass --auto_batch"
        ):
            plain.next_token_argmax(prompts)
        floor = RetryingEngine(
            tiny_loaded,
            batch_size=16,
            prefix_cache=False,
            progress=False,
            auto_batch=True,
            fallback_batch_size=4,
        )
        with pytest.raises(MtLoraError, match="out of memory at --fallback_batch_size 4"):
            floor.next_token_argmax(prompts)
        assert floor.stats["oom_retries"] == 2  # 16 -> 8 -> 4, then the error
    finally:
        fits.handle.remove()


def test_other_errors_are_not_retried(tiny_loaded, prompts) -> None:
    engine = RetryingEngine(tiny_loaded, batch_size=8, progress=False, auto_batch=True)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([GenRequest([])], 2)
    assert engine.stats["oom_retries"] == 0 and engine.batch_size == 8


def test_adaptive_max_length_and_the_released_flags_in_the_result(tmp_path: Path) -> None:
    assert ADAPTIVE_MAX_LENGTH == {0: 768, 1: 1024, 2: 1280, 3: 1536, 4: 1792, 5: 2048}
    out = tmp_path / "e"
    argv = ["--model_name_or_path", TINY, "--output_dir", str(out), "--subjects", "anatomy", "--limit", "2",
            "--num_few_shot", "0", "--adaptive_max_length", "--auto_batch", "--fallback_batch_size", "2",
            "--num_gpus", "4", "--batch_size", "4", "--no_progress"]  # fmt: skip
    assert run("mmlu", argv) == 0
    res = json.loads((out / "mmlu_results.json").read_text())
    assert res["max_length"] == min(512, 768)  # the table's 0-shot window, at most the model's 512
    assert res["adaptive_max_length"] and res["auto_batch"] and res["fallback_batch_size"] == 2
    assert res["engine_stats"]["oom_retries"] == 0
    with pytest.raises(MtLoraError, match="--fallback_batch_size must be > 0"):
        run("mmlu", [*argv, "--fallback_batch_size", "0"])


def test_released_mmlu_skeleton_falls_back_to_the_bundled_copy(tmp_path: Path, capsys) -> None:
    root = tmp_path / "mmlu_dataset"
    (root / "anatomy" / "test").mkdir(parents=True)
    (root / "anatomy" / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "validation", "dev"]}))
    (root / "anatomy" / "test" / "state.json").write_text("{}")
    assert released_mmlu_skeleton(root, ["anatomy"]) and not released_mmlu_skeleton(root, ["virology"])
    base = ["--model_name_or_path", TINY, "--subjects", "anatomy", "--limit", "3", "--no_progress"]
    assert run("mmlu", [*base, "--output_dir", str(tmp_path / "a"), "--mmlu_data_dir", str(root)]) == 0
    assert "released mmlu_dataset skeleton without its .arrow data files" in capsys.readouterr().err
    assert run("mmlu", [*base, "--output_dir", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "mmlu_results.json").read_text())
    b = json.loads((tmp_path / "b" / "mmlu_results.json").read_text())
    assert a["data_dir"] == f"bundled (fallback: {root} has no .arrow files)" and b["data_dir"] == "bundled"
    assert a["predictions"] == b["predictions"]
    (root / "anatomy" / "test" / "data-00000-of-00001.arrow").write_bytes(b"")  # data present: no fallback
    assert not released_mmlu_skeleton(root, ["anatomy"])
