"""Where adapters go, and how they are attached - without touching any library class.

Both placements attach a :class:`~mtlora.layers.MultiExpertLoRA` as a child module named ``mtlora`` of a
*host* module and register a forward hook on that host instance that adds the adapter's output:

* **component level** - host = a target ``nn.Linear`` (``q_proj``, ``v_proj`` ...): ``y = W x + Delta(x)``;
* **block level** - host = a decoder layer's attention block (``self_attn``) and/or MLP block (``mlp``):
  the hook reads the block's input, which in every supported architecture is the output of the block's
  pre-norm, and adds ``Delta(LN(h))`` to the block output, so the residual update becomes
  ``h' = h + F(LN(h)) + Delta(LN(h))``. (Gemma-2/3 also normalise the block output; there the adapter sits
  inside that post-norm, like the block's own output.)

Hooks are public PyTorch API, per instance, removable: wrapping is reversible (``detach_all``) and
idempotent (a host that already carries an adapter is not wrapped twice). Base parameter names are
unchanged, so a model can still be saved/loaded/merged as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mtlora.errors import PlacementError

ADAPTER_ATTR = "mtlora"
_HANDLE_ATTR = "_mtlora_hook_handle"

# model_type -> default component targets (peft-style constants). Everything else: q_proj, v_proj.
DEFAULT_TARGETS: dict[str, list[str]] = {"phi3": ["qkv_proj"], "phi4": ["qkv_proj"]}
FALLBACK_TARGETS = ["q_proj", "v_proj"]
BLOCK_ATTRS = {"attention": ("self_attn",), "ffn": ("mlp",), "both": ("self_attn", "mlp")}


def default_target_modules(model: nn.Module) -> list[str]:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    return list(DEFAULT_TARGETS.get(str(model_type), FALLBACK_TARGETS))


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def find_component_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` whose qualified name equals or ends with ``.<target>``; error if none match."""
    found: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if f".{ADAPTER_ATTR}." in f".{name}." or not name:
            continue
        if _matches(name, targets):
            if not isinstance(module, nn.Linear):
                raise PlacementError(
                    f"target module {name!r} is a {type(module).__name__}, not torch.nn.Linear; "
                    "component-level adapters wrap nn.Linear modules only"
                )
            found.append((name, module))
    if not found:
        linear_names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise PlacementError(
            f"no nn.Linear in {type(model).__name__} matches target_modules={targets}; "
            f"linear module names in this model: {', '.join(linear_names) or '(none)'}"
        )
    return found


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers (each with ``self_attn`` and ``mlp``)."""
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            first = module[0]
            if hasattr(first, "self_attn") or hasattr(first, "mlp"):
                candidates.append((name, module))
    for name, layers in candidates:
        for i, layer in enumerate(layers):
            for attr in ("self_attn", "mlp"):
                if not isinstance(getattr(layer, attr, None), nn.Module):
                    raise PlacementError(
                        f"cannot place block adapters into {type(model).__name__}: decoder layer "
                        f"{name}.{i} ({type(layer).__name__}) has no '{attr}' sub-module"
                    )
        return name, layers
    raise PlacementError(
        f"cannot place block adapters into {type(model).__name__}: found no decoder-layer list whose "
        "layers have 'self_attn' and 'mlp' sub-modules (supported: Llama, Mistral, Qwen2/3, Gemma/Gemma2/3, Phi-3 "
        "and other decoder-only models of the same layout)"
    )


def hidden_size_of(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    size = getattr(cfg, "hidden_size", None)
    if not isinstance(size, int):
        raise PlacementError(f"cannot find hidden_size in the config of {type(model).__name__}")
    return size


def find_block_hosts(model: nn.Module, block_type: str) -> list[tuple[str, nn.Module]]:
    prefix, layers = find_decoder_layers(model)
    hosts = []
    for i, layer in enumerate(layers):
        for attr in BLOCK_ATTRS[block_type]:
            hosts.append((f"{prefix}.{i}.{attr}", getattr(layer, attr)))
    return hosts


# ---------------------------------------------------------------------- hooks
def _component_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    adapter = getattr(module, ADAPTER_ATTR)
    if not adapter.state.enabled:
        return output
    return adapter(args[0], base=output)  # = output + Delta(x), accumulated in the adapter's last GEMM


def _block_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    adapter = getattr(module, ADAPTER_ATTR)
    if not adapter.state.enabled:
        return output
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else kwargs.get("x"))
    if x is None:
        raise PlacementError(f"{adapter.name}: could not find the block input (hidden_states) in the call")
    if isinstance(output, tuple):
        return (adapter(x, base=output[0]),) + tuple(output[1:])
    if isinstance(output, torch.Tensor):
        return adapter(x, base=output)
    raise PlacementError(f"{adapter.name}: unsupported block output type {type(output).__name__}")


def attach(host: nn.Module, adapter: nn.Module, *, block: bool) -> None:
    """Attach ``adapter`` to ``host`` (child module + forward hook). The host must not carry one already."""
    if hasattr(host, ADAPTER_ATTR):
        raise PlacementError(f"{getattr(adapter, 'name', '?')}: module already carries an mtlora adapter")
    host.add_module(ADAPTER_ATTR, adapter)
    handle: RemovableHandle
    if block:
        handle = host.register_forward_hook(_block_hook, with_kwargs=True)
    else:
        handle = host.register_forward_hook(_component_hook)
    object.__setattr__(host, _HANDLE_ATTR, handle)


def detach(host: nn.Module) -> None:
    handle = getattr(host, _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
        object.__delattr__(host, _HANDLE_ATTR)
    if ADAPTER_ATTR in host._modules:
        del host._modules[ADAPTER_ATTR]


def iter_hosts(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(host name, host module, adapter) for every attached adapter, in module order."""
    for name, module in model.named_modules():
        adapter = module._modules.get(ADAPTER_ATTR) if hasattr(module, "_modules") else None
        if adapter is not None and hasattr(module, _HANDLE_ATTR):
            yield name, module, adapter
