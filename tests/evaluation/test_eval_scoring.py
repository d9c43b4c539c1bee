"""Scoring rules, prompt fitting and the bundled data (no model needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mtlora.errors import DataError, MtLoraError
from mtlora.evaluation import data as D
from mtlora.evaluation.prompts import (
    PromptParts,
    bbh_harness_parts,
    bbh_paper_parts,
    fit_prompt,
    mmlu_harness_parts,
    mmlu_paper_parts,
)
from mtlora.evaluation.scoring import (
    COT_FALLBACK,
    argmax_choice,
    cut_at_stop,
    exact_match,
    extract_cot_answer,
    paper_bbh_correct,
    paper_mmlu_prediction,
)

# ----------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("output", "target", "paper", "exact"),
    [
        ("No", "No", True, True),
        ("no", "No", True, False),  # paper: case-insensitive
        ("No\n\nQ: next question A: Yes", "No", True, False),  # paper: hallucinated turns still count
        ("I think the answer is (A) or (B)", "(A)", True, False),  # paper: substring anywhere
        ("1", "12", False, False),
        (" No", "No", True, False),  # harness does not strip
    ],
)
def test_lenient_substring_vs_exact_match(output: str, target: str, paper: bool, exact: bool) -> None:
    assert paper_bbh_correct(output, target) is paper
    assert exact_match(output, target) is exact


def test_cut_at_stop_keeps_text_before_the_earliest_stop() -> None:
    stop = ("</s>", "Q", "\n\n")
    assert cut_at_stop("Yes\n\nQ: more", stop) == "Yes"
    assert cut_at_stop("abcQdef\n\nx", stop) == "abc"
    assert cut_at_stop("no stop here", stop) == "no stop here"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Step one. So the answer is No.", "No"),
        ("the answer is (A).", "(A)"),
        ("So the answer is ] } ].", "] } ]"),
        ("first the answer is 3. then the answer is 4.", "3. then the answer is 4"),  # greedy, first match
        ("So the answer is No", "N"),  # the harness regex drops the last character of the line
        ("no final sentence", COT_FALLBACK),
    ],
)
def test_cot_answer_extraction(text: str, answer: str) -> None:
    assert extract_cot_answer(text) == answer


@pytest.mark.parametrize(
    ("decoded", "pred"), [(" B", "B"), ("B.", "B"), ("", "X"), ("\n", "X"), ("Because", "B"), ("c", "c")]
)
def test_paper_mmlu_first_character(decoded: str, pred: str) -> None:
    assert paper_mmlu_prediction(decoded) == pred


def test_argmax_choice_ties_go_to_the_first() -> None:
    assert argmax_choice([-1.0, -0.5, -0.5, -3.0]) == 1
    assert argmax_choice([-2.0, -2.0, -2.0, -2.0]) == 0


# ----------------------------------------------------------------------------------------- prompts


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_fit_prompt_drops_earliest_exemplars_then_header_never_the_question() -> None:
    parts = PromptParts("HEADER\n\n", ["shot1 aaaa\n\n", "shot2 bb\n\n", "shot3 c\n\n"], "QUESTION?\nA:")
    full = parts.render()
    assert fit_prompt(parts, _chars, len(full)).num_shots == 3

    f = fit_prompt(parts, _chars, len(full) - 1)
    assert f.num_shots == 2 and f.text == "HEADER\n\nshot2 bb\n\nshot3 c\n\nQUESTION?\nA:"
    assert f.text.endswith(parts.query) and not f.question_truncated

    f = fit_prompt(parts, _chars, len("HEADER\n\nQUESTION?\nA:"))
    assert (f.num_shots, f.header_kept) == (0, True)

    f = fit_prompt(parts, _chars, len("QUESTION?\nA:"))
    assert (f.num_shots, f.header_kept, f.text) == (0, False, "QUESTION?\nA:")

    f = fit_prompt(parts, _chars, 5)  # only when the question alone exceeds the window
    assert f.question_truncated and f.ids == _chars("QUESTION?\nA:")[-5:]


def test_prompt_formats() -> None:
    q = D.MMLUQuestion(" What? ", ["a", "b", "c", "d"], 2)
    dev = [D.MMLUQuestion("Dev q", ["w", "x", "y", "z"], 1)]
    paper = mmlu_paper_parts(dev, q)
    assert (
        paper.render()
        == "Question: Dev q\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\nQuestion:  What? \nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )
    harness = mmlu_harness_parts("high_school_us_history", dev, q)
    assert harness.render() == (
        "The following are multiple choice questions (with answers) about high school us history.\n\n"
        "Dev q\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\nWhat?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )
    ex = D.BBHExample("2+2?", "4")
    assert bbh_paper_parts([D.BBHExample("1+1?", "2")], ex).render() == "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA:"
    task = D.load_bbh_task(D.bundled_data_dir("bbh"), "navigate", need_cot=True)
    direct = bbh_harness_parts(task, ex, 3, cot=False).render()
    assert direct.startswith("Given a series of navigation instructions") and direct.endswith(
        "A: Yes\n\nQ: 2+2?\nA:"
    )
    cot = bbh_harness_parts(task, ex, 3, cot=True).render()
    assert cot.endswith("So the answer is Yes.\n\nQ: 2+2?\nA: Let's think step by step.\n")


# ----------------------------------------------------------------------------------------- data


def test_bundled_data_is_complete_with_licences() -> None:
    bbh, mmlu = D.bundled_data_dir("bbh"), D.bundled_data_dir("mmlu")
    for path in (
        bbh / "LICENSE",
        bbh / "SOURCE.md",
        mmlu / "LICENSE",
        mmlu / "SOURCE.md",
        mmlu / "README.md",
    ):
        assert path.is_file(), path
    total = 0
    for task in D.BBH_TASKS:
        t = D.load_bbh_task(bbh, task, need_cot=True)
        assert t.cot is not None and len(t.cot.inputs) == 3
        total += len(t.examples)
    assert total == 6511
    counts = {"dev": 0, "val": 0, "test": 0}
    for split in counts:
        files = sorted((mmlu / split).glob("*.csv"))
        assert [f.name.rsplit("_", 1)[0] for f in files] == list(D.MMLU_SUBJECTS)
        for f in files:
            with open(f, newline="", encoding="utf-8") as handle:
                counts[split] += sum(1 for _ in csv.reader(handle))
    assert counts == {"dev": 285, "val": 1531, "test": 14042}


def test_cot_prompt_files_match_lm_eval_task_definitions() -> None:
    """Our exemplars (inputs, final answers, rationales, descriptions) equal lm-eval's embedded ones."""
    yaml = pytest.importorskip("yaml")
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    root = Path(lm_eval_tasks.__file__).parent / "bbh"
    for task in D.BBH_TASKS:
        cot = D.load_bbh_task(D.bundled_data_dir("bbh"), task, need_cot=True).cot
        assert cot is not None
        direct = yaml.safe_load((root / "fewshot" / f"{task}.yaml").read_text())
        chain = yaml.safe_load((root / "cot_fewshot" / f"{task}.yaml").read_text())
        assert direct["description"] == chain["description"] == cot.description + "\n\n", task
        assert [s["input"] for s in direct["fewshot_config"]["samples"]] == cot.inputs, task
        assert [s["target"] for s in direct["fewshot_config"]["samples"]] == cot.answers, task
        assert [s["target"] for s in chain["fewshot_config"]["samples"]] == cot.rationales, task


