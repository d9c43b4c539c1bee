"""Docs that describe the tree must match it: README.md's Layout block and benchmarks/README.md's sections."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "mtlora"


def _section(text: str, heading: str) -> str:
    """The body of ``## heading`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def _layout_block() -> str:
    body = _section((REPO / "README.md").read_text(encoding="utf-8"), "Layout")
    match = re.search(r"```\n(src/mtlora/\n.*?)```", body, re.S)
    assert match, "README.md Layout: no ``` block starting with src/mtlora/"
    return match.group(1)


def _package_entries() -> set[str]:
    """``name.py`` for every module of src/mtlora (but __init__.py) and ``name/`` for every subpackage/folder."""
    names = {p.name for p in SRC.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name + "/" for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__")}
    return names


def _stem(entry: str) -> str:
    return entry.removesuffix("/").removesuffix(".py")


def test_readme_layout_lists_every_module_and_subpackage():
    block = _layout_block()
    listed = set(re.findall(r"(?<![\w./])([A-Za-z_][\w]*(?:\.py|/))", block))
    # a module that became a package (export.py -> export/) still counts as listed
    missing = sorted(e for e in _package_entries() if _stem(e) not in {_stem(x) for x in listed})
    assert not missing, f"README.md Layout does not mention: {', '.join(missing)}"


def test_readme_layout_names_only_what_exists():
    package_lines = [
        line for line in _layout_block().splitlines()[1:] if line.startswith("  ") and line[2] != " "
    ]
    first = {line.split()[0] for line in package_lines}
    existing = {_stem(e) for e in _package_entries()} | {"__init__"}
    stale = sorted(name for name in first if _stem(name) not in existing)
    assert not stale, f"README.md Layout lists what src/mtlora does not have: {', '.join(stale)}"
    top = [
        line.split()[0].rstrip(",") for line in _layout_block().splitlines() if line and not line[0].isspace()
    ]
    for name in top[1:]:
        assert (REPO / name.rstrip("/")).exists(), f"README.md Layout: {name} does not exist"


BENCH_README = REPO / "benchmarks" / "README.md"
PARTS = ("### What it measures", "### How to run", "### Latest result")


def _benchmarks() -> list[str]:
    return sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_benchmarks_readme_has_a_section_per_benchmark():
    text = BENCH_README.read_text(encoding="utf-8")
    for name in _benchmarks():
        match = re.search(rf"^## {name}\b.*?\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert match, f"benchmarks/README.md: no '## {name}' section"
        body = match.group(1)
        positions = [body.find(part) for part in PARTS]
        assert all(p >= 0 for p in positions), f"benchmarks/README.md {name}: needs {', '.join(PARTS)}"
        assert positions == sorted(positions), f"benchmarks/README.md {name}: parts out of order"
        latest = body[positions[2] :]
        assert re.search(r"^Date: \d{4}-\d{2}-\d{2}\b", latest, re.M), (
            f"{name}: Latest result has no Date line"
        )
        assert re.search(r"^Machine: \S", latest, re.M), f"{name}: Latest result has no Machine line"
        assert f"benchmarks/{name}.py" in body, f"{name}: How to run does not show the command"


def test_benchmarks_readme_results_files_exist():
    """Every ``results/X.json`` the README quotes is committed (numbers come from those files)."""
    text = BENCH_README.read_text(encoding="utf-8")
    for rel in sorted(set(re.findall(r"`results/([\w.-]+\.(?:json|png))`", text))):
        assert (REPO / "benchmarks" / "results" / rel).is_file(), (
            f"benchmarks/README.md quotes missing results/{rel}"
        )


def test_benchmark_history_kept():
    history = (REPO / "docs" / "benchmarks_history.md").read_text(encoding="utf-8")
    assert "## layer_speed" in history and "## scaling" in history and "## mechanisms" in history
    assert "docs/benchmarks_history.md" in BENCH_README.read_text(encoding="utf-8")
