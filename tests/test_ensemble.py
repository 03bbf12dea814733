"""Several checkpoints as one model, and test-time augmentation: evaluate.py, predict.py and export.py with
``--ckpt A B`` and ``--tta N``, checked against averaging the members' probabilities by hand."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mnist_lit import evaluate, export, predict
from mnist_lit.augment import TTA_VIEWS, tta_view
from mnist_lit.idx import load_split, raw_dir
from mnist_lit.inference import load_trained
from mnist_lit.train import main as train


@pytest.fixture(scope="module")
def other_ckpt(shared_data_dir, tmp_path_factory) -> Path:
    """A second member unlike the session's ``trained_ckpt``: another seed (so another validation split) and
    another net (members may differ)."""
    save_dir = tmp_path_factory.mktemp("other")
    argv = ["--data-dir", shared_data_dir, "--save-dir", save_dir, "--epochs", "2", "--seed", "1", "--net", "linear"]
    assert train([str(a) for a in [*argv, "--quiet"]]) == 0
    return save_dir / "initial" / "version_0" / "checkpoints" / "last.ckpt"


def probabilities_by_hand(ckpts, images: torch.Tensor, views: int = 1) -> torch.Tensor:
    """The mean over members (and views) of softmax(logits), each model loaded as the README shows."""
    probs = []
    for ckpt in ckpts:
        model = load_trained(ckpt).module
        with torch.no_grad():
            probs += [model(tta_view(images, view)).softmax(1) for view in TTA_VIEWS[:views]]
    return torch.stack(probs).mean(0)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_ensemble_is_the_mean_of_the_members_probabilities(trained_ckpt, other_ckpt, shared_data_dir, tmp_path, capsys):
    """evaluate.py's ensemble: its loss and confusion matrix are those of the mean of the members' softmax, on
    images where the mean of their log-probabilities (a geometric mean) gives another loss."""
    out = tmp_path / "ensemble"
    argv = ["--ckpt", trained_ckpt, other_ckpt, "--data-dir", shared_data_dir, "--out", out]
    assert evaluate.main([str(a) for a in argv]) == 0
    images, labels = load_split(raw_dir(shared_data_dir), "test")
    by_hand = probabilities_by_hand([trained_ckpt, other_ckpt], images)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["correct"] == int((by_hand.argmax(1) == labels).sum())
    assert (metrics["count"], metrics["acc"]) == (120, metrics["correct"] / 120)
    confusion = torch.zeros(10, 10, dtype=torch.long).index_put_((labels, by_hand.argmax(1)), torch.tensor(1), True)
    assert metrics["confusion_matrix"] == confusion.tolist()
    loss = torch.nn.functional.nll_loss(by_hand.log(), labels).item()
    log_probs = [load_trained(ckpt).module(images).detach() for ckpt in (trained_ckpt, other_ckpt)]
    geometric = torch.stack(log_probs).mean(0)
    for averaged_logs in (geometric, geometric.log_softmax(1)):  # what averaging log-probabilities would report
        assert abs(torch.nn.functional.nll_loss(averaged_logs, labels).item() - loss) > 10 * 1e-5
    assert metrics["loss"] == pytest.approx(loss, abs=1e-5)  # float32 sums: ~1e-8 apart
    for member, ckpt in zip(metrics["members"], [trained_ckpt, other_ckpt], strict=True):
        correct = int((probabilities_by_hand([ckpt], images).argmax(1) == labels).sum())
        assert member == {"ckpt": str(ckpt), "acc": correct / 120, "correct": correct}
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    rows = [line.split() for line in lines[lines.index(next(line for line in lines if "member" in line)) + 1 :]]
    assert [row[:3] for row in rows[:3]] == [
        ["1", "120", str(metrics["members"][0]["correct"])],
        ["2", "120", str(metrics["members"][1]["correct"])],
        ["ensemble", "120", str(metrics["correct"])],
    ]
    # The pictures are the ensemble's; no curves (no one run), nothing written into the members' runs.
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "metrics.json", "misclassified.png"]
    assert not (other_ckpt.parent.parent / "evaluation").exists()


def test_ensemble_default_folder_is_in_the_current_one(
    trained_ckpt, other_ckpt, shared_data_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for out in ("ensemble-test", "ensemble-test-2"):  # an earlier evaluation is never overwritten
        assert evaluate.main(["--ckpt", str(trained_ckpt), str(other_ckpt), "--data-dir", str(shared_data_dir)]) == 0
        assert (tmp_path / "evaluation" / out / "metrics.json").is_file()


def test_tta_averages_the_views_as_by_hand(trained_ckpt, shared_data_dir, tmp_path):
    views = 5
    out = tmp_path / "tta"
    argv = ["--ckpt", trained_ckpt, "--tta", views, "--data-dir", shared_data_dir, "--out", out]
    assert evaluate.main([str(a) for a in argv]) == 0
    images, labels = load_split(raw_dir(shared_data_dir), "test")
    by_hand = probabilities_by_hand([trained_ckpt], images, views)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] == views and metrics["correct"] == int((by_hand.argmax(1) == labels).sum())
    assert torch.allclose(torch.tensor(metrics["loss"]), torch.nn.functional.nll_loss(by_hand.log(), labels), atol=1e-5)


def test_tta_views_move_the_image_and_keep_black_borders():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 10:18, 12:16] = 255
    assert torch.equal(tta_view(image, TTA_VIEWS[0]), image.float().unsqueeze(1))  # the first view: the image
    assert len(set(TTA_VIEWS)) == len(TTA_VIEWS)
    for view in TTA_VIEWS[1:]:
        moved = tta_view(image, view)
        assert moved.shape == (1, 1, 28, 28) and not torch.allclose(moved, image.float().unsqueeze(1))
        assert moved[..., :4, :].abs().max() == 0 and moved[..., -4:, :].abs().max() == 0  # black stays black
        assert 0 <= moved.min() and moved.max() <= 255 + 1e-3
    degrees, dx, dy, zoom = TTA_VIEWS[1]
    if (degrees, zoom) == (0.0, 1.0) and float(dx).is_integer() and float(dy).is_integer():  # a whole-pixel shift
        shifted = image.float().roll((-int(dy), -int(dx)), (-2, -1)).unsqueeze(1)  # the grid samples from x + dx
        torch.testing.assert_close(tta_view(image, TTA_VIEWS[1]), shifted, atol=1e-3, rtol=0)


def test_predict_with_an_ensemble(trained_ckpt, other_ckpt, shared_data_dir, tmp_path):
    images, _ = load_split(raw_dir(shared_data_dir), "test")
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(4):  # already MNIST-shaped digits: to_mnist leaves them nearly as they are
        Image.fromarray(images[i].numpy()).save(folder / f"{i}.png")
    csv_file = tmp_path / "preds.csv"
    argv = ["--ckpt", trained_ckpt, "--ckpt", other_ckpt, "--tta", 3, folder, "--out", csv_file]
    assert predict.main([str(a) for a in argv]) == 0
    rows = csv_file.read_text().splitlines()[1:]
    digits = torch.stack([predict.to_mnist(Image.open(folder / f"{i}.png")) for i in range(4)])
    by_hand = probabilities_by_hand([trained_ckpt, other_ckpt], digits, views=3)
    for row, probs in zip(rows, by_hand, strict=True):
        _, predicted, probability, _ = row.split(",")
        assert (predicted, probability) == (str(int(probs.argmax())), f"{float(probs.max()):.4f}")


@pytest.mark.parametrize("export_format", list(export.FORMATS))
def test_export_of_an_ensemble_is_checked_and_averages_the_members(
    trained_ckpt, other_ckpt, shared_data_dir, tmp_path, capsys, export_format
):
    out = tmp_path / f"ensemble.{export_format}"
    argv = ["--ckpt", trained_ckpt, other_ckpt, "--format", export_format, "--out", out, "--data-dir", shared_data_dir]
    assert export.main([str(a) for a in argv]) == 0
    assert "checked on 120 mnist test images: 0 predictions differ" in capsys.readouterr().out
    contract = json.loads(Path(f"{out}.json").read_text())
    assert contract["checkpoint"] == [str(trained_ckpt.resolve()), str(other_ckpt.resolve())]
    assert contract["net"] == ["lenet", "linear"]
    assert len(contract["input"]["normalisation"]["mean"]) == 2
    images, _ = load_split(raw_dir(shared_data_dir), "test")
    exported = export.FORMATS[export_format][1](out)
    got = exported(images[:7].unsqueeze(1).float())
    by_hand = probabilities_by_hand([trained_ckpt, other_ckpt], images[:7])
    torch.testing.assert_close(got.exp(), by_hand, atol=1e-5, rtol=0)


def rewritten(ckpt: Path, to: Path, **data_settings) -> Path:
    """A copy of ``ckpt`` whose stored data settings say otherwise."""
    content = torch.load(ckpt, weights_only=True)
    content["datamodule_hyper_parameters"].update(data_settings)
    torch.save(content, to)
    return to


def test_members_must_agree_and_count_once(trained_ckpt, other_ckpt, shared_data_dir, tmp_path, capsys):
    fashion = rewritten(trained_ckpt, tmp_path / "fashion.ckpt", dataset="fashion_mnist")
    same_split = rewritten(other_ckpt, tmp_path / "seed0.ckpt", seed=0)
    cases = [
        (evaluate.main, [trained_ckpt, fashion], "trained on different datasets"),
        (export.main, [trained_ckpt, fashion, "--format", "onnx", "--out", tmp_path / "x.onnx"], "different datasets"),
        (evaluate.main, [trained_ckpt, other_ckpt, "--split", "val"], "validated on different splits"),
        (evaluate.main, [trained_ckpt, trained_ckpt], "is given twice"),
        (evaluate.main, [trained_ckpt, "--tta", 0], "--tta must be between 1 (off) and"),
        (evaluate.main, [trained_ckpt, "--tta", len(TTA_VIEWS) + 1], "--tta must be between 1 (off) and"),
    ]
    for main, args, message in cases:
        assert main(["--ckpt", *map(str, args), "--data-dir", str(shared_data_dir)]) == 2
        assert message in error_line(capsys)
    assert not (tmp_path / "x.onnx").exists()
    # Members validated on one split (same seed, fraction and fold) are evaluated on it together.
    out = tmp_path / "val"
    argv = ["--ckpt", trained_ckpt, same_split, "--split", "val", "--data-dir", shared_data_dir, "--out", out]
    assert evaluate.main([str(a) for a in argv]) == 0
    assert json.loads((out / "metrics.json").read_text())["count"] == 32
