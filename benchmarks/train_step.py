"""Training-step time and peak memory of lora / hydralora / block-FFN / block-FFN+FGR / full mtLoRA.

One optimizer step (forward, backward, AdamW on the adapter parameters) of an MtLoraModel built on a
random-initialised LLaMA-shaped model, for each method in turn, in the same process. Reported
as ratios to HydraLoRA (the paper claims mtLoRA needs 24% less training time than HydraLoRA).

Default (CPU): one LLaMA-2-7B-shaped decoder layer (d=4096, d_ff=11008, 32 heads), 512 tokens, fp32 — the
largest shapes this 2-core machine runs in reasonable time. ``--quick``: d=1024, 2 layers, 256 tokens.
GPU: ``--device cuda --dtype bfloat16 --layers 32 --tokens 2048`` is a full LLaMA-2-7B-shaped model.

Writes ``benchmarks/results/train_step.json``; the last line is
``hydralora_s=<t> mtlora_s=<t> mtlora_vs_hydralora_time=<ratio> mtlora_vs_hydralora_memory=<ratio>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from mtlora import MtLoraConfig, get_mtlora_model  # noqa: E402

R, E = 16, 16
METHODS: dict[str, dict[str, Any]] = {
    "lora": dict(method="lora"),
    "hydralora": dict(method="hydralora"),
    "block_ffn": dict(method="mtlora", enable_block_adapter=True, block_adapter_type="ffn"),
    "block_ffn_fgr": dict(
        method="mtlora", enable_block_adapter=True, block_adapter_type="ffn", enable_fine_grained_routing=True
    ),
    "mtlora_full": dict(
        method="mtlora", enable_block_adapter=True, block_adapter_type="ffn", enable_fine_grained_routing=True,
        enable_blc=True, enable_spectral_reg=True, spectral_reg_lambda=1.0,
    ),
}  # fmt: skip


def build_base(
    hidden: int, inter: int, layers: int, heads: int, vocab: int, device: torch.device, dtype: torch.dtype
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def make_step(
    name: str, base, ids: torch.Tensor, gs: int, device: torch.device, autocast: torch.dtype | None
):
    """A closure running one training step of ``name``; returns (step_fn, trainable_params, cleanup_fn)."""
    from mtlora.losses import SpectralRegularizer

    kw = dict(METHODS[name], lora_rank=R, lora_nums=E, lora_alpha=64, lora_dropout=0.05)
    if kw.get("enable_fine_grained_routing"):
        kw["routing_group_size"] = gs
    cfg = MtLoraConfig(**kw)
    model = get_mtlora_model(base, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    reg = SpectralRegularizer(cfg) if cfg.enable_spectral_reg else None
    state = {"step": 0}

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
            if reg is not None:
                loss = loss + reg(model, state["step"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    return step, sum(p.numel() for p in params), model.unload


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _common.resolve_device(args.device)
    dtype = _common.resolve_dtype(args.dtype)
    if args.quick:
        args.hidden, args.inter, args.layers, args.heads, args.tokens = 1024, 2752, 2, 8, 256
    base = build_base(args.hidden, args.inter, args.layers, args.heads, args.vocab, device, dtype)
    base.config.use_cache = False
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), device=device)
    gs = args.hidden // 2
    autocast = dtype if dtype != torch.float32 else None
    results: dict[str, Any] = {}
    for name in args.methods:
        step, trainable, cleanup = make_step(name, base, ids, gs, device, autocast)
        timing = _common.time_interleaved({name: step}, repeats=args.repeats, warmup=1, device=device)[name]
        peak, method = _common.peak_extra_memory(step, device)
        results[name] = {
            "trainable_params": trainable,
            "step_s": timing.median_s,
            "tokens_per_s": args.batch * args.tokens / timing.median_s,
            "peak_extra_bytes": peak,
            "memory_method": method,
            "times_s": timing.times_s,
        }
        print(
            f"{name:>14}: {timing.median_s * 1000:9.1f} ms/step  {results[name]['tokens_per_s']:9.0f} tok/s  "
            f"peak +{peak / 2**20:8.1f} MiB  trainable {trainable:,d}",
            flush=True,
        )
        cleanup()
    ref = results.get("hydralora")
    if ref:
        for r in results.values():
            r["time_vs_hydralora"] = r["step_s"] / ref["step_s"]
            r["memory_vs_hydralora"] = r["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1)
    return {
        "benchmark": "train_step",
        "config": {
            "hidden": args.hidden,
            "intermediate": args.inter,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": args.vocab,
            "batch": args.batch,
            "tokens": args.tokens,
            "rank": R,
            "experts": E,
            "routing_group_size": gs,
            "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing,
            "repeats": args.repeats,
            "quick": args.quick,
        },  # fmt: skip
        "machine": _common.machine_info(device),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="d=1024, 2 layers, 256 tokens (about a minute on CPU)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_common.DTYPES))
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=11008)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument(
        "--vocab", type=int, default=512, help="small by default: the LM head is not what we measure"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.json"))
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s): {', '.join(sorted(unknown))}")
    data = run(args)
    _common.write_json(args.out, data)
    res = data["results"]
    if "hydralora" in res and "mtlora_full" in res:
        h, m = res["hydralora"], res["mtlora_full"]
        print(
            f"hydralora_s={h['step_s']:.4f} mtlora_s={m['step_s']:.4f} "
            f"mtlora_vs_hydralora_time={m['time_vs_hydralora']:.3f} "
            f"mtlora_vs_hydralora_memory={m['memory_vs_hydralora']:.3f}"
        )
    else:
        print(" ".join(f"{k}_s={v['step_s']:.4f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
