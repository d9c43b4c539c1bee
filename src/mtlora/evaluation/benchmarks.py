"""One :class:`Benchmark` object per ``mtlora eval`` benchmark (MMLU, BBH).

Why: ``mtlora eval`` used to fork on ``benchmark == "mmlu"`` in a dozen places (arguments, validation, data
loading, evaluation, summary rows, notes, result keys). Each benchmark now owns what differs - its own flags,
checks, data, evaluation call, summary rows and notes - and :func:`mtlora.evaluation.cli.run` is one straight
line over any of them. The ``<name>_results.json`` / ``.md`` files keep their keys and order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mtlora.errors import MtLoraError

#: ``--adaptive_max_length``: the released eval_mmlu.py's window per shot count (2048 otherwise).
ADAPTIVE_MAX_LENGTH = {0: 768, 1: 1024, 2: 1280, 3: 1536, 4: 1792, 5: 2048}


def released_mmlu_skeleton(root: Path, names: list[str]) -> bool:
    """Whether every selected subject folder under ``root`` is a ``save_to_disk`` skeleton without data.

    That is the released ``data/mmlu_dataset`` as shipped: ``dataset_dict.json`` and per-split metadata whose
    ``.arrow`` files were gitignored and never committed (spec section 8.3).
    """
    folders = [root / n for n in names]
    return bool(folders) and all(
        (f / "dataset_dict.json").is_file() and not any(f.rglob("*.arrow")) for f in folders
    )


def positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    """``--name`` must be > 0 (or >= 0): one error line naming the flag."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise MtLoraError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


class Benchmark:
    """What one benchmark adds to the shared ``mtlora eval`` flow (see :func:`mtlora.evaluation.cli.run`)."""

    name: str = ""
    few_shot_default: int = 0
    data_alias: str = ""  # the paper's name of --data_dir
    data_note: str = ""  # extra sources --data_dir accepts
    names_flag: str = "--tasks"  # the flag that selects tasks/subjects
    names_label: str = "task"
    name_header: str = "task"  # first column of the markdown table
    details_key: str = ""  # per task/subject results (each with "total" and "accuracy")
    bulky_key: str = ""  # the long per-item list, written last in the JSON
    total_key: str = ""
    head_keys: tuple[str, ...] = ()

    def known_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        """Flags of this benchmark only (task selection and its generation/split options)."""

    def add_late_arguments(self, p: argparse.ArgumentParser) -> None:
        """Flags placed after the shared ones in ``--help`` (kept where they always were)."""

    def validate(self, args: argparse.Namespace) -> None:
        """Checks of this benchmark's flags, before anything is loaded."""

    def resolve_root(self, args: argparse.Namespace, names: list[str]) -> tuple[str | Path, str]:
        """(data root, label recorded in the results) from ``--data_dir``."""
        from mtlora.evaluation import data as D

        root = D.resolve_data_dir(self.name, args.data_dir)
        return root, (str(root) if args.data_dir else "bundled")

    def load_data(self, root: str | Path, names: list[str], args: argparse.Namespace) -> list[Any]:
        raise NotImplementedError

    def max_length(self, args: argparse.Namespace, model_max: int) -> int:
        """The context window: ``--max_length``, else the model's."""
        return args.max_length or model_max

    def extra_settings(self, args: argparse.Namespace) -> dict[str, Any]:
        """Settings recorded after the shared ones in the results file."""
        return {}

    def evaluate(self, engine: Any, dataset: list[Any], args: argparse.Namespace, max_length: int) -> dict:
        raise NotImplementedError

    def title_suffix(self, result: dict) -> str:
        return ""

    def notes(self, result: dict, args: argparse.Namespace, max_length: int) -> list[str]:
        """Notes for stderr after the table (prompts that lost exemplars, ...)."""
        per = result[self.details_key]
        fewer = sum(d["prompts_with_fewer_exemplars"] for d in per.values())
        if not fewer:
            return []
        cut = sum(d["questions_truncated"] for d in per.values())
        return [
            f"note: {fewer} of {result[self.total_key]} prompts kept fewer than {args.num_few_shot} exemplars "
            f"to fit the {max_length}-token window"
            + (f"; {cut} questions alone were longer and were cut" if cut else "")
        ]

    def rows(self, result: dict) -> list[tuple[str, int, float]]:
        """(name, total, accuracy) per task/subject for the markdown table."""
        return [(n, d["total"], d["accuracy"]) for n, d in result[self.details_key].items()]

    def summary_rows(self, result: dict) -> list[tuple[str, int | None, float]]:
        rows: list[tuple[str, int | None, float]] = [
            (k, result[self.total_key] if k != "macro_average" else None, result[k]) for k in self.head_keys
        ]
        rows += [(f"category {cat}", None, acc) for cat, acc in result["category_scores"].items()]
        return rows


