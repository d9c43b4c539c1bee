"""`MtLoraModel`: a Hugging Face causal LM with multi-task LoRA adapters attached.

    from mtlora import MtLoraConfig, get_mtlora_model
    model = get_mtlora_model(base, MtLoraConfig(method="mtlora", enable_block_adapter=True, ...))
    out = model(input_ids=..., labels=...)        # out.loss = task loss + blc_alpha * balance loss
    model.save_pretrained("adapter/")             # adapter_config.json + adapter_model.safetensors
    model = MtLoraModel.from_pretrained(base, "adapter/")

The wrapper owns the :class:`~mtlora.layers.RoutingState` shared by every adapter: around each call it
publishes the batch's ``task_ids`` (MMoELoRA) and ``attention_mask`` (padding-aware balance loss), clears
the per-forward balance terms and afterwards adds the balance loss to ``loss``. Unknown attributes are
forwarded to the base model (``config``, ``generation_config``, ``device`` ...), as peft's ``PeftModel`` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtlora._version import __version__
from mtlora.atomic import atomic_dir, recover_interrupted
from mtlora.config import CONFIG_NAME, SAVED_PEFT_TYPE, WEIGHTS_NAME, MtLoraConfig
from mtlora.dtypes import torch_dtype
from mtlora.errors import CheckpointError, MtLoraError, PlacementError
from mtlora.layers import MultiExpertLoRA, RoutingState
from mtlora.losses import balance_loss
from mtlora.placement import (
    ADAPTER_ATTR,
    attach,
    default_target_modules,
    detach,
    find_block_hosts,
    find_component_targets,
    hidden_size_of,
    iter_hosts,
)
from mtlora.quant import RECORD_KEY as QUANT_RECORD_KEY
from mtlora.quant import Quantization, quantization_of
from mtlora.saved_modules import SavedModules

logger = logging.getLogger("mtlora")


def _host_device(host: nn.Module) -> torch.device:
    for p in host.parameters(recurse=True):
        return p.device
    return torch.device("cpu")


def _build_adapter(
    config: MtLoraConfig,
    name: str,
    d_in: int,
    d_out: int,
    state: RoutingState,
    device: torch.device,
    block: bool,
) -> MultiExpertLoRA:
    rank = config.effective_rank if block else config.lora_rank
    dtype = torch_dtype(config.adapter_dtype, "adapter_dtype")
    router = config.router_class.from_config(config, d_in, d_out, rank, name=name, device=device, dtype=dtype)
    return MultiExpertLoRA(
        d_in,
        d_out,
        rank,
        config.num_experts,
        scaling=float(config.lora_alpha) / rank,
        dropout=float(config.lora_dropout),
        router=router,
        style=config.block_adapter_style if block else "lowrank",
        bottleneck_init=config.bottleneck_init,
        adaptformer_init_scale=config.adaptformer_init_scale,
        state=state,
        name=name,
        device=device,
        dtype=dtype,
    )


_OUTPUT_TYPES: dict[type, type] = {}
_EXTRA_OUTPUT_FIELDS = ("task_loss", "balance_loss", "balance_loss_with_grad")


def _with_balance_fields(out: Any, **extra: torch.Tensor) -> Any:
    """Return ``out`` as a subclass of its ModelOutput type that also carries the balance-loss fields.

    Adding undeclared keys to a ModelOutput breaks DDP, which flattens and rebuilds outputs as pytrees;
    a declared dataclass subclass (created once per output type) round-trips cleanly.
    """
    import dataclasses

    from transformers.utils import ModelOutput

    cls = type(out)
    if not isinstance(out, ModelOutput):
        raise MtLoraError(
            f"the base model returned {cls.__name__}; the balance loss needs a ModelOutput (return_dict=True)"
        )
    if cls not in _OUTPUT_TYPES:
        fields = [
            (name, torch.Tensor | None, dataclasses.field(default=None)) for name in _EXTRA_OUTPUT_FIELDS
        ]
        _OUTPUT_TYPES[cls] = dataclasses.make_dataclass(
            f"{cls.__name__}WithBalanceLoss", fields, bases=(cls,)
        )
    return _OUTPUT_TYPES[cls](**{k: v for k, v in out.items()}, **extra)


class MtLoraModel(nn.Module):
    """A base causal LM plus mtlora adapters (see the module docstring)."""

    # The HF Trainer must not pass ``num_items_in_batch``: the loss is a per-micro-batch mean plus auxiliary
    # terms, all of which the Trainer then scales by 1/gradient_accumulation_steps.
    accepts_loss_kwargs = False
    # Tells transformers' Trainer that trainable adapters sit on this base: its quantization check refuses a
    # quantized (QLoRA) model that is neither a peft.PeftModel nor flagged so. Saving stays ours (adapter only).
    _hf_peft_config_loaded = True

    def __init__(self, base_model: nn.Module, config: MtLoraConfig) -> None:
        super().__init__()
        if isinstance(base_model, MtLoraModel):
            raise PlacementError("the model is already an MtLoraModel; use it directly or unload() first")
        existing = list(iter_hosts(base_model))
        if existing:
            raise PlacementError(
                f"the model already carries mtlora adapters (e.g. at {existing[0][0]}); "
                "unload() the previous MtLoraModel first"
            )
        if config.method_spec.peft_native:
            raise MtLoraError(
                "method adalora is peft's AdaLoRA, not an mtlora adapter: train it with `mtlora train --method "
                "adalora` (mtlora.training.adalora) and load it with peft or mtlora.hub.load_model"
            )
        self.base_model = base_model
        self.mtlora_config = config
        self.routing_state = RoutingState(collect_balance=bool(config.enable_blc and config.blc_alpha > 0))
        self._requires_grad_backup = {n: p.requires_grad for n, p in base_model.named_parameters()}
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(
                getattr(base_model, "config", None), "_name_or_path", None
            )
        self._inject()
        self.saved_modules = SavedModules(base_model, config.modules_to_save)
        self._mark_trainable()
        self.train(base_model.training)

    # ------------------------------------------------------------------ construction
    def _inject(self) -> None:
        cfg, model = self.mtlora_config, self.base_model
        hosts: list[tuple[str, nn.Module, int, int, bool]] = []
        if cfg.enable_block_adapter:
            block_hosts = find_block_hosts(model, cfg.block_adapter_type)
            d = hidden_size_of(model)
            hosts = [(n, m, d, d, True) for n, m in block_hosts]
        else:
            targets = cfg.target_modules or default_target_modules(model)
            hosts = [
                (n, m, m.in_features, m.out_features, False)
                for n, m in find_component_targets(model, targets)
            ]
        try:
            for name, host, d_in, d_out, block in hosts:
                adapter = _build_adapter(
                    cfg, name, d_in, d_out, self.routing_state, _host_device(host), block
                )
                adapter.train(host.training)  # follow the model's mode (no dropout in an eval-mode model)
                attach(host, adapter, block=block)
        except Exception:
            for _, host, _, _, _ in hosts:
                detach(host)
            raise

    def _mark_trainable(self) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for adapter in self.adapters():
            for p in adapter.parameters():
                p.requires_grad_(True)
        self.saved_modules.mark_trainable()

    # ------------------------------------------------------------------ introspection
    def adapters(self) -> Iterator[MultiExpertLoRA]:
        for _, _, adapter in iter_hosts(self.base_model):
            assert isinstance(adapter, MultiExpertLoRA)
            yield adapter

    def named_adapters(self) -> Iterator[tuple[str, MultiExpertLoRA]]:
        for name, _, adapter in iter_hosts(self.base_model):
            yield name, adapter  # type: ignore[misc]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors keyed by their name in the base model (``model.layers.0.mlp.mtlora.lora_A``)."""
        marker = f".{ADAPTER_ATTR}."
        out = {n: p for n, p in self.base_model.state_dict(keep_vars=True).items() if marker in f".{n}"}
        out.update(self.saved_modules.state_dict())  # --modules_to_save: trained base modules
        return out

    @property
    def needs_task_ids(self) -> bool:
        """Whether forward/generate need ``task_ids`` (a task-gated router, MMoELoRA)."""
        return self.mtlora_config.router_class.needs_task_ids

    @property
    def has_balance_router(self) -> bool:
        """Whether the routers route per token (balance loss and routing statistics apply)."""
        return self.mtlora_config.router_class.has_balance

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit weight counts its weights, not its packed bytes."""

        def count(p: torch.Tensor) -> int:
            if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per storage byte
                return p.numel() * 2 * p.element_size()
            return p.numel()

        trainable = sum(count(p) for p in self.parameters() if p.requires_grad)
        total = sum(count(p) for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, n = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.4f}")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ forward / generate
    def _set_routing(self, task_ids: Any, attention_mask: torch.Tensor | None) -> None:
        """Publish this call's task ids / mask to every adapter (kept until the next call, see RoutingState)."""
        st = self.routing_state
        if task_ids is not None and not isinstance(task_ids, torch.Tensor):
            task_ids = torch.as_tensor(task_ids, dtype=torch.long)
        st.task_ids = task_ids
        st.attention_mask = attention_mask if self.mtlora_config.blc_ignore_padding else None
        st.balance_terms = []

    def forward(self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Forward of the base model; ``task_ids`` (B,) routes MMoELoRA; adds the balance loss when training."""
        cfg = self.mtlora_config
        self._set_routing(task_ids, kwargs.get("attention_mask"))
        out = self.base_model(*args, **kwargs)
        terms = list(self.routing_state.balance_terms)
        if self.training and self.routing_state.collect_balance:
            bl = balance_loss(terms)
            if bl is not None and torch.is_grad_enabled() and not bl.requires_grad:
                raise MtLoraError(
                    "the balance loss has no gradient: gradient checkpointing is reentrant, which runs the forward "
                    "under no_grad. Use model.gradient_checkpointing_enable() (non-reentrant) or "
                    "gradient_checkpointing_kwargs={'use_reentrant': False}"
                )
            if bl is not None:
                if getattr(out, "loss", None) is not None:
                    loss = out.loss + cfg.blc_alpha * bl.to(out.loss.dtype)
                    out = _with_balance_fields(out, task_loss=out.loss.detach(), balance_loss=bl.detach())
                    out["loss"] = loss
                else:
                    out = _with_balance_fields(out, balance_loss=bl.detach(), balance_loss_with_grad=bl)
        return out

    def generate(self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self._set_routing(task_ids, None)
        return self.base_model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Enable activation checkpointing, always non-reentrant.

        The reentrant variant runs the checkpointed forward under ``no_grad``, which silently removed the
        balance loss's gradient in the released code; we refuse it rather than reproduce that.
        """
        kw = dict(gradient_checkpointing_kwargs or {})
        if kw.get("use_reentrant", False):
            raise MtLoraError(
                "reentrant gradient checkpointing drops the balance-loss gradient; use use_reentrant=False"
            )
        kw["use_reentrant"] = False
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.base_model.activation_checkpointing_enable(kw, **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Context in which the model computes exactly the base model's outputs."""
        prev = self.routing_state.enabled
        self.routing_state.enabled = False
        try:
            with self.saved_modules.originals():
                yield
        finally:
            self.routing_state.enabled = prev

    @contextlib.contextmanager
    def collect_routing_stats(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        """Record per-adapter mean routing probabilities and entropy of the forwards run inside the context."""
        st = self.routing_state
        st.collect_stats, st.stats = True, {}
        try:
            yield st.stats
        finally:
            st.collect_stats = False

    # ------------------------------------------------------------------ unload / merge
    def unload(self) -> nn.Module:
        """Remove every adapter and hook and restore ``requires_grad``: returns the exact base model."""
        base = self.base_model
        self.saved_modules.restore_originals()
        for _, host, _ in list(iter_hosts(base)):
            detach(host)
        for n, p in base.named_parameters():
            p.requires_grad_(self._requires_grad_backup.get(n, p.requires_grad))
        return base

    def merge_and_unload(self, *, dequantize: bool = False) -> nn.Module:
        """Fold single-expert component adapters into their Linear weights (W += scaling·B·A), then unload.

        A quantized base (``--load_in_kbits 4|8``) stores packed integers, not a matrix one can add to, so
        merging is refused unless ``dequantize=True``: then every quantized linear of the base is replaced by
        an ordinary ``nn.Linear`` holding its dequantized weight (in the compute dtype, transformers'
        ``dequantize()``) and the deltas are added to those - the merged model computes what the adapted
        quantized model computed, at 16/32-bit size.
        """
        from mtlora.quant import is_quantized_linear

        deltas = []
        for name, host, adapter in iter_hosts(self.base_model):
            if not isinstance(host, nn.Linear):
                raise MtLoraError(
                    f"{name}: block-level adapters add a parallel path over a whole block and cannot be merged "
                    "into existing weights; export them instead (mtlora export)"
                )
            if is_quantized_linear(host) and not dequantize:
                raise MtLoraError(
                    f"{name}: the base is quantized ({quantization_of(self.base_model).describe()}); adding the "
                    "adapter to its packed weights would write a wrong model. Merge into the unquantized base "
                    "(load it with --load_in_kbits 16), or merge_and_unload(dequantize=True) to merge into "
                    "dequantized weights"
                )
            deltas.append((name, adapter.delta_weight()))  # raises for routed adapters
        self.saved_modules.keep_trained()  # a merged model keeps its trained modules_to_save (as peft's)
        base = self.unload()
        if dequantize and quantization_of(base).enabled:
            base = base.dequantize()
        with torch.no_grad():
            for name, dw in deltas:
                weight = base.get_submodule(name).weight
                weight.add_(dw.to(device=weight.device, dtype=weight.dtype))
        return base

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike[str], **extra_config: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``save_directory``, as a unit.

        The folder is rebuilt beside the old one (other files in it are kept) and swapped in whole
        (:func:`mtlora.atomic.atomic_dir`): a kill at any moment leaves the old weights with the old config
        or the new weights with the new config, never new weights beside an old config.
        """
        with atomic_dir(save_directory, keep_existing=True) as tmp:
            self.write_adapter_files(tmp, **extra_config)

    def write_adapter_files(self, directory: str | os.PathLike[str], **extra_config: Any) -> None:
        """Write the two adapter files into ``directory`` as they are (no atomicity: callers that write
        more files beside the adapter, e.g. a tokenizer, stage them all in one :func:`atomic_dir`)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.adapter_state_dict().items()}
        cfg = self.mtlora_config.to_dict()
        cfg["mtlora_version"] = __version__
        cfg[QUANT_RECORD_KEY] = quantization_of(self.base_model).record()
        cfg["peft_type"] = SAVED_PEFT_TYPE  # what peft's loaders print when handed this folder
        cfg.update(extra_config)
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "mtlora": __version__})
        (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def load_adapter_weights(self, path: str | os.PathLike[str]) -> None:
        """Load adapter tensors from a safetensors file, checking every key and shape strictly."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: adapter weights not found")
        try:
            loaded = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        for k, t in loaded.items():  # a NaN adapter would score 0.0 (or train on) without a word
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(
                    f"{path}: tensor {k!r} holds non-finite values (NaN/inf); the adapter is broken "
                    "(a diverged run?) and is not loaded"
                )
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(loaded))
        unexpected = sorted(set(loaded) - set(expected))
        if missing:
            raise CheckpointError(
                f"{path}: missing key {missing[0]!r} ({len(missing)} missing) - adapter does not fit this model"
            )
        if unexpected:
            raise CheckpointError(
                f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected) - adapter does not fit this model"
            )
        for k, param in expected.items():
            if tuple(loaded[k].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{path}: shape mismatch for {k!r}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(param.shape)}"
                )
        with torch.no_grad():
            for k, param in expected.items():
                param.copy_(loaded[k].to(dtype=param.dtype, device=param.device))

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, adapter_dir: str | os.PathLike[str], *, is_trainable: bool = False
    ) -> MtLoraModel:
        """Rebuild the adapters described by ``adapter_dir/adapter_config.json`` and load their weights."""
        adapter_dir = recover_interrupted(adapter_dir)
        if not adapter_dir.is_dir():
            raise CheckpointError(f"{adapter_dir}: adapter directory not found")
        config = MtLoraConfig.from_json_file(adapter_dir / CONFIG_NAME)
        config.inference_mode = not is_trainable
        _note_precision_change(adapter_dir / CONFIG_NAME, base_model)
        model = cls(base_model, config)
        model.load_adapter_weights(adapter_dir / WEIGHTS_NAME)
        if not is_trainable:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return model


def _note_precision_change(config_path: Path, base_model: nn.Module) -> None:
    """Log once when an adapter trained on one base precision is loaded onto another (it works: the adapter
    weights do not depend on how the base is stored, but scores can shift slightly, so say it)."""
    raw = json.loads(config_path.read_text())
    if QUANT_RECORD_KEY not in raw:  # saved before the field existed: nothing to compare with
        return
    trained = Quantization.from_record(raw[QUANT_RECORD_KEY], source=str(config_path))
    now = quantization_of(base_model)
    if trained != now:
        logger.warning(
            "%s: adapter trained on a %s base, loaded onto a %s base",
            config_path.parent,
            trained.describe(),
            now.describe(),
        )


def get_mtlora_model(model: nn.Module, config: MtLoraConfig) -> MtLoraModel:
    """Attach adapters described by ``config`` to ``model``.

    Idempotent: given an :class:`MtLoraModel` with an equal config it is returned unchanged; a different
    config is an error (``unload()`` first) rather than a second, stacked set of adapters.
    """
    if isinstance(model, MtLoraModel):
        if (
            model.mtlora_config.to_dict()
            == MtLoraConfig.from_dict(
                {**config.to_dict(), "base_model_name_or_path": model.mtlora_config.base_model_name_or_path}
            ).to_dict()
        ):
            return model
        raise PlacementError(
            "the model already has mtlora adapters with a different config; unload() it first"
        )
    return MtLoraModel(model, config)


def needs_task_ids(model: Any) -> bool:
    """Whether ``model`` (an :class:`MtLoraModel`, a peft model or a bare base) must be given ``task_ids``."""
    return isinstance(model, MtLoraModel) and model.needs_task_ids
