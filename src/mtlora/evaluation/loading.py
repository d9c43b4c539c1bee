"""Loading a base model (and optionally an adapter of any method) for evaluation, in one place.

Why one function: the rest of the evaluation code only needs "a callable causal LM, its tokenizer and, for
MMoELoRA, a task-name -> id map"; how adapters are stored may still change, and keeping every such detail
here means only this file has to follow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.errors import CheckpointError, MtLoraError

ADAPTER_CONFIG = "adapter_config.json"
TASK_MAP = "task_map.json"


@dataclass
class LoadedModel:
    model: Any  # HF causal LM or a wrapper with the same forward signature
    tokenizer: Any
    device: str
    dtype: str
    model_name_or_path: str
    lora_checkpoint: str | None = None
    adapter_method: str | None = None  # lora / hydralora / mmoelora / mtlora / peft:<TYPE>; None for the base
    task_map: dict[str, int] = field(default_factory=dict)
    needs_task_ids: bool = False
    forced_task_id: int | None = None
    task_ids_used: dict[str, int] = field(default_factory=dict)
    task_id_fallbacks: list[str] = field(default_factory=list)

    def task_id_for(self, name: str) -> int | None:
        """Task id for an MMoELoRA adapter (None for every other method, which routes without one).

        ``--task_id`` wins; else the eval task/subject is looked up in the adapter's ``task_map.json``; else
        0, which is what the paper's eval scripts pass for every prompt (recorded in ``task_id_fallbacks``).
        """
        if not self.needs_task_ids:
            return None
        if self.forced_task_id is not None:
            tid = self.forced_task_id
        elif name in self.task_map:
            tid = self.task_map[name]
        else:
            tid = 0
            self.task_id_fallbacks.append(name)
        self.task_ids_used[name] = tid
        return tid


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """fp32 on CPU (bf16 matmuls are 8-39x slower there), bf16 on accelerators (the paper's choice)."""
    return "float32" if device == "cpu" else "bfloat16"


def _torch_dtype(name: str) -> Any:
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    table.update({"float16": torch.float16, "fp16": torch.float16})
    if name not in table:
        raise MtLoraError(f"--dtype {name!r}: use float32, bfloat16 or float16")
    return table[name]


def resolve_adapter_dir(lora_checkpoint: str | Path) -> Path:
    """The folder holding ``adapter_config.json``: the path itself, or the ``sft_lora_model`` folder that
    ``mtlora train`` writes inside its output directory (so either can be passed)."""
    path = Path(lora_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"adapter directory not found: {path}")
    if not (path / ADAPTER_CONFIG).is_file() and (path / "sft_lora_model" / ADAPTER_CONFIG).is_file():
        return path / "sft_lora_model"
    return path


def read_adapter_config(lora_checkpoint: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, with a clear error when the folder or the file is missing."""
    path = resolve_adapter_dir(lora_checkpoint)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (not an adapter checkpoint)")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None


def load_model_for_eval(
    model_name_or_path: str | None,
    lora_checkpoint: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    task_id: int | None = None,
) -> LoadedModel:
    """Load tokenizer, base model and adapter; return everything evaluation needs, in ``eval()`` mode.

    * ``model_name_or_path`` may be ``mtlora:<name>`` (bundled), a folder, or a hub id; when it is None the
      adapter's recorded ``base_model_name_or_path`` is used, so a checkpoint from ``mtlora train``
      evaluates with no other flag.
    * ``task_id`` forces the MMoELoRA task id (see :meth:`LoadedModel.task_id_for`).
    * The adapter method is read from ``adapter_config.json`` (``method`` field: mtlora's own format;
      otherwise a ``peft_type`` means a plain peft adapter). An adapter that does not fit the base model
      raises :class:`CheckpointError` with the offending key and shapes (one line at the CLI).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from mtlora.hub import load_tokenizer, resolve_model_path

    adapter_cfg = read_adapter_config(lora_checkpoint) if lora_checkpoint else None
    if lora_checkpoint:
        lora_checkpoint = str(resolve_adapter_dir(lora_checkpoint))
    if model_name_or_path is None:
        recorded = (adapter_cfg or {}).get("base_model_name_or_path")
        if not recorded:
            raise MtLoraError("--model_name_or_path is required (the adapter does not record its base model)")
        model_name_or_path = str(recorded)

    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MtLoraError(f"--device {device}: CUDA is not available on this machine")
    dtype = dtype or default_dtype(device)
    torch_dtype = _torch_dtype(dtype)

    path = resolve_model_path(model_name_or_path)
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bars follow; an error must stay a single line
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MtLoraError(f"cannot load model {model_name_or_path!r}: {first}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.to(device)

    method = None
    task_map: dict[str, int] = {}
    needs_task_ids = False
    if adapter_cfg is not None:
        assert lora_checkpoint is not None
        if "method" in adapter_cfg:
            from mtlora.model import MtLoraModel

            try:
                model = MtLoraModel.from_pretrained(model, lora_checkpoint)
            except (RuntimeError, ValueError, KeyError) as exc:
                if isinstance(exc, MtLoraError):
                    raise
                raise CheckpointError(
                    f"{lora_checkpoint}: adapter does not fit {model_name_or_path}: {exc}"
                ) from None
            model.to(device)
            method = str(adapter_cfg["method"])
            needs_task_ids = method == "mmoelora"
        elif "peft_type" in adapter_cfg:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, lora_checkpoint)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"{lora_checkpoint}: peft adapter does not fit {model_name_or_path}: {exc}"
                ) from None
            model.to(device)
            method = f"peft:{adapter_cfg['peft_type']}"
        else:
            raise CheckpointError(
                f"{lora_checkpoint}/{ADAPTER_CONFIG}: neither 'method' nor 'peft_type' is set"
            )
        map_path = Path(lora_checkpoint) / TASK_MAP
        if map_path.is_file():
            try:
                task_map = {
                    str(k): int(v) for k, v in json.loads(map_path.read_text(encoding="utf-8")).items()
                }
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                raise CheckpointError(f"{map_path}: expected a JSON object {{task_name: id}}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        model_name_or_path=str(model_name_or_path),
        lora_checkpoint=str(lora_checkpoint) if lora_checkpoint else None,
        adapter_method=method,
        task_map=task_map,
        needs_task_ids=needs_task_ids,
        forced_task_id=task_id,
    )


def model_max_length(loaded: LoadedModel, default: int = 2048) -> int:
    """Context length the way lm-evaluation-harness resolves it (config, then tokenizer, then default)."""
    config = getattr(loaded.model, "config", None)
    text_config = getattr(config, "text_config", None)
    for cfg in (text_config, config):
        if cfg is None:
            continue
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    tok_max = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**9:
        return tok_max
    return default
