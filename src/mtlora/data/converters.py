"""Converters from public instruction datasets to :class:`~mtlora.data.records.Record` lists.

The paper trained on converted Dolly-15k and a Flan-v2 subset but shipped no conversion script, so these
converters define the mapping explicitly (one function per source format):

* ``dolly``: Dolly-15k JSONL ``{instruction, context, response, category}`` -> instruction, input=context,
  output=response, task_type=category (the mapping the paper's collator implies).
* ``flan-cot``: Flan v2 CoT TSV files (``flan/v2/cot_data/<task>_train.tsv``): three tab-separated columns
  ``question, answer, rationale`` without header or quoting, newlines written as the two characters ``\\n``.
  instruction=question, input="", output=``"<rationale> So the answer is <answer>."`` (the answer phrasing
  of Flan's CoT templates and of the BBH CoT prompts), task_type=file name without ``_train`` (``gsm8k``).
* ``niv1``: Natural Instructions v1 as packaged in BIG-bench (``<task>/task.json`` with ``task_prefix``,
  ``description`` and ``examples: [{input, target: [str, ...]}]``). instruction=task_prefix (the full
  "Definition ... Prompt ..." text; ``description`` if there is no prefix), input=example input,
  output=the first target (the others are alternative references), task_type=task name.
* ``flan``: the ``Muennighoff/flan`` JSONL layout ``{inputs, targets, task}`` -> instruction=inputs,
  input="", output=targets, task_type=task.

Structural problems (bad JSON, wrong column count, missing or non-string field) always raise
:class:`DataError` naming the file and line/item. An example whose target is empty is also an error unless
``skip_empty=True``, in which case it is dropped and counted (large third-party dumps contain a few).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.data.records import Record, iter_json_objects, save_records, validate_record
from mtlora.errors import DataError

__all__ = [
    "CONVERTERS",
    "ConvertSummary",
    "Converted",
    "cap_per_task",
    "convert",
    "convert_dolly",
    "convert_flan",
    "convert_flan_cot",
    "convert_niv1",
]

TRAIN_FILENAME = "train.json"


@dataclass
class Converted:
    """What a converter produced: the records, how many examples were skipped for an empty target, and
    which input files were read (so a summary can say what was converted)."""

    records: list[Record] = field(default_factory=list)
    skipped_empty: int = 0
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class ConvertSummary:
    """Result of :func:`convert`, for the CLI's one-line summary and for callers that script conversions."""

    fmt: str
    output_path: Path
    num_records: int
    num_tasks: int
    num_before_cap: int
    skipped_empty: int
    num_files: int

    def line(self) -> str:
        parts = [f"{self.fmt}: {self.num_records} records, {self.num_tasks} tasks"]
        if self.num_before_cap != self.num_records:
            parts.append(f"(sampled from {self.num_before_cap})")
        if self.skipped_empty:
            parts.append(f"(skipped {self.skipped_empty} with an empty target)")
        parts.append(f"from {self.num_files} file(s) -> {self.output_path}")
        return " ".join(parts)


