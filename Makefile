# mlrg: `make demo` sets up and runs the main job; `make test` sets up and runs every test.
# Setup is idempotent: the virtual environment is (re)installed only when settings.ini or setup.py change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlrg-setup
RUN ?= demo
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test check-sync nbtest pytest reports clean-run help

help:
	@echo "make demo   set up, then run the study on the built-in phantom (run folder outputs/$(RUN))"
	@echo "make test   set up, then check notebooks/modules are in sync and clean, run nbdev_test and pytest"

$(STAMP): settings.ini setup.py
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "mlrg needs Python >= 3.10, found " + sys.version.split()[0]'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

# The main job. Until the study runner lands, the study is: the demo phantom, its preparation, the labeler's
# validation, stage 1 pretraining, stage 2 report generation and the evaluation of its test predictions next to the
# baselines, each executed as a notebook report (executed .ipynb + HTML) in outputs/$(RUN)/reports/, all sharing the
# run folder outputs/$(RUN)/. The phantom's learnability check is a benchmark (benchmarks/phantom_learnability.py).
RUNDIR := $(abspath outputs/$(RUN))
PM := $(BIN)/papermill --cwd nbs --log-level WARNING
PRETRAIN_ARGS ?= -p image_size 128 -p num_epochs 1 -p batch_size 16
FINETUNE_ARGS ?= -p batch_size 32 -p num_epochs 100 -p max_steps 400 -p eval_steps 200 -p val_max_samples 200 -p val_num_beams 1
demo: setup
	@mkdir -p $(RUNDIR)/reports
	$(PM) nbs/01a_phantom.ipynb $(RUNDIR)/reports/01a_phantom.ipynb -p run_dir $(RUNDIR) -p preset demo -p learnability_seconds 0
	$(PM) nbs/01_data.ipynb $(RUNDIR)/reports/01_data.ipynb -p run_dir $(RUNDIR)
	$(PM) nbs/05a_labeler.ipynb $(RUNDIR)/reports/05a_labeler.ipynb -p run_dir $(RUNDIR) -p phantom_root $(RUNDIR)/mimic
	$(PM) nbs/03_pretrain.ipynb $(RUNDIR)/reports/03_pretrain.ipynb -p run_dir $(RUNDIR) $(PRETRAIN_ARGS)
	$(PM) nbs/04_finetune.ipynb $(RUNDIR)/reports/04_finetune.ipynb -p run_dir $(RUNDIR) $(FINETUNE_ARGS)
	$(PM) nbs/05_evaluate.ipynb $(RUNDIR)/reports/05_evaluate.ipynb -p run_dir $(RUNDIR)
	$(BIN)/jupyter nbconvert --log-level WARN --to html $(RUNDIR)/reports/*.ipynb
	@$(BIN)/python -c 'from mlrg.runs import RunFolder; print("\nmlrg demo: " + RunFolder.create("$(RUNDIR)").describe())'

test: setup check-sync nbtest pytest

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
