"""Benchmark data: task lists, the bundled copies of BBH and MMLU, other layouts, and a content hash.

Why a module of its own: the same data must be readable from three places (the copy shipped inside the
package, a user's ``--data_dir`` in either the original or the paper-code layout, and ``cais/mmlu`` on the
hub) and every result file must say *which* data it scored. Loading therefore returns plain Python
objects (no ``datasets`` dependency for the bundled copy) and :func:`content_hash` hashes the *content*
that was evaluated, not file bytes, so the same questions give the same hash whatever the file format.

The package never reads anything outside itself at run time: the default data root is
``mtlora/assets/eval_data`` (see ``assets/eval_data/README.md`` for licences and attribution).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mtlora.errors import DataError, MtLoraError

# --------------------------------------------------------------------------------------------------------
# Task lists
# --------------------------------------------------------------------------------------------------------

BBH_TASKS: tuple[str, ...] = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)

# Suzgun et al. (2022), Table 2: tasks marked as algorithmic; the rest are "NLP" tasks. Reported as BBH
# category scores because a macro average alone hides that the two halves behave very differently.
_BBH_ALGORITHMIC = {
    "boolean_expressions",
    "dyck_languages",
    "geometric_shapes",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
}
BBH_CATEGORIES: dict[str, str] = {t: ("algorithmic" if t in _BBH_ALGORITHMIC else "nlp") for t in BBH_TASKS}

# Hendrycks et al.'s four top-level categories (the same grouping lm-evaluation-harness uses for its
# mmlu_stem / mmlu_humanities / mmlu_social_sciences / mmlu_other groups; a test checks that).
_MMLU_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "social_sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}
MMLU_CATEGORIES: dict[str, str] = {s: c for c, subs in _MMLU_BY_CATEGORY.items() for s in subs}
MMLU_SUBJECTS: tuple[str, ...] = tuple(sorted(MMLU_CATEGORIES))

HUB_PREFIX = "hf:"  # --data_dir hf:cais/mmlu  -> datasets.load_dataset("cais/mmlu", subject)


def select_names(
    requested: str | list[str] | None, known: tuple[str, ...], what: str, flag: str = "--tasks"
) -> list[str]:
    """Parse ``--tasks``/``--subjects`` (comma list, ``all`` or None) and reject unknown names early.

    Failing before the model is loaded matters: a typo should cost a second, not a model load.
    """
    if requested is None:
        return list(known)
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    names = [n.strip() for n in names if n.strip()]
    if not names:  # e.g. --tasks '' from an unset shell variable: never read that as "all of them"
        raise MtLoraError(
            f"{flag} {requested!r}: no {what} names given; list {what}s separated by commas, 'all', or omit "
            f"{flag} for all {len(known)}"
        )
    if names == ["all"]:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        import difflib

        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=1)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise MtLoraError(f"unknown {what} {', '.join(hints)}; known {what}s: {', '.join(known)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------------
# Data roots
# --------------------------------------------------------------------------------------------------------


def bundled_data_dir(benchmark: str) -> Path:
    """Folder of the copy shipped inside the package (``mtlora/assets/eval_data/<benchmark>``)."""
    root = resources.files("mtlora") / "assets" / "eval_data" / benchmark
    return Path(str(root))


def resolve_data_dir(benchmark: str, data_dir: str | None) -> str | Path:
    """The user's ``--data_dir`` (a path, or ``hf:<repo>`` for MMLU), else the bundled copy."""
    if data_dir is None:
        path = bundled_data_dir(benchmark)
        if not path.is_dir():
            raise DataError(
                f"bundled {benchmark} data not found at {path} (broken install?); pass --data_dir"
            )
        return path
    if data_dir.startswith(HUB_PREFIX):
        if benchmark != "mmlu":
            raise MtLoraError(f"--data_dir {data_dir}: the hub option exists only for MMLU")
        return data_dir
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"{benchmark} data directory not found: {path}")
    return path


# --------------------------------------------------------------------------------------------------------
# BBH
# --------------------------------------------------------------------------------------------------------


@dataclass
class BBHExample:
    input: str
    target: str


@dataclass
class BBHCotPrompt:
    """One task's chain-of-thought prompt file, parsed.

    ``rationales`` are the text after ``"A: Let's think step by step."`` (leading whitespace removed); ``answers`` are the final
    answers (what follows ``"So the answer is "``, without the closing period): the direct-answer
    exemplars of ``bbh_fewshot`` are ``(inputs[i], answers[i])``.
    """

    description: str
    inputs: list[str]
    rationales: list[str]
    answers: list[str]


@dataclass
class BBHTask:
    name: str
    examples: list[BBHExample]
    cot: BBHCotPrompt | None = None


_COT_MARK = "\nA: Let's think step by step."
_ANSWER_RE = re.compile(r"(?<=answer is )(.*)(?=.)")


def parse_cot_prompt(text: str, source: str = "<cot prompt>") -> BBHCotPrompt:
    """Split a BBH ``cot-prompts/<task>.txt`` file into description and 3 exemplars.

    Layout: a canary line, ``-----``, the task description (may span paragraphs), then blocks
    ``Q: ...\\nA: Let's think step by step.\\n<rationale ending in 'So the answer is X.'>`` separated by
    blank lines. The description is everything before the first ``\\n\\nQ: ``.
    """
    body = text.split("\n-----\n", 1)[-1].strip("\n")
    pieces = body.split("\n\nQ: ")
    description, blocks = pieces[0], pieces[1:]
    if description.startswith("Q: "):
        raise DataError(f"{source}: no task description before the first exemplar")
    inputs, rationales, answers = [], [], []
    for i, block in enumerate(blocks):
        if _COT_MARK not in block:
            raise DataError(f"{source}: exemplar {i + 1} lacks {_COT_MARK.strip()!r}")
        question, rationale = block.split(_COT_MARK, 1)
        # Usually a newline follows the mark; sports_understanding has a space. The harness normalises both
        # to its "...step by step.\n" prompt, so the rationale is stored without the separator.
        rationale = rationale.lstrip()
        match = _ANSWER_RE.findall(rationale)
        if not match:
            raise DataError(f"{source}: exemplar {i + 1} has no 'the answer is ...' sentence")
        inputs.append(question)
        rationales.append(rationale)
        answers.append(match[0].strip())
    if not blocks:
        raise DataError(f"{source}: no exemplars found")
    return BBHCotPrompt(description=description, inputs=inputs, rationales=rationales, answers=answers)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to parse") from None


