"""What has been run: `python scripts/runs.py [SAVE_DIR] [--group-by KEY ...] [--filter KEY=VALUE] [--format csv]`.

One row per run folder under SAVE_DIR (default lightning_logs): the settings that differ between the runs, the
final accuracy, the status (finished, unfinished, failed, broken); --group-by: mean ± sd of the final accuracy.
"""

import sys

from mnist_lit.table import main

if __name__ == "__main__":
    sys.exit(main())
