"""MMLU under the paper protocol or the lm-evaluation-harness protocol.

* ``paper`` (released ``eval_mmlu.py``): ``Question:/Answer:`` prompt without a header, 5 dev exemplars,
  one greedy token, its first character compared with the letter (no restriction to A-D), micro average;
  category scores are unweighted means of subject accuracies.
* ``harness`` (lm-eval ``mmlu``): subject header, ``q\\nA. ..\\nAnswer:``, the log-likelihoods of the
  continuations ``" A" .. " D"`` ranked (``acc``), 5-shot from dev (``first_n``), micro average; category
  scores pool questions (``weight_by_size``).

Both drop exemplars (earliest first) when a prompt does not fit, instead of cutting tokens (see prompts.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from mtlora.errors import MtLoraError
from mtlora.evaluation.data import MMLU_CATEGORIES, MMLUSubject, content_hash
from mtlora.evaluation.prompts import fit_prompt, mmlu_harness_parts, mmlu_paper_parts
from mtlora.evaluation.report import category_scores, summarize_rows
from mtlora.evaluation.scoring import LETTERS, mean, paper_mmlu_prediction
from mtlora.inference import ChoiceRequest, Engine, GenRequest

PAPER_PROMPT_LIMIT = 2048  # the released code tokenised with max_length=2048

PROTOCOL_DETAILS = {
    "paper": {
        "prompt": "'Question: {q}\\nA. ..\\nD. ..\\nAnswer: {X}\\n\\n' x k, then 'Question: ...\\nAnswer:'; no header",
        "exemplars": "first k rows of dev",
        "scoring": "greedy next token (= generate 1 token); first character of the stripped decode == letter",
        "average": "micro over questions; category_scores = mean of subject accuracies",
    },
    "harness": {
        "prompt": "header 'The following are multiple choice questions (with answers) about {subject}.\\n\\n', "
        "'{q.strip()}\\nA. ..\\nD. ..\\nAnswer: {X}\\n\\n' x k, then '...\\nAnswer:'",
        "exemplars": "first k rows of dev (first_n)",
        "scoring": "argmax of log P(' A'|' B'|' C'|' D' | prompt) (lm-eval acc)",
        "average": "micro over questions; category_scores pool questions (weight_by_size)",
    },
}


def _letter_cont_len(engine: Engine) -> int:
    """Tokens of the longest answer continuation, so that prompt + continuation fits the window."""
    base = engine.encode("Answer:")
    return max(len(engine.encode("Answer: " + letter)) - len(base) for letter in LETTERS)


def evaluate_mmlu(
    engine: Engine,
    subjects: Sequence[MMLUSubject],
    protocol: str,
    num_few_shot: int,
    max_length: int,
    limit: int | None = None,
) -> dict[str, Any]:
    """Score every subject; return the result dict (without run metadata)."""
    if protocol not in PROTOCOL_DETAILS:
        raise MtLoraError(f"--protocol {protocol!r}: use paper or harness")
    loaded = engine.loaded
    cont_len = _letter_cont_len(engine)
    per_subject: dict[str, tuple[int, int]] = {}
    details: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    hashed: list[Any] = []
    from tqdm.auto import tqdm

    outer = tqdm(
        subjects, desc=f"mmlu ({protocol})", unit="subject", disable=not engine.progress, dynamic_ncols=True
    )
    t0 = time.perf_counter()
    for subj in outer:
        outer.set_postfix_str(subj.name)
        if num_few_shot > len(subj.dev):
            raise MtLoraError(
                f"--num_few_shot {num_few_shot}: subject {subj.name!r} has only {len(subj.dev)} dev rows"
            )
        shots = subj.dev[:num_few_shot]
        items = subj.test[:limit] if limit is not None else subj.test
        hashed.append({"subject": subj.name, "exemplars": shots, "items": items})
        task_id = loaded.task_id_for(subj.name)
        score = _paper_rows if protocol == "paper" else _harness_rows
        rows = score(engine, subj, shots, items, max_length, cont_len, task_id)
        details[subj.name] = summarize_rows(rows, MMLU_CATEGORIES.get(subj.name, "other"), num_few_shot)
        per_subject[subj.name] = (details[subj.name]["correct"], len(rows))
        predictions[subj.name] = rows
    outer.close()
    total_correct = sum(c for c, _ in per_subject.values())
    total = sum(n for _, n in per_subject.values())
    macro_cat, micro_cat = category_scores(per_subject, MMLU_CATEGORIES)
    micro = total_correct / total if total else 0.0
    macro = mean([c / n for c, n in per_subject.values() if n])
    return {
        "benchmark": "mmlu",
        "protocol": protocol,
        "protocol_details": PROTOCOL_DETAILS[protocol],
        "overall_accuracy": micro,
        "micro_average": micro,
        "macro_average": macro,
        "total_correct": total_correct,
        "total_questions": total,
        "category_scores": macro_cat if protocol == "paper" else micro_cat,
        "category_scores_macro": macro_cat,
        "category_scores_micro": micro_cat,
        "subject_scores": {s: d["accuracy"] for s, d in details.items()},
        "subject_details": details,
        "data_sha256": content_hash(hashed),
        "eval_seconds": round(time.perf_counter() - t0, 3),
        "predictions": predictions,
    }


def _paper_rows(
    engine: Engine,
    subj: MMLUSubject,
    shots: Sequence[Any],
    items: Sequence[Any],
    max_length: int,
    cont_len: int,
    task_id: int | None,
) -> list[dict[str, Any]]:
    """Paper protocol: one greedy next token per question, its first character is the prediction."""
    budget = min(max_length, PAPER_PROMPT_LIMIT)
    fitted = [fit_prompt(mmlu_paper_parts(shots, q), engine.encode, budget) for q in items]
    tokens = engine.next_token_argmax(
        [GenRequest(f.ids, f.group) for f in fitted], task_id=task_id, desc=subj.name
    )
    rows = []
    for i, (q, f, tok) in enumerate(zip(items, fitted, tokens)):
        generated = engine.tokenizer.decode([tok], skip_special_tokens=True)
        pred = paper_mmlu_prediction(generated)
        rows.append(
            {
                "index": i,
                "answer": LETTERS[q.answer],
                "prediction": pred,
                "generated": generated,
                "correct": pred == LETTERS[q.answer],
                "num_exemplars": f.num_shots,
                "question_truncated": f.question_truncated,
            }
        )
    return rows


def _harness_rows(
    engine: Engine,
    subj: MMLUSubject,
    shots: Sequence[Any],
    items: Sequence[Any],
    max_length: int,
    cont_len: int,
    task_id: int | None,
) -> list[dict[str, Any]]:
    """Harness protocol: the letter continuation with the highest log-likelihood (:meth:`Engine.choose`)."""
    budget = max_length + 1 - cont_len
    fitted = [fit_prompt(mmlu_harness_parts(subj.name, shots, q), engine.encode, budget) for q in items]
    requests = []
    for f in fitted:
        full_ctx = engine.encode(f.text) if f.question_truncated else f.ids
        choices = [engine.encode(f.text + " " + letter)[len(full_ctx) :] for letter in LETTERS]
        requests.append(ChoiceRequest(f.ids, choices, f.group))
    picked = engine.choose(requests, max_length, task_id=task_id, desc=subj.name)
    rows = []
    for i, (q, f, c) in enumerate(zip(items, fitted, picked)):
        rows.append(
            {
                "index": i,
                "answer": LETTERS[q.answer],
                "prediction": LETTERS[c.best],
                "correct": c.best == q.answer,
                "loglikelihoods": c.loglikelihoods,
                "num_exemplars": f.num_shots,
                "question_truncated": f.question_truncated,
            }
        )
    return rows
