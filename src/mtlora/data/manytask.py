"""A deterministic many-task suite: ~40 letter-string tasks that share one input distribution.

Why this exists: multi-task adapter methods (HydraLoRA, mtLoRA) only differ from plain LoRA when tasks
*interfere*, i.e. when one shared set of adapter weights cannot serve every task at once. Real instruction
mixtures (Dolly, Flan) are too large and too hard for a CPU-sized model, so this module generates a suite
that a 260K-parameter model can learn in minutes yet still forces that compromise:

* every task reads the same kind of input -- 4 to 6 space-separated letters such as ``b d a c e`` -- and
  the training inputs come from one shared pool, so the *same input* appears under several task
  instructions with *different outputs* (``reverse`` -> ``e c a d b``, ``sort`` -> ``a b c d e``, ...);
  only the instruction tells the tasks apart;
* tasks come in families (positions, rotations, letter shifts, ordering, counting, expansion) whose members
  are near-misses of each other (rotate left vs. rotate right, next vs. previous letter), the strongest
  kind of interference;
* the test inputs are disjoint from every training input, so test accuracy measures the learned rule,
  not memorisation; and the *same* test inputs are used for every task, so per-task scores are comparable.

Tokenisation: letters come from the 20-letter alphabet :data:`ALPHABET`, exactly the lowercase letters
whose ``▁x`` piece exists in the 512-piece SentencePiece vocabulary of ``mtlora:stories260k``, so each
space-separated letter is one token (``b d a`` -> ``▁b ▁d ▁a``); numbers and yes/no answers are two
tokens. A whole example (BOS, instruction, input, separator, output, EOS) stays under 40 tokens, which
keeps training steps cheap on a CPU. (The first input letter follows a newline and is encoded without
``▁``; the target side, which is what is scored, is always the ``▁x`` form.)

API::

    suite = build_suite(num_tasks=36, train_per_task=200, test_per_task=40, seed=0)
    suite.tasks                      # [TaskInfo(name, instruction, description, family), ...]
    suite.train_records()            # mtlora records {instruction, input, output, task_type}
    suite.write("data/")             # data/train.json, data/test.json, data/tasks.md, data/meta/suite.json
    scores = score(predictions, suite.test_records())   # {task: exact-match accuracy}

:func:`suite_from_niv1` builds a :class:`Suite` of the same shape from the Natural Instructions v1 tasks
(for GPU runs with a real model): there, interference comes from task families that share inputs
(e.g. the MC-TACO question/answer/wrong-answer generation tasks read the same passages).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtlora.data.records import Record, save_records, write_json_atomic
from mtlora.errors import DataError

__all__ = [
    "ALPHABET",
    "PRETRAIN_TASKS",
    "TASKS",
    "VOWELS",
    "Suite",
    "TaskInfo",
    "build_suite",
    "macro_average",
    "normalize_answer",
    "pretrain_records",
    "score",
    "suite_from_niv1",
    "task_names",
]

#: The letters used in inputs: each has a single ``▁x`` piece in the stories260k vocabulary.
ALPHABET: tuple[str, ...] = tuple("abcdefghklmnoprstuwy")
#: Vowels of :data:`ALPHABET` (for the counting / yes-no tasks).
VOWELS: frozenset[str] = frozenset("aeou")
MIN_LEN, MAX_LEN = 4, 6

Letters = list[str]


@dataclass(frozen=True)
class TaskInfo:
    """One task of a suite: its ``task_type`` name, the instruction the model sees, and what it does."""

    name: str
    instruction: str
    description: str
    family: str


@dataclass(frozen=True)
class _Task:
    info: TaskInfo
    fn: Callable[[Letters], str]


def _join(xs: Sequence[str]) -> str:
    return " ".join(xs)


def _shift(c: str, k: int) -> str:
    return ALPHABET[(ALPHABET.index(c) + k) % len(ALPHABET)]


def _dedupe(xs: Letters) -> Letters:
    seen: set[str] = set()
    out = []
    for c in xs:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _swap_pairs(xs: Letters) -> Letters:
    out = list(xs)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def _t(name: str, instruction: str, family: str, description: str, fn: Callable[[Letters], str]) -> _Task:
    return _Task(TaskInfo(name, instruction, description, family), fn)


# Registry order interleaves the families, so the first N tasks of any N >= 6 cover every family.
_REGISTRY: tuple[_Task, ...] = (
    _t("copy", "copy", "position", "the input unchanged", _join),
    _t("rotate_left", "rotate left", "rotate", "move the first letter to the end", lambda x: _join(x[1:] + x[:1])),
    _t("shift_next", "next letter", "shift", "replace each letter by the next one in ALPHABET (y -> a)",
       lambda x: _join(_shift(c, 1) for c in x)),
    _t("sort", "sort", "order", "letters in alphabetical order (repeats kept)", lambda x: _join(sorted(x))),
    _t("length", "length", "count", "number of letters (a digit)", lambda x: str(len(x))),
    _t("double_each", "double each", "expand", "every letter written twice in a row",
       lambda x: _join(c for c in x for _ in range(2))),
    _t("reverse", "reverse", "position", "the letters in reverse order", lambda x: _join(x[::-1])),
    _t("rotate_right", "rotate right", "rotate", "move the last letter to the front",
       lambda x: _join(x[-1:] + x[:-1])),
    _t("shift_prev", "previous letter", "shift", "replace each letter by the previous one in ALPHABET (a -> y)",
       lambda x: _join(_shift(c, -1) for c in x)),
    _t("sort_desc", "sort down", "order", "letters in reverse alphabetical order (repeats kept)",
       lambda x: _join(sorted(x, reverse=True))),
    _t("count_vowels", "count vowels", "count", "how many letters are vowels (a e o u), a digit",
       lambda x: str(sum(c in VOWELS for c in x))),
    _t("mirror", "mirror", "expand", "the input followed by its reverse", lambda x: _join(x + x[::-1])),
    _t("first", "first letter", "position", "the first letter", lambda x: x[0]),
    _t("rotate_left_2", "rotate left twice", "rotate", "move the first two letters to the end",
       lambda x: _join(x[2:] + x[:2])),
    _t("shift_skip", "skip a letter", "shift", "replace each letter by the one two places later in ALPHABET",
       lambda x: _join(_shift(c, 2) for c in x)),
    _t("min", "smallest", "order", "the alphabetically first letter", lambda x: min(x)),
    _t("count_distinct", "how many different", "count", "number of distinct letters, a digit",
       lambda x: str(len(set(x)))),
    _t("say_twice", "say twice", "expand", "the input written twice", lambda x: _join(x + x)),
    _t("last", "last letter", "position", "the last letter", lambda x: x[-1]),
    _t("rotate_right_2", "rotate right twice", "rotate", "move the last two letters to the front",
       lambda x: _join(x[-2:] + x[:-2])),
    _t("reverse_next", "reverse and next", "shift", "reverse, then replace each letter by the next one",
       lambda x: _join(_shift(c, 1) for c in x[::-1])),
    _t("max", "largest", "order", "the alphabetically last letter", lambda x: max(x)),
    _t("has_vowel", "has a vowel", "count", "yes if any letter is a vowel (a e o u), else no",
       lambda x: _yes(any(c in VOWELS for c in x))),
    _t("first_thrice", "first three times", "expand", "the first letter written three times",
       lambda x: _join([x[0]] * 3)),
    _t("first_two", "first two", "position", "the first two letters", lambda x: _join(x[:2])),
    _t("swap_ends", "swap ends", "rotate", "exchange the first and the last letter",
       lambda x: _join(x[-1:] + x[1:-1] + x[:1])),
    _t("sort_unique", "sort unique", "order", "distinct letters in alphabetical order",
       lambda x: _join(sorted(set(x)))),
    _t("all_different", "all different", "count", "yes if no letter repeats, else no",
       lambda x: _yes(len(set(x)) == len(x))),
    _t("last_two", "last two", "position", "the last two letters", lambda x: _join(x[-2:])),
    _t("swap_pairs", "swap pairs", "rotate", "swap letters 1-2, 3-4, 5-6 (an odd last letter stays)",
       lambda x: _join(_swap_pairs(x))),
    _t("dedupe", "remove repeats", "order", "drop every repeated letter, keeping first occurrences in order",
       lambda x: _join(_dedupe(x))),
    _t("first_before_last", "first before last", "count",
       "yes if the first letter comes strictly before the last in ALPHABET, else no",
       lambda x: _yes(ALPHABET.index(x[0]) < ALPHABET.index(x[-1]))),
    _t("drop_first", "drop first", "position", "all letters but the first", lambda x: _join(x[1:])),
    _t("drop_last", "drop last", "position", "all letters but the last", lambda x: _join(x[:-1])),
    _t("odd_places", "odd places", "position", "letters 1, 3, 5 (every second letter from the first)",
       lambda x: _join(x[0::2])),
    _t("even_places", "even places", "position", "letters 2, 4, 6 (every second letter from the second)",
       lambda x: _join(x[1::2])),
)  # fmt: skip

# Base pre-training tasks: the same inputs and answer formats, but none of them is a suite task (no mapping
# below equals a suite task's mapping), so a base pre-trained on them has learnt to read and write letter
# lists, digits and yes/no, and to stop with EOS -- what a real pretrained LLM brings -- without having seen
# any instruction it is later evaluated on.
_PRETRAIN_REGISTRY: tuple[_Task, ...] = (
    _t("second", "second letter", "position", "the second letter", lambda x: x[1]),
    _t("third", "third letter", "position", "the third letter", lambda x: x[2]),
    _t("first_three", "first three", "position", "the first three letters", lambda x: _join(x[:3])),
    _t("last_three", "last three", "position", "the last three letters", lambda x: _join(x[-3:])),
    _t("first_and_last", "first and last", "position", "the first and the last letter",
       lambda x: _join([x[0], x[-1]])),
    _t("drop_two", "drop two", "position", "all letters but the first two", lambda x: _join(x[2:])),
    _t("every_third", "every third", "position", "letters 1 and 4", lambda x: _join(x[0::3])),
    _t("rotate_left_3", "rotate left three", "rotate", "move the first three letters to the end",
       lambda x: _join(x[3:] + x[:3])),
    _t("reverse_first_three", "reverse first three", "rotate", "reverse the first three letters only",
       lambda x: _join(x[:3][::-1] + x[3:])),
    _t("shift_three", "three letters on", "shift", "each letter three places later in ALPHABET",
       lambda x: _join(_shift(c, 3) for c in x)),
    _t("shift_back_two", "two letters back", "shift", "each letter two places earlier in ALPHABET",
       lambda x: _join(_shift(c, -2) for c in x)),
    _t("reverse_prev", "reverse and previous", "shift", "reverse, then each letter one place earlier",
       lambda x: _join(_shift(c, -1) for c in x[::-1])),
    _t("sort_first_three", "sort first three", "order", "the first three letters in alphabetical order",
       lambda x: _join(sorted(x[:3]))),
    _t("count_first", "count first", "count", "how often the first letter occurs, a digit",
       lambda x: str(x.count(x[0]))),
    _t("starts_vowel", "starts with a vowel", "count", "yes if the first letter is a vowel, else no",
       lambda x: _yes(x[0] in VOWELS)),
    _t("odd_length", "odd length", "count", "yes if the number of letters is odd, else no",
       lambda x: _yes(len(x) % 2 == 1)),
    _t("last_twice", "last two times", "expand", "the last letter written twice",
       lambda x: _join([x[-1]] * 2)),
    _t("first_then_all", "first then all", "expand", "the first letter, then the whole input",
       lambda x: _join(x[:1] + x)),
)  # fmt: skip

#: Every generated task (name -> TaskInfo), in registry order.
TASKS: dict[str, TaskInfo] = {t.info.name: t.info for t in _REGISTRY}
#: Base pre-training tasks (disjoint from :data:`TASKS`), see :func:`pretrain_records`.
PRETRAIN_TASKS: dict[str, TaskInfo] = {t.info.name: t.info for t in _PRETRAIN_REGISTRY}
_FNS: dict[str, Callable[[Letters], str]] = {t.info.name: t.fn for t in _REGISTRY + _PRETRAIN_REGISTRY}


def task_names() -> list[str]:
    """Names of every generated task, in registry order (``build_suite(n)`` takes the first ``n``)."""
    return list(TASKS)


def normalize_answer(text: str) -> str:
    """Collapse whitespace runs and strip, so ``" b  d"`` == ``"b d"`` (decoding may add a leading space)."""
    return " ".join(str(text).split())


@dataclass
class Suite:
    """A multi-task data set: task descriptions plus train/test records (``task_type`` = task name)."""

    tasks: list[TaskInfo]
    train: list[Record]
    test: list[Record]
    name: str = "manytask"
    meta: dict[str, object] = field(default_factory=dict)

    def train_records(self) -> list[Record]:
        return list(self.train)

    def test_records(self) -> list[Record]:
        return list(self.test)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def score(
        self, predictions: Sequence[str], records: Sequence[Mapping[str, str]] | None = None
    ) -> dict[str, float]:
        """Per-task exact-match accuracy of ``predictions`` against ``records`` (default: the test split)."""
        return score(predictions, self.test if records is None else records)

    def write(self, outdir: str | Path) -> Path:
        """Write ``train.json``, ``test.json`` (record arrays), ``tasks.md`` and ``meta/suite.json``.

        The folder stays a valid ``--dataset_dir``: ``load_records(outdir)`` reads only ``train.json``
        (``test*`` files are evaluation splits), which is why the machine-readable task list lives in a
        sub-folder rather than beside the records.
        """
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        save_records(self.train, out / "train.json")
        save_records(self.test, out / "test.json")
        write_json_atomic(out / "tasks.md", self.tasks_markdown() + "\n")
        info = {"name": self.name, "meta": self.meta, "tasks": [asdict(t) for t in self.tasks]}
        write_json_atomic(out / "meta" / "suite.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return out

    def tasks_markdown(self) -> str:
        """A markdown table of the tasks (name, family, instruction, description)."""
        lines = ["| task | family | instruction | description |", "|---|---|---|---|"]
        for t in self.tasks:
            instr = t.instruction if len(t.instruction) <= 60 else t.instruction[:57] + "..."
            cells = [t.name, t.family, f"`{instr}`", t.description]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        return "\n".join(lines)


def score(predictions: Sequence[str], records: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Exact-match accuracy per ``task_type`` (answers compared after :func:`normalize_answer`).

    Returns ``{task: accuracy in [0, 1]}`` in first-seen task order; see :func:`macro_average` for the mean.
    """
    if len(predictions) != len(records):
        raise DataError(f"score: {len(predictions)} predictions for {len(records)} records")
    hits: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for pred, rec in zip(predictions, records):
        task = str(rec["task_type"])
        counts[task] += 1
        hits[task] += normalize_answer(pred) == normalize_answer(rec["output"])
    return {task: hits[task] / counts[task] for task in counts}


