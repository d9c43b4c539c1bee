"""Architecture guards (issue 16): the import graph of ``src/mtlora`` and where router/method names may decide.

Why tests and not an import-linter config: no new dependency, and ``make test`` runs them everywhere. The
layers (docs: design of issue 16):

* **core** - the adapter itself: config, routers, layers, placement, the model wrapper, losses, and the leaf
  utilities they use (errors, dtypes, atomic writes, quantization records, saved modules);
* **infra** - loading and data (``hub``, ``data``, ``inference`` when it exists): may import core;
* **app** - the commands (training, evaluation, export, lorahub, demo, analysis, ...): may import both.

Checked over top-level, function-level ("lazy") and ``TYPE_CHECKING`` imports alike, since each one is a
dependency a reader and a refactor must respect.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mtlora"

CORE = {
    "mtlora",
    "mtlora._version",
    "mtlora.errors",
    "mtlora.dtypes",
    "mtlora.atomic",
    "mtlora.outputs",
    "mtlora.config",
    "mtlora.routing",
    "mtlora.layers",
    "mtlora.placement",
    "mtlora.quant",
    "mtlora.saved_modules",
    "mtlora.model",
    "mtlora.losses",
}
# cli_args: the command-line convention every parser uses (mtlora data included); it imports only errors
INFRA_PACKAGES = ("mtlora.hub", "mtlora.data", "mtlora.inference", "mtlora.cli_args")

#: ``from mtlora.X import _private`` across modules that remain (each later refactor step shrinks this).
PRIVATE_IMPORTS_ALLOWED = {
    ("mtlora.training.arguments", "mtlora.config", "_HIDDEN_FLAGS"),
}

#: Router kinds and adapter methods: only mtlora/routing/ and config.METHOD_SPECS may decide on these names.
ROUTER_AND_METHOD_NAMES = {"none", "token", "task", "lora", "hydralora", "mmoelora", "mtlora"}
#: Comparisons on those names that are labels or data, not behaviour: (module, source of the comparison).
NAME_BRANCHES_ALLOWED = {
    # the plot label of a plain-LoRA adapter is its method name
    ("mtlora.analysis.common", "config.get('method') == 'lora'"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _layer(module: str) -> str:
    if module in CORE or any(module.startswith(c + ".") for c in CORE - {"mtlora"}):
        return "core"
    if any(module == p or module.startswith(p + ".") for p in INFRA_PACKAGES):
        return "infra"
    return "app"


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every mtlora import anywhere in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "mtlora"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "mtlora":
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    """Module -> the mtlora modules it imports (``from pkg import submodule`` counts as the submodule)."""
    edges: dict[str, set[str]] = {}
    for module in MODULES:
        targets: set[str] = set()
        for target, names, _ in _imports(module):
            subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
            targets |= subs or {target}
            if subs != {f"{target}.{n}" for n in names}:  # some names are attributes of the module itself
                targets.add(target)
        edges[module] = {t for t in targets if t in MODULES and t != module}
    return edges


def test_the_scan_sees_the_package() -> None:
    edges = _edges()
    assert "mtlora.routing.token" in MODULES and "mtlora.routing.base" in edges["mtlora.routing.token"]
    assert "mtlora.model" in edges["mtlora.hub"]  # a lazy import counts


def test_no_import_cycles() -> None:
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("layer,allowed", [("core", {"core"}), ("infra", {"core", "infra"})])
def test_lower_layers_do_not_import_higher_ones(layer: str, allowed: set[str]) -> None:
    bad = [
        f"{m}:{line} imports {target} ({_layer(target)})"
        for m in MODULES
        if _layer(m) == layer
        for target, _, line in _imports(m)
        if target in MODULES and _layer(target) not in allowed
    ]
    assert not bad, "\n".join(bad)


def test_no_private_names_imported_across_modules() -> None:
    found = {
        (m, target, name)
        for m in MODULES
        for target, names, _ in _imports(m)
        if target != m
        for name in names
        if name.startswith("_") and not name.startswith("__")
    }
    assert not found - PRIVATE_IMPORTS_ALLOWED, sorted(found - PRIVATE_IMPORTS_ALLOWED)
    assert not PRIVATE_IMPORTS_ALLOWED - found, (
        f"fixed, drop from the allow-list: {PRIVATE_IMPORTS_ALLOWED - found}"
    )


#: Functions over :data:`MAX_FUNCTION_LINES` allowed without a reason comment (module prefix, name; a prefix also
#: matches its submodules). Empty since issue 16's refactor: a long function states why next to its ``def``.
LONG_FUNCTIONS_ALLOWED: set[tuple[str, str]] = set()
MAX_FUNCTION_LINES = 80
LONG_REASON = "# long because:"


def _long_functions(sources: dict[str, str]) -> set[tuple[str, str, int, int]]:
    """``(module, function, line, length)`` of every function of ``{module: source}`` over the limit without a
    ``# long because: <reason>`` comment on the line right above its ``def`` or its first decorator."""
    found = set()
    for m, text in sources.items():
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= MAX_FUNCTION_LINES:
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            if above.startswith(LONG_REASON) and above[len(LONG_REASON) :].strip():
                continue
            found.add((m, node.name, node.lineno, length))
    return found


