"""Choose an ensemble on the validation split its candidates share: `python scripts/select_ensemble.py --ckpt A B C
... --out members.txt [--data-dir DIR] [--max-members 5]`; then `evaluate.py --members members.txt` (once, on test).

Greedy forward selection (Caruana et al., 2004) on the candidates' validation predictions; the test set is not read.
"""

import sys

from mnist_lit.threads import share_the_cpu

share_the_cpu()  # before torch starts: OpenMP reads its environment once

from mnist_lit.experiments.selection import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
