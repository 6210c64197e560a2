# The two set-up commands of the README: `make serve` and `make test`.
PYTHON ?= python3.11
HOST ?= 127.0.0.1
PORT ?= 8000

SERVE_VENV := .venv-serve
DEV_VENV := .venv

.PHONY: serve test models bench lint clean

# Reinstalled when the package changes: the serve venv holds a copy, not a link.
$(SERVE_VENV)/.installed: pyproject.toml $(shell find service -type f -not -path "*/__pycache__/*")
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet '.[grpc]'
	touch $@

$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install --quiet --upgrade pip
	$(DEV_VENV)/bin/pip install --quiet torch==2.13.0
	$(DEV_VENV)/bin/pip install --quiet -e '.[train,grpc,dev]'
	touch $@

## Start the server on the demo models (base install only: no torch).
serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/rnn-serve --model-repo models --host $(HOST) --port $(PORT)

## Install everything and run the whole test suite.
test: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m pytest -q

## Rebuild the demo models in models/.
models: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python scripts/build_demo_models.py

## Run the benchmark suite (prints a table, writes benchmarks/results/latest.json).
bench: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m benchmarks.run

lint: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check service training tests benchmarks

clean:
	rm -rf $(SERVE_VENV) $(DEV_VENV) .pytest_cache .hypothesis
