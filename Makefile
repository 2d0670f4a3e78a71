# The commands of the README. Each sets up a fresh machine first (create .venv, install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: run test lint slow setup clean voc ade

$(BIN)/activate: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev,slurm]'
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
	$(BIN)/python -m incseg.run $(ARGS)

# A fresh GPU machine to a literature table in one command (docs/download.md): download and
# prepare the dataset into DATA, then run the preset's sweep (EXP, ARGS for more overrides), e.g.
#   make voc DATA=/data/voc              # VOC 2012 + SBD, then experiment=literature/voc_15-1
#   make voc DATA=/data/voc EXP=voc_15-5 ARGS="method=mib"
#   make ade DATA=/data/ade              # ADE20K, then experiment=literature/ade_100-50
voc ade: setup
	@test -n "$(DATA)" || { echo "error: pass DATA=DIR, the folder the $@ archives go into" >&2; exit 2; }
	$(BIN)/python -m incseg.data download dataset=$@ data.root=$(DATA)
	$(BIN)/python -m incseg.run experiment=literature/$(or $(EXP),$(if $(filter voc,$@),voc_15-1,ade_100-50)) data.root=$(DATA) $(ARGS)

# One pytest worker per core (pytest-xdist), one torch thread each: most tests are short
# processes bound by Python and imports, which gain more from running side by side than from
# a second torch thread.
test: setup
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
