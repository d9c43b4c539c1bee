"""Model names: ``mtlora:<name>`` for models bundled with the package, anything else passed to transformers.

Why: tests, the demo and CPU benchmarks must run offline, so a tiny pre-converted model
(llama2.c stories260K, ~1 MB) ships as package data; ``mtlora:stories260k`` names it everywhere a model
name or path is accepted, without users having to know where pip installed the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtlora.errors import MtLoraError

__all__ = ["BUNDLED_MODELS", "PREFIX", "resolve_model_path", "load_tokenizer"]

PREFIX = "mtlora:"
_ASSETS = Path(__file__).resolve().parent / "assets" / "models"

#: Bundled model name (lower case) -> Hugging Face folder inside the installed package.
BUNDLED_MODELS: dict[str, Path] = {
    "stories260k": _ASSETS / "stories260k",
}


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """Map ``mtlora:<name>`` (name case-insensitive) to the bundled folder; return anything else unchanged.

    Local directories and hub ids pass through untouched so callers can always route through this function.
    An unknown ``mtlora:`` name, or a bundled folder missing from a broken install, raises
    :class:`MtLoraError` naming the known models.
    """
    text = os.fspath(name_or_path)
    if not text.lower().startswith(PREFIX):
        return text
    name = text[len(PREFIX) :].strip().lower()
    if name not in BUNDLED_MODELS:
        known = ", ".join(f"{PREFIX}{n}" for n in sorted(BUNDLED_MODELS))
        raise MtLoraError(f"unknown bundled model {text!r}; known: {known}")
    path = BUNDLED_MODELS[name]
    if not (path / "config.json").is_file():
        raise MtLoraError(
            f"bundled model {text!r} is missing its files at {path}; the package was installed without its "
            "assets (reinstall mtlora)"
        )
    return str(path)


def load_tokenizer(name_or_path: str | os.PathLike[str], **kwargs: Any):
    """Resolve ``name_or_path`` and load its tokenizer with ``AutoTokenizer``, guaranteeing a pad token.

    Batching needs a pad token and Llama-family tokenizers often have none. We reuse an existing token
    instead of adding one (adding would change the vocabulary size and require resizing embeddings):
    ``unk`` first, because it never appears in byte-fallback encodings, so masking labels equal to the
    pad id cannot hide real targets; ``eos`` only if there is no ``unk`` (then EOS labels need care, since
    a pad==eos mask would also drop the EOS targets). The bundled models already define pad = ``<unk>``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise MtLoraError(f"tokenizer of {name_or_path!s} has no pad, unk or eos token to pad with")
    return tokenizer
