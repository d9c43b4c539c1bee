"""``mtlora export``: turn a routed multi-expert adapter into artefacts that ordinary serving stacks load.

Why: a token router prevents merging and no server (vLLM, LoRAX, S-LoRA) runs router + experts, but every
one of them hot-swaps plain LoRAs. With a shared down-projection A, freezing the routing weights of a
task collapses the experts into ONE rank-r LoRA, exactly (field survey §3, "static export"):

    Delta W_t = scaling · (Σ_e diag(π̄_{t,e}) B_e) · A        π̄_{t,e} ∈ R^{d_out}

* token routers (HydraLoRA, mtLoRA, scalar or fine-grained): π̄_{t,g,e} is the mean routing probability of
  expert e in group g over the real (non-padding) tokens of task t's calibration examples, and output dim
  j uses its group g(j) = j // group_size. This is an approximation of the routed model: its cost is
  measured and written to ``report.json`` (accuracy and target NLL, routed vs exported, per task);
* MMoELoRA's task gate depends on the task id only, so its per-task export is exact (no calibration):
  ``B_t = B · diag(gate_t repeated over each expert's rank slice)``;
* plain ``lora`` has no router: one export ``X/default/``, identical to the adapter (every task of the
  report points to it).

What gets written under ``output_dir`` (the ``mtlora export`` contract)::

    X/<task>/adapter_config.json, adapter_model.safetensors   plain peft LoRA (component-level adapters)
    X/<task>/block_adapter.safetensors, block_adapter_config.json, load_block_export.py
                                                                block-level adapters: the bundle (mtlora.bundle)
    X/<task>/merged/                                          base + static Delta W (``--merged``, component)
    X/<task>/README.md, tokenizer files                       model card (mtlora.model_card) and tokenizer
    X/base_model/                                             a bundled base copied (mtlora.deploy.export_base)
    X/report.json                                             forms + load commands, routed vs exported scores
    X/README.md, X/task_map.json

The "exported" numbers of the report come from :func:`static_routing` (each routed adapter computing
``scaling · B_t A x`` with the task's collapsed up-projection), which performs the same operations as the
written peft LoRA loaded by plain peft (the tests check agreement to 1e-5; on CPU it was bitwise); that
keeps one model in memory instead of one per artefact.

Layout of this package (one module per seam): ``common`` (names and constants), ``static`` (static routing
math), ``calibrate`` (per-task routing from data), ``peft`` (peft LoRA files), ``block`` (block-level
bundles), ``merged`` (merged checkpoints), ``evaluate`` (report scoring through :mod:`mtlora.inference`),
``plan`` (which tasks, which records), ``report`` (report.json and model cards), ``driver``
(:func:`export_adapter`) and ``cli`` (``mtlora export``).
"""

from mtlora.bundle import load_block_export
from mtlora.export.block import export_block_adapter
from mtlora.export.calibrate import TaskRouting, estimate_task_routing
from mtlora.export.cli import build_parser, main
from mtlora.export.common import (
    BLOCK_CONFIG_NAME,
    BLOCK_FORMAT,
    BLOCK_LOADER_NAME,
    BLOCK_NOT_PEFT,
    BLOCK_WEIGHTS_NAME,
    DEFAULT_EXPORT,
    EXPORT_VERSION,
    IGNORE_INDEX,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    REPORT_NAME,
)
from mtlora.export.driver import export_adapter, write_export
from mtlora.export.evaluate import EvalMetrics, evaluate_records, export_engine
from mtlora.export.merged import save_merged_model
from mtlora.export.peft import (
    PeftLora,
    convert_lora_to_peft,
    export_peft_lora,
    read_peft_lora,
    write_peft_lora,
)
from mtlora.export.plan import by_task, safe_dir_name
from mtlora.export.static import static_delta_weight, task_gate_routing
from mtlora.routing.static import static_routing, static_up_projection

__all__ = [
    "BLOCK_CONFIG_NAME",
    "BLOCK_FORMAT",
    "BLOCK_LOADER_NAME",
    "BLOCK_NOT_PEFT",
    "BLOCK_WEIGHTS_NAME",
    "DEFAULT_EXPORT",
    "EXPORT_VERSION",
    "IGNORE_INDEX",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "REPORT_NAME",
    "EvalMetrics",
    "PeftLora",
    "TaskRouting",
    "build_parser",
    "by_task",
    "convert_lora_to_peft",
    "estimate_task_routing",
    "evaluate_records",
    "export_adapter",
    "export_block_adapter",
    "export_engine",
    "export_peft_lora",
    "load_block_export",
    "main",
    "read_peft_lora",
    "safe_dir_name",
    "save_merged_model",
    "static_delta_weight",
    "static_routing",
    "static_up_projection",
    "task_gate_routing",
    "write_export",
    "write_peft_lora",
]
