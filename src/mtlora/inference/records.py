"""Scoring and answering instruction records (``instruction``/``input``/``output``) through the :class:`Engine`.

Why here: export's routed-vs-exported report, LoRAHub's objective and the demo's answers are all "run these
records through the model"; they share the encoding (:mod:`mtlora.inference.examples`) and the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtlora.inference.engine import Engine, GenRequest
from mtlora.inference.examples import Example, encode_examples, prompt_ids

__all__ = ["RecordMetrics", "answer_records", "normalize_answer", "score_records"]


@dataclass
class RecordMetrics:
    """Exact-match accuracy of greedy generation and mean per-token NLL of the target (teacher forced)."""

    accuracy: float | None
    nll: float | None
    examples: int
    target_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "nll": self.nll,
            "examples": self.examples,
            "target_tokens": self.target_tokens,
        }


def normalize_answer(text: str) -> str:
    """Whitespace-normalised text: what exact match compares."""
    return " ".join(text.split())


def score_records(
    engine: Engine,
    records: Sequence[Mapping[str, Any]] | Sequence[Example],
    *,
    task_id: int | None = None,
    generate: bool = True,
    max_new_tokens: int = 64,
    max_seq_length: int = 512,
    template: str = "paper",
) -> RecordMetrics:
    """Score records with ``engine.model`` (routed, static or base: whatever context it is called in).

    NLL: mean over target tokens (output + EOS) under teacher forcing. Accuracy: greedy generation from the
    prompt until one of ``engine.eos_ids`` or ``min(max_new_tokens, longest target + 2)`` tokens, whitespace-
    normalised exact match against the record's ``output``. Records whose target is truncated away at
    ``max_seq_length`` are not counted. ``task_id`` goes to every forward (task-conditioned routers).
    """
    if all(isinstance(r, Example) for r in records):
        examples: list[Example] = list(records)  # type: ignore[arg-type]
    else:
        examples = encode_examples(records, engine.tokenizer, max_seq_length, template)  # type: ignore[arg-type]
    if not examples:
        return RecordMetrics(accuracy=None, nll=None, examples=0, target_tokens=0)
    nll = engine.target_nll(examples, task_id=task_id, desc="nll")
    accuracy = None
    if generate:
        budget = min(max_new_tokens, max(len(e.target) for e in examples) + 2)
        gens = engine.generate(
            [GenRequest(e.prompt) for e in examples], budget, task_id=task_id, desc="generate"
        )
        correct = sum(
            normalize_answer(g.text) == normalize_answer(str(e.record["output"]))
            for g, e in zip(gens, examples)
        )
        accuracy = correct / len(examples)
    return RecordMetrics(accuracy=accuracy, nll=nll.mean, examples=len(examples), target_tokens=nll.tokens)


def answer_records(
    engine: Engine,
    records: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    task_map: Mapping[str, int] | None = None,
    template: str = "paper",
    desc: str = "eval",
) -> list[str]:
    """Greedy answers (decoded, special tokens skipped) for ``records``, in order.

    Generation stops at ``engine.eos_ids`` (default: tokenizer EOS plus the generation config's; stories260k
    ends with BOS as well as EOS) or after ``max_new_tokens``. ``task_map`` gives each row its task id
    (``task_type``; needed by a task-conditioned router such as mmoelora's gate).
    """
    requests = [
        GenRequest(
            prompt_ids(r, engine.tokenizer, template),
            task_id=None if task_map is None else int(task_map[str(r["task_type"])]),
        )
        for r in records
    ]
    return [g.text for g in engine.generate(requests, max_new_tokens, desc=desc)]
