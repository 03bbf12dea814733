"""Many runs from one command: `python scripts/sweep.py --recipe fast --seeds 0-4 --set model.lr=0.003,0.01,0.03
--save-dir sweeps/lr [--then-full] [--jobs 2]`.

Seeds x settings (the cross product) as an Optuna study (GridSampler) in SAVE_DIR/sweep.db (or --storage URL for
workers on several machines); re-running the same command completes an interrupted sweep (finished runs are kept,
interrupted ones resume); at the end the runs table grouped by the swept settings (mean ± sd over the seeds).
"""

import sys

from mnist_lit.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
