"""The report's scores (routed, exported, base) through the shared inference engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtlora.errors import MtLoraError
from mtlora.inference import Engine, RecordMetrics, score_records

EvalMetrics = RecordMetrics  # the documented name of export's metrics


def evaluate_records(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    forward_kwargs: Mapping[str, Any] | None = None,
    max_seq_length: int = 512,
    template: str = "paper",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    generate: bool = True,
) -> EvalMetrics:
    """Score ``records`` with ``model`` (routed, static or base, whatever context it is called in).

    :func:`mtlora.inference.score_records` on an engine that stops at the tokenizer's EOS only (the report's
    rule since export existed). ``forward_kwargs`` may hold ``task_ids`` (one task id for every row).
    """
    kw = dict(forward_kwargs or {})
    unknown = sorted(set(kw) - {"task_ids"})
    if unknown:
        raise MtLoraError(f"evaluate_records: forward_kwargs {unknown} are not supported (only task_ids)")
    engine = export_engine(model, tokenizer, batch_size)
    task_id = None if kw.get("task_ids") is None else int(kw["task_ids"])
    return score_records(
        engine,
        records,
        task_id=task_id,
        generate=generate,
        max_new_tokens=max_new_tokens,
        max_seq_length=max_seq_length,
        template=template,
    )


def export_engine(model: Any, tokenizer: Any, batch_size: int) -> Engine:
    """The engine export scores with: no progress bars, generation ends at ``tokenizer.eos_token_id`` only."""
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    return Engine(model, tokenizer, batch_size=batch_size, progress=False, eos_ids=eos)
