"""Get and check the MNIST files: `python scripts/prepare_data.py --data-dir DIR` (downloads what is missing)."""

import sys

from mnist_lit.errors import ArgumentParser, exit_code
from mnist_lit.idx import DATA_DIR, DATASETS, FILES, ensure_raw_files, load_split


def main() -> int:
    parser = ArgumentParser(prog="prepare_data.py", description=__doc__)
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder that holds (or will hold) MNIST/raw/")
    parser.add_argument("--dataset", choices=list(DATASETS), default="mnist")

    def body():
        args = parser.parse_args()
        check(args.data_dir, args.dataset)

    return exit_code(body)


def check(data_dir: str, dataset: str) -> None:
    raw = ensure_raw_files(data_dir, dataset)
    for split in FILES:
        images, labels = load_split(raw, split, dataset)  # full checks: structure, counts, labels, official md5s
        print(f"{split}: {len(labels)} images of {images.shape[1]}x{images.shape[2]} in {raw}, checked")


if __name__ == "__main__":
    sys.exit(main())