def _input_files(path: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """A file, or every file with one of ``suffixes`` directly inside a directory (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
        if not files:
            raise DataError(
                f"{path}: no {'/'.join('*' + s for s in suffixes)} files ({what}) in this directory"
            )
        return files
    raise DataError(f"{path}: no such file or directory")


def _get_str(obj: Any, key: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _add(
    out: Converted,
    where: str,
    *,
    instruction: str,
    input: str,
    output: str,
    task_type: str,
    instruction_field: str,
    output_field: str,
    skip_empty: bool,
) -> None:
    """Append one record after the checks of :func:`validate_record`, naming the *source* field on failure."""
    if not instruction.strip():
        raise DataError(f"{where}: field {instruction_field!r} is empty (it becomes the instruction)")
    if not output.strip():
        if skip_empty:
            out.skipped_empty += 1
            return
        raise DataError(f"{where}: field {output_field!r} is empty (use --skip-empty to drop such examples)")
    record = {"instruction": instruction, "input": input, "output": output, "task_type": task_type}
    out.records.append(validate_record(record, where))


def convert_dolly(path: str | Path, *, skip_empty: bool = False) -> Converted:
    """Dolly-15k JSONL (a file, or a directory of ``*.jsonl``/``*.json``) -> records (see module doc)."""
    out = Converted(files=_input_files(Path(path), (".jsonl", ".json"), "Dolly JSONL"))
    for file in out.files:
        for where, obj in iter_json_objects(file):
            _add(
                out,
                where,
                instruction=_get_str(obj, "instruction", where),
                input=_get_str(obj, "context", where),
                output=_get_str(obj, "response", where),
                task_type=_get_str(obj, "category", where),
                instruction_field="instruction",
                output_field="response",
                skip_empty=skip_empty,
            )
    return out


def _flan_cot_task_name(file: Path) -> str:
    stem = file.name[: -len(".tsv")] if file.name.lower().endswith(".tsv") else file.stem
    return stem[: -len("_train")] if stem.endswith("_train") else stem


def _cot_output(answer: str, rationale: str) -> str:
    answer = answer.strip()
    if answer and answer[-1] not in ".!?":
        answer += "."
    rationale = rationale.strip()
    return f"{rationale} So the answer is {answer}" if rationale else answer


def convert_flan_cot(path: str | Path, *, skip_empty: bool = False) -> Converted:
    """Flan v2 CoT ``*.tsv`` (a file or a directory of them) -> records (see module doc).

    Lines are split on ``"\\n"`` only (not ``str.splitlines``, which would also split on characters such as
    U+2028 that can occur inside a field). A line must have exactly 3 tab-separated columns; blank lines are
    skipped.
    """
    out = Converted(files=_input_files(Path(path), (".tsv",), "Flan v2 CoT TSV"))
    for file in out.files:
        task = _flan_cot_task_name(file)
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{file}: not UTF-8 text ({exc})") from None
        for lineno, line in enumerate(text.split("\n"), start=1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            columns = line.split("\t")
            if len(columns) != 3:
                raise DataError(
                    f"{where}: expected 3 tab-separated columns (question, answer, rationale), got {len(columns)}"
                )
            question, answer, rationale = (c.replace("\\n", "\n").strip() for c in columns)
            if not question:
                raise DataError(f"{where}: column 1 'question' is empty")
            if not answer.strip():
                if skip_empty:
                    out.skipped_empty += 1
                    continue
                raise DataError(
                    f"{where}: column 2 'answer' is empty (use --skip-empty to drop such examples)"
                )
            _add(
                out,
                where,
                instruction=question,
                input="",
                output=_cot_output(answer, rationale),
                task_type=task,
                instruction_field="question",
                output_field="answer",
                skip_empty=skip_empty,
            )
    return out


def _niv1_task_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / "task.json").is_file():
            return [path / "task.json"]
        files = sorted(child / "task.json" for child in path.iterdir() if (child / "task.json").is_file())
        if not files:
            raise DataError(f"{path}: no task.json here nor in any sub-directory (expected <task>/task.json)")
        return files
    raise DataError(f"{path}: no such file or directory")


def _niv1_target(example: dict[str, Any], where: str) -> str:
    if "target" in example:
        target = example["target"]
        if isinstance(target, str):
            return target
        if isinstance(target, list) and target and all(isinstance(t, str) for t in target):
            return target[0]
        raise DataError(f"{where}: field 'target' must be a string or a non-empty list of strings")
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        # multiple-choice BIG-bench style: the highest-scoring option (first one on ties) is the answer
        return max(scores, key=lambda option: scores[option])
    raise DataError(f"{where}: missing field 'target' (or 'target_scores')")


def convert_niv1(path: str | Path, *, skip_empty: bool = False) -> Converted:
    """Natural Instructions v1 / BIG-bench ``task.json`` -> records (see module doc).

    ``path`` may be a ``task.json`` file, a task directory holding one, or a directory of task directories
    (sub-directories without a ``task.json`` are ignored; tasks are read in sorted directory order).
    """
    out = Converted(files=_niv1_task_files(Path(path)))
    for file in out.files:
        try:
            task = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{file}: JSON nested too deeply to parse") from None
        if not isinstance(task, dict):
            raise DataError(f"{file}: expected a JSON object with 'examples', got {type(task).__name__}")
        name = task.get("name") or file.parent.name
        if not isinstance(name, str):
            raise DataError(f"{file}: field 'name' must be a string")
        instruction = task.get("task_prefix") or task.get("description") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(
                f"{file}: needs a non-empty string field 'task_prefix' or 'description' (the instruction)"
            )
        examples = task.get("examples")
        if not isinstance(examples, list):
            raise DataError(f"{file}: field 'examples' must be a list")
        for index, example in enumerate(examples):
            where = f"{file}[example {index}]"
            _add(
                out,
                where,
                instruction=instruction.strip(),
                input=_get_str(example, "input", where),
                output=_niv1_target(example, where),
                task_type=name,
                instruction_field="task_prefix",
                output_field="target",
                skip_empty=skip_empty,
            )
    return out


def convert_flan(path: str | Path, *, skip_empty: bool = False) -> Converted:
    """``Muennighoff/flan`` JSONL (a file, or a directory of ``*.jsonl``/``*.json``) -> records."""
    out = Converted(files=_input_files(Path(path), (".jsonl", ".json"), "Flan JSONL"))
    for file in out.files:
        for where, obj in iter_json_objects(file):
            _add(
                out,
                where,
                instruction=_get_str(obj, "inputs", where),
                input="",
                output=_get_str(obj, "targets", where),
                task_type=_get_str(obj, "task", where),
                instruction_field="inputs",
                output_field="targets",
                skip_empty=skip_empty,
            )
    return out


CONVERTERS: dict[str, Callable[..., Converted]] = {
    "dolly": convert_dolly,
    "flan-cot": convert_flan_cot,
    "niv1": convert_niv1,
    "flan": convert_flan,
}


def cap_per_task(records: Sequence[Record], max_per_task: int | None, seed: int = 42) -> list[Record]:
    """Keep at most ``max_per_task`` records of each task, chosen at random, in their original order.

    Each task gets its own generator seeded from ``(seed, task name)`` (string seeding is stable across
    processes, unlike ``hash``), so a task's sample does not change when other tasks are added or removed.
    """
    if max_per_task is None:
        return list(records)
    if max_per_task < 1:
        raise DataError(f"--max-per-task must be >= 1, got {max_per_task}")
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_task[record["task_type"]].append(index)
    keep: list[int] = []
    for task, indices in by_task.items():
        if len(indices) <= max_per_task:
            keep.extend(indices)
        else:
            keep.extend(random.Random(f"{seed}\0{task}").sample(indices, max_per_task))
    return [records[i] for i in sorted(keep)]


def convert(
    fmt: str,
    input_path: str | Path,
    outdir: str | Path,
    *,
    max_per_task: int | None = None,
    seed: int = 42,
    skip_empty: bool = False,
) -> ConvertSummary:
    """Convert ``input_path`` with converter ``fmt``, cap per task, and write ``outdir/train.json`` atomically."""
    if fmt not in CONVERTERS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {sorted(CONVERTERS)}")
    if max_per_task is not None and max_per_task < 1:  # checked before the (possibly long) conversion
        raise DataError(f"--max-per-task must be >= 1, got {max_per_task}")
    converted = CONVERTERS[fmt](Path(input_path), skip_empty=skip_empty)
    if not converted.records:
        raise DataError(f"{input_path}: no examples found")
    records = cap_per_task(converted.records, max_per_task, seed)
    output_path = Path(outdir) / TRAIN_FILENAME
    save_records(records, output_path)
    return ConvertSummary(
        fmt=fmt,
        output_path=output_path,
        num_records=len(records),
        num_tasks=len({r["task_type"] for r in records}),
        num_before_cap=len(converted.records),
        skipped_empty=converted.skipped_empty,
        num_files=len(converted.files),
    )
