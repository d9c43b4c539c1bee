"""`mtlora train` outputs that must not be lost or wrong: manifest hashes, a failed final save, refused pickles."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.cli import main as cli_main
from mtlora.errors import MtLoraError
from mtlora.hub import load_tokenizer, resolve_model_path
from mtlora.training.run import save_final_adapter

TINY = "mtlora:stories260k"


def _rows(task: str, n: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"repeat {task} {i}", "input": "", "output": f"{task} {i}", "task_type": task}
        for i in range(n)
    ]


def _train(capsys, data: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    argv = ["train", "--model_name_or_path", TINY, "--dataset_dir", str(data), "--output_dir", str(out),
            "--method", "lora", "--lora_rank", "4", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--max_seq_length", "32", "--disable_tqdm", "True", *extra]  # fmt: skip
    rc = cli_main(argv)
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


class _Payload:
    """A pickle that would create a marker file if it were ever unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_manifest_hashes_exactly_the_files_trained_on_and_refused_pickle(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text(json.dumps(_rows("a", 4)))
    (data / "b.jsonl").write_text("\n".join(json.dumps(r) for r in _rows("b", 4)) + "\n")
    (data / "c.JSONL").write_text("\n".join(json.dumps(r) for r in _rows("c", 4)) + "\n")
    (data / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in _rows("dev", 4)) + "\n")
    out = tmp_path / "out"
    rc, err = _train(capsys, data, out, "--save_strategy", "steps", "--save_steps", "1")
    assert rc == 0, err
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert sorted(Path(p).name for p in manifest["data_files"]) == ["a.json", "b.jsonl", "c.JSONL"]
    assert json.loads((out / "task_map.json").read_text()) == {"a": 0, "b": 1, "c": 2}

    # a checkpoint whose RNG state is a hostile pickle: refused, named, never run
    marker = tmp_path / "PWNED"
    with open(out / "checkpoint-1" / "rng_state.pth", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    rc, err = _train(
        capsys, data, out, "--max_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-1")
    )
    assert rc == 2 and len(err) == 1, err
    assert "--resume_from_checkpoint" in err[0] and "rng_state.pth" in err[0] and "refused" in err[0]
    assert not marker.exists()


def test_hostile_pickled_base_model_is_refused_by_name(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(resolve_model_path(TINY), model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "PWNED"
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    rc = cli_main(["eval", "bbh", "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "e"),
                   "--tasks", "navigate", "--limit", "1"])  # fmt: skip
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1 and f"--model_name_or_path {model}" in err[0] and "refused" in err[0], (
        err
    )
    assert not marker.exists()


def test_failed_final_save_is_one_error_and_keeps_the_previous_adapter(tmp_path: Path) -> None:
    """A real write failure (file-size limit, like a full disk) in the middle of saving sft_lora_model."""
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY)).eval()
    model = get_mtlora_model(base, MtLoraConfig(method="lora", lora_rank=4, base_model_name_or_path=TINY))
    tokenizer = load_tokenizer(TINY)
    target = tmp_path / "out" / "sft_lora_model"
    save_final_adapter(model, target, tokenizer, {"t": 0})
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        with pytest.raises(
            MtLoraError, match=r"cannot save the adapter to .*sft_lora_model: .*previous adapter"
        ):
            save_final_adapter(model, target, tokenizer, {"t": 0})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["sft_lora_model"]  # no staging left behind
