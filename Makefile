# The two commands of the README. Both set up a fresh machine first (create .venv, install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: run test lint slow setup clean

$(BIN)/activate: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev,slurm]'
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
	$(BIN)/python -m incseg.run $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
