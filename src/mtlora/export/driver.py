"""The export driver: plan, load, per-task routing, write, score, finalize (:func:`export_adapter`)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from mtlora.atomic import atomic_dir
from mtlora.cli_args import progress_enabled
from mtlora.deploy import export_base
from mtlora.export.block import export_block_adapter
from mtlora.export.calibrate import TaskRouting, estimate_task_routing
from mtlora.export.common import DEFAULT_EXPORT
from mtlora.export.evaluate import export_engine
from mtlora.export.merged import save_merged_model
from mtlora.export.peft import export_peft_lora
from mtlora.export.plan import ExportPlan, check_request, plan_tasks, safe_dir_name
from mtlora.export.report import finalize, gap, new_report, skipped_entry, task_entry
from mtlora.export.static import task_gate_routing
from mtlora.hub import load_model
from mtlora.inference import Engine, encode_examples, score_records
from mtlora.routing.static import static_routing

if TYPE_CHECKING:
    from mtlora.model import MtLoraModel


def export_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    model_name_or_path: str | None = None,
    calibration_data: str | Path | None = None,
    eval_data: str | Path | None = None,
    merged: bool = False,
    tasks: Sequence[str] | None = None,
    max_calibration_per_task: int = 64,
    max_eval_per_task: int = 16,
    eval_fraction: float = 0.2,
    evaluate: bool = True,
    max_seq_length: int = 512,
    template: str = "paper",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    quantization: Any = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Export an mtlora adapter per task and write ``report.json``; returns the report (see the package doc).

    ``quantization`` (``--load_in_kbits``) loads a 4/8-bit base: the exported LoRAs are the same, the report's
    numbers are those of the quantized model, and ``merged`` is refused (packed weights take no delta).
    Calibration uses ``calibration_data`` (records with ``task_type``). Without ``eval_data`` the last
    ``eval_fraction`` (in (0, 1)) of each task's calibration records is held out for the report and not
    calibrated on. A non-empty ``output_dir`` (an earlier export) is refused unless ``overwrite``.
    """
    plan = check_request(
        adapter_dir, output_dir, merged=merged, quantization=quantization, eval_fraction=eval_fraction,
        overwrite=overwrite, max_seq_length=max_seq_length, template=template,
    )  # fmt: skip
    loaded = load_model(
        model_name_or_path, plan.adapter_dir, device=device, dtype=dtype, mtlora_only=True,
        tokenizer_from_adapter=True, freeze=False, quantization=quantization, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    model, tokenizer = loaded.model, loaded.tokenizer
    limits = (max_calibration_per_task, max_eval_per_task)
    plan_tasks(plan, model, calibration_data, eval_data, tasks, limits, eval_fraction)
    plan.out.mkdir(parents=True, exist_ok=True)
    # the base every export names: resolvable by plain transformers (a bundled model is copied beside them)
    export_base_name, base_copy = export_base(str(loaded.model_name_or_path), plan.out)
    settings = {
        "max_calibration_per_task": max_calibration_per_task, "max_eval_per_task": max_eval_per_task,
        "eval_fraction": eval_fraction, "max_seq_length": max_seq_length, "template": template,
        "max_new_tokens": max_new_tokens, "dtype": dtype, "base_quantization": loaded.quantization.record(),
    }  # fmt: skip
    report = new_report(
        plan, loaded.model_name_or_path, export_base_name, base_copy, calibration_data, eval_data, settings
    )
    write = functools.partial(
        write_export, model, block=plan.block, base_name=export_base_name, tokenizer=tokenizer, merged=merged
    )
    taken: set[str] = set()
    default_dir: str | None = None
    if plan.single:  # one export serves every task
        default_dir = report["default_export"] = safe_dir_name(DEFAULT_EXPORT, taken)
        write({}, plan.out / default_dir, task=None)
    engine = export_engine(model, tokenizer, batch_size)
    for t in tqdm(plan.tasks, desc="export", unit="task", disable=not progress_enabled()):
        cal, ev = plan.splits[t]
        routing = routing_for_task(model, tokenizer, plan, t, batch_size)
        if isinstance(routing, str):  # one unusable task must not sink the export of the others
            print(f"warning: task {t!r} not exported: {routing}", file=sys.stderr)
            report["tasks"][t] = skipped_entry(plan, t, routing)
            continue
        tdir = default_dir or safe_dir_name(t, taken)
        if default_dir is None:
            write(routing.probs, plan.out / tdir, task=t)
        entry = task_entry(plan, t, tdir, routing, cal, ev)
        if evaluate and ev:
            entry.update(score_task(engine, model, plan, t, routing, ev, max_new_tokens))
        report["tasks"][t] = entry
    return finalize(report, plan, default_dir is not None)


def routing_for_task(
    model: MtLoraModel, tokenizer: Any, plan: ExportPlan, task: str, batch_size: int
) -> TaskRouting | str:
    """The static routing of ``task`` (exact task gate, calibrated mean, or none), or why it is skipped."""
    cal, _ = plan.splits[task]
    if plan.by_task_id:
        return TaskRouting(probs=task_gate_routing(model, plan.task_map[task]), source="task_gate")
    if not plan.calibrated:
        return TaskRouting(probs={}, source="none")
    if not cal:
        return "no calibration records left after holding out the evaluation records"
    if not encode_examples(cal, tokenizer, plan.max_seq_length, plan.template):
        return (
            f"every calibration record's target is truncated away at --max_seq_length {plan.max_seq_length}"
        )
    return estimate_task_routing(
        model,
        tokenizer,
        cal,
        max_seq_length=plan.max_seq_length,
        template=plan.template,
        batch_size=batch_size,
    )


def score_task(
    engine: Engine,
    model: MtLoraModel,
    plan: ExportPlan,
    task: str,
    routing: TaskRouting,
    records: Sequence[Mapping[str, Any]],
    max_new_tokens: int,
) -> dict[str, Any]:
    """Routed vs exported (static-routing forward) vs base scores of one task's evaluation records."""
    examples = encode_examples(records, engine.tokenizer, plan.max_seq_length, plan.template)
    task_id = plan.task_map[task] if plan.by_task_id else None
    routed = score_records(engine, examples, task_id=task_id, max_new_tokens=max_new_tokens)
    if plan.single:
        exported = routed  # identical by construction: there is no router to freeze
    else:
        with static_routing(model, routing.probs):
            exported = score_records(engine, examples, task_id=task_id, max_new_tokens=max_new_tokens)
    with model.disable_adapters():
        base = score_records(engine, examples, generate=False)
    return {
        "routed": routed.to_dict(),
        "exported": exported.to_dict(),
        "base": {"nll": base.nll},
        "accuracy_gap": gap(routed.accuracy, exported.accuracy),
        "nll_gap": gap(exported.nll, routed.nll),
    }


def write_export(
    model: MtLoraModel,
    probs: Mapping[str, torch.Tensor],
    tdir: Path,
    block: bool,
    base_name: str,
    tokenizer: Any,
    merged: bool,
    task: str | None,
) -> None:
    """One task's export folder, written as a unit (with ``merged/`` inside when asked for)."""
    with atomic_dir(tdir) as tmp:
        if block:
            export_block_adapter(model, probs, tmp, base_model_name_or_path=base_name, task=task)
        else:
            export_peft_lora(model, probs, tmp, base_model_name_or_path=base_name)
        tokenizer.save_pretrained(str(tmp))  # a serving stack can take base, adapter and tokenizer from here
        if merged and not block:
            save_merged_model(model, probs, tmp / "merged", tokenizer=tokenizer)
