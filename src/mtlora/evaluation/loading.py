"""What evaluation needs of a loaded model: the model itself (:func:`mtlora.hub.load_model`) plus task ids.

The rest of the evaluation code only needs "a callable causal LM, its tokenizer and, for MMoELoRA, a
task-name -> id map"; loading itself is shared with analysis, export and the demo in :mod:`mtlora.hub`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mtlora.hub import Loaded, load_config, load_model, read_adapter_config, resolve_adapter_dir

__all__ = [
    "LoadedModel",
    "config_max_positions",
    "load_model_for_eval",
    "model_max_length",
    "read_adapter_config",
    "resolve_adapter_dir",
]


@dataclass
class LoadedModel(Loaded):
    """:class:`mtlora.hub.Loaded` plus the task-id bookkeeping the reports record.

    ``lora_checkpoint``, ``adapter_method``, ``task_ids_used`` and ``task_id_fallbacks`` are keys of
    ``*_results.json`` (:mod:`mtlora.evaluation.report`), kept under these names.
    """

    forced_task_id: int | None = None
    task_ids_used: dict[str, int] = field(default_factory=dict)
    task_id_fallbacks: list[str] = field(default_factory=list)
    #: id used for tasks missing from the task map: 0 (what the paper's eval scripts pass), or the "general"
    #: id ``task_num`` of an adapter built with ``mmoelora_general_task`` (the released MMoELoRA's default)
    fallback_task_id: int = 0

    @property
    def lora_checkpoint(self) -> str | None:
        """The adapter folder (``--lora_checkpoint``, resolved), None for the bare base."""
        return str(self.adapter_dir) if self.adapter_dir is not None else None

    @property
    def adapter_method(self) -> str | None:
        """lora / hydralora / mmoelora / mtlora / peft:<TYPE>; None for the bare base."""
        return self.method

    def task_id_for(self, name: str) -> int | None:
        """Task id for an MMoELoRA adapter (None for every other method, which routes without one).

        ``--task_id`` wins; else the eval task/subject is looked up in the adapter's ``task_map.json``; else
        :attr:`fallback_task_id` (recorded in ``task_id_fallbacks``).
        """
        if not self.needs_task_ids:
            return None
        if self.forced_task_id is not None:
            tid = self.forced_task_id
        elif name in self.task_map:
            tid = self.task_map[name]
        else:
            tid = self.fallback_task_id
            self.task_id_fallbacks.append(name)
        self.task_ids_used[name] = tid
        return tid


def load_model_for_eval(
    model_name_or_path: str | None,
    lora_checkpoint: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    task_id: int | None = None,
    quantization: Any = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load tokenizer, base model and adapter (:func:`mtlora.hub.load_model`), frozen, in ``eval()`` mode.

    * ``model_name_or_path`` may be ``mtlora:<name>`` (bundled), a folder, or a hub id; when it is None the
      adapter's recorded ``base_model_name_or_path`` is used, so a checkpoint from ``mtlora train``
      evaluates with no other flag.
    * ``task_id`` forces the MMoELoRA task id (see :meth:`LoadedModel.task_id_for`).
    * ``quantization`` (:class:`mtlora.quant.Quantization`, ``--load_in_kbits``) quantizes the base.
    * The adapter method is read from ``adapter_config.json`` (``method`` field: mtlora's own format;
      otherwise a ``peft_type`` means a plain peft adapter). An adapter that does not fit the base model
      raises :class:`CheckpointError` with the offending key and shapes (one line at the CLI).
    """
    loaded = load_model(
        model_name_or_path,
        lora_checkpoint,
        device=device,
        dtype=dtype,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
    )
    general = loaded.needs_task_ids and bool(loaded.config.get("mmoelora_general_task"))
    fields = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(Loaded)}
    return LoadedModel(
        **fields, forced_task_id=task_id, fallback_task_id=int(loaded.config["task_num"]) if general else 0
    )


def _positions(config: Any) -> int | None:
    """The position-table size a model config declares (text config first, for multimodal models)."""
    text_config = getattr(config, "text_config", None)
    for cfg in (text_config, config):
        if cfg is None:
            continue
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def config_max_positions(model_name_or_path: str, *, trust_remote_code: bool = False) -> int | None:
    """Positions of a model read from its config alone (no weights), or None when the config says nothing
    or cannot be read here (the model load then reports the problem)."""
    try:
        config = load_config(model_name_or_path, trust_remote_code=trust_remote_code)
    except ValueError:  # ConfigError (unreadable, needs remote code) and transformers' own ValueErrors
        return None
    return _positions(config)


def model_max_length(loaded: LoadedModel, default: int = 2048) -> int:
    """Context length the way lm-evaluation-harness resolves it (config, then tokenizer, then default)."""
    value = _positions(getattr(loaded.model, "config", None))
    if value is not None:
        return value
    tok_max = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**9:
        return tok_max
    return default
