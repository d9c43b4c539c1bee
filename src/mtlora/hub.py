"""Model names and loading: ``mtlora:<name>`` for bundled models, and ONE loader for base model + adapter.

Why: tests, the demo and CPU benchmarks must run offline, so a tiny pre-converted model
(llama2.c stories260K, ~1 MB) ships as package data; ``mtlora:stories260k`` names it everywhere a model
name or path is accepted, without users having to know where pip installed the package.

:func:`load_model` is the one place that turns "a base model name and maybe an adapter folder" into a model:
evaluation, analysis, export, the demo and LoRAHub all call it, so device/dtype defaults, the adapter format
(mtlora's own ``method`` field or a plain peft ``peft_type``), strict loading and the error messages are the
same everywhere.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.atomic import recover_interrupted
from mtlora.dtypes import DTYPES, default_device, default_dtype, torch_dtype  # noqa: F401  (re-exported)
from mtlora.errors import CheckpointError, MtLoraError, refused_pickle_detail

__all__ = [
    "BUNDLED_MODELS",
    "PREFIX",
    "LoadedBase",
    "load_model",
    "load_tokenizer",
    "read_adapter_config",
    "resolve_adapter_dir",
    "resolve_model_path",
]

ADAPTER_CONFIG = "adapter_config.json"
TASK_MAP = "task_map.json"

PREFIX = "mtlora:"
_ASSETS = Path(__file__).resolve().parent / "assets" / "models"

#: Bundled model name (lower case) -> Hugging Face folder inside the installed package.
BUNDLED_MODELS: dict[str, Path] = {
    "stories260k": _ASSETS / "stories260k",
}


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """Map ``mtlora:<name>`` (name case-insensitive) to the bundled folder; return anything else unchanged.

    Local directories and hub ids pass through untouched so callers can always route through this function.
    An unknown ``mtlora:`` name, or a bundled folder missing from a broken install, raises
    :class:`MtLoraError` naming the known models.
    """
    text = os.fspath(name_or_path)
    if not text.lower().startswith(PREFIX):
        return text
    name = text[len(PREFIX) :].strip().lower()
    if name not in BUNDLED_MODELS:
        known = ", ".join(f"{PREFIX}{n}" for n in sorted(BUNDLED_MODELS))
        raise MtLoraError(f"unknown bundled model {text!r}; known: {known}")
    path = BUNDLED_MODELS[name]
    if not (path / "config.json").is_file():
        raise MtLoraError(
            f"bundled model {text!r} is missing its files at {path}; the package was installed without its "
            "assets (reinstall mtlora)"
        )
    return str(path)


def load_tokenizer(name_or_path: str | os.PathLike[str], **kwargs: Any):
    """Resolve ``name_or_path`` and load its tokenizer with ``AutoTokenizer``, guaranteeing a pad token.

    Batching needs a pad token and Llama-family tokenizers often have none. We reuse an existing token
    instead of adding one (adding would change the vocabulary size and require resizing embeddings):
    ``unk`` first, because it never appears in byte-fallback encodings, so masking labels equal to the
    pad id cannot hide real targets; ``eos`` only if there is no ``unk`` (then EOS labels need care, since
    a pad==eos mask would also drop the EOS targets). The bundled models already define pad = ``<unk>``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise MtLoraError(f"tokenizer of {name_or_path!s} has no pad, unk or eos token to pad with")
    return tokenizer


# ----------------------------------------------------------------------------------------------- loading
def resolve_adapter_dir(adapter: str | os.PathLike[str]) -> Path:
    """The folder holding ``adapter_config.json``: the path itself, or the ``sft_lora_model`` folder that
    ``mtlora train`` writes inside its output directory (so either can be passed)."""
    path = recover_interrupted(adapter)
    if not path.is_dir():
        raise CheckpointError(f"adapter directory not found: {path}")
    inner = recover_interrupted(path / "sft_lora_model")
    if not (path / ADAPTER_CONFIG).is_file() and (inner / ADAPTER_CONFIG).is_file():
        return inner
    return path


def read_adapter_config(adapter: str | os.PathLike[str], *, mtlora_only: bool = False) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, with a clear error when the folder, the file or its format is wrong.

    A config must name its format: ``method`` (an mtlora adapter) or ``peft_type`` (a plain peft adapter);
    ``mtlora_only`` refuses the latter.
    """
    path = resolve_adapter_dir(adapter)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (not an adapter checkpoint)")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise CheckpointError(f"{cfg_path}: JSON nested too deeply to parse") from None
    if not isinstance(data, dict) or not ("method" in data or "peft_type" in data):
        raise CheckpointError(f"{cfg_path}: neither 'method' (mtlora) nor 'peft_type' (peft) is set")
    if mtlora_only and "method" not in data:
        raise CheckpointError(
            f"{cfg_path}: a plain peft adapter (peft_type={data.get('peft_type')!r}), not an mtlora adapter"
        )
    return data


def _read_task_ids(path: Path) -> dict[str, int]:
    """``task_map.json`` beside an adapter as ``{task name: id}`` ({} if absent). Ids need not be 0..T-1 here: a
    hand-written map may name only the tasks being evaluated (``mtlora.data.load_task_map`` is the strict one)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, int) and v >= 0 for v in data.values()):
            raise TypeError
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise CheckpointError(f"{path}: expected a JSON object {{task_name: non-negative id}}") from None
    return {str(k): int(v) for k, v in data.items()}


def refused_weights_message(name: str, exc: BaseException) -> str:
    """One line for a model whose pickled weights ``torch.load(weights_only=True)`` refused."""
    return (
        f"--model_name_or_path {name}: its pickled weights (*.bin/*.pt) hold more than tensors "
        f"({refused_pickle_detail(exc)}); refused to unpickle them (nothing in them was run) -- use a "
        "safetensors copy of the model"
    )


