# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Real MedMNIST files: the shared folder beside the checkout when present, else medfed's own
# default (MEDFED_DATA_DIR, or the user cache directory, downloading with an MD5 check).
SHARED_DATA := $(abspath ../shared/data/medmnist)
DATA_ENV := $(if $(MEDFED_DATA_DIR),,$(if $(wildcard $(SHARED_DATA)/*.npz),MEDFED_DATA_DIR=$(SHARED_DATA),))

.PHONY: install demo test

$(BIN)/medfed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "medfed needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/medfed

install: $(BIN)/medfed

demo: install
	$(DATA_ENV) $(BIN)/medfed simulate --dataset breastmnist --resolution 64

test: install
	$(DATA_ENV) $(BIN)/python -m pytest -q --durations=20 -n 2 --dist loadfile --no-loadscope-reorder
