#!/usr/bin/env bash
# The checks that need a CUDA GPU (CI has none): the GPU tests, then the fast recipe on the GPU, seeds 0 1 2,
# each run's own time (results.json) and the whole process's, and its test accuracy (evaluate.py).
#   usage: scripts/gpu_check.sh [DATA_DIR] [OUT_DIR]      (PYTHON=python3 to choose the interpreter)
#   (relative paths are taken from the current folder, as with any command)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
DATA_DIR=${1:-data}
OUT=${2:-gpu_check}
PY=${PYTHON:-python}
mkdir -p "$(dirname "$OUT")"
mkdir "$OUT" 2>/dev/null || { echo "error: $OUT exists: give a new folder (results are never overwritten)" >&2; exit 2; }
failed=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
"$PY" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" \
  | tee -a "$OUT/machine.txt"
"$PY" -m pytest -q -p no:cacheprovider "$root/tests/test_gpu.py" 2>&1 | tee "$OUT/tests.log" || failed=1
TIMEFORMAT='process wall %R s'  # bash's `time`: the whole process, Python start-up and imports included
for seed in 0 1 2; do
  run="$OUT/fast_seed$seed"
  { time "$PY" "$root/scripts/train.py" --recipe fast --seed "$seed" --accelerator gpu --devices 1 --data-dir "$DATA_DIR" \
    --save-dir "$run" --quiet > "$run.log" 2>&1 || failed=1; } 2>> "$run.log"
  "$PY" "$root/scripts/evaluate.py" --ckpt "$run/initial/version_0/checkpoints/last.ckpt" --data-dir "$DATA_DIR" \
    --out "$run/eval" >> "$run.log" 2>&1 || failed=1
  echo "fast seed $seed: $(grep -h '^final:' "$run"/initial/version_*/log.txt)" \
    "| run $(grep -h wall_s "$run"/initial/version_*/results.json) | $(grep 'process wall' "$run.log")" \
    "| test: $(grep -E '^ *all ' "$run.log")" | tee -a "$OUT/fast.txt"
done
exit $failed
