"""Peak memory of one training step on a 16-bit vs 8-bit vs 4-bit (QLoRA) base, in one run, as ratios.

The base is a random-initialised LLaMA-shaped model, saved once in bf16 and loaded through the same path as
``mtlora train --load_in_kbits K`` (``BitsAndBytesConfig`` from :mod:`mtlora.quant`, then
``prepare_for_kbit_training``), with the same adapter on every base. One step = forward, backward, AdamW
on the adapter parameters, under autocast in the compute dtype (bf16 by default, as ``--bf16`` trains).

Reported per base, in bytes:

* ``base_weights``: everything the frozen base stores (parameters, buffers and bitsandbytes' quantization
  state: absmax, nested statistics, code books, LLM.int8 row scales); ``bytes_per_linear_weight`` is the
  decoder linears' share of it per weight (2 in bf16, ~1.0 in 8 bit, ~0.52 in NF4 + double quant), the
  number that scales to a whole model;
* ``adapter_and_optimizer``: trainable adapter parameters, their gradients and AdamW's two moments;
* ``step_extra``: the extra peak while the step runs (activations kept for backward, temporaries such as
  the dequantized weight a 4-bit matmul needs) - ``benchmarks/_common.peak_extra_memory``;
* ``peak`` = the sum: what the step needs at its worst moment. ``peak_vs_16bit`` and
  ``base_weights_vs_16bit`` are the ratios.

Default (CPU): one LLaMA-2-7B-shaped decoder layer (d=4096, d_ff=11008, 32 heads), 128 tokens, the
paper's mtLoRA (block FFN + FGR, r=16, E=16). ``--quick``: d=1024, 2 layers, 128 tokens. GPU (see
``gpu_check.sh``): ``--device cuda --layers 32 --vocab 32000 --tokens 1024`` is a full LLaMA-2-7B.

Writes ``benchmarks/results/qlora_memory.json``; the last line is
``peak_16bit_gib=<x> peak_8bit_gib=<x> peak_4bit_gib=<x> peak_8bit_vs_16bit=<r> peak_4bit_vs_16bit=<r>``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from mtlora import MtLoraConfig, get_mtlora_model  # noqa: E402
from mtlora.quant import Quantization, from_pretrained_kwargs, prepare_for_kbit_training  # noqa: E402

R, E = 16, 16
ADAPTERS: dict[str, dict[str, Any]] = {
    "mtlora": dict(method="mtlora", enable_block_adapter=True, block_adapter_type="ffn",
                   enable_fine_grained_routing=True, enable_blc=True),
    "hydralora": dict(method="hydralora", enable_blc=True),
    "lora": dict(method="lora"),
}  # fmt: skip


def save_base(folder: Path, hidden: int, inter: int, layers: int, heads: int, vocab: int) -> None:
    """A random LLaMA-shaped model written as bf16 safetensors (what a downloaded checkpoint looks like)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():  # the usual init, done here because to_empty leaves memory uninitialised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range)
    model.save_pretrained(folder)
    del model
    gc.collect()