def macro_average(per_task: Mapping[str, float]) -> float:
    """Unweighted mean over tasks (every task counts the same, whatever its test size)."""
    return sum(per_task.values()) / len(per_task) if per_task else 0.0


def _draw_inputs(rng: random.Random, n: int, exclude: set[tuple[str, ...]]) -> list[Letters]:
    out: list[Letters] = []
    seen = set(exclude)
    while len(out) < n:
        xs = tuple(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if xs not in seen:
            seen.add(xs)
            out.append(list(xs))
    return out


def build_suite(
    num_tasks: int = 36,
    train_per_task: int = 200,
    test_per_task: int = 40,
    seed: int = 0,
    *,
    tasks: Sequence[str] | None = None,
    pool_factor: float = 3.0,
) -> Suite:
    """Generate the letter-string suite (deterministic for a given set of arguments).

    Args:
        num_tasks: how many tasks, the first ``num_tasks`` of :func:`task_names` (ignored if ``tasks``).
        train_per_task: training examples per task.
        test_per_task: test examples per task; the same test inputs are used for every task.
        seed: seeds the input generator (task definitions are fixed).
        tasks: explicit task names instead of the first ``num_tasks``.
        pool_factor: the training inputs of every task are drawn from one shared pool of
            ``pool_factor * train_per_task`` inputs, so each input appears under about
            ``num_tasks / pool_factor`` instructions (the interference the suite is built for).

    Training records are shuffled across tasks; test records are grouped by task.
    """
    names = list(tasks) if tasks is not None else task_names()[:num_tasks]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise DataError(f"unknown manytask task(s) {unknown}; known: {', '.join(TASKS)}")
    if not names or len(set(names)) != len(names):
        raise DataError(f"need a non-empty list of distinct tasks (num_tasks 1..{len(TASKS)}), got {names}")
    if train_per_task < 1 or test_per_task < 1:
        raise DataError("train_per_task and test_per_task must be >= 1")
    if pool_factor < 1:
        raise DataError("pool_factor must be >= 1")
    rng = random.Random(f"mtlora-manytask-{seed}")
    test_inputs = _draw_inputs(rng, test_per_task, set())
    pool = _draw_inputs(
        rng, max(train_per_task, round(pool_factor * train_per_task)), {tuple(x) for x in test_inputs}
    )
    train: list[Record] = []
    for name in names:
        info, fn = TASKS[name], _FNS[name]
        for xs in rng.sample(pool, train_per_task):
            train.append(Record(instruction=info.instruction, input=_join(xs), output=fn(xs), task_type=name))
    rng.shuffle(train)
    test = [
        Record(instruction=TASKS[name].instruction, input=_join(xs), output=_FNS[name](xs), task_type=name)
        for name in names
        for xs in test_inputs
    ]
    meta = {
        "generator": "mtlora.data.manytask.build_suite",
        "seed": seed,
        "train_per_task": train_per_task,
        "test_per_task": test_per_task,
        "pool_size": len(pool),
        "alphabet": "".join(ALPHABET),
    }
    return Suite(tasks=[TASKS[n] for n in names], train=train, test=test, name="manytask", meta=meta)


def pretrain_records(
    per_task: int = 400, seed: int = 0, *, exclude: Sequence[Mapping[str, str]] = ()
) -> list[Record]:
    """Records of the :data:`PRETRAIN_TASKS` for pre-training a tiny base model (full fine-tuning).

    Why: a 260K-parameter base trained on children's stories cannot learn letter-list tasks through
    adapters alone in CPU minutes (measured: plain LoRA stays at chance). A real LLM already reads and writes
    such lists, so the demo first gives the tiny base that general skill on *these* tasks, which share the
    suite's inputs and answer formats but none of its instructions or mappings. Inputs listed in ``exclude``
    (pass the suite's test records) are never used, so no evaluated input is seen before evaluation.
    """
    if per_task < 1:
        raise DataError("per_task must be >= 1")
    rng = random.Random(f"mtlora-manytask-pretrain-{seed}")
    banned = {tuple(str(r["input"]).split()) for r in exclude}
    out: list[Record] = []
    for name, info in PRETRAIN_TASKS.items():
        for xs in _draw_inputs(rng, per_task, banned):
            out.append(
                Record(instruction=info.instruction, input=_join(xs), output=_FNS[name](xs), task_type=name)
            )
    rng.shuffle(out)
    return out


def suite_from_niv1(
    path: str | Path,
    num_tasks: int = 30,
    train_per_task: int = 80,
    test_per_task: int = 20,
    seed: int = 0,
    *,
    tasks: Sequence[str] | None = None,
    max_output_words: int | None = None,
) -> Suite:
    """The same kind of suite from Natural Instructions v1 ``task.json`` folders (for GPU runs).

    Args:
        path: a directory of NI v1 task folders (e.g. ``../shared/data/natural_instructions_v1``).
        num_tasks: take the first ``num_tasks`` tasks in sorted name order that have enough examples
            (ignored if ``tasks`` names them).
        train_per_task / test_per_task: examples per task, split after a seeded shuffle of each task's
            examples; a task with fewer than ``test_per_task + 1`` usable examples is skipped.
        max_output_words: drop examples whose reference has more words (exact match is only a meaningful
            score for short answers); ``None`` keeps everything.

    The instruction is the task's full ``task_prefix`` (as :func:`mtlora.data.convert_niv1` maps it).
    """
    from mtlora.data.converters import convert_niv1

    converted = convert_niv1(path, skip_empty=True)
    by_task: dict[str, list[Record]] = defaultdict(list)
    for rec in converted.records:
        if max_output_words is None or len(rec["output"].split()) <= max_output_words:
            by_task[rec["task_type"]].append(rec)
    descriptions: dict[str, str] = {}
    for file in converted.files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        name = data.get("name") or file.parent.name
        descriptions[str(name)] = str(data.get("description") or "").strip()
    if tasks is not None:
        missing = [t for t in tasks if t not in by_task]
        if missing:
            raise DataError(f"{path}: task(s) {missing} not found (or no usable examples)")
        names = list(tasks)
    else:
        names = [t for t in sorted(by_task) if len(by_task[t]) > test_per_task][:num_tasks]
    if not names:
        raise DataError(
            f"{path}: no Natural Instructions v1 task has more than {test_per_task} usable examples"
        )
    rng = random.Random(f"mtlora-niv1-{seed}")
    train: list[Record] = []
    test: list[Record] = []
    infos = []
    for name in names:
        recs = list(by_task[name])
        rng.shuffle(recs)
        test.extend(recs[:test_per_task])
        train.extend(recs[test_per_task : test_per_task + train_per_task])
        parts = name.split("_")
        family = parts[1] if len(parts) > 1 else name
        infos.append(TaskInfo(name, recs[0]["instruction"], descriptions.get(name, ""), family=family))
    rng.shuffle(train)
    meta = {
        "generator": "mtlora.data.manytask.suite_from_niv1",
        "source": str(path),
        "seed": seed,
        "train_per_task": train_per_task,
        "test_per_task": test_per_task,
        "max_output_words": max_output_words,
    }
    return Suite(tasks=infos, train=train, test=test, name="niv1", meta=meta)
