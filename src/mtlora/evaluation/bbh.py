"""BIG-Bench Hard under the paper protocol or the lm-evaluation-harness protocols.

* ``paper`` (released ``eval_bbh.py``): the first k items of each task file are the exemplars and are not
  evaluated; ``Q:/A:`` prompt without description; greedy, 32 new tokens, no stop sequence; correct if the
  target is a case-insensitive substring of the stripped output (lenient); macro average over tasks.
* ``harness`` (lm-eval ``bbh_fewshot``): task description + the 3 fixed exemplars of the CoT prompt files
  with their final answers; all items evaluated; greedy until ``"</s>"``, ``"Q"``, ``"\\n\\n"`` or EOS
  (256 tokens); case-sensitive exact match; the group average is micro (``weight_by_size``).
* ``harness`` with ``cot=True`` (lm-eval ``bbh_cot_fewshot``): the same exemplars with their rationales,
  ``"A: Let's think step by step.\\n"``, up to 1024 tokens, the answer taken from ``"the answer is X."``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from mtlora.errors import MtLoraError
from mtlora.evaluation.data import BBH_CATEGORIES, BBHTask, content_hash
from mtlora.evaluation.prompts import bbh_harness_parts, bbh_paper_parts, fit_prompt
from mtlora.evaluation.report import category_scores, summarize_rows
from mtlora.evaluation.scoring import (
    HARNESS_BBH_STOP,
    cut_at_stop,
    exact_match,
    extract_cot_answer,
    mean,
    paper_bbh_correct,
)
from mtlora.inference import Engine, GenRequest

PAPER_PROMPT_LIMIT = 2048
DEFAULT_MAX_NEW_TOKENS = {"paper": 32, "harness": 256, "harness_cot": 1024}

PROTOCOL_DETAILS = {
    "paper": {
        "prompt": "'Q: {input}\\nA: {target}\\n\\n' x k (first k items of the task file), then 'Q: {input}\\nA:'",
        "evaluated_items": "all but the first k",
        "generation": "greedy, 32 new tokens, stops only at EOS",
        "scoring": "target.lower() in output.lower() or output.startswith(target) (lenient)",
        "average": "average_accuracy = macro over tasks",
    },
    "harness": {
        "task": "bbh_fewshot",
        "prompt": "description + '\\n\\n' + 'Q: {input}\\nA: {answer}\\n\\n' x k (fixed CoT-file exemplars), "
        "then 'Q: {input}\\nA:'",
        "evaluated_items": "all",
        "generation": "greedy until '</s>', 'Q', '\\n\\n' or EOS",
        "scoring": "exact match (case-sensitive) of the output cut at the first stop sequence",
        "average": "average_accuracy = micro over items (lm-eval weight_by_size); macro_average also given",
    },
    "harness_cot": {
        "task": "bbh_cot_fewshot",
        "prompt": "description + '\\n\\n' + 'Q: {input}\\nA: Let's think step by step.\\n{rationale}\\n\\n' x k, "
        "then 'Q: {input}\\nA: Let's think step by step.\\n'",
        "evaluated_items": "all",
        "generation": "greedy until '</s>', 'Q', '\\n\\n' or EOS",
        "scoring": "regex '(?<=the answer is )(.*)(?=.)', first match, exact match; '[invalid]' if none",
        "average": "average_accuracy = micro over items (lm-eval weight_by_size); macro_average also given",
    },
}


def evaluate_bbh(
    engine: Engine,
    tasks: Sequence[BBHTask],
    protocol: str,
    num_few_shot: int,
    max_length: int,
    cot: bool = False,
    max_new_tokens: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Score every task; return the result dict (without run metadata)."""
    if protocol not in ("paper", "harness"):
        raise MtLoraError(f"--protocol {protocol!r}: use paper or harness")
    if cot and protocol == "paper":
        raise MtLoraError("--cot is a harness variant (bbh_cot_fewshot); the paper protocol has no CoT")
    variant = "harness_cot" if cot else protocol
    requested_new = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[variant]
    # Keep at least half of the window for the prompt (the harness would refuse to run instead).
    new_tokens = min(requested_new, max(1, max_length // 2))
    budget = max_length - new_tokens
    if protocol == "paper":
        budget = min(budget, PAPER_PROMPT_LIMIT)
    stop = list(HARNESS_BBH_STOP) if protocol == "harness" else []

    loaded = engine.loaded
    per_task: dict[str, tuple[int, int]] = {}
    task_results: dict[str, dict[str, Any]] = {}
    hashed: list[Any] = []
    from tqdm.auto import tqdm

    outer = tqdm(tasks, desc=f"bbh ({variant})", unit="task", disable=not engine.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for task in outer:
        outer.set_postfix_str(task.name)
        items, first_index, parts, exemplars = _task_prompts(task, protocol, num_few_shot, cot, limit)
        hashed.append({"task": task.name, "exemplars": exemplars, "items": items})
        fitted = [fit_prompt(p, engine.encode, budget) for p in parts]
        gens = engine.generate(
            [GenRequest(f.ids, f.group) for f in fitted],
            new_tokens,
            stop=stop,
            task_id=loaded.task_id_for(task.name),
            desc=task.name,
        )
        rows = _rows(items, fitted, gens, protocol, cot, first_index)
        summary = summarize_rows(rows, BBH_CATEGORIES.get(task.name, "nlp"), num_few_shot)
        per_task[task.name] = (summary["correct"], len(rows))
        task_results[task.name] = {**summary, "predictions": rows}
    outer.close()
    result = _result(protocol, cot, variant, per_task, task_results)
    result.update(
        max_new_tokens=new_tokens,
        max_new_tokens_requested=requested_new,
        data_sha256=content_hash(hashed),
        eval_seconds=round(time.perf_counter() - t0, 3),
        task_results=task_results,
    )
    return result


def _task_prompts(
    task: BBHTask, protocol: str, num_few_shot: int, cot: bool, limit: int | None
) -> tuple[list[Any], int, list[Any], Any]:
    """``(evaluated items, index of the first, prompt parts per item, the exemplars)`` of one task."""
    if protocol == "paper":
        if num_few_shot >= len(task.examples):
            raise MtLoraError(
                f"--num_few_shot {num_few_shot}: task {task.name!r} has {len(task.examples)} items"
            )
        shots = task.examples[:num_few_shot]
        items = task.examples[num_few_shot:][:limit]
        return items, num_few_shot, [bbh_paper_parts(shots, ex) for ex in items], shots
    assert task.cot is not None
    if num_few_shot > len(task.cot.inputs):
        raise MtLoraError(
            f"--num_few_shot {num_few_shot}: the harness has {len(task.cot.inputs)} fixed exemplars per task"
        )
    items = task.examples[:limit]
    parts = [bbh_harness_parts(task, ex, num_few_shot, cot) for ex in items]
    return items, 0, parts, bbh_harness_parts(task, task.examples[0], num_few_shot, cot).shots


def _rows(
    items: Sequence[Any],
    fitted: Sequence[Any],
    gens: Sequence[Any],
    protocol: str,
    cot: bool,
    first_index: int,
) -> list[dict[str, Any]]:
    """One prediction row per item: the output, what was extracted from it and whether it is correct."""
    rows = []
    for i, (ex, f, g) in enumerate(zip(items, fitted, gens)):
        if protocol == "paper":
            output = g.text.strip()
            extracted = output
            ok = paper_bbh_correct(output, ex.target)
        else:
            output = cut_at_stop(g.text, HARNESS_BBH_STOP)
            extracted = extract_cot_answer(output) if cot else output
            ok = exact_match(extracted, ex.target)
        rows.append(
            {
                "index": first_index + i,
                "target": ex.target,
                "output": output,
                "prediction": extracted,
                "correct": ok,
                "finish": g.finish,
                "num_exemplars": f.num_shots,
                "question_truncated": f.question_truncated,
            }
        )
    return rows


def _result(
    protocol: str,
    cot: bool,
    variant: str,
    per_task: dict[str, tuple[int, int]],
    task_results: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The averages of the result dict (the protocol decides which average is the headline)."""
    total_correct = sum(c for c, _ in per_task.values())
    total = sum(n for _, n in per_task.values())
    micro = total_correct / total if total else 0.0
    macro = mean([c / n for c, n in per_task.values() if n])
    macro_cat, micro_cat = category_scores(per_task, BBH_CATEGORIES)
    return {
        "benchmark": "bbh",
        "protocol": protocol,
        "harness_task": None if protocol == "paper" else ("bbh_cot_fewshot" if cot else "bbh_fewshot"),
        "protocol_details": PROTOCOL_DETAILS[variant],
        "average_accuracy": macro if protocol == "paper" else micro,
        "macro_average": macro,
        "micro_average": micro,
        "total_correct": total_correct,
        "total_samples": total,
        "category_scores": macro_cat if protocol == "paper" else micro_cat,
        "category_scores_macro": macro_cat,
        "category_scores_micro": micro_cat,
        "task_scores": {t: r["accuracy"] for t, r in task_results.items()},
    }
