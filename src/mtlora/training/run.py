"""`train()`: from parsed arguments to ``output_dir/sft_lora_model``.

Output folder layout::

    output_dir/
      sft_lora_model/         adapter_config.json, adapter_model.safetensors, tokenizer, task_map.json
      checkpoint-<step>/      Trainer checkpoints (adapter + optimizer/scheduler/RNG state) for --resume_from_checkpoint
      run_config.json         every resolved argument (model, data, adapter, training)
      task_map.json           task name -> id
      run_manifest.json       versions, git hash, seed, data file hashes, timings
      train_log.jsonl         one JSON record per log step (losses, routing entropy, expert usage)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mtlora.atomic import atomic_dir, write_text_atomic
from mtlora.config import MtLoraConfig
from mtlora.errors import ConfigError, MtLoraError
from mtlora.hub import DTYPES, torch_dtype
from mtlora.training.arguments import DataArguments, ModelArguments, MtLoraTrainingArguments
from mtlora.training.guards import NonFiniteGuard


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _base_dtype(model_args: ModelArguments, train_args: MtLoraTrainingArguments) -> torch.dtype | str:
    if model_args.torch_dtype == "auto":
        return "auto"
    if model_args.torch_dtype is not None:
        if model_args.torch_dtype not in DTYPES:
            raise ConfigError(
                f"--torch_dtype {model_args.torch_dtype!r}: must be auto, float32, bfloat16 or float16"
            )
        return torch_dtype(model_args.torch_dtype, "--torch_dtype")
    if train_args.bf16:
        return torch.bfloat16
    if train_args.fp16:
        return torch.float16
    return torch.float32


def _looks_local(path: str) -> bool:
    """A path the user meant as a folder (absolute, ./ ../ ~, or more than one /), not a hub id ``org/name``."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep in path[:1]


def load_base_model(model_args: ModelArguments, train_args: MtLoraTrainingArguments) -> tuple[Any, Any]:
    """(model, tokenizer) with the tokenizer defaulting to the model's (the paper code crashed without one)."""
    from transformers import AutoModelForCausalLM

    from mtlora.hub import (
        load_tokenizer,
        refused_weights_message,
        remote_code_message,
        resolve_model_path,
    )

    path = resolve_model_path(model_args.model_name_or_path)
    if os.path.isdir(path) and not Path(path, "config.json").is_file():
        raise ConfigError(f"--model_name_or_path {path}: no config.json in this folder")
    if not os.path.isdir(path) and _looks_local(path):
        raise ConfigError(f"--model_name_or_path {path}: no such folder")
    tok_path = model_args.tokenizer_name_or_path or model_args.tokenizer_name or path
    try:
        tokenizer = load_tokenizer(
            tok_path, use_fast=model_args.use_fast_tokenizer, trust_remote_code=model_args.trust_remote_code
        )
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        given = model_args.tokenizer_name_or_path or model_args.tokenizer_name
        flag = "--tokenizer_name_or_path" if given else "--model_name_or_path"
        raise ConfigError(f"{flag} {tok_path}: cannot load the tokenizer ({first})") from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not model_args.trust_remote_code:
            raise ConfigError(remote_code_message(str(tok_path))) from None
        raise
    attn = "flash_attention_2" if model_args.flash_attn else model_args.attn_implementation
    kwargs: dict[str, Any] = {
        "dtype": _base_dtype(model_args, train_args),
        "trust_remote_code": model_args.trust_remote_code,
    }
    if attn:
        kwargs["attn_implementation"] = attn
    if model_args.model_revision != "main":
        kwargs["revision"] = model_args.model_revision
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ConfigError(f"--model_name_or_path {path}: cannot load the model ({exc})") from None
    except pickle.UnpicklingError as exc:
        raise ConfigError(refused_weights_message(path, exc)) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not model_args.trust_remote_code:
            raise ConfigError(remote_code_message(path)) from None
        raise
    model.config.use_cache = False
    return model, tokenizer


def load_training_data(
    data_args: DataArguments, tokenizer: Any, cache_root: Path, task_map: dict[str, int] | None = None
):
    """(train dataset, eval dataset or None, task map, data files) - every record validated up front."""
    from mtlora.data import build_task_map, cached_tokenize, load_records
    from mtlora.data.records import record_files

    source = data_args.train_file or data_args.dataset_dir
    records = load_records(source)
    if data_args.max_train_samples is not None:  # >= 1, checked at parse time
        records = records[: data_args.max_train_samples]
    eval_records = load_records(data_args.validation_file) if data_args.validation_file else None
    if task_map is None:
        task_map = build_task_map(records + (eval_records or []))
    train = cached_tokenize(
        records, tokenizer, data_args.max_seq_length, data_args.template, task_map, cache_dir=cache_root
    )
    evald = None
    if eval_records:
        evald = cached_tokenize(
            eval_records,
            tokenizer,
            data_args.max_seq_length,
            data_args.template,
            task_map,
            cache_dir=cache_root,
        )
    files = record_files(source)  # exactly the files load_records read (the manifest hashes them)
    if data_args.validation_file:
        files.append(Path(data_args.validation_file))
    return train, evald, task_map, files


