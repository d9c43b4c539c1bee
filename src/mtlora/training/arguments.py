"""Command-line arguments of ``mtlora train`` / ``train.py``: the paper's flags, verbatim.

Four dataclasses are parsed together by ``HfArgumentParser`` (so ``--help`` documents every flag with its
default): :class:`ModelArguments`, :class:`DataArguments`, :class:`~mtlora.config.MtLoraConfig` (the adapter
flags) and :class:`MtLoraTrainingArguments` (every Hugging Face ``TrainingArguments`` flag, with the paper
scripts' defaults: lr 2e-4, max_seq_length 512, seed 42, no reporting unless ``--report_to`` asks for it).
A YAML/JSON file can hold any of them: ``train.py --config run.yaml [--flag value ...]`` (flags win).

Every flag of the released ``train.py`` (and every inherited Hugging Face flag its experiment scripts pass,
including the transformers-4.x ``--logging_dir`` and ``--overwrite_output_dir`` that transformers 5 removed)
is accepted with the released meaning, or refused with one line saying why; docs/paper_differences.md has
the table. ``--released_defaults`` switches the defaults to the released ``train.py``'s
(:data:`RELEASED_DEFAULTS`).
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
    # --- released train.py flags (issue 13) ---
    config_name: str | None = _help(
        "Model config (folder or hub id) to use instead of the model's own config.json (paper flag).",
        default=None,
    )
    config_overrides: str | None = _help(
        "Paper flag for training a model from scratch; refused (mtlora always starts from --model_name_or_path).",
        default=None,
    )
    cache_dir: str | None = _help(
        "Hugging Face cache folder for downloaded models, configs and tokenizers (paper flag).", default=None
    )
    use_auth_token: bool = _help(
        "Use the token saved by `hf auth login` for private hub models (paper flag; token=True).",
        default=False,
    )
    load_in_kbits: int = _help(
        "Store the frozen base's linears in 4 bit (QLoRA: NF4/FP4), 8 bit (LLM.int8) or 16 (not quantized); "
        "4 and 8 need bitsandbytes (pip install 'mtlora[qlora]'). Matmuls run in the --bf16/--fp16/fp32 "
        "compute dtype; adapters stay in --adapter_dtype.",
        default=16,
    )
    double_quant: bool = _help("4 bit: also quantize the quantization statistics (paper flag).", default=True)
    quant_type: str = _help("4-bit data type: nf4 | fp4 (paper flag).", default="nf4")


@dataclass
class DataArguments:
    dataset_dir: str | None = _help(
        "Folder of instruction records ({instruction, input, output, task_type}; *.json / *.jsonl). Files named "
        "validation*/dev*/test* are not trained on.",
        default=None,
    )
    train_file: str | None = _help("One training file (instead of --dataset_dir).", default=None)
    validation_file: str | None = _help(
        "Evaluation file, read only with --do_eval / --eval_strategy (as released).", default=None
    )
    max_seq_length: int = _help("Truncate examples to this many tokens (from the right).", default=512)
    template: str = _help(
        "Prompt format: paper (instruction[\\ninput]</s> output</s>) or chat.", default="paper"
    )
    data_cache_dir: str | None = _help(
        "Tokenisation cache (default: <output_dir>/tokenized_cache).", default=None
    )
    max_train_samples: int | None = _help("Use only the first N training records (debugging).", default=None)
    # --- released train.py flags (issue 13) ---
    overwrite_cache: bool = _help(
        "Tokenise again even if the tokenisation cache has this data (the cache key already covers data, "
        "tokenizer and settings, so this is only needed to rebuild a damaged cache).",
        default=False,
    )
    validation_split_percentage: float | None = _help(
        "Hold out this percentage (0 < p < 100) of the training records as evaluation data when evaluation is "
        "asked for (--do_eval / --eval_strategy) and no --validation_file is given. Released default 0.05, "
        "never used there.",
        default=None,
    )
    preprocessing_num_workers: int | None = _help(
        "Processes that tokenise the data (default: one).", default=None
    )
    keep_linebreaks: bool = _help(
        "Paper flag for plain-text datasets; instruction records always keep their line breaks (False is "
        "refused).",
        default=True,
    )


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
    force: bool = _help(
        "With --resume_from_checkpoint: resume from a checkpoint that lacks optimizer, scheduler, RNG or "
        "regularizer state (one warning per missing file) instead of refusing.",
        default=False,
    )
    # --- released train.py / transformers 4.x flags (issue 13) ---
    logging_dir: str | None = _help(
        "Also write the logs here: train_log.jsonl (every log record), train_results.json and "
        "trainer_state.json at the end, and TensorBoard events with --report_to tensorboard (default: "
        "output_dir only). transformers 4.x flag, removed in 5.",
        default=None,
    )
    overwrite_output_dir: bool = _help(
        "Allow training into an output_dir that already holds an adapter or checkpoints (its files are "
        "overwritten as the new run writes them). Without it such a folder is refused unless "
        "--resume_from_checkpoint is given. transformers 4.x flag, removed in 5.",
        default=False,
    )
    init_r: int = _help("adalora: initial rank of every adapted matrix (paper flag).", default=12)
    target_r: int = _help("adalora: target average rank after rank allocation (paper flag).", default=8)
    orth_reg_weight: float = _help(
        "adalora: weight of the orthogonality regularizer of P and Q (paper flag).", default=0.5
    )


#: The released ``train.py``'s command-line defaults where they differ from mtlora's (which are the values its
#: experiment scripts pass). ``--released_defaults`` makes them the parser's defaults, so explicit flags (and
#: ``--config`` files) still win; docs/paper_differences.md lists them next to mtlora's. The training-argument
#: values are the transformers 4.36 defaults the released script inherited.
RELEASED_DEFAULTS: dict[str, Any] = {
    "method": "lora",
    "lora_rank": 8,
    "lora_alpha": 32.0,
    "lora_nums": 2,
    "lora_dropout": 0.1,
    "block_adapter_type": "attention",
    "routing_group_size": 1,
    "adaptformer_init_scale": 0.0,
    "task_num": 2,
    "max_seq_length": 1024,
    "learning_rate": 5e-5,
    "logging_steps": 500,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": None,
}


def build_parser(prog: str = "mtlora train", *, with_config: bool = True) -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, MtLoraConfig, MtLoraTrainingArguments),
        prog=prog,
        description="Fine-tune a causal LM with lora / hydralora / mmoelora / mtlora / adalora adapters.",
    )
    for action in parser._actions:
        if any(opt.lstrip("-").replace("-", "_") in _HIDDEN_FLAGS for opt in action.option_strings):
            action.help = argparse.SUPPRESS
    if with_config:
        parser.add_argument(
            "--config", default=None, help="YAML or JSON file with any of these flags (flags win)."
        )
        parser.add_argument(
            "--released_defaults",
            action="store_true",
            help="Use the released train.py's defaults (r 8, alpha 32, E 2, dropout 0.1, method lora, block type "
            "attention, group size 1, max_seq_length 1024, lr 5e-5, ...) for every flag not given.",
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


config_file_argv = _config_file_argv  # public name: lorahub expands --config files the same way


def parse_train_args(
    argv: list[str], prog: str = "mtlora train", check_paths: bool = True
) -> tuple[ModelArguments, DataArguments, MtLoraConfig, MtLoraTrainingArguments]:
    """Parse the command line (and ``--config`` file) into the four argument dataclasses, validated.

    ``check_paths=False`` skips only the checks that the named data/adapter/output paths exist and are usable,
    so a command meant for another machine (a cluster's data folders) can be checked flag by flag here."""
    if any(a in ("-h", "--help") for a in argv):
        build_parser(prog).print_help()
        raise SystemExit(0)
    parser = build_parser(prog, with_config=False)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    ns, rest = pre.parse_known_args(argv)
    if ns.config:
        rest = _config_file_argv(ns.config) + rest
    if "--released_defaults" in rest:
        rest = [a for a in rest if a != "--released_defaults"]
        parser.set_defaults(**RELEASED_DEFAULTS)
    rest = _push_to_hub_argv(rest)
    precheck_argv(rest)
    try:
        model_args, data_args, adapter, train_args = parser.parse_args_into_dataclasses(args=rest)
    except SystemExit as exc:  # argparse already printed the problem
        raise ConfigError("invalid command line (see the message above)") from exc
    except ImportError as exc:  # a flag whose package is missing (transformers checks while building them)
        raise ConfigError(f"invalid command line: {str(exc).strip().splitlines()[0]}") from None
    validate_train_args(model_args, data_args, adapter, train_args, check_paths=check_paths)
    if model_args.model_name_or_path is None:
        raise ConfigError("--model_name_or_path is required")
    if train_args.output_dir is None:
        raise ConfigError("--output_dir is required")
    if data_args.dataset_dir is None and data_args.train_file is None:
        raise ConfigError("give the training data with --dataset_dir DIR or --train_file FILE")
    if data_args.template not in ("paper", "chat"):
        raise ConfigError(f"--template {data_args.template!r}: must be paper or chat")
    from mtlora.quant import from_args

    from_args(model_args)  # --load_in_kbits / --quant_type: a bad value fails before anything loads
    if train_args.trainable:
        adapter.target_modules = [t.strip() for t in train_args.trainable.split(",") if t.strip()]
        adapter.validate()
    if train_args.remove_unused_columns:
        raise ConfigError("--remove_unused_columns must be False (task ids travel in the batch)")
    _check_released_flags(model_args, data_args, adapter, train_args)
    if train_args.push_to_hub:
        from mtlora.publish import check_push_target

        if not train_args.hub_model_id:
            raise ConfigError("--push_to_hub: name the Hub repo, --push_to_hub OWNER/NAME")
        if check_paths:  # the Hub must be reachable from here; checked before any training starts
            check_push_target(train_args.hub_model_id)
    return model_args, data_args, adapter, train_args


_BOOL_WORDS = {"true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"}


def _push_to_hub_argv(argv: list[str]) -> list[str]:
    """``--push_to_hub REPO`` -> ``--push_to_hub true --hub_model_id REPO`` (transformers' own flag is a bool
    with the repo in ``--hub_model_id``; both spellings work). mtlora, not the Trainer, does the upload: once,
    of the final adapter folder with its model card (:mod:`mtlora.publish`, called by ``mtlora train``)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--push_to_hub" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value, step = argv[i + 1], 2
        elif arg.startswith("--push_to_hub="):
            value, step = arg.split("=", 1)[1], 1
        if value is not None and value.lower() not in _BOOL_WORDS:
            out += ["--push_to_hub", "true", "--hub_model_id", value]
            i += step
            continue
        out.append(arg)
        i += 1
    return out


def _check_released_flags(
    model_args: ModelArguments,
    data_args: DataArguments,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
) -> None:
    """The released flags whose meaning cannot apply here, or whose values are inconsistent: one line each."""
    if model_args.config_overrides is not None:
        raise ConfigError(
            "--config_overrides: only for training a model from scratch, which mtlora does not do (the released "
            "train.py also refused it together with --model_name_or_path); edit the model's config.json or "
            "pass --config_name"
        )
    if not data_args.keep_linebreaks:
        raise ConfigError(
            "--keep_linebreaks False: applies to plain-text (TXT) datasets, which mtlora does not read; "
            "instruction records always keep their line breaks (drop the flag)"
        )
    pct = data_args.validation_split_percentage
    if pct is not None:
        if not 0 < pct < 100:
            raise ConfigError(f"--validation_split_percentage {pct}: must be between 0 and 100 (exclusive)")
        if data_args.validation_file:
            raise ConfigError(
                "--validation_split_percentage applies only without --validation_file (give one of them)"
            )
    if data_args.preprocessing_num_workers is not None and data_args.preprocessing_num_workers < 1:
        raise ConfigError(
            f"--preprocessing_num_workers {data_args.preprocessing_num_workers}: must be a positive integer"
        )
    if train_args.do_eval and not (data_args.validation_file or pct):
        raise ConfigError(
            "--do_eval needs evaluation data: --validation_file FILE or --validation_split_percentage P"
        )
    if adapter.method == "adalora":
        if not 1 <= train_args.target_r <= train_args.init_r:
            raise ConfigError(
                f"--target_r {train_args.target_r} / --init_r {train_args.init_r}: adalora needs "
                "1 <= target_r <= init_r"
            )
        if train_args.orth_reg_weight < 0:
            raise ConfigError(f"--orth_reg_weight {train_args.orth_reg_weight}: must be >= 0")
        if adapter.enable_block_adapter:
            raise ConfigError("--enable_block_adapter: adalora adapts component linears only")
