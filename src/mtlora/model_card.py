"""README.md model cards for adapter folders: training outputs (``sft_lora_model``) and ``mtlora export`` results.

Why: an adapter folder on its own does not say what base it needs, how it was trained, on which data, how
good it is or how to load it - and a folder pushed to the Hugging Face Hub shows its README.md as the model
page. Every card states the same facts, read from the files mtlora writes beside the adapter:

* base model, method and which of the paper's designs are on, tasks and their ids (``task_map.json``);
* data hashes (training: ``run_manifest.json``'s per-file SHA-256; exports: the content hash of each task's
  calibration / evaluation records), key hyper-parameters (``adapter_config.json``, ``run_config.json``);
* parameter counts (from the safetensors headers; no tensor is loaded), evaluation results when present
  (export: routed vs exported vs base from ``report.json``; training: ``{mmlu,bbh}_results.json`` of
  ``mtlora eval`` runs on this adapter found in or beside the output folder, and the final losses);
* load snippets (mtlora for native adapters; plain peft / transformers / the bundle loader for exports).

Cards are deterministic (no dates, sorted tables) and written atomically (:func:`mtlora.atomic.write_text_atomic`),
so re-running a command rewrites an identical file. ``python -m mtlora.model_card FOLDER`` rewrites the card
of a training output (e.g. after evaluating it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.atomic import write_text_atomic
from mtlora.deploy import FORM_BUNDLE, FORM_MERGED, FORM_PEFT, FORM_TITLES, load_snippet
from mtlora.errors import MtLoraError

__all__ = [
    "CARD_NAME",
    "AdapterFacts",
    "adapter_card",
    "export_card",
    "export_index_card",
    "gather",
    "main",
    "tensor_count",
    "write_card",
    "write_training_card",
]

CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_RESULT_FILES = ("mmlu_results.json", "bbh_results.json")
_HEADLINE = {"mmlu": "overall_accuracy", "bbh": "average_accuracy"}


@dataclass
class AdapterFacts:
    """What the files in and around an adapter folder say about it (missing files give empty fields)."""

    adapter_dir: Path
    config: dict[str, Any]
    task_map: dict[str, int] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None  # run_manifest.json of the training run that wrote the folder
    run_config: dict[str, Any] | None = None  # run_config.json of that run
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    train_metrics: dict[str, Any] = field(default_factory=dict)  # train_results.json / eval_results.json

    @property
    def method(self) -> str:
        if "method" in self.config:
            return str(self.config["method"])
        return f"peft {str(self.config.get('peft_type', '?')).lower()}"

    @property
    def native(self) -> bool:
        return "method" in self.config

    @property
    def base(self) -> str | None:
        base = self.config.get("base_model_name_or_path")
        return str(base) if base else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, RecursionError):
        return None


def _same_folder(a: str | Path, b: Path) -> bool:
    from mtlora.hub import resolve_adapter_dir

    try:
        return resolve_adapter_dir(a).resolve() == b.resolve()
    except MtLoraError:
        return False


def gather(adapter_dir: str | Path) -> AdapterFacts:
    """Collect the card's facts: the adapter's config and task map, and, when the folder is the
    ``sft_lora_model`` of a ``mtlora train`` output, that run's manifest, config, losses and evaluations."""
    from mtlora.hub import read_adapter_config, resolve_adapter_dir

    folder = resolve_adapter_dir(adapter_dir)
    facts = AdapterFacts(adapter_dir=folder, config=read_adapter_config(folder))
    task_map = _read_json(folder / "task_map.json")
    if isinstance(task_map, dict):
        facts.task_map = {str(k): v for k, v in task_map.items() if isinstance(v, int)}
    run_dir = folder.parent if (folder.parent / "run_manifest.json").is_file() else None
    if run_dir is not None:
        facts.manifest = _read_json(run_dir / "run_manifest.json")
        facts.run_config = _read_json(run_dir / "run_config.json")
        for name in ("train_results.json", "eval_results.json"):
            data = _read_json(run_dir / name)
            if isinstance(data, dict):
                facts.train_metrics.update(
                    {k: v for k, v in data.items() if isinstance(v, (int, float)) and "loss" in k}
                )
    # `mtlora eval` results of this adapter: in the folder, beside it, or one level below the run folder
    roots = [folder, folder.parent]
    candidates = [r / n for r in roots for n in _RESULT_FILES]
    if folder.parent.is_dir():
        for sub in sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder):
            candidates += [sub / n for n in _RESULT_FILES]
    seen: set[Path] = set()
    for path in candidates:
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        data = _read_json(path)
        if not isinstance(data, dict) or not data.get("lora_checkpoint"):
            continue
        if not _same_folder(str(data["lora_checkpoint"]), folder):
            continue
        bench = path.name.split("_", 1)[0]
        facts.eval_results.append(
            {
                "benchmark": bench.upper(),
                "protocol": data.get("protocol"),
                "shots": data.get("num_few_shot"),
                "metric": _HEADLINE[bench],
                "score": data.get(_HEADLINE[bench]),
                "file": _display_path(path, folder),
            }
        )
    return facts


