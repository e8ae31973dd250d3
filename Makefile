# The README's commands. Each target creates .venv itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv lint test bench demo clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,demo]'
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -q

bench: venv
	$(BIN)/python -m bench.translation --fleet 1000,10000
	$(BIN)/python -m bench.convergence
	$(BIN)/python -m bench.tls
	$(BIN)/python -m bench.priority --duration 15 --warmup 3
	$(BIN)/python -m bench.certs
	$(BIN)/python -m bench.rotation
	$(BIN)/python -m bench.rls
	$(BIN)/python -m bench.picking --duration 60 --callers 16
	$(BIN)/python -m bench.scheduling
	$(BIN)/python -m bench.tokens --windows 1 --latency-requests 400

demo: venv
	$(BIN)/python -m bench.demo

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
