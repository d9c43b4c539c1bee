"""Shared fixtures; helpers live in ``_tiny.py`` (several conftest.py files exist, so import by that name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch is imported (by _tiny below): OpenMP threads that spin while waiting make a CPU shared with
# other processes crawl (measured: a forward pass 4x slower on 2 busy cores); sleeping waiters cost
# almost nothing on an idle machine. Same setting as the eval CLI; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _tiny import SHARED  # noqa: E402


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED
