"""The command-line convention (mtlora.cli_args) holds for every ``mtlora`` sub-command.

Iterates over ``mtlora.cli.COMMANDS``: a new command must be added to ``PARSERS`` below, and then it is checked
like the others (help on every flag, defaults shown, both spellings, the standard concept flags).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mtlora.cli import COMMANDS, main, run_main
from mtlora.cli_args import HelpFormatter, Parser, take_debug

ROOT = Path(__file__).resolve().parents[1]


def _eval_parsers() -> list[argparse.ArgumentParser]:
    from mtlora.evaluation.cli import build_parser
    from mtlora.evaluation.lm_eval_tasks import build_parser as tasks_parser

    return [build_parser("mmlu"), build_parser("bbh"), tasks_parser()]


def _train_parsers() -> list[argparse.ArgumentParser]:
    from mtlora.training.cli import build_parser, pre_parser

    return [build_parser(), pre_parser()]


def _params_parsers() -> list[argparse.ArgumentParser]:
    from mtlora.config import adapter_argument_parser

    parsers: list[argparse.ArgumentParser] = []
    from mtlora import params

    # parse_adapter_args builds the pre-parser inside; capture it through --help's parser
    original = params.adapter_argument_parser

    def spy(prog: str, **kwargs):  # noqa: ANN202
        parser = original(prog, **kwargs)
        parsers.append(parser)
        return parser

    params.adapter_argument_parser = spy
    try:
        with pytest.raises(SystemExit):
            params.parse_adapter_args(["--help"], "mtlora params")
    finally:
        params.adapter_argument_parser = original
    assert adapter_argument_parser is original
    return parsers


def _simple(module: str, attr: str = "build_parser") -> Callable[[], list[argparse.ArgumentParser]]:
    def build() -> list[argparse.ArgumentParser]:
        import importlib

        return [getattr(importlib.import_module(module), attr)()]

    return build


#: command -> the parsers it uses (train and params: the Trainer's / adapter dataclass parser and mtlora's)
PARSERS: dict[str, Callable[[], list[argparse.ArgumentParser]]] = {
    "params": _params_parsers,
    "train": _train_parsers,
    "eval": _eval_parsers,
    "data": _simple("mtlora.data.cli"),
    "convert": _simple("mtlora.convert"),
    "demo": _simple("mtlora.demo"),
    "analyze": _simple("mtlora.analysis.cli"),
    "export": _simple("mtlora.export"),
    "lorahub": _simple("mtlora.lorahub"),
    "repro": _simple("mtlora.repro"),
}
LOADS_A_MODEL = ("train", "eval", "export", "lorahub", "analyze", "demo", "params")
CPU_WORK = ("train", "eval", "export", "lorahub", "analyze", "demo", "repro")
PROGRESS = ("train", "eval", "export", "lorahub", "analyze", "demo")


def test_every_command_is_covered():
    assert set(PARSERS) == set(COMMANDS)


def _walk(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _walk(sub)
        else:
            yield parser, action


def _options(command: str) -> set[str]:
    return {o for p in PARSERS[command]() for _, a in _walk(p) for o in a.option_strings}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help_and_shows_its_default(command):
    for parser in PARSERS[command]():
        for owner, action in _walk(parser):
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{command}: {name} has no help"
            if not action.option_strings or action.required or action.default is argparse.SUPPRESS:
                continue
            shown = owner._get_formatter()._get_help_string(action)
            assert "default" in (shown or "").lower(), f"{command}: {name} does not show its default"


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if c not in ("train", "params")))
def test_both_spellings_parse(command):
    """Every long option is accepted with dashes and with underscores (train/params: HfArgumentParser's own)."""
    for parser in PARSERS[command]():
        for owner, action in _walk(parser):
            assert isinstance(owner, Parser), f"{command}: {owner.prog} is not a mtlora.cli_args.Parser"
            for option in action.option_strings:
                if not option.startswith("--") or "_" not in option and "-" not in option[2:]:
                    continue
                for spelling in (option.replace("_", "-"), "--" + option[2:].replace("-", "_")):
                    assert owner.normalize([spelling, "x"]) == [option, "x"], (command, spelling)
                    assert owner.normalize([f"{spelling}=1"]) == [f"{option}=1"], (command, spelling)


def test_dashed_flags_reach_the_same_destination(tmp_path):
    from mtlora.evaluation.cli import build_parser

    args = build_parser("bbh").parse_args(
        [
            "--output-dir",
            "o",
            "--lora-checkpoint",
            "a",
            "--num-few-shot",
            "2",
            "--no-progress",
            "--bbh-data-dir=d",
        ]
    )
    assert (args.output_dir, args.lora_checkpoint, args.num_few_shot, args.no_progress, args.data_dir) == (
        "o",
        "a",
        2,
        True,
        "d",
    )
    from mtlora.data.cli import build_parser as data_parser

    for spelling in ("--max-per-task", "--max_per_task"):
        assert data_parser().parse_args(["dolly", "i", "o", spelling, "3"]).max_per_task == 3
    # values that look like options are not rewritten; `--` ends the options
    parser = Parser(prog="t")
    parser.add_argument("--train_args", default="", help="h")
    parser.add_argument("rest", nargs="*", help="h")
    assert parser.parse_args(["--train-args=--max-steps 2", "--", "--train-args"]).rest == ["--train-args"]


@pytest.mark.parametrize("command", LOADS_A_MODEL)
def test_model_loading_commands_have_model_and_trust_remote_code(command):
    assert {"--model_name_or_path", "--trust_remote_code"} <= _options(command)


@pytest.mark.parametrize("command", CPU_WORK)
def test_cpu_commands_have_threads(command):
    assert "--threads" in _options(command)


@pytest.mark.parametrize("command", PROGRESS)
def test_long_commands_have_no_progress(command):
    assert "--no_progress" in _options(command)


def test_concept_flags_share_names_and_keep_paper_aliases():
    for command in ("eval", "export", "analyze"):
        assert "--adapter" in _options(command), command
    for command in ("eval", "export", "lorahub", "analyze"):
        assert "--data" in _options(command), command
    assert {"--lora_checkpoint", "--mmlu_data_dir", "--bbh_data_dir", "--data_dir"} <= _options("eval")
    assert {"--calibration_data"} <= _options("export")
    assert {"--lora_dirs", "--loras", "--examples"} <= _options("lorahub")
    assert {"--num_threads", "--threads"} <= _options("demo")
    assert {"--dry_run", "--num_gpus"} <= _options("repro")
    assert {"--peft_path", "--dataset_dir", "--train_file", "--disable_tqdm"} <= _options("train")


def test_export_adapter_positional_or_flag(tmp_path, capsys):
    from mtlora.export import build_parser

    assert build_parser().parse_args(["A", "--output_dir", "o"]).adapter_pos == "A"
    assert build_parser().parse_args(["--adapter", "A", "--output_dir", "o"]).adapter_dir == "A"
    assert main(["export", "--output_dir", str(tmp_path / "o")]) == 2
    assert "error: --adapter" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "usage: mtlora" in captured.err and captured.out == ""
    assert main(["-h"]) == 0
    assert "usage: mtlora" in capsys.readouterr().out
    assert main(["eval"]) == 2
    assert "usage: mtlora eval" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0


def test_python_dash_m_mtlora():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "mtlora", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "usage: mtlora" in done.stdout
    done = subprocess.run([sys.executable, "-m", "mtlora"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "usage: mtlora" in done.stderr


def _closed_pipe(argv: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run ``argv``, read one byte of its stdout and close the pipe: (exit status, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=120), err


def test_closed_stdout_pipe_leaves_no_traceback(tmp_path):
    """`mtlora ... | head -c1`: 200 KB of output (more than a pipe buffer) and the reader gone -> status 1,
    nothing on stderr; through ``main`` (a command module) and ``run_main`` (train.py / eval_*.py)."""
    (tmp_path / "bigout.py").write_text("def main(argv):\n    print('x' * 200_000)\n    return 0\n")
    code = textwrap.dedent(
        """
        import sys
        import mtlora.cli as cli
        cli.COMMANDS["big"] = ("bigout", "test command")
        sys.exit(cli.main(["big"]))
        """
    )
    rc, err = _closed_pipe([sys.executable, "-c", code], tmp_path)
    assert (rc, err) == (1, "")
    code = "import sys, bigout; from mtlora.cli import run_main; sys.exit(run_main(bigout.main, []))"
    rc, err = _closed_pipe([sys.executable, "-c", code], tmp_path)
    assert (rc, err) == (1, "")


def test_debug_rule():
    """A bare --debug is mtlora's traceback switch; --debug VALUE is the Trainer's option and passes through."""
    assert take_debug(["--x", "1", "--debug"]) == (["--x", "1"], True)
    assert take_debug(["--debug", "--x", "1"]) == (["--x", "1"], True)
    argv = ["--debug", "underflow_overflow", "--x"]
    assert take_debug(argv) == (argv, False)
    assert take_debug(["--x", "--", "--debug"]) == (["--x", "--", "--debug"], False)


def test_debug_before_the_command(capsys):
    from mtlora.errors import MtLoraError

    assert main(["eval", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown benchmark 'nope'")
    with pytest.raises(MtLoraError, match="unknown benchmark"):
        main(["--debug", "eval", "nope"])


def test_debug_env_and_traceback(monkeypatch, capsys):
    from mtlora.errors import MtLoraError

    def boom(argv):
        raise MtLoraError("bad flag")

    assert run_main(boom, []) == 2
    assert capsys.readouterr().err == "error: bad flag\n"
    with pytest.raises(MtLoraError):
        run_main(boom, ["--debug"])
    monkeypatch.setenv("MTLORA_DEBUG", "1")
    with pytest.raises(MtLoraError):
        run_main(boom, [])


def test_train_debug_value_reaches_training_arguments(tmp_path):
    from mtlora.training.arguments import parse_train_args

    argv, debug = take_debug(
        [
            "--model_name_or_path", "mtlora:stories260k", "--dataset_dir", str(tmp_path), "--output_dir",
            str(tmp_path / "o"), "--debug", "underflow_overflow",
        ]
    )  # fmt: skip
    assert not debug
    *_, train_args = parse_train_args(argv, check_paths=False)
    assert [str(getattr(d, "value", d)) for d in train_args.debug] == ["underflow_overflow"]


def test_train_convention_flags_map_to_the_trainer(tmp_path):
    import torch

    from mtlora.training.cli import map_convention_flags

    (tmp_path / "records.json").write_text("[]")
    threads = torch.get_num_threads()
    try:
        argv = map_convention_flags(
            ["--data", str(tmp_path), "--adapter", "A", "--no-progress", "--threads", "1", "--method", "lora"]
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert argv == [
        "--dataset_dir",
        str(tmp_path),
        "--peft_path",
        "A",
        "--disable_tqdm",
        "True",
        "--method",
        "lora",
    ]
    argv = map_convention_flags(["--data", str(tmp_path / "records.json")])
    assert argv == ["--train_file", str(tmp_path / "records.json")]


def test_help_formatter_appends_defaults_once():
    parser = Parser(prog="t")
    parser.add_argument("--a", default=3, help="alpha")
    parser.add_argument("--b", default=4, help="beta (default 4)")
    text = parser.format_help()
    assert "alpha (default: 3)" in text and "beta (default 4)" in text and "(default: 4)" not in text
    assert isinstance(parser._get_formatter(), HelpFormatter)


def _documented_command_lines() -> list[tuple[str, list[str]]]:
    """``mtlora <command> ...`` lines of README.md and docs/*.md (continuations joined, comments dropped),
    without placeholders (``[...]``, ``...``, ``<x>``) that are not meant to parse."""
    import re
    import shlex

    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.strip().removeprefix("$ "))
            if not line.startswith("mtlora ") or re.search(r"\[|\.\.\.|<|\||`|--config ", line):
                continue
            found.append((f"{path.name}: {line}", shlex.split(line)[1:]))
    return found


def _parse_command(argv: list[str]) -> None:
    command, rest = argv[0], argv[1:]
    if command == "eval":
        from mtlora.evaluation.cli import TOOLS, build_parser

        if rest[0] in TOOLS:
            import importlib

            importlib.import_module(TOOLS[rest[0]]).build_parser().parse_args(rest[1:])
        else:
            build_parser(rest[0]).parse_args(rest[1:])
    elif command == "params":
        from mtlora.params import parse_adapter_args

        parse_adapter_args(rest, "mtlora params")
    elif command == "train":
        from mtlora.training.arguments import parse_train_args
        from mtlora.training.cli import map_convention_flags

        parse_train_args(map_convention_flags(rest), check_paths=False)
    else:
        import importlib

        importlib.import_module(COMMANDS[command][0]).build_parser().parse_args(rest)


def test_documented_command_lines_still_parse():
    """Every complete `mtlora ...` command line in README.md and docs/ parses with today's flags."""
    lines = _documented_command_lines()
    assert len(lines) >= 15
    failures = []
    for where, argv in lines:
        try:
            _parse_command(argv)
        except SystemExit as exc:
            failures.append(f"{where} (exit {exc.code})")
    assert not failures, "\n".join(failures)


def test_apply_runtime_threads_and_progress(capsys):
    """--no_progress turns off mtlora's bars here and every tqdm bar of child processes; --threads >= 1."""
    import torch
    from tqdm.auto import tqdm

    from mtlora.cli_args import apply_runtime, progress_enabled
    from mtlora.errors import MtLoraError

    with pytest.raises(MtLoraError, match="--threads must be > 0"):
        apply_runtime(argparse.Namespace(threads=0, no_progress=False))
    threads = torch.get_num_threads()
    try:
        assert progress_enabled()
        apply_runtime(argparse.Namespace(threads=1, no_progress=True))
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(threads)
    assert not progress_enabled()
    capsys.readouterr()
    for _ in tqdm(range(3), desc="hidden bar", disable=not progress_enabled()):
        pass
    assert "hidden bar" not in capsys.readouterr().err
    child = "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='child bar'): pass"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0 and "child bar" not in done.stderr


def test_task_gradient_bar_follows_the_switch(capsys):
    from mtlora.analysis.gradients import _progress
    from mtlora.cli_args import set_progress

    for _ in _progress(range(2), "task gradients"):
        pass
    assert "task gradients" in capsys.readouterr().err
    set_progress(False)
    for _ in _progress(range(2), "task gradients"):
        pass
    assert "task gradients" not in capsys.readouterr().err
