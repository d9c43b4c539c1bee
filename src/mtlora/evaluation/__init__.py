"""BBH and MMLU evaluation under the paper protocol and the lm-evaluation-harness protocol.

Command line: ``mtlora eval mmlu|bbh ...`` (see :mod:`mtlora.evaluation.cli`). Python::

    from mtlora.evaluation import Engine, load_model_for_eval, evaluate_mmlu, load_mmlu_subject
    loaded = load_model_for_eval("mtlora:stories260k")
    subjects = [load_mmlu_subject(bundled_data_dir("mmlu"), "anatomy")]
    result = evaluate_mmlu(Engine(loaded), subjects, "harness", num_few_shot=5, max_length=512)

Heavy imports (torch, transformers) happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from mtlora.evaluation.bbh import evaluate_bbh
from mtlora.evaluation.data import (
    BBH_TASKS,
    MMLU_CATEGORIES,
    MMLU_SUBJECTS,
    bundled_data_dir,
    load_bbh_task,
    load_mmlu_subject,
)
from mtlora.evaluation.loading import LoadedModel, load_model_for_eval
from mtlora.evaluation.mmlu import evaluate_mmlu
from mtlora.inference import Engine

__all__ = [
    "BBH_TASKS",
    "MMLU_CATEGORIES",
    "MMLU_SUBJECTS",
    "Engine",
    "LoadedModel",
    "bundled_data_dir",
    "evaluate_bbh",
    "evaluate_mmlu",
    "load_bbh_task",
    "load_mmlu_subject",
    "load_model_for_eval",
]
