"""Training data for mtlora: records, converters, tokenisation, caching and the batch collator.

* :mod:`mtlora.data.records` -- the ``{instruction, input, output, task_type}`` record format, loading with
  file/line-precise validation, task maps.
* :mod:`mtlora.data.converters` -- Dolly-15k, Flan v2 CoT, Natural Instructions v1 and Muennighoff/flan to
  records (CLI: ``mtlora data <fmt> INPUT OUTDIR``, see :mod:`mtlora.data.cli`).
* :mod:`mtlora.data.tokenize` -- the paper's prompt (or a chat template), label masking, on-disk cache,
  :class:`DataCollatorForInstructions`.

The tokenisation names are imported lazily (PEP 562) so ``mtlora data ...`` and record loading do not pay
for importing torch and datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mtlora.data.converters import (
    CONVERTERS,
    Converted,
    ConvertSummary,
    cap_per_task,
    convert,
    convert_dolly,
    convert_flan,
    convert_flan_cot,
    convert_niv1,
)
from mtlora.data.records import (
    RECORD_FIELDS,
    TASK_MAP_FILENAME,
    Record,
    build_task_map,
    load_records,
    load_task_map,
    save_records,
    save_task_map,
    validate_record,
)

if TYPE_CHECKING:
    from mtlora.data.tokenize import (
        IGNORE_INDEX,
        DataCollatorForInstructions,
        TokenizeStats,
        cache_key,
        cached_tokenize,
        encode_record,
        resolve_pad_token_id,
        tokenize_records,
    )

_LAZY = {
    "IGNORE_INDEX",
    "DataCollatorForInstructions",
    "TokenizeStats",
    "cache_key",
    "cached_tokenize",
    "encode_record",
    "resolve_pad_token_id",
    "tokenize_records",
}

__all__ = [
    "CONVERTERS",
    "IGNORE_INDEX",
    "RECORD_FIELDS",
    "TASK_MAP_FILENAME",
    "ConvertSummary",
    "Converted",
    "DataCollatorForInstructions",
    "Record",
    "TokenizeStats",
    "build_task_map",
    "cache_key",
    "cached_tokenize",
    "cap_per_task",
    "convert",
    "convert_dolly",
    "convert_flan",
    "convert_flan_cot",
    "convert_niv1",
    "encode_record",
    "load_records",
    "load_task_map",
    "resolve_pad_token_id",
    "save_records",
    "save_task_map",
    "tokenize_records",
    "validate_record",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("mtlora.data.tokenize"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
