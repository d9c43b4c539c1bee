"""Scoring rules of the two protocols, as small pure functions (unit-tested one by one).

Why separate: the protocols differ mostly here, and the differences are large (the paper's lenient BBH
substring match scores hallucinated continuations as correct; harness exact match does not). Keeping each
rule a one-liner with a name makes the JSON's ``protocol`` field mean something precise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# the harness acc rule lives with Engine.choose; re-exported here, where the other scoring rules are
from mtlora.inference.engine import argmax_choice  # noqa: F401

LETTERS = ("A", "B", "C", "D")

# lm-evaluation-harness bbh_cot_fewshot filter: text after "the answer is " up to (not including) the last
# character of that line (the closing period); first match wins; "[invalid]" when there is none.
COT_ANSWER_PATTERN = re.compile(r"(?<=the answer is )(.*)(?=.)")
COT_FALLBACK = "[invalid]"

HARNESS_BBH_STOP = ("</s>", "Q", "\n\n")


def paper_bbh_correct(prediction: str, target: str) -> bool:
    """Paper ``eval_bbh.py``: the target is a case-insensitive substring of the output, or its prefix.

    ``prediction`` is the stripped decoded 32-token continuation. Lenient on purpose in the original
    (short targets such as "No" or "(A)" match inside hallucinated follow-up turns); reproduced as is.
    """
    return target.lower() in prediction.lower() or prediction.startswith(target)


def exact_match(prediction: str, target: str) -> bool:
    """Harness ``exact_match``: case- and whitespace-sensitive string equality (no normalisation)."""
    return prediction == target


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    """Keep the text before the earliest stop sequence (what ``generate_until`` returns)."""
    for s in stop:
        if s:
            text = text.split(s, 1)[0]
    return text


def extract_cot_answer(text: str) -> str:
    """Harness ``bbh_cot`` answer extraction (see :data:`COT_ANSWER_PATTERN`)."""
    found = COT_ANSWER_PATTERN.findall(text)
    return found[0].strip() if found else COT_FALLBACK


def paper_mmlu_prediction(decoded_token: str) -> str:
    """Paper ``eval_mmlu.py``: first character of the stripped 1-token generation, else ``"X"``.

    There is no restriction to A-D: any other first character (or an empty generation) is simply wrong.
    """
    s = decoded_token.strip()
    return s[0] if s else "X"


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
