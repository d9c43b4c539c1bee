"""Training-side tokenisation, caching and batching of instruction records.

Two prompt templates:

* ``"paper"`` (default, faithful to ``utils/build_dataset.py`` of the paper code): the sequence is
  ``<s> {instruction}[\\n{input}] </s> {output} </s>`` -- the source (instruction, a newline and the input
  when the input is non-empty, then the literal ``"</s>"``) is tokenised *with* special tokens (BOS), the
  target (output + EOS) *without*. Labels are -100 over the whole source (BOS, prompt, separator EOS), so
  the loss covers the output tokens and the final EOS only.
* ``"chat"``: ``tokenizer.apply_chat_template`` with one user turn (instruction, plus ``\\n`` + input) and
  one assistant turn (output); the loss covers everything after the rendered prompt (the assistant part).

BOS is made explicit: the paper's LLaMA tokenizer prepended it, but a ``LlamaTokenizer`` loaded under
transformers 5 from a folder without ``"add_bos_token": true`` does not, so by default we prepend BOS
whenever the tokenizer defines one (``add_bos=False`` turns that off). Likewise exactly one separator EOS
ends the source even if the tokenizer appends EOS itself (``add_eos_token=True``).

Sequences are cut to ``max_seq_length`` from the right, like the paper. Before tokenising, each text field
is also cut to a character budget (:func:`char_budget`: ``(max_seq_length + 64)`` times the longest token of
the vocabulary, in characters): a token never covers more characters than its vocabulary string has, so the
cut text still yields more than ``max_seq_length`` tokens and the kept tokens are those of the whole text,
while memory stays proportional to ``max_seq_length`` -- the paper tokenised every record in full, so one
10 MB record cost 2 GB of RAM to keep 512 of its tokens. Unlike the paper, an example whose
target is cut away entirely is dropped (it would contribute no loss but still cost compute and shift the
per-batch loss normaliser) and the drop is counted in :class:`TokenizeStats` and logged.

The tokenised dataset has columns ``input_ids`` (list[int]), ``labels`` (list[int], -100 = no loss) and
``task_ids`` (int, from the task map). :class:`DataCollatorForInstructions` turns a list of such rows into
padded tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from mtlora.atomic import current_umask
from mtlora.data.records import RECORD_FIELDS, build_task_map
from mtlora.errors import DataError

if TYPE_CHECKING:  # imported lazily at run time: torch/datasets are slow to import
    import datasets
    import torch

__all__ = [
    "IGNORE_INDEX",
    "PAPER_EOS_LITERAL",
    "TEMPLATES",
    "DataCollatorForInstructions",
    "TokenizeStats",
    "cache_key",
    "cached_tokenize",
    "char_budget",
    "encode_record",
    "paper_source_text",
    "records_fingerprint",
    "resolve_pad_token_id",
    "tokenize_records",
    "tokenizer_fingerprint",
]

logger = logging.getLogger("mtlora.data")

IGNORE_INDEX = -100
PAPER_EOS_LITERAL = "</s>"
TEMPLATES: tuple[str, ...] = ("paper", "chat")
#: Bump when the tokenised layout or the encoding logic changes, so old caches are not reused.
CACHE_FORMAT_VERSION = 1
_CACHE_META = "mtlora_cache.json"
_BATCH = 1000


@dataclass(frozen=True)
class TokenizeStats:
    """Counts from one tokenisation pass (so a trainer can log what truncation did to the data)."""

    num_records: int
    num_examples: int
    num_dropped: int
    num_truncated: int
    max_seq_length: int
    template: str

    def line(self) -> str:
        return (
            f"tokenized {self.num_records} records -> {self.num_examples} examples "
            f"(template={self.template}, max_seq_length={self.max_seq_length}; "
            f"{self.num_truncated} truncated, {self.num_dropped} dropped because truncation removed the whole target)"
        )


def paper_source_text(record: Mapping[str, Any]) -> str:
    """The paper's prompt text *without* the ``</s>`` separator: instruction, then ``\\n`` + input if any."""
    instruction, input_text = record["instruction"], record["input"]
    return f"{instruction}\n{input_text}" if input_text else instruction


