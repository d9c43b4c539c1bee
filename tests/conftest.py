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


#: Variables that mtlora.cli_args.apply_runtime sets for a command run in this process (``--threads``,
#: ``--no_progress``); restored after each test so that one test's flags do not change the next ones.
_RUNTIME_ENV = ("OMP_NUM_THREADS", "TQDM_DISABLE")
#: An unmarked test slower than this gets a warning: mark it ``@pytest.mark.slow`` (``make test-fast`` skips
#: those). A warning rather than a failure: shared machines were measured up to 10x slower.
SLOW_WARN_SECONDS = 15.0


@pytest.fixture(autouse=True)
def _restore_runtime_env():
    from mtlora.cli_args import set_progress

    saved = {k: os.environ.get(k) for k in _RUNTIME_ENV}
    yield
    set_progress(True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (
        report.when == "call"
        and report.passed
        and report.duration > SLOW_WARN_SECONDS
        and item.get_closest_marker("slow") is None
    ):
        import warnings

        warnings.warn(
            f"{item.nodeid} took {report.duration:.0f} s without @pytest.mark.slow",
            pytest.PytestWarning,
            stacklevel=1,
        )
