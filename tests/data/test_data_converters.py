"""Converters on the real shared samples, per-task capping, the `mtlora data` CLI, and bad-input errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mtlora.cli import main as mtlora_main
from mtlora.data import (
    cap_per_task,
    convert_dolly,
    convert_flan,
    convert_flan_cot,
    convert_niv1,
    load_records,
)
from mtlora.data.cli import main as data_main
from mtlora.errors import DataError

DOLLY_COUNTS = {
    "open_qa": 74,
    "general_qa": 42,
    "classification": 36,
    "brainstorming": 35,
    "closed_qa": 28,
    "information_extraction": 22,
    "summarization": 20,
    "creative_writing": 12,
}
FLAN_COT_ROWS = {
    "aqua": 2728,
    "creak": 6915,
    "ecqa": 7112,
    "gsm8k": 7473,
    "qasc": 1084,
    "sensemaking": 6070,
    "strategyqa": 2061,
}


def test_dolly_sample(shared_data) -> None:
    path = shared_data("dolly15k_sample", "dolly_sample.jsonl")
    records = convert_dolly(path).records
    assert len(records) == 269
    assert Counter(r["task_type"] for r in records) == DOLLY_COUNTS
    first = json.loads(path.read_text().splitlines()[0])
    assert records[0] == {
        "instruction": "When did Virgin Australia start operating?",
        "input": first["context"],
        "output": first["response"],
        "task_type": "closed_qa",
    }
    assert any(r["input"] == "" for r in records)  # open_qa etc. have no context


def test_flan_cot_full_and_fields(shared_data) -> None:
    directory = shared_data("flan_v2_cot")
    converted = convert_flan_cot(directory)
    assert [f.name for f in converted.files] == sorted(f"{t}_train.tsv" for t in FLAN_COT_ROWS)
    assert Counter(r["task_type"] for r in converted.records) == FLAN_COT_ROWS
    gsm8k = convert_flan_cot(directory / "gsm8k_train.tsv").records
    assert gsm8k[0]["instruction"].startswith("Natalia sold clips to 48 of her friends")
    assert gsm8k[0]["input"] == ""
    assert gsm8k[0]["output"] == (
        "Natalia sold 48 / 2 = 24 clips in May. Natalia sold 48 + 24 = 72 clips altogether in April and May. "
        "So the answer is 72."
    )
    aqua = convert_flan_cot(directory / "aqua_train.tsv").records[0]
    assert "\nOptions:\n(A) 300" in aqua["instruction"] and "\\n" not in aqua["instruction"]  # unescaped
    assert aqua["output"].endswith("So the answer is (C).")


def test_flan_cot_max_per_task_is_seeded_and_order_stable(shared_data, tmp_path: Path) -> None:
    directory = shared_data("flan_v2_cot")
    out = tmp_path / "a"
    assert data_main(["flan-cot", str(directory), str(out), "--max-per-task", "5"]) == 0
    records = load_records(out / "train.json")
    assert len(records) == 35
    assert Counter(r["task_type"] for r in records) == {task: 5 for task in FLAN_COT_ROWS}

    # same seed -> byte-identical file; other seed -> other sample
    data_main(["flan-cot", str(directory), str(tmp_path / "b"), "--max-per-task", "5", "--seed", "42"])
    assert (out / "train.json").read_bytes() == (tmp_path / "b" / "train.json").read_bytes()
    data_main(["flan-cot", str(directory), str(tmp_path / "c"), "--max-per-task", "5", "--seed", "7"])
    assert load_records(tmp_path / "c" / "train.json") != records

    # kept records appear in their original relative order
    full = convert_flan_cot(directory).records
    position = {json.dumps(r, sort_keys=True): i for i, r in enumerate(full)}
    indices = [position[json.dumps(r, sort_keys=True)] for r in records]
    assert indices == sorted(indices)


def test_cap_per_task_sample_of_one_task_ignores_other_tasks() -> None:
    records = [
        {"instruction": f"q{i}", "input": "", "output": "a", "task_type": "t" + str(i % 3)} for i in range(90)
    ]
    capped = cap_per_task(records, 4, seed=1)
    only_t0 = cap_per_task([r for r in records if r["task_type"] == "t0"], 4, seed=1)
    assert [r for r in capped if r["task_type"] == "t0"] == only_t0
    assert cap_per_task(records, None) == records
    assert cap_per_task(records, 1000) == records
    with pytest.raises(DataError, match="max-per-task"):
        cap_per_task(records, 0)


def test_niv1_layouts(shared_data) -> None:
    root = shared_data("natural_instructions_v1")
    converted = convert_niv1(root)
    assert len(converted.files) == 61
    assert len(converted.records) == 6058
    assert len({r["task_type"] for r in converted.records}) == 61

    task_dir = root / "subtask002_quoref_answer_generation"
    task = json.loads((task_dir / "task.json").read_text())
    one = convert_niv1(task_dir).records
    assert one == convert_niv1(task_dir / "task.json").records
    assert len(one) == len(task["examples"])
    assert one[0] == {
        "instruction": task["task_prefix"].strip(),
        "input": task["examples"][0]["input"],
        "output": task["examples"][0]["target"][0],
        "task_type": "subtask002_quoref_answer_generation",
    }
    assert one[0]["instruction"].startswith("Definition:") and "Prompt:" in one[0]["instruction"]


def test_flan_fixture(fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = fixtures_dir / "flan_tiny.jsonl"
    records = convert_flan(path).records
    assert len(records) == 7
    assert records[1] == {
        "instruction": "Translate to French: The cat sleeps.",
        "input": "",
        "output": "Le chat dort.",
        "task_type": "wmt14_enfr_10templates",
    }
    assert data_main(["flan", str(path), str(tmp_path), "--max-per-task", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("flan: 5 records, 3 tasks (sampled from 7)")
    assert Counter(r["task_type"] for r in load_records(tmp_path / "train.json")) == {
        "anli_r1_10templates": 2,
        "wmt14_enfr_10templates": 2,
        "cnn_dailymail_10templates": 1,
    }


def test_dispatcher_runs_each_format(shared_data, fixtures_dir: Path, tmp_path: Path, capsys) -> None:
    cases = {
        "dolly": (shared_data("dolly15k_sample", "dolly_sample.jsonl"), "269 records, 8 tasks"),
        "niv1": (
            shared_data("natural_instructions_v1", "subtask001_quoref_question_generation"),
            "100 records, 1 tasks",
        ),
        "flan": (fixtures_dir / "flan_tiny.jsonl", "7 records, 3 tasks"),
    }
    for fmt, (path, expected) in cases.items():
        assert mtlora_main(["data", fmt, str(path), str(tmp_path / fmt)]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and expected in out[0], out
        assert load_records(tmp_path / fmt / "train.json")


# ------------------------------------------------------------------------------------------ bad inputs


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_flan_cot_wrong_column_count(tmp_path: Path) -> None:
    path = _write(tmp_path / "toy_train.tsv", "q1\ta1\tr1\nq2\ta2\n")
    with pytest.raises(DataError, match=r"toy_train\.tsv:2: expected 3 tab-separated columns"):
        convert_flan_cot(path)
    good = _write(tmp_path / "toy_train.tsv", "q1\tyes\tbecause\r\n\n")
    assert convert_flan_cot(good).records == [
        {"instruction": "q1", "input": "", "output": "because So the answer is yes.", "task_type": "toy"}
    ]


def test_dolly_errors_and_skip_empty(tmp_path: Path) -> None:
    ok = {"instruction": "i", "context": "", "response": "r", "category": "c"}
    bad = {k: v for k, v in ok.items() if k != "response"}
    path = _write(tmp_path / "d.jsonl", json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'response'"):
        convert_dolly(path)
    path = _write(tmp_path / "d.jsonl", json.dumps(ok) + "\n" + json.dumps({**ok, "response": " "}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'response' is empty"):
        convert_dolly(path)
    converted = convert_dolly(path, skip_empty=True)
    assert len(converted.records) == 1 and converted.skipped_empty == 1
    path = _write(tmp_path / "d.jsonl", json.dumps(ok) + "\n{broken\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        convert_dolly(path)


def test_flan_wrong_type(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.jsonl", json.dumps({"inputs": "x", "targets": 3, "task": "t"}) + "\n")
    with pytest.raises(DataError, match=r"f\.jsonl:1: field 'targets' must be a string"):
        convert_flan(path)


def test_niv1_bad_example(tmp_path: Path) -> None:
    task = {
        "name": "t",
        "task_prefix": "Do it.",
        "examples": [{"input": "a", "target": ["b"]}, {"target": ["c"]}],
    }
    path = _write(tmp_path / "task.json", json.dumps(task))
    with pytest.raises(DataError, match=r"task\.json\[example 1\]: missing field 'input'"):
        convert_niv1(path)
    task["examples"][1] = {"input": "a", "target": []}
    _write(path, json.dumps(task))
    with pytest.raises(DataError, match=r"\[example 1\]: field 'target'"):
        convert_niv1(path)
    task["examples"][1] = {"input": "a", "target_scores": {"no": 0, "yes": 1}}
    _write(path, json.dumps(task))
    assert convert_niv1(tmp_path).records[1]["output"] == "yes"


def test_cli_reports_user_errors_as_one_line(tmp_path: Path, capsys) -> None:
    rc = mtlora_main(["data", "dolly", str(tmp_path / "missing.jsonl"), str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_existing_train_json_is_kept_without_overwrite(fixtures_dir: Path, tmp_path: Path, capsys) -> None:
    """Issue 15: converting into a folder that already holds train.json refuses (one line) unless asked."""
    src = fixtures_dir / "flan_tiny.jsonl"
    assert mtlora_main(["data", "flan", str(src), str(tmp_path / "o")]) == 0
    (tmp_path / "o" / "train.json").write_text("[]\n")
    capsys.readouterr()
    assert mtlora_main(["data", "flan", str(src), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds train.json" in err[0] and "--overwrite_output_dir" in err[0]
    assert (tmp_path / "o" / "train.json").read_text() == "[]\n"
    assert mtlora_main(["data", "flan", str(src), str(tmp_path / "o"), "--overwrite-output-dir"]) == 0
    assert load_records(tmp_path / "o" / "train.json")
