"""Worker for the kill-and-resume test (tests/training/test_resume.py): ``train.py`` that stops to be killed.

``python tests/_resume_worker.py PAUSE_STEP <train.py flags>`` runs the real training (``mtlora.training.run.train``)
with one extra callback: once the log record of step ``PAUSE_STEP`` is written, it prints ``PAUSED <step>`` and
sleeps, so the test can SIGKILL the process at a known point - after a checkpoint and some later log records
were written - instead of racing a run that takes milliseconds per step.
"""

from __future__ import annotations

import sys
import time

from transformers import TrainerCallback

import mtlora.training.trainer as trainer_mod
from mtlora.training.arguments import parse_train_args
from mtlora.training.run import train


class _PauseAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
        if state.global_step >= self.step:
            print(f"PAUSED {state.global_step}", flush=True)
            time.sleep(600)


class _PausingTrainer(trainer_mod.MtLoraTrainer):
    """The project's trainer with the pause callback appended (after the train_log.jsonl writer)."""

    pause_step = 0

    def __init__(self, *args, **kwargs) -> None:
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), _PauseAt(self.pause_step)]
        super().__init__(*args, **kwargs)


def main(argv: list[str]) -> int:
    _PausingTrainer.pause_step = int(argv[0])
    trainer_mod.MtLoraTrainer = _PausingTrainer  # run.train() looks the class up at call time
    train(*parse_train_args(argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
