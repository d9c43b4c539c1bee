"""``mtlora train`` / ``python train.py``: the paper's training command line (see ``--help``)."""

from __future__ import annotations

import os


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
        adapter_dir = run_lorahub_method(model_args, data_args, adapter, train_args)
        if train_args.should_save:
            print(f"composed LoRAHub adapter saved to {adapter_dir}")
        return 0
    model_args, data_args, adapter, train_args = parse_train_args(argv)
    adapter_dir = train(model_args, data_args, adapter, train_args)
    if train_args.should_save:
        print(f"adapter saved to {adapter_dir}")
    return 0
