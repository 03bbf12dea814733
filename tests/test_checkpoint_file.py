"""A checkpoint file is read as data, its work bounded by its size: every script that reads one (train.py,
evaluate.py, predict.py, export.py, and a sweep that resumes) refuses a file out of proportion or not of our
making with one line and exit 2, and allocates nothing large for a small file."""

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, crafted_checkpoint, train_from

from mnist_lit import evaluate, export, predict
from mnist_lit.checkpoint_file import load_checkpoint
from mnist_lit.errors import UserError
from mnist_lit.experiments.records import CONFIG_KEYS


def wide(ckpt: dict, width: int) -> None:
    """Settings (hyperparameters and stored config) of a wide net of this width."""
    ckpt["hyper_parameters"].update(net="wide", net_options={"width": width})
    config = yaml.safe_load(ckpt["config"])
    config["model"].update(net="wide", net_options={"width": width})
    ckpt["config"] = yaml.safe_dump(config)


def expanded_wide_net(ckpt: dict) -> None:
    """A wide net of width 1500 (~860 MB of weights) whose every weight is a zero-stride view of one number."""
    from mnist_lit.module import MNISTLitModule

    wide(ckpt, 1500)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in MNISTLitModule("wide", {"width": 1500}).state_dict().items()}
    ckpt["state_dict"] = {k: torch.zeros((), dtype=dtype).expand(shape) for k, (shape, dtype) in shapes.items()}


def set_in(path: str, value):
    """An edit that sets a key (dotted path into the checkpoint's dicts) to value."""

    def edit(ckpt):
        *parents, key = path.split(".")
        section = ckpt
        for parent in parents:
            section = section[parent]
        section[key] = value

    return edit


# Each case: the edit, and what the error line says.
REFUSED = {
    "zero_stride_weights_of_a_huge_net": (expanded_wide_net, "not dense"),
    "settings_of_a_net_the_weights_are_not": (lambda c: wide(c, 1500), "do not fit the wide architecture"),
    "net_option_out_of_range": (lambda c: wide(c, -1), "cannot build"),
    "net_options_as_a_string": (set_in("hyper_parameters.net_options", "abc"), "hyper_parameters.net_options"),
    "pixel_stats_not_numbers": (set_in("hyper_parameters.pixel_stats", ["abc", 0.3]), "hyper_parameters.pixel_stats"),
    "state_dict_as_a_string": (set_in("state_dict", "abc"), "state_dict is not a mapping of tensors"),
    "weight_missing": (lambda c: c["state_dict"].pop("net.fc2.weight"), "missing or unexpected net.fc2.weight"),
    "data_setting_of_another_type": (set_in("datamodule_hyper_parameters.val_fraction", "0.5"), "val_fraction"),
    "epoch_as_a_string": (set_in("epoch", "2"), "epoch"),
    "loop_far_ahead_of_its_epoch": (
        set_in("loops.fit_loop.epoch_progress.current.completed", 1000),
        "does not agree with the checkpoint's epoch",
    ),
    "lightning_version_not_a_version": (set_in("pytorch-lightning_version", "abc"), "pytorch-lightning_version"),
    "callback_states_as_a_list": (set_in("callbacks", ["abc"]), "callbacks"),
    "an_object_among_the_values": (set_in("hyper_parameters.x", {1, 2}), "not plain data"),
}


@pytest.fixture(scope="module")
def crafted(trained_ckpt, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("crafted")
    files = {}
    for case, (edit, _) in REFUSED.items():
        files[case] = crafted_checkpoint(trained_ckpt, folder / f"{case}.ckpt", edit)
    return files


SCRIPTS = {  # each script's command line with a checkpoint, a data folder and an output folder
    "train": lambda ckpt, data, out: train_from(ckpt, data, out),
    "evaluate": lambda ckpt, data, out: evaluate.main(["--ckpt", ckpt, "--data-dir", data, "--out", out]),
    "predict": lambda ckpt, data, out: predict.main(["--ckpt", ckpt, "--out", f"{out}/p.csv", out]),
    "export": lambda ckpt, data, out: export.main(["--ckpt", ckpt, "--format", "onnx", "--out", f"{out}/m"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_every_script_refuses_a_crafted_checkpoint_with_one_line(case, crafted, shared_data_dir, tmp_path, capsys):
    for script, call in SCRIPTS.items():
        out = tmp_path / script
        assert call(str(crafted[case]), str(shared_data_dir), str(out)) == 2, script
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and REFUSED[case][1] in err, (script, err)
        assert not out.exists() or not any(out.rglob("*.*")), script  # nothing written


@pytest.mark.slow
def test_a_small_file_never_allocates_a_large_net(crafted):
    """The peak memory of reading each crafted file stays near that of the imports: nothing like the wide
    net of width 1500 (~860 MB) the settings describe is made."""
    code = """
import json, resource, sys
from mnist_lit.inference import load_trained
from mnist_lit.errors import UserError
import mnist_lit.cli  # everything train.py imports
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        load_trained(path)
    except UserError:
        pass
print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""
    cases = [crafted[c] for c in ("zero_stride_weights_of_a_huge_net", "settings_of_a_net_the_weights_are_not")]
    done = subprocess.run([sys.executable, "-c", code, *map(str, cases)], capture_output=True, text=True, cwd=ROOT)
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert after - before < 100_000, f"peak memory grew by {(after - before) // 1024} MB"  # KiB


def test_a_compressed_or_legacy_file_is_refused_before_it_is_unpacked(trained_ckpt, tmp_path):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    legacy = tmp_path / "legacy.ckpt"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    compressed = tmp_path / "compressed.ckpt"
    with zipfile.ZipFile(trained_ckpt) as source, zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as target:
        for record in source.infolist():
            target.writestr(record.filename, source.read(record))
    assert torch.load(compressed, weights_only=True)["epoch"] == ckpt["epoch"]  # torch itself would inflate it
    for path, message in ((legacy, "not a torch zip file"), (compressed, "compressed")):
        with pytest.raises(UserError, match=message):
            load_checkpoint(path)


def test_shared_references_are_read_once(trained_ckpt, tmp_path):
    """A pickle can hold one list many times: 2^30 paths through 30 small lists. Each is checked once."""

    def bomb(ckpt):
        nested = [1.0]
        for _ in range(30):
            nested = [nested, nested]
        ckpt["hyper_parameters"]["x"] = nested

    path = crafted_checkpoint(trained_ckpt, tmp_path / "shared.ckpt", bomb)
    start = time.perf_counter()
    load_checkpoint(path)
    assert time.perf_counter() - start < 1.0  # bounded work: walked path by path it would never end


def test_a_resuming_sweep_reads_checkpoints_the_same_way(trained_ckpt, tmp_path):
    from mnist_lit.experiments.sweep import resumable

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**dict.fromkeys(CONFIG_KEYS), "trainer": {"max_epochs": 10}}))
    crafted_checkpoint(trained_ckpt, run_dir / "checkpoints" / "last.ckpt", REFUSED["epoch_as_a_string"][0])
    with pytest.raises(UserError, match="epoch"):
        resumable(run_dir)
