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
INFRA_PACKAGES = ("mtlora.hub", "mtlora.data", "mtlora.inference")

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
