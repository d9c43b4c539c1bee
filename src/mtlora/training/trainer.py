"""`MtLoraTrainer`: ``transformers.Trainer`` plus the method's auxiliary losses, logging and adapter I/O.

Loss of one micro-batch (the Trainer then divides by the gradient-accumulation steps, so every term is
scaled the same way):

    loss = CE(task) + blc_alpha * balance      (added inside MtLoraModel.forward, when enable_blc)
                    + lambda * L_spectral      (added here, when enable_spectral_reg and the schedule applies)

``MtLoraModel.accepts_loss_kwargs`` is False, so the CE is the micro-batch mean (the paper's objective) and
the Trainer's GA scaling applies to all three terms. Logged every ``logging_steps``: ``task_loss``,
``balance_loss``, ``spectral_loss`` (means over the micro-batches since the last log), ``routing_entropy``
(mean per-token entropy of the routing distribution, over layers and groups) and expert usage
(``expert_usage_max``/``expert_usage_min``: the largest/smallest mean routing share of an expert, averaged
over layers; 1/E each when perfectly balanced). Under DDP/DeepSpeed these means are taken over every rank's
micro-batches (:func:`mean_over_ranks`), like the Trainer's own ``loss``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from mtlora.errors import ConfigError
from mtlora.losses import SpectralRegularizer
from mtlora.model import MtLoraModel


def _zero_stage(args: Any) -> int | None:
    ds = getattr(args, "hf_deepspeed_config", None)
    cfg = getattr(ds, "config", None) if ds is not None else None
    return cfg.get("zero_optimization", {}).get("stage") if isinstance(cfg, dict) else None


def unwrap(model: torch.nn.Module) -> MtLoraModel:
    """The MtLoraModel inside DDP/accelerate/compile wrappers."""
    while not isinstance(model, MtLoraModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected an MtLoraModel, got {type(model).__name__}")
        model = inner
    return model


#: The auxiliary quantities logged next to the Trainer's ``loss`` (fixed order: reduced as one vector).
AUX_LOG_KEYS = (
    "task_loss",
    "balance_loss",
    "spectral_loss",
    "routing_entropy",
    "expert_usage_max",
    "expert_usage_min",
)


def mean_over_ranks(
    sums: dict[str, float], counts: dict[str, int], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Running means of :data:`AUX_LOG_KEYS` over all ranks: (sum of every rank's sums) / (sum of counts).

    One ``all_reduce`` of a fixed-length vector, so every rank must call it (the Trainer calls ``log`` on all
    ranks); without an initialised process group it is the local mean. Keys no rank recorded are left out.
    """
    import torch.distributed as dist

    values = [float(sums.get(k, 0.0)) for k in AUX_LOG_KEYS] + [float(counts.get(k, 0)) for k in AUX_LOG_KEYS]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        vec = torch.tensor(values, dtype=torch.float64, device=device)  # on the backend's device (NCCL: CUDA)
        dist.all_reduce(vec)
        values = vec.tolist()
    n = len(AUX_LOG_KEYS)
    return {k: values[i] / values[n + i] for i, k in enumerate(AUX_LOG_KEYS) if values[n + i] > 0}


class MtLoraTrainer(Trainer):
    def __init__(self, *args: Any, task_map: dict[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = unwrap(self.model)
        self.mtlora_config = inner.mtlora_config
        self.task_map = task_map
        self.spectral = (
            SpectralRegularizer(self.mtlora_config) if self.mtlora_config.enable_spectral_reg else None
        )
        if self.spectral is not None and (self.is_fsdp_enabled or _zero_stage(self.args) == 3):
            raise ConfigError(
                "--enable_spectral_reg needs the full expert matrices on every rank; it supports a single device, "
                "DDP and DeepSpeed ZeRO-1/2, not FSDP or ZeRO-3 (parameters are sharded there)"
            )
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        inputs = dict(inputs)
        task_ids = inputs.pop("task_ids", None)
        inner = unwrap(model)
        if inner.mtlora_config.router_kind == "task":
            inputs["task_ids"] = task_ids
        log_now = model.training and self._is_logging_step()
        if log_now and inner.mtlora_config.router_kind == "token":
            with inner.collect_routing_stats() as stats:
                outputs = model(**inputs)
            self._record_routing(stats)
        else:
            outputs = model(**inputs)
        loss = outputs["loss"]
        if model.training:
            self._add("task_loss", outputs.get("task_loss", loss))
            if outputs.get("balance_loss") is not None:
                self._add("balance_loss", outputs["balance_loss"])
            if self.spectral is not None:
                spec = self.spectral(inner, self.state.global_step, self.state.epoch or 0.0)
                if spec is not None:
                    loss = loss + spec.to(loss.dtype)
                    self._add("spectral_loss", spec.detach())
        return (loss, outputs) if return_outputs else loss

    def _is_logging_step(self) -> bool:
        steps = self.args.logging_steps
        if not steps or steps <= 0:
            return False
        every = max(int(steps if steps >= 1 else steps * max(self.state.max_steps, 1)), 1)
        return (self.state.global_step + 1) % every == 0 or self.state.global_step == 0

    def _add(self, key: str, value: torch.Tensor | float) -> None:
        assert key in AUX_LOG_KEYS, key
        self._sums[key] += (
            float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
        )
        self._counts[key] += 1

    def _record_routing(self, stats: dict[str, dict[str, torch.Tensor]]) -> None:
        if not stats:
            return
        ent = torch.stack([s["entropy"].float() for s in stats.values()]).mean()
        usage = torch.stack([s["mean_probs"].float() for s in stats.values()])  # (layers, E)
        self._add("routing_entropy", ent)
        self._add("expert_usage_max", usage.max(-1).values.mean())
        self._add("expert_usage_min", usage.min(-1).values.mean())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: attach our running means (over all ranks) and reset them
            for k, mean in mean_over_ranks(self._sums, self._counts, self.args.device).items():
                logs[k] = round(mean, 6)
            self._sums.clear()
            self._counts.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ adapter-only checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(unwrap(self.model), output_dir, self.processing_class, self.task_map)
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        unwrap(model or self.model).load_adapter_weights(
            Path(resume_from_checkpoint) / "adapter_model.safetensors"
        )

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best:
            unwrap(self.model).load_adapter_weights(Path(best) / "adapter_model.safetensors")


def save_adapter(
    model: MtLoraModel,
    output_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    task_map: dict | None = None,
) -> None:
    """Adapter (config + safetensors), tokenizer and task map: everything evaluation needs."""
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    if task_map is not None:
        from mtlora.data import save_task_map

        save_task_map(task_map, Path(output_dir) / "task_map.json")


class JsonlLogCallback(TrainerCallback):
    """Append every log record (step, epoch, losses, routing stats) to ``output_dir/train_log.jsonl``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
        if logs is None or not state.is_world_process_zero:
            return
        rec = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec, default=float) + "\n")
