#!/usr/bin/env bash
# The measurements that need a CUDA GPU (CI has none), made to run in one call on a lent machine. Each part
# appends its raw lines to OUT_DIR/gpu_check_<device>.txt (benchmarks/results/ keeps such reports); logs and runs
# stay in OUT_DIR.
#   usage: scripts/gpu_check.sh DATA_DIR OUT_DIR [PART ...]       (PYTHON=python3 to choose the interpreter)
# Parts, in this order (default: all six):
#   tests     tests/test_gpu.py: both stages of every recipe, no host sync inside a training step, the benchmark
#   bench     benchmark.py --accelerator gpu: plain loop, this project, bare_auto; seed net, batch 64, 3 epochs
#   fast      --recipe fast, seeds 0-4: the run's own time, the whole process's, val and test accuracy, means
#   protocol  scripts/run_all.sh on the GPU (wall time, accuracies) beside the plain loop's protocol there
#   strong    --recipe strong, seeds 0-2, one run at a time: time per run, test accuracy, the mean
#   levers    the fast recipe (seed 0) with validation only at the end, in float32, without channels_last; and
#             the plain loop under torch.compile (compile time counted) beside the plain loop
# Relative paths are taken from the current folder, as with any command. OUT_DIR may exist (a second call
# with other parts adds to it); a part never reuses another call's runs: each gets a new folder.
# ACCELERATOR=cpu runs it all on the CPU instead: a rehearsal on small files (tests/test_gpu_check.py), where
# FAST_SEEDS (default "0 1 2 3 4") set to two seeds spares it three runs of the same code, and PROTOCOL_EPOCHS
# (default 20: the protocol part's initial-stage epochs, in run_all.sh and in the plain loop; the plain loop's full
# stage trains as many again, run_all.sh's its configs/full.yaml 20) set to 2 most of the protocol's epochs.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
DATA_DIR=$(realpath -m "${1:?usage: scripts/gpu_check.sh DATA_DIR OUT_DIR [PART ...]}")
OUT=$(realpath -m "${2:?usage: scripts/gpu_check.sh DATA_DIR OUT_DIR [PART ...]}")
shift 2
parts=${*:-tests bench fast protocol strong levers}
PY=${PYTHON:-python}
ACCELERATOR=${ACCELERATOR:-gpu}
FAST_SEEDS=${FAST_SEEDS:-0 1 2 3 4}
PROTOCOL_EPOCHS=${PROTOCOL_EPOCHS:-20}
export PYTHONUNBUFFERED=1
# run_all.sh calls `python`: make it $PY (a wrapper, not a link: a link to a venv's python leaves the venv)
shim=$(mktemp -d) && printf '#!/bin/sh\nexec %q "$@"\n' "$(command -v "$PY")" > "$shim/python" &&
  chmod +x "$shim/python" && export PATH="$shim:$PATH"
for part in $parts; do
  case $part in tests|bench|fast|protocol|strong|levers) ;; *) echo "error: unknown part $part" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
if [ "$ACCELERATOR" = cpu ]; then
  device=cpu machine="$(nproc) CPU cores"
else
  machine=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
  device=${machine%%,*}
  [ -n "$device" ] || { echo "error: nvidia-smi sees no GPU" >&2; exit 2; }
fi
report="$OUT/gpu_check_$(echo "${device##* }" | tr '[:upper:]' '[:lower:]').txt"  # "NVIDIA H200" -> ..._h200.txt
say() { echo "$*" | tee -a "$report"; }
failed=0
TIMEFORMAT='%R'  # bash's `time`: the whole process, Python start-up and imports included

say "# $(date -u +%FT%TZ) scripts/gpu_check.sh, parts: $parts"
say "# $machine"
say "# $("$PY" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)")"

new_dir() {  # OUT/NAME, or OUT/NAME.2, ... if an earlier call made it
  local dir="$OUT/$1" n=2
  while [ -e "$dir" ]; do dir="$OUT/$1.$n"; n=$((n + 1)); done
  mkdir -p "$dir" && echo "$dir"
}

