#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU: build alterops._C with its CUDA kernels, run the
# test-suite (CUDA and Triton backends natively), run the GPU benchmark suite, and leave logs and
# results under $OUT. Copy $OUT/results/bench-cuda.{json,png} to bench/results/<device>/ and
# commit them with the device name.
#
#   OUT=/some/dir bash bench/gpu_run.sh [build|test|bench|all]     (default: all)
#
# Each phase fits in a few minutes, so they can run as separate commands on a machine whose
# commands are time-limited; `build` leaves alterops/_C*.so in the tree for the later phases.
# Nothing is installed: the tree is put on PYTHONPATH. Needs torch (a CUDA build), triton, nvcc,
# ninja, einops, pytest (+ pytest-xdist if present); timm and transformers are used when present.
# DEVICE=cpu and QUICK=1 exercise the script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
DEVICE=${DEVICE:-cuda}
PHASE=${1:-all}
PY=${PYTHON:-python3}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
JOBS=$(nproc 2>/dev/null || echo 4)

phase_build() {
  { nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; } >"$OUT/device.txt" 2>&1
  "$PY" -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee "$OUT/versions.txt"
  if [ "$DEVICE" = cuda ]; then export ALTEROPS_FORCE_CUDA=1 ALTEROPS_CUDA_ARCH_LIST=${ALTEROPS_CUDA_ARCH_LIST:-"8.0;9.0"}; fi
  export MAX_JOBS=$JOBS ALTEROPS_BUILD_JOBS=$JOBS
  "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
  "$PY" -m alterops info | tee "$OUT/info.txt"
  if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import alterops._C as c, sys; sys.exit(0 if c.WITH_CUDA else 'alterops._C was built without CUDA kernels')"
  fi
}

phase_test() {
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "$(( JOBS < 8 ? JOBS : 8 ))")
  local sel=()
  [ "${QUICK:-0}" = 1 ] && sel=(-k "cuda or memory")
  "$PY" -m pytest tests -q -rs "${xdist[@]}" "${sel[@]}" 2>&1 | tee "$OUT/tests.log"
  return "${PIPESTATUS[0]}"
}

phase_bench() {
  local quick=()
  [ "${QUICK:-0}" = 1 ] && quick=(--quick)
  "$PY" -m alterops bench --device "$DEVICE" --no-progress --out "$OUT/results" "${quick[@]}" 2>&1 | tee "$OUT/bench-$DEVICE.log"
  return "${PIPESTATUS[0]}"
}

case "$PHASE" in
  build) phase_build ;;
  test) phase_test ;;
  bench) phase_bench ;;
  all) phase_build && phase_test; rc=$?; phase_bench || rc=1; exit $rc ;;
  *) echo "usage: OUT=dir bash bench/gpu_run.sh [build|test|bench|all]" >&2; exit 2 ;;
esac
