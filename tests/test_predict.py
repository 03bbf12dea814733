"""Predicting on image files: MNIST-style preprocessing of made-up images, and the command line end to end."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import digits, previous_version_checkpoint
from PIL import Image, ImageOps

from mnist_lit.predict import CSV_COLUMNS, main, to_mnist

ROOT = Path(__file__).resolve().parents[1]


def paper(height: int, width: int, strokes, ink: int = 0, background: int = 255) -> Image.Image:
    """A grayscale image of ``background`` with ``ink`` in each (top, bottom, left, right) rectangle of strokes."""
    pixels = np.full((height, width), background, dtype=np.uint8)
    for top, bottom, left, right in strokes:
        pixels[top:bottom, left:right] = ink
    return Image.fromarray(pixels)


def ink_size(digit: torch.Tensor) -> tuple[int, int]:
    """Height and width of the bounding box of the non-zero pixels."""
    ink = digit > 0
    return int(ink.any(dim=1).sum()), int(ink.any(dim=0).sum())


def centre_of_mass(digit: torch.Tensor) -> tuple[float, float]:
    weights = digit.float()
    positions = torch.arange(digit.shape[0], dtype=torch.float32)
    return float((weights.sum(1) * positions).sum() / weights.sum()), float(
        (weights.sum(0) * positions).sum() / weights.sum()
    )


SEVEN = [(10, 16, 10, 50), (16, 70, 40, 48)]  # a crude 7: a bar and a stem, on a 80 x 60 page


def test_dark_digit_on_light_paper_is_inverted():
    digit = to_mnist(paper(80, 60, SEVEN))
    assert digit.shape == (28, 28) and digit.dtype == torch.uint8
    assert digit.max() == 255  # the strokes are white
    assert digit[0].sum() == digit[-1].sum() == digit[:, 0].sum() == digit[:, -1].sum() == 0  # on black
    assert torch.equal(digit, to_mnist(paper(80, 60, SEVEN, ink=255, background=0)))  # as if drawn white on black


def test_grey_ink_on_grey_paper_is_stretched_to_mnists_black_and_white():
    for ink, background in ((120, 200), (90, 60), (0, 255), (250, 5)):
        digit = to_mnist(paper(80, 60, SEVEN, ink=ink, background=background))
        assert digit.max() == 255 and digit[0].sum() == digit[:, 0].sum() == 0, (ink, background)


def test_thin_stroke_keeps_its_aspect_ratio():
    height, width = ink_size(to_mnist(paper(300, 300, [(50, 250, 140, 160)])))  # 200 x 20
    assert height == 20 and width <= 3


def test_off_centre_blobs_are_centred_by_mass_to_the_nearest_pixel():
    """MNIST's centres of mass lie at (14, 14) in pixel coordinates (rows and columns counted from 0): a whole-pixel
    shift puts each digit's within half a pixel of it (+ the uint8 rounding of the scaled strokes); none of these
    digits is so lopsided that it would stick out of the canvas."""
    shapes = [  # Ls and bars at various places: centres of mass neither the image's nor their bounding box's
        [(5, 35, 5, 12), (28, 35, 5, 30)],
        [(60, 90, 70, 76), (60, 66, 40, 76)],
        [(10, 80, 30, 37), (10, 17, 30, 61), (45, 52, 30, 50)],
        [(20, 40, 15, 60), (20, 70, 50, 60)],
        [(33, 41, 8, 90)],
        [(3, 97, 44, 47), (50, 53, 10, 47)],
    ]
    for strokes in shapes:
        digit = to_mnist(paper(100, 100, strokes))
        row, col = centre_of_mass(digit)
        assert abs(row - 14) <= 0.52 and abs(col - 14) <= 0.52, (strokes, row, col)
        assert max(ink_size(digit)) == 20


def test_transparent_background_counts_as_white():
    gray = paper(80, 60, SEVEN)
    rgba = Image.new("RGBA", gray.size, (0, 0, 0, 0))  # transparent black: all black if the alpha were ignored
    rgba.paste((0, 0, 0, 255), mask=ImageOps.invert(gray))  # opaque black strokes
    assert torch.equal(to_mnist(rgba), to_mnist(gray))


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "I", "F", "CMYK"])
def test_large_image_in_any_mode(mode):
    image = paper(200, 300, [(40, 60, 30, 270), (60, 160, 130, 150)]).convert(mode)  # a T, 300 wide
    height, width = ink_size(to_mnist(image))
    assert (height, width) == (10, 20)  # 120 x 240, scaled by 1/12


@pytest.mark.parametrize(
    "image",
    [paper(40, 30, []), paper(40, 30, [], background=0), Image.new("RGBA", (50, 50), (0, 0, 0, 0))],
    ids=["white", "black", "transparent"],
)
def test_blank_image_gives_zeros(image):
    assert torch.equal(to_mnist(image), torch.zeros(28, 28, dtype=torch.uint8))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three fake digits as PNG (one of them dark on light and 4x larger), a fake.png that is text, notes.txt."""
    folder = tmp_path / "images"
    folder.mkdir()
    images, _ = digits(3, seed=5)
    Image.fromarray(images[0].numpy()).save(folder / "a.png")
    Image.fromarray(images[1].numpy()).convert("RGB").save(folder / "b.png")
    Image.fromarray(255 - images[2].numpy()).resize((112, 112)).save(folder / "c_inverted_large.png")
    (folder / "fake.png").write_text("not an image")
    (folder / "notes.txt").write_text("not an image either, but no image suffix: skipped")
    return folder


