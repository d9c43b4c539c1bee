"""Worker for the 2-process DDP test (gloo, CPU), run under torchrun by tests/test_distributed.py."""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.losses import SpectralRegularizer
from mtlora.training.trainer import mean_over_ranks

CFG = dict(
    method="mtlora",
    lora_rank=4,
    lora_nums=4,
    lora_dropout=0.0,
    enable_blc=True,
    blc_alpha=0.5,
    enable_block_adapter=True,
    enable_fine_grained_routing=True,
    routing_group_size=32,
    enable_spectral_reg=True,
    spectral_reg_lambda=0.3,
)


def build():
    from _tiny import tiny_model

    model = get_mtlora_model(tiny_model("llama"), MtLoraConfig(**CFG))
    torch.manual_seed(5)
    for a in model.adapters():
        torch.nn.init.normal_(a.lora_B, std=0.2)
    model.train()
    model.gradient_checkpointing_enable()
    return model


def batch():
    torch.manual_seed(6)
    return torch.randint(3, 128, (4, 8))


def loss_for(model, ids, reg, inner=None):
    out = model(input_ids=ids, labels=ids)
    spec = reg(inner or model, global_step=0)
    return out.loss + spec


def run(out_file: str) -> None:
    """One rank under torchrun: env:// rendezvous (RANK, WORLD_SIZE, MASTER_ADDR/PORT set by torchrun)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = build()
        reg = SpectralRegularizer(model.mtlora_config)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids = batch().chunk(world)[rank]
        loss_for(ddp, ids, reg, inner=model).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, out_file)
        # logged auxiliary means are over every rank's micro-batches (rank r logged r+1 for 2 micro-batches,
        # and only rank 1 recorded routing entropy)
        sums = {"balance_loss": 2.0 * (rank + 1), **({"routing_entropy": 0.5} if rank == 1 else {})}
        means = mean_over_ranks(sums, {k: (2 if k == "balance_loss" else 1) for k in sums})
        expected = {"balance_loss": (2.0 + 4.0) / 4, "routing_entropy": 0.5}
        assert means == expected, (rank, means, expected)
        # Free DDP's reducer while the process group is alive and idle: if it is only collected at interpreter
        # exit, ~ProcessGroupGloo joins its worker thread while holding the GIL, and that thread may need the
        # GIL to drop a finished work item - a teardown deadlock seen once in ~50 runs.
        dist.barrier()
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run(sys.argv[1])
