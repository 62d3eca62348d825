# mlrg: `make demo` sets up and runs the main job; `make test` sets up and runs every test.
# Setup is idempotent: the virtual environment is (re)installed only when settings.ini or setup.py change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlrg-setup
RUN ?= demo
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test check-sync lint format params nbtest pytest help

help:
	@echo "make demo   set up, then run the study on the built-in phantom (run folder outputs/$(RUN))"
	@echo "make test   set up, then check notebooks/modules are in sync and clean, lint (ruff), run nbdev_test and pytest"
	@echo "make params write each declaration's papermill parameters cell into its notebook"
	@echo "make format ruff format the notebooks, tests and benchmarks, then nbdev_export"

$(STAMP): settings.ini setup.py
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "mlrg needs Python >= 3.10, found " + sys.version.split()[0]'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

# The main job: the study on the built-in phantom (mlrg.study, preset demo): every stage notebook executed with papermill
# into outputs/$(RUN)/ (reports/: executed notebooks + HTML), then outputs/$(RUN)/index.html. Running it again skips the
# finished stages; STUDY_ARGS adds options, e.g. STUDY_ARGS="--ablations --seeds 3" or STUDY_ARGS="-p finetune.max_steps 800".
STUDY_ARGS ?=
demo: setup
	$(BIN)/mlrg study --preset demo --run $(RUN) $(STUDY_ARGS)

test: setup check-sync lint nbtest pytest

# Density as a check: lines of at most 120 characters, one statement per line, in the notebooks (the source of mlrg/),
# the tests and the benchmarks. `make format` lays code out that way (ruff format); long strings and comments are split
# by hand.
RUFF_FILES := nbs tests benchmarks setup.py
lint: setup
	$(BIN)/ruff check --line-length 120 --select E501,E701,E702 $(RUFF_FILES)

format: setup
	$(BIN)/ruff format --line-length 120 $(RUFF_FILES) && $(BIN)/nbdev_export

# Parameters typed once: each stage's parameters cell is written from its declaration (mlrg.runs.write_parameter_cells).
params: setup
	$(BIN)/python -c "from mlrg.runs import write_parameter_cells as w; print(*(['wrote ' + p for p in w()] or ['parameters cells: all up to date']), sep='\\n')"

# Fails when nbdev_export or nbdev_clean would change a file under mlrg/ or nbs/.
check-sync:
	@snap() { find mlrg nbs -type f -not -name '*.pyc' -not -path '*/.ipynb_checkpoints/*' -not -path '*/__pycache__/*' | sort | xargs sha1sum; }; \
	before=$$(snap); $(BIN)/nbdev_export && $(BIN)/nbdev_clean; after=$$(snap); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev_export / nbdev_clean changed these files; run them and commit the result:"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^[<>]' | awk '{print "  " $$3}' | sort -u; exit 1; \
	else echo "check-sync: notebooks and mlrg/ are in sync and clean"; fi

nbtest:
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest:
	$(BIN)/python -m pytest -q tests
