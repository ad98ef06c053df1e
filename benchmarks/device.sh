#!/usr/bin/env bash
# The GPU check of issue 21, as one command (README: Speed). It measures, in fp32: what the meter and the guard add
# per aten op; `source` (ResNet-50, 224 px, batch 64) and CEMA's machinery (ResNet-18 edge, ResNet-101 foundation)
# against bare loops; the harness's host-device synchronisations per edge batch; and the real-size benchmark
# (tests/benchmarks/test_real_size.py: `cemabench run` on a generated ImageNet-C tree of JPEGs against a bare
# ImageFolder/DataLoader loop). A few minutes; it needs the repository and its wheel, built beforehand with
# `pip wheel --no-deps -w .whl .` (the GPU machine has torch, torchvision, timm, pandas and pytest, and no network).
# Never part of CI. Usage: benchmarks/device.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cemabench-site .whl/cemabench-*.whl || exit 1
export PYTHONPATH=/tmp/cemabench-site PYTHONUNBUFFERED=1 CEMABENCH_CACHE=/tmp/cemabench-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 200 python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
CEMABENCH_BENCH_DEVICE=cuda CEMABENCH_BENCH_IMAGES_PER_DOMAIN="${REAL_IMAGES:-300}" CEMABENCH_BENCH_WORKERS=8 \
    timeout 170 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/benchmarks/test_real_size.py \
    --benchmark-enable --benchmark-group-by=group --benchmark-columns=min,rounds \
    --benchmark-json="$out/real_size.json" 2>&1 | tee "$out/real_size.log"
# --isolate on the GPU: each half confined (Landlock, seccomp; with --unit-memory, no shared or growing mapping and no
# new process), its numbers the in-process run's. Both lines should print the same accuracy, bytes and FLOPs
for flags in "" "--isolate" "--isolate --unit-memory 24G"; do
    timeout 120 python3 -m cemabench.cli run --method tent --table table2 --domains fog --device cuda --jobs 1 \
        --out "$out/isolated-${flags// /_}.json" $flags 2>&1 | tail -4 | tee -a "$out/isolated.log"
done
