"""The many-task suite: determinism, >= 30 distinct tasks, interference, splits, scoring, NI v1 loader."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from mtlora.data import load_records, validate_record
from mtlora.data.manytask import (
    ALPHABET,
    PRETRAIN_TASKS,
    TASKS,
    build_suite,
    macro_average,
    normalize_answer,
    pretrain_records,
    score,
    suite_from_niv1,
    task_names,
)
from mtlora.errors import DataError

NIV1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "natural_instructions_v1"


def test_deterministic_and_seed_dependent() -> None:
    a = build_suite(32, 20, 5, seed=3)
    b = build_suite(32, 20, 5, seed=3)
    c = build_suite(32, 20, 5, seed=4)
    assert a.train == b.train and a.test == b.test and a.tasks == b.tasks
    assert a.train != c.train and a.test != c.test


def test_at_least_30_distinct_tasks() -> None:
    assert len(TASKS) >= 30
    suite = build_suite(len(TASKS), 10, 30, seed=0)
    assert len({t.name for t in suite.tasks}) == len(TASKS)
    assert len({t.instruction for t in suite.tasks}) == len(TASKS)
    assert all(t.description and t.family for t in suite.tasks)
    # every pair of tasks is a different function: their answers differ on some test input
    answers: dict[str, tuple[str, ...]] = defaultdict(tuple)
    for r in suite.test:
        answers[r["task_type"]] += (r["output"],)
    assert len(set(answers.values())) == len(TASKS)
    assert task_names()[:30] == [t.name for t in build_suite(30, 2, 2).tasks]


def test_records_are_valid_and_sized() -> None:
    suite = build_suite(36, 50, 10, seed=1)
    assert len(suite.train_records()) == 36 * 50 and len(suite.test_records()) == 36 * 10
    for i, r in enumerate(suite.train + suite.test):
        assert validate_record(dict(r), f"record {i}") == r
        letters = r["input"].split()
        assert 4 <= len(letters) <= 6 and all(c in ALPHABET for c in letters)
    assert {r["task_type"] for r in suite.train} == set(suite.task_names)


def test_interference_same_input_different_outputs() -> None:
    """The property the suite exists for: one input, several instructions, different answers."""
    suite = build_suite(36, 100, 20, seed=0)
    by_input: dict[str, dict[str, str]] = defaultdict(dict)
    for r in suite.train:
        by_input[r["input"]][r["task_type"]] = r["output"]
    shared = [m for m in by_input.values() if len(m) >= 2]
    assert len(shared) > len(by_input) // 2, "most training inputs should appear under several tasks"
    assert sum(len(set(m.values())) >= 2 for m in shared) > 0.9 * len(shared)
    # every test input is asked under every task, with many different answers
    test_by_input: dict[str, dict[str, str]] = defaultdict(dict)
    for r in suite.test:
        test_by_input[r["input"]][r["task_type"]] = r["output"]
    assert len(test_by_input) == 20
    assert all(len(m) == 36 and len(set(m.values())) >= 15 for m in test_by_input.values())


def test_test_inputs_never_trained_on() -> None:
    suite = build_suite(36, 200, 50, seed=0)
    train_inputs = {r["input"] for r in suite.train}
    assert not train_inputs & {r["input"] for r in suite.test}
    pre = pretrain_records(50, seed=0, exclude=suite.test)
    assert not {r["input"] for r in pre} & {r["input"] for r in suite.test}


def test_pretrain_tasks_are_not_suite_tasks() -> None:
    assert not set(PRETRAIN_TASKS) & set(TASKS)
    assert not {t.instruction for t in PRETRAIN_TASKS.values()} & {t.instruction for t in TASKS.values()}
    pre = pretrain_records(10, seed=0)
    assert {r["task_type"] for r in pre} == set(PRETRAIN_TASKS)
    assert pretrain_records(10, seed=0) == pre


def test_known_answers() -> None:
    suite = build_suite(tasks=list(TASKS), train_per_task=1, test_per_task=1, seed=0)
    x = suite.test[0]["input"].split()
    got = {r["task_type"]: r["output"] for r in suite.test}
    assert got["reverse"] == " ".join(x[::-1])
    assert got["sort"] == " ".join(sorted(x))
    assert got["length"] == str(len(x))
    assert got["rotate_left"] == " ".join(x[1:] + x[:1])
    assert got["shift_next"].split()[0] == ALPHABET[(ALPHABET.index(x[0]) + 1) % len(ALPHABET)]
    assert got["has_vowel"] in ("yes", "no")


def test_score_exact_match_per_task() -> None:
    records = [
        {"instruction": "reverse", "input": "a b", "output": "b a", "task_type": "reverse"},
        {"instruction": "reverse", "input": "c d", "output": "d c", "task_type": "reverse"},
        {"instruction": "sort", "input": "b a", "output": "a b", "task_type": "sort"},
    ]
    per_task = score([" b  a", "c d", "a b\n"], records)
    assert per_task == {"reverse": 0.5, "sort": 1.0}
    assert macro_average(per_task) == 0.75
    assert normalize_answer("  x\t y ") == "x y"
    with pytest.raises(DataError):
        score(["a"], records)
    suite = build_suite(30, 2, 3)
    assert macro_average(suite.score([r["output"] for r in suite.test])) == 1.0


def test_bad_arguments() -> None:
    with pytest.raises(DataError, match="unknown"):
        build_suite(tasks=["nope"])
    with pytest.raises(DataError):
        build_suite(0)
    with pytest.raises(DataError):
        build_suite(30, train_per_task=0)


def test_write_is_a_dataset_dir(tmp_path: Path) -> None:
    suite = build_suite(30, 5, 3, seed=0)
    out = suite.write(tmp_path / "data")
    assert load_records(out) == suite.train  # test.json is an evaluation split, meta/ is not scanned
    assert load_records(out / "test.json") == suite.test
    meta = json.loads((out / "meta" / "suite.json").read_text())
    assert [t["name"] for t in meta["tasks"]] == suite.task_names
    assert "| reverse |" in (out / "tasks.md").read_text()


def test_outputs_tokenize_to_few_tokens() -> None:
    """Each answer letter is one token of the tiny model's 512-piece vocabulary; examples stay short."""
    from mtlora.data import encode_record
    from mtlora.hub import load_tokenizer

    tok = load_tokenizer("mtlora:stories260k")
    suite = build_suite(36, 20, 20, seed=0)
    for r in suite.test:
        ids = tok(r["output"], add_special_tokens=False)["input_ids"]
        words = r["output"].split()
        if all(w in ALPHABET for w in words):
            assert len(ids) == len(words), (r, tok.convert_ids_to_tokens(ids))
        else:  # digits and yes/no
            assert len(ids) <= 2
    longest = max(len(encode_record(r, tok, 512)[0]) for r in suite.train + suite.test)
    assert longest <= 40


