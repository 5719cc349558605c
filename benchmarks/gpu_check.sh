#!/usr/bin/env bash
# The GPU checks of docs/gpu.md, on a machine with a CUDA GPU and torch installed:
#   bash benchmarks/gpu_check.sh tests   # the CUDA tests (relex eval's too: it uses the GPU when
#                                        # there is one), after benchmarks/tf32_probe.py
#   bash benchmarks/gpu_check.sh bench   # 1.54B x 10 bf16: --device cuda vs cpu, outputs compared
#   bash benchmarks/gpu_check.sh loop    # RelexCallback in TRL's GRPOTrainer under FSDP2, then
#                                        # DeepSpeed ZeRO-2 and ZeRO-3, on every GPU here
#   bash benchmarks/gpu_check.sh verl    # relex's verl trainer mode end to end (needs verl 0.9
#                                        # and vLLM installed; benchmarks/verl_check.py)
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
loop)
  N=$(nvidia-smi -L | wc -l)
  rc=0
  accelerate launch --num_processes "$N" --use_fsdp --fsdp_version 2 \
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --mixed_precision bf16 \
    benchmarks/trl_sharded_check.py "$OUT/trl-fsdp2" 2>&1 | tee "$OUT/loop-fsdp2.log" || rc=1
  for stage in 2 3; do
    accelerate launch --num_processes "$N" --use_deepspeed --zero_stage "$stage" \
      --mixed_precision bf16 benchmarks/trl_sharded_check.py "$OUT/trl-zero$stage" 2>&1 \
      | tee "$OUT/loop-zero$stage.log" || rc=1
  done
  exit "$rc"
  ;;
verl)
  $PY benchmarks/verl_check.py --out "$OUT/verl" 2>&1 | tee "$OUT/verl-check.log"
  exit "${PIPESTATUS[0]}"
  ;;
esac
