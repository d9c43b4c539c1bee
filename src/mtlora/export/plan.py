"""Which tasks an export covers and which records calibrate and score each."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlora.deploy import BASE_COPY_DIR
from mtlora.errors import CheckpointError, MtLoraError
from mtlora.export.common import BLOCK_NOT_PEFT, REPORT_NAME
from mtlora.hub import read_adapter_config, resolve_adapter_dir
from mtlora.outputs import check_output_dir

if TYPE_CHECKING:
    from mtlora.config import MtLoraConfig
    from mtlora.model import MtLoraModel

Records = list[Mapping[str, Any]]


def safe_dir_name(task: str, taken: set[str]) -> str:
    """A folder name for ``task`` (safe characters, not a reserved file name, unique case-insensitively in ``taken``)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("._") or "task"
    if base.lower() in (REPORT_NAME, "task_map.json", BASE_COPY_DIR, "readme.md"):
        base = f"task_{base}"
    name, i = base, 1
    while name.lower() in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name.lower())
    return name


def by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Records grouped by ``task_type`` (first-seen order)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault(str(r["task_type"]), []).append(r)
    return out


def split_held_out(
    records: Sequence[Mapping[str, Any]], fraction: float
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(calibration, evaluation): the last ``fraction`` of each task's records (at least one) is held out."""
    n = len(records)
    if n < 2 or fraction <= 0:
        return list(records), []
    k = min(n - 1, max(1, round(n * fraction)))
    return list(records[: n - k]), list(records[n - k :])


@dataclass
class ExportPlan:
    """Everything :func:`mtlora.export.export_adapter` decided before writing: where, what, which records.

    The routers' capabilities (never their kind names) decide how each task's routing is found:
    ``by_task_id`` (exact, from the task id: MMoELoRA's gate), ``calibrated`` (estimated on data: token
    routers) or neither (one export serves every task: ``single``).
    """

    adapter_dir: Path
    out: Path
    config: MtLoraConfig
    merged: bool
    max_seq_length: int
    template: str
    task_map: dict[str, int] = field(default_factory=dict)
    by_task_id: bool = False
    calibrated: bool = False
    single: bool = False
    kinds: set[str] = field(default_factory=set)
    tasks: list[str] = field(default_factory=list)
    splits: dict[str, tuple[Records, Records]] = field(default_factory=dict)

    @property
    def block(self) -> bool:
        return bool(self.config.enable_block_adapter)


def check_request(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    merged: bool,
    quantization: Any,
    eval_fraction: float,
    overwrite: bool,
    max_seq_length: int,
    template: str,
) -> ExportPlan:
    """Every check that needs no model, in the order the CLI reports them; the plan without tasks yet."""
    from mtlora.config import CONFIG_NAME, MtLoraConfig

    if not (isinstance(eval_fraction, (int, float)) and 0.0 < eval_fraction < 1.0):
        raise MtLoraError(f"--eval_fraction {eval_fraction}: must be in (0, 1), the held-out share per task")
    adapter_dir = resolve_adapter_dir(adapter_dir)  # also a `mtlora train` output dir
    out = check_output_dir(output_dir, overwrite=overwrite, refuse_nonempty=True)
    raw_cfg = read_adapter_config(adapter_dir)
    if "method" not in raw_cfg:
        raise CheckpointError(
            f"{adapter_dir}: peft_type={raw_cfg.get('peft_type')!r} is already a plain adapter"
        )
    plan = ExportPlan(
        adapter_dir,
        out,
        MtLoraConfig.from_json_file(adapter_dir / CONFIG_NAME),
        merged,
        max_seq_length,
        template,
    )
    if merged and plan.block:  # checked before loading anything
        raise MtLoraError(f"--merged: {BLOCK_NOT_PEFT}")
    if merged and quantization is not None and quantization.enabled:
        raise MtLoraError(
            f"--merged with --load_in_kbits {quantization.load_in_kbits}: a merged model is the base's weights "
            "plus each task's delta, and a quantized base has packed weights; export with --load_in_kbits 16 "
            "to merge into the unquantized base (the adapters do not depend on how the base is stored)"
        )
    return plan


def plan_tasks(
    plan: ExportPlan,
    model: MtLoraModel,
    calibration_data: str | Path | None,
    eval_data: str | Path | None,
    tasks: Sequence[str] | None,
    limits: tuple[int, int],
    eval_fraction: float,
) -> ExportPlan:
    """Fill ``plan``: the task map, how routing is found, the tasks and their (calibration, eval) records.

    ``limits`` = (max calibration records, max evaluation records) per task.
    """
    from mtlora.data import build_task_map, load_records, load_task_map

    calib_records = load_records(calibration_data) if calibration_data else []
    eval_records = load_records(eval_data) if eval_data else []
    task_map_path = plan.adapter_dir / "task_map.json"
    if task_map_path.is_file():
        plan.task_map = load_task_map(task_map_path)
    elif calib_records or eval_records:
        plan.task_map = build_task_map(calib_records + eval_records)
    routers = [a.router for a in model.adapters()]
    plan.by_task_id = any(r.needs_task_ids for r in routers)
    plan.calibrated = any(r.needs_calibration for r in routers)
    plan.single = bool(routers) and not any(r.is_routed for r in routers)
    plan.kinds = {r.kind for r in routers}  # for the report only
    if plan.by_task_id and not plan.task_map:
        raise MtLoraError(f"{plan.adapter_dir}: an mmoelora adapter needs task_map.json to know its tasks")
    if plan.calibrated and not calib_records:
        raise MtLoraError(
            "--calibration_data is required: a token router's per-task weights are estimated on data"
        )
    calib_by_task, eval_by_task = by_task(calib_records), by_task(eval_records)
    plan.tasks = _wanted(plan, calib_by_task, eval_by_task, tasks)
    for t in plan.tasks:
        recs = calib_by_task.get(t, [])
        if eval_records:
            cal, ev = list(recs), list(eval_by_task.get(t, []))
        elif plan.calibrated:
            cal, ev = split_held_out(recs, eval_fraction)
        else:  # no calibration needed: every record of the task can serve the report
            cal, ev = [], list(recs)
        plan.splits[t] = (cal[: limits[0]], ev[: limits[1]])
    return plan


def _wanted(
    plan: ExportPlan,
    calib_by_task: Mapping[str, Records],
    eval_by_task: Mapping[str, Records],
    tasks: Sequence[str] | None,
) -> list[str]:
    """The tasks to export: the task map's (task-id routers) or those found in the data, or ``--tasks``."""
    task_map = plan.task_map
    if plan.by_task_id:
        wanted = list(task_map)
    else:
        found = set(calib_by_task) if plan.calibrated else set(calib_by_task) | set(eval_by_task)
        wanted = sorted(found, key=lambda t: (task_map.get(t, 1 << 30), t))
    if tasks:
        missing = [t for t in tasks if t not in wanted]
        if missing:
            raise MtLoraError(f"--tasks {missing}: not among the tasks found ({wanted})")
        wanted = list(tasks)
    if plan.by_task_id:
        unknown = sorted(set(calib_by_task) - set(task_map))
        if unknown:
            raise MtLoraError(f"calibration tasks {unknown} are not in the adapter's task_map.json")
    return wanted
