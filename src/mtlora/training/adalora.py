"""``--method adalora``: peft's AdaLoRA through the same ``train.py`` command line as every other method.

The released ``train.py`` offered AdaLoRA (Zhang et al., 2023) as a baseline: an SVD-parameterised LoRA
(``P diag(E) Q``) whose rank budget shrinks from ``--init_r`` to ``--target_r`` during training, plus an
orthogonality regularizer on P and Q weighted by ``--orth_reg_weight``. We use peft's implementation
(``peft.AdaLoraConfig`` + ``get_peft_model``), with the released schedule constants (``tinit = tfinal = 0``,
``deltaT = 1``, ``beta1 = beta2 = 0.85``).

Two things the Trainer must provide, done by :class:`AdaLoraAllocationCallback`:

* the schedule needs the total number of optimizer steps (``total_step``), which only the Trainer knows
  (epochs, batch size, gradient accumulation, world size, ``--max_steps``): it is set from
  ``state.max_steps`` when training begins;
* ``update_and_allocate(global_step)`` must run after every optimizer step and *before* the gradients are
  zeroed (it scores parameters by ``|p * grad|``). The Trainer's ``on_optimizer_step`` event is exactly
  there; the released callback used ``on_step_end``, which the Trainer calls after ``zero_grad()``.

The result is a plain peft adapter (``adapter_config.json`` with ``peft_type: ADALORA``, including the final
``rank_pattern``) in ``output_dir/sft_lora_model``; :func:`mtlora.hub.load_model` and the evaluation
commands load it with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import Trainer, TrainerCallback

from mtlora.config import MtLoraConfig
from mtlora.errors import ConfigError
from mtlora.training.arguments import MtLoraTrainingArguments

#: The released AdaLoRA schedule constants (``utils/method_configs.py``; not command-line flags there).
RELEASED_SCHEDULE = {"tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85}


def provisional_total_steps(train_args: MtLoraTrainingArguments, num_examples: int) -> int:
    """The optimizer-step count the Trainer will use (``--max_steps``, else epochs x steps per epoch).

    Only needed because ``AdaLoraConfig`` refuses to be built without a positive ``total_step``; the
    callback replaces it with the Trainer's own ``state.max_steps`` before the first step.
    """
    if train_args.max_steps and train_args.max_steps > 0:
        return int(train_args.max_steps)
    per_device = max(1, train_args.per_device_train_batch_size)
    batches = math.ceil(num_examples / (per_device * max(1, train_args.world_size)))
    per_epoch = max(1, batches // max(1, train_args.gradient_accumulation_steps))
    return max(1, math.ceil(per_epoch * train_args.num_train_epochs))


def get_adalora_model(
    model: Any,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
    num_examples: int,
    target_modules: list[str],
) -> Any:
    """``peft.get_peft_model`` with an ``AdaLoraConfig`` built from the paper's flags."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(
        init_r=train_args.init_r,
        target_r=train_args.target_r,
        orth_reg_weight=train_args.orth_reg_weight,
        lora_alpha=float(adapter.lora_alpha),
        lora_dropout=float(adapter.lora_dropout),
        target_modules=list(target_modules),
        modules_to_save=list(adapter.modules_to_save) if adapter.modules_to_save else None,
        total_step=provisional_total_steps(train_args, num_examples),
        task_type="CAUSAL_LM",
        base_model_name_or_path=adapter.base_model_name_or_path,
        **RELEASED_SCHEDULE,
    )
    return get_peft_model(model, config)


def _peft_model(model: Any) -> Any:
    """The ``PeftModel`` inside DDP/accelerate wrappers."""
    while not hasattr(model, "peft_config"):
        inner = getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a peft AdaLoRA model, got {type(model).__name__}")
        model = inner
    return model


class AdaLoraAllocationCallback(TrainerCallback):
    """AdaLoRA's rank schedule inside the HF Trainer (see the module docstring for why these two events)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[override]
        peft_model = _peft_model(model)
        cfg = peft_model.peft_config[peft_model.active_adapter]
        if cfg.tinit >= state.max_steps - cfg.tfinal:
            raise ConfigError(
                f"adalora: {state.max_steps} optimizer steps leave no rank-allocation phase "
                f"(tinit={cfg.tinit}, tfinal={cfg.tfinal}); train for more steps"
            )
        cfg.total_step = state.max_steps

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # type: ignore[override]
        # state.global_step is the index of the step just taken (incremented after this event), which is
        # the step number peft's own training loop example passes.
        _peft_model(model).base_model.update_and_allocate(state.global_step)


class AdaLoraTrainer(Trainer):
    """The HF Trainer for a peft AdaLoRA model: drops the batch's ``task_ids`` (AdaLoRA does not route).

    The loss is the micro-batch mean like every mtlora method (``model_accepts_loss_kwargs = False``), plus
    peft's orthogonality term, which ``AdaLoraModel.forward`` adds in training mode.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.add_callback(AdaLoraAllocationCallback())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        inputs = {k: v for k, v in inputs.items() if k != "task_ids"}
        return super().compute_loss(model, inputs, return_outputs=return_outputs)
