"""A net's own options (model.net_options): from the command line and YAML to the net, into the checkpoint as
plain data and back; a resume with dropout draws the same; the full stage may change what keeps the weights."""

import pytest
import torch
import yaml

from mnist_lit.checkpoint_file import load_checkpoint
from mnist_lit.inference import module_from_checkpoint
from mnist_lit.train import main

COMMON = ["--epochs", "2", "--quiet"]


def run(*argv) -> int:
    return main([str(a) for a in argv])


def last_ckpt(save_dir, stage="initial", version=0):
    return save_dir / stage / f"version_{version}" / "checkpoints" / "last.ckpt"


def test_dropout_from_yaml_and_command_line_reaches_the_net_and_the_checkpoint(shared_data_dir, tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  net_options:\n    dropout: 0.3\n")
    assert run("--config", mine, "--print_config") == 0
    from_yaml = yaml.safe_load(capsys.readouterr().out)
    assert run("--model.net_options", "{dropout: 0.3}", "--print_config") == 0
    assert yaml.safe_load(capsys.readouterr().out) == from_yaml
    assert from_yaml["model"]["net_options"] == {"dropout": 0.3}
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--config", mine, *COMMON) == 0
    path = last_ckpt(tmp_path)
    ckpt = load_checkpoint(path)  # weights_only: the options are plain data
    assert ckpt["hyper_parameters"]["net_options"] == {"dropout": 0.3}
    assert yaml.safe_load(ckpt["config"])["model"]["net_options"] == {"dropout": 0.3}
    model = module_from_checkpoint(ckpt, path)  # what evaluate.py, predict.py and export.py rebuild
    assert model.net.dropout == 0.3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["state_dict"].items())


def test_a_bad_net_option_is_one_line_and_no_run(shared_data_dir, tmp_path, capsys):
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--model.net_options", "{drop: 0.3}") == 2
    err = capsys.readouterr().err
    assert err == "error: model.net_options: lenet has no option 'drop'; it accepts: dropout\n"
    assert not (tmp_path / "initial").exists()


def test_a_resumed_dropout_run_has_the_same_weights(shared_data_dir, tmp_path):
    """Lightning's checkpoints keep no RNG state: the dropout draws are seeded by (seed, step) instead."""
    common = ["--data-dir", shared_data_dir, "--model.net_options", "{dropout: 0.5}", "--lr", "0.05", "--quiet"]
    assert run(*common, "--save-dir", tmp_path / "a", "--epochs", "2") == 0
    assert run(*common, "--save-dir", tmp_path / "b", "--epochs", "1") == 0
    assert run(*common, "--save-dir", tmp_path / "b", "--epochs", "2", "--ckpt", "last.ckpt") == 0
    a, b = (
        torch.load(p, weights_only=True)["state_dict"]
        for p in (last_ckpt(tmp_path / "a"), last_ckpt(tmp_path / "b", version=1))
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "options, error",
    [
        ("{width: 4}", None),  # the checkpoint's own
        ("{}", "its weights do not fit the wide architecture"),  # width 64: other weight shapes
        ("{width: 4, dropout: 0.1}", "wide has no option 'dropout'; it accepts: width"),
    ],
)
def test_the_full_stage_may_change_options_that_keep_the_weights(shared_data_dir, tmp_path, capsys, options, error):
    common = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--quiet"]
    assert run(*common, "--net", "wide", "--model.net_options", "{width: 4}", "--epochs", "1") == 0
    capsys.readouterr()
    argv = [*common, "--stage", "full", "--ckpt", "last.ckpt", "--model.net_options", options, "--print_config"]
    assert run(*argv) == (2 if error else 0)
    err = capsys.readouterr().err
    assert (error in err and err.count("\n") == 1) if error else err == ""


def test_dropout_draws_a_new_mask_at_every_training_step(shared_data_dir, tmp_path, monkeypatch):
    """Seeded per step (a resume draws the same), yet never the same mask twice: the masks of the full batches of
    two epochs (4 steps of 64 each) are all different. Recorded by drawing each mask on ones, as dropout does."""
    real_dropout, masks = torch.nn.functional.dropout, []

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        mask = real_dropout(torch.ones_like(x), p, training)
        if training and len(x) == 64:
            masks.append(mask != 0)
        return x * mask

    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    argv = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--model.net_options", "{dropout: 0.5}"]
    assert run(*argv, "--epochs", "2", "--quiet") == 0
    assert len(masks) == 2 * 4
    assert all(0.3 < mask.float().mean() < 0.7 for mask in masks)
    assert len({mask.numpy().tobytes() for mask in masks}) == len(masks)
