"""`mtlora export`: static per-task exports equal mtlora's static-routing forward when loaded WITHOUT mtlora."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _tiny import bundled_base, tiny_model, two_task_records

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.data import load_records, save_task_map
from mtlora.errors import MtLoraError
from mtlora.export import (
    convert_lora_to_peft,
    estimate_task_routing,
    main,
    read_peft_lora,
    static_delta_weight,
    static_routing,
    task_gate_routing,
)
from mtlora.hub import load_tokenizer, resolve_model_path

TINY = "mtlora:stories260k"
IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80], [1, 90, 11, 12, 13, 14, 15, 16]])
TASK_MAP = {"opposite": 0, "repeat": 1}

CASES = {
    "lora": dict(method="lora", lora_rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "hydralora": dict(method="hydralora", lora_rank=4, lora_nums=3),
    "mtlora_fgr": dict(
        method="mtlora", lora_rank=4, lora_nums=3, enable_fine_grained_routing=True, routing_group_size=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
    ),
    "mmoelora": dict(method="mmoelora", lora_rank=4, expert_num=2, task_num=2),
    "block_ffn_fgr": dict(
        method="mtlora", lora_rank=4, lora_nums=3, enable_block_adapter=True, block_adapter_type="ffn",
        enable_fine_grained_routing=True, routing_group_size=32,
    ),
    "block_both_bottleneck": dict(
        method="mtlora", lora_rank=4, lora_nums=2, enable_block_adapter=True, block_adapter_type="both",
        block_adapter_style="bottleneck",
    ),
}  # fmt: skip


_base = bundled_base


def _randomise(model, seed: int) -> None:
    """B = 0 at init makes every export trivially equal; give experts and routers real weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.3)
            for p in a.router.parameters() if a.router is not None else []:
                p.copy_(torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return two_task_records(tmp_path_factory.mktemp("data") / "records.json")


def _make_adapter(root: Path, name: str, seed: int) -> Path:
    torch.manual_seed(seed)  # A's init comes from the global RNG: same adapter whatever ran before
    model = get_mtlora_model(_base(), MtLoraConfig(lora_dropout=0.0, **CASES[name]))
    _randomise(model, seed)
    out = root / f"adapter_{name}"
    model.save_pretrained(out)
    save_task_map(TASK_MAP, out / "task_map.json")
    return out


def _expected_logits(adapter_dir: Path, data_file: Path) -> dict[str, torch.Tensor]:
    """mtlora's static-routing forward per task, with the routing the export computes (all records)."""
    from mtlora.model import MtLoraModel

    model = MtLoraModel.from_pretrained(_base(), adapter_dir)
    tok = load_tokenizer(TINY)
    records = load_records(data_file)
    out = {}
    kinds = {a.router_kind for a in model.adapters()}
    for task, tid in TASK_MAP.items():
        if "task" in kinds:
            routing = task_gate_routing(model, tid)
        else:
            routing = estimate_task_routing(model, tok, [r for r in records if r["task_type"] == task]).probs
        with torch.no_grad(), static_routing(model, routing):
            out[task] = model(input_ids=IDS).logits
        if "task" in kinds:  # MMoELoRA: the per-task export is exact
            with torch.no_grad():
                routed = model(input_ids=IDS, task_ids=torch.tensor([tid, tid])).logits
            assert torch.allclose(routed, out[task], atol=1e-5)
    return out


_PLAIN_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    spec = json.load(open(sys.argv[1]))
    ids = torch.tensor(spec["ids"])
    worst = {}
    for case in spec["cases"]:
        base = AutoModelForCausalLM.from_pretrained(spec["base"]).eval()
        if case["kind"] == "peft":
            model = PeftModel.from_pretrained(base, case["dir"]).eval()
        else:
            sys.path.insert(0, case["dir"])
            sys.modules.pop("load_block_export", None)
            from load_block_export import load_block_export
            load_block_export(base, case["dir"])
            sys.path.pop(0)
            model = base
        with torch.no_grad():
            got = model(input_ids=ids).logits
        want = torch.load(case["expected"])
        worst[case["dir"]] = float((got - want).abs().max())
    assert "mtlora" not in sys.modules, "the check must not import mtlora"
    print(json.dumps(worst))
    """
)


@pytest.mark.slow
def test_exports_match_static_forward_in_plain_peft(data_file: Path, tmp_path: Path) -> None:
    """Every method: X/<task> loaded by plain peft (or the standalone block loader) == static forward."""
    cases, checks = [], {}
    for i, name in enumerate(CASES):
        adapter_dir = _make_adapter(tmp_path, name, seed=i)
        out = tmp_path / f"export_{name}"
        argv = [str(adapter_dir), "--model_name_or_path", TINY, "--calibration_data", str(data_file),
                "--eval_data", str(data_file), "--output_dir", str(out), "--max_eval_per_task", "1",
                "--max_new_tokens", "4"]  # fmt: skip
        if name == "mtlora_fgr":
            argv.append("--merged")
        if name != "mmoelora":  # the report is checked below and in test_report_schema...
            argv.append("--no_eval")
        assert main(argv) == 0
        report = json.loads((out / "report.json").read_text())
        block = name.startswith("block")
        assert report["level"] == ("block" if block else "component")
        assert report["peft_compatible"] is (not block)
        expected = _expected_logits(adapter_dir, data_file)
        for task in TASK_MAP:
            entry = report["tasks"][task]
            task_dir = out / entry["dir"]
            if name == "lora":
                assert entry["dir"] == "default" == report["default_export"]
                # the file-only conversion (used by LoRAHub) writes the same tensors
                converted = read_peft_lora(convert_lora_to_peft(adapter_dir, tmp_path / "converted"))
                exported = read_peft_lora(task_dir)
                assert converted.scaling == exported.scaling and set(converted.modules) == set(
                    exported.modules
                )
                for n, (a, b) in exported.modules.items():
                    assert torch.equal(converted.modules[n][0], a) and torch.equal(converted.modules[n][1], b)
            if block:
                for f in (
                    "block_adapter.safetensors",
                    "block_adapter_config.json",
                    "load_block_export.py",
                    "README.md",
                ):
                    assert (task_dir / f).is_file(), f
            else:
                cfg = json.loads((task_dir / "adapter_config.json").read_text())
                assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["task_type"] == "CAUSAL_LM"
            path = tmp_path / f"want_{name}_{task}.pt"
            torch.save(expected[task], path)
            cases.append({"kind": "block" if block else "peft", "dir": str(task_dir), "expected": str(path)})
            checks[str(task_dir)] = name
            if name == "mtlora_fgr":  # the merged full model gives the same logits, up to the rounding
                # of W + Delta W in fp32 (a different summation order than W x + B_t (A x)): 1e-4 on logits ~4
                from transformers import AutoModelForCausalLM

                merged = AutoModelForCausalLM.from_pretrained(task_dir / "merged").eval()
                with torch.no_grad():
                    got = merged(input_ids=IDS).logits
                assert (got - expected[task]).abs().max() < 3e-4
            if name == "mmoelora":
                assert abs(entry["nll_gap"]) < 1e-5 and entry["accuracy_gap"] == 0
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": resolve_model_path(TINY), "ids": IDS.tolist(), "cases": cases}))
    proc = subprocess.run(
        [sys.executable, "-c", _PLAIN_CHECK, str(spec)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {checks[d]: v for d, v in worst.items() if not v < 1e-5}
    assert not bad, (bad, worst)
    assert set(worst) == {c["dir"] for c in cases}


def test_report_schema_and_static_differs_from_routed(data_file: Path, tmp_path: Path) -> None:
    adapter_dir = _make_adapter(tmp_path, "hydralora", seed=7)
    out = tmp_path / "x"
    argv = [str(adapter_dir), "--calibration_data", str(data_file), "--output_dir", str(out),
            "--max_eval_per_task", "2", "--max_new_tokens", "4", "--eval_fraction", "0.34"]  # fmt: skip
    assert main(argv) == 0  # base model from the adapter's config, held-out eval split
    report = json.loads((out / "report.json").read_text())
    for key in (
        "format",
        "version",
        "adapter_dir",
        "base_model",
        "method",
        "level",
        "export_format",
        "tasks",
        "mean",
    ):
        assert key in report, key
    assert report["format"] == "mtlora-export-report" and report["method"] == "hydralora"
    assert json.loads((out / "task_map.json").read_text()) == TASK_MAP
    for entry in report["tasks"].values():
        assert entry["calibration_examples"] == 4 and entry["eval_examples"] == 2  # 6 per task, 2 held out
        assert entry["calibration_tokens"] > 0 and entry["routing_source"] == "calibration"
        for side in ("routed", "exported"):
            m = entry[side]
            assert (
                0.0 <= m["accuracy"] <= 1.0 and m["nll"] > 0 and m["examples"] == 2 and m["target_tokens"] > 0
            )
        assert entry["base"]["nll"] > 0
        assert entry["nll_gap"] == pytest.approx(entry["exported"]["nll"] - entry["routed"]["nll"])
        # freezing a token router is an approximation: the two forwards really differ
        assert entry["routed"]["nll"] != entry["exported"]["nll"]


def test_block_merged_and_missing_calibration_are_errors(data_file: Path, tmp_path: Path) -> None:
    block = _make_adapter(tmp_path, "block_ffn_fgr", seed=3)
    with pytest.raises(MtLoraError, match="not a LoRA on any existing nn.Linear"):
        main(
            [
                str(block),
                "--calibration_data",
                str(data_file),
                "--output_dir",
                str(tmp_path / "b"),
                "--merged",
            ]
        )
    hydra = _make_adapter(tmp_path, "hydralora", seed=4)
    with pytest.raises(MtLoraError, match="--calibration_data is required"):
        main([str(hydra), "--output_dir", str(tmp_path / "h")])
    # tasks whose targets are all truncated away are skipped (named in the report); none left is an error
    with pytest.raises(MtLoraError, match="no task could be exported: .*truncated away"):
        main([str(hydra), "--calibration_data", str(data_file), "--output_dir", str(tmp_path / "t"),
              "--max_seq_length", "6", "--no_eval"])  # fmt: skip


@pytest.mark.parametrize("name", ["hydralora", "mtlora_fgr", "mmoelora", "lora"])
def test_collapsed_experts_equal_frozen_router(name: str) -> None:
    """Per adapter: the fused multi-expert forward with the router output frozen (collapse=False), the
    collapsed ``B_t`` forward (collapse=True, what is exported) and ``x (scaling B_t A)^T`` all agree."""
    kwargs = dict(CASES[name])
    kwargs.pop("target_modules", None)
    if name == "mtlora_fgr":
        kwargs["target_modules"] = ["q_proj", "o_proj", "down_proj"]
    model = get_mtlora_model(tiny_model("llama"), MtLoraConfig(lora_dropout=0.0, **kwargs))
    _randomise(model, 0)
    gen = torch.Generator().manual_seed(1)
    routing = {
        n: torch.softmax(torch.randn(a.num_groups, a.num_experts, generator=gen), -1)
        for n, a in model.named_adapters()
        if a.router_kind != "none"
    }
    xs = {n: torch.randn(3, 5, a.in_features, generator=gen) for n, a in model.named_adapters()}
    outs = {}
    for collapse in (False, True):
        with torch.no_grad(), static_routing(model, routing, collapse=collapse):
            outs[collapse] = {n: a(xs[n]) for n, a in model.named_adapters()}
    for n, a in model.named_adapters():
        want = xs[n] @ static_delta_weight(a, routing.get(n)).T
        assert torch.allclose(outs[False][n], want, atol=1e-5), n
        assert torch.allclose(outs[True][n], want, atol=1e-5), n
        assert "routing_probs" not in a.__dict__ and "forward" not in a.__dict__  # undone on exit
    with torch.no_grad(), static_routing(model, routing, collapse=False), torch.no_grad():
        frozen = model(input_ids=IDS[:, :6] % 128).logits
    with torch.no_grad(), static_routing(model, routing):
        collapsed = model(input_ids=IDS[:, :6] % 128).logits
    assert torch.allclose(frozen, collapsed, atol=1e-4)


def test_calibration_means_are_per_group_and_mask_weighted(data_file: Path) -> None:
    """Averaged over groups, the per-group calibration means equal collect_routing_stats' mean_probs."""
    model = get_mtlora_model(_base(), MtLoraConfig(lora_dropout=0.0, **CASES["mtlora_fgr"]))
    _randomise(model, 5)
    tok = load_tokenizer(TINY)
    records = load_records(data_file)[:3]  # different lengths: one padded batch
    routing = estimate_task_routing(model, tok, records, batch_size=8)
    assert routing.examples == 3
    from mtlora.inference import encode_examples, pad_right

    batch = pad_right([(e.ids, e.labels) for e in encode_examples(records, tok, 512, "paper")], 0, "cpu")
    assert int(batch["attention_mask"].min()) == 0  # padding really is present
    assert routing.tokens == int(batch["attention_mask"].sum())
    with torch.no_grad(), model.collect_routing_stats() as stats:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for n, a in model.named_adapters():
        probs = routing.probs[n]
        assert probs.shape == (a.num_groups, a.num_experts) and a.num_groups > 1
        assert torch.allclose(probs.sum(-1), torch.ones(a.num_groups), atol=1e-5)
        assert torch.allclose(probs.mean(0), stats[n]["mean_probs"].float(), atol=1e-5), n


def test_eval_fraction_range_and_earlier_exports_are_kept(data_file: Path, tmp_path: Path) -> None:
    """Issue 15: --eval_fraction outside (0, 1) is an error; a second export into the same folder needs
    --overwrite_output_dir; everything written has plain (umask) permissions."""
    from mtlora.atomic import current_umask

    adapter = _make_adapter(tmp_path, "lora", seed=5)
    out = tmp_path / "x"
    for bad in ("1.5", "0", "-0.2", "1"):
        with pytest.raises(MtLoraError, match=rf"--eval_fraction {float(bad)}: must be in \(0, 1\)"):
            main([str(adapter), "--output_dir", str(out), f"--eval_fraction={bad}", "--no_eval"])
    assert not out.exists()
    argv = [str(adapter), "--eval_data", str(data_file), "--output_dir", str(out), "--no_eval"]
    assert main(argv) == 0
    report = (out / "report.json").read_bytes()
    with pytest.raises(MtLoraError, match=r"already holds .*--overwrite_output_dir"):
        main(argv)
    assert (out / "report.json").read_bytes() == report
    assert main([*argv, "--overwrite_output_dir"]) == 0
    plain = 0o666 & ~current_umask()
    for p in out.rglob("*"):
        assert (p.stat().st_mode & 0o777) == (plain | 0o111 if p.is_dir() else plain), p


def test_progress_bar_per_task_and_no_progress(data_file: Path, tmp_path: Path, capsys) -> None:
    """Issue 16: the export shows a per-task bar on stderr; --no_progress turns it (and only it) off."""
    from mtlora.cli_args import set_progress

    adapter = _make_adapter(tmp_path, "lora", seed=6)
    argv = [str(adapter), "--eval_data", str(data_file), "--no_eval"]
    try:
        assert main([*argv, "--output_dir", str(tmp_path / "a")]) == 0
        assert "export: 100%" in capsys.readouterr().err
        assert main([*argv, "--output_dir", str(tmp_path / "b"), "--no_progress"]) == 0
        assert "export:" not in capsys.readouterr().err
    finally:
        set_progress(True)


def test_package_split_keeps_the_entry_points_and_documented_names() -> None:
    """export.py became the mtlora/export/ package: `python -m mtlora.export` and every name docs/export.md
    documents still import from ``mtlora.export``."""
    import mtlora.export as export

    documented = (
        "estimate_task_routing task_gate_routing static_routing static_up_projection static_delta_weight "
        "export_peft_lora export_block_adapter save_merged_model load_block_export convert_lora_to_peft "
        "write_peft_lora read_peft_lora evaluate_records export_adapter EvalMetrics PeftLora TaskRouting main"
    ).split()
    assert all(callable(getattr(export, n)) for n in documented)
    assert set(documented) <= set(export.__all__)
    done = subprocess.run([sys.executable, "-m", "mtlora.export", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: mtlora export"), done.stderr