def _storages(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _quant_state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """bitsandbytes keeps absmax/statistics beside the packed weight, outside parameters and buffers."""
    out: list[torch.Tensor] = []
    weight = getattr(module, "weight", None)
    qs = getattr(weight, "quant_state", None)
    if qs is not None:
        stack: list[Any] = list(qs.as_dict().values())
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
    for holder in (
        weight,
        getattr(module, "state", None),
    ):  # LLM.int8 moves CB/SCB to module.state on first use
        for attr in ("SCB", "CB"):
            t = getattr(holder, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def base_weight_bytes(model: torch.nn.Module) -> int:
    tensors = [p for n, p in model.named_parameters() if ".mtlora." not in f".{n}"]
    tensors += [b for n, b in model.named_buffers() if ".mtlora." not in f".{n}"]
    for m in model.modules():
        tensors += _quant_state_tensors(m)
    return _storages(tensors)


def measure(
    folder: Path, kbits: int, adapter: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    quant = Quantization(load_in_kbits=kbits)
    base = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, **from_pretrained_kwargs(quant, dtype, str(device))
    )
    if quant.enabled:
        base = prepare_for_kbit_training(base)
    else:
        base.to(device)
    base.config.use_cache = False
    kw = dict(ADAPTERS[adapter], lora_rank=R, lora_nums=E, lora_alpha=64, lora_dropout=0.05)
    if kw.get("enable_fine_grained_routing"):
        kw["routing_group_size"] = args.hidden // 2
    model = get_mtlora_model(base, MtLoraConfig(**kw))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), device=device)
    autocast = dtype != torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop

    step()  # warm-up: AdamW's moments and the gradient buffers now exist
    timing = _common.time_fn(step, repeats=args.repeats, warmup=0, device=device)
    extra, method = _common.peak_extra_memory(step, device)
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in params if p.grad is not None]
    adapter_bytes = _storages(params + grads + state)
    weights = base_weight_bytes(model.base_model)
    linears = [
        m
        for n, m in model.base_model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".mtlora" not in n and not n.endswith("lm_head")
    ]
    n_linear = sum(m.in_features * m.out_features for m in linears)
    linear_bytes = _storages(
        [t for m in linears for t in [*m.parameters(recurse=False), *_quant_state_tensors(m)]]
    )
    result = {
        "load_in_kbits": kbits,
        "quantization": quant.describe(),
        "base_weights": weights,
        "adapter_and_optimizer": adapter_bytes,
        "step_extra": extra,
        "peak": weights + adapter_bytes + extra,
        "decoder_linear_params": n_linear,
        "decoder_linear_bytes": linear_bytes,
        "trainable_params": sum(p.numel() for p in params),
        "step_s": timing.median_s,
        "memory_method": method,
    }
    model.unload()
    return result  # the models and optimizer go with this frame; run() collects them before the next base


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _common.resolve_device(args.device)
    dtype = _common.resolve_dtype(args.dtype)
    if args.quick:
        args.hidden, args.inter, args.layers, args.heads, args.tokens = 1024, 2752, 2, 8, 128
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qlora_memory_") as tmp:
        save_base(Path(tmp), args.hidden, args.inter, args.layers, args.heads, args.vocab)
        for kbits in args.kbits:
            r = measure(Path(tmp), kbits, args.adapter, args, device, dtype)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results[f"{kbits}bit"] = r
            print(
                f"{kbits:>2}-bit base: weights {r['base_weights'] / 2**20:9.1f} MiB  adapter+opt "
                f"{r['adapter_and_optimizer'] / 2**20:7.1f} MiB  step +{r['step_extra'] / 2**20:8.1f} MiB  "
                f"peak {r['peak'] / 2**20:9.1f} MiB  ({r['step_s']:.2f} s/step)",
                flush=True,
            )
    ref = results.get("16bit")
    for r in results.values():
        # what a decoder weight costs (packed data + scales): the number that scales to a whole 7B/13B model
        r["bytes_per_linear_weight"] = r["decoder_linear_bytes"] / max(r["decoder_linear_params"], 1)
        if ref:
            r["peak_vs_16bit"] = r["peak"] / ref["peak"]
            r["base_weights_vs_16bit"] = r["base_weights"] / ref["base_weights"]
    return {
        "benchmark": "qlora_memory",
        "config": {
            "hidden": args.hidden,
            "intermediate": args.inter,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": args.vocab,
            "batch": args.batch,
            "tokens": args.tokens,
            "dtype": args.dtype,
            "adapter": args.adapter,
            "rank": R,
            "experts": E,
            "gradient_checkpointing": args.gradient_checkpointing,
            "quick": args.quick,
        },  # fmt: skip
        "machine": _common.machine_info(device),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d=1024, 2 layers, 128 tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="bfloat16", choices=sorted(_common.DTYPES), help="16-bit storage and compute dtype"
    )
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=11008)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512, help="small by default: one layer is what we measure")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed steps (memory is from one more)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--adapter", default="mtlora", choices=sorted(ADAPTERS))
    p.add_argument(
        "--kbits", default="16,8,4", help="comma list of 16, 8, 4 (16 first: the ratios' reference)"
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "qlora_memory.json"))
    args = p.parse_args(argv)
    try:
        args.kbits = [int(k) for k in args.kbits.split(",") if k.strip()]
    except ValueError:
        p.error(f"--kbits {args.kbits!r}: expected a comma list of 16, 8, 4")
    if not args.kbits or any(k not in (4, 8, 16) for k in args.kbits):
        p.error(f"--kbits {args.kbits}: use 16, 8 and/or 4")
    data = run(args)
    _common.write_json(args.out, data)
    res = data["results"]
    gib = {k: v["peak"] / 2**30 for k, v in res.items()}
    line = " ".join(f"peak_{k}_gib={v:.3f}" for k, v in gib.items())
    line += "".join(
        f" peak_{k}_vs_16bit={v['peak_vs_16bit']:.3f}"
        for k, v in res.items()
        if "peak_vs_16bit" in v and k != "16bit"
    )
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
