"""``mtlora train`` / ``python train.py``: the paper's training command line (see ``--help``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from mtlora.errors import MtLoraError, refused_pickle_detail


def refused_checkpoint_pickle(exc: BaseException, train_args: Any) -> MtLoraError:
    """One error line naming the checkpoint file whose pickle ``torch.load(weights_only=True)`` refused.

    The Trainer does not say which file it was loading; on this (rare) path we find it by loading each
    pickled file of the resumed checkpoint the same safe way.
    """
    import torch

    detail = refused_pickle_detail(exc)
    resume = getattr(train_args, "resume_from_checkpoint", None)
    folder: Path | None = None
    if isinstance(resume, str) and resume.lower() not in ("true", "false") and Path(resume).is_dir():
        folder = Path(resume)
    elif resume in (True, "True", "true") and train_args.output_dir:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(train_args.output_dir)
        folder = Path(last) if last else None
    if folder is not None:
        for f in sorted(folder.iterdir()):
            if f.suffix not in (".pt", ".pth", ".bin") or not f.is_file():
                continue
            try:
                torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                return MtLoraError(
                    f"--resume_from_checkpoint {resume}: {f.name} holds more than tensors and plain values "
                    f"({detail}); refused to unpickle it (nothing in it was run) -- resume from a checkpoint "
                    "you trust"
                )
    return MtLoraError(f"refused to unpickle a file holding more than tensors and plain values ({detail})")


def build_parser(prog: str = "mtlora train"):  # noqa: ANN201 - HfArgumentParser, imported lazily
    """The full ``mtlora train`` parser (the Trainer's flags; see :func:`pre_parser` for mtlora's own)."""
    from mtlora.training.arguments import build_parser as hf_parser

    return hf_parser(prog)


def pre_parser():  # noqa: ANN201
    """The convention flags of :mod:`mtlora.cli_args` that ``mtlora train`` maps onto the Trainer's.

    Train stays on ``HfArgumentParser`` (every released flag, both spellings); these are taken off the command
    line first and rewritten: ``--data`` -> ``--dataset_dir`` (a folder) / ``--train_file`` (a file),
    ``--adapter`` -> ``--peft_path``, ``--no_progress`` -> ``--disable_tqdm True``; ``--threads`` sets torch's
    CPU threads.
    """
    from mtlora.cli_args import Parser, add_adapter, add_data, add_runtime

    pre = Parser(prog="mtlora train", add_help=False, allow_abbrev=False)
    group = pre.add_argument_group("mtlora convention flags (mapped onto the Trainer's)")
    add_data(group, help="training records: a folder (= --dataset_dir) or a file (= --train_file)")
    add_adapter(group, help="adapter to continue from (= --peft_path)")
    add_runtime(group, device=False, dtype=False)
    return pre


def map_convention_flags(argv: list[str]) -> list[str]:
    """``argv`` with the :func:`pre_parser` flags rewritten to the Trainer's (``--threads`` applied here)."""
    from mtlora.cli_args import apply_runtime

    ns, rest = pre_parser().parse_known_args(argv)
    apply_runtime(ns)
    extra: list[str] = []
    if ns.data:
        extra += ["--dataset_dir" if Path(ns.data).is_dir() else "--train_file", ns.data]
    if ns.adapter:
        extra += ["--peft_path", ns.adapter]
    if ns.no_progress:
        extra += ["--disable_tqdm", "True"]
    return extra + rest


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        print("\n" + pre_parser().format_help())
        return 0
    argv = map_convention_flags(argv)
    import torch

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun/accelerate on a CPU-only machine: let accelerate set up multi-CPU DDP (gloo)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")

    from mtlora.lorahub import lorahub_train_argv, run_lorahub_method
    from mtlora.training.arguments import parse_train_args
    from mtlora.training.run import train

    hub_argv = lorahub_train_argv(argv)  # None unless --method lorahub; else argv with --method lora
    if hub_argv is not None:
        model_args, data_args, adapter, train_args = parse_train_args(hub_argv)
        push_repo = _take_push_repo(train_args)
        adapter_dir = run_lorahub_method(model_args, data_args, adapter, train_args)
        if train_args.should_save:
            from mtlora.model_card import write_training_card

            write_training_card(adapter_dir)
            print(f"composed LoRAHub adapter saved to {adapter_dir}")
            _push(adapter_dir, push_repo, train_args.hub_private_repo)
        return 0
    model_args, data_args, adapter, train_args = parse_train_args(argv)
    push_repo = _take_push_repo(train_args)
    try:
        adapter_dir = train(model_args, data_args, adapter, train_args)
    except pickle.UnpicklingError as exc:  # the Trainer's torch.load(weights_only=True) refused a file
        raise refused_checkpoint_pickle(exc, train_args) from None
    if train_args.should_save:
        print(f"adapter saved to {adapter_dir}")
        _push(adapter_dir, push_repo, train_args.hub_private_repo)
    return 0


def _take_push_repo(train_args: Any) -> str | None:
    """The repo of ``--push_to_hub`` (checked by parse_train_args); the Trainer's own push is switched off so
    that it does not upload checkpoints on every save - mtlora uploads the final adapter folder once."""
    repo = train_args.hub_model_id if train_args.push_to_hub else None
    train_args.push_to_hub = False
    return repo


def _push(adapter_dir: Path, repo: str | None, private: bool | None) -> None:
    """Upload the finished adapter folder (adapter, tokenizer, task map, model card) to ``repo``."""
    if repo:
        from mtlora.publish import push_folder

        print(f"pushed {adapter_dir} to {push_folder(adapter_dir, repo, private=private)}")
