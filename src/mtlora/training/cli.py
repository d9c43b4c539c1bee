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


def main(argv: list[str]) -> int:
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
