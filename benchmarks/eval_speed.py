"""Time our MMLU harness-protocol evaluation against lm-evaluation-harness, same model and data, one run.

Both sides get the same model (default: the bundled tiny Llama), the same questions (lm-eval reads our
bundled data through task YAMLs that include its own ``mmlu`` template, see
``mtlora.evaluation.lm_eval_tasks``), the same few-shot count, batch size and context length. The script
then checks that the predictions are identical and the per-choice log-likelihoods agree, and reports

* end-to-end wall time (model load + data + evaluation) of each side, and
* evaluation-only time (lm-eval: from ``simple_evaluate`` start minus its model load, measured separately;
  ours: the scoring loop).

``--max_length`` defaults to 2048 so that 5-shot prompts fit the tiny model without truncation on either
side (the harness would otherwise cut tokens on the left and we would drop whole exemplars, so the inputs
would differ). Rotary position embeddings work past the 512 positions the tiny model was trained on; the
numbers are meaningless as accuracy, but identical inputs are what a timing comparison needs.

    python benchmarks/eval_speed.py                      # 4 subjects, full test sets
    python benchmarks/eval_speed.py --subjects anatomy --limit 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # see mtlora/evaluation/cli.py: spinning threads on a shared CPU

DEFAULT_SUBJECTS = "abstract_algebra,anatomy,astronomy,college_biology"


def run_ours(args: argparse.Namespace, subjects: list[str]) -> dict[str, Any]:
    from mtlora.evaluation import (
        Engine,
        bundled_data_dir,
        evaluate_mmlu,
        load_mmlu_subject,
        load_model_for_eval,
    )

    t0 = time.perf_counter()
    loaded = load_model_for_eval(args.model, device=args.device, dtype="float32")
    data = [load_mmlu_subject(bundled_data_dir("mmlu"), s) for s in subjects]
    t1 = time.perf_counter()
    engine = Engine(loaded, batch_size=args.batch_size, prefix_cache=not args.no_prefix_cache, progress=False)
    result = evaluate_mmlu(engine, data, "harness", args.num_few_shot, args.max_length, limit=args.limit)
    t2 = time.perf_counter()
    return {"result": result, "total_s": t2 - t0, "eval_s": t2 - t1, "stats": dict(engine.stats)}


def run_lm_eval(args: argparse.Namespace, subjects: list[str], workdir: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mtlora.evaluation.lm_eval_tasks import write_lm_eval_tasks
    from mtlora.hub import resolve_model_path

    include_path, names = write_lm_eval_tasks(
        workdir, mmlu_subjects=subjects, mmlu_num_fewshot=args.num_few_shot
    )
    path = resolve_model_path(args.model)
    # Load time of lm-eval's HF wrapper, measured on its own, so it can be subtracted for "eval only".
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    lm = HFLM(
        pretrained=path,
        dtype="float32",
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=args.device,
    )
    t1 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        limit=args.limit,
        batch_size=args.batch_size,
        log_samples=True,
        task_manager=TaskManager(include_path=include_path),
        verbosity="ERROR",
    )
    t2 = time.perf_counter()
    return {"res": res, "names": names, "total_s": t2 - t0, "eval_s": t2 - t1, "load_s": t1 - t0}


def compare(ours: dict[str, Any], theirs: dict[str, Any], subjects: list[str]) -> dict[str, Any]:
    from mtlora.evaluation.lm_eval_tasks import TASK_PREFIX

    n = mismatched = 0
    max_diff = 0.0
    acc: dict[str, tuple[float, float]] = {}
    for s in subjects:
        name = f"{TASK_PREFIX}_mmlu_{s}"
        samples = sorted(theirs["res"]["samples"][name], key=lambda x: x["doc_id"])
        rows = ours["result"]["predictions"][s]
        if len(samples) != len(rows):
            raise SystemExit(f"{s}: lm-eval scored {len(samples)} questions, we scored {len(rows)}")
        for smp, row in zip(samples, rows):
            lls = [float(r[0][0]) for r in smp["resps"]]
            max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lls, row["loglikelihoods"])))
            their_pred = max(range(4), key=lambda i: (lls[i], -i))
            n += 1
            mismatched += int("ABCD"[their_pred] != row["prediction"])
        acc[s] = (float(theirs["res"]["results"][name]["acc,none"]), ours["result"]["subject_scores"][s])
    return {
        "questions": n,
        "prediction_mismatches": mismatched,
        "max_abs_loglik_diff": max_diff,
        "accuracy": acc,
    }


def _times(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['total_s']:.1f}" for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mtlora:stories260k")
    p.add_argument("--subjects", default=DEFAULT_SUBJECTS)
    p.add_argument("--limit", type=int, default=None, help="questions per subject (default: all)")
    p.add_argument("--num_few_shot", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_prefix_cache", action="store_true", help="time ours without the shared-prefix cache")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both sides (default 1: on a shared CPU, 2+ OpenMP threads that get "
        "preempted slow both sides down 10x or more and make the ratio noise); 0 = torch default",
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="alternate the two sides this often; report the fastest"
    )
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    subjects = [s for s in args.subjects.split(",") if s]
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    # Alternate the sides and keep each side's fastest run: the machine may be shared, and a burst of
    # foreign load during one side's only run would otherwise decide the ratio.
    theirs_runs, ours_runs = [], []
    for _ in range(max(1, args.repeats)):
        with tempfile.TemporaryDirectory() as tmp:
            theirs_runs.append(run_lm_eval(args, subjects, tmp))
        ours_runs.append(run_ours(args, subjects))
    theirs = min(theirs_runs, key=lambda r: r["total_s"])
    ours = min(ours_runs, key=lambda r: r["total_s"])
    check = compare(ours, theirs, subjects)

    speed_total = theirs["total_s"] / ours["total_s"]
    speed_eval = theirs["eval_s"] / ours["eval_s"]
    lines = [
        f"MMLU harness protocol, {args.num_few_shot}-shot, {check['questions']} questions "
        f"({', '.join(subjects)}), model {args.model}, batch {args.batch_size}, max_length {args.max_length}, "
        f"device {args.device}, {torch.get_num_threads()} CPU thread(s)",
        "",
        "| | lm-eval | mtlora | speed-up |",
        "|---|---:|---:|---:|",
        f"| end to end (load + eval) | {theirs['total_s']:.2f} s | {ours['total_s']:.2f} s | {speed_total:.1f}x |",
        f"| evaluation only | {theirs['eval_s']:.2f} s | {ours['eval_s']:.2f} s | {speed_eval:.1f}x |",
        f"(fastest of {len(ours_runs)} alternating runs per side; all end-to-end times: lm-eval "
        f"{_times(theirs_runs)} s, mtlora {_times(ours_runs)} s)",
        "",
        f"identical predictions: {check['prediction_mismatches'] == 0} "
        f"({check['prediction_mismatches']} of {check['questions']} differ); "
        f"max |log-likelihood difference| = {check['max_abs_loglik_diff']:.2e}",
        f"tokens through the model (ours): {ours['stats']['tokens_computed']:,} computed, "
        f"{ours['stats']['tokens_cached']:,} reused from the prefix cache",
    ]
    for s, (a_theirs, a_ours) in check["accuracy"].items():
        lines.append(f"  {s}: acc lm-eval {a_theirs:.4f}  mtlora {a_ours:.4f}")
    print("\n".join(lines))
    if args.json:
        payload = {
            "settings": vars(args),
            "lm_eval": {k: theirs[k] for k in ("total_s", "eval_s", "load_s")},
            "mtlora": {k: ours[k] for k in ("total_s", "eval_s", "stats")},
            "speedup_end_to_end": speed_total,
            "speedup_eval_only": speed_eval,
            **check,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if check["prediction_mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