#: Tokens of slack in :func:`char_budget` beyond ``max_seq_length``: the tokenisation of the last words
#: before the cut may differ from that of the uncut text, and these tokens absorb that difference.
CHAR_BUDGET_SLACK_TOKENS = 64
_MAX_TOKEN_CHARS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _max_token_chars(tokenizer: Any) -> int | None:
    """Characters of the longest vocabulary string (an upper bound on the text one token covers), or None.

    SentencePiece pieces (``"▁the"``) and byte-level BPE strings (``"Ġthe"``, one symbol per byte) are at
    least as long as the text they stand for; byte-fallback pieces (``"<0x0A>"``) and special tokens are
    longer. Computed once per tokenizer.
    """
    try:
        return _MAX_TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary listing: no safe budget, tokenise in full
        return None
    longest = max((len(t) for t in vocab if isinstance(t, str)), default=0)
    if longest < 1:
        return None
    try:
        _MAX_TOKEN_CHARS[tokenizer] = longest
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return longest


def char_budget(tokenizer: Any, max_seq_length: int) -> int | None:
    """Characters of a text field kept before tokenising when sequences are cut to ``max_seq_length`` tokens.

    ``(max_seq_length + CHAR_BUDGET_SLACK_TOKENS) * longest token`` characters always tokenise to more than
    ``max_seq_length`` tokens, so cutting there changes none of the tokens that survive truncation (see the
    module docstring); None = no budget (the tokenizer does not list its vocabulary).
    """
    longest = _max_token_chars(tokenizer)
    if longest is None:
        return None
    return (int(max_seq_length) + CHAR_BUDGET_SLACK_TOKENS) * longest


def _cut(text: str, budget: int | None) -> str:
    return text if budget is None or len(text) <= budget else text[:budget]


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise DataError(f"unknown prompt template {template!r}; choose one of {list(TEMPLATES)}")


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; the training format ends every target with EOS")
    return int(eos)


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded)


def _eos_literal_is_eos(tokenizer: Any) -> bool:
    """Whether the text ``"</s>"`` tokenises to exactly the EOS id (true for LLaMA/SentencePiece tokenizers).

    The paper appends the *text* ``"</s>"`` to the prompt. When the tokenizer maps it to EOS we do the same
    (bit-identical to the paper); otherwise (e.g. GPT-2/Qwen vocabularies) the text would become ordinary
    characters, so we append the EOS id instead.
    """
    eos = _eos_id(tokenizer)
    plain = _ids(tokenizer("a", add_special_tokens=False))
    with_literal = _ids(tokenizer("a" + PAPER_EOS_LITERAL, add_special_tokens=False))
    return with_literal == plain + [eos]


