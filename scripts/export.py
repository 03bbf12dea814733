"""Export: `python scripts/export.py --ckpt last.ckpt --format onnx|torchscript --out model.onnx [--force]`."""

import sys

from mnist_lit.threads import share_the_cpu

share_the_cpu()  # before torch starts: OpenMP reads its environment once

from mnist_lit.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
