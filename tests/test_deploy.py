"""Deployment recipes (mtlora.deploy): the printed load commands run, and lm-eval scores an exported adapter
offline with ``--model_args pretrained=BASE,peft=X/<task>`` on the task YAMLs mtlora writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.cli import main as cli_main
from mtlora.data import save_records, save_task_map
from mtlora.deploy import FORM_BUNDLE, FORM_MERGED, FORM_PEFT, PLACEMENT_FORMS, export_base, load_command
from mtlora.hub import resolve_model_path

TINY = "mtlora:stories260k"
SUBJECT = "anatomy"
LIMIT = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A hydralora adapter with real (random) experts, exported with --merged: X/a, X/a/merged, X/b ..."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))
    cfg = MtLoraConfig(
        method="hydralora", lora_rank=4, lora_nums=2, lora_dropout=0.0, base_model_name_or_path=TINY
    )
    model = get_mtlora_model(base, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.5)
    model.save_pretrained(root / "adapter")
    save_task_map({"a": 0, "b": 1}, root / "adapter" / "task_map.json")
    recs = [
        {"instruction": "Say it.", "input": w, "output": w, "task_type": t}
        for t in "ab"
        for w in ["x", "yy", "zzz"]
    ]
    save_records(recs, root / "recs.json")
    out = root / "x"
    argv = ["export", str(root / "adapter"), "--calibration_data", str(root / "recs.json"), "--output_dir", str(out),
            "--merged", "--no_eval"]  # fmt: skip
    assert cli_main(argv) == 0
    return out


def test_report_names_forms_and_every_printed_command_runs(exported: Path, tmp_path: Path) -> None:
    report = json.loads((exported / "report.json").read_text())
    assert report["deployable_as"] == [FORM_PEFT, FORM_MERGED] and PLACEMENT_FORMS["block"] == (FORM_BUNDLE,)
    base = report["base_model_name_or_path"]
    assert base == str((exported / "base_model").resolve()) and report["base_model"] == TINY
    entry = report["tasks"]["a"]
    assert [a["form"] for a in entry["artifacts"]] == [FORM_PEFT, FORM_MERGED]
    assert json.loads((exported / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert (exported / "a" / "tokenizer_config.json").is_file() and (
        exported / "a/merged/tokenizer_config.json"
    ).is_file()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outputs = []
    for art in entry["artifacts"]:
        cmd = art["load_command"]
        assert cmd == load_command(art["form"], exported.resolve() / art["path"])
        # run as printed, from another directory, with `python` being this interpreter
        proc = subprocess.run(
            sys.executable + cmd[len("python") :], shell=True, capture_output=True, text=True, env=env,
            cwd=tmp_path, timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, (art["form"], proc.stderr[-2000:])
        outputs.append(proc.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]  # the peft LoRA and the merged model generate the same greedy text


def test_export_base_names_a_resolvable_base(tmp_path: Path) -> None:
    copied, rel = export_base("MTLORA:Stories260K", tmp_path)
    assert rel == "base_model" and copied == str((tmp_path / "base_model").resolve())
    assert sorted(p.name for p in (tmp_path / "base_model").iterdir()) == sorted(
        p.name for p in Path(resolve_model_path(TINY)).iterdir()
    )
    local = tmp_path / "models" / "mine"
    local.mkdir(parents=True)
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        assert export_base("models/mine", tmp_path / "o") == (str(local.resolve()), None)
    finally:
        os.chdir(cwd)
    assert export_base("meta-llama/Llama-2-7b-hf", tmp_path / "o") == ("meta-llama/Llama-2-7b-hf", None)


def _samples(folder: Path) -> dict[int, list[float]]:
    """doc_id -> log-likelihoods of the choices, from lm-eval's --log_samples output."""
    (path,) = list(folder.rglob(f"samples_mtlora_local_mmlu_{SUBJECT}_*.jsonl"))
    out = {}
    for line in path.read_text().splitlines():
        s = json.loads(line)
        out[s["doc_id"]] = [float(r[0][0]) for r in s["resps"]]
    return out


@pytest.mark.slow
def test_lm_eval_recipe_on_an_exported_adapter(exported: Path, tmp_path: Path) -> None:
    """The documented recipe, run as written: the lm_eval CLI, offline, peft= an exported task folder.

    Its per-choice log-likelihoods must equal those of the merged model of the same task (an independent
    path: weights W + Delta W, no peft) and differ from the bare base model's: lm-eval really ran the adapter.
    """
    pytest.importorskip("lm_eval")
    tasks_dir = tmp_path / "tasks"
    assert cli_main(["eval", "lm_eval_tasks", "--output_dir", str(tasks_dir), "--mmlu_subjects", SUBJECT,
                     "--mmlu_num_fewshot", "0"]) == 0  # fmt: skip
    base = json.loads((exported / "report.json").read_text())["base_model_name_or_path"]
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    task = f"mtlora_local_mmlu_{SUBJECT}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "out_peft"
    proc = subprocess.run(
        [str(lm_eval_bin), "--model", "hf", "--model_args", f"pretrained={base},peft={exported / 'a'},dtype=float32",
         "--tasks", task, "--include_path", str(tasks_dir), "--limit", str(LIMIT), "--device", "cpu",
         "--batch_size", "4", "--log_samples", "--output_path", str(out)],
        capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peft = _samples(out)
    assert set(peft) == set(range(LIMIT))
    # references in this process (one lm-eval import): the merged model of the task, and the bare base
    import lm_eval
    from lm_eval.tasks import TaskManager

    ref = {}
    for name, model_args in (("merged", f"pretrained={exported / 'a' / 'merged'},dtype=float32"),
                             ("base", f"pretrained={base},dtype=float32")):  # fmt: skip
        res = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=[task], limit=LIMIT, batch_size=4, device="cpu",
            log_samples=True, task_manager=TaskManager(include_path=str(tasks_dir)), verbosity="ERROR",
        )  # fmt: skip
        ref[name] = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in res["samples"][task]}
    worst = max(abs(a - b) for d in peft for a, b in zip(peft[d], ref["merged"][d]))
    moved = max(abs(a - b) for d in peft for a, b in zip(peft[d], ref["base"][d]))
    assert worst < 2e-3, worst
    assert moved > 1e-2, moved
