"""Every ```python and ```bash block of README.md runs, so the README cannot lie (issue 12).

The blocks are found by parsing README.md, so blocks added later are run too. Each runs in a scratch folder
that links the repository's top-level files (so ``python train.py`` and ``tests/fixtures/...`` resolve), with
the virtual environment's ``python`` and ``mtlora`` first on PATH, offline.

* Python blocks run as a script.
* Bash blocks run command by command. ``#> text`` lines after a command are its expected output: each must
  be a line of what it printed. ``make`` targets are only checked with ``make -n`` (``make test`` would run
  this suite recursively), ``pip install -e ".[extras]"`` only checks that the extras exist. Any other
  program than ``python``, ``mtlora``, ``bash``, ``make`` and ``pip`` fails the test as not covered: a block
  that cannot run offline on a CPU belongs in docs/, not in the README.
* Where a command or block names LLaMA-2, ``SUBSTITUTIONS`` replaces the model id by the bundled tiny model,
  and only then the sizes (``SIZE_SUBSTITUTIONS``), which are meaningless for it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY = "mtlora:stories260k"
#: Model ids of LLaMA-2 that a block may name, replaced by the bundled tiny model.
SUBSTITUTIONS = {
    "meta-llama/Llama-2-7b-hf": TINY,
    "./data/llama-2-7b": TINY,
}
#: Sizes of LLaMA-2 (d=4096), replaced only in a command/block where a model id was substituted (d=64).
SIZE_SUBSTITUTIONS = {
    "--routing_group_size 2048": "--routing_group_size 32",
    "routing_group_size=2048": "routing_group_size=32",
}
RUN = ("python", "mtlora", "bash")
LINKED = ("train.py", "eval_bbh.py", "eval_mmlu.py", "src", "tests", "tables", "configs", "scripts",
          "benchmarks", "docs", "Makefile", "pyproject.toml", "README.md")  # fmt: skip


def readme_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line number, code)`` of every fenced python/bash block."""
    out = []
    for m in re.finditer(r"^```(python|bash)\n(.*?)^```", text, re.M | re.S):
        out.append((m.group(1), text[: m.start()].count("\n") + 2, m.group(2)))
    return out


def substitute(code: str) -> str:
    """The model ids, then (only if one was replaced) the sizes."""
    new = code
    for old, rep in SUBSTITUTIONS.items():
        new = new.replace(old, rep)
    if new != code:
        for old, rep in SIZE_SUBSTITUTIONS.items():
            new = new.replace(old, rep)
    return new


def bash_commands(code: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)``: continuation lines joined, ``#>`` lines attached to the command
    before them, other comment-only lines dropped (inline comments are left to the shell)."""
    commands: list[tuple[str, list[str]]] = []
    pending = ""
    for line in code.splitlines():
        if line.startswith("#>"):
            assert commands and not pending, f"expected output without a command: {line}"
            commands[-1][1].append(line[2:].strip())
            continue
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((pending + line, []))
        pending = ""
    assert not pending, f"dangling continuation: {pending}"
    return commands


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return root, env


def _check_pip(command: str) -> None:
    words = shlex.split(command.split("#")[0])
    m = re.fullmatch(r"\.\[([\w,-]+)\]", words[-1]) if words[:3] == ["pip", "install", "-e"] else None
    assert m and len(words) == 4, f"no rule to check {command!r}"
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([\w-]+)\s*=", section, re.M)  # (tomllib needs Python 3.11; we support 3.10)
    missing = [e for e in m.group(1).split(",") if e not in extras]
    assert not missing, f"{command}: pyproject.toml has no extra {missing}"


def run_bash_block(code: str, cwd: Path, env: dict[str, str], where: str) -> None:
    for command, expected in bash_commands(substitute(code)):
        program = shlex.split(command, comments=True)[0]
        if program == "pip":
            _check_pip(command)
            continue
        if program == "make":
            targets = shlex.split(command, comments=True)[1:]
            command = shlex.join(["make", "-n", *targets])  # light: what it would run, not running it
        elif program not in RUN:
            pytest.fail(f"{where}: {program!r} is not covered by tests/test_readme.py: {command}")
        done = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{where}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        printed = [x.strip() for x in done.stdout.splitlines()]
        for line in expected:
            assert line in printed, (
                f"{where}: {command}\nexpected the line {line!r} in:\n{done.stdout[-2000:]}"
            )


def test_blocks_are_found_and_the_parser_works() -> None:
    blocks = readme_blocks(README.read_text())
    assert any(lang == "python" for lang, _, _ in blocks) and any(lang == "bash" for lang, _, _ in blocks)
    cmds = bash_commands("a \\\n  b  # c\n#> out\n# note\n\nd\n")
    assert cmds == [("a    b  # c", ["out"]), ("d", [])]
    assert substitute("x meta-llama/Llama-2-7b-hf --routing_group_size 2048") == (
        f"x {TINY} --routing_group_size 32"
    )
    assert substitute("tests/fixtures/llama-2-7b --routing_group_size 2048").endswith("2048")


def test_the_checks_can_fail(sandbox) -> None:
    """A wrong ``#>`` output, a failing command and an uncovered program each fail the test."""
    root, env = sandbox
    run_bash_block("python -c 'print(1)'\n#> 1\n", root, env, "ok")
    with pytest.raises(AssertionError, match="expected the line '2'"):
        run_bash_block("python -c 'print(1)'\n#> 2\n", root, env, "wrong output")
    with pytest.raises(AssertionError, match="^failing: python"):
        run_bash_block("python -c 'raise SystemExit(3)'\n", root, env, "failing")
    with pytest.raises(pytest.fail.Exception, match="not covered"):
        run_bash_block("curl https://example.com\n", root, env, "uncovered")
    with pytest.raises(AssertionError, match="no extra"):
        _check_pip('pip install -e ".[nonexistent]"')


@pytest.mark.slow
def test_every_readme_block_runs(sandbox) -> None:
    root, env = sandbox
    text = README.read_text()
    for i, (lang, line, code) in enumerate(readme_blocks(text)):
        where = f"README.md block {i + 1} ({lang}, line {line})"
        if lang == "python":
            script = root / f"block{i + 1}.py"
            script.write_text(substitute(code))
            done = subprocess.run(
                [sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, f"{where}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        else:
            run_bash_block(code, root, env, where)
