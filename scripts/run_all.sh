#!/usr/bin/env bash
# The whole pipeline, as the original run_all.sh: get/check the data, initial stage, full stage from the
# initial run's last checkpoint (epoch 20 in the original protocol), then a short summary.
#   usage: scripts/run_all.sh [DATA_DIR] [SAVE_DIR] [extra options for the initial stage, e.g. --milestones 2 4]
#   (relative paths are taken from the current folder, as with any command)
set -euo pipefail
scripts=$(cd "$(dirname "$0")" && pwd)
DATA_DIR=${1:-data}
SAVE_DIR=${2:-lightning_logs}
shift $(( $# < 2 ? $# : 2 ))
start=$SECONDS

python "$scripts/prepare_data.py" --data-dir "$DATA_DIR"
python "$scripts/train.py" --stage initial --data-dir "$DATA_DIR" --save-dir "$SAVE_DIR" --quiet "$@"
# the run just made, named by its path: also after a recipe or --epochs other than 20, and never an older run
initial_run=$(python -c 'import sys; from mnist_lit.runs import run_dirs; print(run_dirs(sys.argv[1], "initial")[0])' "$SAVE_DIR")
python "$scripts/train.py" --stage full --ckpt "$initial_run/checkpoints/last.ckpt" --data-dir "$DATA_DIR" \
  --save-dir "$SAVE_DIR" --quiet

python - "$SAVE_DIR" "$(( SECONDS - start ))" <<'PY'
import json, sys
from mnist_lit.runs import run_dirs
save_dir, wall = sys.argv[1], int(sys.argv[2])
for stage in ("initial", "full"):
    r = json.loads((run_dirs(save_dir, stage)[0] / "results.json").read_text())
    print(f"{stage:8s} epoch {r['epoch']:2d}  {r['split']} {r['correct']}/{r['count']} ({100 * r['acc']:.2f}%)  "
          f"{r['wall_s']:.0f} s  {r['run_dir']}")
print(f"total wall time {wall} s")
PY
