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

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.atomic import recover_interrupted
from mtlora.dtypes import DTYPES, default_device, default_dtype, torch_dtype  # noqa: F401  (re-exported)
from mtlora.errors import CheckpointError, ConfigError, MtLoraError, refused_pickle_detail

__all__ = [
    "BUNDLED_MODELS",
    "PREFIX",
    "Loaded",
    "LoadedBase",
    "adapter_num_parameters",
    "attach_adapter",
    "check_model_path",
    "load_base",
    "load_config",
    "load_model",
    "load_tokenizer",
    "read_adapter_config",
    "read_adapter_tensors",
    "resolve_adapter_dir",
    "resolve_model_path",
    "safetensors_num_elements",
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
class Loaded:
    """A loaded model and what every caller needs to know of it (commands, analyses, export, LoRAHub, the demo).

    One class for all of them, so a new field reaches every command at once. Evaluation adds its task-id
    bookkeeping in a subclass (:class:`mtlora.evaluation.loading.LoadedModel`: its fields are keys of
    ``*_results.json``); ``LoadedBase`` and ``mtlora.analysis.common.LoadedAdapter`` are this class.
    """

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
    label: str | None = None  # how analyses name the model on an axis (block-ffn / component / ...)

    @property
    def config(self) -> dict[str, Any]:
        """The adapter's config ({} for a bare base); the analyses' name for :attr:`adapter_config`."""
        return self.adapter_config or {}

    @property
    def needs_task_ids(self) -> bool:
        """Whether forward/generate need ``task_ids`` (a task-gated router: MMoELoRA)."""
        from mtlora.model import needs_task_ids

        return needs_task_ids(self.model)

    def named_adapters(self, module_filter: str | None = None) -> list[tuple[str, Any]]:
        """``(host module path, MultiExpertLoRA)`` of an mtlora model, those whose path contains ``module_filter``."""
        named = getattr(self.model, "named_adapters", None)
        if named is None:
            return []
        return [(n, a) for n, a in named() if not module_filter or module_filter in n]


#: The former name of :class:`Loaded` (what :func:`load_model` returned before it served every caller).
LoadedBase = Loaded


@contextlib.contextmanager
def _no_hf_progress_bars() -> Iterator[None]:
    """Callers draw their own bars, and an error must stay a single line: no shard-loading bar meanwhile."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _resolve_device(device: str | None) -> str:
    import torch

    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MtLoraError(f"--device {device}: CUDA is not available on this machine")
    return device


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
    label: str | None = None,
) -> Loaded:
    """Tokenizer + base model (+ adapter) on ``device``, in eval mode (:func:`load_base` + :func:`attach_adapter`).

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
    * ``label``: the model's name in analyses (:attr:`Loaded.label`).

    Errors name the flag or file: an unknown model, an adapter that does not fit the base (key and shapes),
    a missing CUDA device, a bad dtype.
    """
    from mtlora.quant import Quantization

    adapter_dir = resolve_adapter_dir(adapter) if adapter is not None else None
    cfg = read_adapter_config(adapter_dir, mtlora_only=mtlora_only) if adapter_dir is not None else None
    if model_name_or_path is None:
        model_name_or_path = (cfg or {}).get("base_model_name_or_path")
        if not model_name_or_path:
            raise MtLoraError("--model_name_or_path is required (the adapter does not record its base model)")
    name = os.fspath(model_name_or_path)
    device = _resolve_device(device)
    dtype = dtype or default_dtype(device)
    quant = quantization if quantization is not None else Quantization()
    own_tok = (
        tokenizer_from_adapter
        and adapter_dir is not None
        and (adapter_dir / "tokenizer_config.json").is_file()
    )
    with _no_hf_progress_bars():
        model, tokenizer = load_base(
            name,
            dtype=torch_dtype(dtype),
            device=device,
            quantization=quant,
            trust_remote_code=trust_remote_code,
            tokenizer_name_or_path=adapter_dir if own_tok else None,
            tokenizer_flag="",  # the error names the adapter folder
        )
    method, task_map = None, {}
    if adapter_dir is not None:
        model, method, cfg, task_map = attach_adapter(
            model, adapter_dir, mtlora_only=mtlora_only, base_name=name
        )
    if not quant.enabled:  # a quantized base was placed on `device` while loading (8 bit cannot be moved)
        model.to(device)
    model.eval()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    return Loaded(model, tokenizer, device, dtype, name, adapter_dir, cfg, method, task_map, quant, label)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_model_path(name_or_path: str | os.PathLike[str], flag: str = "--model_name_or_path") -> str:
    """The resolved path, refusing up front a folder without ``config.json`` and a path meant as a missing folder.

    Why up front: transformers would otherwise try the hub with a local-looking name and fail with a page of
    advice; the commands that take the flag (train, params) say which flag and what is wrong in one line.
    """
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not Path(path, "config.json").is_file():
        raise ConfigError(f"{flag} {path}: no config.json in this folder")
    if not os.path.isdir(path) and _looks_local(path):
        raise ConfigError(f"{flag} {path}: no such folder")
    return path


def _looks_local(path: str) -> bool:
    """A path the user meant as a folder (absolute, ./ ../ ~, or more than one /), not a hub id ``org/name``."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep in path[:1]


def load_config(
    name_or_path: str | os.PathLike[str],
    *,
    trust_remote_code: bool = False,
    flag: str = "--model_name_or_path",
    **hub_kwargs: Any,
) -> Any:
    """A model's ``AutoConfig`` (no weights), with one ``error:`` line naming ``flag`` when it cannot be read."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub_kwargs)
    except OSError as exc:
        raise ConfigError(f"{flag} {name_or_path}: cannot load a model config ({_first_line(exc)})") from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ConfigError(remote_code_message(os.fspath(name_or_path))) from None
        raise


def _load_base_tokenizer(
    name: str,
    tokenizer_name_or_path: str | os.PathLike[str] | None,
    tokenizer_flag: str,
    trust_remote_code: bool,
    **kwargs: Any,
) -> Any:
    """The tokenizer (the model's unless another is named), errors naming the flag that gave the path."""
    source = tokenizer_name_or_path if tokenizer_name_or_path is not None else name
    try:
        return load_tokenizer(source, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        if tokenizer_name_or_path is None:
            raise ConfigError(
                f"--model_name_or_path {name}: cannot load model ({_first_line(exc)})"
            ) from None
        raise ConfigError(
            f"{tokenizer_flag} {source}".strip() + ": cannot load the tokenizer ({_first_line(exc)})"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ConfigError(remote_code_message(os.fspath(source))) from None
        raise


def load_base(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: Any,
    device: str = "cpu",
    quantization: Any = None,
    compute_dtype: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
    config_name: str | None = None,
    tokenizer_name_or_path: str | os.PathLike[str] | None = None,
    tokenizer_flag: str = "--tokenizer_name_or_path",
    use_fast_tokenizer: bool = True,
    use_cache: bool | None = None,
    hub_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """``(base model, tokenizer)``: the one ``from_pretrained`` of the package (commands, training, the demo).

    The model stays where ``from_pretrained`` puts it (the CPU, or ``device`` for a quantized base, which
    bitsandbytes quantizes while loading): :func:`load_model` moves it, the Trainer places it itself.

    * ``dtype``: a torch dtype or ``"auto"`` (the checkpoint's own); ``compute_dtype`` is a quantized base's
      matmul dtype (default ``dtype``); ``quantization`` a :class:`mtlora.quant.Quantization`.
    * ``config_name`` (``--config_name``): load the weights into this config instead of the model's own.
    * ``tokenizer_name_or_path``: another tokenizer; its errors name ``tokenizer_flag`` ('': the path alone).
    * ``use_cache``: set on the model's config when given (training turns the KV cache off).
    * ``hub_kwargs``: ``cache_dir`` / ``token`` for every ``from_pretrained`` (the paper's --cache_dir).

    Every failure is one :class:`ConfigError` line naming the flag: a missing model, a tokenizer, a config,
    pickled weights holding more than tensors, a model needing ``--trust_remote_code``.
    """
    from transformers import AutoModelForCausalLM

    from mtlora.quant import Quantization, from_pretrained_kwargs

    hub_kwargs = dict(hub_kwargs or {})
    name = os.fspath(name_or_path)
    path = resolve_model_path(name)
    quant = quantization if quantization is not None else Quantization()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **hub_kwargs}
    # checks bitsandbytes before anything is read: one clear error
    kwargs.update(from_pretrained_kwargs(quant, dtype if compute_dtype is None else compute_dtype, device))
    tokenizer = _load_base_tokenizer(
        name,
        tokenizer_name_or_path,
        tokenizer_flag,
        trust_remote_code,
        use_fast=use_fast_tokenizer,
        **hub_kwargs,
    )
    if config_name:
        kwargs["config"] = load_config(
            config_name, trust_remote_code=trust_remote_code, flag="--config_name", **hub_kwargs
        )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision and revision != "main":
        kwargs["revision"] = revision
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ConfigError(f"--model_name_or_path {name}: cannot load model ({_first_line(exc)})") from None
    except pickle.UnpicklingError as exc:
        raise ConfigError(refused_weights_message(name, exc)) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ConfigError(remote_code_message(name)) from None
        raise
    if use_cache is not None:
        model.config.use_cache = use_cache
    return model, tokenizer


def attach_adapter(
    model: Any,
    adapter: str | os.PathLike[str],
    *,
    trainable: bool = False,
    mtlora_only: bool = False,
    base_name: str | None = None,
    flag: str | None = None,
) -> tuple[Any, str, dict[str, Any], dict[str, int]]:
    """Put the adapter saved in ``adapter`` onto ``model``: ``(adapted model, method, config, task map)``.

    An mtlora adapter (``method`` in its config) loads with strict key and shape checks; a plain peft one
    (``peft_type``; refused with ``mtlora_only``) through peft, then checked for NaN/inf. ``trainable``
    leaves the adapter's parameters trainable (``--peft_path``: continue training an adapter). ``method`` is
    the adapter's method, or ``peft:<TYPE>``; the task map is ``task_map.json`` beside it ({} if absent).
    A mismatch with the base is one :class:`CheckpointError` line (``flag`` names the flag that gave the
    folder, ``base_name`` the base).
    """
    adapter_dir = resolve_adapter_dir(adapter)
    cfg = read_adapter_config(adapter_dir, mtlora_only=mtlora_only)
    if "method" in cfg:
        from mtlora.model import MtLoraModel

        loader, method = MtLoraModel.from_pretrained, str(cfg["method"])
    else:
        from peft import PeftModel

        loader, method = PeftModel.from_pretrained, f"peft:{cfg['peft_type']}"
    try:
        model = loader(model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        if isinstance(exc, MtLoraError):
            raise
        where = f"{flag} {adapter_dir}" if flag else str(adapter_dir)
        raise CheckpointError(
            f"{where}: adapter does not fit {base_name or 'the base model'}: {exc}"
        ) from None
    task_map = _read_task_ids(adapter_dir / TASK_MAP)
    if "method" not in cfg:  # mtlora adapters are checked tensor by tensor when their file is read
        _check_finite(model, adapter_dir)
    return model, method, cfg, task_map


# ----------------------------------------------------------------------------------------------- adapter files
def _adapter_weights_file(adapter: str | os.PathLike[str]) -> Path:
    from mtlora.config import WEIGHTS_NAME

    path = resolve_adapter_dir(adapter) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {WEIGHTS_NAME}")
    return path


def read_adapter_tensors(adapter: str | os.PathLike[str]) -> dict[str, Any]:
    """Every tensor of an adapter folder's ``adapter_model.safetensors`` (CPU, as stored; no base model).

    For what needs only the weights (the spectral analysis, conversions): safetensors holds tensors and JSON
    only, so nothing in the file is run. ``adapter`` may also be a ``mtlora train`` output directory.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _adapter_weights_file(adapter)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def safetensors_num_elements(path: str | os.PathLike[str]) -> int:
    """Number of elements in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(os.fspath(path), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= int(d)
            total += n
    return total


def adapter_num_parameters(adapter: str | os.PathLike[str]) -> int:
    """Elements stored in an adapter folder's weights file: its trainable parameters (read from the header).

    Counts what the file holds, so a LoRAHub composition (which no run manifest describes) is counted too;
    ``--modules_to_save`` copies are in the file and therefore in the count, as in the run manifest.
    """
    return safetensors_num_elements(_adapter_weights_file(adapter))
