"""Train: `python scripts/train.py --stage initial`, then `python scripts/train.py --stage full --ckpt last.ckpt`.

Settings: `--recipe NAME`, `--config FILE`, `--model.X`, `--data.X`, `--trainer.X` (`--print_config` shows them all).
"""

import sys

from mnist_lit.train import main

if __name__ == "__main__":
    sys.exit(main())
