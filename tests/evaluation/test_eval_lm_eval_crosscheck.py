"""Cross-check against lm-evaluation-harness (the real ``lm-eval`` package, not our code).

lm-eval runs its own ``mmlu``, ``bbh_fewshot`` and ``bbh_cot_fewshot`` task definitions (our generated YAMLs
``include`` them and only point the data at local JSONL copies of the bundled files), with its own HF model
wrapper, on the bundled tiny Llama. ``mtlora eval`` runs the same questions. We require per-choice
log-likelihoods within 1e-4, identical MMLU predictions and accuracies, and identical BBH generations,
extracted answers and accuracies.

Why ``max_length 2048``: the tiny model was trained with 512 positions, and 5-shot MMLU / 3-shot BBH prompts
are longer. With 512, the harness cuts tokens on the left while we drop whole exemplars, so the two sides
would no longer see the same tokens (by design, see prompts.py). Rotary embeddings run past 512 positions,
so with 2048 on both sides nothing is truncated and the inputs are identical (``--allow_beyond_positions``:
mtlora refuses a window beyond the model's positions unless asked). ``max_gen_toks 32`` (instead
of 256/1024) keeps generation short; it is passed to both sides.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlora.cli import main as mtlora_main

SUBJECTS = ["abstract_algebra", "anatomy"]
TASKS = ["boolean_expressions", "navigate"]
COT_TASKS = ["navigate"]
MAX_LENGTH, GEN_TOKS, LIMIT = 2048, 32, 4


@pytest.fixture(scope="module")
def lm_eval_results(tmp_path_factory) -> dict:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from mtlora.evaluation.lm_eval_tasks import write_lm_eval_tasks
    from mtlora.hub import resolve_model_path

    work = tmp_path_factory.mktemp("lm_eval_tasks")
    include, names = write_lm_eval_tasks(work, SUBJECTS, TASKS, bbh_max_gen_toks=GEN_TOKS)
    _, cot_names = write_lm_eval_tasks(work, (), COT_TASKS, bbh_cot=True, bbh_max_gen_toks=GEN_TOKS)
    res = lm_eval.simple_evaluate(  # one run: model loading and task building dominate its time
        model="hf",
        model_args=f"pretrained={resolve_model_path('mtlora:stories260k')},dtype=float32,max_length={MAX_LENGTH}",
        tasks=names + cot_names,
        limit=LIMIT,
        batch_size=4,
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=include),
        verbosity="ERROR",
    )
    results = {
        n: (res["results"][n], sorted(res["samples"][n], key=lambda s: s["doc_id"]))
        for n in names + cot_names
    }
    return results


def _ours(tmp_path: Path, argv: list[str], name: str) -> dict:
    out = tmp_path / name
    common = ["--model_name_or_path", "mtlora:stories260k", "--max_length", str(MAX_LENGTH), "--no_progress",
              "--allow_beyond_positions"]  # fmt: skip
    assert mtlora_main(["eval", *argv, *common, "--batch_size", "4", "--output_dir", str(out)]) == 0
    return json.loads(next(out.glob("*_results.json")).read_text())


@pytest.mark.slow
def test_mmlu_matches_lm_eval(lm_eval_results: dict, tmp_path: Path) -> None:
    ours = _ours(
        tmp_path,
        ["mmlu", "--subjects", ",".join(SUBJECTS), "--limit", str(LIMIT), "--num_few_shot", "5"],
        "mmlu",
    )
    max_diff = 0.0
    for subject in SUBJECTS:
        metrics, samples = lm_eval_results[f"mtlora_local_mmlu_{subject}"]
        rows = ours["predictions"][subject]
        assert len(rows) == len(samples) == LIMIT
        for sample, row in zip(samples, rows):
            theirs = [float(r[0][0]) for r in sample["resps"]]
            max_diff = max(max_diff, *(abs(a - b) for a, b in zip(theirs, row["loglikelihoods"])))
            assert row["num_exemplars"] == 5  # nothing dropped: both sides saw the full 5-shot prompt
            assert (sample["acc"] == 1.0) == row["correct"]
            assert "ABCD"[max(range(4), key=lambda i: (theirs[i], -i))] == row["prediction"]
        assert metrics["acc,none"] == pytest.approx(ours["subject_scores"][subject], abs=1e-12)
    assert max_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("cot", [False, True])
def test_bbh_matches_lm_eval(lm_eval_results: dict, tmp_path: Path, cot: bool) -> None:
    tasks = COT_TASKS if cot else TASKS
    argv = ["bbh", "--tasks", ",".join(tasks), "--limit", str(LIMIT), "--max_new_tokens", str(GEN_TOKS)]
    ours = _ours(tmp_path, argv + (["--cot"] if cot else []), "bbh")
    metric = "exact_match,get-answer" if cot else "exact_match,none"
    for task in tasks:
        metrics, samples = lm_eval_results[f"mtlora_local_bbh_{'cot_fewshot' if cot else 'fewshot'}_{task}"]
        rows = ours["task_results"][task]["predictions"]
        assert len(rows) == len(samples) == LIMIT
        for sample, row in zip(samples, rows):
            assert row["num_exemplars"] == 3
            assert sample["resps"][0][0] == row["output"]  # the generated text, cut at the stop sequences
            assert sample["filtered_resps"][0] == row["prediction"]  # after answer extraction (CoT)
            assert (sample["exact_match"] == 1.0) == row["correct"]
        assert any(r["output"] for r in rows)  # non-trivial: the model did generate text
        assert float(metrics[metric]) == pytest.approx(ours["task_scores"][task], abs=1e-12)
