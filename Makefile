# One command each: `make pipeline` (set up, then run the DVC pipeline on the tiny profile) and
# `make test` (set up, then run the tests). Everything installs into .venv from pinned versions.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
OPEN_CLIP_WHEEL_VERSION := 3.3.0
CLIP_VOCAB := .cache/clip/bpe_simple_vocab_16e6.txt.gz
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup real-data pipeline full test benchmarks lab clean

setup: $(VENV)/.installed $(CLIP_VOCAB) .dvc/config real-data

# data.dvc versions the real concept folders under data/concepts/; a fresh clone has no DVC remote,
# so when the MIMA sample data sits beside the checkout (../shared, as in CI) it is copied in and
# committed to the local DVC cache (same content, data.dvc unchanged), and `dvc status` is clean.
SHARED_CONCEPTS ?= ../shared/datasets/wikiart_relearn
real-data: .dvc/config
	@if [ ! -d data/concepts ] && [ -d $(SHARED_CONCEPTS) ]; then \
		cp -r $(SHARED_CONCEPTS) data/concepts && $(BIN)/dvc commit --force --quiet data.dvc; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: on a CPU machine this is the CPU wheel, on a GPU machine a CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# CLIP's BPE vocabulary ships inside the open-clip-torch wheel; take only that file.
$(CLIP_VOCAB): scripts/get_clip_vocab.py | $(VENV)/.installed
	mkdir -p .cache/wheels
	$(BIN)/python -m pip download --quiet --no-deps --dest .cache/wheels open-clip-torch==$(OPEN_CLIP_WHEEL_VERSION)
	$(BIN)/python scripts/get_clip_vocab.py .cache/wheels/open_clip_torch-$(OPEN_CLIP_WHEEL_VERSION)-py3-none-any.whl $@

.dvc/config:
	$(BIN)/dvc init --quiet $(if $(wildcard .git),,--no-scm)
	$(BIN)/dvc config core.analytics false

pipeline: setup
	$(BIN)/dvc repro
	$(BIN)/python scripts/sync_readme.py

# The full tiny comparison (profiles/full.yaml) as parameter changes on the default profile, so DVC
# re-runs only the stages they touch (attacks, scaling, figures) and reuses the base, erased and
# immunized models; then the run's tables, metrics and figures are kept in reports/published/full/.
full: setup
	$(BIN)/dvc exp run $(shell $(BIN)/python scripts/overlay_flags.py profiles/full.yaml)
	$(BIN)/python scripts/publish_run.py full

test: setup
	$(BIN)/python -m pytest -q

lab: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .cache