class MMLU(Benchmark):
    name = "mmlu"
    few_shot_default = 5
    data_alias = "--mmlu_data_dir"
    data_note = " or hf:cais/mmlu (needs network)"
    names_flag = "--subjects"
    names_label = "subject"
    name_header = "subject"
    details_key = "subject_details"
    bulky_key = "predictions"
    total_key = "total_questions"
    head_keys = ("overall_accuracy", "micro_average", "macro_average")

    def known_names(self) -> tuple[str, ...]:
        from mtlora.evaluation.data import MMLU_SUBJECTS

        return MMLU_SUBJECTS

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--subjects", "--tasks", dest="names", default=None, help="comma list (default: all 57)"
        )
        p.add_argument(
            "--split", choices=("test", "val"), default="test", help="evaluated split (default test)"
        )

    def add_late_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--adaptive_max_length",
            action="store_true",
            help="context window from the shot count as released (768 + 256 per exemplar: 2048 at 5-shot), "
            "at most the model's; --max_length wins",
        )

    def resolve_root(self, args: argparse.Namespace, names: list[str]) -> tuple[str | Path, str]:
        from mtlora.evaluation import data as D

        root, label = super().resolve_root(args, names)
        if isinstance(root, Path) and released_mmlu_skeleton(root, names):
            print(
                f"note: {root} is the released mmlu_dataset skeleton without its .arrow data files; using the "
                "bundled MMLU (the same 57 subjects, 14,042 test questions)",
                file=sys.stderr,
            )
            return D.resolve_data_dir(self.name, None), f"bundled (fallback: {root} has no .arrow files)"
        return root, label

    def load_data(self, root: str | Path, names: list[str], args: argparse.Namespace) -> list[Any]:
        from mtlora.evaluation import data as D

        dataset = [D.load_mmlu_subject(root, n, args.split) for n in names]
        max_shots = min(len(s.dev) for s in dataset)
        if args.num_few_shot > max_shots:
            raise MtLoraError(
                f"--num_few_shot {args.num_few_shot}: MMLU dev has {max_shots} exemplars per subject"
            )
        return dataset

    def max_length(self, args: argparse.Namespace, model_max: int) -> int:
        length = args.max_length or model_max
        if args.adaptive_max_length and not args.max_length:
            length = min(length, ADAPTIVE_MAX_LENGTH.get(args.num_few_shot, 2048))
        return length

    def extra_settings(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"adaptive_max_length": args.adaptive_max_length, "split": args.split}

    def evaluate(self, engine: Any, dataset: list[Any], args: argparse.Namespace, max_length: int) -> dict:
        from mtlora.evaluation.mmlu import evaluate_mmlu

        return evaluate_mmlu(engine, dataset, args.protocol, args.num_few_shot, max_length, args.limit)


class BBH(Benchmark):
    name = "bbh"
    few_shot_default = 3
    data_alias = "--bbh_data_dir"
    names_flag = "--tasks"
    names_label = "task"
    name_header = "task"
    details_key = "task_results"
    bulky_key = "task_results"
    total_key = "total_samples"
    head_keys = ("average_accuracy", "macro_average", "micro_average")

    def known_names(self) -> tuple[str, ...]:
        from mtlora.evaluation.data import BBH_TASKS

        return BBH_TASKS

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--tasks", dest="names", default=None, help="comma list (default: all 27)")
        p.add_argument(
            "--cot",
            action="store_true",
            help="harness bbh_cot_fewshot (chain of thought) instead of bbh_fewshot",
        )
        p.add_argument(
            "--max_new_tokens", type=int, default=None, help="default: paper 32, harness 256, --cot 1024"
        )

    def validate(self, args: argparse.Namespace) -> None:
        positive("max_new_tokens", args.max_new_tokens)
        if args.cot and args.protocol == "paper":
            raise MtLoraError(
                "--cot is a harness variant (bbh_cot_fewshot); the paper protocol has no CoT "
                "(add --protocol harness)"
            )

    def load_data(self, root: str | Path, names: list[str], args: argparse.Namespace) -> list[Any]:
        from mtlora.evaluation import data as D

        dataset = [D.load_bbh_task(Path(root), n, need_cot=args.protocol == "harness") for n in names]
        if args.protocol == "harness" and args.num_few_shot > 3:
            raise MtLoraError(
                f"--num_few_shot {args.num_few_shot}: the harness protocol has 3 fixed exemplars per task"
            )
        return dataset

    def evaluate(self, engine: Any, dataset: list[Any], args: argparse.Namespace, max_length: int) -> dict:
        from mtlora.evaluation.bbh import evaluate_bbh

        return evaluate_bbh(
            engine,
            dataset,
            args.protocol,
            args.num_few_shot,
            max_length,
            args.cot,
            args.max_new_tokens,
            args.limit,
        )

    def title_suffix(self, result: dict) -> str:
        return f" ({result['harness_task']})" if result.get("harness_task") else ""

    def notes(self, result: dict, args: argparse.Namespace, max_length: int) -> list[str]:
        notes = super().notes(result, args, max_length)
        if result["max_new_tokens"] < result["max_new_tokens_requested"]:
            notes.append(
                f"note: generation limited to {result['max_new_tokens']} new tokens (requested "
                f"{result['max_new_tokens_requested']}) so that prompts keep half of the {max_length}-token window"
            )
        return notes


#: ``mtlora eval <name>``.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (MMLU(), BBH())}


def get_benchmark(name: str) -> Benchmark:
    """The :class:`Benchmark` called ``name``; one error line naming the choices otherwise."""
    if name not in BENCHMARKS:
        raise MtLoraError(f"unknown benchmark {name!r}; use: mtlora eval {'|'.join(BENCHMARKS)} ...")
    return BENCHMARKS[name]
