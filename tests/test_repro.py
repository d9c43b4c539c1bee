"""`mtlora repro`: the dry-run rows equal the released table rows flag by flag, batch layouts, the Table 2
smoke run on the tiny model (acceptance of issues 5 and 12)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from mtlora.cli import main as cli_main
from mtlora.errors import MtLoraError
from mtlora.repro import Layout, batch_layout, table_rows

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "released_table_rows.tsv"
SHARED_DOC = Path(__file__).resolve().parents[2] / "shared" / "docs" / "official_table_commands.md"
TABLES = {"Table 2": "table2", "Table 3": "table3", "Table 4": "table4", "Table S7": "tableS7"}
# Flags of a repro row that only say where outputs go and how often to log: not part of what is trained.
NOT_CONFIG = {"--output_dir", "--save_strategy", "--logging_steps", "--overwrite_output_dir"}  # output flags


def _released() -> list[dict[str, str]]:
    lines = [x for x in FIXTURE.read_text().splitlines() if x and not x.startswith("#")]
    head = lines[0].split("\t")
    return [dict(zip(head, x.split("\t"))) for x in lines[1:]]


def _flags(argv: list[str]) -> dict[str, str | None]:
    """``{--flag: value}``; a flag followed by another flag (or nothing) is a switch (None). Repeats fail."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        key = argv[i]
        assert key.startswith("--"), argv[i:]
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        assert key not in out, f"{key} given twice"
        out[key] = value
        i += 1 if value is None else 2
    return out