def _in_allowed(module: str, name: str, prefix: str, fn: str) -> bool:
    return name == fn and (module == prefix or module.startswith(prefix + "."))


def test_no_function_over_80_lines_without_a_reason() -> None:
    """Long functions hide several jobs; one over the limit says why right above its ``def``
    (``# long because: <reason>``), or is on the allow-list of functions still being split."""
    found = _long_functions({m: p.read_text(encoding="utf-8") for m, p in MODULES.items()})
    bad = sorted(
        f"{m}.{n} (line {line}): {length} lines"
        for m, n, line, length in found
        if not any(_in_allowed(m, n, p, fn) for p, fn in LONG_FUNCTIONS_ALLOWED)
    )
    assert not bad, "split it, or say '# long because: <reason>' above the def:\n" + "\n".join(bad)
    fixed = {
        (p, fn)
        for p, fn in LONG_FUNCTIONS_ALLOWED
        if not any(_in_allowed(m, n, p, fn) for m, n, _, _ in found)
    }
    assert not fixed, f"fixed, drop from LONG_FUNCTIONS_ALLOWED: {sorted(fixed)}"


def test_the_long_function_check_needs_a_reason_above_the_def() -> None:
    """The checker on synthetic modules: 81 lines fail; a reason above the def (or its decorator) passes; a
    bare ``# long because:`` with no reason, or a comment elsewhere, does not; 80 lines pass."""
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    long_def = f"def f():\n{body}\n"
    sources = {
        "plain": long_def,
        "reason": f"{LONG_REASON} one row per released script\n{long_def}",
        "decorated": f"{LONG_REASON} a table\n@staticmethod\n{long_def}",
        "empty_reason": f"{LONG_REASON}\n{long_def}",
        "far_comment": f"{LONG_REASON} a table\n\n{long_def}",
        "eighty": "def g():\n" + "\n".join(f"    x{i} = {i}" for i in range(79)) + "\n",
    }
    assert {m for m, *_ in _long_functions(sources)} == {"plain", "empty_reason", "far_comment"}
    assert ("plain", "f", 1, 81) in _long_functions(sources)


def _mentions_kind_or_method(node: ast.AST) -> bool:
    src = ast.unparse(node)
    return "router_kind" in src or "method" in src or src.endswith(".kind") or ".kind " in src


def _names_in(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def test_no_router_or_method_name_branches_outside_routing() -> None:
    """Behaviour follows router capabilities (``router.needs_task_ids`` ...) and ``METHOD_SPECS``, never a
    comparison of ``method`` / ``router_kind`` / ``.kind`` with a router or method name."""
    found = set()
    for m, path in MODULES.items():
        if m == "mtlora.routing" or m.startswith("mtlora.routing."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named = any(_names_in(s) & ROUTER_AND_METHOD_NAMES for s in sides)
            if named and any(_mentions_kind_or_method(s) for s in sides if not _names_in(s)):
                found.add((m, ast.unparse(node)))
    assert not found - NAME_BRANCHES_ALLOWED, sorted(found - NAME_BRANCHES_ALLOWED)
    assert not NAME_BRANCHES_ALLOWED - found, (
        f"fixed, drop from the allow-list: {NAME_BRANCHES_ALLOWED - found}"
    )


#: Model-running loops outside ``mtlora.inference``, each with why it is not the shared path.
INFERENCE_LOOPS_ALLOWED = {
    # MtLoraModel.generate delegates to the wrapped HF model (API surface, not a loop of ours)
    ("mtlora.model", ".generate("),
    # the standalone loader copied into every bundle: it must run without mtlora installed
    ("mtlora.bundle.loader", ".generate("),
    # load commands printed for the user (strings, not code that runs here)
    ("mtlora.deploy", ".generate("),
}
INFERENCE_PATTERNS = ("log_softmax", ".generate(", "cross_entropy", "nll_loss")


def test_one_inference_path() -> None:
    """Scoring, NLL, log-likelihood and generation loops live in ``mtlora.inference`` (issue 16); the
    training loss (``losses``, ``training``) is the only other place that turns logits into a loss."""
    found = set()
    for m, path in MODULES.items():
        if m.startswith(("mtlora.inference", "mtlora.training")) or m == "mtlora.losses":
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in INFERENCE_PATTERNS:
            if pattern == ".generate(":
                hits = [
                    line for line in text.splitlines() if pattern in line and "engine.generate(" not in line
                ]
            else:
                hits = [line for line in text.splitlines() if pattern in line]
            if hits:
                found.add((m, pattern))
    assert not found - INFERENCE_LOOPS_ALLOWED, sorted(found - INFERENCE_LOOPS_ALLOWED)
    assert not INFERENCE_LOOPS_ALLOWED - found, (
        f"fixed, drop from the allow-list: {INFERENCE_LOOPS_ALLOWED - found}"
    )
