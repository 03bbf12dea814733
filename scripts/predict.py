"""Classify your own images: `python scripts/predict.py --ckpt PATH FILES_OR_FOLDERS... [--out preds.csv]`."""

import sys

from mnist_lit.predict import main

if __name__ == "__main__":
    sys.exit(main())
