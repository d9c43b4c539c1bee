"""The released experiment scripts' command lines run unchanged against our ``train.py`` / ``eval_*.py`` (issue 13).

Source: ``../shared/docs/released_exp_commands.tsv``: every ``exp/**`` script of doem97/ICLR26_mtLoRA @ 61dea0d
with its shell variables substituted (98 ``train.py`` command lines, 47 ``eval_bbh.py``, 51 ``eval_mmlu.py``).
Each ``train.py`` line is run in-process, as ``python train.py <args>`` would run it, with these substitutions
and no others:

* paths: ``--model_name_or_path`` / ``--tokenizer_name_or_path`` -> ``mtlora:stories260k`` (the bundled
  model); ``--dataset_dir`` / ``--validation_file`` -> a small subset of the bundled training samples laid out
  like the released folders (``flan_v2_subset/train.json``; ``dolly-15k-converted/{train,validation}.json``),
  namely the 64 shortest records of each sample, so that the released batch sizes, gradient accumulation and
  ``--max_seq_length 512`` stay as written and two steps still take about a second;
  ``--output_dir`` / ``--logging_dir`` -> folders under pytest's tmp dir;
* GPU count, launcher and precision: no ``accelerate launch``, ``--deepspeed <config>`` and ``--bf16`` dropped
  (no DeepSpeed and fp32 on CPU);
* model size: ``--routing_group_size g`` -> ``g * 64 / 4096`` (``/ 5120`` for the LLaMA-2-13B lines), the same
  number of routing groups G on the tiny model's hidden size 64, as ``mtlora repro`` scales them, rounded to
  the nearest size that divides every adapted output: block adapters output 64 dims, but component-level
  ``q_proj`` / ``v_proj`` output 64 / 32 (the tiny model has grouped-query attention, LLaMA-2-7B has not), so
  there the size must divide 32 (g4096 -> 32: G = 2 / 1 instead of 1 / 1), and 13B's G = 10 and 20
  (g512, g256) do not exist on 64 dims (-> G = 8 and 16);
* length and batch (for time: all 98 runs within about three minutes on two CPU cores):
  ``--max_steps 2`` added and ``--per_device_train_batch_size B`` -> 1. ``--gradient_accumulation_steps``
  stays as written, so every run still takes 1, 2 or 4 micro-batches per optimizer step; the batch size is a
  plain Trainer argument whose value changes nothing else.

All 98 command lines run; none is deduplicated.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
from pathlib import Path

import pytest
from _tiny import REPO, SHARED

from mtlora.training.cli import main as train_main

TSV = SHARED / "docs" / "released_exp_commands.tsv"
TINY = "mtlora:stories260k"
SAMPLES = REPO / "src" / "mtlora" / "assets" / "train_data"
PAPER_HIDDEN = {"llama-2-7b": 4096, "llama-2-13b": 5120}
TINY_HIDDEN = 64
TINY_KV_OUT = 32  # v_proj output size of stories260k (4 key/value heads of 8 dims)
N_RECORDS = 64


def released_rows(program: str) -> list[tuple[str, list[str]]]:
    """``(script, argv)`` of every released command line of ``program``, in the TSV's order."""
    if not TSV.is_file():
        return []
    with TSV.open(newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[1:]
    return [(r[0], shlex.split(r[2])) for r in rows if r[1] == program]


TRAIN_ROWS = released_rows("train.py")
needs_tsv = pytest.mark.skipif(not TSV.is_file(), reason=f"released command table not found at {TSV}")


def _shortest(path: Path, n: int) -> list[dict]:
    records = json.loads(path.read_text())
    return sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:n]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The released data folders, filled with the shortest records of the bundled samples."""
    root = tmp_path_factory.mktemp("released_data")
    flan = root / "flan_v2_subset"
    flan.mkdir()
    (flan / "train.json").write_text(
        json.dumps(_shortest(SAMPLES / "flan_cot_sample" / "train.json", N_RECORDS))
    )
    dolly = root / "dolly-15k-converted"
    dolly.mkdir()
    records = _shortest(SAMPLES / "dolly_sample" / "train.json", N_RECORDS + 16)
    (dolly / "train.json").write_text(json.dumps(records[:N_RECORDS]))
    (dolly / "validation.json").write_text(json.dumps(records[N_RECORDS:]))
    return root


def nearest_group_size(target: float, outputs: tuple[int, ...]) -> int:
    """The group size dividing every size in ``outputs`` that is nearest to ``target`` (by ratio)."""
    common = math.gcd(*outputs)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    return min(divisors, key=lambda d: abs(math.log(d / target)))


def substitute(argv: list[str], data_root: Path, run_root: Path) -> list[str]:
    """The documented substitutions (module docstring) applied to one released ``train.py`` command line."""
    model = next(argv[i + 1] for i, a in enumerate(argv) if a == "--model_name_or_path")
    hidden = PAPER_HIDDEN[Path(model).name]
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        if flag == "--bf16":
            i += 1
            continue
        if flag == "--deepspeed":
            i += 2
            continue
        if flag in ("--model_name_or_path", "--tokenizer_name_or_path"):
            value = TINY
        elif flag in ("--dataset_dir", "--validation_file"):
            assert value is not None and value.startswith("./data/"), value
            value = str(data_root / value[len("./data/") :])
        elif flag in ("--output_dir", "--logging_dir"):
            assert value is not None and value.startswith("./"), value
            value = str(run_root / value[2:])
        elif flag == "--per_device_train_batch_size":
            value = "1"
        elif flag == "--routing_group_size":
            assert value is not None
            outputs = (TINY_HIDDEN,) if "--enable_block_adapter" in argv else (TINY_HIDDEN, TINY_KV_OUT)
            value = str(nearest_group_size(int(value) * TINY_HIDDEN / hidden, outputs))
        out += [flag] if value is None else [flag, value]
        i += 1 if value is None else 2
    return [*out, "--max_steps", "2"]


@needs_tsv
def test_the_table_has_every_released_script() -> None:
    assert len(TRAIN_ROWS) == 98
    assert len(released_rows("eval_bbh.py")) == 47 and len(released_rows("eval_mmlu.py")) == 51
    assert len({script for script, _ in TRAIN_ROWS}) == 98


@pytest.mark.slow
@needs_tsv
@pytest.mark.parametrize("script,argv", TRAIN_ROWS, ids=[s for s, _ in TRAIN_ROWS])
def test_released_train_command_trains_and_saves(
    script: str, argv: list[str], data_root: Path, tmp_path: Path
) -> None:
    args = substitute(argv, data_root, tmp_path)
    assert train_main(args) == 0
    out = Path(args[args.index("--output_dir") + 1])
    logs = Path(args[args.index("--logging_dir") + 1])
    adapter = json.loads((out / "sft_lora_model" / "adapter_config.json").read_text())
    assert (out / "sft_lora_model" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()  # --save_strategy epoch at the end
    for name in ("train_log.jsonl", "train_results.json", "trainer_state.json"):
        assert (logs / name).is_file(), name
    # the released meaning of the flags reached the adapter
    flags = dict(zip(argv[::1], argv[1::1], strict=False))
    assert adapter["method"] == flags["--method"]
    assert adapter["lora_rank"] == int(flags["--lora_rank"]) and adapter["lora_nums"] == int(
        flags["--lora_nums"]
    )
    assert adapter["enable_blc"] is True
    assert adapter["enable_block_adapter"] is ("--enable_block_adapter" in argv)
    assert adapter["enable_spectral_reg"] is ("--enable_spectral_reg" in argv)
    if "--trainable" in argv:
        assert adapter["target_modules"] == flags["--trainable"].split(",")
    state = json.loads((logs / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1  # --logging_first_step True


# ---------------------------------------------------------------------------------------------- evaluation
EVAL_ROWS = {prog: released_rows(prog) for prog in ("eval_bbh.py", "eval_mmlu.py")}
_PATH_FLAGS = ("--output_dir", "--logging_dir", "--lora_checkpoint")


def _shape(argv: list[str]) -> tuple[str, ...]:
    """A command line without its per-script paths: the rows that differ only in paths run the same way."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _PATH_FLAGS:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return tuple(out)


