# grok3d — `make serve` and `make test` each set up what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BVENV := .venv-blender
PORT ?= 8000
export BENTOML_DO_NOT_TRACK := true
export GROK3D_DATA_DIR ?= $(CURDIR)/data
export BENTOML_HOME ?= $(GROK3D_DATA_DIR)/bentoml

.PHONY: .venv .venv-blender serve test

# The main environment: the project (editable) and its dev group, reinstalled when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade 'pip>=25.1'
	$(VENV)/bin/python -m pip install -q -e . --group dev
	touch $@

# The Blender workers' environment: bpy pins numpy < 2.
$(BVENV)/.installed: pyproject.toml
	test -x $(BVENV)/bin/python || $(PYTHON) -m venv $(BVENV)
	$(BVENV)/bin/python -m pip install -q --upgrade 'pip>=25.1'
	$(BVENV)/bin/python -m pip install -q --group blender
	touch $@

.venv: $(VENV)/.installed $(BVENV)/.installed
.venv-blender: $(BVENV)/.installed
