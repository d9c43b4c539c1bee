"""Instruction records: the one on-disk training format every converter writes and the trainer reads.

A record is ``{"instruction": str, "input": str, "output": str, "task_type": str}``, the format of the paper
code (``utils/build_dataset.py``). We validate every record eagerly, before any tokenisation or model
loading happens, because a bad record found an hour into a run (or silently skipped) wastes far more time
than a clear error that names the file, the line (JSONL) or item index (JSON array) and the field.

Directory loading differs from the paper on purpose: the paper globbed ``*.json`` in the data directory and
so also trained on ``validation.json``. :func:`load_records` given a directory loads every ``*.json`` /
``*.jsonl`` file directly inside it *except* evaluation splits (names whose first word is ``validation``,
``valid``, ``val``, ``dev``, ``test`` or ``eval``) and the task-map file; pass ``include_eval_splits=True`` for the
paper's behaviour, or name such a file explicitly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from mtlora.atomic import write_text_atomic
from mtlora.errors import DataError

__all__ = [
    "EVAL_SPLIT_WORDS",
    "RECORD_FIELDS",
    "TASK_MAP_FILENAME",
    "Record",
    "build_task_map",
    "iter_json_objects",
    "load_records",
    "load_task_map",
    "record_files",
    "save_records",
    "save_task_map",
    "validate_record",
    "write_json_atomic",
]

RECORD_FIELDS: tuple[str, ...] = ("instruction", "input", "output", "task_type")
#: First words of file names (case-insensitive) that mark evaluation splits, skipped when a directory is
#: scanned: ``validation.json``, ``dev_v2.jsonl``, ``test-1.json`` -- but not ``devops.json`` or ``testing.json``.
EVAL_SPLIT_WORDS: tuple[str, ...] = ("validation", "valid", "val", "dev", "test", "eval")
#: Default file name for a saved task map; skipped when a directory of records is scanned.
TASK_MAP_FILENAME = "task_map.json"


class Record(TypedDict):
    """One training example (plain dict so it round-trips through JSON and ``datasets`` unchanged)."""

    instruction: str
    input: str
    output: str
    task_type: str


def _where(path: str | Path, line: int | None = None, item: int | None = None) -> str:
    if line is not None:
        return f"{path}:{line}"
    if item is not None:
        return f"{path}[item {item}]"
    return str(path)


def validate_record(obj: Any, where: str) -> Record:
    """Check one raw JSON value and return it as a normalised :class:`Record`.

    ``task_type`` may be an int in files (the paper's collator accepted numeric task types); it is turned
    into its decimal string so task maps have one key type. Extra keys are dropped. ``output`` must contain
    non-whitespace text: an empty target gives an example with no supervised token, which would only add
    noise to the loss normaliser. ``instruction`` must be non-empty for the same reason on the prompt side.
    """
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object with fields {list(RECORD_FIELDS)}, got {type(obj).__name__}"
        )
    for field in RECORD_FIELDS:
        if field not in obj:
            raise DataError(f"{where}: missing field {field!r} (a record needs {list(RECORD_FIELDS)})")
    for field in ("instruction", "input", "output"):
        value = obj[field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    task_type = obj["task_type"]
    if isinstance(task_type, bool) or not isinstance(task_type, (str, int)):
        raise DataError(
            f"{where}: field 'task_type' must be a string or an integer, got {type(task_type).__name__}"
        )
    task_type = str(task_type)
    if not task_type.strip():
        raise DataError(f"{where}: field 'task_type' is empty")
    if not obj["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    if not obj["output"].strip():
        raise DataError(f"{where}: field 'output' is empty (every record needs a target to train on)")
    return Record(
        instruction=obj["instruction"], input=obj["input"], output=obj["output"], task_type=task_type
    )


def iter_json_objects(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, value)`` for each item of a JSON array file or each line of a JSONL file.

    The format is sniffed from the first non-space character (``[`` = array) rather than the extension,
    because JSONL content in ``*.json`` files is common (``datasets.load_dataset("json")`` accepts both).
    ``where`` is ``file:line`` for JSONL and ``file[item i]`` for arrays, so errors point at the record.
    Blank JSONL lines are skipped. Bad JSON raises :class:`DataError` with the line number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            # stripped removed only leading whitespace/BOM; recompute the line in the original text
            offset = len(text) - len(stripped)
            line = text.count("\n", 0, offset + exc.pos) + 1
            raise DataError(f"{path}:{line}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to parse (not a list of records)") from None
        for index, item in enumerate(data):
            yield _where(path, item=index), item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply to parse (not a record)") from None
        yield _where(path, line=lineno), value


def _load_file(path: Path) -> list[Record]:
    return [validate_record(obj, where) for where, obj in iter_json_objects(path)]


def _is_eval_split(name: str) -> bool:
    first_word = re.match(r"[a-z]*", name.lower())
    return first_word is not None and first_word.group(0) in EVAL_SPLIT_WORDS


def _files_in_dir(directory: Path, include_eval_splits: bool) -> list[Path]:
    files = []
    for child in sorted(directory.iterdir()):
        if not child.is_file() or child.suffix.lower() not in (".json", ".jsonl"):
            continue
        if child.name == TASK_MAP_FILENAME:
            continue
        if not include_eval_splits and _is_eval_split(child.name):
            continue
        files.append(child)
    return files


def record_files(
    paths_or_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    include_eval_splits: bool = False,
) -> list[Path]:
    """The files :func:`load_records` reads for ``paths_or_dir``, in the order it reads them.

    One function decides which files are training data, so everything that reports on the data (the run
    manifest's hashes) names exactly the files that were trained on. Raises :class:`DataError` for a
    missing path or a directory without record files.
    """
    if isinstance(paths_or_dir, (str, os.PathLike)):
        inputs: list[Path] = [Path(paths_or_dir)]
    else:
        inputs = [Path(p) for p in paths_or_dir]
    if not inputs:
        raise DataError("no data paths given")
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = _files_in_dir(path, include_eval_splits)
            if not found:
                raise DataError(
                    f"{path}: no training *.json/*.jsonl files in this directory"
                    + (
                        ""
                        if include_eval_splits
                        else " (validation/valid/val/dev/test/eval files are skipped)"
                    )
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def load_records(
    paths_or_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    include_eval_splits: bool = False,
) -> list[Record]:
    """Load and validate instruction records from files and/or directories.

    Args:
        paths_or_dir: a ``.json``/``.jsonl`` file, a directory, or a list of those. A directory contributes
            every ``*.json``/``*.jsonl`` directly inside it (extension in any case), in sorted name order,
            except evaluation splits (see :data:`EVAL_SPLIT_WORDS`) and ``task_map.json``
            (:func:`record_files`). Files named explicitly are always read.
        include_eval_splits: also take ``validation*``/``dev*``/``test*`` files from directories (this is
            what the paper code did, by accident).

    Returns:
        All records in file order, then line/item order.

    Raises:
        DataError: a path does not exist, a directory holds no record files, or any record is malformed
            (the message names the file, the line or item index, and the field). Everything is parsed and
            validated before this returns, so a caller never starts work on half-checked data.
    """
    files = record_files(paths_or_dir, include_eval_splits=include_eval_splits)
    records: list[Record] = []
    for file in files:
        records.extend(_load_file(file))
    if not records:
        raise DataError(f"no records found in {', '.join(str(f) for f in files)}")
    return records


def _sort_task_names(names: Iterable[str]) -> list[str]:
    unique = set(names)
    if unique and all(name.isdecimal() for name in unique):
        # numeric task types (written as ints in the file) keep numeric order: "2" before "10"
        return sorted(unique, key=lambda name: (int(name), name))
    return sorted(unique)


def build_task_map(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Map each distinct ``task_type`` to an id ``0..T-1``, in sorted name order.

    Sorting (not first-seen order) makes the map independent of file order and sampling, so two runs on the
    same task set agree. For the 8 Dolly categories this reproduces the paper's hard-coded ids
    (brainstorming 0 ... summarization 7). If every name is a decimal integer, they are ordered numerically.
    """
    return {name: index for index, name in enumerate(_sort_task_names(str(r["task_type"]) for r in records))}


def write_json_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with ordinary permissions (:func:`mtlora.atomic.write_text_atomic`).

    A crash or a full disk then leaves either the old file or the new one, never a truncated JSON file that a
    later run would fail on (or, worse, half-read).
    """
    write_text_atomic(path, text)


def save_records(records: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write records as a JSON array, one record per line (readable, diffable), atomically."""
    lines = []
    for record in records:
        lines.append(json.dumps({field: record[field] for field in RECORD_FIELDS}, ensure_ascii=False))
    text = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    write_json_atomic(path, text)


def save_task_map(task_map: Mapping[str, int], path: str | Path) -> None:
    """Save a task map as a JSON object ``{task_name: id}`` ordered by id (atomically)."""
    _check_task_map(dict(task_map), str(path))
    ordered = dict(sorted(task_map.items(), key=lambda item: item[1]))
    write_json_atomic(path, json.dumps(ordered, indent=2, ensure_ascii=False) + "\n")


def _check_task_map(task_map: Any, where: str) -> dict[str, int]:
    if not isinstance(task_map, dict) or not task_map:
        raise DataError(f"{where}: a task map must be a non-empty JSON object {{task_name: id}}")
    for name, task_id in task_map.items():
        if not isinstance(name, str) or isinstance(task_id, bool) or not isinstance(task_id, int):
            raise DataError(f"{where}: task {name!r} must map to an integer id, got {task_id!r}")
    ids = sorted(task_map.values())
    if ids != list(range(len(ids))):
        raise DataError(
            f"{where}: task ids must be exactly 0..{len(ids) - 1} without gaps or repeats, got {ids}"
        )
    return task_map


def load_task_map(path: str | Path) -> dict[str, int]:
    """Load a task map saved by :func:`save_task_map`; ids must be exactly ``0..T-1``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: task map file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to parse (not a task map)") from None
    return _check_task_map(data, str(path))
