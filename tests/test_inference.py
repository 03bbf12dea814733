"""mnist_lit.inference through its users: a checkpoint's weights must fit its model exactly, for every script that
rebuilds one (evaluate.py, predict.py, export.py, train.py --ckpt)."""

import json

import pytest
import torch
from helpers import digits
from PIL import Image

from mnist_lit import evaluate, export, predict, train
from mnist_lit.errors import UserError
from mnist_lit.inference import load_trained


@pytest.mark.parametrize("layer", ["net.fc2", "net.conv1"])
def test_a_checkpoint_missing_a_layer_is_refused_not_loaded_with_that_layer_random(
    layer, trained_ckpt, shared_data_dir, tmp_path, capsys
):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    for name in ("weight", "bias"):
        del ckpt["state_dict"][f"{layer}.{name}"]
    broken = tmp_path / "broken.ckpt"
    torch.save(ckpt, broken)
    image = tmp_path / "digit.png"
    Image.fromarray(digits(1, seed=0)[0][0].numpy()).save(image)
    data = ["--data-dir", str(shared_data_dir)]
    out = tmp_path / "out"
    uses = {
        "evaluate.py": (evaluate.main, ["--ckpt", str(broken), *data, "--out", str(out)]),
        "predict.py": (predict.main, ["--ckpt", str(broken), str(image), "--out", str(out)]),
        "export.py": (export.main, ["--ckpt", str(broken), "--format", "torchscript", "--out", str(out), *data]),
        "train.py --ckpt": (train.main, ["--ckpt", str(broken), "--epochs", "9", *data, "--save-dir", str(out)]),
        "train.py --stage full": (
            train.main,
            ["--stage", "full", "--ckpt", str(broken), *data, "--save-dir", str(out)],
        ),
    }
    for use, (main, argv) in uses.items():
        assert main([*argv]) == 2, use
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and f"{layer}.weight" in err, (use, err)
        assert not out.exists(), use
    with pytest.raises(UserError, match=f"{layer}.weight"):
        load_trained(broken)


def test_a_checkpoint_is_used_in_eval_mode_its_dropout_off(trained_ckpt, shared_data_dir, tmp_path):
    """The same weights saved with dropout 0.5: evaluate.py and predict.py give exactly what they give without it
    (in training mode half the hidden values would be dropped, at random)."""
    ckpt = torch.load(trained_ckpt, weights_only=True)
    ckpt["hyper_parameters"]["net_options"] = {"dropout": 0.5}  # dropout has no weights: they load as they are
    dropout = tmp_path / "dropout.ckpt"
    torch.save(ckpt, dropout)
    assert not load_trained(dropout).module.training
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(digits(6, seed=4)[0]):
        Image.fromarray(image.numpy()).save(images / f"{i}.png")
    outputs = {}
    for name, path in (("plain", trained_ckpt), ("dropout", dropout)):
        out = tmp_path / name
        assert evaluate.main(["--ckpt", str(path), "--data-dir", str(shared_data_dir), "--out", str(out)]) == 0
        assert predict.main(["--ckpt", str(path), str(images), "--out", str(out / "preds.csv")]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        csv_rows = [row.split(",", 1)[1] for row in (out / "preds.csv").read_text().splitlines()]
        outputs[name] = (metrics["loss"], metrics["confusion_matrix"], csv_rows)
    assert outputs["dropout"] == outputs["plain"]
