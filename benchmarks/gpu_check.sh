#!/usr/bin/env bash
# The GPU checks of README "GPU", on a machine with a CUDA GPU and torch installed:
#   bash benchmarks/gpu_check.sh tests   # the CUDA tests (relex eval's too: it uses the GPU when
#                                        # there is one), after benchmarks/tf32_probe.py
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
  exit "${PIPESTATUS[0]}"
  ;;
bench)
  shift
  $PY benchmarks/bench_extrapolate.py --params 1.5b --checkpoints 10 --device cuda \
    --compare-device cpu --data "${DATA:-bench-data/1.5b}" "$@" 2>&1 | tee "$OUT/bench.log"
  exit "${PIPESTATUS[0]}"
  ;;
esac
