#!/usr/bin/env bash
# The GPU checks of the TripoSR issues in one command on a lent GPU machine (15 minutes of device time in all):
# the CUDA tests, the model bench, the service bench. Here: `bash bench/gpu/wheels.sh`; then, through the device
# tool, with `.whl` carried: `bash bench/gpu/run.sh` (timeout ~540 s: the three steps take about 5 minutes).
# Results go to $OUT (or ./gpu-out): env.txt, cuda_tests.txt, model_bench.json, service_bench.json and their logs.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true
# Only the wheels whose package the image lacks: its own numpy, torch, attrs... stay as they are.
missing=()
for wheel in .whl/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1)
    python3 -c 'import importlib.metadata as m, sys; m.distribution(sys.argv[1])' "$name" 2>/dev/null \
        || missing+=("$wheel")
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${missing[@]}" \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__)'
  echo "installed: ${missing[*]##*/}"; } > "$out/env.txt" 2>&1

step() {  # name, seconds, command...: one step's output in $out, whatever the others do
    local name=$1 limit=$2; shift 2
    local began=$SECONDS
    timeout "$limit" "$@" > "$out/$name" 2> "$out/$name.log"
    echo "$name: exit $?, $((SECONDS - began)) s" | tee -a "$out/steps.txt"
}
step cuda_tests.txt 150 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_triposr_cuda.py
step model_bench.json 200 python3 bench/triposr_model_bench.py --device cuda
step service_bench.json 240 python3 bench/triposr_service_bench.py --seconds 30 --warmup-s 15
tail -n 5 "$out/cuda_tests.txt"; cat "$out/model_bench.json" "$out/service_bench.json"
