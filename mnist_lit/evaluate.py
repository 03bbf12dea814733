"""Where does a trained model fail? Accuracy, per-class accuracy, confusion matrix, worst mistakes, curves.

``python scripts/evaluate.py --ckpt PATH [PATH ...] [--tta N] [--split test|val] [--data-dir DIR] [--out DIR]``
(or ``--members FILE``, a list of checkpoints: ``mnist_lit.members``) writes metrics.json, confusion_matrix.png,
misclassified.png and curves.png, logs the numbers and pictures to the checkpoint's run in TensorBoard (when it
sits in one), and prints a table. Several checkpoints are evaluated each alone and as one ensemble (the mean of
their probabilities); the pictures are the ensemble's.
"""

import bisect
import json
from pathlib import Path

import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure  # figures without pyplot: no GUI backend, nothing global to close
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnist_lit.checkpoint_file import run_settings
from mnist_lit.data import MNISTDataModule, split_seed
from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.idx import DATA_DIR, DATASETS, NUM_CLASSES, ensure_raw_files
from mnist_lit.inference import Trained, classify, load_members, mean_probability, predictor
from mnist_lit.loggers import tensorboard_tag
from mnist_lit.members import add_checkpoint_arguments, checkpoints_of
from mnist_lit.threads import adapt_threads

SPLIT_SETTINGS = ("val_fraction", "split_seed", "folds", "fold")  # which images an initial stage validates on


def split_of(ckpt: dict) -> dict:
    """A checkpoint's SPLIT_SETTINGS (those it records; the split seed is its split_seed, else its seed)."""
    settings = run_settings(ckpt)
    found = {key: settings.get(key) for key in SPLIT_SETTINGS}
    return {**found, "split_seed": split_seed(settings)}