def _with_bos(ids: list[int], tokenizer: Any, add_bos: bool | None) -> list[int]:
    """Make BOS presence explicit, whatever the tokenizer's ``add_bos_token`` setting.

    ``None`` (default): ensure a leading BOS when the tokenizer defines one -- the paper's LLaMA tokenizer
    prepends it, but e.g. a ``LlamaTokenizer`` built from a bare ``tokenizer.model`` under transformers 5
    does not. ``True``: require and ensure BOS. ``False``: ensure there is none.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is False:
        return ids[1:] if bos is not None and ids and ids[0] == bos else ids
    if bos is None:
        if add_bos:
            raise DataError("add_bos=True but the tokenizer has no bos_token_id")
        return ids
    return ids if ids and ids[0] == bos else [int(bos)] + ids


def _truncate(
    source: list[int], target: list[int], max_seq_length: int
) -> tuple[list[int], list[int], bool] | None:
    input_ids = source + target
    labels = [IGNORE_INDEX] * len(source) + target
    truncated = len(input_ids) > max_seq_length
    if truncated:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return input_ids, labels, truncated


def _tokenizer_appends_eos(tokenizer: Any) -> bool:
    """Whether ``add_special_tokens=True`` appends EOS by itself (``add_eos_token=True`` configs)."""
    eos = _eos_id(tokenizer)
    with_special = _ids(tokenizer("a", add_special_tokens=True))
    return (
        bool(with_special)
        and with_special[-1] == eos
        and _ids(tokenizer("a", add_special_tokens=False))[-1:] != [eos]
    )


def _encode_paper_batch(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, add_bos: bool | None, max_seq_length: int
) -> list[tuple[list[int], list[int]]]:
    eos = _eos_id(tokenizer)
    literal_ok = _eos_literal_is_eos(tokenizer)
    appends_eos = _tokenizer_appends_eos(tokenizer)
    budget = char_budget(tokenizer, max_seq_length)
    # a source past the budget keeps > max_seq_length tokens, so its target is cut away either way
    sources = [
        _cut(paper_source_text(r), budget) + (PAPER_EOS_LITERAL if literal_ok else "") for r in records
    ]
    targets = [_cut(r["output"], budget) for r in records]
    # verbose=False: the "longer than model_max_length" warning is moot, we truncate ourselves
    source_ids = _ids(tokenizer(sources, add_special_tokens=True, verbose=False))
    target_ids = _ids(tokenizer(targets, add_special_tokens=False, verbose=False))
    out = []
    for src, tgt in zip(source_ids, target_ids):
        src = _with_bos(list(src), tokenizer, add_bos)
        if appends_eos and src and src[-1] == eos:
            src = src[:-1]  # exactly one separator EOS, whoever adds it
        if not literal_ok or not src or src[-1] != eos:
            src = src + [eos]
        out.append((src, list(tgt) + [eos]))
    return out


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return _ids(encoded)


def _encode_chat(
    record: Mapping[str, Any], tokenizer: Any, where: str, max_seq_length: int
) -> tuple[list[int], list[int]]:
    budget = char_budget(tokenizer, max_seq_length)
    user = {"role": "user", "content": _cut(paper_source_text(record), budget)}
    prompt = _chat_ids(tokenizer, [user], add_generation_prompt=True)
    assistant = {"role": "assistant", "content": _cut(record["output"], budget)}
    full = _chat_ids(tokenizer, [user, assistant], add_generation_prompt=False)
    if full[: len(prompt)] != prompt or len(full) == len(prompt):
        raise DataError(
            f"{where}: the tokenizer's chat template does not render the prompt as a prefix of the full "
            "conversation, so the assistant part cannot be located for loss masking; use template='paper'"
        )
    return prompt, full[len(prompt) :]


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"template='chat' needs a tokenizer with a chat template, and {name!r} has none "
            "(tokenizer.chat_template is empty); use template='paper' or set tokenizer.chat_template"
        )


def encode_record(
    record: Mapping[str, Any],
    tokenizer: Any,
    max_seq_length: int,
    template: str = "paper",
    *,
    add_bos: bool | None = None,
) -> tuple[list[int], list[int]] | None:
    """Encode one record to ``(input_ids, labels)``, or ``None`` if truncation removes the whole target.

    Handy for inspecting what the model sees; :func:`tokenize_records` does the same in batches.
    """
    _check_template(template)
    if template == "paper":
        [(source, target)] = _encode_paper_batch([record], tokenizer, add_bos, max_seq_length)
    else:
        _require_chat_template(tokenizer)
        source, target = _encode_chat(record, tokenizer, "record", max_seq_length)
    result = _truncate(source, target, max_seq_length)
    return None if result is None else (result[0], result[1])


def _task_ids(records: Sequence[Mapping[str, Any]], task_map: Mapping[str, int]) -> list[int]:
    ids, unknown = [], set()
    for record in records:
        name = str(record["task_type"])
        if name not in task_map:
            unknown.add(name)
        else:
            ids.append(int(task_map[name]))
    if unknown:
        raise DataError(
            f"task_type(s) {sorted(unknown)[:10]} are not in the task map (which has {len(task_map)} tasks: "
            f"{sorted(task_map)[:10]}...); rebuild the map or fix the data"
        )
    return ids


def _encode_paper(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    add_bos: bool | None,
    max_seq_length: int,
    num_proc: int | None,
) -> list[tuple[list[int], list[int]]]:
    """Paper-template encoding in batches; ``num_proc`` > 1 spreads the batches over that many processes.

    Worker processes are spawned (not forked: the parent has torch and tokenizer threads running), each
    gets the tokenizer by pickling; the result is identical to the sequential one, batch order preserved.
    """
    procs = min(int(num_proc or 1), len(records))
    size = min(_BATCH, -(-len(records) // max(procs, 1)))
    chunks = [records[start : start + size] for start in range(0, len(records), size)]
    if procs <= 1 or len(chunks) <= 1:
        return [
            pair
            for chunk in chunks
            for pair in _encode_paper_batch(chunk, tokenizer, add_bos, max_seq_length)
        ]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from itertools import repeat

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=procs, mp_context=ctx) as pool:
        parts = pool.map(
            _encode_paper_batch,
            [list(c) for c in chunks],
            repeat(tokenizer),
            repeat(add_bos),
            repeat(max_seq_length),
        )
        return [pair for part in parts for pair in part]


def _tokenize(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str,
    task_map: Mapping[str, int] | None,
    add_bos: bool | None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, TokenizeStats]:
    import datasets

    _check_template(template)
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be >= 2, got {max_seq_length}")
    if not records:
        raise DataError("no records to tokenize")
    task_map = build_task_map(records) if task_map is None else task_map
    task_ids = _task_ids(records, task_map)

    pairs: list[tuple[list[int], list[int]]] = []
    if template == "paper":
        pairs = _encode_paper(records, tokenizer, add_bos, max_seq_length, num_proc)
    else:
        _require_chat_template(tokenizer)
        pairs = [_encode_chat(r, tokenizer, f"record {i}", max_seq_length) for i, r in enumerate(records)]

    columns: dict[str, list[Any]] = {"input_ids": [], "labels": [], "task_ids": []}
    dropped = truncated = 0
    for (source, target), task_id in zip(pairs, task_ids):
        result = _truncate(source, target, max_seq_length)
        if result is None:
            dropped += 1
            continue
        truncated += result[2]
        columns["input_ids"].append(result[0])
        columns["labels"].append(result[1])
        columns["task_ids"].append(task_id)
    stats = TokenizeStats(
        num_records=len(records),
        num_examples=len(columns["input_ids"]),
        num_dropped=dropped,
        num_truncated=truncated,
        max_seq_length=max_seq_length,
        template=template,
    )
    if not columns["input_ids"]:
        raise DataError(f"every example was dropped: {stats.line()}")
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "task_ids": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features), stats


def _log_stats(stats: TokenizeStats) -> None:
    (logger.warning if stats.num_dropped else logger.info)(stats.line())


@overload
def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str = ...,
    task_map: Mapping[str, int] | None = ...,
    *,
    add_bos: bool | None = ...,
    num_proc: int | None = ...,
    return_stats: Literal[False] = ...,
) -> datasets.Dataset: ...
@overload
def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str = ...,
    task_map: Mapping[str, int] | None = ...,
    *,
    add_bos: bool | None = ...,
    num_proc: int | None = ...,
    return_stats: Literal[True],
) -> tuple[datasets.Dataset, TokenizeStats]: ...
def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str = "paper",
    task_map: Mapping[str, int] | None = None,
    *,
    add_bos: bool | None = None,
    num_proc: int | None = None,
    return_stats: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, TokenizeStats]:
    """Tokenise records into a ``datasets.Dataset`` with columns ``input_ids``, ``labels``, ``task_ids``.

    Args:
        records: validated records (see :func:`mtlora.data.load_records`).
        tokenizer: a Hugging Face tokenizer (needs ``eos_token_id``; ``chat`` also needs a chat template).
        max_seq_length: sequences are cut to this many tokens from the right.
        template: ``"paper"`` or ``"chat"`` (see the module doc).
        task_map: ``{task_type: id}``; built from ``records`` with :func:`build_task_map` when ``None``.
            Pass the saved map when tokenising more data for an existing model, so ids stay the same.
        add_bos: paper template only. ``None`` (default) = ensure one leading BOS whenever the tokenizer
            has a ``bos_token_id``, whatever its ``add_bos_token`` setting; ``True`` = require it;
            ``False`` = never start with BOS.
        num_proc: paper template only: tokenise in this many processes (the paper's
            ``--preprocessing_num_workers``); the result does not depend on it.
        return_stats: also return the :class:`TokenizeStats` (they are logged either way).

    Raises:
        DataError: unknown template, a ``task_type`` missing from ``task_map``, no chat template, or every
            example dropped by truncation.
    """
    dataset, stats = _tokenize(records, tokenizer, max_seq_length, template, task_map, add_bos, num_proc)
    _log_stats(stats)
    return (dataset, stats) if return_stats else dataset


# --------------------------------------------------------------------------------------------- caching


def records_fingerprint(records: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 over the records' four fields in order (content, not file names or mtimes)."""
    digest = hashlib.sha256()
    for record in records:
        row = [str(record[f]) if f == "task_type" else record[f] for f in RECORD_FIELDS]
        digest.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


