"""Cost of the spectral regularizer's weights: an r×r eigh of every expert's Gram matrix, at every step.

The default ``--spectral_reg_mode spectral`` weights each direction by the singular values of the *current* B,
so every application eigen-decomposes ``BᵀB`` (r × r) for every expert matrix. This measures what that costs
next to the rest of the term, for LLaMA-7B's block-level FFN adapters by default: 32 layers × 16 experts = 512
matrices B ∈ R^{4096 × 16}. Only the adapters are built (no base model): the regularizer sees exactly the
parameters it sees in training.

Timed, each as the median of ``--repeats`` interleaved runs (``_common.time_interleaved``):

* ``eigh``: the weights alone - ``weights_from_gram`` (float64 eigh) on all detached Gram matrices in one
  batched call, as the regularizer does it;
* ``eigh_per_module``: the same eigh as one batched call per adapter module (32 calls of 16 matrices), the
  layout the regularizer used before batching across modules;
* ``grams_only``: the Gram matrices ``B_eᵀB_e`` alone (no gradient);
* ``term_cached_w``: the rest of the term - Gram matrices, ``‖W D W‖²``, backward to the B's - with weights
  computed beforehand (``--spectral_reg_refresh_steps``, between refreshes);
* ``term_fresh_w``: the default mode end to end (Gram, eigh, term, backward), what a training step pays;
* ``term_uniform``: ``--spectral_reg_mode uniform`` (w = 1), for reference.

Writes ``benchmarks/results/spectral_cost.json`` (``--out``); the last line is
``matrices=<n> eigh_ms=<t> term_cached_w_ms=<t> term_fresh_w_ms=<t> eigh_share=<eigh / fresh>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from mtlora import MtLoraConfig  # noqa: E402
from mtlora.layers import MultiExpertLoRA  # noqa: E402
from mtlora.losses import SpectralRegularizer, expert_grams, weights_from_gram  # noqa: E402


def build_adapters(
    layers: int, experts: int, rank: int, hidden: int, device: torch.device, dtype: torch.dtype
) -> torch.nn.ModuleList:
    """``layers`` block-level adapters (d_in = d_out = hidden), B ~ N(0, 0.02²) as after some training."""
    torch.manual_seed(0)
    mods = torch.nn.ModuleList(
        MultiExpertLoRA(
            hidden, hidden, rank, experts, router="token", name=f"layers.{i}.mlp", device=device, dtype=dtype
        )
        for i in range(layers)
    )
    with torch.no_grad():
        for m in mods:
            m.lora_B.normal_(std=0.02)
    return mods


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _common.resolve_device(args.device)
    dtype = _common.resolve_dtype(args.dtype)
    if args.quick:
        args.layers, args.hidden = 4, 1024
    mods = build_adapters(args.layers, args.experts, args.rank, args.hidden, device, dtype)
    experts = list(range(args.experts))

    def cfg(**kw: Any) -> MtLoraConfig:
        return MtLoraConfig(
            method="mtlora", lora_rank=args.rank, lora_nums=args.experts, enable_spectral_reg=True, **kw
        )

    fresh = SpectralRegularizer(cfg())
    cached = SpectralRegularizer(cfg(spectral_reg_refresh_steps=10**9))
    uniform = SpectralRegularizer(cfg(spectral_reg_mode="uniform"))
    cached(mods, global_step=0)  # computes and caches W (B is non-zero): later calls reuse it

    def eigh_per_module() -> None:
        with torch.no_grad():
            for m in mods:
                weights_from_gram(expert_grams(m, experts))

    grams = torch.cat([expert_grams(m, experts).detach() for m in mods])

    def eigh_one_batch() -> None:
        weights_from_gram(grams)

    def grams_only() -> None:
        with torch.no_grad():
            for m in mods:
                expert_grams(m, experts)

    def term(reg: SpectralRegularizer) -> Any:
        def fn() -> None:
            for m in mods:
                m.lora_B.grad = None
            reg(mods, global_step=1).backward()

        return fn

    fns = {
        "eigh": eigh_one_batch,
        "eigh_per_module": eigh_per_module,
        "grams_only": grams_only,
        "term_cached_w": term(cached),
        "term_fresh_w": term(fresh),
        "term_uniform": term(uniform),
    }
    timings = _common.time_interleaved(fns, repeats=args.repeats, warmup=1, device=device)
    ms = {k: round(t.median_s * 1000, 3) for k, t in timings.items()}
    for k, v in ms.items():
        print(f"{k:>16}: {v:10.3f} ms", flush=True)
    n = args.layers * args.experts
    return {
        "benchmark": "spectral_cost",
        "config": {
            "layers": args.layers,
            "experts": args.experts,
            "matrices": n,
            "rank": args.rank,
            "hidden": args.hidden,
            "dtype": args.dtype,
            "eigh_dtype": "float64",
            "repeats": args.repeats,
            "quick": args.quick,
        },
        "machine": _common.machine_info(device),
        "median_ms": ms,
        "times_s": {k: t.times_s for k, t in timings.items()},
        "eigh_share_of_fresh_term": ms["eigh"] / ms["term_fresh_w"] if ms["term_fresh_w"] else None,
        "fresh_vs_cached": ms["term_fresh_w"] / ms["term_cached_w"] if ms["term_cached_w"] else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 layers, d=1024 (a few seconds on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_common.DTYPES))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--out", default=None, help="default: results/spectral_cost.json (_quick.json with --quick)"
    )
    args = p.parse_args(argv)
    data = run(args)
    name = "spectral_cost_quick.json" if args.quick else "spectral_cost.json"
    if args.device != "cpu" and not args.quick:
        name = f"spectral_cost_{torch.device(args.device).type}.json"
    out = args.out or str(Path(__file__).resolve().parent / "results" / name)
    _common.write_json(out, data)
    ms = data["median_ms"]
    print(
        f"matrices={data['config']['matrices']} eigh_ms={ms['eigh']:.3f} term_cached_w_ms={ms['term_cached_w']:.3f} "
        f"term_fresh_w_ms={ms['term_fresh_w']:.3f} eigh_share={data['eigh_share_of_fresh_term']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