def test_mmlu_categories_match_lm_eval_groups() -> None:
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    yaml = pytest.importorskip("yaml")
    root = Path(lm_eval_tasks.__file__).parent / "mmlu" / "default"
    for subject, category in D.MMLU_CATEGORIES.items():
        spec = yaml.safe_load((root / f"mmlu_{subject}.yaml").read_text())
        assert spec["tag"] == f"mmlu_{category.lower()}_tasks", subject
    assert len(D.MMLU_SUBJECTS) == 57 and len(D.BBH_TASKS) == 27


def test_select_names_rejects_unknown_with_a_hint() -> None:
    assert D.select_names("navigate,navigate", D.BBH_TASKS, "task") == ["navigate"]
    assert D.select_names("all", D.BBH_TASKS, "task") == list(D.BBH_TASKS)
    with pytest.raises(MtLoraError, match="did you mean 'anatomy'"):
        D.select_names("anatomyy", D.MMLU_SUBJECTS, "subject")


def test_paper_layouts_and_content_hash(tmp_path: Path) -> None:
    """The paper code's plain-list BBH files and save_to_disk MMLU folders load to the same content."""
    datasets = pytest.importorskip("datasets")
    bundled = D.load_mmlu_subject(D.bundled_data_dir("mmlu"), "anatomy")
    rows = {
        split: [
            {"question": q.question, "subject": "anatomy", "choices": q.choices, "answer": q.answer}
            for q in qs
        ]
        for split, qs in (("dev", bundled.dev), ("test", bundled.test), ("validation", bundled.dev))
    }
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(
        str(tmp_path / "mmlu" / "anatomy")
    )
    disk = D.load_mmlu_subject(tmp_path / "mmlu", "anatomy")
    assert D.content_hash([disk.dev, disk.test]) == D.content_hash([bundled.dev, bundled.test])

    task = D.load_bbh_task(D.bundled_data_dir("bbh"), "snarks", need_cot=False)
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "snarks.json").write_text(json.dumps([e.__dict__ for e in task.examples]))
    plain = D.load_bbh_task(tmp_path / "bbh", "snarks", need_cot=False)
    assert D.content_hash(plain.examples) == D.content_hash(task.examples)
    with pytest.raises(DataError, match="chain-of-thought prompt"):
        D.load_bbh_task(tmp_path / "bbh", "snarks", need_cot=True)
    with pytest.raises(DataError, match="not found"):
        D.load_mmlu_subject(tmp_path / "mmlu", "virology")
