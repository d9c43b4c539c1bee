"""Convert checkpoints into Hugging Face format: ``mtlora convert llama2c CHECKPOINT.bin TOKENIZER.model OUT``.

Why this exists: the bundled tiny model (``mtlora:stories260k``) comes from Andrej Karpathy's llama2.c, whose
``.bin`` files are raw float arrays. Tests and the demo need a real ``LlamaForCausalLM`` folder that
``from_pretrained`` loads offline, so we convert once and ship the result as package data.

Supported ``.bin`` layouts (all little-endian, as written by llama2.c's ``export.py`` on x86):

* version 0 ("legacy"): 7 int32 header ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
  max_seq_len`` (a negative ``vocab_size`` means the classifier is *not* shared with the embedding), then
  fp32 tensors: embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, two RoPE
  tables (ignored: Hugging Face recomputes them), classifier if unshared.
* version 1: 256-byte header starting with magic ``"ak42"``, version, the 7 ints, a shared-classifier byte;
  fp32 tensors: all norms first, then embedding, wq, wk, wv, wo, w1, w2, w3, classifier if unshared.
* version 2: like version 1 plus an int32 ``group_size`` in the header; norms in fp32, the other tensors
  Q8_0-quantised (per matrix, each layer separately: int8 values, then one fp32 scale per group); we
  dequantise them to fp32.

Two things differ between llama2.c and Hugging Face Llama and are handled here:

* RoPE pairing: llama2.c rotates adjacent pairs ``(2i, 2i+1)`` of each head, HF rotates ``(i, i + d/2)``.
  We permute the rows of ``wq``/``wk`` head by head so the attention scores are identical.
* the tokenizer: llama2.c ships a SentencePiece ``.model``; with transformers 5 it must be placed as
  ``tokenizer.model`` next to a ``tokenizer_config.json`` naming ``LlamaTokenizer`` (constructing
  ``LlamaTokenizer(vocab_file=...)`` directly silently yields a 3-token vocabulary).

Generation stops on EOS or BOS (``generation_config.json`` has ``eos_token_id: [2, 1]``): llama2.c models
end a story by starting the next one with BOS, and llama2.c's sampler stops there.

Pad token decision: the written tokenizer uses ``<unk>`` (id 0) as pad. ``<unk>`` never occurs in encoded
text (the tokenizer has byte fallback), so masking labels by pad id cannot hide a real token; using EOS as
pad would mask the EOS labels and teach a fine-tuned model never to stop.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtlora.atomic import atomic_dir
from mtlora.errors import MtLoraError
from mtlora.hub import DTYPES, torch_dtype

__all__ = ["Llama2cHeader", "read_llama2c_checkpoint", "convert_llama2c", "main"]

_MAGIC = 0x616B3432  # "ak42" as a little-endian uint32 (llama2.c export.py versions 1 and 2)
_V1_HEADER_BYTES = 256
_LEGACY_HEADER_BYTES = 7 * 4
_ROPE_THETA = 10000.0  # llama2.c's precompute_freqs_cis default
_RMS_NORM_EPS = 1e-5  # llama2.c's RMSNorm eps


@dataclass(frozen=True)
class Llama2cHeader:
    """Model hyper-parameters read from a llama2.c ``.bin`` header."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool
    group_size: int = 0  # Q8_0 group size (version 2 only)
    header_bytes: int = _LEGACY_HEADER_BYTES

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def _read_header(path: Path, data: bytes) -> Llama2cHeader:
    """Parse and sanity-check the header, so a wrong file fails with a message instead of a reshape error."""
    if len(data) < _LEGACY_HEADER_BYTES:
        raise MtLoraError(
            f"{path}: truncated llama2.c checkpoint: expected at least {_LEGACY_HEADER_BYTES} header bytes, "
            f"got {len(data)} bytes"
        )
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == _MAGIC:
        if len(data) < _V1_HEADER_BYTES:
            raise MtLoraError(
                f"{path}: truncated llama2.c checkpoint: expected a {_V1_HEADER_BYTES}-byte header, "
                f"got {len(data)} bytes"
            )
        (version,) = struct.unpack_from("<i", data, 4)
        if version not in (1, 2):
            raise MtLoraError(
                f"{path}: llama2.c checkpoint version {version} is not supported (supported: 0 legacy, 1 fp32, "
                "2 Q8_0)"
            )
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = struct.unpack_from(
            "<7i", data, 8
        )
        shared = bool(data[36])
        group_size = struct.unpack_from("<i", data, 37)[0] if version == 2 else 0
        header_bytes = _V1_HEADER_BYTES
    else:
        version = 0
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = struct.unpack_from(
            "<7i", data, 0
        )
        shared = vocab_size > 0
        vocab_size = abs(vocab_size)
        group_size = 0
        header_bytes = _LEGACY_HEADER_BYTES

    fields = {
        "dim": dim,
        "hidden_dim": hidden_dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "vocab_size": vocab_size,
        "max_seq_len": max_seq_len,
    }
    bad = [f"{k}={v}" for k, v in fields.items() if not 0 < v <= 1 << 24]
    if (
        bad
        or dim % n_heads
        or n_heads % n_kv_heads
        or (dim // n_heads) % 2
        or (version == 2 and (group_size <= 0 or dim % group_size))
    ):
        detail = ", ".join(bad) or ", ".join(f"{k}={v}" for k, v in fields.items())
        raise MtLoraError(
            f"{path}: not a valid llama2.c checkpoint (version {version} header has {detail}"
            + (f", group_size={group_size}" if version == 2 else "")
            + "); expected dim divisible by n_heads, n_heads by n_kv_heads, and an even head size"
        )
    return Llama2cHeader(
        version=version,
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        shared_classifier=shared,
        group_size=group_size,
        header_bytes=header_bytes,
    )


def _tensor_shapes(h: Llama2cHeader) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes (torch ``(out, in)`` layout, stacked over layers) in file order for ``h.version``."""
    L, d, hd, kv = h.n_layers, h.dim, h.hidden_dim, h.kv_dim
    emb = ("tok_embeddings", (h.vocab_size, d))
    attn_norm, ffn_norm, norm = ("attention_norm", (L, d)), ("ffn_norm", (L, d)), ("norm", (d,))
    mats = [
        ("wq", (L, d, d)),
        ("wk", (L, kv, d)),
        ("wv", (L, kv, d)),
        ("wo", (L, d, d)),
    ]
    ffn = [("w1", (L, hd, d)), ("w2", (L, d, hd)), ("w3", (L, hd, d))]
    if h.version == 0:
        rope = h.max_seq_len * h.head_dim // 2
        shapes = [
            emb,
            attn_norm,
            *mats,
            ffn_norm,
            *ffn,
            norm,
            ("freq_cis_real", (rope,)),
            ("freq_cis_imag", (rope,)),
        ]
    else:
        shapes = [attn_norm, ffn_norm, norm, emb, *mats, *ffn]
    if not h.shared_classifier:
        shapes.append(("output", (h.vocab_size, d)))
    return shapes


_PER_LAYER = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _tensor_nbytes(h: Llama2cHeader, name: str, numel: int) -> int:
    if h.version == 2 and name not in ("attention_norm", "ffn_norm", "norm"):
        return numel + 4 * (numel // h.group_size)  # int8 values + fp32 scale per group
    return 4 * numel


def read_llama2c_checkpoint(checkpoint: str | Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a llama2.c ``.bin`` into its header and float32 tensors keyed by llama2.c names.

    Stacked per-layer tensors have a leading ``n_layers`` dimension. Sizes are checked against the header
    before any parsing, so a truncated download reports expected vs actual bytes.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise MtLoraError(f"llama2.c checkpoint not found: {path}")
    data = path.read_bytes()
    h = _read_header(path, data)
    shapes = _tensor_shapes(h)
    if h.version == 2:
        for name, shape in shapes:
            per_layer = int(np.prod(shape[1:] if name in _PER_LAYER else shape))
            if name not in ("attention_norm", "ffn_norm", "norm") and per_layer % h.group_size:
                raise MtLoraError(
                    f"{path}: tensor {name} {shape} is not a multiple of group_size {h.group_size}"
                )
    expected = h.header_bytes + sum(_tensor_nbytes(h, n, int(np.prod(s))) for n, s in shapes)
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "unexpected trailing data in"
        raise MtLoraError(
            f"{path}: {kind} llama2.c checkpoint (version {h.version}, dim={h.dim}, n_layers={h.n_layers}, "
            f"vocab_size={h.vocab_size}): expected {expected} bytes, got {len(data)} bytes"
        )

    tensors: dict[str, torch.Tensor] = {}
    offset = h.header_bytes
    for name, shape in shapes:
        numel = int(np.prod(shape))
        if h.version == 2 and name not in ("attention_norm", "ffn_norm", "norm"):
            # export.py quantises each layer's matrix on its own: (int8 values, scales) per layer, in order.
            n_chunks = h.n_layers if name in _PER_LAYER else 1
            chunk, n_scales = numel // n_chunks, numel // n_chunks // h.group_size
            pieces = []
            for _ in range(n_chunks):
                q = np.frombuffer(data, dtype=np.int8, count=chunk, offset=offset).astype(np.float32)
                offset += chunk
                scale = np.frombuffer(data, dtype="<f4", count=n_scales, offset=offset)
                offset += 4 * n_scales
                pieces.append((q.reshape(-1, h.group_size) * scale[:, None]).reshape(-1))
            arr = np.concatenate(pieces).reshape(shape)
        else:
            arr = np.frombuffer(data, dtype="<f4", count=numel, offset=offset).reshape(shape)
            offset += 4 * numel
        tensors[name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # copy: frombuffer is read-only
    return h, tensors


def _rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from llama2.c's interleaved RoPE pairs to HF's half-split pairs.

    Within a head, llama2.c rotates rows (0,1), (2,3), ...; HF's ``rotate_half`` rotates (0, d/2), (1, d/2+1),
    ... Applying the same permutation to q and k leaves every q.k score, hence the model, unchanged.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)
    )


def _hf_state_dict(h: Llama2cHeader, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["norm"]}
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["attention_norm"][i]
        sd[p + "self_attn.q_proj.weight"] = _rope_permute(t["wq"][i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _rope_permute(t["wk"][i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = t["ffn_norm"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    sd["lm_head.weight"] = t["tok_embeddings"] if h.shared_classifier else t["output"]
    return sd


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    """Fail early if the tokenizer is not a SentencePiece model matching the checkpoint and special ids."""
    if not path.is_file():
        raise MtLoraError(f"SentencePiece tokenizer not found: {path}")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise MtLoraError(
            f"{path}: not a SentencePiece .model file ({exc}); note llama2.c's tokenizer .bin (e.g. tok512.bin) "
            "is a different format: pass the matching .model"
        ) from None
    if sp.vocab_size() != vocab_size:
        raise MtLoraError(
            f"{path}: tokenizer has {sp.vocab_size()} pieces but the checkpoint's vocab_size is {vocab_size}"
        )
    expected = {0: "<unk>", 1: "<s>", 2: "</s>"}
    actual = {i: sp.id_to_piece(i) for i in expected}
    if actual != expected:
        raise MtLoraError(f"{path}: expected special pieces {expected} (Llama convention), found {actual}")


def _tokenizer_config(max_seq_len: int) -> dict:
    # add_bos_token must be explicit: transformers 5 defaults it to False for a config without it, while
    # llama2.c (and sentencepiece's Llama usage) prepends BOS.
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
    }


def _write_folder(
    h: Llama2cHeader, tensors: dict[str, torch.Tensor], tokenizer_model: Path, out: Path, dtype
) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    config = LlamaConfig(
        vocab_size=h.vocab_size,
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads,
        head_dim=h.head_dim,
        max_position_embeddings=h.max_seq_len,
        rms_norm_eps=_RMS_NORM_EPS,
        rope_theta=_ROPE_THETA,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=h.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,  # no padding_idx in the embedding; pad lives in the tokenizer/generation config
        dtype=dtype,
    )
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    sd = {k: v.to(dtype) for k, v in _hf_state_dict(h, tensors).items()}
    model = model.to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # lm_head is listed as missing-or-unexpected only through tying; anything else is a mapping bug.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"weight mapping bug: missing={missing} unexpected={unexpected}")
    if h.shared_classifier:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("lm_head is not tied to embed_tokens after tie_weights()")
    # llama2.c models are trained on BOS-delimited stories and never emit EOS: a greedy run from BOS ends
    # its story by emitting BOS (at step 346 for stories260K), which is where llama2.c's run.c stops. So
    # generation stops on EOS *or* BOS; config.json keeps the plain eos_token_id=2.
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 1], pad_token_id=0)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the "Writing model shards" bar is noise for a 1-file CLI
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(h.max_seq_len), indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def convert_llama2c(
    checkpoint: str | Path,
    tokenizer_model: str | Path,
    output_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert a llama2.c checkpoint + SentencePiece model into a Hugging Face ``LlamaForCausalLM`` folder.

    Writes ``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.model``,
    ``tokenizer_config.json`` and ``special_tokens_map.json``. The folder is built in a temporary sibling
    directory and renamed into place, so an interrupted run never leaves a half-written model behind.
    An existing non-empty ``output_dir`` is an error unless ``overwrite`` is true. Returns ``output_dir``.
    """
    if dtype not in {torch_dtype(name) for name in DTYPES}:
        raise MtLoraError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    checkpoint, tokenizer_model, out = Path(checkpoint), Path(tokenizer_model), Path(output_dir).resolve()
    h, tensors = read_llama2c_checkpoint(checkpoint)
    _check_tokenizer(tokenizer_model, h.vocab_size)
    if out.exists() and not out.is_dir():
        raise MtLoraError(f"output path exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MtLoraError(f"output directory is not empty: {out} (use --force to replace it)")

    # built beside the target and swapped in whole, with umask permissions (mtlora.atomic)
    with atomic_dir(out) as tmp:
        _write_folder(h, tensors, tokenizer_model, tmp, dtype)
    return out


def build_parser() -> argparse.ArgumentParser:
    from mtlora.cli_args import Parser

    parser = Parser(
        prog="mtlora convert",
        description="Convert checkpoints from other formats into Hugging Face folders.",
    )
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = sub.add_parser(
        "llama2c",
        help="llama2.c .bin checkpoint + SentencePiece .model -> Hugging Face LlamaForCausalLM folder",
        description=(
            "Convert a llama2.c checkpoint (legacy version 0, or export.py version 1 fp32 / version 2 Q8_0) and "
            "its SentencePiece tokenizer into a Hugging Face LlamaForCausalLM folder (safetensors weights, "
            "config, generation config, tokenizer). RoPE q/k rows are permuted to HF's convention; the "
            "tokenizer pads with <unk>."
        ),
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT.bin", help="llama2.c model file, e.g. stories260K.bin")
    p.add_argument(
        "tokenizer",
        metavar="TOKENIZER.model",
        help="SentencePiece model, e.g. tok512.model (not llama2.c's .bin)",
    )
    p.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="folder to create (loadable with from_pretrained)"
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default: float32)"
    )
    p.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    return parser


def main(argv: list[str]) -> int:
    """CLI entry point for ``mtlora convert``; returns the exit code (argparse errors and --help included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse already printed the message
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    out = convert_llama2c(
        args.checkpoint, args.tokenizer, args.output_dir, torch_dtype(args.dtype), overwrite=args.force
    )
    print(f"wrote {out}")
    return 0
