"""Prompt formats of both protocols, and fitting a prompt into the context window.

A prompt is kept as parts (header, exemplars, query) rather than one string so that a prompt that is too
long can lose *whole exemplars* (earliest first), then the header, and never the question. The paper code
truncated on the right (losing the question and "Answer:" for the long MMLU history subjects) and the
harness cuts tokens on the left (losing the header and cutting an exemplar mid-way); dropping exemplars is
what both intend and keeps the model's input well-formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mtlora.evaluation.data import BBHExample, BBHTask, MMLUQuestion
from mtlora.evaluation.scoring import LETTERS


@dataclass
class PromptParts:
    """``header + shots[-k:] + query``; every shot already ends with its delimiter (``"\\n\\n"``)."""

    header: str
    shots: list[str]
    query: str

    def render(self, num_shots: int | None = None, with_header: bool = True) -> str:
        k = len(self.shots) if num_shots is None else num_shots
        kept = self.shots[len(self.shots) - k :] if k > 0 else []
        return (self.header if with_header else "") + "".join(kept) + self.query


@dataclass
class FittedPrompt:
    """The token ids that will be fed, and what had to be dropped to get there.

    ``group`` identifies prompts that share their text before the query (same header and exemplars), so the
    engine can encode that prefix once per group.
    """

    text: str
    ids: list[int]
    num_shots: int
    header_kept: bool
    question_truncated: bool

    @property
    def group(self) -> tuple[int, bool]:
        return (self.num_shots, self.header_kept)


def fit_prompt(parts: PromptParts, encode: Callable[[str], list[int]], budget: int) -> FittedPrompt:
    """Longest version of the prompt whose token count is ``<= budget``.

    Order of sacrifice: exemplars from the earliest, then the header. If the bare query alone is too long,
    its tokens are cut on the left as a last resort (flagged ``question_truncated``) - that only happens when
    a single question exceeds the whole context window.
    """
    n = len(parts.shots)
    for k in range(n, -1, -1):
        text = parts.render(k)
        ids = encode(text)
        if len(ids) <= budget:
            return FittedPrompt(text, ids, k, True, False)
    if parts.header:
        text = parts.render(0, with_header=False)
        ids = encode(text)
        if len(ids) <= budget:
            return FittedPrompt(text, ids, 0, False, False)
    return FittedPrompt(text, ids[-max(budget, 1) :], 0, not parts.header, True)


# --------------------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------------------


def _choices_block(q: MMLUQuestion) -> str:
    return "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))


def mmlu_paper_parts(dev: Sequence[MMLUQuestion], q: MMLUQuestion) -> PromptParts:
    """Paper: ``Question: q\\nA. ..\\nD. ..\\nAnswer: X\\n\\n`` per exemplar, then ``... Answer:``; no header."""
    shots = [f"Question: {d.question}{_choices_block(d)}\nAnswer: {LETTERS[d.answer]}\n\n" for d in dev]
    return PromptParts("", shots, f"Question: {q.question}{_choices_block(q)}\nAnswer:")


def mmlu_subject_header(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def mmlu_harness_parts(subject: str, dev: Sequence[MMLUQuestion], q: MMLUQuestion) -> PromptParts:
    """Harness ``mmlu``: subject header, ``q.strip()\\nA. ..\\nAnswer:``, target delimiter ``" "``."""
    shots = [f"{d.question.strip()}{_choices_block(d)}\nAnswer: {LETTERS[d.answer]}\n\n" for d in dev]
    return PromptParts(
        mmlu_subject_header(subject), shots, f"{q.question.strip()}{_choices_block(q)}\nAnswer:"
    )


# --------------------------------------------------------------------------------------------------------
# BBH
# --------------------------------------------------------------------------------------------------------


def bbh_paper_parts(exemplars: Sequence[BBHExample], ex: BBHExample) -> PromptParts:
    """Paper: the task's own first items as ``Q: x\\nA: y\\n\\n`` exemplars; no description."""
    shots = [f"Q: {e.input}\nA: {e.target}\n\n" for e in exemplars]
    return PromptParts("", shots, f"Q: {ex.input}\nA:")


def bbh_harness_parts(task: BBHTask, ex: BBHExample, num_shots: int, cot: bool) -> PromptParts:
    """Harness ``bbh_fewshot`` (direct answer) or ``bbh_cot_fewshot``, exemplars from the CoT prompt file.

    Direct: ``Q: x\\nA: answer\\n\\n``. CoT: ``Q: x\\nA: Let's think step by step.\\n<rationale>\\n\\n`` and a
    query ending in ``"Let's think step by step.\\n"`` (target delimiter ``""``). Both start with the task
    description and a blank line.
    """
    assert task.cot is not None
    p = task.cot
    if cot:
        shots = [f"Q: {x}\nA: Let's think step by step.\n{r}\n\n" for x, r in zip(p.inputs, p.rationales)]
        query = f"Q: {ex.input}\nA: Let's think step by step.\n"
    else:
        shots = [f"Q: {x}\nA: {a}\n\n" for x, a in zip(p.inputs, p.answers)]
        query = f"Q: {ex.input}\nA:"
    return PromptParts(p.description + "\n\n", shots[:num_shots], query)
