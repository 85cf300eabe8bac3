#!/usr/bin/env bash
# Runs inside the Bento's image build (bentofile.yaml: docker.setup_script): the Blender workers' venv, with the
# versions of pyproject.toml's `blender` group, which the Bento carries.
set -euxo pipefail
python3 -m venv /opt/blender-venv
/opt/blender-venv/bin/python -m pip install --upgrade 'pip>=25.1'
cd "${BENTO_PATH:-/home/bentoml/bento}/src"
/opt/blender-venv/bin/python -m pip install --group blender
mkdir -p /data
