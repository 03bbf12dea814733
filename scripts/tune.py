"""Search: `python scripts/tune.py --recipe fast --space configs/spaces/fast.yaml --trials 20 --save-dir tune/fast`.

Optuna's TPE (seeded) over the settings in the space file, for the best validation accuracy of an initial-stage
run (never the test accuracy); runs falling behind are pruned after an epoch. Several workers: --jobs N here, or
the same command with a shared --storage URL and --study NAME on other machines. Writes SAVE_DIR/best.yaml, for
`python scripts/train.py --config SAVE_DIR/best.yaml`.
"""

import sys

from mnist_lit.experiments.tune import main

if __name__ == "__main__":
    sys.exit(main())