def _one_per_shape(program: str) -> list[tuple[str, list[str]]]:
    seen: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    for script, argv in EVAL_ROWS[program]:
        seen.setdefault(_shape(argv), (script, argv))
    return list(seen.values())


EVAL_CASES = [(prog, script, argv) for prog in EVAL_ROWS for script, argv in _one_per_shape(prog)]


@pytest.fixture(scope="module")
def released_mmlu_skeleton(tmp_path_factory) -> Path:
    """The released ``data/mmlu_dataset`` as shipped, for one subject: ``save_to_disk`` metadata, no .arrow."""
    root = tmp_path_factory.mktemp("data") / "mmlu_dataset"
    subject = root / "abstract_algebra"
    for split in ("test", "validation", "dev"):
        (subject / split).mkdir(parents=True)
        state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split}
        (subject / split / "state.json").write_text(json.dumps(state))
        (subject / split / "dataset_info.json").write_text("{}")
    (subject / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "validation", "dev"]}))
    return root


@pytest.mark.slow
@needs_tsv
@pytest.mark.parametrize("program,script,argv", EVAL_CASES, ids=[f"{p}:{s}" for p, s, _ in EVAL_CASES])
def test_released_eval_command_runs(
    program: str,
    script: str,
    argv: list[str],
    data_root: Path,
    released_mmlu_skeleton: Path,
    tmp_path: Path,
    capsys,
) -> None:
    """One command line per distinct eval shape (the others differ only in paths), on a checkpoint that the
    same script's ``train.py`` line trained. Substitutions: the paths (model, adapter, data, output, logs;
    ``--bbh_data_dir`` -> the bundled BBH, ``--mmlu_data_dir`` -> the released skeleton folder, which falls back
    to the bundled MMLU) and the size (``--limit 1`` on one task or subject)."""
    from mtlora.evaluation.cli import run
    from mtlora.evaluation.data import bundled_data_dir

    train_argv = substitute(dict(TRAIN_ROWS)[script], data_root, tmp_path / "train")
    assert train_main(train_argv) == 0
    out_dir = Path(train_argv[train_argv.index("--output_dir") + 1])
    args: list[str] = []
    i = 0
    while i < len(argv):
        flag, value = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if value is not None and value.startswith("--"):
            value = None
        if flag == "--model_name_or_path":
            value = TINY
        elif flag == "--lora_checkpoint":  # "$OUTPUT_DIR/checkpoint-$CHECKPOINT_STEP" or ".../sft_lora_model"
            value = str(out_dir / ("sft_lora_model" if value.endswith("sft_lora_model") else "checkpoint-2"))
        elif flag in ("--output_dir", "--logging_dir"):
            value = str(tmp_path / "eval" / value[2:])
        elif flag == "--bbh_data_dir":
            value = str(bundled_data_dir("bbh"))
        elif flag == "--mmlu_data_dir":
            assert value == "./data/mmlu_dataset"
            value = str(released_mmlu_skeleton)
        args += [flag] if value is None else [flag, value]
        i += 1 if value is None else 2
    bench = "bbh" if program == "eval_bbh.py" else "mmlu"
    names = ["--tasks", "navigate"] if bench == "bbh" else ["--subjects", "abstract_algebra"]
    assert run(bench, [*args, *names, "--limit", "1", "--no_progress"], prog=program) == 0
    out = Path(args[args.index("--output_dir") + 1])
    logs = Path(args[args.index("--logging_dir") + 1])
    result = json.loads((out / f"{bench}_results.json").read_text())
    assert (logs / f"{bench}_results.json").is_file()
    assert result["auto_batch"] is True and result["fallback_batch_size"] == 1
    assert result["batch_size"] == int(args[args.index("--batch_size") + 1])
    if bench == "mmlu":
        assert result["adaptive_max_length"] is True
        assert result["data_dir"].startswith("bundled (fallback:")
        assert "released mmlu_dataset skeleton" in capsys.readouterr().err


