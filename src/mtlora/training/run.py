"""`train()`: from parsed arguments to ``output_dir/sft_lora_model``.

Output folder layout::

    output_dir/
      sft_lora_model/         adapter_config.json, adapter_model.safetensors, tokenizer, task_map.json
      checkpoint-<step>/      Trainer checkpoints (adapter + optimizer/scheduler/RNG state) for --resume_from_checkpoint
      run_config.json         every resolved argument (model, data, adapter, training)
      task_map.json           task name -> id
      run_manifest.json       versions, git hash, seed, data file hashes, timings
      train_log.jsonl         one JSON record per log step (losses, routing entropy, expert usage)

With ``--logging_dir D`` the log records also go to ``D/train_log.jsonl``, and ``D`` receives
``train_results.json`` and ``trainer_state.json`` at the end (as the released ``train.py`` wrote them) and the
TensorBoard events with ``--report_to tensorboard``. An ``output_dir`` that already holds an adapter or
checkpoints is refused unless ``--overwrite_output_dir`` or ``--resume_from_checkpoint`` is given (the
transformers 4.x meaning of the flag; ``--resume_from_checkpoint last`` picks the newest checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from mtlora.atomic import atomic_dir, write_text_atomic
from mtlora.config import MtLoraConfig
from mtlora.errors import ConfigError, MtLoraError
from mtlora.hub import DTYPES, torch_dtype
from mtlora.training.arguments import DataArguments, ModelArguments, MtLoraTrainingArguments
from mtlora.training.guards import NonFiniteGuard


class LoggingDirLogCallback(TrainerCallback):
    """The ``train_log.jsonl`` records again, in ``--logging_dir`` (its own class: the Trainer warns about two
    callbacks of one class)."""

    def __init__(self, path: Path, *, resuming: bool = False) -> None:
        from mtlora.training.trainer import JsonlLogCallback

        self.inner = JsonlLogCallback(path, resuming=resuming)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        return self.inner.on_train_begin(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
        return self.inner.on_log(args, state, control, logs=logs, **kwargs)


def route_tensorboard(trainer: Any, train_args: MtLoraTrainingArguments) -> None:
    """``--logging_dir`` is where TensorBoard writes (transformers 5 reads only TENSORBOARD_LOGGING_DIR)."""
    if not train_args.logging_dir:
        return
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
            cb.logging_dir = train_args.logging_dir


def finish_logs(
    trainer: Any, train_args: MtLoraTrainingArguments, result: Any, eval_ds: Any, num_train: int
) -> None:
    """After training: ``--do_eval`` evaluates once; ``--logging_dir`` gets the released run summaries."""
    if train_args.do_eval and eval_ds is not None:
        trainer.evaluate()
    if train_args.logging_dir and trainer.is_world_process_zero():
        logging_dir = Path(train_args.logging_dir)
        logging_dir.mkdir(parents=True, exist_ok=True)
        metrics = {**result.metrics, "train_samples": num_train}
        (logging_dir / "train_results.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        trainer.state.save_to_json(str(logging_dir / "trainer_state.json"))


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


def _hub_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    """``cache_dir`` / ``token`` for every ``from_pretrained`` call (the paper's --cache_dir, --use_auth_token)."""
    kwargs: dict[str, Any] = {}
    if model_args.cache_dir:
        kwargs["cache_dir"] = model_args.cache_dir
    if model_args.use_auth_token:
        kwargs["token"] = True
    return kwargs


def _compute_dtype(train_args: MtLoraTrainingArguments) -> torch.dtype:
    """Dtype a quantized base's matmuls run in: the mixed-precision flag, as the released script chose it."""
    if train_args.fp16:
        return torch.float16
    return torch.bfloat16 if train_args.bf16 else torch.float32


def load_base_model(model_args: ModelArguments, train_args: MtLoraTrainingArguments) -> tuple[Any, Any]:
    """(model, tokenizer) through :func:`mtlora.hub.load_base`, the tokenizer defaulting to the model's (the paper
    code crashed without one), the KV cache off, left on the CPU for the Trainer to place.

    With ``--load_in_kbits 4|8`` the base is quantized while loading onto this process's device and
    prepared for k-bit training (:mod:`mtlora.quant`); the Trainer then leaves it where it is.
    """
    from mtlora.hub import check_model_path, load_base
    from mtlora.quant import from_args, prepare_for_kbit_training

    path = check_model_path(model_args.model_name_or_path)
    quant = from_args(model_args)
    model, tokenizer = load_base(
        path,
        dtype=_base_dtype(model_args, train_args),
        device=str(train_args.device),
        quantization=quant,
        compute_dtype=_compute_dtype(train_args),
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation="flash_attention_2" if model_args.flash_attn else model_args.attn_implementation,
        revision=model_args.model_revision,
        config_name=model_args.config_name,
        tokenizer_name_or_path=model_args.tokenizer_name_or_path or model_args.tokenizer_name,
        use_fast_tokenizer=model_args.use_fast_tokenizer,
        use_cache=False,
        hub_kwargs=_hub_kwargs(model_args),
    )
    if quant.enabled:
        model = prepare_for_kbit_training(model)
        model.config.use_cache = False
    return model, tokenizer


def load_training_data(
    data_args: DataArguments,
    tokenizer: Any,
    cache_root: Path,
    task_map: dict[str, int] | None = None,
    evaluate: bool = True,
):
    """(train dataset, eval dataset or None, task map, data files) - every record validated up front.

    Evaluation data (``--validation_file`` or ``--validation_split_percentage``) is read only when
    ``evaluate`` (``--do_eval`` / ``--eval_strategy``): the released scripts pass a ``--validation_file`` that
    their ``train.py`` never opened without ``--do_eval``.
    """
    from mtlora.data import build_task_map, cached_tokenize, load_records
    from mtlora.data.records import record_files

    source = data_args.train_file or data_args.dataset_dir
    records = load_records(source)
    if data_args.max_train_samples is not None:  # >= 1, checked at parse time
        records = records[: data_args.max_train_samples]
    eval_records = load_records(data_args.validation_file) if evaluate and data_args.validation_file else None
    if evaluate and data_args.validation_split_percentage and eval_records is None:
        records, eval_records = split_validation(records, data_args.validation_split_percentage)
    if task_map is None:
        task_map = build_task_map(records + (eval_records or []))
    tok_kwargs: dict[str, Any] = {
        "cache_dir": cache_root,
        "overwrite": data_args.overwrite_cache,
        "num_proc": data_args.preprocessing_num_workers,
    }
    train = cached_tokenize(
        records, tokenizer, data_args.max_seq_length, data_args.template, task_map, **tok_kwargs
    )
    evald = None
    if eval_records:
        evald = cached_tokenize(
            eval_records, tokenizer, data_args.max_seq_length, data_args.template, task_map, **tok_kwargs
        )
    files = record_files(source)  # exactly the files load_records read (the manifest hashes them)
    if evaluate and data_args.validation_file:
        files.append(Path(data_args.validation_file))
    return train, evald, task_map, files


def split_validation(records: list[Any], percentage: float) -> tuple[list[Any], list[Any]]:
    """(train, validation): the first ``percentage`` % of the records (at least one) are held out.

    The released ``train.py`` inherited ``--validation_split_percentage`` from the Hugging Face ``run_clm``
    example, which takes the validation set as the first p % of the training split (``train[:p%]``).
    """
    n = len(records)
    if n < 2:
        raise ConfigError(
            f"--validation_split_percentage {percentage}: {n} training record(s) cannot be split"
        )
    k = min(max(1, round(n * percentage / 100.0)), n - 1)
    return records[k:], records[:k]


def check_output_dir(train_args: MtLoraTrainingArguments) -> None:
    """The transformers 4.x meaning of ``--overwrite_output_dir``: never silently train over earlier results.

    A folder holding a trained adapter (``sft_lora_model``) or checkpoints (``checkpoint-*``) is refused
    unless the run resumes (``--resume_from_checkpoint``) or ``--overwrite_output_dir`` allows reusing it.
    ``--resume_from_checkpoint last`` (or ``True``) is resolved by :func:`~mtlora.training.trainer.prepare_resume`
    (the newest complete checkpoint in the folder).
    """
    out = Path(train_args.output_dir)
    resume = train_args.resume_from_checkpoint
    if resume or train_args.overwrite_output_dir or not out.is_dir():
        return
    held = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    if (out / "sft_lora_model").is_dir():
        held.insert(0, "sft_lora_model")
    if held:
        raise ConfigError(
            f"--output_dir {out} already holds a trained run ({', '.join(held[:3])}); pass --overwrite_output_dir "
            "to train into it again, or --resume_from_checkpoint <checkpoint folder | last> to continue it"
        )


def _adalora_model(
    model: Any,
    model_args: ModelArguments,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
    num_examples: int,
) -> Any:
    """A peft AdaLoRA model: new (on ``target_modules``, default the architecture's) or from ``--peft_path``."""
    from mtlora.placement import default_target_modules
    from mtlora.training.adalora import get_adalora_model

    if model_args.peft_path:
        from mtlora.hub import read_adapter_config

        cfg = read_adapter_config(model_args.peft_path)
        if str(cfg.get("peft_type", "")).upper() != "ADALORA":
            raise ConfigError(
                f"--peft_path {model_args.peft_path}: not an AdaLoRA adapter (method/peft_type "
                f"{cfg.get('method', cfg.get('peft_type'))!r}) but --method adalora"
            )
        return _attach_peft_path(model, model_args)
    targets = adapter.target_modules or default_target_modules(model)
    return get_adalora_model(model, adapter, train_args, num_examples, list(targets))


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


def _attach_peft_path(model: Any, model_args: ModelArguments) -> Any:
    """``--peft_path``: the saved adapter on the base, trainable (:func:`mtlora.hub.attach_adapter`)."""
    from mtlora.hub import attach_adapter

    peft_model, *_ = attach_adapter(
        model,
        model_args.peft_path,
        trainable=True,
        base_name=model_args.model_name_or_path,
        flag="--peft_path",
    )
    return peft_model


def _build_model(
    model: Any,
    model_args: ModelArguments,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
    num_examples: int,
    task_map: dict[str, int],
) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """``(adapted model, adapter record for run_config.json, trainer class, trainer kwargs)``.

    New adapters come from ``adapter``; ``--peft_path`` continues a saved one (its method must match); AdaLoRA is
    peft's model with its own trainer (:mod:`mtlora.training.adalora`).
    """
    from mtlora.model import get_mtlora_model
    from mtlora.training.trainer import MtLoraTrainer

    if adapter.method == "adalora":
        from mtlora.training.adalora import AdaLoraTrainer

        peft_model = _adalora_model(model, model_args, adapter, train_args, num_examples)
        record = {**adapter.to_dict(), "peft_config": peft_model.peft_config["default"].to_dict()}
        return peft_model, record, AdaLoraTrainer, {}
    if model_args.peft_path:
        from mtlora.hub import read_adapter_config

        saved = read_adapter_config(model_args.peft_path, mtlora_only=True).get("method")
        if saved != adapter.method:
            raise ConfigError(
                f"--peft_path {model_args.peft_path}: adapter method {saved!r} != --method {adapter.method!r}"
            )
        peft_model = _attach_peft_path(model, model_args)
    else:
        peft_model = get_mtlora_model(model, adapter)
        if adapter.enable_block_adapter and adapter.block_adapter_style == "adaptformer":
            if adapter.adaptformer_init_scale == 0:
                warnings.warn(
                    "--adaptformer_init_scale 0 (the released default): with B = 0 every gradient of the "
                    "adapter is exactly zero, so it will not train (mtlora's default is 0.1)",
                    stacklevel=3,
                )
    return peft_model, peft_model.mtlora_config.to_dict(), MtLoraTrainer, {"task_map": task_map}


def _prepare_output(
    train_args: MtLoraTrainingArguments, adapter: MtLoraConfig
) -> tuple[Path, Any, list[Path]]:
    """``(output_dir, checkpoint to resume or None, log folders)``: checks, creates, and starts new logs afresh."""
    from mtlora.training.trainer import prepare_resume

    if not torch.cuda.is_available():
        train_args.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per dataloader
    check_output_dir(train_args)
    if train_args.label_names is None:  # the wrapper's forward(**kwargs) hides `labels` from the Trainer,
        train_args.label_names = ["labels"]  # which then computes no evaluation loss (--do_eval)
    out = Path(train_args.output_dir)
    resume = prepare_resume(train_args, adapter)  # None, or a complete checkpoint folder (else an error)
    out.mkdir(parents=True, exist_ok=True)
    log_dirs = [out] + ([Path(train_args.logging_dir)] if train_args.logging_dir else [])
    for d in log_dirs[1:]:
        d.mkdir(parents=True, exist_ok=True)
    if not train_args.resume_from_checkpoint and train_args.should_save:
        for d in log_dirs:  # a new run starts its log afresh (a resumed one appends)
            (d / "train_log.jsonl").unlink(missing_ok=True)
    return out, resume, log_dirs


def _write_manifest(
    out: Path, train_args: MtLoraTrainingArguments, result: Any, counts: dict[str, Any], seconds: float
) -> None:
    """``run_manifest.json``: versions, git hash, seed, data file hashes, sizes and timings of the run."""
    manifest = {
        "mtlora_version": __import__("mtlora").__version__,
        "git_hash": _git_hash(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "seed": train_args.seed,
        "world_size": train_args.world_size,
        "data_files": {str(p): _file_sha256(p) for p in counts["data_files"] if p.is_file()},
        "num_train_examples": counts["num_train_examples"],
        "num_tasks": counts["num_tasks"],
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "global_steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": round(seconds, 2),
        "spectral_applications": counts["spectral_applications"],
    }
    write_text_atomic(out / "run_manifest.json", json.dumps(manifest, indent=2) + "\n")


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
) -> Path:
    """Run training; returns the adapter folder ``output_dir/sft_lora_model``."""
    from transformers import set_seed

    from mtlora.data import DataCollatorForInstructions, load_task_map, save_task_map
    from mtlora.model_card import write_training_card
    from mtlora.training.trainer import JsonlLogCallback, check_resume_config, save_adapter

    t0 = time.time()
    out, resume, log_dirs = _prepare_output(train_args, adapter)
    set_seed(train_args.seed)
    model, tokenizer = load_base_model(model_args, train_args)
    task_map = None
    if model_args.peft_path and Path(model_args.peft_path, "task_map.json").is_file():
        task_map = load_task_map(Path(model_args.peft_path, "task_map.json"))
    cache_root = Path(data_args.data_cache_dir) if data_args.data_cache_dir else out / "tokenized_cache"
    strategy = getattr(train_args.eval_strategy, "value", train_args.eval_strategy)
    evaluate = bool(train_args.do_eval) or strategy != "no"
    train_ds, eval_ds, task_map, data_files = load_training_data(
        data_args, tokenizer, cache_root, task_map, evaluate=evaluate
    )
    adapter.router_class.prepare_config(adapter, task_map)  # the task gate's task_num comes from the data
    adapter.base_model_name_or_path = model_args.model_name_or_path
    peft_model, adapter_record, trainer_cls, trainer_kwargs = _build_model(
        model, model_args, adapter, train_args, len(train_ds), task_map
    )
    # before run_config.json is rewritten: refuse a resume whose configuration differs from the checkpoint's run
    if resume is not None:
        check_resume_config(resume, peft_model.mtlora_config, train_args, _jsonable(data_args))
    save_task_map(task_map, out / "task_map.json")
    run_config = {
        "model": _jsonable(model_args),
        "data": _jsonable(data_args),
        "adapter": adapter_record,
        "training": json.loads(train_args.to_json_string()),
    }
    write_text_atomic(out / "run_config.json", json.dumps(run_config, indent=2, default=str) + "\n")
    trainable, total = peft_model.get_nb_trainable_parameters()
    resuming = resume is not None
    trainer = trainer_cls(
        model=peft_model,
        args=train_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForInstructions.from_tokenizer(tokenizer),
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(out / "train_log.jsonl", resuming=resuming), NonFiniteGuard(str(out))]
        + [LoggingDirLogCallback(d / "train_log.jsonl", resuming=resuming) for d in log_dirs[1:]],
        **trainer_kwargs,
    )
    route_tensorboard(trainer, train_args)
    result = trainer.train(resume_from_checkpoint=str(resume) if resuming else None)
    finish_logs(trainer, train_args, result, eval_ds, len(train_ds))
    adapter_dir = out / "sft_lora_model"
    if trainer.args.should_save:
        with final_adapter_folder(adapter_dir) as staged:  # published whole, or the old one stays
            save_adapter(peft_model, staged, tokenizer, task_map)
        spectral = getattr(trainer, "spectral", None)  # MtLoraTrainer only
        counts = {
            "data_files": data_files,
            "num_train_examples": len(train_ds),
            "num_tasks": len(task_map),
            "trainable_params": trainable,
            "total_params": total,
            "spectral_applications": spectral.num_applications if spectral else 0,
        }
        _write_manifest(out, train_args, result, counts, time.time() - t0)
        write_training_card(adapter_dir)  # README.md: what the folder is, how it was trained, how to load it
    return adapter_dir
