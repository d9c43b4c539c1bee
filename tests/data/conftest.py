"""Fixtures for the data-layer tests: paths to the shared real samples and a tiny offline Llama tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BUNDLED_TOKENIZER = REPO_ROOT / "src" / "mtlora" / "assets" / "models" / "stories260k"
SHARED_TOK512 = SHARED / "models" / "stories260K" / "tok512.model"

# The minimal config of the brief: no add_bos_token, so transformers 5 does *not* prepend BOS by itself.
BARE_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"real data sample {path} is not available on this machine")
    return path


@pytest.fixture(scope="session")
def shared_data():
    """``shared_data("dolly15k_sample", "dolly_sample.jsonl")`` -> a path under ../shared/data, or skip."""
    return _shared_path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _tokenizer_model_file() -> Path:
    if (BUNDLED_TOKENIZER / "tokenizer.model").is_file():
        return BUNDLED_TOKENIZER / "tokenizer.model"
    if SHARED_TOK512.is_file():
        return SHARED_TOK512
    pytest.skip("no stories260K tokenizer (bundled folder or ../shared/models/stories260K/tok512.model)")


@pytest.fixture(scope="session")
def bare_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok512_bare")
    shutil.copyfile(_tokenizer_model_file(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(BARE_TOKENIZER_CONFIG))
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(bare_tokenizer_dir: Path) -> Path:
    """The bundled tokenizer folder when another engineer has added it, else the bare equivalent."""
    if (BUNDLED_TOKENIZER / "tokenizer_config.json").is_file() and (
        BUNDLED_TOKENIZER / "tokenizer.model"
    ).is_file():
        return BUNDLED_TOKENIZER
    return bare_tokenizer_dir


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == 512 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    return tok


@pytest.fixture(scope="session")
def bare_tokenizer(bare_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bare_tokenizer_dir))
