"""Fixtures for the evaluation tests: the bundled tiny Llama, loaded once per module, on one CPU thread.

One thread because the test machines are shared: two OpenMP threads that keep getting preempted made the
tiny model 10x slower in our measurements, while one thread is as fast as two on an idle machine.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = "mtlora:stories260k"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_loaded():
    from mtlora.evaluation.loading import load_model_for_eval

    return load_model_for_eval(TINY, device="cpu", dtype="float32")
