"""Loader of an mtlora block-adapter bundle (format ``mtlora-block-export``, version 1).

This file is copied verbatim into every bundle as ``load_block_export.py``: it imports only the standard
library, torch, safetensors and (for :func:`load_bundle` and the command line) transformers - never mtlora,
so a bundle runs wherever a plain Hugging Face model runs.

Why a bundle at all: block-level mtLoRA (the paper's main configuration) adds a parallel low-rank path over a
whole attention/MLP block, ``h' = h + F(LN h) + scaling * B act(A LN h)``. That path bypasses the block's
non-linearity, so no LoRA on an existing ``nn.Linear`` (peft, vLLM, a merged checkpoint) expresses it. A
forward hook on the block module does, without touching the model class.

Bundle folder::

    block_adapter_config.json   {"format": "mtlora-block-export", "version": 1, "task", "base_model_name_or_path",
                                 "weights", "modules": [{"name", "in_features", "out_features", "rank",
                                 "scaling", "style"}, ...]}
    block_adapter.safetensors   "<module>.lora_A" (r, d_in) and "<module>.lora_B" (d_out, r) per block module
    load_block_export.py        this file
    tokenizer files, README.md  the base's tokenizer and the model card

Use from Python::

    from load_block_export import load_bundle            # with the bundle folder on sys.path
    model, tokenizer = load_bundle("path/to/bundle")     # base from the config, adapter attached, eval mode

or attach to a model you loaded yourself (``handles = load_block_export(model, folder)``; ``h.remove()`` for
each handle detaches it again). From the shell: ``python load_block_export.py BUNDLE --prompt "..."``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FORMAT = "mtlora-block-export"
SUPPORTED_VERSIONS = (1,)
CONFIG_NAME = "block_adapter_config.json"
#: block styles whose down-projection is followed by a ReLU (``B relu(A x)``)
RELU_STYLES = ("bottleneck", "adaptformer")


def read_config(path: Any) -> dict:
    """The bundle's ``block_adapter_config.json``, checked for format and version (a ValueError otherwise)."""
    folder = Path(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{folder}: no {CONFIG_NAME} (not an mtlora block-adapter bundle)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{folder}: not an mtlora block export (format={cfg.get('format')!r})")
    if cfg.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{folder}: bundle version {cfg.get('version')!r}; this loader reads versions {SUPPORTED_VERSIONS}"
        )
    return cfg


def load_block_export(model: Any, path: Any) -> list:
    """Attach the bundle in ``path`` to ``model`` (a Hugging Face causal LM) with one forward hook per block.

    Each hook adds ``scaling * B act(A x)`` to the block output, ``x`` being the block input (the output of the
    block's pre-norm); ``act`` is the identity for the ``lowrank`` style and ReLU for ``bottleneck`` /
    ``adaptformer``. The hooks act token by token, so padded batches and ``generate`` with a KV cache work
    as they do without the adapter. Returns the hook handles (``h.remove()`` detaches).
    """
    import torch
    from safetensors.torch import load_file

    folder = Path(path)
    cfg = read_config(folder)
    tensors = load_file(str(folder / cfg["weights"]))
    named = dict(model.named_modules())
    handles = []
    for entry in cfg["modules"]:
        name = entry["name"]
        host = named.get(name)
        if host is None:
            raise ValueError(f"{folder}: the model has no module {name!r}; is it the export's base model?")
        device = next(host.parameters()).device
        a = tensors[name + ".lora_A"].to(device)
        b = tensors[name + ".lora_B"].to(device)
        scaling, relu = float(entry["scaling"]), entry["style"] in RELU_STYLES

        def hook(module, args, kwargs, output, a=a, b=b, scaling=scaling, relu=relu, name=name):
            x = (
                kwargs["hidden_states"]
                if "hidden_states" in kwargs
                else (args[0] if args else kwargs.get("x"))
            )
            if x is None:
                raise ValueError(f"{name}: could not find the block input (hidden_states) in the call")
            x2 = x.reshape(-1, a.shape[1])
            if not torch.is_autocast_enabled(x.device.type):
                x2 = x2.to(a.dtype)
            h = torch.nn.functional.linear(x2, a)
            if relu:
                h = torch.relu(h)
            delta = (
                (torch.nn.functional.linear(h, b) * scaling).reshape(*x.shape[:-1], b.shape[0]).to(x.dtype)
            )
            if isinstance(output, tuple):
                return (output[0] + delta,) + tuple(output[1:])
            return output + delta

        handles.append(host.register_forward_hook(hook, with_kwargs=True))
    return handles


def load_bundle(
    path: Any,
    base: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the base model (``base``, default the bundle's ``base_model_name_or_path``) with
    the bundle attached, in eval mode, and the bundle's tokenizer (the base's when the bundle has none).

    The tokenizer gets a pad token (unk, else eos) if it has none, so batches can be padded; pad on the left
    for ``generate`` (``tokenizer.padding_side = "left"``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    cfg = read_config(folder)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}: the bundle names no base model; pass base=")
    tok_source = folder if (folder / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    if device is not None:
        model.to(device)
    load_block_export(model, folder)
    return model.eval(), tokenizer


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` as one left-padded batch (``model.generate``)."""
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    width = enc["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Load an mtlora block-adapter bundle onto its base model and generate (greedy, one batch)."
    )
    parser.add_argument("bundle", help="the bundle folder (holds block_adapter_config.json)")
    parser.add_argument(
        "--base", default=None, help="base model (default: the bundle's base_model_name_or_path)"
    )
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: where transformers loads it)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_bundle(
            args.bundle,
            args.base,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for text in generate(model, tokenizer, args.prompt or ["Once upon a time"], args.max_new_tokens):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
