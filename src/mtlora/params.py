"""Parameter counting on the ``meta`` device: exact counts for 7B/13B models without any weights.

``mtlora params --model_name_or_path DIR --method M [adapter flags]`` where DIR needs only a ``config.json``
prints ``trainable_params=<int> total_params=<int> percent=<float>``; ``percent`` is trainable / (base +
trainable) x 100, the convention of the paper's tables (e.g. HydraLoRA q,v on LLaMA-2-7B: 75,497,472 = 1.108%).
"""

from __future__ import annotations

import argparse
import os

import torch

from mtlora.config import MtLoraConfig, adapter_argument_parser
from mtlora.outputs import add_safety_flags


def build_meta_model(
    model_name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False
) -> torch.nn.Module:
    """Instantiate a causal LM from its config on the meta device (no memory, no weights).

    The config is read through :func:`mtlora.hub.load_config` (``mtlora:<name>`` works, errors name the flag).
    """
    from transformers import AutoModelForCausalLM

    from mtlora.hub import check_model_path, load_config

    path = check_model_path(os.fspath(model_name_or_path))
    hf_config = load_config(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)


def count_parameters(
    model_name_or_path: str | os.PathLike[str], config: MtLoraConfig, *, trust_remote_code: bool = False
) -> tuple[int, int]:
    """(trainable adapter parameters, base + trainable parameters) for ``config`` on that model."""
    from mtlora.model import MtLoraModel

    base = build_meta_model(model_name_or_path, trust_remote_code=trust_remote_code)
    base_count = sum(p.numel() for p in base.parameters())
    model = MtLoraModel(base, config)
    trainable = sum(p.numel() for a in model.adapters() for p in a.parameters())
    trainable += sum(p.numel() for p in model.saved_modules.params.values())  # --modules_to_save
    return trainable, base_count + trainable


def parse_adapter_args(argv: list[str], prog: str) -> tuple[MtLoraConfig, argparse.Namespace]:
    """Split ``argv`` into the adapter flags (an :class:`MtLoraConfig`) and ``--model_name_or_path``."""
    from mtlora.cli_args import Parser, add_model

    pre = Parser(add_help=False)
    add_model(pre, required=True, help="model dir/hub id; only config.json is read")
    pre.add_argument("--trainable", default=None, help="alias of --target_modules (the paper's flag)")
    add_safety_flags(pre, overwrite=False)
    parser = adapter_argument_parser(prog, description=__doc__, parents=[pre])
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    ns, rest = pre.parse_known_args(argv)
    (config,) = adapter_argument_parser(prog).parse_args_into_dataclasses(args=rest)
    if ns.trainable:
        config.target_modules = [t.strip() for t in ns.trainable.split(",") if t.strip()]
        config.validate()
    return config, ns


def main(argv: list[str]) -> int:
    config, ns = parse_adapter_args(argv, "mtlora params")
    trainable, total = count_parameters(ns.model_name_or_path, config, trust_remote_code=ns.trust_remote_code)
    print(f"trainable_params={trainable} total_params={total} percent={100.0 * trainable / total:.4f}")
    return 0
