"""mtlora.outputs: refusing to replace earlier results, and the shared --overwrite_output_dir/--trust_remote_code."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from mtlora.errors import MtLoraError
from mtlora.outputs import add_safety_flags, check_output_dir


def test_check_output_dir_names_earlier_results_and_honours_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert check_output_dir(out, ["bbh_results.json"]) == out  # a new folder is fine
    out.mkdir()
    (out / "bbh_results.json").write_text("{}")
    (out / "mmlu_results.json").write_text("{}")
    with pytest.raises(MtLoraError, match=r"already holds bbh_results\.json .*--overwrite_output_dir"):
        check_output_dir(out, ["bbh_results.json", "bbh_results.md"])
    assert check_output_dir(out, ["bbh_results.json"], overwrite=True) == out
    assert check_output_dir(out, ["other.json"]) == out  # other commands' results do not block
    with pytest.raises(MtLoraError, match="already holds"):
        check_output_dir(out, [], refuse_nonempty=True)


def test_check_output_dir_rejects_files_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(MtLoraError, match=r"--output_dir .*f: exists and is not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(MtLoraError, match="is a file, so the folder cannot be created"):
        check_output_dir(tmp_path / "f" / "sub")
    with pytest.raises(MtLoraError, match="--output_dir is empty"):
        check_output_dir("")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_check_output_dir_rejects_read_only_parent(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MtLoraError, match="not writable"):
            check_output_dir(ro / "out")
    finally:
        ro.chmod(0o755)


def test_safety_flags_parse_like_the_trainer_flags() -> None:
    p = argparse.ArgumentParser()
    add_safety_flags(p)
    assert vars(p.parse_args([])) == {"overwrite_output_dir": False, "trust_remote_code": False}
    ns = p.parse_args(["--overwrite_output_dir", "--trust_remote_code", "True"])
    assert ns.overwrite_output_dir is True and ns.trust_remote_code is True
    assert p.parse_args(["--trust_remote_code", "false"]).trust_remote_code is False
    with pytest.raises(SystemExit):
        p.parse_args(["--trust_remote_code", "maybe"])


def test_trust_remote_code_is_a_flag_of_every_command_that_loads_a_model(tmp_path: Path) -> None:
    """Default False everywhere, so transformers is always told (and never asks on stdin)."""
    from mtlora import demo, export, lorahub
    from mtlora.analysis import cli as analysis_cli
    from mtlora.evaluation.cli import build_parser as eval_parser
    from mtlora.params import parse_adapter_args
    from mtlora.training.arguments import parse_train_args

    parsers = {
        "eval": (eval_parser("bbh"), ["--output_dir", "o"]),
        "export": (export.build_parser(), ["a", "--output_dir", "o"]),
        "analyze": (analysis_cli.build_parser(), ["spectral", "--adapter", "a", "--output_dir", "o"]),
        "lorahub": (lorahub.build_parser(), ["--lora_dirs", "a", "--examples", "e", "--model_name_or_path", "m",
                                             "--output_dir", "o"]),
        "demo": (demo.build_parser(), []),
    }  # fmt: skip
    for name, (parser, base) in parsers.items():
        assert parser.parse_args(base).trust_remote_code is False, name
        assert parser.parse_args([*base, "--trust_remote_code"]).trust_remote_code is True, name
    _, ns = parse_adapter_args(["--model_name_or_path", "m", "--trust_remote_code"], "mtlora params")
    assert ns.trust_remote_code is True
    data = tmp_path / "d.json"
    data.write_text("[]")
    model_args, *_ = parse_train_args(["--model_name_or_path", "m", "--train_file", str(data), "--output_dir",
                                       str(tmp_path / "o")])  # fmt: skip
    assert model_args.trust_remote_code is False