def _display_path(path: Path, folder: Path) -> str:
    try:
        return str(path.resolve().relative_to(folder.resolve().parent))
    except ValueError:
        return str(path)


def tensor_count(path: str | Path) -> int:
    """Number of elements in a safetensors file, read from its header (no tensor is loaded)."""
    from mtlora.hub import safetensors_num_elements

    return safetensors_num_elements(path)


# ----------------------------------------------------------------------------------------------- pieces
def _front_matter(base: str | None, library: str | None, tags: Sequence[str]) -> str:
    """Hub metadata; ``base_model`` only for a hub id (the Hub rejects local paths there)."""
    lines = ["---"]
    if library:
        lines.append(f"library_name: {library}")
    if base and _HUB_ID.match(base) and not Path(base).exists():
        lines.append(f"base_model: {base}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    lines.append("---")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def describe_method(cfg: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) rows: method, placement, router, experts and the paper's designs that are on."""
    if "method" not in cfg:
        return [("method", f"peft {cfg.get('peft_type')}"), ("target_modules", cfg.get("target_modules"))]
    method = cfg["method"]
    rows: list[tuple[str, Any]] = [("method", method)]
    block = bool(cfg.get("enable_block_adapter"))
    if block:
        rows.append(
            (
                "placement",
                f"block level: parallel path over {cfg.get('block_adapter_type')} blocks, "
                f"style {cfg.get('block_adapter_style')}",
            )
        )
    else:
        targets = cfg.get("target_modules") or "architecture default (q_proj, v_proj)"
        rows.append(("placement", f"component level: LoRA on {targets}"))
    from mtlora.config import METHOD_SPECS
    from mtlora.routing import REGISTRY

    spec = METHOD_SPECS[method]
    rows.append(("experts", cfg.get(spec.experts_field) if spec.experts_field else 1))
    router_cls = REGISTRY[spec.router]  # the method's router kind (capabilities, not names)
    if router_cls.needs_task_ids:
        router = "task gate (task id)"
    elif not router_cls.is_routed:
        router = "none"
    elif cfg.get("enable_fine_grained_routing"):
        router = (
            f"token router, fine-grained (groups of {cfg.get('routing_group_size') or 'd_out/2'} output dims)"
        )
    else:
        router = "token router, one scalar per expert"
    rows.append(("router", router))
    designs = []
    if block:
        designs.append("block-level adaptation")
    if cfg.get("enable_fine_grained_routing"):
        designs.append("fine-grained routing")
    if cfg.get("enable_spectral_reg"):
        designs.append(
            f"spectral-aware regularization (lambda {cfg.get('spectral_reg_lambda')}, "
            f"mode {cfg.get('spectral_reg_mode')})"
        )
    rows.append(("mtLoRA designs", ", ".join(designs) or "none"))
    if cfg.get("enable_blc"):
        rows.append(("load-balancing loss", f"alpha {cfg.get('blc_alpha')}"))
    return rows


_ADAPTER_HPARAMS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "block_adapter_rank",
    "router_top_k",
    "adapter_dtype",
)
_TRAIN_HPARAMS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_ratio",
    "weight_decay",
    "seed",
    "bf16",
)


def _hparams(facts: AdapterFacts) -> list[tuple[str, Any]]:
    rows = [(k, facts.config[k]) for k in _ADAPTER_HPARAMS if facts.config.get(k) is not None]
    rc = facts.run_config or {}
    training, data = rc.get("training") or {}, rc.get("data") or {}
    rows += [(k, training[k]) for k in _TRAIN_HPARAMS if training.get(k) not in (None, -1)]
    for k in ("max_seq_length", "template"):
        if data.get(k) is not None:
            rows.append((k, data[k]))
    if facts.manifest:
        for k in ("world_size", "global_steps", "num_train_examples"):
            if facts.manifest.get(k) is not None:
                rows.append((k, facts.manifest[k]))
    return rows


def _tasks_table(task_map: Mapping[str, int]) -> str:
    if not task_map:
        return "No task map was saved with this adapter."
    return _table(["task", "id"], [[t, i] for t, i in sorted(task_map.items(), key=lambda x: (x[1], x[0]))])


