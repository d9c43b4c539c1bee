"""Out-of-memory handling for evaluation: the released scripts' ``--auto_batch`` / ``--fallback_batch_size``.

The released ``eval_bbh.py`` / ``eval_mmlu.py`` caught ``torch.cuda.OutOfMemoryError`` and retried with half
the batch size, down to ``--fallback_batch_size``. :class:`RetryingEngine` does the same around each of the
engine's calls (one task or subject at a time): the call is run again from the start with the smaller
batch, so the results equal a run that used that batch size from the beginning (batching never changes
a result beyond float rounding, see :mod:`mtlora.evaluation.engine`).

What the released code did after that, and we do not: it then shortened the prompt window by 256 tokens
down to 1024 and finally skipped questions, scoring them wrong; both change the results silently. Here an
OOM at the fallback batch size is an error that says what to lower. Without ``--auto_batch`` an OOM is the
same one-line error at the requested batch size. On CPU an OOM does not happen in practice (the kernel
kills the process first); the flags are accepted there and the retry path is exercised by the tests.
"""

from __future__ import annotations

from typing import Any

from mtlora.errors import MtLoraError
from mtlora.inference import Engine


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


class RetryingEngine(Engine):
    """:class:`Engine` whose calls halve the batch on an out-of-memory error (``auto_batch``)."""

    def __init__(
        self, *args: Any, auto_batch: bool = False, fallback_batch_size: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.auto_batch = auto_batch
        self.fallback_batch_size = max(1, min(int(fallback_batch_size), self.batch_size))
        self.stats["oom_retries"] = 0
        self.stats["batch_size_requested"] = self.batch_size
        self.stats["batch_size_final"] = self.batch_size

    def _retrying(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        while True:
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                self._free_memory()
                if not self.auto_batch:
                    raise MtLoraError(
                        f"out of memory at --batch_size {self.batch_size}; lower it or pass --auto_batch "
                        "(halve the batch on out-of-memory)"
                    ) from None
                if self.batch_size <= self.fallback_batch_size:
                    raise MtLoraError(
                        f"out of memory at --fallback_batch_size {self.batch_size}; lower --max_length or use "
                        "a device with more memory"
                    ) from None
                self.batch_size = max(self.fallback_batch_size, self.batch_size // 2)
                self.stats["oom_retries"] += 1
                self.stats["batch_size_final"] = self.batch_size

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def loglikelihood(self, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(super().loglikelihood, *args, **kwargs)

    def next_token_argmax(self, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(super().next_token_argmax, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(super().generate, *args, **kwargs)
