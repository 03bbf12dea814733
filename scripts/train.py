"""Train: `python scripts/train.py --stage initial`, then `python scripts/train.py --stage full --ckpt last.ckpt`.

Settings: `--recipe NAME`, `--config FILE`, `--model.X`, `--data.X`, `--trainer.X` (`--print_config` shows them all).
"""

import gc
import sys

from mnist_lit.threads import share_the_cpu

share_the_cpu()  # before torch starts: OpenMP reads its environment once

from mnist_lit.train import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    # Everything is written and closed by now. At exit Python's garbage collector would walk the ~400k objects that
    # importing torch and Lightning made, several times: 0.6 s of a short run's 3.6 s process (sweeps and searches
    # start one per trial). Frozen objects are left to the process's end instead.
    gc.freeze()
    sys.exit(code)
