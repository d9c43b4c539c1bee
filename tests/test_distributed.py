"""2-process DDP on CPU (gloo): balance + spectral losses under non-reentrant checkpointing match one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as worker  # noqa: E402


@pytest.mark.slow
def test_ddp_gradients_match_single_process(tmp_path) -> None:
    out_file = tmp_path / "grads.pt"
    # a fresh process tree under torchrun: nothing of this test process's state (threads, env) leaks in
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).parent / "_ddp_worker.py"), str(out_file)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    ddp_grads = torch.load(out_file, weights_only=True)

    model = worker.build()
    reg = worker.SpectralRegularizer(model.mtlora_config)
    halves = worker.batch().chunk(2)
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for ids in halves:
        model.zero_grad(set_to_none=True)
        worker.loss_for(model, ids, reg).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                acc[n] += p.grad / len(halves)
    assert set(acc) == set(ddp_grads)
    routers = [n for n in acc if "router" in n]
    assert routers and all(torch.count_nonzero(ddp_grads[n]) > 0 for n in routers)
    for n in acc:
        torch.testing.assert_close(ddp_grads[n], acc[n], atol=1e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
