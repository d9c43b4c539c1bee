"""Plain peft LoRA folders: write, read, collapse a component-level adapter, convert a single-expert one."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mtlora.atomic import atomic_dir
from mtlora.errors import CheckpointError, MtLoraError
from mtlora.export.common import BLOCK_NOT_PEFT, PEFT_CONFIG_NAME, PEFT_KEY, PEFT_WEIGHTS_NAME
from mtlora.hub import resolve_model_path
from mtlora.routing.static import static_up_projection

if TYPE_CHECKING:
    from mtlora.layers import MultiExpertLoRA
    from mtlora.model import MtLoraModel


@dataclass
class PeftLora:
    """A plain peft LoRA in memory: ``modules[path] = (A (r, d_in), B (d_out, r))`` and ``scaling[path]``."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]
    rank: int
    config: dict[str, Any] = field(default_factory=dict)


def write_peft_lora(
    out_dir: str | Path,
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    lora_alpha: float,
    target_modules: Sequence[str] | str | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as ``PeftModel.save_pretrained``.

    ``modules`` maps a module path of the base model (``model.layers.0.self_attn.q_proj``) to ``(A, B)``.
    The config is peft's own ``LoraConfig.save_pretrained`` (every key a peft version expects) and the
    weights use peft's key names, so the folder loads with ``PeftModel.from_pretrained`` (tested) and,
    being a standard LoRA, should load in vLLM / LoRAX (not tested here). ``target_modules`` (names, or
    one peft regex string) defaults to the full module paths; peft's matching rule for names (equal, or
    ends with ``.name``) is the same as mtlora's, so mtlora's names carry over.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not modules:
        raise MtLoraError("nothing to export: the adapter has no component-level modules")
    ranks = {int(a.shape[0]) for a, _ in modules.values()}
    if len(ranks) != 1:
        raise MtLoraError(f"all modules of one peft LoRA must share a rank, got ranks {sorted(ranks)}")
    rank = ranks.pop()
    if base_model_name_or_path and base_model_name_or_path.lower().startswith("mtlora:"):
        # plain peft cannot resolve mtlora's bundled-model names; record the folder they stand for
        base_model_name_or_path = resolve_model_path(base_model_name_or_path)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=float(lora_alpha),
        target_modules=(
            target_modules
            if isinstance(target_modules, str)
            else (list(target_modules) if target_modules else sorted(modules))
        ),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in sorted(modules.items()):
        if a.shape[0] != b.shape[1]:
            raise MtLoraError(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not chain")
        a, b = a.detach(), b.detach()
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu().contiguous()
    with atomic_dir(out_dir, keep_existing=True) as tmp:  # config and weights appear together or not at all
        cfg.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(out_dir)


def read_peft_lora(path: str | Path) -> PeftLora:
    """Load a plain peft LoRA folder into memory (for composition); unsupported variants are an error."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / PEFT_CONFIG_NAME, path / PEFT_WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(
            f"{path}: not a peft adapter folder (needs {PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME})"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise CheckpointError(f"{cfg_path}: JSON nested too deeply to parse") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        if "method" in cfg:
            raise CheckpointError(
                f"{cfg_path}: an mtlora adapter, not a peft LoRA (run `mtlora export` first)"
            )
        raise CheckpointError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}, expected 'LORA'")
    for key in ("use_dora", "lora_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{cfg_path}: {key}=true LoRAs are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{cfg_path}: rank_pattern/alpha_pattern LoRAs are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise CheckpointError(f"{cfg_path}: LoRAs with trained biases or modules_to_save are not supported")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(w_path)).items():
        m = PEFT_KEY.match(key)
        if m is None:
            raise CheckpointError(
                f"{w_path}: unexpected key {key!r} (only lora_A/lora_B weights are supported)"
            )
        parts.setdefault(m["module"], {})[m["which"]] = tensor
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{w_path}: module {name!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
        modules[name] = (ab["A"], ab["B"])
    return PeftLora(modules=modules, scaling=dict.fromkeys(modules, scale), rank=r, config=cfg)


def _peft_targets(model: MtLoraModel) -> list[str]:
    from mtlora.placement import default_target_modules

    targets = model.mtlora_config.target_modules
    if isinstance(targets, str):
        targets = [targets]
    return list(targets) if targets else default_target_modules(model.base_model)


def component_adapters(model: MtLoraModel) -> list[tuple[str, nn.Module, MultiExpertLoRA]]:
    from mtlora.placement import iter_hosts

    hosts = list(iter_hosts(model.base_model))
    if any(not isinstance(host, nn.Linear) for _, host, _ in hosts):
        raise MtLoraError(BLOCK_NOT_PEFT)
    return hosts  # type: ignore[return-value]


def refuse_saved_modules(model: MtLoraModel, what: str) -> None:
    """``modules_to_save`` weights have no place in these formats: refuse instead of dropping them."""
    if model.saved_modules:
        raise MtLoraError(
            f"the adapter also trains modules_to_save={model.saved_modules.names}; {what} would drop them "
            "(export a merged checkpoint with --merged instead)"
        )


def export_peft_lora(
    model: MtLoraModel,
    routing: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Collapse a component-level adapter under a static routing into one plain peft LoRA in ``out_dir``.

    ``lora_A = A``, ``lora_B = Σ_e diag(π̄_e) B_e``, ``r = rank`` and ``lora_alpha = scaling · rank`` so that
    peft's ``lora_alpha / r`` is mtlora's scaling.
    """
    refuse_saved_modules(model, "a peft LoRA export")
    hosts = component_adapters(model)
    scalings = {float(a.scaling) for _, _, a in hosts}
    if len(scalings) != 1:
        raise MtLoraError(f"adapters with different scalings {sorted(scalings)} cannot share one peft config")
    modules = {}
    rank = 0
    for name, _, adapter in hosts:
        if adapter.style != "lowrank":
            raise MtLoraError(f"{name}: bottleneck adapters have no peft LoRA equivalent")
        modules[name] = (adapter.lora_A.detach(), static_up_projection(adapter, routing.get(name)))
        rank = adapter.rank
    dtype = next(iter(model.adapters())).lora_A.dtype
    return write_peft_lora(
        out_dir,
        modules,
        lora_alpha=scalings.pop() * rank,
        target_modules=_peft_targets(model),
        base_model_name_or_path=base_model_name_or_path or model.mtlora_config.base_model_name_or_path,
        dtype=dtype,
    )


def convert_lora_to_peft(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """File-only conversion of a single-expert mtlora component adapter (``method=lora``, or any method with
    one expert, i.e. no router) to a plain peft LoRA.

    No model is loaded: with one expert and no router, ``lora_B`` ``(d_out, 1, r)`` is already peft's
    ``(d_out, r)``. Used by LoRAHub to turn freshly trained per-task LoRAs into its inputs.
    """
    from safetensors.torch import load_file

    from mtlora.config import CONFIG_NAME, WEIGHTS_NAME, MtLoraConfig

    adapter_dir = Path(adapter_dir)
    cfg = MtLoraConfig.from_json_file(adapter_dir / CONFIG_NAME)
    if cfg.router_class.is_routed or cfg.enable_block_adapter:  # not one plain LoRA per linear
        raise MtLoraError(
            f"{adapter_dir}: method={cfg.method} (block={cfg.enable_block_adapter}) has routing or block "
            "adapters; use export_adapter / `mtlora export` instead of a file conversion"
        )
    tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.match(r"^(?P<module>.+)\.mtlora\.lora_(?P<which>[AB])$", key)
        if m is None:
            raise CheckpointError(
                f"{adapter_dir / WEIGHTS_NAME}: unexpected key {key!r} for a plain lora adapter"
            )
        parts.setdefault(m["module"], {})[m["which"]] = t
    modules = {n: (ab["A"], ab["B"][:, 0, :]) for n, ab in parts.items()}
    targets = cfg.target_modules or sorted({n.rsplit(".", 1)[-1] for n in modules})
    return write_peft_lora(
        out_dir,
        modules,
        lora_alpha=cfg.scaling * cfg.lora_rank,
        target_modules=targets if isinstance(targets, list) else [targets],
        base_model_name_or_path=cfg.base_model_name_or_path,
    )