def _dry_run(capsys, table: str, *extra: str) -> list[dict]:
    """Every configuration a dry run prints: its comment line, train argv and process count, eval line."""
    assert cli_main(["repro", table, "--dry-run", *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    configs = []
    for i in range(0, len(lines), 3):
        comment, train, evaluate = lines[i : i + 3]
        m = re.match(r"# (\S+) (bbh|mmlu) (\S+): (.*); batch (\d+)x(\d+)x(\d+) = (\d+)$", comment)
        assert m, comment
        words = shlex.split(train)
        if words[0] == "torchrun":
            assert words[1] == "--nproc_per_node" and words[3] == "train.py", train
            procs, argv = int(words[2]), words[4:]
        else:
            assert words[:2] == ["python", "train.py"], train
            procs, argv = 1, words[2:]
        assert evaluate.startswith(f"python eval_{m.group(2)}.py "), evaluate
        configs.append(
            {"table": m.group(1), "setup": m.group(2), "row": m.group(3), "provenance": m.group(4),
             "layout": tuple(int(m.group(k)) for k in (5, 6, 7)), "procs": procs, "argv": argv,
             "eval": evaluate}
        )  # fmt: skip
    return configs


def test_released_rows_fixture() -> None:
    rows = _released()
    counts = {t: sum(r["table"] == t for r in rows) for t in TABLES}
    assert counts == {"Table 2": 10, "Table 3": 10, "Table 4": 8, "Table S7": 3}
    assert all("--enable_blc" in r["train_flags"].split() for r in rows)
    if SHARED_DOC.is_file():  # the project notes' copy, when present, says the same
        doc = [x for x in SHARED_DOC.read_text().splitlines() if x.startswith("| Table ")]
        assert len(doc) == len(rows)
        for line, r in zip(doc, rows):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert cells[0] == r["table"] and cells[1].strip("`").replace("` → `", " -> ") == r["script"]
            assert cells[2] == f"{r['launcher']} ×{r['processes']}" and cells[3] == r["train_flags"]


@pytest.mark.parametrize("table", list(TABLES))
def test_repro_rows_equal_the_released_rows(capsys, table: str) -> None:
    """Every released row is one dry-run configuration with exactly its flags, launched on as many processes;
    every other configuration is labelled extra."""
    from mtlora.training.arguments import parse_train_args

    ours = _dry_run(capsys, TABLES[table])
    released = [r for r in _released() if r["table"] == table]
    matched = set()
    for r in released:
        hits = [i for i, c in enumerate(ours) if c["provenance"] == f"released {r['script']}"]
        assert len(hits) == 1, (r["script"], [c["provenance"] for c in ours])
        c = ours[hits[0]]
        matched.add(hits[0])
        mine = {k: v for k, v in _flags(c["argv"]).items() if k not in NOT_CONFIG}
        assert mine == _flags(r["train_flags"].split()), r["script"]
        assert c["procs"] == int(r["processes"]), r["script"]
        assert (c["procs"] > 1) == (r["launcher"] == "accelerate launch")
        assert c["layout"] == (int(mine["--per_device_train_batch_size"]),
                               int(mine["--gradient_accumulation_steps"]), c["procs"])  # fmt: skip
    extra = [c for i, c in enumerate(ours) if i not in matched]
    assert all(c["provenance"].startswith("EXTRA") for c in extra)
    assert len(extra) == (3 if table == "Table S7" else 0)  # S7: BBH is not trained by 3_llama13b.sh
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "True"]  # --bf16 needs a GPU unless told
    for c in ours:
        assert c["layout"][0] * c["layout"][1] * c["layout"][2] == 32
        parse_train_args(
            [*c["argv"], *cpu], check_paths=False
        )  # our train.py accepts every flag of every row


def test_paper_faithful_adds_the_released_behaviour(capsys) -> None:
    plain = {(c["setup"], c["row"]): _flags(c["argv"]) for c in _dry_run(capsys, "table2")}
    for c in _dry_run(capsys, "table2", "--paper_faithful"):
        flags = _flags(c["argv"])
        added = {k: v for k, v in flags.items() if k not in plain[(c["setup"], c["row"])]}
        expected = {"--blc_alpha": "0", "--no_blc_ignore_padding": None}  # the released loss had no gradient
        if "--enable_spectral_reg" in flags:
            expected["--spectral_reg_mode"] = "paper"
        if "--enable_block_adapter" not in flags:
            expected["--adapter_dtype"] = "bfloat16"
        assert added == expected, c["row"]
        assert "--enable_blc" in flags  # the released flag is kept


def test_batch_layouts_keep_the_effective_batch() -> None:
    assert batch_layout(Layout(16, 1, 2), None) == Layout(16, 1, 2)
    assert batch_layout(Layout(16, 1, 2), 2) == Layout(16, 1, 2)
    assert batch_layout(Layout(16, 1, 2), 1) == Layout(16, 2, 1)
    assert batch_layout(Layout(8, 2, 2), 1) == Layout(8, 4, 1)
    assert batch_layout(Layout(32, 1, 1), 2) == Layout(16, 1, 2)
    assert batch_layout(Layout(16, 2, 1), 4) == Layout(8, 1, 4)
    with pytest.raises(MtLoraError, match="divisible"):
        batch_layout(Layout(16, 1, 2), 3)


def test_dry_run_prints_every_command(capsys) -> None:
    assert cli_main(["repro", "tables/1_routing_granularity.sh", "--dry-run", "--num_gpus", "2"]) == 0
    lines = [x for x in capsys.readouterr().out.strip().splitlines() if not x.startswith("#")]
    assert len(lines) == 5 * 2 * 2  # 5 group sizes x 2 setups x (train + eval)
    trains = [x for x in lines if "train.py" in x]
    assert all(x.startswith("torchrun --nproc_per_node 2 train.py") for x in trains)
    for gs in (4096, 2048, 512, 256, 128):
        assert any(f"--routing_group_size {gs}" in x for x in trains)
    for x in trains:  # 16 x 1 x 2 = 32, MMLU rows included
        assert "--per_device_train_batch_size 16" in x and "--gradient_accumulation_steps 1" in x
    evals = [x for x in lines if "eval_" in x]
    assert any("eval_bbh.py" in x and "--num_few_shot 3" in x for x in evals)
    assert any("eval_mmlu.py" in x and "--num_few_shot 5" in x for x in evals)


def test_num_gpus_other_than_released(capsys) -> None:
    for c in _dry_run(capsys, "table2", "--num_gpus", "1"):
        assert c["procs"] == 1 and c["layout"][0] * c["layout"][1] == 32
        spectral = "--enable_spectral_reg" in c["argv"]  # released per-device batch: 8 / 32 with it, else 16
        assert c["layout"][0] == (8 if spectral and c["setup"] == "bbh" else 32 if spectral else 16)
    assert cli_main(["repro", "table2", "--dry-run", "--num_gpus", "3"]) == 2
    assert "error: --num_gpus 3" in capsys.readouterr().err


def test_real_run_needs_the_released_gpus(tmp_path: Path, capsys) -> None:
    """Without --num_gpus, a machine without 2 GPUs gets one error line before anything runs."""
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the released launch's GPUs")
    (tmp_path / "flan").mkdir()
    (tmp_path / "dolly").mkdir()
    argv = ["repro", "table2", "--output_dir", str(tmp_path / "R"), "--flan_dir", str(tmp_path / "flan"),
            "--dolly_dir", str(tmp_path / "dolly")]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uses 2 processes" in err[0] and "--num_gpus" in err[0]
    assert not (tmp_path / "R").exists()


def test_table1_baselines_dry_run(capsys) -> None:
    configs = _dry_run(capsys, "table1")
    assert len(configs) == 8 and all(c["provenance"].startswith("EXTRA") for c in configs)
    methods = [_flags(c["argv"])["--method"] for c in configs]
    assert methods.count("lorahub") == 2 and methods.count("mmoelora") == 2
    for c in configs:  # the balance loss wherever there is a token router
        assert ("--enable_blc" in c["argv"]) == (_flags(c["argv"])["--method"] in ("hydralora", "mtlora"))


def test_table_definitions() -> None:
    assert [r.id for r in table_rows("table2")] == [
        "hydralora", "block_ffn", "block_ffn_spectral", "block_ffn_fgr", "mtlora_full",
    ]  # fmt: skip
    assert len(table_rows("table4")) == 4 and len(table_rows("tableS7")) == 3
    assert all(r.is_extra("bbh") and not r.is_extra("mmlu") for r in table_rows("tableS7"))


@pytest.mark.slow
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
        assert r["extra_setups"] == [] and r["released"]["bbh"].startswith("exp/bbh/")
    one = json.loads((out / "table2" / "mmlu" / "mtlora_full" / "result.json").read_text())
    assert len(one["config_hash"]) == 16 and "--enable_spectral_reg" in one["train_command"]
    assert "--enable_blc" in one["train_command"] and one["extra"] is False
    assert one["released_script"] == "exp/mmlu/block/ffn/spectral+fgr/g2048.sh"
    # resumable: a second run skips every finished configuration
    assert cli_main(["repro", "table2", "--smoke", "--output_dir", str(out), "--setups", "bbh"]) == 0
    assert capsys.readouterr().out.count("[skip]") == 5
