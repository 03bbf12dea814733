"""Classify your own images: `python scripts/predict.py --ckpt PATH FILES_OR_FOLDERS... [--out preds.csv]`."""

import sys

from mnist_lit.threads import share_the_cpu

share_the_cpu()  # before torch starts: OpenMP reads its environment once

from mnist_lit.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