def remote_code_message(name: str) -> str:
    """One line for a model that needs its own Python code while ``--trust_remote_code`` is off."""
    return (
        f"--model_name_or_path {name}: the model needs Python code shipped with it (auto_map in config.json); "
        "it was not run -- pass --trust_remote_code if you trust that code"
    )


def _check_finite(model: Any, adapter_dir: Path) -> None:
    """Refuse a plain peft adapter holding NaN/inf (it would evaluate to a silent 0.0 score)."""
    import torch

    for name, p in model.named_parameters():
        if "lora_" in name and p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(
                f"{adapter_dir}: tensor {name!r} holds non-finite values (NaN/inf); the adapter is broken "
                "(a diverged run?) and is not loaded"
            )


@dataclass
class LoadedBase:
    """What :func:`load_model` returns: the (adapted) model in eval mode and what callers need to know of it."""

    model: Any  # a transformers causal LM, an mtlora.MtLoraModel or a peft.PeftModel
    tokenizer: Any
    device: str
    dtype: str
    model_name_or_path: str
    adapter_dir: Path | None = None
    adapter_config: dict[str, Any] | None = None
    method: str | None = None  # lora / hydralora / mmoelora / mtlora / peft:<TYPE>; None for the bare base
    task_map: dict[str, int] = field(default_factory=dict)
    quantization: Any = None  # mtlora.quant.Quantization of the base (16 bit: not quantized)


def load_model(
    model_name_or_path: str | os.PathLike[str] | None = None,
    adapter: str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    mtlora_only: bool = False,
    tokenizer_from_adapter: bool = False,
    freeze: bool = True,
    quantization: Any = None,
    trust_remote_code: bool = False,
) -> LoadedBase:
    """Tokenizer + base model (+ adapter) on ``device``, in eval mode.

    * ``model_name_or_path``: ``mtlora:<name>`` (bundled), a folder or a hub id; None = the base model the
      adapter records (``mtlora train`` writes it), so a trained folder loads with no other argument.
    * ``adapter``: an mtlora adapter folder (``method`` in its config; strict key/shape checks) or a plain peft
      one (``peft_type``), or a ``mtlora train`` output directory holding ``sft_lora_model``.
    * ``device`` defaults to CUDA when available, ``dtype`` to fp32 on CPU and bf16 elsewhere.
    * ``tokenizer_from_adapter``: use the tokenizer saved beside the adapter when there is one.
    * ``freeze``: ``requires_grad=False`` on every parameter (analyses that need gradients pass False).
    * ``quantization``: a :class:`mtlora.quant.Quantization` (``--load_in_kbits 4|8``) stores the base's
      linears in 4/8 bit with ``dtype`` as the compute dtype; the adapter loads onto it unchanged.
    * ``trust_remote_code``: run modelling code shipped with the model (``--trust_remote_code``). Always
      passed explicitly: left unset, transformers asks ``[y/N]`` on stdin, which hangs a batch job.

    Errors name the flag or file: an unknown model, an adapter that does not fit the base (key and shapes),
    a missing CUDA device, a bad dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    adapter_dir = resolve_adapter_dir(adapter) if adapter is not None else None
    cfg = read_adapter_config(adapter_dir, mtlora_only=mtlora_only) if adapter_dir is not None else None
    if model_name_or_path is None:
        model_name_or_path = (cfg or {}).get("base_model_name_or_path")
        if not model_name_or_path:
            raise MtLoraError("--model_name_or_path is required (the adapter does not record its base model)")
    name = os.fspath(model_name_or_path)
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MtLoraError(f"--device {device}: CUDA is not available on this machine")
    dtype = dtype or default_dtype(device)
    dt = torch_dtype(dtype)
    from mtlora.quant import Quantization, from_pretrained_kwargs

    quant = quantization if quantization is not None else Quantization()
    quant_kwargs = from_pretrained_kwargs(quant, dt, device)  # checks bitsandbytes first: one clear error

    path = resolve_model_path(name)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # callers draw their own bars; an error must stay a single line
    try:
        has_tok = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(
            adapter_dir if tokenizer_from_adapter and has_tok else path, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, trust_remote_code=trust_remote_code, **quant_kwargs
        )
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MtLoraError(f"cannot load model {name!r}: {first}") from None
    except pickle.UnpicklingError as exc:
        raise MtLoraError(refused_weights_message(name, exc)) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise MtLoraError(remote_code_message(name)) from None
        raise
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()

    method, task_map = None, {}
    if adapter_dir is not None and cfg is not None:
        if "method" in cfg:
            from mtlora.model import MtLoraModel

            loader, method = MtLoraModel.from_pretrained, str(cfg["method"])
        else:
            from peft import PeftModel

            loader, method = PeftModel.from_pretrained, f"peft:{cfg['peft_type']}"
        try:
            model = loader(model, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as exc:
            if isinstance(exc, MtLoraError):
                raise
            raise CheckpointError(f"{adapter_dir}: adapter does not fit {name}: {exc}") from None
        task_map = _read_task_ids(adapter_dir / TASK_MAP)
        if "method" not in cfg:  # mtlora adapters are checked tensor by tensor when their file is read
            _check_finite(model, adapter_dir)
    if not quant.enabled:  # a quantized base was placed on `device` while loading (8 bit cannot be moved)
        model.to(device)
    model.eval()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        model_name_or_path=name,
        adapter_dir=adapter_dir,
        adapter_config=cfg,
        method=method,
        task_map=task_map,
        quantization=quant,
    )
