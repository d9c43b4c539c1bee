"""The released ``train.py``'s own flags and the transformers-4.x flags its scripts pass (issue 13): each one
has its released meaning here, or is refused with one line saying why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _tiny import REPO
from safetensors.torch import load_file

from mtlora.errors import ConfigError
from mtlora.training.arguments import RELEASED_DEFAULTS, parse_train_args
from mtlora.training.cli import main as train_main
from mtlora.training.run import load_base_model

TINY = "mtlora:stories260k"
DOLLY = REPO / "src" / "mtlora" / "assets" / "train_data" / "dolly_sample" / "train.json"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The 32 shortest bundled Dolly records."""
    records = json.loads(DOLLY.read_text())
    records.sort(key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))
    out = tmp_path_factory.mktemp("dolly_short")
    (out / "train.json").write_text(json.dumps(records[:32]))
    return out


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", TINY, "--dataset_dir", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--disable_tqdm", "True", "--logging_steps", "1",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_overwrite_output_dir_keeps_its_transformers_4_meaning(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        train_main(_argv(data_dir, out, "--method", "lora", "--save_strategy", "steps", "--save_steps", "1"))
        == 0
    )
    assert (out / "checkpoint-2").is_dir() and (out / "sft_lora_model").is_dir()
    with pytest.raises(
        ConfigError, match=r"already holds a trained run .*--overwrite_output_dir.*--resume_from"
    ):
        train_main(_argv(data_dir, out, "--method", "lora"))
    assert train_main(_argv(data_dir, out, "--method", "lora", "--overwrite_output_dir")) == 0
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in log if '"loss"' in r] == [1, 2]  # a fresh run: a fresh log
    # resuming needs no flag; "last" picks the newest checkpoint
    argv = _argv(data_dir, out, "--method", "lora", "--resume_from_checkpoint", "last")
    argv[argv.index("--max_steps") + 1] = "3"
    assert train_main(argv) == 0
    assert json.loads((out / "run_manifest.json").read_text())["global_steps"] == 3
    empty = tmp_path / "empty"
    with pytest.raises(ConfigError, match="no checkpoint-<step> folder"):
        train_main(_argv(data_dir, empty, "--resume_from_checkpoint", "last"))