def _tags(facts: AdapterFacts, *more: str) -> list[str]:
    tags = ["mtlora", "lora", "multi-task", facts.method.replace(" ", "-")]
    if facts.config.get("enable_block_adapter"):
        tags.append("block-adapter")
    return tags + [t for t in more if t]


# ----------------------------------------------------------------------------------------------- cards
def adapter_card(adapter_dir: str | Path) -> str:
    """The card of a training output / native adapter folder (see the module docstring)."""
    facts = gather(adapter_dir)
    folder = facts.adapter_dir
    cfg = facts.config
    block = bool(cfg.get("enable_block_adapter"))
    parts = [_front_matter(facts.base, "mtlora" if facts.native else "peft", _tags(facts))]
    parts.append(f"# {facts.method} adapter ({folder.name})")
    if facts.native:
        deploy = (
            "Its adapters sit on whole blocks, so `mtlora export` turns each task into a **block-adapter bundle** "
            "(weights + a loader that needs no mtlora); no peft LoRA, vLLM LoRA or merged checkpoint can "
            "express a block-level path."
            if block
            else "Its adapters sit on `nn.Linear` modules, so `mtlora export` turns each task into a **plain peft "
            "LoRA** (peft, lm-eval, vLLM multi-LoRA) and, with `--merged`, a **merged model**."
        )
        parts.append(
            "A native mtlora multi-task adapter, in peft's file layout (`adapter_config.json` + "
            "`adapter_model.safetensors`). peft cannot load it as it is (its `peft_type` says so); mtlora "
            "loads it as shown below. " + deploy
        )
    else:
        parts.append("A plain peft adapter trained with mtlora; `peft.PeftModel.from_pretrained` loads it.")
    bundled = (facts.base or "").lower().startswith("mtlora:")
    parts.append(
        "## Base model\n\n"
        + f"`{facts.base or 'not recorded'}`"
        + (
            " (a tiny model bundled with mtlora; `mtlora export` copies it into its output as `base_model/`, a "
            "folder plain transformers loads)"
            if bundled
            else ""
        )
    )
    parts.append("## Method\n\n" + _table(["", ""], describe_method(cfg)))
    parts.append("## Tasks\n\n" + _tasks_table(facts.task_map))
    data_rows = sorted((facts.manifest or {}).get("data_files", {}).items())
    if data_rows:
        parts.append("## Training data\n\n" + _table(["file", "sha256"], data_rows))
    else:
        parts.append("## Training data\n\nNot recorded (no run_manifest.json beside this folder).")
    parts.append("## Hyper-parameters\n\n" + _table(["name", "value"], _hparams(facts)))
    n = (
        tensor_count(folder / "adapter_model.safetensors")
        if (folder / "adapter_model.safetensors").is_file()
        else None
    )
    prow: list[tuple[str, Any]] = [("adapter tensors (elements in adapter_model.safetensors)", n)]
    if facts.manifest and facts.manifest.get("trainable_params") is not None:
        tr, tot = facts.manifest["trainable_params"], facts.manifest.get("total_params")
        share = f" ({100.0 * tr / tot:.4f}% of {tot:,})" if tot else ""
        prow.append(("trainable during training", f"{tr:,}{share}"))
    parts.append("## Parameters\n\n" + _table(["", "count"], prow))
    ev = ["## Evaluation"]
    if facts.train_metrics or (facts.manifest or {}).get("train_loss") is not None:
        losses = dict(facts.train_metrics)
        if (facts.manifest or {}).get("train_loss") is not None:
            losses.setdefault("train_loss", facts.manifest["train_loss"])
        ev.append(_table(["loss", "value"], sorted(losses.items())))
    if facts.eval_results:
        rows = [
            [r["benchmark"], r["protocol"], r["shots"], r["metric"], r["score"], r["file"]]
            for r in sorted(facts.eval_results, key=lambda r: (r["benchmark"], r["file"]))
        ]
        ev.append(_table(["benchmark", "protocol", "shots", "metric", "score", "file"], rows))
    else:
        ev.append(
            "No benchmark results found. `mtlora eval mmlu|bbh --lora_checkpoint THIS_FOLDER --output_dir "
            "RUN_DIR/eval` writes some; then `python -m mtlora.model_card THIS_FOLDER` adds them here."
        )
    parts.append("\n\n".join(ev))
    parts.append("## Load\n\n" + _native_snippets(facts))
    return "\n\n".join(parts) + "\n"


