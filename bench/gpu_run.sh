#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU: build the CPU and CUDA libraries into the tree,
# run the test-suite (CUDA and Triton backends natively), run the CUDA kernels' tests under
# compute-sanitizer, time the benchmark suite and the attention backends side by side (Triton
# against the CUDA C++ kernels, and where the time of a neighbourhood attention forward+backward
# goes: bench/gpu_profile.py), and leave logs and results under $OUT. Copy
# $OUT/results/bench-cuda.{json,png}, $OUT/results/attention-*.json and
# $OUT/results/profile-fwd-bwd.txt to bench/results/<device>/ and commit them with the device name.
#
#   OUT=/some/dir bash bench/gpu_run.sh [build|test|sanitize|bench|all]     (default: all)
#
# Each phase fits in a few minutes, so they can run as separate commands on a machine whose
# commands are time-limited; `build` leaves alterops/_lib/*.so in the tree for the later phases.
# Nothing is installed: the tree is put on PYTHONPATH. Needs torch (a CUDA build), triton, nvcc,
# pytest (+ pytest-xdist if present); timm and transformers are used when present.
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
# The CUDA C++ kernels' tests on a real GPU: every test of the attention, blur and statistics
# families parametrised with the `cuda` backend (not the CPU-executor ones).
CUDA_TESTS=(tests/test_neighborhood_attention_nd.py tests/test_window_attention.py tests/test_blur.py
            tests/test_statistics.py)

phase_build() {
  { nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; } >"$OUT/device.txt" 2>&1
  "$PY" -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee "$OUT/versions.txt"
  if [ "$DEVICE" = cuda ]; then export ALTEROPS_FORCE_CUDA=1 ALTEROPS_CUDA_ARCH_LIST=${ALTEROPS_CUDA_ARCH_LIST:-"8.0;9.0"}; fi
  export ALTEROPS_BUILD_JOBS=$JOBS
  "$PY" tools/build_libs.py --verbose >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
  "$PY" -m alterops info | tee "$OUT/info.txt"
  if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import alterops, sys; from alterops import _ext; sys.exit(0 if _ext.has_cuda_kernels() else 'the CUDA kernels did not load: ' + _ext.cuda_error())"
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

phase_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || true)
  if [ -z "$cs" ] && command -v nvcc >/dev/null; then cs="$(dirname "$(command -v nvcc)")/compute-sanitizer"; fi
  if [ "$DEVICE" != cuda ] || [ ! -x "$cs" ]; then
    echo "sanitize: skipped (DEVICE=$DEVICE, compute-sanitizer: ${cs:-not found})" | tee "$OUT/sanitize.log"
    return 0
  fi
  local rc=0 tool
  for tool in memcheck racecheck synccheck; do
    # small cases only: racecheck slows kernels down by orders of magnitude
    "$cs" --tool "$tool" --target-processes all --error-exitcode 17 --print-limit 20 \
      "$PY" -m pytest "${CUDA_TESTS[@]}" -q -x -m "not cuda_emulated" -k "cuda and not large and not slow" \
      >"$OUT/sanitize-$tool.log" 2>&1
    local r=$?
    echo "compute-sanitizer --tool $tool: exit $r" | tee -a "$OUT/sanitize.log"
    tail -5 "$OUT/sanitize-$tool.log"
    [ "$r" -ne 0 ] && rc=1
  done
  return $rc
}

phase_bench() {
  local quick=()
  [ "${QUICK:-0}" = 1 ] && quick=(--quick)
  "$PY" -m alterops bench --device "$DEVICE" --no-progress --out "$OUT/results" "${quick[@]}" 2>&1 | tee "$OUT/bench-$DEVICE.log"
  local rc=${PIPESTATUS[0]}
  # Triton against the CUDA C++ kernels (and the reference) on the bench shapes, 16-bit and
  # float32, forward and forward+backward: what decides the automatic GPU choice.
  local dtypes=bfloat16,float32
  [ "$DEVICE" = cpu ] && dtypes=float32
  "$PY" -m alterops bench attention --device "$DEVICE" --op neighborhood --batch 64 --size 56,14 --heads 2,12 \
    --head-dim 32,64 --kernel 7 --dtype "$dtypes" --pass fwd,fwd+bwd --impl alterops-triton,alterops-cuda \
    --no-progress --out "$OUT/results/attention-neighborhood" 2>&1 | tee "$OUT/attention-neighborhood.log" || rc=1
  if [ "$DEVICE" = cuda ]; then "$PY" bench/gpu_profile.py >"$OUT/results/profile-fwd-bwd.txt" 2>&1 || rc=1; fi
  "$PY" -m alterops bench attention --device "$DEVICE" --op window --batch 64 --size 56 --heads 3,6 \
    --head-dim 32 --window 7 --shift 0,3 --bias --dtype "$dtypes" --pass fwd,fwd+bwd \
    --impl alterops-triton,alterops-cuda --no-progress --out "$OUT/results/attention-window" 2>&1 | tee "$OUT/attention-window.log" || rc=1
  return $rc
}

case "$PHASE" in
  build) phase_build ;;
  test) phase_test ;;
  sanitize) phase_sanitize ;;
  bench) phase_bench ;;
  all) phase_build || exit 1; phase_test; rc=$?; phase_sanitize || rc=1; phase_bench || rc=1; exit $rc ;;
  *) echo "usage: OUT=dir bash bench/gpu_run.sh [build|test|sanitize|bench|all]" >&2; exit 2 ;;
esac
