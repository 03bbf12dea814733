"""scripts/tta_views.py (mnist_lit.tta_views): the counts of right validation images with the first N test-time
views, per checkpoint on its own validation split, checked against a hand computation; the chosen N; errors."""

import json
from pathlib import Path

import pytest
import torch

from mnist_lit import tta_views
from mnist_lit.augment import TTA_VIEWS, tta_view
from mnist_lit.data import MNISTDataModule
from mnist_lit.inference import load_trained
from mnist_lit.train import main as train


@pytest.fixture(scope="module")
def seed1_ckpt(shared_data_dir, tmp_path_factory) -> Path:
    """A second initial-stage checkpoint, of another seed: another validation split than ``trained_ckpt``'s."""
    save_dir = tmp_path_factory.mktemp("seed1")
    argv = ["--data-dir", shared_data_dir, "--save-dir", save_dir, "--epochs", "2", "--seed", "1", "--quiet"]
    assert train([str(a) for a in argv]) == 0
    return save_dir / "initial" / "version_0" / "checkpoints" / "last.ckpt"


def counts_by_hand(ckpt: Path, data_dir: Path, seed: int) -> list[int]:
    """Right validation images with the first N views, N = 1 .. 9: the split rebuilt from the seed the run was given
    (default val_fraction), each view's softmax averaged, as the README's model is used."""
    datamodule = MNISTDataModule(str(data_dir), seed=seed)
    datamodule.setup()
    images, labels = datamodule.val_set
    model = load_trained(ckpt).module
    with torch.no_grad():
        probs = [model(tta_view(images, view)).softmax(1) for view in TTA_VIEWS]
    return [int((torch.stack(probs[:n]).mean(0).argmax(1) == labels).sum()) for n in range(1, len(TTA_VIEWS) + 1)]


def test_counts_are_those_computed_by_hand_each_on_its_own_split(trained_ckpt, seed1_ckpt, shared_data_dir, capsys):
    argv = ["--ckpt", str(trained_ckpt), str(seed1_ckpt), "--data-dir", str(shared_data_dir)]
    assert tta_views.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    by_hand = [counts_by_hand(trained_ckpt, shared_data_dir, 0), counts_by_hand(seed1_ckpt, shared_data_dir, 1)]
    total = [a + b for a, b in zip(*by_hand, strict=True)]
    assert lines[0].split() == ["views", "N", *map(str, range(1, len(TTA_VIEWS) + 1))]
    # 320 training images: 32 validation images per run (10 %)
    for line, ckpt, counts in zip(lines[1:3], [trained_ckpt, seed1_ckpt], by_hand, strict=True):
        assert line.split() == [str(ckpt), "(of", "32)", *map(str, counts)]
    assert lines[3].split() == ["all", "(of", "64)", *map(str, total)]
    chosen = total.index(max(total)) + 1
    best = f"N = {chosen} ({max(total)} of 64; N = 1, no augmentation: {total[0]})"
    assert lines[4] == f"most right on validation: {best}"
    assert len(lines) == 5
    # N = 1 is the model itself on the run's own validation images: what the run reported at its end.
    for ckpt, counts in zip([trained_ckpt, seed1_ckpt], by_hand, strict=True):
        assert counts[0] == json.loads((ckpt.parent.parent / "results.json").read_text())["correct"]


def test_the_fewest_views_win_a_tie():
    assert tta_views.best_views([5, 7, 6, 7, 7]) == 2
    assert tta_views.best_views([9, 9]) == 1
    assert tta_views.best_views([1, 2, 3]) == 3


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda ckpt, data, tmp: ["--ckpt", str(tmp / "none.ckpt"), "--data-dir", str(data)], "none.ckpt"),
        (lambda ckpt, data, tmp: ["--ckpt", str(ckpt), str(ckpt), "--data-dir", str(data)], "given twice"),
        (lambda ckpt, data, tmp: ["--ckpt", str(ckpt), "--data-dir", str(tmp / "nodata")], "nodata"),
        (lambda ckpt, data, tmp: ["--ckpt", str(ckpt), "--dataset", "kmnist", "--data-dir", str(data)], "not kmnist"),
        (lambda ckpt, data, tmp: ["--data-dir", str(data)], "--ckpt"),
    ],
)
def test_bad_input_is_one_error_line(trained_ckpt, shared_data_dir, tmp_path, capsys, make_argv, message):
    assert tta_views.main(make_argv(trained_ckpt, shared_data_dir, tmp_path)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert captured.out == ""


def test_a_full_stage_checkpoint_is_refused(trained_ckpt, shared_data_dir, tmp_path, capsys):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    ckpt["datamodule_hyper_parameters"]["stage"] = "full"  # it has trained on its validation images
    full = tmp_path / "full.ckpt"
    torch.save(ckpt, full)
    assert tta_views.main(["--ckpt", str(full), "--data-dir", str(shared_data_dir)]) == 2
    assert "full-stage model" in capsys.readouterr().err
