"""Speed of this pipeline vs a plain PyTorch loop and the usual Lightning setup, measured in one run:
`python scripts/benchmark.py --data-dir ../shared/data [--epochs 1] [--rounds 3] [--out benchmark.json]`."""

import sys

from mnist_lit.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
