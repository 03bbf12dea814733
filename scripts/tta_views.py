"""Choose --tta N on validation: `python scripts/tta_views.py --ckpt PATH [PATH ...] [--data-dir DIR]`."""

import sys

from mnist_lit.threads import share_the_cpu

share_the_cpu()  # before torch starts: OpenMP reads its environment once

from mnist_lit.tta_views import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
