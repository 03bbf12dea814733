"""What has been run: `python scripts/runs.py [SAVE_DIR ...] [--group-by KEY ...] [--filter KEY=VALUE] [--format csv]`.

One row per run folder under the SAVE_DIRs (default lightning_logs): the settings that differ between the runs, the
final accuracy, the status (finished, unfinished, failed, broken); --group-by: mean ± sd of the final accuracy.
`--storage URL [--study NAME]` instead of SAVE_DIRs: the finished runs of a sweep's or search's study, read from
its database alone (e.g. the PostgreSQL database of a sweep on several machines).
"""

import sys

from mnist_lit.experiments.table import main

if __name__ == "__main__":
    sys.exit(main())
