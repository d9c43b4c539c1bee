"""mtlora.atomic: files and folders appear whole or not at all, with the permissions of a plain open()."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import mtlora.atomic as atomic
from mtlora.atomic import atomic_dir, atomic_file, current_umask, recover_interrupted, write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_current_umask_reads_without_changing(umask022) -> None:
    assert current_umask() == 0o022
    os.umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_atomic_file_has_umask_mode_not_mkstemp_0600(tmp_path: Path, umask022) -> None:
    write_text_atomic(tmp_path / "a.json", "{}\n")
    assert _mode(tmp_path / "a.json") == 0o644
    os.umask(0o077)
    write_text_atomic(tmp_path / "b.json", "{}\n")
    assert _mode(tmp_path / "b.json") == 0o600


def test_safetensors_0600_is_published_with_umask_mode(tmp_path: Path, umask022) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert _mode(tmp_path / "plain.safetensors") == 0o600  # why atomic_dir/atomic_file fix modes
    with atomic_file(tmp_path / "w.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    with atomic_dir(tmp_path / "folder") as d:
        save_file({"x": torch.zeros(2)}, str(d / "w.safetensors"))
        (d / "sub").mkdir()
        (d / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(d / "run.sh", 0o700)
    assert _mode(tmp_path / "w.safetensors") == 0o644
    assert _mode(tmp_path / "folder") == 0o755 and _mode(tmp_path / "folder" / "sub") == 0o755
    assert _mode(tmp_path / "folder" / "w.safetensors") == 0o644
    assert _mode(tmp_path / "folder" / "run.sh") == 0o744  # the executable bit the writer set is kept


def test_atomic_file_failure_leaves_old_content(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_replaces_as_a_unit_and_keeps_other_files_on_request(
    tmp_path: Path, exchange: bool
) -> None:
    target = tmp_path / "adapter"
    with atomic_dir(target, exchange=exchange) as d:
        (d / "a").write_text("1")
        (d / "tok").write_text("t")
    with atomic_dir(target, keep_existing=True, exchange=exchange) as d:
        (d / "a").write_text("2")
    assert (target / "a").read_text() == "2" and (target / "tok").read_text() == "t"
    with atomic_dir(target, exchange=exchange) as d:
        (d / "a").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == [
        "a"
    ]  # without keep_existing: exactly what was written
    with pytest.raises(ValueError), atomic_dir(target, exchange=exchange) as d:
        (d / "a").write_text("4")
        raise ValueError("writer failed")
    assert (target / "a").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_dir_refuses_a_file_in_the_way_and_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("a file")
    with pytest.raises(FileExistsError, match="not a folder"), atomic_dir(tmp_path / "x"):
        pass
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_dir(tmp_path / "link") as d:
        (d / "f").write_text("1")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "f").read_text() == "1"


def test_recover_interrupted_finds_the_parked_old_folder(tmp_path: Path) -> None:
    """The fallback's instant between its two renames: no <name>, a complete .<name>.old."""
    target = tmp_path / "sft_lora_model"
    parked = tmp_path / ".sft_lora_model.old"
    parked.mkdir()
    (parked / "adapter_config.json").write_text("{}")
    assert recover_interrupted(target) == parked
    # the next save publishes the new folder and drops the parked one
    with atomic_dir(target, keep_existing=True, exchange=False) as d:
        assert (d / "adapter_config.json").is_file()  # started from the parked (live) version
        (d / "adapter_model.safetensors").write_text("w")
    assert recover_interrupted(target) == target and not parked.exists()


def test_exchange_is_used_on_linux(tmp_path: Path) -> None:
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux-only")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    if not atomic._exchange(a, b):
        pytest.skip("this file system cannot exchange (the fallback is tested separately)")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adapter", "fallback", "final", "export"])
def test_a_kill_at_every_file_boundary_leaves_old_or_new(kind: str, tmp_path: Path) -> None:
    """SIGKILL before each file-system event of a save (tests/_fault_save.py); the loader must see v1 or v2.

    adapter = MtLoraModel.save_pretrained, fallback = the same without the Linux exchange, final = training's
    sft_lora_model (adapter + tokenizer + task map), export = one `mtlora export` task folder with merged/.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_fault_save.py"), kind, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(rows) >= 5 and rows[-1]["killed"] is False and rows[-1]["state"] == "new"
    states = [r["state"] for r in rows]
    assert all(s in ("old", "new") for s in states), [r for r in rows if r["state"] not in ("old", "new")]
    # kills early in the save leave the old adapter, late ones the new: one switch, never back
    first_new = states.index("new")
    assert first_new > 0 and all(s == "new" for s in states[first_new:]), states
