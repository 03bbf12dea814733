"""Classify your own images with a trained checkpoint, after preparing them the way MNIST's digits were made."""

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.idx import DATASETS, IMAGE_SIZE
from mnist_lit.inference import classify, load_members, predictor
from mnist_lit.members import add_checkpoint_arguments, checkpoints_of
from mnist_lit.threads import adapt_threads

DIGIT_BOX = 20  # MNIST fitted each digit into 20x20, keeping its aspect ratio, then centred it in 28x28
CANVAS_CENTRE = IMAGE_SIZE / 2  # where MNIST's centres of mass lie: (14.0, 14.0) on average over its test set
INK_THRESHOLD = 25  # of 255, after the background is levelled to 0: fainter pixels are paper, not digit
HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
CSV_COLUMNS = ("file", "predicted", "probability", "top3")


def grayscale(image: Image.Image) -> torch.Tensor:
    """Float pixels 0..255 (H x W) of an image of any mode; transparent parts count as white paper."""
    if image.mode in HIGH_DEPTH_MODES:  # 16-bit or float: stretch its own range, PIL's convert('L') would clip
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        low, high = pixels.min(), pixels.max()
        return (pixels - low) * (255 / (high - low)) if high > low else torch.zeros_like(pixels)
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32).copy())


def to_mnist(image: Image.Image) -> torch.Tensor:
    """An image of any size and mode as an MNIST digit: uint8, 28 x 28, white on black, 20 px box, centred by mass."""
    digit = crop_to_ink(white_on_black(grayscale(image)))
    if digit is None:  # a blank image
        return torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    return centre_by_mass(fit_box(digit, DIGIT_BOX))


def white_on_black(pixels: torch.Tensor) -> torch.Tensor:
    """Light ink on a background of 0, the brightest ink at 255 (all 0 if there is no ink)."""
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = border.median()
    if background > 127:  # dark ink on light paper
        pixels, background = 255 - pixels, 255 - background
    # Photos and scans have grey paper and grey ink; MNIST has a black background and saturated strokes.
    brightest = pixels.max()
    if brightest <= background:
        return torch.zeros_like(pixels)
    return ((pixels - background) * (255 / (brightest - background))).clamp(0, 255)


def crop_to_ink(pixels: torch.Tensor) -> torch.Tensor | None:
    """The bounding box of the pixels above INK_THRESHOLD, or None if there are none."""
    ink = pixels > INK_THRESHOLD
    rows, cols = ink.any(dim=1).nonzero().flatten(), ink.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return None
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fit_box(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Scale (antialiased) so the longer side is ``size``, keeping the aspect ratio; the shorter side is >= 1."""
    height, width = pixels.shape
    scale = size / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL wants (width, height)
    resized = Image.fromarray(pixels.numpy()).resize(new_size, Image.Resampling.LANCZOS)  # float32: mode F
    return torch.from_numpy(np.asarray(resized).copy()).clamp(0, 255)  # Lanczos overshoots a little at edges


def centre_by_mass(pixels: torch.Tensor) -> torch.Tensor:
    """Paste into a black 28 x 28 canvas with the centre of mass at the canvas centre (shifted back if it would
    stick out), as uint8."""
    height, width = pixels.shape
    mass = pixels.sum()
    centre_row = (pixels.sum(dim=1) * torch.arange(height)).sum() / mass
    centre_col = (pixels.sum(dim=0) * torch.arange(width)).sum() / mass
    top = min(max(round(float(CANVAS_CENTRE - centre_row)), 0), IMAGE_SIZE - height)
    left = min(max(round(float(CANVAS_CENTRE - centre_col)), 0), IMAGE_SIZE - width)
    canvas = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    canvas[top : top + height, left : left + width] = pixels
    return canvas.round().to(torch.uint8)


@dataclass
class Prediction:
    """One image's result: the most likely class, its probability, and the three most likely classes."""

    file: str
    predicted: str
    probability: float
    top3: list[tuple[str, float]]

    def csv_row(self) -> dict[str, str]:
        top3 = "; ".join(f"{name}:{prob:.4f}" for name, prob in self.top3)
        return {"file": self.file, "predicted": self.predicted, "probability": f"{self.probability:.4f}", "top3": top3}


def image_files(paths) -> list[Path]:
    """The files named, plus the image files directly inside the folders named (sorted; not recursive)."""
    image_suffixes = set(Image.registered_extensions())
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in image_suffixes)
        else:  # also a missing path: it is reported as unreadable with the others
            files.append(path)
    return files


