"""How many test-time augmentation views to use, chosen on validation: for each checkpoint, how many of its own
validation images are classified right with the first N views of ``augment.TTA_VIEWS``, N = 1 (off) .. all.

``python scripts/tta_views.py --ckpt PATH [PATH ...] [--data-dir DIR]`` prints a row of counts per checkpoint (each
on its own initial-stage validation split: runs of other seeds validate on other images), their sum, and the N
with the most right in the sum (ties: the fewest views). Give that N to ``evaluate.py --tta N`` or
``predict.py --tta N``. The test files are never read.
"""

from mnist_lit.augment import TTA_VIEWS, tta_view
from mnist_lit.errors import ArgumentParser, exit_code
from mnist_lit.evaluate import split_data
from mnist_lit.idx import DATA_DIR, DATASETS
from mnist_lit.inference import Trained, classify, load_members, mean_probability
from mnist_lit.threads import adapt_threads


def correct_by_views(member: Trained, data_dir) -> tuple[list[int], int]:
    """The number of the checkpoint's own validation images classified right with the first N views, for N = 1 ..
    len(TTA_VIEWS), and the number of images. With N views the prediction is ``Ensemble([model], N)``'s (the
    mean of the views' probabilities); each view is computed once and the means are taken of the first N."""
    images, labels = split_data([member], data_dir, "val")
    model = member.module
    views = [classify(lambda batch, view=view: model(tta_view(batch, view)), images) for view in TTA_VIEWS]
    counts = [int((mean_probability(views[:n]).argmax(1) == labels).sum()) for n in range(1, len(views) + 1)]
    return counts, len(labels)


def best_views(counts: list[int]) -> int:
    """The number of views N (1-based) with the most right; among equals the fewest views."""
    return counts.index(max(counts)) + 1


def count_table(ckpts: list[str], data_dir, dataset: str | None = None) -> tuple[str, int]:
    """The table ``scripts/tta_views.py`` prints, and the chosen number of views."""
    members = load_members(ckpts, dataset)
    rows = [(str(member.path), *correct_by_views(member, data_dir)) for member in members]
    total = [sum(column) for column in zip(*(counts for _, counts, _ in rows), strict=True)]
    images = sum(count for *_, count in rows)
    labels = [f"{name} (of {count})" for name, _, count in rows] + [f"all (of {images})"]
    width = max(len(label) for label in [*labels, "views N"])
    lines = [f"{'views N':<{width}s}" + "".join(f" {n:6d}" for n in range(1, len(total) + 1))]
    for label, counts in zip(labels, [counts for _, counts, _ in rows] + [total], strict=True):
        lines.append(f"{label:<{width}s}" + "".join(f" {c:6d}" for c in counts))
    chosen = best_views(total)
    lines.append(
        f"most right on validation: N = {chosen} ({total[chosen - 1]} of {images}; N = 1, no augmentation: {total[0]})"
    )
    return "\n".join(lines), chosen


def main(argv: list[str] | None = None) -> int:
    adapt_threads()  # the first measurement of the load starts: by the first batch it is known
    parser = ArgumentParser(prog="tta_views.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt",
        required=True,
        nargs="+",
        action="extend",
        metavar="PATH",
        help="initial-stage checkpoint(s); each is counted on its own validation split",
    )
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder that holds the dataset's raw/ files")
    parser.add_argument("--dataset", choices=list(DATASETS), help="must match the checkpoints' (default: their own)")

    def body():
        args = parser.parse_args(argv)
        table, _ = count_table(args.ckpt, args.data_dir, args.dataset)
        print(table)

    return exit_code(body)
