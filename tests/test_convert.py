"""Tests for ``mtlora convert llama2c`` and the bundled ``mtlora:stories260k`` model.

The decisive check is behavioural: greedy decoding must reproduce llama2.c's reference output token for
token, which fails on any mistake in weight order, the RoPE q/k permutation, GQA or embedding tying.
"""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import pytest
import torch

from mtlora import cli
from mtlora.convert import convert_llama2c, read_llama2c_checkpoint
from mtlora.errors import MtLoraError
from mtlora.hub import BUNDLED_MODELS, load_tokenizer, resolve_model_path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SRC = SHARED / "models" / "stories260K"
CKPT, TOK = SRC / "stories260K.bin", SRC / "tok512.model"
needs_shared = pytest.mark.skipif(
    not CKPT.is_file(), reason=f"llama2.c stories260K sources not found at {SRC} (the ../shared checkout)"
)

# llama2.c's test_all.py expected output: `run stories260K.bin -t 0.0 -n 200`, i.e. 200 greedy tokens after
# BOS, decoded. greedy_200_numpy.txt holds the same 200 tokens as the Python repr of their pieces joined with
# '▁' -> ' ' and no byte decoding (hence the leading space and '<0x0A>' for newlines); run.c drops that
# leading space after BOS and turns <0x0A> into a newline. Embedded so the bundled-model test needs no
# ../shared checkout; test_reference_constant_matches_shared_file ties it to the file.
GREEDY_200 = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    "she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, "
    '"I want to play with your ball, but I can\'t find it."\n'
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she"
)
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
}
SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    'Tom said, "I can\'t find my red ball!"\nHis mom smiled.',
    "They counted 123 apples and 45 pears.",
    "Zoë ate a crème brûlée 🍰 in the café.",
    " leading space",
    "",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CKPT.is_file():
        pytest.skip(f"llama2.c stories260K sources not found at {SRC} (the ../shared checkout)")
    return convert_llama2c(CKPT, TOK, tmp_path_factory.mktemp("conv") / "stories260k")


def _greedy_ids(folder: str | Path) -> tuple[list[int], object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    with torch.inference_mode():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=200, do_sample=False)
    return out[0, 1:].tolist(), load_tokenizer(folder)


def _check_greedy_reference(folder: str | Path) -> None:
    ids, tok = _greedy_ids(folder)
    assert len(ids) == 200  # no early stop: the first BOS (end of story) comes at step 346
    assert tok.decode(ids) == GREEDY_200
    if (SRC / "greedy_200_numpy.txt").is_file():  # the file's own format: joined pieces, '▁' -> ' '
        ref = ast.literal_eval((SRC / "greedy_200_numpy.txt").read_text())
        assert "".join(tok.convert_ids_to_tokens(ids)).replace("\u2581", " ") == ref


@needs_shared
def test_reference_constant_matches_shared_file() -> None:
    ref = ast.literal_eval((SRC / "greedy_200_numpy.txt").read_text())
    assert ref.startswith(" ") and ref[1:].replace("<0x0A>", "\n") == GREEDY_200


def test_converted_greedy_matches_llama2c(converted: Path) -> None:
    assert {p.name for p in converted.iterdir()} == EXPECTED_FILES
    assert not list(converted.parent.glob(".*tmp*")), "temporary folder left behind"
    cfg = json.loads((converted / "config.json").read_text())
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert heads == (8, 4) and cfg["tie_word_embeddings"]
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, [2, 1], 0)
    _check_greedy_reference(converted)


def test_bundled_model_greedy_matches_llama2c() -> None:
    _check_greedy_reference(resolve_model_path("mtlora:stories260k"))


@needs_shared
def test_bundled_files_equal_fresh_conversion(converted: Path) -> None:
    bundled = Path(resolve_model_path("mtlora:stories260k"))
    for name in EXPECTED_FILES - {"config.json", "generation_config.json"}:  # these embed the HF version
        assert (bundled / name).read_bytes() == (converted / name).read_bytes(), name
    assert (bundled / "LICENSE.llama2c").is_file() and (bundled / "README.md").is_file()


def test_bundled_tokenizer_encodes_like_sentencepiece() -> None:
    import sentencepiece as spm

    folder = resolve_model_path("mtlora:stories260k")
    sp = spm.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
    tok = load_tokenizer("mtlora:stories260k")
    assert len(tok) == sp.vocab_size() == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)
    for text in SENTENCES:
        ids = tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text