@contextlib.contextmanager
def final_adapter_folder(adapter_dir: Path) -> Iterator[Path]:
    """Stage ``sft_lora_model`` and publish it as a unit when the block ends (:func:`mtlora.atomic.atomic_dir`).

    A kill or a failure (full disk, permissions) at any point leaves the previous adapter folder intact; a
    failure is one ``error:`` line naming the folder (the training itself is in the checkpoints).
    """
    from safetensors import SafetensorError

    try:
        with atomic_dir(adapter_dir) as tmp:
            yield tmp
    except (OSError, SafetensorError) as exc:  # full disk, quota, permissions (safetensors wraps its own)
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MtLoraError(
            f"cannot save the adapter to {adapter_dir}: {reason} (any previous adapter there is intact; the "
            "trained weights are in the last checkpoint, if --save_strategy wrote one)"
        ) from None


def save_final_adapter(model: Any, adapter_dir: Path, tokenizer: Any, task_map: dict[str, int]) -> None:
    """Adapter, config, tokenizer and task map as one unit in ``adapter_dir`` (see :func:`final_adapter_folder`)."""
    from mtlora.training.trainer import save_adapter

    with final_adapter_folder(adapter_dir) as tmp:
        save_adapter(model, tmp, tokenizer, task_map)


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
) -> Path:
    """Run training; returns the adapter folder ``output_dir/sft_lora_model``."""
    from transformers import set_seed

    from mtlora.data import DataCollatorForInstructions, load_task_map, save_task_map
    from mtlora.model import MtLoraModel, get_mtlora_model
    from mtlora.training.trainer import JsonlLogCallback, MtLoraTrainer, save_adapter

    t0 = time.time()
    if not torch.cuda.is_available():
        train_args.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per dataloader
    out = Path(train_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(train_args.seed)
    model, tokenizer = load_base_model(model_args, train_args)
    task_map = None
    if model_args.peft_path and Path(model_args.peft_path, "task_map.json").is_file():
        task_map = load_task_map(Path(model_args.peft_path, "task_map.json"))
    cache_root = Path(data_args.data_cache_dir) if data_args.data_cache_dir else out / "tokenized_cache"
    train_ds, eval_ds, task_map, data_files = load_training_data(data_args, tokenizer, cache_root, task_map)
    if adapter.method == "mmoelora" and adapter.task_num is None:
        adapter.task_num = len(task_map)
    if adapter.method == "mmoelora" and adapter.task_num < len(task_map):
        raise ConfigError(f"--task_num {adapter.task_num}: the data has {len(task_map)} tasks")
    adapter.base_model_name_or_path = model_args.model_name_or_path
    if model_args.peft_path:
        pm = MtLoraModel.from_pretrained(model, model_args.peft_path, is_trainable=True)
        if pm.mtlora_config.method != adapter.method:
            raise ConfigError(
                f"--peft_path {model_args.peft_path}: adapter method {pm.mtlora_config.method!r} != --method {adapter.method!r}"
            )
        peft_model = pm
    else:
        peft_model = get_mtlora_model(model, adapter)

    save_task_map(task_map, out / "task_map.json")
    run_config = {
        "model": _jsonable(model_args),
        "data": _jsonable(data_args),
        "adapter": peft_model.mtlora_config.to_dict(),
        "training": json.loads(train_args.to_json_string()),
    }
    write_text_atomic(out / "run_config.json", json.dumps(run_config, indent=2, default=str) + "\n")
    trainable, total = peft_model.get_nb_trainable_parameters()

    trainer = MtLoraTrainer(
        model=peft_model,
        args=train_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForInstructions.from_tokenizer(tokenizer),
        processing_class=tokenizer,
        task_map=task_map,
        callbacks=[JsonlLogCallback(out / "train_log.jsonl"), NonFiniteGuard(str(out))],
    )
    result = trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
    adapter_dir = out / "sft_lora_model"
    if trainer.args.should_save:
        with final_adapter_folder(adapter_dir) as staged:  # published whole, or the old one stays
            save_adapter(peft_model, staged, tokenizer, task_map)
        manifest = {
            "mtlora_version": __import__("mtlora").__version__,
            "git_hash": _git_hash(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "seed": train_args.seed,
            "world_size": train_args.world_size,
            "data_files": {str(p): _file_sha256(p) for p in data_files if p.is_file()},
            "num_train_examples": len(train_ds),
            "num_tasks": len(task_map),
            "trainable_params": trainable,
            "total_params": total,
            "global_steps": result.global_step,
            "train_loss": result.training_loss,
            "seconds": round(time.time() - t0, 2),
            "spectral_applications": trainer.spectral.num_applications if trainer.spectral else 0,
        }
        write_text_atomic(out / "run_manifest.json", json.dumps(manifest, indent=2) + "\n")
    return adapter_dir
