"""Scripted fault run: SIGKILL a save at every file-system boundary and report what a loader then sees.

Run as ``python tests/_fault_save.py KIND WORKDIR`` (tests/test_atomic.py does). KIND is one of

* ``adapter``   -- ``MtLoraModel.save_pretrained`` over an existing adapter folder;
* ``final``     -- training's final ``sft_lora_model`` (``save_final_adapter``: adapter + tokenizer + task map);
* ``export``    -- one task folder of ``mtlora export`` (peft LoRA + merged model inside);
* ``fallback``  -- ``adapter`` with the two-rename fallback instead of the Linux exchange.

The script saves version 1 (``lora_alpha`` 16, weights w1), then for k = 0, 1, 2, ... forks a child that
installs an audit hook (PEP 578) killing itself with SIGKILL right before its k-th file-system event
(``open``, ``os.rename``, ``os.mkdir``, ``os.remove``, ``shutil.rmtree`` ...) and saves version 2 (``lora_alpha`` 32,
weights w2). The parent then loads the folder with the real loader and classifies it as ``old`` (config and
weights of v1), ``new`` (both of v2) or ``mixed``/``broken``; it restores v1 and goes on until a child completes
without being killed. One JSON line per k on stdout: ``{"k": k, "killed": bool, "state": ...}``. Nothing is
mocked: the kill is a real SIGKILL between real writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from mtlora import MtLoraConfig, get_mtlora_model  # noqa: E402
from mtlora.hub import load_tokenizer, resolve_adapter_dir, resolve_model_path  # noqa: E402

TINY = "mtlora:stories260k"
EVENTS = (
    "open",
    "os.rename",
    "os.replace",
    "os.mkdir",
    "os.remove",
    "os.unlink",
    "shutil.rmtree",
    "os.chmod",
)


def _model(alpha: float, seed: int):
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY)).eval()
    cfg = MtLoraConfig(method="lora", lora_rank=4, lora_alpha=alpha, base_model_name_or_path=TINY)
    model = get_mtlora_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _save(kind: str, model, target: Path, tokenizer) -> None:
    if kind in ("adapter", "fallback"):
        model.save_pretrained(target)
    elif kind == "final":
        from mtlora.training.run import save_final_adapter

        save_final_adapter(model, target, tokenizer, {"a": 0, "b": 1})
    elif kind == "export":
        from mtlora.export import write_export

        write_export(model, {}, target, False, TINY, tokenizer, True, task="a")
    else:
        raise SystemExit(f"unknown kind {kind}")


def _state(kind: str, target: Path, versions: dict[str, dict[str, torch.Tensor]]) -> str:
    """old / new / mixed / broken, as the project's loaders see ``target``."""
    from safetensors.torch import load_file

    try:
        if kind == "export":
            folder = target
            cfg = json.loads((folder / "adapter_config.json").read_text())
            alpha = float(
                cfg["lora_alpha"]
            )  # peft's lora_alpha / r is mtlora's scaling, so alpha carries over
            weights = load_file(str(folder / "adapter_model.safetensors"))
            merged_cfg = (folder / "merged" / "config.json").is_file()
            if not merged_cfg:
                return "broken"
        else:
            folder = resolve_adapter_dir(target)
            cfg = json.loads((folder / "adapter_config.json").read_text())
            alpha = float(cfg["lora_alpha"])
            weights = load_file(str(folder / "adapter_model.safetensors"))
            if kind == "final":
                tmap = json.loads((folder / "task_map.json").read_text())
                if tmap != {"a": 0, "b": 1} or not (folder / "tokenizer_config.json").is_file():
                    return "broken"
    except (OSError, ValueError, KeyError) as exc:
        return f"broken: {type(exc).__name__}: {exc}"
    for name, ver in versions.items():
        if set(weights) == set(ver) and all(torch.equal(weights[k], ver[k]) for k in ver):
            want_alpha = 16.0 if name == "old" else 32.0
            return name if abs(alpha - want_alpha) < 1e-6 else "mixed"
    return "mixed"


def main() -> int:
    kind, work = sys.argv[1], Path(sys.argv[2])
    target = work / ("task_a" if kind == "export" else "sft_lora_model")
    tokenizer = load_tokenizer(TINY)
    v1, v2 = _model(16.0, 1), _model(32.0, 2)
    if kind == "fallback":
        import mtlora.atomic as atomic

        atomic._renameat2 = False  # this file system "cannot exchange": the two-rename path runs
    _save(kind, v1, target, tokenizer)
    versions = {}
    for name, m in (("old", v1), ("new", v2)):
        probe = work / f"probe_{name}"
        _save(kind, m, probe, tokenizer)
        from safetensors.torch import load_file

        folder = probe if kind == "export" else resolve_adapter_dir(probe)
        versions[name] = load_file(str(folder / "adapter_model.safetensors"))
        shutil.rmtree(probe)
    pristine = work / "pristine"
    shutil.copytree(target, pristine, symlinks=True)
    k = 0
    while k < 500:
        pid = os.fork()
        if pid == 0:  # child: die right before the k-th file-system event of the save
            count = [0]

            def hook(event: str, args: tuple, count: list[int] = count, k: int = k) -> None:
                if event in EVENTS:
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    count[0] += 1

            sys.addaudithook(hook)
            _save(kind, v2, target, tokenizer)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if not killed and os.WEXITSTATUS(status) != 0:
            print(json.dumps({"k": k, "killed": False, "state": f"child failed ({status})"}), flush=True)
            return 1
        print(json.dumps({"k": k, "killed": killed, "state": _state(kind, target, versions)}), flush=True)
        if not killed:
            return 0
        for p in list(work.iterdir()):  # back to v1 (and no leftovers) for the next kill point
            if p.name != "pristine":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        shutil.copytree(pristine, target, symlinks=True)
        k += 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
