"""`mtlora eval mmlu|bbh` and the top-level scripts: result schema, adapters, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlora.cli import main as mtlora_main

REPO = Path(__file__).resolve().parents[2]
TINY = "mtlora:stories260k"
COMMON = ["--model_name_or_path", TINY, "--no_progress", "--threads", "1"]


def _eval(args: list[str]) -> int:
    return mtlora_main(["eval", *args])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("protocol", ["harness", "paper"])
def test_mmlu_end_to_end_schema(tmp_path: Path, capsys, protocol: str) -> None:
    out = tmp_path / "e"
    args = [
        "mmlu",
        *COMMON,
        "--subjects",
        "abstract_algebra,anatomy",
        "--limit",
        "3",
        "--output_dir",
        str(out),
    ]
    assert _eval([*args, "--protocol", protocol]) == 0
    printed = capsys.readouterr().out
    assert "| abstract_algebra" in printed and "overall_accuracy" in printed
    res = json.loads((out / "mmlu_results.json").read_text())
    assert res["protocol"] == protocol and res["benchmark"] == "mmlu"
    assert set(res["subject_scores"]) == {"abstract_algebra", "anatomy"}
    assert res["total_questions"] == 6 and 0.0 <= res["overall_accuracy"] <= 1.0
    assert set(res["category_scores"]) == {"STEM"}
    assert len(res["data_sha256"]) == 64 and res["num_few_shot"] == 5 and res["limit"] == 3
    rows = res["predictions"]["anatomy"]
    assert len(rows) == 3 and {"index", "answer", "prediction", "correct", "num_exemplars"} <= set(rows[0])
    if protocol == "harness":
        assert len(rows[0]["loglikelihoods"]) == 4
    assert (out / "mmlu_results.md").is_file()


def test_bbh_end_to_end_schema(tmp_path: Path, capsys) -> None:
    base = [
        "bbh",
        *COMMON,
        "--tasks",
        "boolean_expressions,navigate",
        "--limit",
        "3",
        "--max_new_tokens",
        "12",
    ]
    for protocol, extra in (("paper", []), ("harness", []), ("harness", ["--cot"])):
        out = tmp_path / f"{protocol}{len(extra)}"
        assert _eval([*base, "--protocol", protocol, *extra, "--output_dir", str(out)]) == 0
        res = json.loads((out / "bbh_results.json").read_text())
        assert res["protocol"] == protocol and set(res["task_scores"]) == {"boolean_expressions", "navigate"}
        assert res["harness_task"] == (
            None if protocol == "paper" else "bbh_cot_fewshot" if extra else "bbh_fewshot"
        )
        assert 0.0 <= res["average_accuracy"] <= 1.0 and res["total_samples"] == 6
        preds = res["task_results"]["navigate"]["predictions"]
        assert len(preds) == 3 and {"target", "output", "prediction", "correct"} <= set(preds[0])
        assert preds[0]["index"] == (
            3 if protocol == "paper" else 0
        )  # paper: the first 3 items are exemplars
    assert "| navigate" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mmlu", "--subjects", "anatomyy"], "unknown subject 'anatomyy'"),
        (["bbh", "--tasks", "navigate,foo"], "unknown task 'foo'"),
        (["mmlu", "--subjects", "anatomy", "--data_dir", "/nonexistent/mmlu"], "data directory not found"),
        (["bbh", "--tasks", "navigate", "--num_few_shot", "4"], "3 fixed exemplars"),
        (
            ["mmlu", "--subjects", "anatomy", "--lora_checkpoint", "/nonexistent/adapter"],
            "adapter directory not found",
        ),
        (["bbh", "--protocol", "paper", "--cot"], "--cot is a harness variant"),
        (["gsm8k"], "unknown benchmark"),
    ],
)
def test_user_errors_give_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert (
        _eval([*args[:1], *COMMON, *args[1:], "--output_dir", str(tmp_path)] if args[0] != "gsm8k" else args)
        == 2
    )
    assert message in _error_line(capsys)


def test_empty_data_dir_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "data").mkdir()
    assert (
        _eval(
            [
                "bbh",
                *COMMON,
                "--tasks",
                "navigate",
                "--data_dir",
                str(tmp_path / "data"),
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "BBH task file for 'navigate' not found" in _error_line(capsys)


# ------------------------------------------------------------------------------------------ adapters


def _save_adapter(path: Path, method: str, base_config=None, **kw) -> None:
    model_mod = pytest.importorskip("mtlora.model")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from mtlora.config import MtLoraConfig
    from mtlora.hub import resolve_model_path

    torch.manual_seed(0)
    base = (
        LlamaForCausalLM(base_config)
        if base_config is not None
        else AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))
    )
    model = model_mod.get_mtlora_model(base, MtLoraConfig(method=method, lora_nums=4, lora_rank=4, **kw))
    with torch.no_grad():  # non-zero up-projections, so the adapter really changes the outputs
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path)


def test_adapter_is_read_from_its_folder(tmp_path: Path, capsys) -> None:
    base_out, ad_out = tmp_path / "base", tmp_path / "ad"
    _save_adapter(tmp_path / "run" / "sft_lora_model", "hydralora")
    args = ["mmlu", "--no_progress", "--threads", "1", "--subjects", "anatomy", "--limit", "3"]
    assert _eval([*args, "--model_name_or_path", TINY, "--output_dir", str(base_out)]) == 0
    # no --model_name_or_path: the base recorded in adapter_config.json; the training output dir is accepted
    assert _eval([*args, "--lora_checkpoint", str(tmp_path / "run"), "--output_dir", str(ad_out)]) == 0
    base_res = json.loads((base_out / "mmlu_results.json").read_text())
    ad_res = json.loads((ad_out / "mmlu_results.json").read_text())
    assert ad_res["adapter_method"] == "hydralora" and base_res["adapter_method"] is None
    lls = [r["loglikelihoods"] for r in base_res["predictions"]["anatomy"]]
    assert lls != [r["loglikelihoods"] for r in ad_res["predictions"]["anatomy"]]
    capsys.readouterr()


def test_mmoelora_task_ids_from_task_map(tmp_path: Path, capsys) -> None:
    _save_adapter(tmp_path / "mm", "mmoelora", task_num=3)
    (tmp_path / "mm" / "task_map.json").write_text(json.dumps({"navigate": 2}))
    out = tmp_path / "e"
    args = [
        "bbh",
        *COMMON,
        "--tasks",
        "navigate,boolean_expressions",
        "--limit",
        "2",
        "--max_new_tokens",
        "4",
    ]
    assert _eval([*args, "--lora_checkpoint", str(tmp_path / "mm"), "--output_dir", str(out)]) == 0
    res = json.loads((out / "bbh_results.json").read_text())
    assert res["task_ids_used"] == {"navigate": 2, "boolean_expressions": 0}
    assert res["task_id_fallbacks"] == ["boolean_expressions"]
    assert "not in the adapter's task_map.json" in capsys.readouterr().err


def test_adapter_for_another_model_is_one_line(tmp_path: Path, capsys) -> None:
    from transformers import LlamaConfig

    small = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    _save_adapter(tmp_path / "bad", "lora", base_config=small)
    args = ["mmlu", *COMMON, "--subjects", "anatomy", "--lora_checkpoint", str(tmp_path / "bad")]
    assert _eval([*args, "--output_dir", str(tmp_path / "e")]) == 2
    assert "does not fit" in _error_line(capsys)


# ------------------------------------------------------------------------------------ top-level scripts


def _script(name: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / name), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_top_level_scripts(tmp_path: Path) -> None:
    """The paper's scripts default to the paper protocol (``mtlora eval`` keeps harness); every output names it."""
    done = _script(
        "eval_bbh.py",
        ["--model_name_or_path", TINY, "--output_dir", str(tmp_path), "--num_few_shot", "3", "--tasks", "navigate",
         "--limit", "2", "--max_new_tokens", "4", "--batch_size", "2", "--no_progress"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    res = json.loads((tmp_path / "bbh_results.json").read_text())
    assert res["task_scores"].keys() == {"navigate"} and res["protocol"] == "paper"
    assert "BBH - protocol paper" in (tmp_path / "bbh_results.md").read_text()
    assert "protocol paper" in done.stdout and "protocol: paper; results:" in done.stdout
    bad = _script(
        "eval_mmlu.py", ["--model_name_or_path", TINY, "--output_dir", str(tmp_path), "--subjects", "nope"]
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().startswith("error: unknown subject 'nope'")
        and len(bad.stderr.strip().splitlines()) == 1
    )


def test_protocol_defaults_per_entry_point(tmp_path: Path, capsys) -> None:
    """eval_mmlu.py (in process) -> paper; mtlora eval mmlu -> harness; both name it in json, md and stdout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_mmlu_script", REPO / "eval_mmlu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--model_name_or_path", TINY, "--subjects", "anatomy", "--limit", "2", "--no_progress"]
    for entry, out, expected in (
        (script.main, tmp_path / "script", "paper"),
        (lambda a: _eval(["mmlu", *a]), tmp_path / "cli", "harness"),
    ):
        assert entry([*common, "--output_dir", str(out)]) == 0
        printed = capsys.readouterr().out
        assert json.loads((out / "mmlu_results.json").read_text())["protocol"] == expected
        assert f"MMLU - protocol {expected}" in (out / "mmlu_results.md").read_text()
        assert f"protocol {expected}" in printed and f"protocol: {expected}; results:" in printed


# ------------------------------------------------------------------------- issue 15: nothing silent, nothing lost
def test_empty_task_list_is_an_error_not_all_tasks(tmp_path: Path, capsys) -> None:
    assert _eval(["bbh", *COMMON, "--tasks", "", "--output_dir", str(tmp_path / "e")]) == 2
    assert _error_line(capsys).startswith("error: --tasks '': no task names given")
    assert _eval(["mmlu", *COMMON, "--subjects", " , ", "--output_dir", str(tmp_path / "e")]) == 2
    assert "--subjects ' , ': no subject names given" in _error_line(capsys)
    assert not (tmp_path / "e").exists()


def test_max_length_beyond_the_models_positions_is_refused(tmp_path: Path, capsys) -> None:
    args = ["bbh", *COMMON, "--tasks", "navigate", "--output_dir", str(tmp_path / "e")]
    assert _eval([*args, "--max_length", "100000"]) == 2
    assert _error_line(capsys) == (
        "error: --max_length 100000: the model has 512 positions (max_position_embeddings); use --max_length "
        "512 or less (default: 512), or --allow_beyond_positions"
    )


def test_earlier_results_are_not_replaced_without_overwrite_output_dir(tmp_path: Path, capsys) -> None:
    out = tmp_path / "e"
    args = [
        "bbh",
        *COMMON,
        "--tasks",
        "navigate",
        "--limit",
        "1",
        "--max_new_tokens",
        "4",
        "--output_dir",
        str(out),
    ]
    assert _eval(args) == 0
    first = (out / "bbh_results.json").read_bytes()
    capsys.readouterr()
    assert _eval(args) == 2
    line = _error_line(capsys)
    assert f"--output_dir {out} already holds bbh_results.json, bbh_results.md" in line
    assert "--overwrite_output_dir" in line and (out / "bbh_results.json").read_bytes() == first
    # another benchmark's results in the same folder do not block, and the flag replaces them
    assert _eval([*args, "--overwrite_output_dir"]) == 0
    assert (out / "bbh_results.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    (tmp_path / "file").write_text("x")
    assert _eval([*args[:-1], str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def _umask() -> int:
    from mtlora.atomic import current_umask

    return current_umask()


def test_nan_adapter_is_refused_by_name_not_scored_zero(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from mtlora import MtLoraConfig, get_mtlora_model
    from mtlora.hub import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))
    model = get_mtlora_model(base, MtLoraConfig(method="lora", lora_rank=4, base_model_name_or_path=TINY))
    with torch.no_grad():
        next(a for a in model.adapters()).lora_B.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_adapter")
    capsys.readouterr()
    rc = _eval(["bbh", "--lora_checkpoint", str(tmp_path / "nan_adapter"), "--tasks", "navigate", "--limit", "1",
                "--no_progress", "--output_dir", str(tmp_path / "e")])  # fmt: skip
    assert rc == 2
    line = _error_line(capsys)
    assert "nan_adapter/adapter_model.safetensors: tensor 'model.layers.0." in line and "non-finite" in line
    assert not (tmp_path / "e" / "bbh_results.json").exists()


@pytest.mark.slow
def test_trust_remote_code_is_explicit_and_never_asked_on_stdin(tmp_path: Path) -> None:
    """A model folder that asks for custom code: refused at once with stdin open (no [y/N] prompt)."""
    import shutil

    from mtlora.hub import resolve_model_path

    model = tmp_path / "custom"
    shutil.copytree(resolve_model_path(TINY), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "mtlora_custom_test"  # only the shipped code could build it
    cfg["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomModel"}  # fmt: skip
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(
        [sys.executable, "-m", "mtlora.cli", "eval", "bbh", "--model_name_or_path", str(model),
         "--tasks", "navigate", "--limit", "1", "--output_dir", str(tmp_path / "e")],
        input="y\n", capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert "custom code ran" not in res.stdout + res.stderr and "[y/N]" not in res.stdout + res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("error:")], res.stderr[-2000:]
    assert f"--model_name_or_path {model}: the model needs Python code shipped with it" in res.stderr
    assert "pass --trust_remote_code" in res.stderr


def test_offline_hub_id_is_one_error_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = _eval(["bbh", "--model_name_or_path", "someorg/not-cached-model", "--tasks", "navigate",
                "--output_dir", str(tmp_path / "e")])  # fmt: skip
    assert rc == 2 and "someorg/not-cached-model" in _error_line(capsys)