def _native_snippets(facts: AdapterFacts) -> str:
    here = facts.adapter_dir.name
    if not facts.native:
        return (
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({here!r})\n```"
        )
    return (
        "```python\n"
        "from mtlora.hub import load_model\n\n"
        f"loaded = load_model(None, {here!r})  # the base recorded above + adapter + tokenizer, eval mode\n"
        "model, tokenizer = loaded.model, loaded.tokenizer\n"
        "```\n\n"
        "```bash\n"
        f"mtlora eval mmlu --lora_checkpoint {here} --output_dir eval_mmlu      # base from adapter_config.json\n"
        f"mtlora export {here} --calibration_data DATA --output_dir exported   # per-task deployable artefacts\n"
        "```"
    )


def _export_what_how(form: str, entry: Mapping[str, Any]) -> str:
    """What the artefact is (by form) and how its routing was frozen (by the task's routing source)."""
    if form == FORM_BUNDLE:
        what = (
            "Block-level mtLoRA adds a parallel low-rank path over whole blocks (h' = h + F(LN h) + "
            "Delta(LN h)); that path bypasses the block's non-linearity, so no LoRA on an existing weight (peft, "
            "vLLM, a merged checkpoint) can express it. This bundle holds the task's static weights "
            "(`block_adapter.safetensors`), their layout (`block_adapter_config.json`, format "
            "`mtlora-block-export` v1), the tokenizer and `load_block_export.py`, which attaches them to the "
            "plain Hugging Face base model with forward hooks and needs only torch, safetensors and "
            "transformers (no mtlora)."
        )
    elif form == FORM_PEFT:
        what = (
            "A plain peft LoRA (`peft_type: LORA`): loads with `peft`, lm-evaluation-harness (`peft=`) and "
            "multi-LoRA servers such as vLLM. The tokenizer is included."
        )
    else:
        what = (
            "A full model: the base weights plus this task's static update, loadable by plain transformers."
        )
    src = entry.get("routing_source")
    if src == "calibration":
        how = (
            f"The routing is frozen to the task's mean routing weights over {entry.get('calibration_examples')} "
            f"calibration examples ({entry.get('calibration_tokens')} tokens): an approximation of the routed "
            "model whose cost is measured below."
        )
    elif src == "task_gate":
        how = "The task gate for this task id is fixed: exactly the routed model for this task."
    else:
        how = "The adapter has no router: this export is the adapter itself, for every task."
    return what + " " + how


def _export_tasks_and_data(
    report: Mapping[str, Any], task: str, entry: Mapping[str, Any], facts: AdapterFacts
) -> list[str]:
    """The card's Tasks and Data sections: every task of the export, and the SHA-256 of the data used."""
    parts: list[str] = []
    task_rows = [
        [t, e.get("task_id"), e.get("dir") or "not exported: " + str(e.get("skipped"))]
        for t, e in sorted(
            report["tasks"].items(), key=lambda x: (x[1].get("task_id") is None, x[1].get("task_id"), x[0])
        )
    ]
    parts.append(
        f"## Tasks\n\nThis artefact: `{task}`"
        + (f" (task id {entry.get('task_id')})" if entry.get("task_id") is not None else "")
        + ". All tasks of the export:\n\n"
        + _table(["task", "id", "folder"], task_rows)
    )
    data_rows = [
        ["calibration records (this task)", entry.get("calibration_sha256")],
        ["evaluation records (this task)", entry.get("eval_sha256")],
    ]
    data_rows += [
        [f"training file {p}", h] for p, h in sorted((facts.manifest or {}).get("data_files", {}).items())
    ]
    parts.append(
        "## Data\n\nSHA-256 of the records' content (calibration / evaluation) and of the training files "
        "(when the source run's manifest was found).\n\n"
        + _table(["data", "sha256"], [r for r in data_rows if r[1]])
    )
    return parts


