"""Command-line arguments of ``mtlora train`` / ``train.py``: the paper's flags, verbatim.

Four dataclasses are parsed together by ``HfArgumentParser`` (so ``--help`` documents every flag with its
default): :class:`ModelArguments`, :class:`DataArguments`, :class:`~mtlora.config.MtLoraConfig` (the adapter
flags) and :class:`MtLoraTrainingArguments` (every Hugging Face ``TrainingArguments`` flag, with the paper
scripts' defaults: lr 2e-4, max_seq_length 512, seed 42, no reporting unless ``--report_to`` asks for it).
A YAML/JSON file can hold any of them: ``train.py --config run.yaml [--flag value ...]`` (flags win).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from mtlora.config import _HIDDEN_FLAGS, MtLoraConfig
from mtlora.errors import ConfigError
from mtlora.training.validation import precheck_argv, validate_train_args


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelArguments:
    model_name_or_path: str = _help(
        "Base model: a local folder, a hub id, or mtlora:stories260k (the bundled tiny Llama).", default=None
    )
    tokenizer_name_or_path: str | None = _help("Tokenizer (default: the model's).", default=None)
    tokenizer_name: str | None = _help("Alias of --tokenizer_name_or_path (paper flag).", default=None)
    use_fast_tokenizer: bool = _help("Use a fast (Rust) tokenizer when available.", default=True)
    torch_dtype: str | None = _help(
        "dtype of the frozen base weights: auto | float32 | bfloat16 | float16. Default: bfloat16 with --bf16, "
        "float16 with --fp16, else float32. Trainable adapter weights stay in --adapter_dtype (fp32).",
        default=None,
    )
    attn_implementation: str | None = _help(
        "eager | sdpa | flash_attention_2 (default: transformers' choice).", default=None
    )
    flash_attn: bool = _help("Paper flag: same as --attn_implementation flash_attention_2.", default=False)
    trust_remote_code: bool = _help(
        "Allow custom modelling code from the model repo (off unless asked).", default=False
    )
    model_revision: str = _help("Hub revision of the model.", default="main")
    peft_path: str | None = _help("Start from an existing mtlora adapter folder (paper flag).", default=None)
    load_in_kbits: int = _help("Paper flag; only 16 (no quantisation) is supported.", default=16)


@dataclass
class DataArguments:
    dataset_dir: str | None = _help(
        "Folder of instruction records ({instruction, input, output, task_type}; *.json / *.jsonl). Files named "
        "validation*/dev*/test* are not trained on.",
        default=None,
    )
    train_file: str | None = _help("One training file (instead of --dataset_dir).", default=None)
    validation_file: str | None = _help(
        "Evaluation file (used with --do_eval / --eval_strategy).", default=None
    )
    max_seq_length: int = _help("Truncate examples to this many tokens (from the right).", default=512)
    template: str = _help(
        "Prompt format: paper (instruction[\\ninput]</s> output</s>) or chat.", default="paper"
    )
    data_cache_dir: str | None = _help(
        "Tokenisation cache (default: <output_dir>/tokenized_cache).", default=None
    )
    max_train_samples: int | None = _help("Use only the first N training records (debugging).", default=None)


@dataclass
class MtLoraTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the paper scripts' defaults (``report_to`` is ``none`` unless asked)."""

    output_dir: str | None = _help("Where the adapter, checkpoints, logs and manifest go.", default=None)
    learning_rate: float = _help("Peak learning rate (paper: 2e-4).", default=2e-4)
    seed: int = _help("Random seed (paper: 42).", default=42)
    logging_steps: float = _help("Log every N optimizer steps.", default=10)
    save_strategy: str = _help("Checkpoint strategy: no | steps | epoch (paper: epoch).", default="epoch")
    save_total_limit: int | None = _help("Keep at most N checkpoints.", default=1)
    remove_unused_columns: bool = _help("Must stay False: task ids travel in the batch.", default=False)
    trainable: str | None = _help("Paper flag: alias of --target_modules.", default=None)


def build_parser(prog: str = "mtlora train", *, with_config: bool = True) -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, MtLoraConfig, MtLoraTrainingArguments),
        prog=prog,
        description="Fine-tune a causal LM with lora / hydralora / mmoelora / mtlora adapters.",
    )
    for action in parser._actions:
        if any(opt.lstrip("-").replace("-", "_") in _HIDDEN_FLAGS for opt in action.option_strings):
            action.help = argparse.SUPPRESS
    if with_config:
        parser.add_argument(
            "--config", default=None, help="YAML or JSON file with any of these flags (flags win)."
        )
    return parser


def _config_file_argv(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"--config {path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    argv: list[str] = []
    for key, value in data.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            argv += [flag, str(value)]
        elif isinstance(value, list):
            argv += (
                [flag, ",".join(map(str, value))]
                if key in ("target_modules", "trainable")
                else [flag, *map(str, value)]
            )
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def parse_train_args(
    argv: list[str], prog: str = "mtlora train"
) -> tuple[ModelArguments, DataArguments, MtLoraConfig, MtLoraTrainingArguments]:
    """Parse the command line (and ``--config`` file) into the four argument dataclasses, validated."""
    if any(a in ("-h", "--help") for a in argv):
        build_parser(prog).print_help()
        raise SystemExit(0)
    parser = build_parser(prog, with_config=False)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    ns, rest = pre.parse_known_args(argv)
    if ns.config:
        rest = _config_file_argv(ns.config) + rest
    precheck_argv(rest)
    try:
        model_args, data_args, adapter, train_args = parser.parse_args_into_dataclasses(args=rest)
    except SystemExit as exc:  # argparse already printed the problem
        raise ConfigError("invalid command line (see the message above)") from exc
    except ImportError as exc:  # a flag whose package is missing (transformers checks while building them)
        raise ConfigError(f"invalid command line: {str(exc).strip().splitlines()[0]}") from None
    validate_train_args(model_args, data_args, adapter, train_args)
    if model_args.model_name_or_path is None:
        raise ConfigError("--model_name_or_path is required")
    if train_args.output_dir is None:
        raise ConfigError("--output_dir is required")
    if data_args.dataset_dir is None and data_args.train_file is None:
        raise ConfigError("give the training data with --dataset_dir DIR or --train_file FILE")
    if data_args.template not in ("paper", "chat"):
        raise ConfigError(f"--template {data_args.template!r}: must be paper or chat")
    if model_args.load_in_kbits != 16:
        raise ConfigError(
            f"--load_in_kbits {model_args.load_in_kbits}: quantised base models are not supported (use 16)"
        )
    if train_args.trainable:
        adapter.target_modules = [t.strip() for t in train_args.trainable.split(",") if t.strip()]
        adapter.validate()
    if train_args.remove_unused_columns:
        raise ConfigError("--remove_unused_columns must be False (task ids travel in the batch)")
    return model_args, data_args, adapter, train_args
