"""Every number README.md and docs/ quote from a command of this project comes from the current code (issue 12).

The numbers sit in marked regions that ``scripts/regen_docs.py`` renders from result files written by the
producing commands (``docs/results/*.json``; the benchmarks' own ``benchmarks/results/*.json``). Here:

* the docs say exactly what those result files say (``regen_docs.check``);
* ``mtlora params`` still prints the committed counts (re-run: seconds, meta device);
* each demo result file was made with the configuration the current code runs for its command line (the demo
  itself takes minutes, so it is not re-run here: ``make docs`` does that);
* the README's own ``#>`` outputs are checked by running them, in ``tests/test_readme.py``.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def regen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regen_docs", REPO / "scripts" / "regen_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("regen_docs", module)
    spec.loader.exec_module(module)
    return module


def test_docs_quote_exactly_the_result_files(regen: ModuleType) -> None:
    assert regen.check() == []
    used = {m.group("name") for path in regen.DOC_FILES for m in regen.regions(path.read_text())}
    assert used == set(regen.RENDERERS), "every renderer is used, every region has a renderer"


def test_regions_are_rewritten_from_the_results(regen: ModuleType) -> None:
    """The mechanism itself: an edited number inside a region is put back, text outside is kept."""
    text = "a <!-- regen:params_list -->1 / 2<!-- /regen:params_list --> b"
    out = regen.render_text(text, REPO / "README.md")
    assert out.startswith("a <!-- regen:params_list -->") and out.endswith("<!-- /regen:params_list --> b")
    assert regen.render_params_list() in out and "1 / 2" not in out


def test_params_results_are_the_current_code(regen: ModuleType) -> None:
    committed = regen.load("params")
    for key, _, argv in regen.PARAMS_CONFIGS:
        assert committed[key]["command"] == "mtlora params " + shlex.join(argv)
        fresh = regen.count_params(argv)
        assert {k: committed[key][k] for k in fresh} == fresh, key


def _demo_results(regen: ModuleType) -> list[tuple[str, dict]]:
    out = [(name, regen.load(name)) for name in regen.DEMO_ARGV]
    out += [(f"demo_ablation/{k}", v) for k, v in regen.load("demo_ablation")["variants"].items()]
    return out


def test_demo_results_were_made_with_the_current_configuration(regen: ModuleType) -> None:
    from mtlora.demo import METHOD_FLAGS, _resolve, build_demo_suite, build_parser

    variants = {
        f"demo_ablation/{k}": ["--methods", "mtlora", "--train_args", v]
        for k, _, v in regen.ABLATION_VARIANTS
    }
    for name, res in _demo_results(regen):
        assert res["argv"] == {**regen.DEMO_ARGV, **variants}[name], name
        ns = _resolve(build_parser().parse_args([*res["argv"], "--output_dir", "unused", "--device", "cpu"]))
        cfg = res["config"]
        for key in ("methods", "max_steps", "epochs", "batch_size", "learning_rate", "lora_rank", "seed",
                    "quick", "train_args", "num_threads"):  # fmt: skip
            assert cfg[key] == getattr(ns, key), (name, key)
        assert cfg["model"] == ns.model_name_or_path
        for method in ns.methods:
            assert res["methods"][method]["flags"] == METHOD_FLAGS[method], (name, method)
        suite = build_demo_suite(ns)
        assert res["suite"]["meta"] == json.loads(json.dumps(suite.meta)), name
        assert res["suite"]["num_test"] == len(suite.test), name
        assert [t["name"] for t in res["suite"]["tasks"]] == [t.name for t in suite.tasks], name
        pre = res["base_pretraining"]
        assert (pre["steps"] if pre else 0) == ns.pretrain_steps, name
