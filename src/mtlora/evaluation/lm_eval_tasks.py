"""Task definitions that make lm-evaluation-harness read *our* data copy (for cross-checks and timing).

Why: comparing with the harness only means something if both sides see the same questions. lm-eval's own
``mmlu_*`` and ``bbh_fewshot_*`` / ``bbh_cot_fewshot_*`` YAMLs load ``cais/mmlu`` / ``SaylorTwift/bbh``
from the hub; here each generated YAML ``include``-s the installed harness definition (so prompt format,
few-shot sampler, stop sequences, filters and metrics are the harness's own) and replaces only the data
source with local JSONL files converted from the data folder (``dataset_path: json``).

Usage::

    include_path, names = write_lm_eval_tasks(tmp, mmlu_subjects=["anatomy"], bbh_tasks=["navigate"])
    lm_eval.simple_evaluate(model="hf", model_args="pretrained=...", tasks=names,
                            task_manager=lm_eval.tasks.TaskManager(include_path=include_path), ...)

Needs the optional ``lm-eval`` package (``pip install mtlora[eval]``).

From the shell (the recipe for evaluating an exported adapter with lm-eval, offline)::

    mtlora eval lm_eval_tasks --output_dir tasks/ --mmlu_subjects anatomy --bbh_tasks navigate
    lm_eval --model hf --model_args pretrained=BASE,peft=exported/<task> --include_path tasks/ \
        --tasks mtlora_local_mmlu_anatomy,mtlora_local_bbh_fewshot_navigate
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mtlora.errors import MtLoraError
from mtlora.evaluation.data import bundled_data_dir, load_bbh_task, load_mmlu_subject

TASK_PREFIX = "mtlora_local"


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks as tasks
    except ImportError:
        raise MtLoraError("lm-eval is not installed (pip install 'mtlora[eval]')") from None
    return Path(tasks.__file__).resolve().parent


def _yaml(data: dict[str, object]) -> str:
    # JSON is valid YAML and escapes every string unambiguously.
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in data.items()) + "\n"


def write_lm_eval_tasks(
    out_dir: str | Path,
    mmlu_subjects: Sequence[str] = (),
    bbh_tasks: Sequence[str] = (),
    bbh_cot: bool = False,
    mmlu_num_fewshot: int = 5,
    mmlu_data_dir: str | Path | None = None,
    bbh_data_dir: str | Path | None = None,
    bbh_max_gen_toks: int | None = None,
) -> tuple[str, list[str]]:
    """Write JSONL data and task YAMLs into ``out_dir``; return ``(include_path, task_names)``.

    ``bbh_max_gen_toks`` overrides the harness's generation budget (256 / 1024), which a model with a short
    context window cannot afford; the rest of ``generation_kwargs`` is restated unchanged.
    """
    harness = _lm_eval_tasks_dir()
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    mmlu_root = mmlu_data_dir or bundled_data_dir("mmlu")
    for subject in mmlu_subjects:
        subj = load_mmlu_subject(mmlu_root, subject, "test")
        files = {}
        for split, rows in (("dev", subj.dev), ("test", subj.test)):
            path = out / "data" / f"mmlu_{subject}_{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for q in rows:
                    rec = {
                        "question": q.question,
                        "subject": subject,
                        "choices": q.choices,
                        "answer": q.answer,
                    }
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            files[split] = str(path)
        name = f"{TASK_PREFIX}_mmlu_{subject}"
        template = harness / "mmlu" / "default" / "_default_template_yaml"
        spec = {
            "include": str(template),
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "num_fewshot": int(mmlu_num_fewshot),  # the harness YAML leaves it unset (0-shot); pin it
            "description": f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
        }
        (out / f"{name}.yaml").write_text(_yaml(spec), encoding="utf-8")
        names.append(name)
    bbh_root = Path(bbh_data_dir or bundled_data_dir("bbh"))
    variant = "cot_fewshot" if bbh_cot else "fewshot"
    for task in bbh_tasks:
        t = load_bbh_task(bbh_root, task, need_cot=False)
        path = out / "data" / f"bbh_{task}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for ex in t.examples:
                f.write(json.dumps({"input": ex.input, "target": ex.target}, ensure_ascii=False) + "\n")
        name = f"{TASK_PREFIX}_bbh_{variant}_{task}"
        spec = {
            "include": str(harness / "bbh" / variant / f"{task}.yaml"),
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(path)}},
        }
        if bbh_max_gen_toks is not None:
            spec["generation_kwargs"] = {
                "max_gen_toks": int(bbh_max_gen_toks),
                "until": ["</s>", "Q", "\n\n"],
                "do_sample": False,
                "temperature": 0.0,
            }
        (out / f"{name}.yaml").write_text(_yaml(spec), encoding="utf-8")
        names.append(name)
    return str(out), names


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    """``mtlora eval lm_eval_tasks``'s flags."""
    from mtlora.cli_args import Parser, add_output

    p = Parser(
        prog="mtlora eval lm_eval_tasks",
        description="Write lm-evaluation-harness task YAMLs that read the bundled (or given) MMLU/BBH data, so "
        "`lm_eval --include_path DIR` runs offline - e.g. on an exported adapter with "
        "--model_args pretrained=BASE,peft=EXPORT/<task>.",
    )
    add_output(p, help="where the YAMLs and their JSONL data go")
    p.add_argument("--mmlu_subjects", default=None, help="comma-separated MMLU subjects (e.g. anatomy)")
    p.add_argument("--bbh_tasks", default=None, help="comma-separated BBH tasks (e.g. navigate)")
    p.add_argument(
        "--bbh_cot", action="store_true", help="the chain-of-thought BBH variant (bbh_cot_fewshot)"
    )
    p.add_argument("--mmlu_num_fewshot", type=int, default=5, help="MMLU exemplars per prompt")
    p.add_argument(
        "--bbh_max_gen_toks", type=int, default=None, help="override the harness's generation budget"
    )
    p.add_argument("--mmlu_data_dir", default=None, help="MMLU data folder (default: the bundled copy)")
    p.add_argument("--bbh_data_dir", default=None, help="BBH data folder (default: the bundled copy)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``mtlora eval lm_eval_tasks``: write the YAMLs and print the ``lm_eval`` command that uses them."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    subjects, tasks = _names(args.mmlu_subjects), _names(args.bbh_tasks)
    if not subjects and not tasks:
        raise MtLoraError("give --mmlu_subjects and/or --bbh_tasks (comma-separated names)")
    if args.mmlu_num_fewshot < 0:
        raise MtLoraError(f"--mmlu_num_fewshot {args.mmlu_num_fewshot}: must be >= 0")
    include, names = write_lm_eval_tasks(
        args.output_dir,
        subjects,
        tasks,
        bbh_cot=args.bbh_cot,
        mmlu_num_fewshot=args.mmlu_num_fewshot,
        mmlu_data_dir=args.mmlu_data_dir,
        bbh_data_dir=args.bbh_data_dir,
        bbh_max_gen_toks=args.bbh_max_gen_toks,
    )
    print(f"include_path: {include}")
    print(f"tasks: {','.join(names)}")
    print(
        "run: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=BASE[,peft=ADAPTER] "
        f"--include_path {include} --tasks {','.join(names)}"
    )
    return 0
