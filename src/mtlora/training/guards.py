"""Stop training the moment it diverges, before a NaN adapter is checkpointed or saved.

Why: with a NaN loss the Trainer keeps going -- its ``logging_nan_inf_filter`` even logs ``loss 0`` -- and
then saves the NaN adapter with exit 0 (issue 15). :class:`NonFiniteGuard` checks two things:

* after every optimizer step (``on_step_end``, which the Trainer calls *before* it logs or saves that step):
  are the trainable weights still finite? If not, it asks for a log record of this step, so that the loss
  terms of the step are known, and vetoes the step's checkpoint;
* every training log record: are the loss terms finite? ``task_loss``, ``balance_loss`` and
  ``spectral_loss`` are the means since the previous record that :class:`~mtlora.training.trainer.MtLoraTrainer`
  logs; ``loss`` is checked too in case the filter is off (``--logging_nan_inf_filter False``).

Either failure raises :class:`TrainingDiverged` (an :class:`~mtlora.errors.MtLoraError`: one ``error:`` line
naming the step and the loss term). The exception leaves ``trainer.train`` before the step's checkpoint is
written, so the last checkpoint on disk is the last good one, and the final adapter is not written at all.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

from mtlora.errors import MtLoraError

__all__ = ["LOSS_TERMS", "NonFiniteGuard", "TrainingDiverged"]

#: Logged key -> the name of the loss term in messages (the Trainer's own ``loss`` is their weighted sum).
LOSS_TERMS = {
    "task_loss": "task",
    "balance_loss": "balance",
    "spectral_loss": "spectral",
    "loss": "total",
}


class TrainingDiverged(MtLoraError):
    """A loss term or the adapter weights became NaN/inf; training stopped before saving them."""


def _nonfinite(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _first_nonfinite_parameter(model: torch.nn.Module) -> str | None:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        return None
    flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in params])
    if bool(flags.all()):  # one device sync per step
        return None
    return params[int((~flags).nonzero()[0, 0])][0]


class NonFiniteGuard(TrainerCallback):
    """Raise :class:`TrainingDiverged` at the first non-finite loss term or weight (see the module docstring)."""

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self._bad_param: str | None = None
        self._last_logged = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[override]
        if model is not None and self._bad_param is None:
            self._bad_param = _first_nonfinite_parameter(model)
            if self._bad_param is not None:
                control.should_log = True  # log this step's loss terms; on_log below then stops the run
                control.should_save = False
                control.should_evaluate = False
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
        if not logs or "loss" not in logs and "task_loss" not in logs:
            return
        since = self._last_logged
        self._last_logged = state.global_step
        bad = [f"{LOSS_TERMS[k]} ({k}={logs[k]})" for k in LOSS_TERMS if k in logs and _nonfinite(logs[k])]
        where = f"step {state.global_step}" + (
            f" (mean over steps {since + 1}-{state.global_step})" if state.global_step - since > 1 else ""
        )
        if bad:
            raise TrainingDiverged(
                f"training stopped at {where}: non-finite loss term {', '.join(bad)}; "
                f"{self._kept(state)} -- lower --learning_rate, check --max_grad_norm and the data"
            )
        if self._bad_param is not None:
            grad = logs.get("grad_norm")
            raise TrainingDiverged(
                f"training stopped at step {state.global_step}: the update made weight {self._bad_param!r} "
                f"non-finite (grad_norm={grad}; the loss terms were finite); {self._kept(state)} -- lower "
                "--learning_rate or set --max_grad_norm"
            )

    def _kept(self, state: Any) -> str:
        from pathlib import Path

        if self.output_dir:
            steps = sorted(
                (int(p.name.split("-")[-1]), p)
                for p in Path(self.output_dir).glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and p.is_dir()
            )
            if steps:
                return f"nothing was saved for this step, the last good checkpoint is {steps[-1][1]}"
        return "nothing was saved for this step (no earlier checkpoint)"