def test_folder_end_to_end(trained_ckpt, image_folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["--ckpt", str(trained_ckpt), str(image_folder), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"{image_folder / 'fake.png'}: not a readable image (unknown format)"]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [Path(row["file"]).name for row in rows] == ["a.png", "b.png", "c_inverted_large.png"]
    for row in rows:
        top3 = [pair.split(":") for pair in row["top3"].split("; ")]
        probabilities = [float(prob) for _, prob in top3]
        assert len(top3) == 3 and top3[0] == [row["predicted"], row["probability"]]
        assert row["predicted"] in set("0123456789") and 0 < float(row["probability"]) <= 1
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
        assert row["file"] in captured.out
    assert "3 predictions written to" in captured.out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "kmnist"], "was trained on mnist, not kmnist"),
        (["EMPTY"], "no image files found in"),
        (["FAKE"], "none of the 1 files is a readable image"),
    ],
)
def test_errors(trained_ckpt, image_folder, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    places = {"EMPTY": str(tmp_path / "empty"), "FAKE": str(image_folder / "fake.png")}
    argv = ["--ckpt", str(trained_ckpt), *[places.get(arg, arg) for arg in extra], "--out", str(tmp_path / "p.csv")]
    if "--dataset" in extra:
        argv.append(str(image_folder / "a.png"))
    assert main(argv) == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line
    assert not (tmp_path / "p.csv").exists()


def test_existing_csv_is_kept_unless_forced(trained_ckpt, image_folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    out.write_text("precious")
    argv = ["--ckpt", str(trained_ckpt), str(image_folder / "a.png"), "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {out} exists; pass --force to replace it, or another --out\n"
    assert out.read_text() == "precious"
    assert main([*argv, "--force"]) == 0
    assert out.read_text().startswith("file,predicted")


def test_script_missing_checkpoint(image_folder, tmp_path):
    missing = tmp_path / "missing.ckpt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), "--ckpt", str(missing), str(image_folder / "a.png")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: checkpoint not found: {missing}"]


def test_checkpoint_of_the_previous_version_predicts_alike(trained_ckpt, image_folder, tmp_path, capsys):
    """The version before models took raw pixels kept the statistics as a buffer among the weights."""
    old = tmp_path / "old.ckpt"
    torch.save(previous_version_checkpoint(torch.load(trained_ckpt, weights_only=True)), old)
    rows = []
    for ckpt, out in ((trained_ckpt, tmp_path / "new.csv"), (old, tmp_path / "old.csv")):
        files = [str(image_folder / "a.png"), str(image_folder / "b.png")]
        assert main(["--ckpt", str(ckpt), *files, "--out", str(out)]) == 0
        with open(out, newline="") as f:
            rows.append([(row["predicted"], float(row["probability"])) for row in csv.DictReader(f)])
    assert [p for p, _ in rows[0]] == [p for p, _ in rows[1]] and len(rows[1]) == 2
    assert [q for _, q in rows[0]] == pytest.approx([q for _, q in rows[1]], abs=1e-4)