def split_data(members: list[Trained], data_dir, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of ``split``; 'val' is the checkpoints' own initial-stage validation split, which
    must be the same for all of them (the same split seed, val_fraction and fold; their seeds may differ)."""
    first = members[0]
    if split == "val":
        for member in members:
            if member.stage == "full":
                raise UserError(
                    f"{member.path} is a full-stage model, trained on all training images: its 'val' split is "
                    "training data; use --split test"
                )
        splits = {tuple(split_of(member.ckpt).values()) for member in members}
        if len(splits) > 1:
            raise UserError(
                "the checkpoints were validated on different splits (their split seed, val_fraction or fold differ): "
                "one member's validation images are another's training images; evaluate them one by one, or on "
                "--split test, or train them with one --data.split_seed"
            )
    ensure_raw_files(data_dir, first.dataset)
    split_settings = {key: value for key, value in split_of(first.ckpt).items() if value is not None}
    datamodule = MNISTDataModule(str(data_dir), first.dataset, "initial", **split_settings)
    if split == "test":
        return datamodule.test_set  # reads the test files only
    datamodule.setup()
    return datamodule.val_set


def member_log_probs(members: list[Trained], images: torch.Tensor, tta: int = 1) -> list[torch.Tensor]:
    """Each member's log-probabilities of ``images`` (with ``tta`` views)."""
    return [classify(predictor([member], tta), images) for member in members]


def compute_metrics(log_probs: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict:
    """Accuracy, mean loss, per-class accuracy and the confusion matrix (rows: true, columns: predicted)."""
    per_class = MulticlassAccuracy(NUM_CLASSES, average=None)(log_probs, labels)
    confusion = MulticlassConfusionMatrix(NUM_CLASSES)(log_probs, labels)
    counts = confusion.sum(dim=1)
    correct = int(confusion.diag().sum())
    return {
        "count": len(labels),
        "correct": correct,
        "acc": correct / len(labels),
        "loss": torch.nn.functional.nll_loss(log_probs, labels).item(),
        "per_class": {
            name: {"count": int(counts[i]), "correct": int(confusion[i, i]), "acc": per_class[i].item()}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion.tolist(),
    }


def confusion_figure(metrics: dict, classes: tuple[str, ...], title: str) -> Figure:
    matrix = torch.tensor(metrics["confusion_matrix"])
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    # Log colour scale: the diagonal holds ~1000 per cell, the mistakes a handful.
    image = ax.imshow(matrix.clamp(min=0.5).numpy(), cmap="Blues", norm=LogNorm())
    for row in range(len(classes)):
        for col in range(len(classes)):
            if matrix[row, col]:
                color = "white" if row == col else "black"
                ax.text(col, row, int(matrix[row, col]), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def misclassified_figure(images, labels, log_probs, classes, title: str, limit: int = 36) -> Figure:
    """A grid of the most confidently wrong images: true / predicted label and the predicted probability."""
    probs, predicted = log_probs.exp().max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    worst = wrong[probs[wrong].argsort(descending=True)][:limit].tolist()
    cols = 6
    rows = max(1, -(-len(worst) // cols))
    fig = Figure(figsize=(cols * 1.6, rows * 1.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(images[i].numpy(), cmap="gray_r")
        ax.set_title(f"true {classes[labels[i]]}\npred {classes[predicted[i]]} {probs[i]:.2f}", fontsize=8)
    fig.suptitle(f"{title}: {len(wrong)} wrong, most confident first" if worst else f"{title}: none wrong")
    fig.tight_layout()
    return fig


def run_chain(run_dir: Path) -> list[Path]:
    """The run and the runs it started from (via results.json's ckpt_from), oldest first."""
    chain = [run_dir]
    while len(chain) < 20 and (chain[-1] / "results.json").is_file():
        origin = json.loads((chain[-1] / "results.json").read_text()).get("ckpt_from")
        if not origin or not Path(origin).is_file():
            break
        chain.append(Path(origin).resolve().parent.parent)
    return chain[::-1]


def read_scalars(run_dirs: list[Path]) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the runs' TensorBoard events; a later run wins where steps overlap. Tags of runs
    written before the metric-first layout (``val/acc``) are read under today's names (``acc/val``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for run_dir in run_dirs:
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tensorboard_tag(tag):
                scalars.setdefault(tensorboard_tag(tag), {}).update({e.step: e.value for e in events.Scalars(tag)})
    return scalars


def curves_figure(run_dirs: list[Path]) -> Figure | None:
    """Loss, accuracy and learning rate per (1-based) epoch, all stages on one axis; None before the first
    epoch's end was logged."""
    scalars = read_scalars(run_dirs)
    if "loss/train" not in scalars:
        return None
    # Each training epoch ends at the step where loss/train is logged: the n-th such step of the run and the runs
    # it started from ends epoch n, and the first epoch end at or after a step names that step's epoch (lr is
    # logged at its epoch's start).
    end_steps = sorted(scalars["loss/train"])

    def epoch_of(step: int) -> int:
        return min(bisect.bisect_left(end_steps, step), len(end_steps) - 1) + 1

    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    panels = [("loss", axes[0], "linear"), ("acc", axes[1], "linear"), ("lr", axes[2], "log")]
    for name, ax, scale in panels:
        tags = [tag for tag in (f"{name}/train", f"{name}/val", f"{name}/test", name) if tag in scalars]
        for tag in tags:
            points = sorted({epoch_of(step): value for step, value in scalars[tag].items()}.items())
            ax.plot(*zip(*points), marker=".", label=tag)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        if tags:
            ax.legend(fontsize=8)
    lowest_acc = min(v for split in ("train", "val", "test") for v in scalars.get(f"acc/{split}", {}).values())
    axes[1].set_ylim(max(0.0, lowest_acc - 0.01), 1)
    fig.suptitle(" + ".join(f"{p.parent.name}/{p.name}" for p in run_dirs))
    fig.tight_layout()
    return fig


def new_out_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3`` ...: an earlier evaluation is never overwritten."""
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def format_table(metrics: dict, title: str) -> str:
    lines = [title]
    if len(metrics["members"]) > 1:
        lines.append(f"{'member':>12s} {'count':>6s} {'correct':>7s} {'acc %':>7s}  checkpoint")
        for i, member in enumerate(metrics["members"], 1):
            row = f"{i:12d} {metrics['count']:6d} {member['correct']:7d} {100 * member['acc']:7.2f}"
            lines.append(f"{row}  {member['ckpt']}")
        lines.append(f"{'ensemble':>12s} {metrics['count']:6d} {metrics['correct']:7d} {100 * metrics['acc']:7.2f}")
        lines.append("the ensemble's classes:")
    lines.append(f"{'class':>12s} {'count':>6s} {'correct':>7s} {'acc %':>7s}")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:>12s} {row['count']:6d} {row['correct']:7d} {100 * row['acc']:7.2f}")
    lines.append(f"{'all':>12s} {metrics['count']:6d} {metrics['correct']:7d} {100 * metrics['acc']:7.2f}")
    lines.append(f"mean loss {metrics['loss']:.4f}")
    return "\n".join(lines)


def log_to_run(trained: Trained, split: str, metrics: dict, figures: dict[str, Figure]) -> None:
    """Add the evaluation to the checkpoint's run in TensorBoard, at the checkpoint's step."""
    from torch.utils.tensorboard import SummaryWriter

    step = trained.ckpt.get("global_step", 0)
    with SummaryWriter(str(trained.run_dir)) as writer:  # adds an events file; earlier ones stay as they are
        # beside the run's curves (acc/test ...); the rest in a group that sorts after them (tensorboard_tag)
        writer.add_scalar(f"acc/eval_{split}", metrics["acc"], step)
        writer.add_scalar(f"loss/eval_{split}", metrics["loss"], step)
        for name, row in metrics["per_class"].items():
            writer.add_scalar(f"{split}_eval/acc_per_class/{name}", row["acc"], step)
        for name, fig in figures.items():
            if name != "curves":
                writer.add_figure(f"{split}_eval/{name}", fig, step)


def evaluate(ckpts: list[str], split: str, data_dir: str, out: str | None, dataset: str | None, tta: int = 1) -> Path:
    """Evaluate one checkpoint, or several each alone and as one ensemble; returns the output folder."""
    members = load_members(ckpts, dataset)
    first, single = members[0], len(members) == 1
    images, labels = split_data(members, data_dir, split)
    each = member_log_probs(members, images, tta)
    log_probs = each[0] if single else mean_probability(each)
    metrics = {"dataset": first.dataset, "split": split, "tta": tta}
    metrics.update(compute_metrics(log_probs, labels, first.classes))
    metrics["members"] = [
        {"ckpt": str(member.path), "acc": correct / len(labels), "correct": correct}
        for member, correct in ((m, int((lp.argmax(1) == labels).sum())) for m, lp in zip(members, each))
    ]
    # A single checkpoint in a run folder: its evaluation goes into the run (curves, TensorBoard); anything else
    # (an ensemble, a loose checkpoint) beside it or in the current folder.
    run = first.run_dir if single else None
    views = f", TTA {tta} views" if tta > 1 else ""
    if single:
        where = f"{run.parent.name}/{run.name}/{first.path.name}" if run else str(first.path)
    else:
        where = f"ensemble of {len(members)}"
    title = f"{first.dataset} {split}, {where}{views}"
    figures = {
        "confusion_matrix": confusion_figure(metrics, first.classes, title),
        "misclassified": misclassified_figure(images, labels, log_probs, first.classes, title),
    }
    curves = curves_figure(run_chain(run)) if run else None
    if curves:
        figures["curves"] = curves
    name = f"{first.path.stem if single else 'ensemble'}-{split}" + (f"-tta{tta}" if tta > 1 else "")
    home = run or (first.path.resolve().parent if single else Path.cwd())
    out_dir = new_out_dir(Path(out) if out else home / "evaluation" / name)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for name, fig in figures.items():
        fig.savefig(out_dir / f"{name}.png", dpi=110)
    if run:
        log_to_run(first, split, metrics, figures)
    print(format_table(metrics, title))
    print(f"wrote {', '.join(sorted(p.name for p in out_dir.iterdir()))} to {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    adapt_threads()  # the first measurement of the load starts: by the first batch it is known
    parser = ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    add_checkpoint_arguments(
        parser,
        "checkpoint to evaluate; several: each alone and their ensemble (mean of the probabilities)",
    )
    parser.add_argument("--split", choices=["test", "val"], default="test", help="test set, or the run's val split")
    parser.add_argument(
        "--tta",
        type=int,
        default=1,
        metavar="N",
        help="test-time augmentation: average over the first N of a fixed set of small shifts, rotations and "
        "zooms, chosen on the validation split (default 1: off)",
    )
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder that holds the dataset's raw/ files")
    parser.add_argument("--dataset", choices=list(DATASETS), help="must match the checkpoint's (default: its own)")
    parser.add_argument(
        "--out",
        help="output folder (default: <run>/evaluation/<ckpt>-<split>, beside a checkpoint kept elsewhere, "
        "or ./evaluation/ensemble-<split> for several)",
    )

    def body():
        args = parser.parse_args(argv)
        evaluate(checkpoints_of(args.ckpt, args.members), args.split, args.data_dir, args.out, args.dataset, args.tta)

    return exit_code(body)