# LABEL RECIPE "OPTIONS" SEED...: one train.py run per seed, timed as a process; then every run's last checkpoint
# on the test set (evaluate.py's own code, in one process to spare its start-up); one line per run and the means.
recipe_runs() {
  local label=$1 recipe=$2 options=$3 dir seed
  shift 3
  dir=$(new_dir "$label")
  for seed in "$@"; do
    # shellcheck disable=SC2086  # OPTIONS: words on purpose
    { time "$PY" "$root/scripts/train.py" --recipe "$recipe" --seed "$seed" --accelerator "$ACCELERATOR" --devices 1 \
        --data-dir "$DATA_DIR" --save-dir "$dir/seed$seed" --quiet $options > "$dir/seed$seed.log" 2>&1 || failed=1; } \
      2> "$dir/seed$seed.process_s"
  done
  "$PY" - "$label" "$DATA_DIR" "$dir" "$@" <<'PY' | tee -a "$report"
import contextlib, io, json, statistics, sys
from pathlib import Path
from mnist_lit.evaluate import main as evaluate
label, data_dir, out, seeds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
rows = []
for seed in seeds:
    run = out / f"seed{seed}" / "initial" / "version_0"
    process_s = (out / f"seed{seed}.process_s").read_text().strip()
    if not (run / "results.json").exists():
        print(f"{label} seed {seed}: FAILED (see {out}/seed{seed}.log)")
        continue
    r = json.loads((run / "results.json").read_text())
    evaluation = out / f"seed{seed}.test"  # evaluate.py's metrics.json, pictures; its table is not for the report
    with contextlib.redirect_stdout(io.StringIO()):
        code = evaluate(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data-dir", data_dir,
                         "--out", str(evaluation)])
    if code != 0:
        print(f"{label} seed {seed}: evaluate.py failed ({code})")
        continue
    metrics = json.loads((evaluation / "metrics.json").read_text())
    correct, count = metrics["correct"], metrics["count"]
    rows.append((r["wall_s"], float(process_s), 100 * r["acc"], 100 * correct / count))
    print(f"{label} seed {seed}: epoch {r['epoch']} val {r['correct']}/{r['count']} ({100 * r['acc']:.2f}%) | "
          f"run {r['wall_s']:.2f} s | process {process_s} s | test {correct}/{count} ({100 * correct / count:.2f}%)")
if rows:
    run_s, process_s, val, test = zip(*rows)
    sd = statistics.stdev(test) if len(test) > 1 else 0.0
    print(f"{label} mean of {len(rows)} seeds: run {statistics.mean(run_s):.2f} s (max {max(run_s):.2f}) | process "
          f"{statistics.mean(process_s):.1f} s | val {statistics.mean(val):.2f}% | test {statistics.mean(test):.3f}% "
          f"(sd {sd:.3f})")
PY
}

for part in $parts; do
  say "## $part"
  case $part in
    tests)
      "$PY" -m pytest -q -p no:cacheprovider "$root/tests/test_gpu.py" 2>&1 | tee "$OUT/tests.log" | tail -3 \
        | tee -a "$report"
      [ "${PIPESTATUS[0]}" = 0 ] || failed=1 ;;
    bench)
      json=$(new_dir bench)/benchmark_gpu.json
      "$PY" "$root/benchmarks/benchmark.py" --accelerator "$ACCELERATOR" --data-dir "$DATA_DIR" --epochs 3 --rounds 3 \
        --variants plain ours bare_auto --out "$json" 2>&1 | tee -a "$report" || failed=1 ;;
    fast)
      # shellcheck disable=SC2086  # the seeds: words on purpose
      recipe_runs fast fast "" $FAST_SEEDS ;;
    protocol)
      dir=$(new_dir protocol)
      { time bash "$root/scripts/run_all.sh" "$DATA_DIR" "$dir/runs" --epochs "$PROTOCOL_EPOCHS" > "$dir/run_all.log" \
        2>&1 || failed=1; } 2> "$dir/process_s"
      tail -3 "$dir/run_all.log" | sed 's/^/run_all.sh: /' | tee -a "$report"
      say "run_all.sh: whole script $(cat "$dir/process_s") s"
      "$PY" "$root/benchmarks/benchmark.py" --accelerator "$ACCELERATOR" --data-dir "$DATA_DIR" --protocol \
        --epochs "$PROTOCOL_EPOCHS" --rounds 1 --variants plain --out "$dir/plain_protocol.json" 2>&1 \
        | tee -a "$report" || failed=1 ;;
    strong)
      recipe_runs strong strong "" 0 1 2 ;;
    levers)
      recipe_runs fast_val_at_end fast "--trainer.check_val_every_n_epoch 2" 0  # no sanity check: ours has none
      recipe_runs fast_fp32 fast "--precision 32-true" 0
      recipe_runs fast_no_channels_last fast "--model.channels_last false" 0
      "$PY" "$root/benchmarks/benchmark.py" --accelerator "$ACCELERATOR" --data-dir "$DATA_DIR" --epochs 3 --rounds 1 \
        --variants plain plain_compiled --out "$(new_dir levers)/compile.json" 2>&1 | tee -a "$report" || failed=1 ;;
  esac
done
say "# exit $failed"
exit $failed
