#!/usr/bin/env bash
# Wheels for a lent GPU machine (Python 3.12, PyTorch and Triton in its image, no package registry): the serving
# stack that the TripoSR checks import, resolved from pyproject.toml's pins for Python 3.12. Big packages that
# every PyTorch image has are left out; bench/gpu/run.sh installs only the wheels whose package is missing there.
#   bash bench/gpu/wheels.sh [.whl]      (then carry .whl; it is git-ignored)
set -euo pipefail
out=${1:-.whl}
py=${PY:-.venv/bin/python}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
target=(--python-version 3.12 --implementation cp --only-binary=:all: "${platforms[@]}")
# What PyTorch images come with (and would cost hundreds of MB to carry): left out of the pins and of their needs.
export SKIP="torch numpy scipy scikit-image pillow pyyaml huggingface-hub"
mapfile -t pins < <("$py" - <<'PY'
import os, tomllib
skip = set(os.environ["SKIP"].split())
for pin in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = pin.split("==")[0].strip().lower().replace("_", "-")
    if name not in skip:
        print(pin)
PY
)
report=$(mktemp)
"$py" -m pip install -q --dry-run --ignore-installed --report "$report" "${target[@]}" --target "$(mktemp -d)" \
    "${pins[@]}" psutil
mapfile -t needed < <("$py" - "$report" <<'PY'
import json, os, sys
skip = set(os.environ["SKIP"].split())
for item in json.load(open(sys.argv[1]))["install"]:
    name = item["metadata"]["name"].lower().replace("_", "-")
    if name not in skip:
        print(f"{name}=={item['metadata']['version']}")
PY
)
rm -rf "$out" && mkdir -p "$out"
"$py" -m pip download -q --no-deps "${target[@]}" -d "$out" "${needed[@]}"
echo "$out: $(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1)"