def _write_niv1_task(root: Path, name: str, n: int, prefix: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    examples = [{"input": f"passage {i}", "target": [f"answer {i % 3}"]} for i in range(n)]
    data = {"name": name, "description": f"desc of {name}", "task_prefix": prefix, "examples": examples}
    (d / "task.json").write_text(json.dumps(data))


def test_suite_from_niv1_synthetic(tmp_path: Path) -> None:
    _write_niv1_task(tmp_path, "subtask001_quoref_question", 30, "Ask a question.")
    _write_niv1_task(tmp_path, "subtask002_quoref_answer", 30, "Answer it.")
    _write_niv1_task(tmp_path, "subtask003_tiny", 5, "Too small.")
    suite = suite_from_niv1(tmp_path, num_tasks=5, train_per_task=20, test_per_task=8, seed=1)
    assert suite.task_names == ["subtask001_quoref_question", "subtask002_quoref_answer"]
    assert len(suite.test) == 16 and len(suite.train) == 40
    assert suite.tasks[0].family == "quoref" and suite.tasks[0].description.startswith("desc")
    for task in suite.task_names:
        tr = {r["input"] for r in suite.train if r["task_type"] == task}
        te = {r["input"] for r in suite.test if r["task_type"] == task}
        assert not tr & te
    again = suite_from_niv1(tmp_path, num_tasks=5, train_per_task=20, test_per_task=8, seed=1)
    assert again.train == suite.train and again.test == suite.test
    with pytest.raises(DataError):
        suite_from_niv1(tmp_path, tasks=["missing"])


@pytest.mark.skipif(not NIV1.is_dir(), reason="shared Natural Instructions v1 data not present")
def test_suite_from_real_niv1() -> None:
    suite = suite_from_niv1(NIV1, num_tasks=30, train_per_task=60, test_per_task=20, seed=0)
    assert len(suite.tasks) == 30
    assert all(sum(r["task_type"] == t for r in suite.test) == 20 for t in suite.task_names)
    assert len({t.instruction for t in suite.tasks}) >= 25
