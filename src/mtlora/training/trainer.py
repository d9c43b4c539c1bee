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
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from mtlora.config import MtLoraConfig
from mtlora.errors import CheckpointError, ConfigError
from mtlora.losses import STATE_FILE, SpectralRegularizer
from mtlora.model import MtLoraModel

logger = logging.getLogger("mtlora.training")


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
        if self.spectral is not None and self.args.process_index == 0:
            for note in self.spectral.notes():
                logger.warning("note: %s", note)
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        inputs = dict(inputs)
        task_ids = inputs.pop("task_ids", None)
        inner = unwrap(model)
        if inner.needs_task_ids:
            inputs["task_ids"] = task_ids
        log_now = model.training and self._is_logging_step()
        if log_now and inner.has_balance_router:
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
        self._write_card(output_dir)

    @staticmethod
    def _write_card(output_dir: str) -> None:
        """Every saved adapter folder - ``checkpoint-N/`` too - says what it is and how to load it (README.md).

        The card is documentation: a failure to write it is reported, never allowed to lose the checkpoint."""
        from mtlora.model_card import write_training_card

        try:
            write_training_card(output_dir)
        except Exception as exc:  # noqa: BLE001 - any card bug must not abort the run whose weights are saved
            logger.warning("%s: the adapter is saved but its model card (README.md) could not be written: %s",
                           output_dir, exc)  # fmt: skip

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        unwrap(model or self.model).load_adapter_weights(
            Path(resume_from_checkpoint) / "adapter_model.safetensors"
        )

    # The regularizer's state travels with the optimizer's: both are what a checkpoint needs beyond the weights
    # to continue exactly, both are skipped by --save_only_model, and both hooks run under every launcher
    # (single process, DDP, DeepSpeed - where _load_from_checkpoint is not called).
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.spectral is not None and self.args.should_save:
            self.spectral.save(Path(output_dir) / STATE_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.spectral is None:
            return
        path = Path(checkpoint) / STATE_FILE
        if path.is_file():
            self.spectral.load(path)
        elif self.spectral.has_schedule_state and not getattr(self.args, "force", False):
            raise CheckpointError(
                f"{checkpoint}: no {STATE_FILE} (the spectral regularizer's schedule state); "
                "add --force to resume without it"
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
    """Append every log record (step, epoch, losses, routing stats) to ``output_dir/train_log.jsonl``.

    With ``resuming=True`` the records past the resumed step (written by the killed run after its checkpoint)
    are dropped when training begins, so the log holds each step once, like an uninterrupted run's.
    """

    def __init__(self, path: str | os.PathLike[str], *, resuming: bool = False) -> None:
        self.path = Path(path)
        self.resuming = resuming

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        if self.resuming and state.is_world_process_zero:
            truncate_log(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
        if logs is None or not state.is_world_process_zero:
            return
        rec = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec, default=float) + "\n")


def truncate_log(path: Path, step: int) -> int:
    """Drop the records of ``path`` (JSON lines) whose ``step`` is past ``step``; returns how many were dropped.

    A line cut short by a kill is dropped too. The file is rewritten atomically (temp file + rename).
    """
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            keep = isinstance(rec, dict) and int(rec.get("step", 0)) <= step
        except (json.JSONDecodeError, TypeError, ValueError):
            keep = False
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
        logger.info("%s: dropped %d record(s) past the resumed step %d", path, dropped, step)
    return dropped


# ---------------------------------------------------------------------------------------------- resuming
#: Files of a Trainer checkpoint besides the weights, and what a resume without them would get wrong.
_STATE_FILES = {
    "optimizer": "the optimizer state (Adam moments) would restart from zero",
    "scheduler": "the learning-rate schedule would restart from its first step",
    "rng": "the random state (dropout masks, data order) would differ from an uninterrupted run",
    "spectral": "the spectral regularizer's schedule (paper-mode triggers / cached weights) would restart",
}


def checkpoint_problems(
    checkpoint: Path, args: Any, config: MtLoraConfig | None = None
) -> tuple[list[str], list[str]]:
    """(fatal, recoverable) problems of a checkpoint folder, each naming the missing file.

    Fatal: no adapter weights or configuration, or no ``trainer_state.json`` (the step and epoch to continue from
    are unknown; the Trainer cannot resume at all). Recoverable with ``--force``: optimizer, scheduler, RNG state of this rank,
    and the spectral regularizer's state where later steps depend on it.
    """
    fatal: list[str] = []
    soft: list[str] = []
    if not (checkpoint / "adapter_model.safetensors").is_file():
        fatal.append("adapter_model.safetensors (the adapter weights)")
    if not (checkpoint / "adapter_config.json").is_file():
        fatal.append("adapter_config.json (the run's adapter configuration)")
    if not (checkpoint / "trainer_state.json").is_file():
        fatal.append("trainer_state.json (the global step and epoch to continue from)")
    if getattr(args, "deepspeed", None):
        has_optimizer = (checkpoint / "latest").is_file() or any(checkpoint.glob("global_step*"))
        has_scheduler = has_optimizer or (checkpoint / "scheduler.pt").is_file()
    else:
        has_optimizer = (checkpoint / "optimizer.pt").is_file() or any(checkpoint.glob("optimizer*"))
        has_scheduler = (checkpoint / "scheduler.pt").is_file()
    if not has_optimizer:
        soft.append(f"optimizer.pt: {_STATE_FILES['optimizer']}")
    if not has_scheduler:
        soft.append(f"scheduler.pt: {_STATE_FILES['scheduler']}")
    world = int(getattr(args, "world_size", 1) or 1)
    rng = "rng_state.pth" if world <= 1 else f"rng_state_{int(getattr(args, 'process_index', 0))}.pth"
    if not (checkpoint / rng).is_file():
        soft.append(f"{rng}: {_STATE_FILES['rng']}")
    if (
        config is not None
        and config.enable_spectral_reg
        and SpectralRegularizer(config).has_schedule_state
        and not (checkpoint / STATE_FILE).is_file()
    ):
        soft.append(f"{STATE_FILE}: {_STATE_FILES['spectral']}")
    return fatal, soft


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def prepare_resume(args: Any, config: MtLoraConfig | None = None) -> Path | None:
    """Resolve ``--resume_from_checkpoint`` and refuse a checkpoint that cannot continue the run exactly.

    ``True`` (or ``last``) means the latest checkpoint in ``--output_dir`` (transformers' meaning); if that one is
    incomplete (e.g. a kill during its save) the latest complete one is used, with a warning. ``False``/empty
    means no resume. A path that does not exist, or a checkpoint without weights or ``trainer_state.json``, is
    an error. A checkpoint without optimizer, scheduler, RNG or regularizer state is refused unless
    ``--force``, which resumes with one warning per missing file saying what will differ.
    """
    value = getattr(args, "resume_from_checkpoint", None)
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false")):
        return None
    force = bool(getattr(args, "force", False))
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "last")):
        out = Path(args.output_dir)
        found = (
            sorted(
                (p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()),
                key=_checkpoint_step,
                reverse=True,
            )
            if out.is_dir()
            else []
        )
        if not found:
            raise ConfigError(
                f"--resume_from_checkpoint True: no checkpoint-<step> folder in --output_dir {out}"
            )
        complete = [p for p in found if checkpoint_problems(p, args, config) == ([], [])]
        checkpoint = complete[0] if complete else found[0]
        if checkpoint != found[0]:
            fatal, soft = checkpoint_problems(found[0], args, config)
            logger.warning(
                "warning: %s is incomplete (missing %s); resuming from %s",
                found[0],
                "; ".join(x.split(" ", 1)[0].rstrip(":") for x in fatal + soft),
                checkpoint,
            )
    else:
        checkpoint = Path(value)
        if not checkpoint.exists():
            raise ConfigError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
        if not checkpoint.is_dir():
            raise ConfigError(
                f"--resume_from_checkpoint {value}: not a folder (give a checkpoint-<step> folder)"
            )
    fatal, soft = checkpoint_problems(checkpoint, args, config)
    if fatal:
        raise ConfigError(
            f"--resume_from_checkpoint {checkpoint}: cannot resume, missing {'; '.join(fatal)}. To start a new run "
            "from its adapter weights use --peft_path"
        )
    if soft and not force:
        raise ConfigError(
            f"--resume_from_checkpoint {checkpoint}: incomplete checkpoint, missing {'; '.join(soft)}. "
            "Add --force to resume anyway"
        )
    for problem in soft:
        logger.warning("warning: resuming from %s without %s (--force)", checkpoint, problem)
    return checkpoint