def read_image(path: Path) -> Image.Image:
    """Open and decode an image file, upright (phones store the rotation in EXIF); UserError if it cannot."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image)  # a decoded copy (or the loaded image), usable after closing
    except UnidentifiedImageError:
        reason = "unknown format"
    except Image.DecompressionBombError as err:
        reason = str(err)
    except (OSError, SyntaxError) as err:  # PIL raises SyntaxError for some corrupt files
        reason = getattr(err, "strerror", None) or str(err)
    raise UserError(f"{path}: not a readable image ({reason})")


def predict_files(model, classes: tuple[str, ...], paths) -> tuple[list[Prediction], list[str]]:
    """Predictions of ``model`` (pixels -> log-probabilities) for the readable images among ``paths`` (files or
    folders), and one message per unreadable file."""
    files, digits, errors = [], [], []
    for path in image_files(paths):
        try:
            digits.append(to_mnist(read_image(path)))
        except UserError as err:
            errors.append(str(err))
            continue
        files.append(path)
    if not digits:
        return [], errors
    log_probs = classify(model, torch.stack(digits))
    top_probs, top_labels = log_probs.exp().topk(3, dim=1)
    predictions = []
    for path, probs, labels in zip(files, top_probs.tolist(), top_labels.tolist()):
        top3 = [(classes[label], prob) for label, prob in zip(labels, probs)]
        predictions.append(Prediction(str(path), top3[0][0], top3[0][1], top3))
    return predictions, errors


def format_table(predictions: list[Prediction]) -> str:
    """A plain-text table of the predictions, one line each, columns aligned."""
    rows = [CSV_COLUMNS, *(tuple(p.csv_row().values()) for p in predictions)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(CSV_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def write_csv(predictions: list[Prediction], out: Path) -> None:
    try:
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(p.csv_row() for p in predictions)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="predict.py",
        description="Classify image files (PNG, JPEG, anything PIL reads; any size, colour, dark-on-light or "
        "light-on-dark) with a trained checkpoint. Each image is prepared as MNIST's digits were: grayscale, "
        "white on black, cropped to the digit, scaled into 20x20, centred by mass in 28x28.",
    )
    # One path per --ckpt (given again for an ensemble), so that the image paths can follow it.
    add_checkpoint_arguments(
        p,
        "the checkpoint to use, e.g. a last.ckpt; given several times (--ckpt A --ckpt B): their ensemble, "
        "the mean of their probabilities",
        nargs=None,
    )
    p.add_argument(
        "--tta",
        type=int,
        default=1,
        metavar="N",
        help="test-time augmentation: average over the first N of evaluate.py's views (default 1: off)",
    )
    p.add_argument(
        "paths", nargs="+", metavar="FILE_OR_FOLDER", help="images, or folders: their image files (not subfolders)"
    )
    p.add_argument("--out", default="preds.csv", type=Path, help="CSV to write (default preds.csv)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--dataset", choices=list(DATASETS), help="check the checkpoint was trained on this dataset")
    return p


def predict(args: argparse.Namespace) -> list[str]:
    """Predict, print the table, write the CSV; returns the messages of the unreadable files."""
    if args.out.exists() and not args.force:  # checked first: never after the work is done
        raise UserError(f"{args.out} exists; pass --force to replace it, or another --out")
    files = image_files(args.paths)
    if not files:
        raise UserError(f"no image files found in {', '.join(args.paths)}")
    members = load_members(checkpoints_of(args.ckpt, args.members), args.dataset)
    predictions, errors = predict_files(predictor(members, args.tta), members[0].classes, files)
    for message in errors:
        print(message, file=sys.stderr)
    if not predictions:
        raise UserError(f"none of the {len(errors)} files is a readable image")
    print(format_table(predictions))
    write_csv(predictions, args.out)
    print(f"{len(predictions)} predictions written to {args.out}")
    return errors


def main(argv: list[str] | None = None) -> int:
    """The command line of scripts/predict.py: 2 if any file was unreadable or on an error, else 0."""
    adapt_threads()  # the first measurement of the load starts: by the first batch it is known
    return exit_code(lambda: 2 if predict(build_parser().parse_args(argv)) else 0)