def _export_evaluation(report: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    """The card's Evaluation section: routed model vs this export vs the base on the task's held-out records."""
    if "routed" in entry:
        r, x, b = entry["routed"], entry["exported"], entry["base"]
        rows = [
            ["routed (mtlora)", _fmt(r["accuracy"]), _fmt(r["nll"]), r["examples"]],
            ["this export", _fmt(x["accuracy"]), _fmt(x["nll"]), x["examples"]],
            ["base model", "", _fmt(b["nll"]), x["examples"]],
        ]
        return (
            "## Evaluation\n\nExact match of greedy generations and mean target NLL on the task's held-out "
            f"records (`report.json`, eval data: {report.get('eval_data')}).\n\n"
            + _table(["model", "accuracy", "nll", "examples"], rows)
        )
    return "## Evaluation\n\nNot measured (exported with `--no_eval`)."


def export_card(
    report: Mapping[str, Any], task: str, facts: AdapterFacts, form: str, rel_path: str, out_dir: str | Path
) -> str:
    """The card of one exported artefact (``rel_path`` inside the export folder ``out_dir``) for ``task``."""
    entry = report["tasks"][task]
    base = report.get("base_model_name_or_path")
    library = {FORM_PEFT: "peft", FORM_MERGED: "transformers"}.get(form)
    parts = [_front_matter(base, library, _tags(facts, form.replace("_", "-")))]
    shared = report.get("default_export") == entry["dir"]
    title = "all tasks" if shared else f"task `{task}`"
    parts.append(f"# {FORM_TITLES[form]} for {title}, from a {report['method']} adapter (mtlora export)")
    parts.append(_export_what_how(form, entry))
    parts.append(
        "## Base model\n\n"
        + f"`{base}`"
        + (
            f" (a copy of the bundled `{report.get('base_model')}`, kept in `{report['base_model_copy']}/` of the "
            "export)"
            if report.get("base_model_copy")
            else ""
        )
    )
    source = [("source adapter", report.get("adapter_dir"))] + describe_method(facts.config)
    parts.append("## Method\n\n" + _table(["", ""], source))
    parts += _export_tasks_and_data(report, task, entry, facts)
    parts.append("## Hyper-parameters of the source adapter\n\n" + _table(["name", "value"], _hparams(facts)))
    parts.append(
        "## Parameters\n\n" + _table(["", "count"], _export_param_rows(Path(out_dir) / rel_path, form))
    )
    parts.append(_export_evaluation(report, entry))
    path_for_reader = "."
    parts.append(
        "## Load\n\nFrom this folder (replace `.` by its path; no mtlora needed):\n\n```python\n"
        + load_snippet(form, path_for_reader, base)
        + "\n```"
        + (
            '\n\nOr from the command line: `python load_block_export.py . --prompt "Once upon a time"`.'
            if form == FORM_BUNDLE
            else ""
        )
    )
    return "\n\n".join(parts) + "\n"


def _export_param_rows(folder: Path, form: str) -> list:
    weights = {
        FORM_PEFT: "adapter_model.safetensors",
        FORM_BUNDLE: "block_adapter.safetensors",
        FORM_MERGED: "model.safetensors",
    }[form]
    path = folder / weights
    n = tensor_count(path) if path.is_file() else None
    return [(f"elements in {weights}", f"{n:,}" if n is not None else "n/a")]


def export_index_card(report: Mapping[str, Any], facts: AdapterFacts) -> str:
    """The card of the export folder itself: every task, its forms and where they are."""
    parts = [_front_matter(report.get("base_model_name_or_path"), None, _tags(facts, "export"))]
    parts.append(f"# mtlora export of a {report['method']} adapter ({report['level']} level)")
    parts.append(
        "Deployable as: "
        + ", ".join(FORM_TITLES[f] for f in report.get("deployable_as", []))
        + (". " + str(report["note"]) if report.get("note") else ".")
    )
    parts.append(f"## Base model\n\n`{report.get('base_model_name_or_path')}`")
    rows = []
    for task, e in sorted(
        report["tasks"].items(), key=lambda x: (x[1].get("task_id") is None, x[1].get("task_id"), x[0])
    ):
        forms = ", ".join(f"{FORM_TITLES[a['form']]} (`{a['path']}/`)" for a in e.get("artifacts", []))
        rows.append([task, e.get("task_id"), forms or "not exported: " + str(e.get("skipped"))])
    parts.append("## Tasks\n\n" + _table(["task", "id", "artefacts"], rows))
    parts.append(
        "Each artefact folder has its own README.md (model card) with load snippets; `report.json` lists the "
        "exact load command of each and the routed vs exported scores."
    )
    return "\n\n".join(parts) + "\n"


def write_card(folder: str | Path, text: str) -> Path:
    """Write ``folder/README.md`` atomically (a kill leaves the old card or the new one)."""
    return write_text_atomic(Path(folder) / CARD_NAME, text)


def write_training_card(adapter_dir: str | Path) -> Path:
    """(Re)write the card of a training output / native adapter folder."""
    return write_card(adapter_dir, adapter_card(adapter_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtlora.model_card",
        description="(Re)write README.md (model card) of an adapter folder or a `mtlora train` output folder.",
    )
    parser.add_argument("adapter_dir")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    path = write_training_card(args.adapter_dir)
    print(f"model card: {path}")
    return 0


if __name__ == "__main__":
    from mtlora.cli import run_main

    sys.exit(run_main(main, sys.argv[1:], prog="python -m mtlora.model_card"))
