"""Generation speed of a block-adapter bundle (mtlora export, block level) vs the unadapted base model.

A bundle is served as the plain Hugging Face base plus one forward hook per adapted block (the bundle's own
``load_block_export.py``), so what it costs at inference is the hooks' extra low-rank GEMMs and Python
overhead. This script times greedy ``model.generate`` (batch of prompts, fixed number of new tokens, KV
cache) for three models built on the same random-initialised LLaMA-shaped base, round-robin in one process:

* ``base``: the unadapted base model;
* ``bundle``: the base with an exported bundle attached (block FFN + fine-grained routing, the paper's main
  configuration, rank 16, 16 experts collapsed to one static B per block);
* ``routed``: the same adapter run by mtlora itself (router + 16 experts per block), for reference.

Reported: tokens/s of each (new tokens x batch / median wall time) and the ratios ``bundle / base`` and
``routed / base``. Default shapes suit a 2-core CPU; on a GPU pass ``--device cuda --dtype bfloat16`` and
LLaMA-7B shapes (``--hidden 4096 --inter 11008 --heads 32 --layers 32``).

Writes ``benchmarks/results/bundle_speed.json``; the last line is
``base_tok_s=<x> bundle_tok_s=<y> bundle_vs_base=<ratio> routed_vs_base=<ratio>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# before torch starts its thread pool: spinning OpenMP waiters make a shared CPU crawl (8x slower generate
# measured on 2 busy cores); a user's value wins
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from train_step import build_base  # noqa: E402

from mtlora import MtLoraConfig, get_mtlora_model  # noqa: E402
from mtlora.bundle import load_block_export  # noqa: E402
from mtlora.export import export_block_adapter  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--group_size", type=int, default=None, help="FGR group size (default hidden // 2)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_common.DTYPES))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bundle_speed.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = _common.resolve_device(args.device), _common.resolve_dtype(args.dtype)
    shape = (args.hidden, args.inter, args.layers, args.heads, args.vocab)
    base = build_base(*shape, device, dtype).eval()
    cfg = MtLoraConfig(
        method="mtlora", lora_rank=args.rank, lora_nums=args.experts, lora_dropout=0.0, enable_block_adapter=True,
        block_adapter_type="ffn", enable_fine_grained_routing=True,
        routing_group_size=args.group_size or args.hidden // 2, adapter_dtype=args.dtype,
    )  # fmt: skip
    routed = get_mtlora_model(build_base(*shape, device, dtype), cfg).eval()
    gen = torch.Generator().manual_seed(0)
    routing = {}
    with torch.no_grad():
        for name, a in routed.named_adapters():
            a.lora_B.copy_((torch.randn(a.lora_B.shape, generator=gen) * 0.02).to(a.lora_B))
            probs = torch.softmax(torch.randn(a.num_groups, a.num_experts, generator=gen), dim=-1)
            routing[name] = probs
    bundled = build_base(*shape, device, dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_block_adapter(routed, routing, tmp, base_model_name_or_path="random-llama")
        handles = load_block_export(bundled, tmp)

    torch.manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_tokens), device=device)
    mask = torch.ones_like(ids)

    def run(model) -> None:
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip

    fns = {"base": lambda: run(base), "bundle": lambda: run(bundled), "routed": lambda: run(routed)}
    timings = _common.time_interleaved(fns, repeats=args.repeats, warmup=1, device=device)
    tokens = args.batch * args.new_tokens
    tok_s = {k: tokens / t.median_s for k, t in timings.items()}
    result = {
        "benchmark": "bundle_speed",
        "settings": vars(args),
        "machine": _common.machine_info(device),
        "hooks": len(handles),
        "results": {k: {"tokens_per_s": round(tok_s[k], 2), **timings[k].as_dict()} for k in timings},
        "bundle_vs_base": round(tok_s["bundle"] / tok_s["base"], 4),
        "routed_vs_base": round(tok_s["routed"] / tok_s["base"], 4),
    }
    _common.write_json(args.out, result)
    print(
        f"base_tok_s={tok_s['base']:.2f} bundle_tok_s={tok_s['bundle']:.2f} "
        f"bundle_vs_base={result['bundle_vs_base']:.4f} routed_vs_base={result['routed_vs_base']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
