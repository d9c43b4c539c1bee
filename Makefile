# Two commands a new user needs: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV) $(PY)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mtlora demo --output_dir demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks *.py
	$(BIN)/ruff format --check src tests benchmarks *.py

bench: $(STAMP)
	$(BIN)/python benchmarks/layer_speed.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info
