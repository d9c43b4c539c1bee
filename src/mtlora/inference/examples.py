"""Records -> token examples for scoring: one encoding rule shared by training, export, LoRAHub and demo.

Why one place: the prompt a model is scored or queried with must be exactly what training conditioned the
target on (:func:`mtlora.data.encode_record`); export, LoRAHub and the demo each used to re-derive it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtlora.data.tokenize import IGNORE_INDEX, encode_record

__all__ = ["Example", "encode_examples", "prompt_ids"]


@dataclass
class Example:
    """One encoded record: ``ids`` = prompt + target, ``labels`` = IGNORE over the prompt then the target.

    The target is a contiguous suffix (``encode_record`` truncates from the right), so ``prompt_len`` is the
    index of the first labelled token and ``ids[:prompt_len]`` is the generation prompt.
    """

    record: Mapping[str, Any]
    ids: list[int]
    labels: list[int]
    prompt_len: int

    @property
    def prompt(self) -> list[int]:
        return self.ids[: self.prompt_len]

    @property
    def target(self) -> list[int]:
        return self.ids[self.prompt_len :]


def _first_label(labels: Sequence[int]) -> int:
    return next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)


def encode_examples(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, max_seq_length: int = 512, template: str = "paper"
) -> list[Example]:
    """An :class:`Example` for every record whose target survives truncation at ``max_seq_length``."""
    out = []
    for record in records:
        enc = encode_record(record, tokenizer, max_seq_length, template)
        if enc is not None:
            ids, labels = enc
            out.append(Example(record=record, ids=ids, labels=labels, prompt_len=_first_label(labels)))
    return out


def prompt_ids(record: Mapping[str, Any], tokenizer: Any, template: str = "paper") -> list[int]:
    """The training prompt of ``record`` (BOS, instruction, input, separator) -- what ``train`` conditions
    the target on, never truncated."""
    encoded = encode_record(record, tokenizer, 1 << 30, template)
    assert encoded is not None  # untruncated: the target is always there
    ids, labels = encoded
    return ids[: _first_label(labels)]