#: Adapter-config keys that are bookkeeping, not part of the trained model (never compared on resume).
_CONFIG_BOOKKEEPING = frozenset(
    {"task_type", "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "mtlora_version"}
)
#: Training flags that define the optimisation trajectory: resuming with another value is refused. (The length
#: of the run - --num_train_epochs / --max_steps - and saving/logging flags may change on resume.)
RESUME_TRAINING_FIELDS = (
    "seed",
    "data_seed",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "dataloader_drop_last",
    "group_by_length",
)
#: Data flags (from the run's ``run_config.json`` next to the checkpoint, when there is one).
RESUME_DATA_FIELDS = ("max_seq_length", "template", "max_train_samples")


def check_resume_config(
    checkpoint: Path,
    config: MtLoraConfig,
    args: Any,
    data: dict[str, Any] | None = None,
) -> None:
    """Refuse to resume with a configuration that differs from the run that wrote ``checkpoint``.

    Compared: every adapter field (the checkpoint's ``adapter_config.json``), the training flags in
    :data:`RESUME_TRAINING_FIELDS` (its ``training_args.json``) and, when the checkpoint sits in a run folder
    with ``run_config.json``, the data flags in :data:`RESUME_DATA_FIELDS`. The error names every differing
    flag with both values.
    """
    diffs: list[str] = []
    saved_cfg = MtLoraConfig.from_json_file(checkpoint / "adapter_config.json").to_dict()
    now_cfg = config.to_dict()
    for key in sorted((set(saved_cfg) | set(now_cfg)) - _CONFIG_BOOKKEEPING):
        if saved_cfg.get(key) != now_cfg.get(key):
            diffs.append(f"--{key} {now_cfg.get(key)!r} (checkpoint: {saved_cfg.get(key)!r})")
    args_file = checkpoint / "training_args.json"
    if args_file.is_file():
        try:
            saved_args = json.loads(args_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{args_file}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
        now_args = json.loads(args.to_json_string())
        for key in RESUME_TRAINING_FIELDS:
            if key in saved_args and key in now_args and saved_args[key] != now_args[key]:
                diffs.append(f"--{key} {now_args[key]!r} (checkpoint: {saved_args[key]!r})")
    run_config = checkpoint.parent / "run_config.json"
    if data is not None and run_config.is_file():
        try:
            saved_data = json.loads(run_config.read_text()).get("data", {})
        except (json.JSONDecodeError, AttributeError):
            saved_data = {}
        for key in RESUME_DATA_FIELDS:
            if key in saved_data and key in data and saved_data[key] != data[key]:
                diffs.append(f"--{key} {data[key]!r} (checkpoint's run: {saved_data[key]!r})")
    if diffs:
        raise ConfigError(
            f"--resume_from_checkpoint {checkpoint}: the configuration differs from the checkpoint's run: "
            f"{'; '.join(diffs)}. Resume with the run's flags, or start a new run from its adapter with --peft_path"
        )
