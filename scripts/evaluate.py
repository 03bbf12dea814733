"""Evaluate a checkpoint: `python scripts/evaluate.py --ckpt PATH [--split test|val] [--data-dir DIR] [--out DIR]`."""

import sys

from mnist_lit.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
