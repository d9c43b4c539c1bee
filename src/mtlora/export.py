"""``mtlora export``: turn a routed multi-expert adapter into artefacts that ordinary serving stacks load.

Why: a token router prevents merging and no server (vLLM, LoRAX, S-LoRA) runs router + experts, but every
one of them hot-swaps plain LoRAs. With a shared down-projection A, freezing the routing weights of a
task collapses the experts into ONE rank-r LoRA, exactly (field survey §3, "static export"):

    Delta W_t = scaling · (Σ_e diag(π̄_{t,e}) B_e) · A        π̄_{t,e} ∈ R^{d_out}

* token routers (HydraLoRA, mtLoRA, scalar or fine-grained): π̄_{t,g,e} is the mean routing probability of
  expert e in group g over the real (non-padding) tokens of task t's calibration examples, and output dim
  j uses its group g(j) = j // group_size. This is an approximation of the routed model: its cost is
  measured and written to ``report.json`` (accuracy and target NLL, routed vs exported, per task);
* MMoELoRA's task gate depends on the task id only, so its per-task export is exact (no calibration):
  ``B_t = B · diag(gate_t repeated over each expert's rank slice)``;
* plain ``lora`` has no router: one export ``X/default/``, identical to the adapter (every task of the
  report points to it).

What gets written under ``output_dir`` (the ``mtlora export`` contract)::

    X/<task>/adapter_config.json, adapter_model.safetensors   plain peft LoRA (component-level adapters)
    X/<task>/block_adapter.safetensors, block_adapter_config.json, load_block_export.py
                                                                block-level adapters: the bundle (mtlora.bundle)
    X/<task>/merged/                                          base + static Delta W (``--merged``, component)
    X/<task>/README.md, tokenizer files                       model card (mtlora.model_card) and tokenizer
    X/base_model/                                             a bundled base copied (mtlora.deploy.export_base)
    X/report.json                                             forms + load commands, routed vs exported scores
    X/README.md, X/task_map.json

The "exported" numbers of the report come from :func:`static_routing` (each routed adapter computing
``scaling · B_t A x`` with the task's collapsed up-projection), which performs the same operations as the
written peft LoRA loaded by plain peft (the tests check agreement to 1e-5; on CPU it was bitwise); that
keeps one model in memory instead of one per artefact.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mtlora.atomic import atomic_dir
from mtlora.bundle import FORMAT, LOADER_NAME, load_block_export, loader_source
from mtlora.deploy import (
    BASE_COPY_DIR,
    FORM_BUNDLE,
    FORM_MERGED,
    FORM_PEFT,
    FORM_TITLES,
    PLACEMENT_FORMS,
    artifact,
    export_base,
)
from mtlora.dtypes import model_device
from mtlora.errors import CheckpointError, MtLoraError
from mtlora.hub import (
    default_device,
    load_model,
    read_adapter_config,
    resolve_adapter_dir,
    resolve_model_path,
)
from mtlora.outputs import add_safety_flags, check_output_dir
from mtlora.quant import add_quantization_arguments, is_quantized_linear
from mtlora.quant import from_args as quantization_from_args
from mtlora.routing.static import static_routing, static_up_projection

if TYPE_CHECKING:
    from mtlora.layers import MultiExpertLoRA
    from mtlora.model import MtLoraModel

__all__ = [
    "BLOCK_CONFIG_NAME",
    "BLOCK_WEIGHTS_NAME",
    "EvalMetrics",
    "PeftLora",
    "TaskRouting",
    "convert_lora_to_peft",
    "estimate_task_routing",
    "evaluate_records",
    "export_adapter",
    "export_block_adapter",
    "export_peft_lora",
    "load_block_export",
    "main",
    "read_peft_lora",
    "save_merged_model",
    "static_delta_weight",
    "static_routing",
    "static_up_projection",
    "task_gate_routing",
    "write_peft_lora",
]

EXPORT_VERSION = 1
REPORT_NAME = "report.json"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
BLOCK_CONFIG_NAME = "block_adapter_config.json"
BLOCK_WEIGHTS_NAME = "block_adapter.safetensors"
BLOCK_LOADER_NAME = LOADER_NAME
BLOCK_FORMAT = FORMAT
DEFAULT_EXPORT = "default"  # directory name of the single export of an adapter without a router
IGNORE_INDEX = -100
_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)

BLOCK_NOT_PEFT = (
    "block-level adapters add a parallel low-rank path over a whole attention/MLP block "
    "(h' = h + F(LN h) + Delta(LN h)); that is not a LoRA on any existing nn.Linear, so neither peft nor a "
    "merged checkpoint can express it. The export is a small extra module attached with forward hooks "
    "(load_block_export)."
)


# ============================================================================ static routing math
# static_up_projection and static_routing live with the routers (mtlora.routing.static) and are re-exported.


def static_delta_weight(adapter: MultiExpertLoRA, probs: torch.Tensor | None) -> torch.Tensor:
    """``scaling · B_t A`` (d_out, d_in) in fp32: the weight update a frozen routing gives (low-rank style)."""
    if adapter.style != "lowrank":
        raise MtLoraError(f"{adapter.name}: a bottleneck adapter (B ReLU(A x)) has no weight delta")
    return adapter.scaling * (static_up_projection(adapter, probs) @ adapter.lora_A.detach().float())


def task_gate_routing(model: MtLoraModel, task_id: int) -> dict[str, torch.Tensor]:
    """The exact per-task routing of routers that have one (MMoELoRA's task gate): ``(1, E)`` per adapter."""
    out: dict[str, torch.Tensor] = {}
    for name, adapter in model.named_adapters():
        probs = adapter.router.static_for_task(task_id)
        if probs is not None:
            out[name] = probs
    return out


# ============================================================================ calibration
@dataclass
class TaskRouting:
    """Static routing of one task: ``probs[adapter name]`` is ``(G, E)`` (empty for an unrouted adapter)."""

    probs: dict[str, torch.Tensor]
    source: str  # "calibration" | "task_gate" | "none"
    examples: int = 0
    tokens: int = 0


def _encode(records: Sequence[Mapping[str, Any]], tokenizer: Any, max_seq_length: int, template: str) -> list:
    """(record, input_ids, labels) for every record whose target survives truncation."""
    from mtlora.data.tokenize import encode_record

    out = []
    for record in records:
        enc = encode_record(record, tokenizer, max_seq_length, template)
        if enc is not None:
            out.append((record, enc[0], enc[1]))
    return out


def _right_padded(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: Any) -> dict[str, Any]:
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        lab_t[i, : len(labels)] = torch.tensor(labels)
        mask[i, : len(ids)] = 1
    return {"input_ids": ids_t.to(device), "labels": lab_t.to(device), "attention_mask": mask.to(device)}


def _pad_id(tokenizer: Any) -> int:
    from mtlora.data.tokenize import resolve_pad_token_id

    return resolve_pad_token_id(tokenizer)


_model_device = model_device  # the old private name (lorahub imports it)


def estimate_task_routing(
    model: MtLoraModel,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    max_seq_length: int = 512,
    template: str = "paper",
    batch_size: int = 8,
) -> TaskRouting:
    """Mean routing weights ``(G, E)`` per token-routed adapter over the real tokens of ``records``.

    Why a hook instead of ``collect_routing_stats``: that one averages over groups, and fine-grained
    routing needs one mean per group. A forward pre-hook on each adapter recomputes the router output from
    the adapter's own input (the router is deterministic and sees no dropout) and accumulates it weighted
    by the attention mask, so padding never enters the mean.
    """
    routed = [(n, a) for n, a in model.named_adapters() if a.router.needs_calibration]
    if not routed:
        return TaskRouting(probs={}, source="none")
    encoded = _encode(records, tokenizer, max_seq_length, template)
    if not encoded:
        raise MtLoraError("no calibration example survives tokenisation (targets truncated away?)")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(name: str) -> Any:
        def hook(module: MultiExpertLoRA, args: tuple[Any, ...]) -> None:
            x = args[0]
            batch_shape = tuple(x.shape[:-1])
            p = module.routing_probs(x.reshape(-1, module.in_features), batch_shape).double()
            mask = current["mask"]
            if mask is not None and tuple(mask.shape) == batch_shape:
                w = mask.reshape(-1).to(p)
            else:
                w = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
            s = (p * w[:, None, None]).sum(0)
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0.0) + float(w.sum())

        return hook

    handles = [a.register_forward_pre_hook(make_hook(n)) for n, a in routed]
    device, pad = _model_device(model), _pad_id(tokenizer)
    tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                batch = _right_padded([(ids, lab) for _, ids, lab in chunk], pad, device)
                current["mask"] = batch["attention_mask"]
                tokens += int(batch["attention_mask"].sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    probs = {n: (sums[n] / max(counts[n], 1.0)).float().cpu() for n, _ in routed}
    return TaskRouting(probs=probs, source="calibration", examples=len(encoded), tokens=tokens)


# ============================================================================ peft LoRA files
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
        m = _PEFT_KEY.match(key)
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


def _component_adapters(model: MtLoraModel) -> list[tuple[str, nn.Module, MultiExpertLoRA]]:
    from mtlora.placement import iter_hosts

    hosts = list(iter_hosts(model.base_model))
    if any(not isinstance(host, nn.Linear) for _, host, _ in hosts):
        raise MtLoraError(BLOCK_NOT_PEFT)
    return hosts  # type: ignore[return-value]


def _refuse_saved_modules(model: MtLoraModel, what: str) -> None:
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
    _refuse_saved_modules(model, "a peft LoRA export")
    hosts = _component_adapters(model)
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


# ============================================================================ block-level export
def export_block_adapter(
    model: MtLoraModel,
    routing: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task: str | None = None,
) -> Path:
    """Write a static block-level adapter: A, ``B_t`` and scaling per block + config + standalone loader.

    The folder is self-contained: ``load_block_export.py`` inside it needs only torch and safetensors.
    """
    _refuse_saved_modules(model, "a block-adapter export")
    from safetensors.torch import save_file

    from mtlora.placement import iter_hosts

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for name, host, module in iter_hosts(model.base_model):
        if isinstance(host, nn.Linear):
            raise MtLoraError(f"{name}: component-level adapter; export it as a peft LoRA instead")
        adapter = cast("MultiExpertLoRA", module)
        a = adapter.lora_A.detach()
        b_static = static_up_projection(adapter, routing.get(name)).to(a.dtype)
        tensors[f"{name}.lora_A"] = a.cpu().contiguous()
        tensors[f"{name}.lora_B"] = b_static.cpu().contiguous()
        entries.append(
            {
                "name": name,
                "in_features": adapter.in_features,
                "out_features": adapter.out_features,
                "rank": adapter.rank,
                "scaling": float(adapter.scaling),
                "style": adapter.style,
            }
        )
    if not entries:
        raise MtLoraError("the model has no block-level adapters")
    base = base_model_name_or_path or model.mtlora_config.base_model_name_or_path
    if base and base.lower().startswith("mtlora:"):  # the bundle's loader has no mtlora to resolve the prefix
        base = resolve_model_path(base)
    config = {
        "format": BLOCK_FORMAT,
        "version": EXPORT_VERSION,
        "task": task,
        "base_model_name_or_path": base,
        "weights": BLOCK_WEIGHTS_NAME,
        "placement": "forward hook on each named block; adds scaling * B act(A x) to the block output, "
        "x = the block input (the pre-norm output); act = identity (lowrank) or ReLU (bottleneck, adaptformer)",
        "modules": entries,
    }
    with atomic_dir(out_dir, keep_existing=True) as out:  # the four files appear together or not at all
        save_file(
            tensors,
            str(out / BLOCK_WEIGHTS_NAME),
            metadata={"format": "pt", "mtlora_export": str(EXPORT_VERSION)},
        )
        (out / BLOCK_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (out / BLOCK_LOADER_NAME).write_text(loader_source())
        (out / "README.md").write_text(_block_readme(task))
    return Path(out_dir)


def _block_readme(task: str | None) -> str:
    """A minimal README for a bundle written through the Python API (``mtlora export`` writes a full model card)."""
    return (
        f"# mtlora block-adapter bundle{f' (task {task})' if task else ''}\n\n"
        "No peft LoRA here: " + BLOCK_NOT_PEFT + "\n\n"
        "```python\n"
        "import sys; sys.path.insert(0, 'path/to/this/folder')\n"
        "from load_block_export import load_bundle  # this folder's file; no mtlora import needed\n\n"
        "model, tokenizer = load_bundle('path/to/this/folder')\n"
        "```\n\n"
        "`block_adapter_config.json` lists every block (module path, rank, scaling, style); "
        "`block_adapter.safetensors` holds `<module>.lora_A` (r, d) and the task's static "
        "`<module>.lora_B` (d, r).\n"
    )


# ============================================================================ merged checkpoint
def save_merged_model(
    model: MtLoraModel,
    routing: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
) -> Path:
    """``save_pretrained`` of base + static ``Delta W`` (component level), the simplest deployment.

    The base weights are added to in place, saved, then restored from a copy (not by subtraction, which
    would leave rounding residue for the next task). Adapter tensors are filtered out of the saved state.
    """
    from mtlora.placement import ADAPTER_ATTR

    hosts = _component_adapters(model)
    quantized = [name for name, host, _ in hosts if is_quantized_linear(host)]
    if quantized:
        raise MtLoraError(
            f"{quantized[0]}: cannot save a merged model of a quantized base (packed weights take no delta); "
            "merge into the unquantized base (--load_in_kbits 16)"
        )
    base = model.base_model
    backups = [(host, host.weight.detach().clone()) for _, host, _ in hosts]
    # the whole folder is this model's (a merged model is not saved beside other files): replace it as a unit
    with atomic_dir(out_dir) as out:
        try:
            with torch.no_grad():
                for name, host, adapter in hosts:
                    dw = static_delta_weight(adapter, routing.get(name))
                    host.weight.add_(dw.to(device=host.weight.device, dtype=host.weight.dtype))
            marker = f".{ADAPTER_ATTR}."
            state = {k: v for k, v in base.state_dict().items() if marker not in f".{k}"}
            base.save_pretrained(str(out), state_dict=state)
        finally:
            with torch.no_grad():
                for host, w in backups:
                    host.weight.copy_(w)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    return Path(out_dir)


# ============================================================================ evaluation
@dataclass
class EvalMetrics:
    """Exact-match accuracy of greedy generation and mean per-token NLL of the target (teacher forced)."""

    accuracy: float | None
    nll: float | None
    examples: int
    target_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "nll": self.nll,
            "examples": self.examples,
            "target_tokens": self.target_tokens,
        }


def _norm(text: str) -> str:
    return " ".join(text.split())


def evaluate_records(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    forward_kwargs: Mapping[str, Any] | None = None,
    max_seq_length: int = 512,
    template: str = "paper",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    generate: bool = True,
) -> EvalMetrics:
    """Score ``records`` with ``model`` (routed, static or base, whatever context it is called in).

    NLL: mean over target tokens (output + EOS) under teacher forcing, right-padded batches. Accuracy:
    greedy generation from the prompt (left-padded batches) until EOS, whitespace-normalised exact match
    against the record's output. ``forward_kwargs`` is repeated per row (e.g. ``{"task_ids": 3}``).
    """
    encoded = _encode(records, tokenizer, max_seq_length, template)
    if not encoded:
        return EvalMetrics(accuracy=None, nll=None, examples=0, target_tokens=0)
    device, pad = _model_device(model), _pad_id(tokenizer)
    kw = dict(forward_kwargs or {})

    def row_kwargs(n: int) -> dict[str, Any]:
        return {k: torch.full((n,), int(v), dtype=torch.long, device=device) for k, v in kw.items()}

    nll_sum, n_tok = 0.0, 0
    correct = 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = _right_padded([(ids, lab) for _, ids, lab in chunk], pad, device)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **row_kwargs(len(chunk))
            ).logits.float()
            labels = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            valid = labels != IGNORE_INDEX
            tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            nll_sum += float(-(tok * valid).sum())
            n_tok += int(valid.sum())
            if not generate:
                continue
            prompts = []
            for _, ids, lab in chunk:
                first = next(i for i, v in enumerate(lab) if v != IGNORE_INDEX)
                prompts.append((ids[:first], len(ids) - first))
            width = max(len(p) for p, _ in prompts)
            ids_t = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, (p, _) in enumerate(prompts):
                ids_t[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            new = min(max_new_tokens, max(n for _, n in prompts) + 2)
            out = model.generate(
                input_ids=ids_t.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                **row_kwargs(len(prompts)),
            )
            for i, (record, _, _) in enumerate(chunk):
                gen = out[i, width:].tolist()
                if tokenizer.eos_token_id in gen:
                    gen = gen[: gen.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(gen, skip_special_tokens=True)
                correct += int(_norm(text) == _norm(str(record["output"])))
    return EvalMetrics(
        accuracy=correct / len(encoded) if generate else None,
        nll=nll_sum / max(n_tok, 1),
        examples=len(encoded),
        target_tokens=n_tok,
    )


# ============================================================================ driver
def _safe_dir_name(task: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("._") or "task"
    if base.lower() in (REPORT_NAME, "task_map.json", BASE_COPY_DIR, "readme.md"):
        base = f"task_{base}"
    name, i = base, 1
    while name.lower() in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name.lower())
    return name


def _by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault(str(r["task_type"]), []).append(r)
    return out


def _split_held_out(
    records: Sequence[Mapping[str, Any]], fraction: float
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(calibration, evaluation): the last ``fraction`` of each task's records (at least one) is held out."""
    n = len(records)
    if n < 2 or fraction <= 0:
        return list(records), []
    k = min(n - 1, max(1, round(n * fraction)))
    return list(records[: n - k]), list(records[n - k :])


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def export_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    model_name_or_path: str | None = None,
    calibration_data: str | Path | None = None,
    eval_data: str | Path | None = None,
    merged: bool = False,
    tasks: Sequence[str] | None = None,
    max_calibration_per_task: int = 64,
    max_eval_per_task: int = 16,
    eval_fraction: float = 0.2,
    evaluate: bool = True,
    max_seq_length: int = 512,
    template: str = "paper",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    quantization: Any = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Export an mtlora adapter per task and write ``report.json``; returns the report (see module docstring).

    ``quantization`` (:class:`mtlora.quant.Quantization`, ``--load_in_kbits``) loads a 4/8-bit base: the
    exported LoRAs are the same (they do not depend on the base's storage), the report's numbers are those of
    the quantized model, and ``merged`` is refused (packed weights cannot take a delta; merge into the
    16-bit base).

    Calibration uses ``calibration_data`` (records with ``task_type``). Without ``eval_data`` the last
    ``eval_fraction`` (in (0, 1)) of each task's calibration records is held out for the report and not
    calibrated on. A non-empty ``output_dir`` (an earlier export) is refused unless ``overwrite``.
    """

    from mtlora.config import CONFIG_NAME, MtLoraConfig
    from mtlora.data import build_task_map, load_records, load_task_map, save_task_map
    from mtlora.data.records import write_json_atomic
    from mtlora.data.tokenize import records_fingerprint

    if not (isinstance(eval_fraction, (int, float)) and 0.0 < eval_fraction < 1.0):
        raise MtLoraError(f"--eval_fraction {eval_fraction}: must be in (0, 1), the held-out share per task")
    adapter_dir = resolve_adapter_dir(adapter_dir)  # also a `mtlora train` output dir
    out = check_output_dir(output_dir, overwrite=overwrite, refuse_nonempty=True)
    raw_cfg = read_adapter_config(adapter_dir)
    if "method" not in raw_cfg:
        raise CheckpointError(
            f"{adapter_dir}: peft_type={raw_cfg.get('peft_type')!r} is already a plain adapter"
        )
    mt_cfg = MtLoraConfig.from_json_file(adapter_dir / CONFIG_NAME)
    block = bool(mt_cfg.enable_block_adapter)
    if merged and block:  # checked before loading anything
        raise MtLoraError(f"--merged: {BLOCK_NOT_PEFT}")
    if merged and quantization is not None and quantization.enabled:
        raise MtLoraError(
            f"--merged with --load_in_kbits {quantization.load_in_kbits}: a merged model is the base's weights "
            "plus each task's delta, and a quantized base has packed weights; export with --load_in_kbits 16 "
            "to merge into the unquantized base (the adapters do not depend on how the base is stored)"
        )
    loaded = load_model(
        model_name_or_path,
        adapter_dir,
        device=device,
        dtype=dtype,
        mtlora_only=True,
        tokenizer_from_adapter=True,
        freeze=False,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
    )
    model, tokenizer, base_name = loaded.model, loaded.tokenizer, loaded.model_name_or_path

    calib_records = load_records(calibration_data) if calibration_data else []
    eval_records = load_records(eval_data) if eval_data else []
    task_map_path = adapter_dir / "task_map.json"
    if task_map_path.is_file():
        task_map = load_task_map(task_map_path)
    elif calib_records or eval_records:
        task_map = build_task_map(calib_records + eval_records)
    else:
        task_map = {}
    # what the routers can do decides how each task's routing is found (never their kind names)
    routers = [a.router for a in model.adapters()]
    by_task_id = any(r.needs_task_ids for r in routers)  # exact per-task routing from the task id
    calibrated = any(r.needs_calibration for r in routers)  # per-task routing estimated on data
    kinds = {r.kind for r in routers}  # for the report only
    if by_task_id and not task_map:
        raise MtLoraError(f"{adapter_dir}: an mmoelora adapter needs task_map.json to know its tasks")
    if calibrated and not calib_records:
        raise MtLoraError(
            "--calibration_data is required: a token router's per-task weights are estimated on data"
        )

    calib_by_task = _by_task(calib_records)
    eval_by_task = _by_task(eval_records)
    if by_task_id:
        wanted = list(task_map)
    else:
        found = set(calib_by_task) if calibrated else set(calib_by_task) | set(eval_by_task)
        wanted = sorted(found, key=lambda t: (task_map.get(t, 1 << 30), t))
    if tasks:
        missing = [t for t in tasks if t not in wanted]
        if missing:
            raise MtLoraError(f"--tasks {missing}: not among the tasks found ({wanted})")
        wanted = list(tasks)
    if by_task_id:
        unknown = sorted(set(calib_by_task) - set(task_map))
        if unknown:
            raise MtLoraError(f"calibration tasks {unknown} are not in the adapter's task_map.json")

    # per task: (calibration records, evaluation records)
    splits: dict[str, tuple[list, list]] = {}
    for t in wanted:
        recs = calib_by_task.get(t, [])
        if eval_records:
            cal, ev = list(recs), list(eval_by_task.get(t, []))
        elif calibrated:
            cal, ev = _split_held_out(recs, eval_fraction)
        else:  # no calibration needed: every record of the task can serve the report
            cal, ev = [], list(recs)
        splits[t] = (cal[:max_calibration_per_task], ev[:max_eval_per_task])

    out.mkdir(parents=True, exist_ok=True)
    fmt = "mtlora_block" if block else "peft_lora"
    # the base every export names: resolvable by plain transformers (a bundled model is copied beside them)
    export_base_name, base_copy = export_base(str(base_name), out)
    report: dict[str, Any] = {
        "format": "mtlora-export-report",
        "version": EXPORT_VERSION,
        "adapter_dir": str(adapter_dir),
        "base_model": str(base_name),
        "base_model_name_or_path": export_base_name,
        "base_model_copy": base_copy,
        "method": mt_cfg.method,
        "level": "block" if block else "component",
        "router": sorted(kinds)[0] if len(kinds) == 1 else sorted(kinds),
        "export_format": fmt,
        "peft_compatible": not block,
        "deployable_as": [
            f for f in PLACEMENT_FORMS["block" if block else "component"] if merged or f != FORM_MERGED
        ],
        "note": BLOCK_NOT_PEFT if block else None,
        "exported_metrics_from": "mtlora static-routing forward (equals the exported artefact, see tests)",
        "calibration_data": str(calibration_data) if calibration_data else None,
        "eval_data": str(eval_data)
        if eval_data
        else ("held-out calibration records" if calibrated else None),
        "settings": {
            "max_calibration_per_task": max_calibration_per_task,
            "max_eval_per_task": max_eval_per_task,
            "eval_fraction": eval_fraction,
            "max_seq_length": max_seq_length,
            "template": template,
            "max_new_tokens": max_new_tokens,
            "dtype": dtype,
            "base_quantization": loaded.quantization.record(),
        },
        "tasks": {},
    }
    taken: set[str] = set()
    single = bool(routers) and not any(r.is_routed for r in routers)
    default_dir: str | None = None
    if single:  # one export serves every task
        default_dir = _safe_dir_name(DEFAULT_EXPORT, taken)
        _write_export(model, {}, out / default_dir, block, export_base_name, tokenizer, merged, task=None)
        report["default_export"] = default_dir
    eval_kw = dict(
        max_seq_length=max_seq_length, template=template, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    for t in wanted:
        cal, ev = splits[t]
        if by_task_id:
            routing = TaskRouting(probs=task_gate_routing(model, task_map[t]), source="task_gate")
        elif calibrated:
            skipped = None
            if not cal:
                skipped = "no calibration records left after holding out the evaluation records"
            elif not _encode(cal, tokenizer, max_seq_length, template):
                skipped = f"every calibration record's target is truncated away at --max_seq_length {max_seq_length}"
            if skipped:  # one unusable task must not sink the export of the others
                print(f"warning: task {t!r} not exported: {skipped}", file=sys.stderr)
                report["tasks"][t] = {
                    "task_id": task_map.get(t),
                    "dir": None,
                    "artifacts": [],
                    "skipped": skipped,
                }
                continue
            routing = estimate_task_routing(
                model, tokenizer, cal, max_seq_length=max_seq_length, template=template, batch_size=batch_size
            )
        else:
            routing = TaskRouting(probs={}, source="none")
        if default_dir is None:
            tdir = _safe_dir_name(t, taken)
            _write_export(
                model, routing.probs, out / tdir, block, export_base_name, tokenizer, merged, task=t
            )
        else:
            tdir = default_dir
        entry: dict[str, Any] = {
            "task_id": task_map.get(t),
            "dir": tdir,
            "format": fmt,
            "merged_dir": f"{tdir}/merged" if merged else None,
            "artifacts": _artifacts(tdir, block, merged, out),
            "routing_source": routing.source,
            "calibration_examples": routing.examples,
            "calibration_tokens": routing.tokens,
            "eval_examples": len(ev),
            # content hashes of the records this task's export was calibrated and scored on (model cards)
            "calibration_sha256": records_fingerprint(cal) if cal else None,
            "eval_sha256": records_fingerprint(ev) if ev else None,
        }
        if evaluate and ev:
            fkw = {"task_ids": task_map[t]} if by_task_id else {}
            routed = evaluate_records(model, tokenizer, ev, forward_kwargs=fkw, **eval_kw)
            if single:
                exported = routed  # identical by construction: there is no router to freeze
            else:
                with static_routing(model, routing.probs):
                    exported = evaluate_records(model, tokenizer, ev, forward_kwargs=fkw, **eval_kw)
            with model.disable_adapters():
                base_m = evaluate_records(model, tokenizer, ev, generate=False, **eval_kw)
            entry.update(
                routed=routed.to_dict(),
                exported=exported.to_dict(),
                base={"nll": base_m.nll},
                accuracy_gap=_gap(routed.accuracy, exported.accuracy),
                nll_gap=_gap(exported.nll, routed.nll),
            )
        report["tasks"][t] = entry
    if wanted and all("skipped" in e for e in report["tasks"].values()) and default_dir is None:
        raise MtLoraError(
            "no task could be exported: "
            + "; ".join(f"{t}: {e['skipped']}" for t, e in report["tasks"].items())
        )
    scored = [e for e in report["tasks"].values() if "routed" in e]
    if scored:

        def mean(key: str, sub: str) -> float | None:
            vals = [e[key][sub] for e in scored if e[key].get(sub) is not None]
            return sum(vals) / len(vals) if vals else None

        report["mean"] = {
            "routed_accuracy": mean("routed", "accuracy"),
            "exported_accuracy": mean("exported", "accuracy"),
            "routed_nll": mean("routed", "nll"),
            "exported_nll": mean("exported", "nll"),
            "base_nll": mean("base", "nll"),
        }
    if task_map:  # written with the report, so a failed export leaves no stray task map
        save_task_map(task_map, out / "task_map.json")
    _write_cards(report, adapter_dir, out)
    write_json_atomic(out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return report


def _write_cards(report: dict[str, Any], adapter_dir: Path, out: Path) -> None:
    """README.md model card in every artefact folder (one per folder) and an index card in ``out``."""
    from mtlora.model_card import export_card, export_index_card, gather, write_card

    facts = gather(adapter_dir)
    done: set[str] = set()
    for task, entry in report["tasks"].items():
        for art in entry.get("artifacts", []):
            if art["path"] in done:  # the single export of an unrouted adapter serves every task
                continue
            done.add(art["path"])
            write_card(out / art["path"], export_card(report, task, facts, art["form"], art["path"], out))
    write_card(out, export_index_card(report, facts))


def _write_export(
    model: MtLoraModel,
    probs: Mapping[str, torch.Tensor],
    tdir: Path,
    block: bool,
    base_name: str,
    tokenizer: Any,
    merged: bool,
    task: str | None,
) -> None:
    """One task's export folder, written as a unit (with ``merged/`` inside when asked for)."""
    with atomic_dir(tdir) as tmp:
        if block:
            export_block_adapter(model, probs, tmp, base_model_name_or_path=base_name, task=task)
        else:
            export_peft_lora(model, probs, tmp, base_model_name_or_path=base_name)
        tokenizer.save_pretrained(str(tmp))  # a serving stack can take base, adapter and tokenizer from here
        if merged and not block:
            save_merged_model(model, probs, tmp / "merged", tokenizer=tokenizer)


def _artifacts(tdir: str, block: bool, merged: bool, out: Path) -> list[dict[str, Any]]:
    """What one task folder can be deployed as, each with the command that loads it (see mtlora.deploy)."""
    if block:
        return [artifact(FORM_BUNDLE, tdir, out)]
    return [artifact(FORM_PEFT, tdir, out)] + (
        [artifact(FORM_MERGED, f"{tdir}/merged", out)] if merged else []
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def build_parser(prog: str = "mtlora export") -> argparse.ArgumentParser:
    from mtlora.cli_args import Parser, add_adapter, add_data, add_model, add_output, add_runtime

    p = Parser(
        prog=prog,
        description="Export an mtlora adapter per task (static routing): a plain peft LoRA (component level; "
        "optionally a merged full model) or a block-adapter bundle (block level), each with its tokenizer and a "
        "model card, and a report of the forms, their load commands and the routed vs exported accuracy.",
    )
    p.add_argument(
        "adapter_pos",
        nargs="?",
        default=None,
        metavar="ADAPTER_DIR",
        help="mtlora adapter folder (e.g. OUTPUT/sft_lora_model); same as --adapter",
    )
    add_adapter(
        p, dest="adapter_dir", help="mtlora adapter folder (or give it as the positional ADAPTER_DIR)"
    )
    add_output(p, help="where X/<task>/ and X/report.json go")
    add_model(p, help="base model (default: the adapter's recorded one)")
    add_data(
        p,
        aliases=("--calibration_data",),
        dest="calibration_data",
        help="records file/dir (task_type per record) to estimate each task's mean routing; required for token "
        "routers",
    )
    p.add_argument(
        "--eval_data", default=None, help="records for the report (default: held-out calibration records)"
    )
    p.add_argument(
        "--merged", action="store_true", help="also save base + static delta per task under X/<task>/merged"
    )
    p.add_argument("--tasks", default=None, help="comma-separated subset of tasks to export (default: all)")
    p.add_argument(
        "--max_calibration_per_task", type=int, default=64, help="calibration records per task (routing mean)"
    )
    p.add_argument("--max_eval_per_task", type=int, default=16, help="evaluation records per task (report)")
    p.add_argument("--eval_fraction", type=float, default=0.2, help="held-out share of calibration records")
    p.add_argument("--no_eval", action="store_true", help="skip the routed vs exported evaluation")
    p.add_argument("--max_seq_length", type=int, default=512, help="tokens per record (longer are cut)")
    p.add_argument("--template", default="paper", choices=("paper", "chat"), help="prompt template")
    p.add_argument("--batch_size", type=int, default=8, help="records per forward pass")
    p.add_argument("--max_new_tokens", type=int, default=64, help="generation budget of the evaluation")
    add_runtime(p, dtype_default="float32", dtype_choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--push_to_hub",
        default=None,
        metavar="REPO",
        help="after a complete export, upload the output folder (every task, report, model cards) to this Hub "
        "model repo (owner/name) with huggingface_hub",
    )
    p.add_argument("--hub_private", action="store_true", help="with --push_to_hub: create the repo private")
    add_quantization_arguments(p)
    add_safety_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mtlora.cli_args import apply_runtime

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.adapter_pos and args.adapter_dir and args.adapter_pos != args.adapter_dir:
        raise MtLoraError("give the adapter once: positional ADAPTER_DIR or --adapter, not both")
    args.adapter_dir = args.adapter_dir or args.adapter_pos
    if not args.adapter_dir:
        raise MtLoraError("--adapter (or the positional ADAPTER_DIR) is required")
    for name in (
        "max_calibration_per_task",
        "max_eval_per_task",
        "batch_size",
        "max_new_tokens",
        "max_seq_length",
    ):
        if getattr(args, name) < 1:
            raise MtLoraError(f"--{name} must be >= 1")
    apply_runtime(args)
    if args.push_to_hub:  # an impossible push (offline, bad repo id) fails before any work
        from mtlora.publish import check_push_target

        check_push_target(args.push_to_hub)
    device = args.device or default_device()
    report = export_adapter(
        args.adapter_dir,
        args.output_dir,
        model_name_or_path=args.model_name_or_path,
        calibration_data=args.calibration_data,
        eval_data=args.eval_data,
        merged=args.merged,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        max_calibration_per_task=args.max_calibration_per_task,
        max_eval_per_task=args.max_eval_per_task,
        eval_fraction=args.eval_fraction,
        evaluate=not args.no_eval,
        max_seq_length=args.max_seq_length,
        template=args.template,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=device,
        dtype=args.dtype,
        quantization=quantization_from_args(args),
        overwrite=args.overwrite_output_dir,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"{report['method']} ({report['level']}) -> {report['export_format']} in {args.output_dir}")
    for task, e in report["tasks"].items():
        if "skipped" in e:
            print(f"  {task:<24} skipped: {e['skipped']}")
            continue
        line = f"  {task:<24} {e['dir']}"
        if "routed" in e:
            r, x = e["routed"], e["exported"]
            line += f"  acc routed {_fmt(r['accuracy'])} exported {_fmt(x['accuracy'])}"
            line += f"  nll routed {_fmt(r['nll'])} exported {_fmt(x['nll'])} base {_fmt(e['base']['nll'])}"
        print(line)
    for task, e in report["tasks"].items():  # per task: each form written and the command that loads it
        for a in e.get("artifacts", []):
            print(f"  {task} -> {FORM_TITLES[a['form']]} in {a['path']}/\n      load: {a['load_command']}")
    print(f"report: {Path(args.output_dir) / REPORT_NAME}")
    if args.push_to_hub:
        from mtlora.publish import push_folder

        url = push_folder(args.output_dir, args.push_to_hub, private=args.hub_private or None)
        print(f"pushed {args.output_dir} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