@pytest.mark.slow
@needs_tsv
def test_interface_contract_python_train_py_with_the_released_arguments(
    data_root: Path, tmp_path: Path
) -> None:
    """``python train.py <released arguments>`` in a folder laid out like the released repository, where
    ``./data/llama-2-7b`` is the bundled model (the released repository symlinks it there too) and
    ``./data/dolly-15k-converted`` the bundled sample: ``exp/mmlu/component/0_baseline.sh`` runs as written
    apart from ``--bf16`` (CPU) and ``--max_steps 2``, then its ``eval_mmlu.py`` line with ``--limit 1`` on one
    subject (``$OUTPUT_DIR`` is the script's own variable)."""
    import os
    import subprocess
    import sys

    from mtlora.hub import resolve_model_path

    script = "exp/mmlu/component/0_baseline.sh"
    data = tmp_path / "data"
    data.mkdir()
    (data / "llama-2-7b").symlink_to(resolve_model_path(TINY))
    shutil.copytree(data_root / "dolly-15k-converted", data / "dolly-15k-converted")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = [a for a in dict(TRAIN_ROWS)[script] if a != "--bf16"] + ["--max_steps", "2"]
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output_dir = argv[argv.index("--output_dir") + 1]
    assert (tmp_path / output_dir / "sft_lora_model" / "adapter_model.safetensors").is_file()
    (eval_argv,) = [a for s, a in EVAL_ROWS["eval_mmlu.py"] if s == script]
    eval_argv = [a.replace("$OUTPUT_DIR", output_dir) for a in eval_argv]

    def eval_mmlu() -> subprocess.CompletedProcess:
        """The released eval line on one question of one subject, as the script runs it (cwd = its root)."""
        cmd = [
            sys.executable,
            str(REPO / "eval_mmlu.py"),
            *eval_argv,
            "--subjects",
            "abstract_algebra",
            "--limit",
            "1",
        ]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)

    done = eval_mmlu()
    # ./data/mmlu_dataset does not exist here: the released code then downloaded cais/mmlu; offline, one line
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        "error: mmlu data directory"
    )
    skeleton = data / "mmlu_dataset" / "abstract_algebra"
    (skeleton / "test").mkdir(parents=True)
    (skeleton / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "validation", "dev"]}))
    done = eval_mmlu()
    assert done.returncode == 0, done.stderr[-3000:]
    result_dir = tmp_path / eval_argv[eval_argv.index("--output_dir") + 1]
    assert json.loads((result_dir / "mmlu_results.json").read_text())["total_questions"] == 1
