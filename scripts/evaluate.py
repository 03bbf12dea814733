"""Evaluate a checkpoint: `python scripts/evaluate.py --ckpt PATH [--split test|val] [--data-dir DIR] [--out DIR]`."""

import sys

from mnist_lit.threads import share_the_cpu

share_the_cpu()  # before torch starts: OpenMP reads its environment once

from mnist_lit.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
