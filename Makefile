# Two commands a new user needs: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench docs clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV) $(PY)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mtlora demo --output_dir demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# Everything but the tests marked @pytest.mark.slow (each over ~5 s on an idle 2-core machine).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts *.py
	$(BIN)/ruff format --check src tests benchmarks scripts *.py
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layering.py

bench: $(STAMP)
	$(BIN)/python benchmarks/layer_speed.py --quick

# Re-run every command whose numbers README.md and docs/ quote, then rewrite those numbers (~20-30 min on
# 2 cores; scripts/regen_docs.py --render only rewrites them from the committed docs/results/*.json).
docs: $(STAMP)
	$(BIN)/python scripts/regen_docs.py

clean:
	rm -rf $(VENV) build dist *.egg-info
