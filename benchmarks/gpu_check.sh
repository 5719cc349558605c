#!/usr/bin/env bash
# The GPU checks of README "GPU", on a machine with a CUDA GPU and torch installed:
#   bash benchmarks/gpu_check.sh tests   # the CUDA tests (relex eval's too: it uses the GPU when
#                                        # there is one), and that the TF32 test can fail
#   bash benchmarks/gpu_check.sh bench   # 1.54B x 10 bf16: --device cuda vs cpu, outputs compared
# Logs go to $OUT (default out/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, numba, numpy, transformers; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'numba', numba.__version__, 'numpy', numpy.__version__, 'transformers',
transformers.__version__)"
echo "cores $(nproc), $(free -g | awk '/Mem/ {print $2}') GB RAM"

case "${1:-tests}" in
tests)
  $PY benchmarks/tf32_probe.py 2>&1 | tee "$OUT/tf32.log"
  $PY -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/test_cuda.py tests/test_evaluate.py \
    tests/test_kernels.py tests/test_extrapolate.py tests/test_engine.py} 2>&1 | tee "$OUT/tests.log"
  # The TF32 test must fail without the engine's float32 guard.
  cp src/relex/engine.py "$OUT/engine.py.orig"
  sed -i 's/torch.set_float32_matmul_precision("highest")/pass/' src/relex/engine.py  # the guard
  $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k tf32 >"$OUT/mutant.log" 2>&1
  case $? in
    0) echo "MUTANT SURVIVED: the TF32 tests pass without the guard" ;;
    1) echo "mutant killed: $(tail -1 "$OUT/mutant.log")" ;;
    *) echo "mutant check did not run:"; tail -5 "$OUT/mutant.log" ;;
  esac
  cp "$OUT/engine.py.orig" src/relex/engine.py
  ;;
bench)
  shift
  $PY benchmarks/bench_extrapolate.py --params 1.5b --checkpoints 10 --device cuda \
    --compare-device cpu --data "${DATA:-bench-data/1.5b}" "$@" 2>&1 | tee "$OUT/bench.log"
  ;;
esac
