"""Record loading/validation, task maps, atomic saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlora.data import (
    build_task_map,
    load_records,
    load_task_map,
    save_records,
    save_task_map,
)
from mtlora.errors import DataError

GOOD = {"instruction": "Add the numbers.", "input": "2 3", "output": "5", "task_type": "math"}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_jsonl_and_array_load_the_same(tmp_path: Path) -> None:
    rows = [GOOD, {**GOOD, "input": "", "task_type": 3, "extra": "dropped"}]
    a = load_records(_jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2))
    b = load_records(tmp_path / "b.json")
    assert a == b
    assert a[1] == {"instruction": "Add the numbers.", "input": "", "output": "5", "task_type": "3"}
    # JSONL content in a .json file is accepted too (as datasets' json loader does)
    c = load_records(_jsonl(tmp_path / "c.json", rows))
    assert c == a


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"instruction": "x", "input": "", "output": "y", "task_type": "t"', "invalid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "output"}), "missing field 'output'"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "task_type"}), "missing field 'task_type'"),
        (json.dumps({**GOOD, "input": 5}), "field 'input' must be a string"),
        (json.dumps({**GOOD, "instruction": ["a"]}), "field 'instruction' must be a string"),
        (json.dumps({**GOOD, "task_type": 1.5}), "field 'task_type' must be a string or an integer"),
        (json.dumps({**GOOD, "task_type": True}), "field 'task_type' must be a string or an integer"),
        (json.dumps({**GOOD, "output": ""}), "field 'output' is empty"),
        (json.dumps({**GOOD, "output": "  \n"}), "field 'output' is empty"),
        (json.dumps(["not", "an", "object"]), "expected a JSON object"),
    ],
    ids=[
        "bad-json",
        "missing-output",
        "missing-task",
        "int-input",
        "list-instruction",
        "float-task",
        "bool-task",
        "empty-output",
        "blank-output",
        "not-object",
    ],
)
def test_malformed_jsonl_record_names_file_line_and_field(
    tmp_path: Path, bad_line: str, expected: str
) -> None:
    path = _jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert expected in message


def test_malformed_array_item_names_item_index(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "output": ""}, GOOD]))
    with pytest.raises(DataError, match=r"train\.json\[item 1\]: field 'output' is empty"):
        load_records(path)


def test_bad_json_in_array_names_line(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + '{"instruction": oops}\n]')
    with pytest.raises(DataError, match=r"train\.json:3: invalid JSON"):
        load_records(path)


def test_error_in_a_later_file_fails_the_whole_load(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", [GOOD])
    _jsonl(tmp_path / "b.jsonl", [GOOD, {**GOOD, "output": 1}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: field 'output'"):
        load_records(tmp_path)


def test_directory_skips_eval_splits_and_task_map(tmp_path: Path) -> None:
    for name in ("train.json", "extra.jsonl", "devops.json", "testing_ground.jsonl"):
        _jsonl(tmp_path / name, [{**GOOD, "task_type": name}])
    for name in (
        "validation.json",
        "valid.jsonl",
        "val_1.json",
        "dev.json",
        "test.jsonl",
        "Test-2.json",
        "eval.json",
    ):
        _jsonl(tmp_path / name, [{**GOOD, "task_type": name}])
    (tmp_path / "task_map.json").write_text('{"a": 0}')
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "sub" / "train.json", [GOOD])  # not directly inside: ignored

    tasks = [r["task_type"] for r in load_records(tmp_path)]
    assert tasks == ["devops.json", "extra.jsonl", "testing_ground.jsonl", "train.json"]  # sorted file order

    everything = [r["task_type"] for r in load_records(tmp_path, include_eval_splits=True)]
    assert len(everything) == 11 and "validation.json" in everything
    # a file named explicitly is always read
    both = load_records([tmp_path / "train.json", tmp_path / "validation.json"])
    assert [r["task_type"] for r in both] == ["train.json", "validation.json"]


def test_missing_path_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.json")
    _jsonl(tmp_path / "validation.json", [GOOD])
    with pytest.raises(DataError, match="no training"):
        load_records(tmp_path)


def test_build_task_map_is_sorted_and_order_independent() -> None:
    dolly = ["open_qa", "summarization", "brainstorming", "closed_qa", "general_qa", "classification"]
    dolly += ["information_extraction", "creative_writing", "open_qa"]
    records = [{**GOOD, "task_type": t} for t in dolly]
    task_map = build_task_map(records)
    # the paper's hard-coded Dolly ids (build_dataset.py:L107-L116) are the sorted order
    assert task_map == {
        "brainstorming": 0,
        "classification": 1,
        "closed_qa": 2,
        "creative_writing": 3,
        "general_qa": 4,
        "information_extraction": 5,
        "open_qa": 6,
        "summarization": 7,
    }
    assert build_task_map(list(reversed(records))) == task_map
    numeric = build_task_map([{**GOOD, "task_type": str(t)} for t in (10, 2, 0, 1)])
    assert numeric == {"0": 0, "1": 1, "2": 2, "10": 3}


def test_task_map_round_trip_and_validation(tmp_path: Path) -> None:
    task_map = {"b": 1, "a": 0, "c": 2}
    save_task_map(task_map, tmp_path / "task_map.json")
    assert json.loads((tmp_path / "task_map.json").read_text()) == {"a": 0, "b": 1, "c": 2}
    assert load_task_map(tmp_path / "task_map.json") == task_map
    (tmp_path / "gap.json").write_text('{"a": 0, "b": 2}')
    with pytest.raises(DataError, match="0..1"):
        load_task_map(tmp_path / "gap.json")
    (tmp_path / "bad.json").write_text('{"a": "0"}')
    with pytest.raises(DataError, match="integer id"):
        load_task_map(tmp_path / "bad.json")


def test_save_records_is_atomic_and_round_trips(tmp_path: Path) -> None:
    records = load_records(_jsonl(tmp_path / "in.jsonl", [GOOD, {**GOOD, "output": "ünïcode\nline"}]))
    out = tmp_path / "out" / "train.json"
    save_records(records, out)
    save_records(records, out)  # overwrite in place
    assert load_records(out) == records
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.json"]  # no temp files left behind
    assert isinstance(json.loads(out.read_text(encoding="utf-8")), list)


def test_record_files_is_the_loaders_selection(tmp_path: Path) -> None:
    """One function picks the training files: any-case extensions in, evaluation splits out (the manifest uses it)."""
    from mtlora.data.records import record_files

    for name in ("a.json", "b.jsonl", "c.JSONL", "dev.jsonl", "task_map.json", "notes.txt"):
        _jsonl(tmp_path / name, [{**GOOD, "task_type": name.split(".")[0]}])
    files = record_files(tmp_path)
    assert [p.name for p in files] == ["a.json", "b.jsonl", "c.JSONL"]
    assert sorted({r["task_type"] for r in load_records(tmp_path)}) == ["a", "b", "c"]
    assert [p.name for p in record_files(tmp_path, include_eval_splits=True)] == [
        "a.json", "b.jsonl", "c.JSONL", "dev.jsonl",
    ]  # fmt: skip


def test_deeply_nested_json_is_a_data_error(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "arr.json").write_text(deep)
    with pytest.raises(DataError, match=r"arr\.json: JSON nested too deeply"):
        load_records(tmp_path / "arr.json")
    _jsonl(tmp_path / "lines.jsonl", [GOOD, '{"a": ' + deep + "}"])
    with pytest.raises(DataError, match=r"lines\.jsonl:2: JSON nested too deeply"):
        load_records(tmp_path / "lines.jsonl")
    (tmp_path / "task_map.json").write_text(deep)
    with pytest.raises(DataError, match="nested too deeply"):
        load_task_map(tmp_path / "task_map.json")
