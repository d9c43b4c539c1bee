"""Checks of the training command line that must run before anything is loaded (one ``error:`` line each).

Why a module of its own: the argument dataclasses accept whatever ``HfArgumentParser`` can convert, and the
failures it lets through are expensive or silent -- ``--lora_alpha nan`` trains a NaN adapter with exit 0,
``--gradient_accumulation_steps 0`` dies in the Trainer with a ZeroDivisionError after the model is loaded,
``--max_train_samples 0`` trained on everything, a missing ``--output_dir`` wrote into ``./trainer_output``
(transformers 5's default). :func:`precheck_argv` runs on the raw command line (things the dataclasses
cannot see or that fail while they are built), :func:`validate_train_args` on the parsed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any

from mtlora.errors import ConfigError
from mtlora.outputs import check_output_dir

__all__ = ["precheck_argv", "validate_train_args"]

#: Integer flags that must be at least this value (when set).
_MIN_INT = {
    "gradient_accumulation_steps": 1,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "max_seq_length": 2,
    "max_train_samples": 1,
    "dataloader_num_workers": 0,
}
#: Float flags with a lower bound (inclusive) and an optional upper bound (exclusive).
_FLOAT_RANGE = {
    "learning_rate": (0.0, None),
    "weight_decay": (0.0, None),
    "max_grad_norm": (0.0, None),
    "adam_epsilon": (0.0, None),
    "adam_beta1": (0.0, 1.0),
    "adam_beta2": (0.0, 1.0),
    "label_smoothing_factor": (0.0, 1.0),
}


def _flag_values(argv: list[str], *names: str) -> argparse.Namespace:
    """The values of a few flags in ``argv`` (None when absent), parsed the way the real parser would."""
    pre = argparse.ArgumentParser(add_help=False)
    for name in names:
        pre.add_argument(f"--{name}", default=None)
    ns, _ = pre.parse_known_args(argv)
    return ns


def precheck_argv(argv: list[str]) -> None:
    """Checks on the raw command line (``--config`` already expanded into it)."""
    ns = _flag_values(argv, "output_dir", "deepspeed")
    if ns.output_dir is None:
        # transformers 5 would fill in "trainer_output" and write into the current directory
        raise ConfigError("--output_dir is required (where the adapter, checkpoints and logs go)")
    if ns.deepspeed is not None:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"--deepspeed {ns.deepspeed}: the deepspeed package is not installed (pip install deepspeed), "
                "or train without --deepspeed (plain DDP: torchrun / accelerate launch)"
            )
        text = ns.deepspeed.strip()
        if not text.startswith("{") and not Path(text).is_file():
            raise ConfigError(f"--deepspeed {ns.deepspeed}: config file not found")


def _check_finite(obj: Any, prefix: str = "--") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name} {value}: must be a finite number")


def _check_path_is_folder(flag: str, value: str | None) -> None:
    if value and Path(value).exists() and not Path(value).is_dir():
        raise ConfigError(f"{flag} {value}: exists and is not a folder")


def validate_train_args(
    model_args: Any, data_args: Any, adapter: Any, train_args: Any, check_paths: bool = True
) -> None:
    """Range, finiteness and path checks of the parsed training arguments (the adapter config validates
    itself, non-finite values included, in :meth:`mtlora.config.MtLoraConfig.validate`); ``check_paths=False``
    leaves out the path checks, for commands meant for another machine."""
    for obj in (model_args, data_args, train_args):
        _check_finite(obj)
    for name, low in _MIN_INT.items():
        for obj in (data_args, train_args):
            value = getattr(obj, name, None)
            if value is not None and not isinstance(value, bool) and isinstance(value, int) and value < low:
                what = "a positive integer" if low == 1 else f">= {low}"
                raise ConfigError(f"--{name} {value}: must be {what}")
    for name, (low, high) in _FLOAT_RANGE.items():
        value = getattr(train_args, name, None)
        if value is None:
            continue
        if value < low or (high is not None and value >= high):
            rng = f">= {low:g}" if high is None else f"in [{low:g}, {high:g})"
            raise ConfigError(f"--{name} {value}: must be {rng}")
    if check_paths:
        _check_paths(model_args, data_args, train_args)


def _check_paths(model_args: Any, data_args: Any, train_args: Any) -> None:
    """The named paths exist and have the right kind, so a typo fails here and not after the model loaded."""
    try:
        check_output_dir(train_args.output_dir, overwrite=True)
    except Exception as exc:  # MtLoraError: re-raise as a training config error with the same text
        raise ConfigError(str(exc)) from None
    for flag, value in (("--dataset_dir", data_args.dataset_dir),):
        if value and not Path(value).exists():
            raise ConfigError(f"{flag} {value}: no such folder or file")
    for flag, value in (
        ("--train_file", data_args.train_file),
        ("--validation_file", data_args.validation_file),
    ):
        if value and not Path(value).is_file():
            raise ConfigError(f"{flag} {value}: no such file")
    _check_path_is_folder("--data_cache_dir", data_args.data_cache_dir)
    _check_path_is_folder("--logging_dir", getattr(train_args, "logging_dir", None))
    if model_args.peft_path and not Path(model_args.peft_path, "adapter_config.json").is_file():
        raise ConfigError(
            f"--peft_path {model_args.peft_path}: not an adapter folder (no adapter_config.json)"
        )