def test_logging_dir_receives_the_logs(data_dir: Path, tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs" / "run"
    argv = _argv(data_dir, out, "--method", "hydralora", "--lora_nums", "2", "--logging_dir", str(logs))
    assert train_main([*argv, "--logging_first_step", "True"]) == 0
    assert (logs / "train_log.jsonl").read_text() == (out / "train_log.jsonl").read_text()
    results = json.loads((logs / "train_results.json").read_text())
    assert results["train_samples"] == 32 and "train_loss" in results
    assert json.loads((logs / "trainer_state.json").read_text())["global_step"] == 2


def test_tensorboard_writes_to_logging_dir(data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    logs = tmp_path / "tb"
    argv = _argv(data_dir, tmp_path / "out", "--method", "lora", "--logging_dir", str(logs))
    assert train_main([*argv, "--report_to", "tensorboard"]) == 0
    assert list(logs.glob("events.out.tfevents.*"))


def test_adalora_trains_allocates_ranks_saves_and_evaluates(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ada"
    argv = _argv(data_dir, out, "--method", "adalora", "--init_r", "6", "--target_r", "2")
    argv[argv.index("--max_steps") + 1] = "6"
    assert (
        train_main([*argv, "--orth_reg_weight", "0.5", "--learning_rate", "1e-2", "--logging_steps", "1"])
        == 0
    )
    adapter = out / "sft_lora_model"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["target_r"] == 2
    assert cfg["total_step"] == 6  # from the Trainer, not the provisional estimate
    assert cfg["target_modules"] and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    # the rank schedule ran: the budget went from 6 to ~2 per matrix, so most singular values are masked
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    e = [v for k, v in weights.items() if "lora_E" in k]
    assert e and sum(int(torch.count_nonzero(t)) for t in e) < 6 * len(e) * 0.75
    assert cfg["rank_pattern"]
    from mtlora.hub import load_model

    loaded = load_model(None, out)
    assert loaded.method == "peft:ADALORA"
    from mtlora.evaluation.cli import run

    assert run("bbh", ["--lora_checkpoint", str(out), "--output_dir", str(tmp_path / "e"), "--tasks",
                       "boolean_expressions", "--limit", "2", "--no_progress", "--protocol", "paper"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "e" / "bbh_results.json").read_text())
    assert res["total_samples"] == 2


def test_mmoeloras_trains_with_the_general_row_and_evaluates_with_it(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mm"
    argv = _argv(data_dir, out, "--method", "mmoeloras", "--lora_rank", "8", "--expert_num", "4")
    assert train_main(argv) == 0
    cfg = json.loads((out / "sft_lora_model" / "adapter_config.json").read_text())
    tasks = len(json.loads((out / "task_map.json").read_text()))
    assert cfg["method"] == "mmoelora" and cfg["mmoelora_general_task"] is True and cfg["task_num"] == tasks
    emb = [
        v
        for k, v in load_file(str(out / "sft_lora_model" / "adapter_model.safetensors")).items()
        if "embedding" in k
    ]
    assert emb and all(t.shape[0] == tasks + 1 for t in emb)  # task_num + 1 rows
    from mtlora.evaluation.cli import run

    assert run("bbh", ["--lora_checkpoint", str(out), "--output_dir", str(tmp_path / "e"), "--tasks",
                       "navigate", "--limit", "1", "--no_progress", "--protocol", "paper"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "e" / "bbh_results.json").read_text())
    assert res["task_ids_used"] == {"navigate": tasks} and res["task_id_fallbacks"] == ["navigate"]


def test_modules_to_save_trains_and_saves_the_module(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mts"
    assert train_main(_argv(data_dir, out, "--method", "lora", "--modules_to_save", "lm_head")) == 0
    saved = load_file(str(out / "sft_lora_model" / "adapter_model.safetensors"))
    from transformers import AutoModelForCausalLM

    from mtlora.hub import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))
    assert not torch.equal(saved["lm_head.weight"], base.lm_head.weight.detach())


def test_do_eval_with_validation_split_percentage(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    argv = _argv(data_dir, out, "--method", "lora", "--do_eval", "--validation_split_percentage", "25")
    assert train_main(argv) == 0
    log = [json.loads(r) for r in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in log)
    assert json.loads((out / "run_manifest.json").read_text())["num_train_examples"] == 24  # 32 - 25 %
    with pytest.raises(ConfigError, match="--do_eval needs evaluation data"):
        parse_train_args(_argv(data_dir, out, "--do_eval"))
    with pytest.raises(ConfigError, match="between 0 and 100"):
        parse_train_args(_argv(data_dir, out, "--validation_split_percentage", "0.0"))


def test_model_plumbing_flags(data_dir: Path, tmp_path: Path) -> None:
    """--config_name replaces the model's config, --cache_dir / --use_auth_token reach from_pretrained."""
    from mtlora.hub import resolve_model_path

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    cfg = json.loads(Path(resolve_model_path(TINY), "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (cfg_dir / "config.json").write_text(json.dumps(cfg))
    argv = _argv(data_dir, tmp_path / "o", "--config_name", str(cfg_dir), "--cache_dir", str(tmp_path / "hf"))
    model_args, _, _, train_args = parse_train_args([*argv, "--use_auth_token"])
    model, _ = load_base_model(model_args, train_args)
    assert model.config.rms_norm_eps == 1e-3
    with pytest.raises(ConfigError, match="--config_name .*cannot load a model config"):
        model_args.config_name = str(tmp_path / "nowhere")
        load_base_model(model_args, train_args)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config_overrides", "n_embd=10"], "--config_overrides: only for training a model from scratch"),
        (["--keep_linebreaks", "False"], "--keep_linebreaks False: applies to plain-text"),
        (["--deepspeed", "./configs/ds_zero2_multi_gpu.json"], "the deepspeed package is not installed"),
        (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers 0: must be a positive integer"),
        (
            ["--method", "adalora", "--init_r", "4", "--target_r", "8"],
            "adalora needs 1 <= target_r <= init_r",
        ),
    ],
)
def test_flags_that_cannot_apply_are_refused_with_one_line(
    extra: list[str], message: str, data_dir: Path, tmp_path: Path
) -> None:
    if extra[0] == "--deepspeed" and __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_train_args(_argv(data_dir, tmp_path / "o", *extra))


def test_released_defaults_switch(data_dir: Path, tmp_path: Path) -> None:
    base = ["--model_name_or_path", TINY, "--dataset_dir", str(data_dir), "--output_dir", str(tmp_path)]
    model_args, data_args, adapter, train_args = parse_train_args(
        ["--released_defaults", *base, "--lora_alpha", "16"]
    )
    assert (adapter.method, adapter.lora_rank, adapter.lora_alpha, adapter.lora_dropout) == (
        "lora",
        8,
        16.0,
        0.1,
    )
    assert (adapter.block_adapter_type, adapter.routing_group_size, adapter.task_num) == ("attention", 1, 2)
    assert data_args.max_seq_length == 1024 and train_args.learning_rate == 5e-5
    assert train_args.save_total_limit is None and train_args.logging_steps == 500
    assert set(RELEASED_DEFAULTS) >= {
        "lora_rank",
        "lora_alpha",
        "lora_nums",
        "lora_dropout",
        "max_seq_length",
    }
    _, data_args, adapter, train_args = parse_train_args(base)  # without the switch: the scripts' values
    assert (adapter.method, adapter.lora_rank, adapter.lora_alpha, adapter.lora_nums) == (
        "mtlora",
        16,
        64.0,
        16,
    )
    assert data_args.max_seq_length == 512 and train_args.learning_rate == 2e-4


@pytest.mark.slow
def test_overwrite_cache_and_preprocessing_workers(tmp_path: Path) -> None:
    from mtlora.data import cached_tokenize, load_records
    from mtlora.hub import load_tokenizer

    tok = load_tokenizer(TINY)
    records = load_records(DOLLY)[:40]
    first = cached_tokenize(records, tok, 128, cache_dir=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    marker = entry / "marker"
    marker.write_text("x")
    cached_tokenize(records, tok, 128, cache_dir=tmp_path)
    assert marker.exists()  # a cache hit leaves the entry alone
    again = cached_tokenize(records, tok, 128, cache_dir=tmp_path, overwrite=True, num_proc=2)
    assert not marker.exists()  # --overwrite_cache: tokenised again, entry replaced
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]
    shutil.rmtree(entry)


# -------------------------------------------------------------- every flag the released train.py defines
FLAGS_DOC = REPO.parent / "shared" / "docs" / "official_train_flags.md"
QLORA_FLAGS = {"--double_quant", "--quant_type"}  # the QLoRA work's (bitsandbytes), not this test's
#: flags whose released meaning cannot apply here, with the start of their one-line refusal
REFUSED = {"--config_overrides": "--config_overrides: only for training a model from scratch"}


def _released_flags() -> list[tuple[str, str]]:
    if not FLAGS_DOC.is_file():
        return []
    rows = []
    for line in FLAGS_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and cells[2].startswith("`--"):
            rows.append((cells[2].strip("`"), cells[3].strip("`").strip("'")))
    return rows


def _sample_value(flag: str, default: str, tmp_path: Path) -> str:
    samples = {
        "--tokenizer_name_or_path": TINY, "--tokenizer_name": TINY, "--config_name": TINY,
        "--config_overrides": "n_embd=10", "--cache_dir": str(tmp_path / "hf"), "--torch_dtype": "float32",
        "--train_file": str(DOLLY), "--validation_file": str(DOLLY), "--preprocessing_num_workers": "1",
        "--data_cache_dir": str(tmp_path / "cache"), "--modules_to_save": "lm_head", "--peft_path": str(_adapter_folder(tmp_path)),
        "--logging_dir": str(tmp_path / "logs"), "--block_adapter_rank": "8", "--spectral_reg_steps": "10",
        "--model_name_or_path": TINY, "--dataset_dir": str(DOLLY.parent),
    }  # fmt: skip
    return samples.get(flag, default)


def _adapter_folder(tmp_path: Path) -> Path:
    """A folder that passes the --peft_path check (parsing only looks for adapter_config.json; nothing loads)."""
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


@pytest.mark.skipif(not FLAGS_DOC.is_file(), reason=f"{FLAGS_DOC} not found")
def test_every_flag_of_the_released_train_py_is_accepted_or_refused_with_one_line(tmp_path: Path) -> None:
    flags = _released_flags()
    assert len(flags) == 51
    base = [
        "--model_name_or_path",
        TINY,
        "--dataset_dir",
        str(DOLLY.parent),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    for flag, default in flags:
        if flag in QLORA_FLAGS:
            continue
        argv = [*base, flag, _sample_value(flag, default, tmp_path)]
        if flag == "--routing_group_size":
            argv += ["--method", "mtlora", "--enable_fine_grained_routing"]
        if flag in REFUSED:
            with pytest.raises(ConfigError, match=REFUSED[flag]):
                parse_train_args(argv)
            continue
        try:
            parse_train_args(argv)
        except (ConfigError, SystemExit) as exc:
            pytest.fail(f"{flag} {argv[-1]!r} refused: {exc}")


def test_the_released_deepspeed_config_name_exists() -> None:
    """The BBH scripts pass ``--deepspeed ./configs/ds_zero2_multi_gpu.json`` (ZeRO-2, CPU optimizer offload)."""
    ours = json.loads((REPO / "configs" / "ds_zero2_multi_gpu.json").read_text())
    assert ours == json.loads((REPO / "configs" / "ds_zero2_offload.json").read_text())
    assert ours["zero_optimization"]["stage"] == 2
    assert ours["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_adaptformer_through_train_py_released_init_does_not_train(data_dir: Path, tmp_path: Path) -> None:
    block = [
        "--method",
        "mtlora",
        "--lora_nums",
        "2",
        "--enable_block_adapter",
        "--block_adapter_style",
        "adaptformer",
    ]
    with pytest.warns(UserWarning, match="will not train"):
        assert train_main(_argv(data_dir, tmp_path / "dead", *block, "--adaptformer_init_scale", "0")) == 0
    assert train_main(_argv(data_dir, tmp_path / "live", *block)) == 0
    for run, trained in (("dead", False), ("live", True)):
        w = load_file(str(tmp_path / run / "sft_lora_model" / "adapter_model.safetensors"))
        b = [v for k, v in w.items() if k.endswith("lora_B")]
        assert b and any(k.endswith("expert_scales") for k in w)
        assert any(torch.count_nonzero(t) for t in b) is trained, run