_PROBE = "Hello world!\n  Indented\tline, ünïcödé 数字 123 </s> <s> end"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what determines the tokenizer's output: class, vocabulary, special tokens, chat template,
    the serialised fast-tokenizer pipeline (when there is one) and the encoding of a probe string.

    The paper keyed its cache by file name and length only, so switching tokenizers silently reused stale
    token ids; the location of the tokenizer files is deliberately *not* part of this fingerprint.
    """
    parts: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "ids": [getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "unk")],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "probe": [
            _ids(tokenizer(_PROBE, add_special_tokens=True)),
            _ids(tokenizer(_PROBE, add_special_tokens=False)),
        ],
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        parts["backend"] = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _key_parts(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str,
    task_map: Mapping[str, int],
    add_bos: bool | None,
) -> dict[str, Any]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "data": records_fingerprint(records),
        "num_records": len(records),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template,
        "max_seq_length": int(max_seq_length),
        "task_map": sorted((str(k), int(v)) for k, v in task_map.items()),
        "add_bos": add_bos,
    }


def cache_key(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str = "paper",
    task_map: Mapping[str, int] | None = None,
    *,
    add_bos: bool | None = None,
) -> str:
    """Hex key of everything the tokenised data depends on: data content, tokenizer, template,
    ``max_seq_length``, task map, BOS policy and the cache format version."""
    task_map = build_task_map(records) if task_map is None else task_map
    parts = _key_parts(records, tokenizer, max_seq_length, template, task_map, add_bos)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


@overload
def cached_tokenize(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str = ...,
    task_map: Mapping[str, int] | None = ...,
    *,
    cache_dir: str | os.PathLike[str],
    add_bos: bool | None = ...,
    overwrite: bool = ...,
    num_proc: int | None = ...,
    return_stats: Literal[False] = ...,
) -> datasets.Dataset: ...
@overload
def cached_tokenize(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str = ...,
    task_map: Mapping[str, int] | None = ...,
    *,
    cache_dir: str | os.PathLike[str],
    add_bos: bool | None = ...,
    overwrite: bool = ...,
    num_proc: int | None = ...,
    return_stats: Literal[True],
) -> tuple[datasets.Dataset, TokenizeStats]: ...
def cached_tokenize(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    template: str = "paper",
    task_map: Mapping[str, int] | None = None,
    *,
    cache_dir: str | os.PathLike[str],
    add_bos: bool | None = None,
    overwrite: bool = False,
    num_proc: int | None = None,
    return_stats: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, TokenizeStats]:
    """:func:`tokenize_records`, memoised on disk under ``cache_dir/<template>-msl<N>-<key16>/``.

    ``overwrite`` (the paper's ``--overwrite_cache``) tokenises again and replaces the entry even when it
    exists; ``num_proc`` is passed to :func:`tokenize_records` and is not part of the key.

    The key (:func:`cache_key`) covers the data content, the tokenizer, the template, ``max_seq_length``
    and the task map, so a changed input can never pick up a stale cache. The dataset is written with
    ``Dataset.save_to_disk`` into a temporary directory that is renamed into place only when complete, so an
    interrupted run (or two runs racing) leaves no half-written cache behind.
    """
    import datasets

    _check_template(template)
    task_map = build_task_map(records) if task_map is None else task_map
    parts = _key_parts(records, tokenizer, max_seq_length, template, task_map, add_bos)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()
    root = Path(cache_dir)
    final = root / f"{template}-msl{int(max_seq_length)}-{key[:16]}"
    meta_path = final / _CACHE_META

    if meta_path.is_file() and not overwrite:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("key") == key:
            dataset = datasets.load_from_disk(str(final))
            stats = TokenizeStats(**meta["stats"])
            logger.info("loaded tokenized data from cache %s", final)
            _log_stats(stats)
            return (dataset, stats) if return_stats else dataset

    dataset, stats = _tokenize(records, tokenizer, max_seq_length, template, task_map, add_bos, num_proc)
    _log_stats(stats)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the cache is shared like any output
    try:
        dataset.save_to_disk(str(tmp))
        meta = {
            "key": key,
            "key_parts": {k: v for k, v in parts.items() if k != "task_map"},
            "stats": asdict(stats),
        }
        meta["key_parts"]["task_map"] = dict(task_map)
        (tmp / _CACHE_META).write_text(
            json.dumps(meta, indent=2, ensure_ascii=False, default=str), encoding="utf-8"
        )
        if final.exists():  # stale or incomplete entry with the same name (the key matched nothing above)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first; its entry has the same key and content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # reload from the cache so the caller gets the same memory-mapped object a cache hit would give
    dataset = datasets.load_from_disk(str(final))
    return (dataset, stats) if return_stats else dataset


# -------------------------------------------------------------------------------------------- collator


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: ``pad_token_id``, else ``unk_token_id`` (what the paper used: ``<unk>`` = 0
    on LLaMA), else ``eos_token_id``. Padding never reaches the loss or attention, so any id works."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has no pad, unk or eos token id to pad with")


@dataclass
class DataCollatorForInstructions:
    """Right-pad a list of tokenised rows into a batch of tensors.

    Output keys: ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long built from the true lengths,
    ``labels`` (B, L) long padded with ``label_pad_token_id``, ``task_ids`` (B,) long.

    The attention mask comes from lengths, not from ``input_ids != pad_token_id`` as in the paper code:
    the pad id may be a real token (``<unk>``/EOS), and the paper's rule masks out every genuine EOS in the
    sequence (including the prompt separator) when pad == EOS.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, pad_to_multiple_of: int | None = None
    ) -> DataCollatorForInstructions:
        return cls(pad_token_id=resolve_pad_token_id(tokenizer), pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        if not features:
            raise DataError("cannot collate an empty batch")
        rows_ids, rows_labels, task_ids = [], [], []
        for index, feature in enumerate(features):
            for key in ("input_ids", "labels", "task_ids"):
                if key not in feature:
                    raise DataError(f"batch item {index} has no {key!r} (has {sorted(feature)})")
            ids, labels = _as_list(feature["input_ids"]), _as_list(feature["labels"])
            if len(ids) != len(labels):
                raise DataError(f"batch item {index}: {len(ids)} input_ids but {len(labels)} labels")
            rows_ids.append(ids)
            rows_labels.append(labels)
            task_ids.append(int(feature["task_ids"]))
        lengths = [len(ids) for ids in rows_ids]
        width = max(lengths)
        if self.pad_to_multiple_of:
            multiple = int(self.pad_to_multiple_of)
            width = -(-width // multiple) * multiple
        batch = len(features)
        input_ids = torch.full((batch, width), int(self.pad_token_id), dtype=torch.long)
        labels = torch.full((batch, width), int(self.label_pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (ids, labs, length) in enumerate(zip(rows_ids, rows_labels, lengths)):
            input_ids[row, :length] = torch.tensor(ids, dtype=torch.long)
            labels[row, :length] = torch.tensor(labs, dtype=torch.long)
            attention_mask[row, :length] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "task_ids": torch.tensor(task_ids, dtype=torch.long),
        }


def _as_list(value: Any) -> list[int]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in value]
