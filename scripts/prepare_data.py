"""Get and check the MNIST files: `python scripts/prepare_data.py --data-dir DIR` (downloads what is missing)."""

import argparse
import sys

from mnist_lit.data import FILES, ensure_raw_files, load_split
from mnist_lit.errors import UserError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="data", help="folder that holds (or will hold) MNIST/raw/")
    args = parser.parse_args()
    try:
        raw = ensure_raw_files(args.data_dir)
        for split in FILES:
            images, labels = load_split(raw, split)  # full checks: structure, counts, labels, official md5s
            print(f"{split}: {len(labels)} images of {images.shape[1]}x{images.shape[2]} in {raw}, checked")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
