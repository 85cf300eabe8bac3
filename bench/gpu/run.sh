#!/usr/bin/env bash
# The GPU checks of the TripoSR issues in one command on a lent GPU machine (15 minutes of device time in all):
# the CUDA tests, the model bench, the service bench. Here: `bash bench/gpu/wheels.sh`; then, through the device
# tool, with `.whl` carried: `bash bench/gpu/run.sh`, timeout_s 560 (the steps' limits add up to 470 s).
# Results go to $OUT (or ./gpu-out): env.txt, steps.txt, cuda_tests.txt, model_bench.json, service_bench.json and
# each step's log.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true
# All of .whl, first on the path: the image's older copies of small packages (typing-extensions, anyio, certifi...)
# may be older than the serving stack needs. The big ones (torch, numpy, scipy...) are not in .whl: the image's stay.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton, sys; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
  python3 -m pip list --path /tmp/site 2>/dev/null | tail -n +3 | tr -s ' ' '=' | tr '\n' ' '; echo; } > "$out/env.txt" 2>&1

step() {  # file, seconds, command...: one step's output in $out, whatever the others do
    local name=$1 limit=$2; shift 2
    local began=$SECONDS
    # SIGINT, not TERM: Python unwinds, so the service bench's `with Server(...)` stops its bentoml process tree.
    timeout -s INT -k 15 "$limit" "$@" > "$out/$name" 2> "$out/$name.log"
    echo "$name: exit $?, $((SECONDS - began)) s" | tee -a "$out/steps.txt"
}
trap 'pkill -f "bentoml serve" 2>/dev/null' EXIT  # nothing left holding the GPU for a rerun on this machine
step cuda_tests.txt 120 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_triposr_cuda.py
step model_bench.json 150 python3 bench/triposr_model_bench.py --device cuda
step service_bench.json 200 python3 bench/triposr_service_bench.py --seconds 30 --warmup-s 15
tail -n 5 "$out/cuda_tests.txt"; cat "$out/model_bench.json" "$out/service_bench.json"
