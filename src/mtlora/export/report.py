"""``report.json`` and the model cards: what each task was exported as, how to load it, how it scored."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtlora.deploy import FORM_BUNDLE, FORM_MERGED, FORM_PEFT, PLACEMENT_FORMS, artifact
from mtlora.errors import MtLoraError
from mtlora.export.common import BLOCK_NOT_PEFT, EXPORT_VERSION, REPORT_NAME
from mtlora.export.plan import ExportPlan


def export_format(plan: ExportPlan) -> str:
    return "mtlora_block" if plan.block else "peft_lora"


def new_report(
    plan: ExportPlan,
    base_name: str,
    export_base_name: str,
    base_copy: Any,
    calibration_data: str | Path | None,
    eval_data: str | Path | None,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The report's header (everything but the tasks, filled in per task)."""
    block, kinds = plan.block, plan.kinds
    return {
        "format": "mtlora-export-report",
        "version": EXPORT_VERSION,
        "adapter_dir": str(plan.adapter_dir),
        "base_model": str(base_name),
        "base_model_name_or_path": export_base_name,
        "base_model_copy": base_copy,
        "method": plan.config.method,
        "level": "block" if block else "component",
        "router": sorted(kinds)[0] if len(kinds) == 1 else sorted(kinds),
        "export_format": export_format(plan),
        "peft_compatible": not block,
        "deployable_as": [
            f for f in PLACEMENT_FORMS["block" if block else "component"] if plan.merged or f != FORM_MERGED
        ],
        "note": BLOCK_NOT_PEFT if block else None,
        "exported_metrics_from": "mtlora static-routing forward (equals the exported artefact, see tests)",
        "calibration_data": str(calibration_data) if calibration_data else None,
        "eval_data": str(eval_data)
        if eval_data
        else ("held-out calibration records" if plan.calibrated else None),
        "settings": dict(settings),
        "tasks": {},
    }


def task_entry(
    plan: ExportPlan, task: str, tdir: str, routing: Any, cal: Sequence[Any], ev: Sequence[Any]
) -> dict[str, Any]:
    """One exported task's entry (before its scores)."""
    from mtlora.data.tokenize import records_fingerprint

    return {
        "task_id": plan.task_map.get(task),
        "dir": tdir,
        "format": export_format(plan),
        "merged_dir": f"{tdir}/merged" if plan.merged else None,
        "artifacts": artifacts(tdir, plan.block, plan.merged, plan.out),
        "routing_source": routing.source,
        "calibration_examples": routing.examples,
        "calibration_tokens": routing.tokens,
        "eval_examples": len(ev),
        # content hashes of the records this task's export was calibrated and scored on (model cards)
        "calibration_sha256": records_fingerprint(cal) if cal else None,
        "eval_sha256": records_fingerprint(ev) if ev else None,
    }


def skipped_entry(plan: ExportPlan, task: str, reason: str) -> dict[str, Any]:
    return {"task_id": plan.task_map.get(task), "dir": None, "artifacts": [], "skipped": reason}


def gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def finalize(report: dict[str, Any], plan: ExportPlan, has_default: bool) -> dict[str, Any]:
    """Refuse an export where no task could be exported, add the means, write task map, cards and report."""
    from mtlora.data import save_task_map
    from mtlora.data.records import write_json_atomic

    if plan.tasks and all("skipped" in e for e in report["tasks"].values()) and not has_default:
        raise MtLoraError(
            "no task could be exported: "
            + "; ".join(f"{t}: {e['skipped']}" for t, e in report["tasks"].items())
        )
    scored = [e for e in report["tasks"].values() if "routed" in e]
    if scored:

        def mean(key: str, sub: str) -> float | None:
            vals = [e[key][sub] for e in scored if e[key].get(sub) is not None]
            return sum(vals) / len(vals) if vals else None

        report["mean"] = {
            "routed_accuracy": mean("routed", "accuracy"),
            "exported_accuracy": mean("exported", "accuracy"),
            "routed_nll": mean("routed", "nll"),
            "exported_nll": mean("exported", "nll"),
            "base_nll": mean("base", "nll"),
        }
    if plan.task_map:  # written with the report, so a failed export leaves no stray task map
        save_task_map(plan.task_map, plan.out / "task_map.json")
    write_cards(report, plan.adapter_dir, plan.out)
    write_json_atomic(plan.out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return report


def write_cards(report: dict[str, Any], adapter_dir: Path, out: Path) -> None:
    """README.md model card in every artefact folder (one per folder) and an index card in ``out``."""
    from mtlora.model_card import export_card, export_index_card, gather, write_card

    facts = gather(adapter_dir)
    done: set[str] = set()
    for task, entry in report["tasks"].items():
        for art in entry.get("artifacts", []):
            if art["path"] in done:  # the single export of an unrouted adapter serves every task
                continue
            done.add(art["path"])
            write_card(out / art["path"], export_card(report, task, facts, art["form"], art["path"], out))
    write_card(out, export_index_card(report, facts))


def artifacts(tdir: str, block: bool, merged: bool, out: Path) -> list[dict[str, Any]]:
    """What one task folder can be deployed as, each with the command that loads it (see mtlora.deploy)."""
    if block:
        return [artifact(FORM_BUNDLE, tdir, out)]
    return [artifact(FORM_PEFT, tdir, out)] + (
        [artifact(FORM_MERGED, f"{tdir}/merged", out)] if merged else []
    )
