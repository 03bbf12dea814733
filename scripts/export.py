"""Export: `python scripts/export.py --ckpt last.ckpt --format onnx|torchscript --out model.onnx [--force]`."""

import sys

from mnist_lit.export import main

if __name__ == "__main__":
    sys.exit(main())
