"""Choose --tta N on validation: `python scripts/tta_views.py --ckpt PATH [PATH ...] [--data-dir DIR]`."""

import sys

from mnist_lit.tta_views import main

if __name__ == "__main__":
    sys.exit(main())
