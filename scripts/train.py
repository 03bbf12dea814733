"""Train: `python scripts/train.py --stage initial`, then `python scripts/train.py --stage full --ckpt last.ckpt`."""

import sys

from mnist_lit.training import main

if __name__ == "__main__":
    sys.exit(main())