def _bbh_task_file(root: Path, task: str) -> Path:
    for candidate in (root / "bbh" / f"{task}.json", root / f"{task}.json"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"BBH task file for {task!r} not found under {root} (looked for bbh/{task}.json and {task}.json)"
    )


def load_bbh_task(root: Path, task: str, need_cot: bool) -> BBHTask:
    """Read one task. Accepts the original ``{"examples": [...]}`` file and the paper code's plain list."""
    path = _bbh_task_file(root, task)
    raw = _read_json(path)
    items = raw.get("examples") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of examples or an object with 'examples'")
    examples = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("input"), str) or "target" not in item:
            raise DataError(f"{path}: example {i} needs string fields 'input' and 'target'")
        examples.append(BBHExample(input=item["input"], target=str(item["target"])))
    cot = None
    if need_cot:
        cot_path = None
        for candidate in (root / "cot-prompts" / f"{task}.txt", root.parent / "cot-prompts" / f"{task}.txt"):
            if candidate.is_file():
                cot_path = candidate
                break
        if cot_path is None:
            raise DataError(
                f"BBH chain-of-thought prompt for {task!r} not found (need {root / 'cot-prompts' / (task + '.txt')}); "
                "the harness protocol takes its exemplars from these files"
            )
        cot = parse_cot_prompt(cot_path.read_text(encoding="utf-8"), str(cot_path))
    return BBHTask(name=task, examples=examples, cot=cot)


# --------------------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------------------


@dataclass
class MMLUQuestion:
    question: str
    choices: list[str]
    answer: int  # 0..3


@dataclass
class MMLUSubject:
    name: str
    dev: list[MMLUQuestion]
    test: list[MMLUQuestion] = field(default_factory=list)


def _read_mmlu_csv(path: Path) -> list[MMLUQuestion]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise DataError(f"{path}:{lineno}: expected question,A,B,C,D,answer-letter")
            rows.append(MMLUQuestion(question=row[0], choices=row[1:5], answer="ABCD".index(row[5].strip())))
    return rows


def _from_hf_rows(rows: Any, where: str) -> list[MMLUQuestion]:
    out = []
    for i, r in enumerate(rows):
        try:
            ans = r["answer"]
            ans = "ABCD".index(ans) if isinstance(ans, str) else int(ans)
            out.append(MMLUQuestion(question=r["question"], choices=list(r["choices"]), answer=ans))
        except (KeyError, ValueError, TypeError):
            raise DataError(f"{where}: row {i} needs question, choices[4], answer") from None
    return out


def load_mmlu_subject(root: str | Path, subject: str, split: str = "test") -> MMLUSubject:
    """Read ``dev`` (exemplars) and ``split`` for one subject from any supported layout.

    Layouts: Hendrycks CSVs (``dev/<s>_dev.csv``, ``test/<s>_test.csv``, ``val/<s>_val.csv``);
    the paper code's ``save_to_disk`` folders (``<s>/dataset_dict.json`` with a ``validation`` split);
    ``hf:<repo>`` (``datasets.load_dataset(repo, s)``, needs network or a warm cache).
    """
    hf_split = {"val": "validation"}.get(split, split)
    if isinstance(root, str) and root.startswith(HUB_PREFIX):
        repo = root[len(HUB_PREFIX) :]
        try:
            import datasets

            ds = datasets.load_dataset(repo, subject)
        except Exception as exc:  # offline, unknown repo, ...: one clear line
            raise DataError(f"could not load {repo!r} subject {subject!r} from the hub: {exc}") from None
        return MMLUSubject(
            subject, _from_hf_rows(ds["dev"], f"{repo}/dev"), _from_hf_rows(ds[hf_split], repo)
        )
    root = Path(root)
    disk = root / subject
    if (disk / "dataset_dict.json").is_file():
        try:
            import datasets

            ds = datasets.load_from_disk(str(disk))
        except Exception as exc:
            raise DataError(f"{disk}: cannot read the saved dataset ({exc})") from None
        return MMLUSubject(
            subject, _from_hf_rows(ds["dev"], f"{disk}/dev"), _from_hf_rows(ds[hf_split], str(disk))
        )
    dev_path = root / "dev" / f"{subject}_dev.csv"
    split_path = root / split / f"{subject}_{split}.csv"
    for p in (dev_path, split_path):
        if not p.is_file():
            raise DataError(f"MMLU file not found: {p} (expected the Hendrycks CSV layout under {root})")
    return MMLUSubject(subject, _read_mmlu_csv(dev_path), _read_mmlu_csv(split_path))


# --------------------------------------------------------------------------------------------------------
# Hash
# --------------------------------------------------------------------------------------------------------


def content_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of what was evaluated (format-independent, order-sensitive)."""

    def plain(x: Any) -> Any:
        if hasattr(x, "__dataclass_fields__"):
            return {k: plain(getattr(x, k)) for k in x.__dataclass_fields__}
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    blob = json.dumps(plain(obj), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
