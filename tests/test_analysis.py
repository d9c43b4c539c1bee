"""`mtlora analyze`: every figure of docs/analyze.md on tiny adapters trained with the real trainer.

Two adapters are trained once per module on the bundled stories260k model (8 steps, 4 tasks x 10 records):
a component one (q_proj, v_proj; HydraLoRA + fine-grained routing) and a block-FFN one (+ FGR). Then
``mtlora analyze all`` runs on both, and each test checks one figure family: files written, values
finite, shapes right. MMoELoRA (task-id routing) and plain LoRA (no router) adapters are built directly.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from mtlora.analysis import gradients, spectral
from mtlora.analysis.cli import main as analyze
from mtlora.analysis.common import layer_index, select_layer, short_name
from mtlora.errors import CheckpointError, MtLoraError

TINY = "mtlora:stories260k"
TASKS = ["arithmetic", "reverse", "story", "uppercase"]
RANK, EXPERTS, GROUP = 8, 4, 16
LAYERS = 5  # stories260k
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records() -> list[dict[str, str]]:
    rng = random.Random(0)
    words = ["cat", "dog", "sun", "tree", "ball", "girl", "boy", "mom", "park", "fish", "bird", "cake"]
    recs = []
    for _ in range(10):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        recs.append(
            {
                "instruction": "Add the numbers.",
                "input": f"{a} and {b}",
                "output": str(a + b),
                "task_type": "arithmetic",
            }
        )
        w = rng.sample(words, 3)
        recs.append(
            {
                "instruction": "Reverse the words.",
                "input": " ".join(w),
                "output": " ".join(w[::-1]),
                "task_type": "reverse",
            }
        )
        w1 = rng.choice(words)
        recs.append(
            {
                "instruction": "Write it in capitals.",
                "input": w1,
                "output": w1.upper(),
                "task_type": "uppercase",
            }
        )
        w = rng.sample(words, 2)
        recs.append(
            {
                "instruction": "Tell a short story.",
                "input": " ".join(w),
                "output": f"Once upon a time a {w[0]} met a {w[1]}. They were happy.",
                "task_type": "story",
            }
        )
    return recs


def _train(data: Path, out: Path, *extra: str) -> Path:
    from mtlora.training.arguments import parse_train_args
    from mtlora.training.run import train

    argv = [
        "--model_name_or_path", TINY, "--train_file", str(data), "--output_dir", str(out),
        "--max_seq_length", "64", "--per_device_train_batch_size", "8", "--max_steps", "8",
        "--learning_rate", "5e-3", "--logging_steps", "4", "--disable_tqdm", "True", "--save_strategy", "no",
        "--lora_rank", str(RANK), "--lora_nums", str(EXPERTS), "--method", "mtlora",
        "--enable_fine_grained_routing", "--routing_group_size", str(GROUP), *extra,
    ]  # fmt: skip
    return train(*parse_train_args(argv))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the model is tiny, and on a shared 2-core machine OpenMP spin-waiting made the
    analyses 5-10x slower in CPU time than single-threaded runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    """Train both adapters and run ``mtlora analyze all`` on them (component = --adapter, block = --adapter2)."""
    root = tmp_path_factory.mktemp("analysis")
    data = root / "train.json"
    data.write_text(json.dumps(_records()))
    comp = _train(data, root / "comp")
    block = _train(data, root / "block", "--enable_block_adapter", "--block_adapter_type", "ffn")
    out = root / "out"
    argv = ["all", "--adapter", str(comp), "--adapter2", str(block), "--data", str(data)]
    argv += ["--output_dir", str(out), "--max_examples", "40", "--grad_batches", "2", "--layer", "2"]
    assert analyze(argv) == 0
    return {"data": data, "comp": comp, "block": block, "out": out}


def _json(path: Path) -> Any:
    assert path.is_file(), path
    return json.loads(path.read_text())


def _finite(values: Any) -> bool:
    t = torch.as_tensor(values, dtype=torch.float64)
    return bool(torch.isfinite(t).all())


def _png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000, path


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_all_writes_every_figure(run: dict[str, Any]) -> None:
    out = run["out"]
    per_adapter = [
        "routing_entropy",
        "expert_usage",
        "sv_spectrum",
        "spectral_conflict",
        "gradient_similarity",
    ]
    for label, fgr in (("component", ["L2_q_proj", "L2_v_proj"]), ("block-ffn", ["L2_mlp"])):
        for stem in per_adapter + [f"fgr_routing_{x}" for x in fgr]:
            _png(out / label / f"{stem}.png")
            _json(out / label / f"{stem}.json")
        assert (out / label / "routing_weights.pt").is_file()
    for stem in ("gradient_similarity_compare", "sv_spectrum_compare"):
        _png(out / f"{stem}.png")
        _json(out / f"{stem}.json")
    summary = _json(out / "analysis_summary.json")
    assert summary["skipped"] == {} and set(summary["adapters"]) == {"component", "block-ffn"}


@pytest.mark.slow
def test_routing_entropy_per_layer(run: dict[str, Any]) -> None:
    for label, n_adapters in (("component", 2 * LAYERS), ("block-ffn", LAYERS)):
        res = _json(run["out"] / label / "routing_entropy.json")
        assert len(res["entropy_per_layer"]) == len(res["layers"]) == n_adapters
        assert _finite(res["entropy_per_layer"])
        assert res["max_entropy"] == pytest.approx(math.log(EXPERTS))
        assert all(0 < h <= math.log(EXPERTS) + 1e-9 for h in res["entropy_per_layer"])
        assert set(res["entropy_per_task"]) == set(TASKS)
        assert all(len(v) == n_adapters and _finite(v) for v in res["entropy_per_task"].values())
        assert res["overall_mean"] == pytest.approx(sum(res["entropy_per_layer"]) / n_adapters)
        assert all(n > 0 for n in res["num_tokens"].values())


@pytest.mark.slow
def test_expert_usage_per_task(run: dict[str, Any]) -> None:
    res = _json(run["out"] / "component" / "expert_usage.json")
    assert res["tasks"] == TASKS
    for table in (res["usage_per_task"], res["top1_fraction_per_task"]):
        for row in table.values():
            assert len(row) == EXPERTS and _finite(row) and sum(row) == pytest.approx(1.0, abs=1e-6)
    assert len(res["usage_per_layer"]) == 2 * LAYERS


@pytest.mark.slow
def test_fgr_heatmaps_are_groups_by_experts(run: dict[str, Any]) -> None:
    # q_proj: 64 outputs -> 4 groups; v_proj: 32 -> 2; block mlp: hidden 64 -> 4
    for label, stem, groups in (
        ("component", "L2_q_proj", 4),
        ("component", "L2_v_proj", 2),
        ("block-ffn", "L2_mlp", 4),
    ):
        res = _json(run["out"] / label / f"fgr_routing_{stem}.json")
        assert layer_index(res["layer"]) == 2
        assert res["num_groups"] == groups and res["num_experts"] == EXPERTS
        for mat in [res["mean"], *res["mean_per_task"].values()]:
            t = torch.tensor(mat)
            assert t.shape == (groups, EXPERTS) and torch.isfinite(t).all()
            assert torch.allclose(t.sum(-1), torch.ones(groups), atol=1e-6)  # softmax over experts per group
        assert list(res["mean_per_task"]) == TASKS
    # the released Fig. S4 script's input: {task: {layer_name: {"mean": Tensor[G, E]}}}
    weights = torch.load(run["out"] / "block-ffn" / "routing_weights.pt")
    assert set(weights) == set(TASKS)
    assert weights["story"]["model.layers.0.mlp"]["mean"].shape == (4, EXPERTS)


@pytest.mark.slow
def test_spectral_spectrum_and_conflict(run: dict[str, Any]) -> None:
    for label in ("component", "block-ffn"):
        spec = _json(run["out"] / label / "sv_spectrum.json")
        assert spec["rank"] == RANK and len(spec["mean_spectrum"]) == RANK and _finite(spec["mean_spectrum"])
        assert all(a >= b - 1e-9 for a, b in zip(spec["mean_spectrum"], spec["mean_spectrum"][1:]))
        w = spec["w_sigma"]
        assert len(w) == RANK and all(0 < x <= 1 for x in w)
        assert all(a <= b for a, b in zip(w, w[1:]))  # w decreases with sigma, sigma is descending
        corr = torch.tensor(spec["expert_correlation"])
        assert corr.shape == (EXPERTS, EXPERTS) and torch.allclose(corr.diagonal(), torch.ones(EXPERTS))
        assert all(len(v) == EXPERTS and len(v[0]) == RANK for v in spec["singular_values"].values())
        conf = _json(run["out"] / label / "spectral_conflict.json")
        assert [(b["start"], b["stop"]) for b in conf["bands"]] == [(0, 1), (1, 4), (4, 8)]
        for key in ("conflict_percent", "importance_percent"):
            assert len(conf[key]) == 3 and _finite(conf[key]) and sum(conf[key]) == pytest.approx(100.0)
        assert len(conf["conflict_per_layer"]) == len(conf["layers"])
    cmp = _json(run["out"] / "sv_spectrum_compare.json")
    assert cmp["labels"] == ["component", "block-ffn"] and len(cmp["relative_change"]) == RANK
    assert _finite(cmp["relative_change"])


@pytest.mark.slow
def test_gradient_similarity_matrices(run: dict[str, Any]) -> None:
    results = {}
    for label in ("component", "block-ffn"):
        res = _json(run["out"] / label / "gradient_similarity.json")
        results[label] = res
        assert res["tasks"] == TASKS
        sim = torch.tensor(res["similarity_matrix"], dtype=torch.float64)
        assert sim.shape == (4, 4) and torch.isfinite(sim).all()
        assert torch.allclose(sim, sim.T) and torch.allclose(
            sim.diagonal(), torch.ones(4, dtype=torch.float64)
        )
        assert sorted(res["per_layer"], key=int) == [str(i) for i in range(LAYERS)]
        means = [v["mean"] for v in res["per_layer"].values()]
        assert _finite(means) and all(-1 <= m <= 1 for m in means)
        assert all(v["std"] >= 0 for v in res["per_layer"].values())
        assert res["overall_mean"] == pytest.approx(sum(means) / len(means))
        assert all(torch.tensor(v["similarity_matrix"]).shape == (4, 4) for v in res["per_layer"].values())
        assert all(n > 0 for n in res["gradient_norm_per_task"].values())
    # component layers hold q_proj and v_proj adapters, block layers the mlp adapter
    assert len(results["component"]["per_layer"]["3"]["adapters"]) == 2
    cmp = _json(run["out"] / "gradient_similarity_compare.json")
    a, b = results["component"]["overall_mean"], results["block-ffn"]["overall_mean"]
    assert cmp["overall_mean"] == {"component": pytest.approx(a), "block-ffn": pytest.approx(b)}
    assert cmp["reduction"] == pytest.approx((a - b) / a)
    assert set(cmp["per_layer"]["0"]) == {"component", "block-ffn"}


@pytest.mark.slow
def test_single_analysis_commands(run: dict[str, Any], tmp_path: Path) -> None:
    """Each sub-command alone writes only its own figures; --module and --tokens filter what is analysed."""
    out = tmp_path / "spec"
    assert (
        analyze(["spectral", "--adapter", str(run["comp"]), "--output_dir", str(out), "--module", "v_proj"])
        == 0
    )
    assert sorted(p.name for p in out.glob("*.png")) == ["spectral_conflict.png", "sv_spectrum.png"]
    assert all(n.endswith("v_proj") for n in _json(out / "sv_spectrum.json")["layers"])
    out = tmp_path / "routing"
    argv = ["routing", "--adapter", str(run["block"]), "--data", str(run["data"]), "--output_dir", str(out)]
    assert analyze([*argv, "--tokens", "answer", "--max_examples", "12", "--layer", "-1"]) == 0
    res = _json(out / "routing_entropy.json")
    assert res["tokens"] == "answer" and len(res["entropy_per_layer"]) == LAYERS
    assert (out / "fgr_routing_L4_mlp.png").is_file() and not (out / "gradient_similarity.json").exists()


# --------------------------------------------------------------------------------------------- other methods
def _saved_adapter(root: Path, method: str, task_map: dict[str, int] | None) -> Path:
    from transformers import AutoModelForCausalLM

    from mtlora.config import MtLoraConfig
    from mtlora.data import save_task_map
    from mtlora.hub import resolve_model_path
    from mtlora.model import get_mtlora_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))
    kw: dict[str, Any] = {"lora_rank": RANK}
    if method == "mmoelora":  # the rank is split over the experts: 12 / 4 = rank 3 each (3 SV bands)
        kw = {"lora_rank": 12, "expert_num": 4, "task_num": len(task_map or {})}
    cfg = MtLoraConfig(method=method, base_model_name_or_path=TINY, **kw)
    model = get_mtlora_model(base, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(std=0.05)  # B = 0 at init: give the analyses something to measure
    out = root / method
    model.save_pretrained(out)
    if task_map:
        save_task_map(task_map, out / "task_map.json")
    return out


@pytest.mark.slow
def test_mmoelora_routes_by_task_id_and_drops_unknown_tasks(run: dict[str, Any], tmp_path: Path) -> None:
    adapter = _saved_adapter(tmp_path, "mmoelora", {"arithmetic": 0, "reverse": 1, "story": 2})
    out = tmp_path / "out"
    argv = ["all", "--adapter", str(adapter), "--data", str(run["data"]), "--output_dir", str(out)]
    assert analyze([*argv, "--max_examples", "16", "--grad_batches", "1"]) == 0
    usage = _json(out / "expert_usage.json")
    assert usage["tasks"] == ["arithmetic", "reverse", "story"]  # "uppercase" has no task embedding
    # the task gate is one distribution per task: the recorded mean must be softmax(gate(embedding[task]))
    from safetensors.torch import load_file

    w = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "model.layers.2.self_attn.q_proj.mtlora.router."
    gates = torch.softmax(w[prefix + "embedding.weight"] @ w[prefix + "gate.weight"].T, dim=-1)
    fgr = _json(out / "fgr_routing_L2_q_proj.json")
    assert torch.tensor(fgr["mean"]).shape == (1, 4)
    for task_id, task in enumerate(usage["tasks"]):
        got = torch.tensor(fgr["mean_per_task"][task], dtype=torch.float64)[0]
        assert torch.allclose(got, gates[task_id].double(), atol=1e-5), task
    grad = _json(out / "gradient_similarity.json")
    assert torch.tensor(grad["similarity_matrix"]).shape == (3, 3)
    conf = _json(out / "spectral_conflict.json")
    assert conf["rank"] == 3 and sum(conf["conflict_percent"]) == pytest.approx(100.0)


@pytest.mark.slow
def test_plain_lora_has_no_routing(run: dict[str, Any], tmp_path: Path) -> None:
    adapter = _saved_adapter(tmp_path, "lora", None)
    argv = ["--adapter", str(adapter), "--data", str(run["data"]), "--max_examples", "8"]
    with pytest.raises(MtLoraError, match="no router"):
        analyze(["routing", *argv, "--output_dir", str(tmp_path / "r")])
    out = tmp_path / "all"
    assert analyze(["all", *argv, "--output_dir", str(out), "--grad_batches", "1"]) == 0
    summary = _json(out / "analysis_summary.json")
    assert "routing" in next(iter(summary["skipped"]))
    conf = _json(out / "spectral_conflict.json")
    assert conf["conflict_percent"] is None and sum(conf["importance_percent"]) == pytest.approx(100.0)
    _png(out / "spectral_conflict.png")


# --------------------------------------------------------------------------------------------- units and errors
def test_sv_bands_match_the_released_notebook() -> None:
    assert spectral.sv_bands(16) == [(0, 3), (3, 8), (8, 16)]  # indices 0-2, 3-7, 8-15
    assert spectral.sv_bands(8) == [(0, 1), (1, 4), (4, 8)]
    assert spectral.sv_bands(3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(MtLoraError):
        spectral.sv_bands(2)


def test_band_conflict_and_importance_formulas() -> None:
    torch.manual_seed(0)
    experts = {"model.layers.0.mlp": [torch.randn(12, 6) for _ in range(3)]}
    (spec,) = spectral.adapter_spectra(experts)
    bands = spectral.sv_bands(6)
    want = []
    for a, b in bands:
        vals = []
        for k in range(a, b):
            pairs = []
            for i in range(3):
                for j in range(3):
                    if i != j:
                        u_i, u_j = spec.u[i, :, k], spec.u[j, :, k]
                        cos = (u_i @ u_j).abs() / (u_i.norm() * u_j.norm())
                        pairs.append(float(spec.sv[i, k] * spec.sv[j, k] * cos))
            vals.append(sum(pairs) / len(pairs))
        want.append(sum(vals) / len(vals))
    assert spectral.band_conflict(spec, bands) == pytest.approx(want)
    sv = torch.linalg.svdvals(torch.stack(experts["model.layers.0.mlp"]).double())
    imp = [float((100 * sv[:, a:b].sum(1) / sv.sum(1)).mean()) for a, b in bands]
    assert spectral.band_importance(spec, bands) == pytest.approx(imp)
    assert sum(imp) == pytest.approx(100.0)


def test_similarity_per_layer_groups_adapters_by_layer() -> None:
    g = {
        "model.layers.0.self_attn.q_proj": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        "model.layers.0.self_attn.v_proj": torch.tensor([[0.0], [0.0], [0.0]]),
        "model.layers.1.self_attn.q_proj": torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]]),
    }
    res = gradients.similarity_result(g, ["a", "b", "c"], "x")
    assert set(res["per_layer"]) == {"0", "1"}
    s = 1 / math.sqrt(2)
    assert res["per_layer"]["0"]["mean"] == pytest.approx((0 + s + s) / 3)
    assert res["per_layer"]["1"]["mean"] == pytest.approx((-1 + 1 - 1) / 3)
    assert res["overall_mean"] == pytest.approx(((2 * s) / 3 - 1 / 3) / 2)
    perm = gradients.align_tasks(res, ["c", "a", "b"])
    assert perm["similarity_matrix"][0, 1] == pytest.approx(res["similarity_matrix"][2, 0])


def test_names_and_layer_selection() -> None:
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")]
    assert short_name(names[3]) == "L1.v_proj"
    assert select_layer(names, None) == names[4:6]  # middle layer (2 of 0..3)
    assert select_layer(names, "0") == names[:2]
    assert select_layer(names, "layers.3.self_attn.v") == names[7:]
    with pytest.raises(MtLoraError):
        select_layer(names, "9")


@pytest.mark.slow
def test_cli_errors(run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(MtLoraError, match="--data is required"):
        analyze(["routing", "--adapter", str(run["comp"]), "--output_dir", str(tmp_path)])
    with pytest.raises(CheckpointError, match="not found"):
        analyze(["spectral", "--adapter", str(tmp_path / "nope"), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        analyze(["plots", "--adapter", str(run["comp"]), "--output_dir", str(tmp_path)])


def test_labels_cannot_leave_output_dir_and_summaries_are_kept(tmp_path: Path) -> None:
    """Issue 15: --label names a sub-folder, so separators and '..' are refused; an earlier analysis in
    --output_dir is not replaced without --overwrite_output_dir (both checked before anything loads)."""
    out = tmp_path / "figs"
    base = [
        "spectral",
        "--adapter",
        str(tmp_path / "a"),
        "--adapter2",
        str(tmp_path / "b"),
        "--output_dir",
        str(out),
    ]
    for flag, bad in (("--label", "../.."), ("--label2", "x/y"), ("--label", ".."), ("--label", "")):
        with pytest.raises(MtLoraError, match=rf"{flag} '{re.escape(bad)}': must be a plain name"):
            analyze([*base, flag, bad])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    out.mkdir()
    (out / "analysis_summary.json").write_text("{}")
    with pytest.raises(MtLoraError, match=r"already holds analysis_summary\.json.*--overwrite_output_dir"):
        analyze(base)
