"""benchmarks/mechanisms.py: the Fig. 1 A/B/C measurements (formulas on constructed inputs, then one tiny run
for the JSON schema and the closing lines; no timing or accuracy assertions)."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
from _tiny import REPO, tiny_model

sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))  # make_base.py
import mechanisms  # noqa: E402

from mtlora.analysis.spectral import adapter_spectra, band_conflict, sv_bands  # noqa: E402
from mtlora.errors import MtLoraError  # noqa: E402


def _resolve(*argv: str):
    return mechanisms.resolve(mechanisms.build_parser().parse_args(list(argv)))


def test_resolve_defaults_quick_and_errors(tmp_path) -> None:
    full = _resolve()
    assert full.lambdas == [0.0, 0.1, 0.25, 0.5, 1.0] and full.seeds == [1, 2, 3]
    assert full.panels == ["1A", "1B", "1C"] and full.modes == ["uniform", "spectral"]
    assert (full.lora_rank, full.experts, full.num_tasks) == (16, 16, 15)
    assert full.out.name == "mechanisms.json" and full.jobs >= 1
    quick = _resolve("--quick", "--panels", "1c,1a")
    assert quick.out.name == "mechanisms_quick.json" and quick.panels == ["1A", "1C"]
    assert quick.seeds == [1] and quick.lambdas == [0.0, 1.0] and quick.jobs == 1
    for bad in (["--panels", "1D"], ["--modes", "paper"], ["--lambdas", "-1"], ["--num_tasks", "1"],
                ["--lora_rank", "2"], ["--experts", "1"], ["--seeds", ","], ["--jobs", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            _resolve(*bad)


def test_sv_bands_fractions() -> None:
    # r = 16: the figure's "top 10%" is index 0 only, the notebook's 20% bins are [0,3), [3,8), [8,16)
    assert sv_bands(16, mechanisms.BAND_SPLITS["top10"]) == [(0, 1), (1, 8), (8, 16)]
    assert sv_bands(16, mechanisms.BAND_SPLITS["top20"]) == [(0, 3), (3, 8), (8, 16)] == sv_bands(16)
    with pytest.raises(MtLoraError):
        sv_bands(16, (0.0, 0.5, 0.2, 1.0))


def _experts(
    seed: int = 0, layers: int = 3, e: int = 4, d: int = 12, r: int = 6
) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.q_proj": [torch.randn(d, r, generator=g) for _ in range(e)] for i in range(layers)
    }


def test_band_shares_is_the_released_formula_and_its_two_halves() -> None:
    specs = adapter_spectra(_experts())
    bands = sv_bands(6)
    raw = torch.tensor([band_conflict(s, bands) for s in specs], dtype=torch.float64).mean(0)
    expected = (100 * raw / raw.sum()).tolist()
    assert mechanisms.band_shares(specs, bands) == pytest.approx(expected, rel=1e-9)
    # magnitude only: mean over k in band of mean over pairs of sigma_i sigma_j, by hand
    mag = []
    for s in specs:
        sv = s.sv
        off = ~torch.eye(sv.shape[0], dtype=torch.bool)
        per_k = [float((sv[:, k, None] * sv[None, :, k])[off].mean()) for k in range(sv.shape[1])]
        mag.append([sum(per_k[a:b]) / (b - a) for a, b in bands])
    mag_t = torch.tensor(mag).mean(0)
    assert mechanisms.band_shares(specs, bands, use_cos=False) == pytest.approx(
        (100 * mag_t / mag_t.sum()).tolist()
    )
    # identical experts: every |cos| is 1, so direction-only gives every band the same share
    same = {"a": [torch.randn(10, 6, generator=torch.Generator().manual_seed(1))] * 3}
    shares = mechanisms.band_shares(adapter_spectra(same), bands, use_sigma=False)
    assert shares == pytest.approx([100 / 3] * 3)
    # the shares always sum to 100
    for kw in ({}, {"use_cos": False}, {"use_sigma": False}):
        assert sum(mechanisms.band_shares(specs, bands, **kw)) == pytest.approx(100.0)


def test_spectral_panel_schema_and_importance() -> None:
    out = mechanisms.spectral_panel(_experts(r=10), 10)
    assert set(out) == {"top10", "top20"}
    assert out["top10"]["bands"] == [[0, 1], [1, 5], [5, 10]] and out["top20"]["bands"] == [
        [0, 2],
        [2, 5],
        [5, 10],
    ]
    for cell in out.values():
        assert sum(cell["importance_percent"]) == pytest.approx(100.0)
        assert cell["importance_percent"][0] > 100 * 1 / 10  # the largest SV holds more than its index share


def test_orthogonality_gap() -> None:
    q, _ = torch.linalg.qr(torch.randn(20, 5, generator=torch.Generator().manual_seed(0)))
    assert mechanisms.orthogonality_gap({"a": [3.0 * q]}) == pytest.approx(0.0, abs=1e-6)
    skewed = q * torch.tensor([10.0, 1, 1, 1, 1])
    assert mechanisms.orthogonality_gap({"a": [skewed]}) > 1.0
    assert math.isnan(mechanisms.orthogonality_gap({"a": [torch.zeros(4, 3)]}))  # B = 0 has no scale


def test_conflict_readings_by_hand() -> None:
    from mtlora.analysis.gradients import similarity_result

    # 3 tasks; layer 0: task 2 opposes task 0; layer 1: all orthogonal except 0-1
    g0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    g1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    res = similarity_result({"model.layers.0.mlp": g0, "model.layers.1.mlp": g1}, ["a", "b", "c"], "block")
    out = mechanisms.conflict_readings(res)
    # layer-mean matrix off-diagonals: (a,b) = (0 + 1)/2, (a,c) = (-1 + 0)/2, (b,c) = (0 + 0)/2
    assert out["values"] == pytest.approx([0.5, -0.5, 0.0])
    assert out["layer_mean"] == pytest.approx({"negative_share": 1 / 3, "mean_cos": 0.0})
    assert out["pooled"]["negative_share"] == pytest.approx(1 / 6)
    assert mechanisms.reduction(-0.055, -0.015) == pytest.approx(0.727, abs=1e-3)
    assert mechanisms.reduction(0.0, 0.1) is None


def test_mean_std() -> None:
    assert mechanisms.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mechanisms.mean_std([None, float("nan")])["mean"] is None
    v = mechanisms.vector_mean_std([[1.0, 2.0], [3.0, 4.0], None])
    assert v["mean"] == [2.0, 3.0] and v["std"] == pytest.approx([math.sqrt(2)] * 2) and v["n"] == 2


def test_lambda_zero_is_hydralora() -> None:
    """λ = 0 of both sweeps is the same HydraLoRA: ``--method mtlora`` with only a zero-weight regularizer
    builds the same parameters and outputs as ``--method hydralora`` (so one baseline run serves both)."""
    from mtlora.model import get_mtlora_model

    ns = _resolve("--experts", "4", "--lora_rank", "4")
    hydra = mechanisms.adapter_config(mechanisms.component_flags(ns), ns)
    reg = mechanisms.adapter_config(mechanisms.component_flags(ns, "uniform", 0.5), ns)
    reg.spectral_reg_lambda = 0.0
    assert hydra.method == "hydralora" and reg.method == "mtlora" and reg.spectral_reg_mode == "uniform"
    x = torch.randint(0, 128, (2, 7))
    outs = []
    for cfg in (hydra, reg):
        torch.manual_seed(3)
        model = get_mtlora_model(tiny_model(), cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))  # B != 0 so the adapters contribute
        model.eval()
        outs.append((sorted((n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad),
                     model(input_ids=x).logits))  # fmt: skip
    assert outs[0][0] == outs[1][0]
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_block_rank_is_closest_to_half() -> None:
    ns = _resolve("--experts", "4", "--lora_rank", "8")
    rank, info = mechanisms.pick_block_rank("mtlora:stories260k", ns)
    assert info["block_rank"] == rank and abs(info["ratio"] - 0.5) < 0.1
    from mtlora.hub import load_model

    base = load_model("mtlora:stories260k", device="cpu", freeze=False).model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for other in (rank - 1, rank + 1):
        if other >= 1:
            n = mechanisms.trainable_params(
                base, mechanisms.adapter_config(mechanisms.block_flags(ns, other), ns)
            )
            assert abs(n / info["component_params"] - 0.5) >= abs(info["ratio"] - 0.5)
    after = base.state_dict()  # counted on copies: the loaded base is never wrapped
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


LINE = {
    "1A": r"panel=1A seeds=1 lambdas=0,0\.5 acc_uniform=[0-9.]+,[0-9.]+ entropy_uniform=[0-9.]+,[0-9.]+",
    "1B": r"panel=1B seeds=1 (task_)?.*top10_alignment=[0-9./]+ .*top20_importance=[0-9./]+ .*",
    "1C": r"panel=1C seeds=1 neg_share_component=[0-9.]+ neg_share_block=[0-9.]+ mean_cos_component=-?[0-9.]+ "
    r"mean_cos_block=-?[0-9.]+ mean_cos_reduction=(-?[0-9.]+|nan) init_neg_share_component=.*",
}


@pytest.mark.slow
def test_mechanisms_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "mech.json"
    argv = ["--num_tasks", "3", "--steps", "4", "--pretrain_steps", "4", "--lambdas", "0,0.5", "--modes", "uniform",
            "--seeds", "0", "--train_per_task", "8", "--test_per_task", "2", "--entropy_examples", "9",
            "--grad_batches", "1", "--grad_batch_size", "2", "--experts", "4", "--lora_rank", "4",
            "--cache_dir", str(tmp_path / "cache"), "--out", str(out),
            "--jobs", "2"]  # fmt: skip  # two worker processes: the parallel path, results in plan order
    assert mechanisms.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for line, panel in zip(lines[-3:], ("1A", "1B", "1C")):
        assert re.fullmatch(LINE[panel], line), line
    data = json.loads(out.read_text())
    assert data["benchmark"] == "mechanisms" and data["lines"] == lines[-3:]
    for panel in ("1A", "1B", "1C"):
        assert out.with_name(f"mech_{panel}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["run"], r["seed"]) for r in data["runs"]] == [
        ("component", 0),
        ("block", 0),
        ("uniform_0.5", 0),
    ]
    for r in data["runs"]:
        assert 0 <= r["accuracy"] <= 1 and 0 < r["routing_entropy"] <= math.log(4) + 1e-6
        assert r["trainable_params"] > 0 and len(r["per_task"]) == 3
    c = data["panels"]["1C"]
    assert c["parameter_ratio"]["block_rank"] == data["config"]["block_rank"]
    assert c["pairs_per_layer"] == 3
    for stage in ("init", "trained"):
        for reading in ("layer_mean", "pooled", "concatenated"):
            cell = c[stage][reading]
            for m in ("component", "block"):
                assert 0 <= cell["negative_share"][m]["mean"] <= 1
                assert -1 <= cell["mean_cos"][m]["mean"] <= 1
    init = {r["model"]: r["init"]["gradient_norm_share"] for r in c["per_seed"]}
    for share in init.values():  # B = 0 at initialisation: A and the router get no gradient
        assert share["B"] == pytest.approx(1.0) and share["A"] == 0 and share["router"] == 0
    b = data["panels"]["1B"]
    for level in ("expert_level", "task_level"):
        for split in ("top10", "top20"):
            cell = b[level][split]
            assert sum(cell["alignment_percent"]["mean"]) == pytest.approx(100.0)
            assert sum(cell["importance_percent"]["mean"]) == pytest.approx(100.0)
    a = data["panels"]["1A"]
    assert set(a["summary"]["uniform"]) == {"0", "0.5"}
    assert a["summary"]["uniform"]["0"]["seeds"] == [0]
    assert a["summary"]["uniform"]["0"]["accuracy_delta"]["mean"] == 0.0  # λ = 0 is its own baseline
    assert not (tmp_path / "cache" / "work-mech").exists()  # adapters removed unless --keep_runs


def test_resume_journal(tmp_path) -> None:
    """A finished run is reused only under exactly the same settings; a torn last line is ignored."""
    ns = _resolve("--experts", "4")
    flags = mechanisms.component_flags(ns)
    key = mechanisms.run_key(ns, "component", flags, 1)
    assert key == mechanisms.run_key(_resolve("--experts", "4"), "component", flags, 1)
    assert key != mechanisms.run_key(ns, "component", flags, 2)
    assert key != mechanisms.run_key(_resolve("--experts", "4", "--steps", "7"), "component", flags, 1)
    assert key != mechanisms.run_key(_resolve("--experts", "4", "--panels", "1A"), "component", flags, 1)
    path = tmp_path / "m.runs.jsonl"
    mechanisms._common.journal_append(
        path, {"key": key, "row": {"accuracy": 0.5}, "gradients": [], "spectral": []}
    )
    path.write_text(path.read_text() + '{"key": "to')
    assert mechanisms._common.journal_read(path) == {
        key: {"key": key, "row": {"accuracy": 0.5}, "gradients": [], "spectral": []}
    }


def test_pretrain_steps_zero_only_for_a_non_bundled_base() -> None:
    with pytest.raises(SystemExit, match="pretrain_steps"):
        _resolve("--pretrain_steps", "0")
    with pytest.raises(SystemExit, match="pretrain_steps"):
        _resolve("--pretrain_steps", "-1", "--model_name_or_path", "some/llm")
    ns = _resolve("--pretrain_steps", "0", "--model_name_or_path", "some/llm")
    assert ns.pretrain_steps == 0 and ns.model_name_or_path == "some/llm"
    assert _resolve().model_name_or_path == "mtlora:stories260k"


def test_run_key_names_a_non_bundled_base_by_content() -> None:
    """The bundled base keeps the keys its journals were written with; another base gets its own runs."""
    ns = _resolve("--experts", "4")
    flags = mechanisms.component_flags(ns)
    bundled = mechanisms.run_key(ns, "component", flags, 1)
    ns.base_key = None
    assert mechanisms.run_key(ns, "component", flags, 1) == bundled
    ns.base_key = "pretrained_base-aaaa"
    other = mechanisms.run_key(ns, "component", flags, 1)
    ns.base_key = "pretrained_base-bbbb"
    assert len({bundled, other, mechanisms.run_key(ns, "component", flags, 1)}) == 3


def test_make_base_is_reproducible_and_loads(tmp_path) -> None:
    """scripts/make_base.py: a llama2.c-style base with the bundled tokenizer, the same weights for the
    same seed, loadable by mtlora's loader; it never writes into a non-empty folder."""
    import make_base
    from safetensors.torch import load_file

    from mtlora.hub import load_model

    argv = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4",
            "--num_key_value_heads", "2"]  # fmt: skip
    a = make_base.make_base(make_base.build_parser().parse_args(["--out", str(tmp_path / "a"), *argv]))
    b = make_base.make_base(make_base.build_parser().parse_args(["--out", str(tmp_path / "b"), *argv]))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    loaded = load_model(str(a), device="cpu")
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (32, 2, 96)
    assert cfg.vocab_size == len(loaded.tokenizer) == 512
    info = json.loads((a / "make_base.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    with pytest.raises(SystemExit, match="not empty"):
        make_base.make_base(make_base.build_parser().parse_args(["--out", str(a), *argv]))
    with pytest.raises(SystemExit, match="multiple"):
        make_base.make_base(
            make_base.build_parser().parse_args(["--out", str(tmp_path / "c"), "--hidden_size", "30"])
        )
    assert make_base.llama2c_ffn_width(256) == 704 and make_base.llama2c_ffn_width(64, multiple=4) == 172


def test_prepare_base_as_is_and_bundled(tmp_path) -> None:
    """--pretrain_steps 0 uses a non-bundled base untouched and keys its runs by the folder's content."""
    import make_base

    folder = make_base.make_base(
        make_base.build_parser().parse_args(
            ["--out", str(tmp_path / "base"), "--hidden_size", "32", "--num_hidden_layers", "1"]
        )
    )
    ns = _resolve("--pretrain_steps", "0", "--model_name_or_path", str(folder), "--cache_dir", str(tmp_path))
    path, info = mechanisms.prepare_base(ns, {}, suite=None)
    assert path == str(folder) and info["steps"] == 0 and info["parameters"] > 0
    assert info["architecture"]["hidden_size"] == 32 and ns.base_key
    key = ns.base_key
    (folder / "make_base.json").write_text("{}\n")  # other content, same path: other runs
    mechanisms.prepare_base(ns, {}, suite=None)
    assert ns.base_key != key


@pytest.mark.slow
def test_mechanisms_init_only_tiny(tmp_path, capsys) -> None:
    """--init_only: panel 1C at initialisation, nothing trained or evaluated; its line has the init_ fields."""
    out = tmp_path / "init.json"
    argv = ["--init_only", "--num_tasks", "3", "--pretrain_steps", "4", "--seeds", "0", "--train_per_task", "8",
            "--test_per_task", "2", "--grad_batches", "1", "--grad_batch_size", "2", "--experts", "4",
            "--lora_rank", "4", "--cache_dir", str(tmp_path / "cache"), "--out", str(out), "--jobs", "1"]  # fmt: skip
    assert mechanisms.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"panel=1C seeds=1 init_neg_share_component=[0-9.]+ init_neg_share_block=[0-9.]+ "
        r"init_mean_cos_component=-?[0-9.]+ init_mean_cos_block=-?[0-9.]+ init_mean_cos_reduction=(-?[0-9.]+|nan)",
        last,
    ), last
    data = json.loads(out.read_text())
    assert data["config"]["init_only"] and data["config"]["panels"] == ["1C"]
    assert set(data["panels"]) == {"1C"} and "trained" not in data["panels"]["1C"]
    assert [(r["run"], r["trainable_params"] > 0) for r in data["runs"]] == [
        ("component", True),
        ("block", True),
    ]
    for r in data["panels"]["1C"]["per_seed"]:
        assert set(r) == {"seed", "model", "init"} and r["init"]["gradient_norm_share"]["B"] == pytest.approx(
            1.0
        )
    assert out.with_name("init_1C.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="1C only"):
        _resolve("--init_only", "--panels", "1A,1C")
    assert _resolve("--init_only").panels == ["1C"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="cuda"):
            _resolve("--device", "cuda")


def test_make_base_from_gguf_errors(tmp_path) -> None:
    import make_base

    parse = make_base.build_parser().parse_args
    with pytest.raises(SystemExit, match="no such file"):
        make_base.make_base(parse(["--out", str(tmp_path / "x"), "--from_gguf", str(tmp_path / "none.gguf")]))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(SystemExit, match="cannot read it"):
        make_base.make_base(parse(["--out", str(tmp_path / "y"), "--from_gguf", str(bogus)]))
    assert not (tmp_path / "y").exists()