def test_truncated_checkpoint(tmp_path: Path) -> None:
    if not CKPT.is_file():
        pytest.skip(f"llama2.c stories260K sources not found at {SRC}")
    data = CKPT.read_bytes()
    bad = tmp_path / "trunc.bin"
    bad.write_bytes(data[:100_000])
    with pytest.raises(MtLoraError, match=rf"truncated.*expected {len(data)} bytes, got 100000 bytes"):
        convert_llama2c(bad, TOK, tmp_path / "out")
    bad.write_bytes(data[:10])
    with pytest.raises(MtLoraError, match="truncated.*got 10 bytes"):
        convert_llama2c(bad, TOK, tmp_path / "out")
    bad.write_bytes(data + b"\0\0\0\0")
    with pytest.raises(MtLoraError, match=rf"trailing data.*expected {len(data)} bytes, got {len(data) + 4}"):
        convert_llama2c(bad, TOK, tmp_path / "out")
    bad.write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + data[28:])
    with pytest.raises(MtLoraError, match="not a valid llama2.c checkpoint"):
        convert_llama2c(bad, TOK, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_wrong_inputs(tmp_path: Path) -> None:
    with pytest.raises(MtLoraError, match="checkpoint not found: .*nope.bin"):
        convert_llama2c(tmp_path / "nope.bin", tmp_path / "tok.model", tmp_path / "out")
    if not CKPT.is_file():
        pytest.skip(f"llama2.c stories260K sources not found at {SRC}")
    with pytest.raises(MtLoraError, match="tokenizer not found: .*tok.model"):
        convert_llama2c(CKPT, tmp_path / "tok.model", tmp_path / "out")
    with pytest.raises(MtLoraError, match="not a SentencePiece .model"):
        convert_llama2c(CKPT, SRC / "tok512.bin", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(MtLoraError, match="not empty"):
        convert_llama2c(CKPT, TOK, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary folder left behind


def _export(path: Path, version: int, t: dict[str, torch.Tensor], shared: bool, group_size: int = 32) -> None:
    """Write tensors in llama2.c export.py's version 1 (fp32) or 2 (Q8_0) layout."""
    emb = t["tok_embeddings"]
    n_layers, kv_dim, dim = t["wk"].shape
    header = struct.pack("<Ii", 0x616B3432, version)
    header += struct.pack("<7i", dim, t["w1"].shape[1], n_layers, 8, 4, emb.shape[0], 512)
    header += struct.pack("<B", int(shared)) + (struct.pack("<i", group_size) if version == 2 else b"")
    parts = [header.ljust(256, b"\0")]
    parts += [
        t["attention_norm"].numpy().tobytes(),
        t["ffn_norm"].numpy().tobytes(),
        t["norm"].numpy().tobytes(),
    ]
    mats = [emb] + [t[k][i] for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for i in range(n_layers)]
    mats += [] if shared else [t["output"]]
    for w in mats:
        if version == 1:
            parts.append(w.numpy().tobytes())
        else:
            g = w.reshape(-1, group_size)
            scale = g.abs().amax(dim=1) / 127.0
            parts.append(torch.round(g / scale[:, None]).to(torch.int8).numpy().tobytes())
            parts.append(scale.numpy().tobytes())
    path.write_bytes(b"".join(parts))


@needs_shared
@pytest.mark.parametrize("version", [1, 2])
def test_versioned_formats(tmp_path: Path, version: int) -> None:
    h0, t0 = read_llama2c_checkpoint(CKPT)
    t0 = dict(t0, output=t0["tok_embeddings"].flip(0).clone())  # exercise the unshared-classifier path
    _export(tmp_path / "m.bin", version, t0, shared=False)
    h, t = read_llama2c_checkpoint(tmp_path / "m.bin")
    assert (h.version, h.shared_classifier, h.n_kv_heads, h.hidden_dim) == (version, False, 4, h0.hidden_dim)
    for name, ref in t0.items():
        if name.startswith("freq_cis"):
            continue
        tol = 0.0 if version == 1 or "norm" in name else ref.abs().max().item() / 127
        torch.testing.assert_close(t[name], ref, atol=tol, rtol=0, msg=name)
    out = convert_llama2c(tmp_path / "m.bin", TOK, tmp_path / "hf")
    assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    torch.testing.assert_close(weights["lm_head.weight"], t["output"], atol=0, rtol=0)
    torch.testing.assert_close(weights["model.layers.4.self_attn.v_proj.weight"], t["wv"][4], atol=0, rtol=0)
    (tmp_path / "m.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-1])
    with pytest.raises(MtLoraError, match=f"truncated llama2.c checkpoint \\(version {version}"):
        read_llama2c_checkpoint(tmp_path / "m.bin")


def test_resolve_model_path(tmp_path: Path) -> None:
    bundled = resolve_model_path("mtlora:stories260k")
    assert Path(bundled) == BUNDLED_MODELS["stories260k"] and (Path(bundled) / "config.json").is_file()
    assert resolve_model_path("MTLORA:Stories260K") == bundled
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(tmp_path) == str(tmp_path)
    with pytest.raises(MtLoraError, match="unknown bundled model 'mtlora:nope'; known: mtlora:stories260k"):
        resolve_model_path("mtlora:nope")


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["convert", "--help"]) == 0
    assert cli.main(["convert", "llama2c", "--help"]) == 0
    assert "CHECKPOINT.bin" in capsys.readouterr().out
    assert cli.main(["convert", "llama2c", str(tmp_path / "x.bin"), str(tmp_path / "t.model"), "o"]) == 2
    assert "error: llama2.c checkpoint not found" in capsys.readouterr().err
    if not CKPT.is_file():
        pytest.skip(f"llama2.c stories260K sources not found at {SRC}")
    out = tmp_path / "cli_out"
    assert cli.main(["convert", "llama2c", str(CKPT), str(TOK), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert cli.main(["convert", "llama2c", str(CKPT), str(TOK), str(out)]) == 2  # exists, no --force
    assert cli.main(["convert", "llama2c", str(CKPT), str(TOK), str(out), "--force"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"cli_out"}
