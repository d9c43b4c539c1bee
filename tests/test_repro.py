"""`mtlora repro`: dry-run commands, and the Table 2 smoke run on the tiny model (acceptance of issue 5)."""

from __future__ import annotations

import json

from mtlora.cli import main as cli_main
from mtlora.repro import table_rows


def test_dry_run_prints_every_command(capsys) -> None:
    assert cli_main(["repro", "tables/1_routing_granularity.sh", "--dry-run", "--num_gpus", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 * 2 * 2  # 5 group sizes x 2 setups x (train + eval)
    trains = [x for x in lines if "train.py" in x]
    assert all(x.startswith("torchrun --nproc_per_node 2 train.py") for x in trains)
    for gs in (4096, 2048, 512, 256, 128):
        assert any(f"--routing_group_size {gs} " in x for x in trains)
    assert any(
        "--spectral" not in x and "--gradient_accumulation_steps 1" in x for x in trains
    )  # 16 x 1 x 2 = 32
    evals = [x for x in lines if "eval_" in x]
    assert any("eval_bbh.py" in x and "--num_few_shot 3" in x for x in evals)
    assert any("eval_mmlu.py" in x and "--num_few_shot 5" in x for x in evals)


def test_table1_baselines_dry_run(capsys) -> None:
    assert cli_main(["repro", "table1", "--dry-run"]) == 0
    trains = [x for x in capsys.readouterr().out.splitlines() if "train.py" in x]
    assert len(trains) == 8
    assert (
        sum("--method lorahub" in x for x in trains) == 2
        and sum("--method mmoelora" in x for x in trains) == 2
    )


def test_table_definitions() -> None:
    assert [r.id for r in table_rows("table2")] == [
        "hydralora", "block_ffn", "block_ffn_spectral", "block_ffn_fgr", "mtlora_full",
    ]  # fmt: skip
    assert len(table_rows("table4")) == 4 and len(table_rows("tableS7")) == 3


def test_table2_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "R"
    assert cli_main(["repro", "table2", "--smoke", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    final = printed[printed.rindex("table2 (smoke") :]  # the assembled table printed last
    table = [x for x in final.splitlines() if x.startswith("| ") and "configuration" not in x]
    assert len(table) == 5, printed[-3000:]
    res = json.loads((out / "table2" / "results.json").read_text())
    assert [r["id"] for r in res["rows"]] == [r.id for r in table_rows("table2")]
    for r in res["rows"]:
        assert r["bbh"] is not None and r["mmlu"] is not None and r["trainable_params"] > 0
    one = json.loads((out / "table2" / "mmlu" / "mtlora_full" / "result.json").read_text())
    assert len(one["config_hash"]) == 16 and "--enable_spectral_reg" in one["train_command"]
    # resumable: a second run skips every finished configuration
    assert cli_main(["repro", "table2", "--smoke", "--output_dir", str(out), "--setups", "bbh"]) == 0
    assert capsys.readouterr().out.count("[skip]") == 5
