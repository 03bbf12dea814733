"""mnist_lit.evaluate and scripts/evaluate.py: metrics, pictures, TensorBoard, curves, errors."""

import json

import pytest
import torch
from helpers import previous_version_checkpoint

from mnist_lit.evaluate import compute_metrics, main, read_scalars


def test_compute_metrics_counts_and_confusion():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 2, 0])
    log_probs = torch.nn.functional.one_hot(predicted, 10).float().add(1e-3).log()
    metrics = compute_metrics(log_probs, labels, tuple("0123456789"))
    assert (metrics["count"], metrics["correct"]) == (6, 4)
    assert metrics["acc"] == pytest.approx(4 / 6)
    assert metrics["per_class"]["2"] == {"count": 3, "correct": 2, "acc": pytest.approx(2 / 3)}
    assert metrics["confusion_matrix"][0][:3] == [1, 1, 0] and metrics["confusion_matrix"][2][:3] == [1, 0, 2]


def test_evaluate_end_to_end(trained_ckpt, shared_data_dir, capsys):
    run_dir = trained_ckpt.parent.parent
    assert main(["--ckpt", str(trained_ckpt), "--data-dir", str(shared_data_dir), "--split", "val"]) == 0
    out = run_dir / "evaluation" / "last-val"
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png",
        "curves.png",
        "metrics.json",
        "misclassified.png",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    # The run's own validation result, recomputed from the checkpoint outside Lightning: the same figure.
    results = json.loads((run_dir / "results.json").read_text())
    assert (metrics["correct"], metrics["count"]) == (results["correct"], results["count"]) == (metrics["correct"], 32)
    assert sum(map(sum, metrics["confusion_matrix"])) == 32
    assert sum(row["count"] for row in metrics["per_class"].values()) == 32
    printed = capsys.readouterr().out
    assert f"{'all':>12s} {32:6d} {metrics['correct']:7d}" in printed
    step = torch.load(trained_ckpt, weights_only=True)["global_step"]
    assert set(read_scalars([run_dir])["acc/eval_val"]) == {step}  # in the run's TensorBoard, at the ckpt's step

    assert main(["--ckpt", str(trained_ckpt), "--data-dir", str(shared_data_dir)]) == 0
    test_metrics = json.loads((run_dir / "evaluation" / "last-test" / "metrics.json").read_text())
    assert test_metrics["count"] == 120 and test_metrics["split"] == "test"
    assert main(["--ckpt", str(trained_ckpt), "--data-dir", str(shared_data_dir)]) == 0
    assert (run_dir / "evaluation" / "last-test-2" / "metrics.json").is_file()  # the first one is kept


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "fashion_mnist"], "was trained on mnist, not fashion_mnist"),
        (["--split", "train"], "invalid choice"),
    ],
)
def test_evaluate_errors(trained_ckpt, shared_data_dir, capsys, argv, message):
    assert main(["--ckpt", str(trained_ckpt), "--data-dir", str(shared_data_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_checkpoint_outside_a_run_folder(trained_ckpt, shared_data_dir, tmp_path, capsys):
    """A copied checkpoint: the evaluation goes beside it (never into the folder above), without curves or
    TensorBoard logging, and a second evaluation gets its own folder."""
    loose = tmp_path / "models" / "mnist.ckpt"
    loose.parent.mkdir()
    loose.write_bytes(trained_ckpt.read_bytes())
    for out in ("mnist-test", "mnist-test-2"):
        assert main(["--ckpt", str(loose), "--data-dir", str(shared_data_dir)]) == 0
        written = sorted(p.name for p in (tmp_path / "models" / "evaluation" / out).iterdir())
        assert written == ["confusion_matrix.png", "metrics.json", "misclassified.png"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "evaluation" not in p.parts) == ["mnist.ckpt"]
    assert f"mnist test, {loose}" in capsys.readouterr().out


def test_test_split_needs_only_the_test_files(trained_ckpt, data_dir, tmp_path):
    labels = data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-10])  # training files are not read for --split test
    assert main(["--ckpt", str(trained_ckpt), "--data-dir", str(data_dir), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["count"] == 120


def test_val_split_of_a_full_stage_model_is_refused(trained_ckpt, shared_data_dir, tmp_path, capsys):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    ckpt["datamodule_hyper_parameters"]["stage"] = "full"  # a full-stage model has trained on the validation images
    full = tmp_path / "full.ckpt"
    torch.save(ckpt, full)
    argv = ["--ckpt", str(full), "--data-dir", str(shared_data_dir), "--split", "val", "--out", str(tmp_path / "ev")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is a full-stage model" in err and "use --split test" in err and err.count("\n") == 1
    assert not (tmp_path / "ev").exists()


def test_evaluate_missing_checkpoint(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: a folder, not a checkpoint file\n"


def test_fashion_mnist_end_to_end_with_its_class_names(tmp_path, capsys):
    from helpers import write_mnist

    from mnist_lit.train import main as train_main

    data_dir = write_mnist(tmp_path / "data", dataset="fashion_mnist")
    argv = ["--dataset", "fashion_mnist", "--data-dir", data_dir, "--save-dir", tmp_path / "runs", "--epochs", "1"]
    assert train_main([str(a) for a in [*argv, "--quiet"]]) == 0
    ckpt = tmp_path / "runs" / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["--ckpt", str(ckpt), "--data-dir", str(data_dir), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["dataset"] == "fashion_mnist" and "Ankle boot" in metrics["per_class"]
    assert "Ankle boot" in capsys.readouterr().out
    assert main(["--ckpt", str(ckpt), "--data-dir", str(data_dir), "--dataset", "mnist"]) == 2  # not silently


def checkpoint_of_version_0_1(ckpt: dict) -> dict:
    """The layout mnist_lit 0.1 wrote (before configs): run settings among the model's hyperparameters, float64
    pixel statistics among the weights, no config."""
    old = {key: value for key, value in previous_version_checkpoint(ckpt).items() if key != "config"}
    data = ckpt["datamodule_hyper_parameters"]
    old["hyper_parameters"] = {
        **old["hyper_parameters"],
        **{key: data[key] for key in ("stage", "dataset", "seed")},
        **{"recipe": "seed", "epochs": 3, "precision": "32-true", "ema_decay": 0.0},
    }
    old["state_dict"]["pixel_stats"] = old["state_dict"]["pixel_stats"].double()
    return old


def test_checkpoints_of_version_0_1_still_evaluate_and_train_py_says_why_it_cannot_go_on(
    trained_ckpt, shared_data_dir, tmp_path, capsys
):
    from mnist_lit.train import main as train_main

    old = tmp_path / "old.ckpt"
    torch.save(checkpoint_of_version_0_1(torch.load(trained_ckpt, weights_only=True)), old)
    new_eval, old_eval = tmp_path / "new", tmp_path / "old"
    assert main(["--ckpt", str(trained_ckpt), "--data-dir", str(shared_data_dir), "--out", str(new_eval)]) == 0
    assert main(["--ckpt", str(old), "--data-dir", str(shared_data_dir), "--out", str(old_eval)]) == 0
    figures = [json.loads((d / "metrics.json").read_text()) for d in (new_eval, old_eval)]
    assert figures[0]["confusion_matrix"] == figures[1]["confusion_matrix"] and figures[1]["count"] == 120
    capsys.readouterr()
    argv = ["--stage", "full", "--ckpt", str(old), "--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path)]
    assert train_main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "written by mnist_lit 0.1, before configs" in err and err.count("\n") == 1
    assert not (tmp_path / "full").exists()


def test_checkpoints_of_the_previous_version_evaluate_alike_and_the_full_stage_goes_on_from_them(
    trained_ckpt, shared_data_dir, tmp_path
):
    """The version before models took raw pixels kept the statistics as a buffer among the weights."""
    from mnist_lit.train import main as train_main

    old = tmp_path / "old.ckpt"
    torch.save(previous_version_checkpoint(torch.load(trained_ckpt, weights_only=True)), old)
    for ckpt, out in ((trained_ckpt, "new"), (old, "old")):
        assert main(["--ckpt", str(ckpt), "--data-dir", str(shared_data_dir), "--out", str(tmp_path / out)]) == 0
    figures = [json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("new", "old")]
    assert figures[0]["confusion_matrix"] == figures[1]["confusion_matrix"] and figures[1]["count"] == 120
    argv = ["--stage", "full", "--ckpt", str(old), "--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path)]
    assert train_main([*argv, "--epochs", "4", "--quiet"]) == 0
    assert json.loads((tmp_path / "full" / "version_0" / "results.json").read_text())["count"] == 120


def test_val_split_is_the_runs_own_fold_or_fraction(shared_data_dir, tmp_path):
    """--split val of a run that validated on fold 2 of 4 (seed 2), or on a 25 % split (seed 1): exactly those
    images, as the run itself counted them and as classifying those images by hand counts them."""
    from mnist_lit.data import split_indices
    from mnist_lit.idx import load_split, raw_dir
    from mnist_lit.inference import load_trained
    from mnist_lit.train import main as train_main

    images, labels = load_split(raw_dir(shared_data_dir), "train")
    common = ["--data-dir", shared_data_dir, "--epochs", "1", "--lr", "0.05", "--quiet"]
    for split in ({"folds": 4, "fold": 2, "seed": 2}, {"val_fraction": 0.25, "seed": 1}):
        save_dir = tmp_path / "-".join(map(str, split.values()))
        settings = [part for key, value in split.items() for part in (f"--data.{key}", value) if key != "seed"]
        assert train_main([str(a) for a in [*common, *settings, "--seed", split["seed"], "--save-dir", save_dir]]) == 0
        run_dir = save_dir / "initial" / "version_0"
        ckpt, out = run_dir / "checkpoints" / "last.ckpt", save_dir / "ev"
        assert main(["--ckpt", str(ckpt), "--data-dir", str(shared_data_dir), "--split", "val", "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        results = json.loads((run_dir / "results.json").read_text())
        val = split_indices(
            len(labels), split.get("val_fraction", 0.1), split["seed"], split.get("folds"), split.get("fold", 0)
        )[1]
        with torch.no_grad():
            predicted = load_trained(ckpt).module(images[val]).argmax(1)
        confusion = torch.zeros(10, 10, dtype=torch.long).index_put_((labels[val], predicted), torch.tensor(1), True)
        assert metrics["confusion_matrix"] == confusion.tolist(), split
        correct = int((predicted == labels[val]).sum())
        assert (metrics["correct"], metrics["count"]) == (results["correct"], results["count"]) == (correct, 80)
        # results.json: the run's own final evaluation of those images, as evaluate.py recomputes it
        assert results["acc"] == pytest.approx(metrics["acc"]) and results["loss"] == pytest.approx(metrics["loss"])
