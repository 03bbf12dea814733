"""mnist_lit.cli and scripts/train.py: both stages end to end on small IDX files, configs, resume, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from mnist_lit.cli import main
from mnist_lit.data import MNISTDataModule, normalize
from mnist_lit.errors import UserError
from mnist_lit.evaluate import read_scalars
from mnist_lit.flags import expand_short_flags, recipe_names
from mnist_lit.loss import nll_loss
from mnist_lit.module import MNISTLitModule
from mnist_lit.runs import resolve_ckpt, run_dirs

ROOT = Path(__file__).resolve().parents[1]
# 320 training images -> 288 train / 32 val with the default 10 %; batch 64 -> 5 steps per epoch.
INITIAL = ["--epochs", "4", "--save-freq", "2", "--lr", "0.05", "--milestones", "2", "3", "--quiet"]


def run(*argv) -> int:
    return main([str(a) for a in argv])


def net_weights(ckpt_path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def epoch_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "log.txt").read_text().splitlines() if line.startswith("epoch ")]


@pytest.fixture(scope="module")
def initial_run(shared_data_dir, tmp_path_factory):
    """One 4-epoch initial run; returns (data_dir, save_dir, run_dir)."""
    save_dir = tmp_path_factory.mktemp("runs") / "logs"
    assert run("--data-dir", shared_data_dir, "--save-dir", save_dir, *INITIAL) == 0
    return shared_data_dir, save_dir, save_dir / "initial" / "version_0"


def test_initial_run_writes_checkpoints_logs_and_code(initial_run):
    _, _, run_dir = initial_run
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["002.ckpt", "004.ckpt", "last.ckpt"]
    assert same_tensors(net_weights(ckpts / "004.ckpt"), net_weights(ckpts / "last.ckpt"))
    lines = epoch_lines(run_dir)
    assert [line.split()[:4] for line in lines] == [
        ["epoch", "1", "lr", "0.05"],
        ["epoch", "2", "lr", "0.05"],
        ["epoch", "3", "lr", "0.005"],
        ["epoch", "4", "lr", "0.0005"],
    ]
    assert all("val " in line and "/32 (" in line for line in lines)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["stage"] == "initial" and config["model"]["milestones"] == [2, 3]
    assert (config["data"]["batch_size"], config["trainer"]["max_epochs"], config["recipe"]) == (64, 4, "seed")
    assert "--milestones 2 3" in (run_dir / "command.txt").read_text()
    assert (run_dir / "code" / "mnist_lit" / "data.py").is_file()
    assert (run_dir / "code" / "scripts" / "train.py").is_file()
    assert (run_dir / "code" / "scripts" / "run_all.sh").is_file()
    # TensorBoard: metric-first tags (its pages open on acc and loss), one point per epoch; no epoch or count chart
    assert event_scalar_tags(run_dir) == {"acc/train", "acc/val", "acc/val_best", "loss/train", "loss/val", "lr"}
    scalars = read_scalars([run_dir])
    assert all(len(points) == 4 for points in scalars.values())
    assert scalars["lr"][min(scalars["lr"])] == pytest.approx(0.05)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["split"] == "val" and results["count"] == 32 and results["epoch"] == 4
    assert results["acc"] > 0.5  # the fake digits are easy: the pipeline really learns


def test_last_ckpt_is_written_every_epoch_even_without_numbered_saves(shared_data_dir, tmp_path):
    assert (
        run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--epochs", "2", "--save-freq", "5", "--quiet") == 0
    )
    ckpts = tmp_path / "initial" / "version_0" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1  # 0-based: the 2nd epoch


def test_checkpoint_loads_safely(initial_run):
    _, _, run_dir = initial_run
    model = MNISTLitModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert model.hparams.milestones == [2, 3] and model.hparams.lr == 0.05


def test_full_stage_continues_from_the_initial_checkpoint(initial_run, capsys):
    """The original's spellings (--train-full 1 --resume last.ckpt); epochs 5..7 at lr 1e-4 on all images,
    evaluated on the test set; the weights equal a plain loop from the initial weights with a fresh SGD."""
    data_dir, save_dir, initial_dir = initial_run
    argv = ["--train-full", "1", "--resume", "last.ckpt", "--epochs", "7", "--save-freq", "3"]
    assert run(*argv, "--data-dir", data_dir, "--save-dir", save_dir, "--quiet") == 0
    assert f"-> {initial_dir / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    run_dir = save_dir / "full" / "version_0"
    lines = epoch_lines(run_dir)
    assert [int(line.split()[1]) for line in lines] == [5, 6, 7]
    assert all(line.split()[3] == "0.0001" and " test " in line and "/120 (" in line for line in lines)
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["split"], results["count"], results["epoch"]) == ("test", 120, 7)
    scalars = read_scalars([run_dir])
    assert len(scalars["acc/test"]) == 3 and "acc/val" not in scalars  # one test evaluation per epoch
    assert scalars["acc/test"][max(scalars["acc/test"])] == pytest.approx(results["acc"])
    # Lightning's own test loop (trainer.test, as a user would call it) on the final checkpoint: the same figure.
    final = MNISTLitModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    tester = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    tester.test(final, datamodule=MNISTDataModule(str(data_dir), stage="full"), verbose=False)
    assert float(tester.callback_metrics["test/acc"]) == pytest.approx(results["acc"])
    assert int(tester.callback_metrics["test/count"]) == 120
    assert results["ckpt_from"] == str((initial_dir / "checkpoints" / "last.ckpt").resolve())  # from any folder
    initial = torch.load(initial_dir / "checkpoints" / "last.ckpt", weights_only=True)
    full = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == initial["global_step"] + 3 * 5  # TensorBoard's step axis continues
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["006.ckpt", "last.ckpt"]

    # The same 3 epochs as a plain PyTorch loop: fresh SGD, lr 1e-4, momentum 0.5, same batches.
    model = MNISTLitModule.load_from_checkpoint(initial_dir / "checkpoints" / "last.ckpt", weights_only=True)
    optimizer = torch.optim.SGD(model.net.parameters(), lr=1e-4, momentum=0.5)
    data = MNISTDataModule(str(data_dir), stage="full")
    data.setup()
    loader = data.train_dataloader()
    for epoch in range(4, 7):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            optimizer.zero_grad()
            nll_loss(model.net(normalize(images, data.mean, data.std)), labels).backward()
            optimizer.step()
    expected = {f"net.{k}": v for k, v in model.net.state_dict().items()}
    assert same_tensors(expected, net_weights(run_dir / "checkpoints" / "last.ckpt"))


def resolved_config(capsys, *argv) -> dict:
    """What --print_config prints: the settings a run with these options would have."""
    capsys.readouterr()
    assert run(*argv, "--print_config") == 0
    return yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])  # after the "--ckpt x -> path" line


def test_full_stage_takes_the_runs_settings_then_full_yaml_and_20_more_epochs(initial_run, capsys):
    data_dir, save_dir, initial_dir = initial_run
    last, full_runs = initial_dir / "checkpoints" / "last.ckpt", run_dirs(save_dir, "full")
    config = resolved_config(capsys, "--stage", "full", "--ckpt", last, "--save-dir", save_dir)
    assert (config["trainer"]["max_epochs"], config["full_epochs"]) == (4 + 20, 20)  # from configs/full.yaml
    shorter = resolved_config(capsys, "--stage", "full", "--ckpt", last, "--full_epochs", "3")
    assert shorter["trainer"]["max_epochs"] == 4 + 3
    assert (config["model"]["lr"], config["model"]["milestones"], config["model"]["momentum"]) == (1e-4, [], 0.5)
    assert config["seed_everything"] == 0 and config["data"]["batch_size"] == 64  # inherited from the initial run
    assert config["data"]["data_dir"] == "data"  # paths come from the command line (or defaults), not the checkpoint
    assert config["ckpt"] == str(last.resolve())
    assert run_dirs(save_dir, "full") == full_runs  # printing the settings starts no run
    assert run("--ckpt", last, "--save-dir", save_dir, "--quiet") == 2  # a resume keeps the run's last epoch: done
    assert resolved_config(capsys, "--ckpt", last, "--epochs", "6")["trainer"]["max_epochs"] == 6


def test_resume_of_an_interrupted_run_gives_the_same_weights(initial_run, tmp_path):
    data_dir, _, uninterrupted = initial_run
    common = ["--data-dir", data_dir, "--save-dir", tmp_path, *INITIAL]
    assert run(*common[: -len(INITIAL)], *INITIAL[2:], "--epochs", "2") == 0  # stops after epoch 2 of 4
    assert run(*common, "--ckpt", "last.ckpt") == 0  # resumes it into version_1 and trains epochs 3-4
    resumed = tmp_path / "initial" / "version_1"
    assert [line.split()[1] for line in epoch_lines(resumed)] == ["3", "4"]
    assert (tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt").is_file()  # nothing overwritten
    a = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert same_tensors(a["state_dict"], b["state_dict"])
    momentum = [{k: s["momentum_buffer"] for k, s in c["optimizer_states"][0]["state"].items()} for c in (a, b)]
    assert same_tensors(*momentum)


def test_resolve_ckpt(tmp_path):
    with pytest.raises(UserError, match="no such file, and no run under"):
        resolve_ckpt("last.ckpt", tmp_path)
    for version in (0, 1):
        (tmp_path / "initial" / f"version_{version}" / "checkpoints").mkdir(parents=True)
        (tmp_path / "initial" / f"version_{version}" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    newest = tmp_path / "initial" / "version_1" / "checkpoints" / "last.ckpt"
    assert resolve_ckpt("last.ckpt", tmp_path) == newest
    assert resolve_ckpt(str(newest.parents[2] / "version_0" / "checkpoints" / "last.ckpt"), tmp_path).is_file()
    with pytest.raises(UserError, match="020.ckpt not found: the newest initial run .*version_1 has none"):
        resolve_ckpt("020.ckpt", tmp_path)
    (tmp_path / "initial" / "version_2").mkdir()  # a run killed before its first checkpoint
    with pytest.raises(UserError, match="version_2 has none"):
        resolve_ckpt("last.ckpt", tmp_path)
    with pytest.raises(UserError, match="not found"):
        resolve_ckpt(str(tmp_path / "nowhere" / "last.ckpt"), tmp_path)


def test_resolve_ckpt_for_the_full_stage(tmp_path):
    initial = tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    full = tmp_path / "full" / "version_0" / "checkpoints" / "last.ckpt"
    for path in (initial, full):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    assert resolve_ckpt("last.ckpt", tmp_path, "full") == full  # unfinished full run: resume it
    assert resolve_ckpt("last.ckpt", tmp_path, "initial") == initial
    (full.parents[1] / "results.json").write_text("{}")
    assert resolve_ckpt("last.ckpt", tmp_path, "full") == initial  # it finished: a new full stage


def test_original_and_short_spellings_are_the_full_names():
    old = expand_short_flags(["--train-full", "1", "--resume", "x.ckpt", "--epochs", "30", "--milestones", "2", "4"])
    assert old == ["--stage", "full", "--ckpt", "x.ckpt", "--trainer.max_epochs", "30", "--model.milestones=[2, 4]"]
    assert expand_short_flags(["--train-full", "0"]) == ["--stage", "initial"]
    assert expand_short_flags(["--lr=0.1", "--quiet", "--deterministic", "--milestones"]) == [
        "--model.lr", "0.1", "--quiet=true", "--trainer.deterministic=true", "--model.milestones=[]"
    ]  # fmt: skip
    assert expand_short_flags(["--recipe", "fast"])[1].endswith("configs/fast.yaml")
    with pytest.raises(UserError, match="contradicts"):
        expand_short_flags(["--train-full", "1", "--stage", "initial"])
    with pytest.raises(UserError, match=f"unknown --recipe 'slow': choose one of {', '.join(recipe_names())} "):
        expand_short_flags(["--recipe", "slow"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stage", "full"], "--stage full needs --ckpt"),
        (["--ckpt", "missing.ckpt"], "missing.ckpt not found"),
        (["--lr", "-1"], "model.lr must be > 0"),
        (["--lr", "abc"], 'Parser key "model.lr": Expected a'),
        (["--batch-size", "0"], "data.batch_size and data.eval_batch_size must be >= 1"),
        (["--val-fraction", "1"], "data.val_fraction must be between 0 and 1"),
        (["--milestones", "10", "2"], "model.milestones must be increasing"),
        (["--model.optimizer", "rmsprop"], 'Parser key "model.optimizer"'),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--stage", "half"], 'Parser key "stage"'),
        (["--no-such-option"], "unrecognized arguments"),
        (["--config", "nowhere.yaml"], "nowhere.yaml"),
        (["--epochs", "3", "--trainer.check_val_every_n_epoch", "2"], "skips the evaluation of the last epoch (3)"),
    ],
)
def test_bad_options_give_one_error_line(argv, message, shared_data_dir, tmp_path, capsys):
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "initial").exists()  # no run directory for a run that never started


class RunsCode:
    """Unpickling this would call os.system: a checkpoint holding it must be refused, not loaded."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_bad_checkpoints_are_refused(initial_run, tmp_path, capsys):
    data_dir, save_dir, initial_dir = initial_run
    last = initial_dir / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:5000])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    other_net = tmp_path / "other_net.ckpt"
    changed = torch.load(last, weights_only=True)
    changed["state_dict"]["net.fc1.weight"] = torch.zeros(300, 800)  # another architecture's layer
    torch.save(changed, other_net)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"stage": "initial"}, "payload": RunsCode()}, evil)
    cases = [
        (["--ckpt", truncated], "not a readable checkpoint"),
        (["--ckpt", text], "not a readable checkpoint"),
        (["--ckpt", foreign], "not an mnist_lit checkpoint"),
        (["--ckpt", evil], "refused, it asks to load posix.system"),
        (["--ckpt", other_net], "its weights do not fit the lenet architecture"),
        (["--ckpt", last, "--epochs", "4"], "not beyond the checkpoint's epoch 4"),
        (["--ckpt", last, "--lr", "0.1"], "model.lr 0.1 differs from the checkpoint's 0.05"),
        (["--ckpt", last, "--dataset", "kmnist"], "data.dataset kmnist differs from the checkpoint's mnist"),
        (["--ckpt", last, "--recipe", "fast"], "differs from the checkpoint's"),
        (["--stage", "full", "--ckpt", last, "--net", "slim"], "weights: model.net slim differs from its lenet"),
        (["--ckpt", tmp_path], "a folder, not a checkpoint file"),
        (["--stage", "full", "--ckpt", last, "--trainer.check_val_every_n_epoch", "5"], "last epoch (24)"),
        (["--stage", "full", "--ckpt", last, "--full_epochs", "0"], "--full_epochs must be an integer >= 1 (got 0)"),
    ]
    for argv, message in cases:
        assert run("--data-dir", data_dir, "--save-dir", tmp_path / "logs", "--quiet", *argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "logs").exists()  # none of them made a run directory


def test_corrupt_data_fails_before_a_run_directory_is_made(data_dir, tmp_path, capsys):
    images = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    assert run("--data-dir", data_dir, "--save-dir", tmp_path / "logs", "--quiet") == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "logs" / "initial").exists()


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert run("--data-dir", tmp_path / "data", "--save-dir", tmp_path / "logs", "--quiet") == 2
    assert "mnist files missing in" in capsys.readouterr().err


def test_missing_data_offline(tmp_path, capsys):
    assert run("--data-dir", tmp_path / "nothing", "--save-dir", tmp_path / "logs", "--quiet") == 2
    err = capsys.readouterr().err
    assert "mnist files missing" in err and "train-images-idx3-ubyte" in err and err.count("\n") == 1
    assert not (tmp_path / "logs" / "initial").exists()
    assert not (tmp_path / "nothing").exists()  # the failed download leaves no empty folders


@pytest.mark.parametrize(
    "argv",
    [
        ["--strategy", "no_such_strategy"],
        ["--num-nodes", "0"],
        pytest.param(
            ["--accelerator", "gpu"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
    ],
)
def test_options_the_trainer_refuses_leave_no_run_directory(argv, shared_data_dir, tmp_path, capsys):
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--quiet", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the Trainer refused the options: ") and err.count("\n") == 1, err
    assert run_dirs(tmp_path, "initial") == []  # so `--ckpt last.ckpt` still finds the last real run


@pytest.mark.parametrize(
    "argv, patch, message",
    [
        (["--trainer.callbacks+=ModelCheckpoint"], None, "the Trainer refused the options: Found more than one"),
        (["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=x", "--trainer.callbacks.mode=bad"], None,
         "the settings could not be built: `mode` can be min, max, got bad"),
        (["--trainer.callbacks+=DeviceStatsMonitor"], "psutil missing",
         "the run could not start: `DeviceStatsMonitor` cannot log CPU stats as `psutil` is not installed"),
    ],
)  # fmt: skip
def test_settings_the_trainer_cannot_use_give_one_line_and_no_run_folder(
    argv, patch, message, shared_data_dir, tmp_path, capsys, monkeypatch
):
    if patch == "psutil missing":
        monkeypatch.setattr("pytorch_lightning.callbacks.device_stats_monitor._PSUTIL_AVAILABLE", False)
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--quiet", "--epochs", "1", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert run_dirs(tmp_path, "initial") == []


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_silences_lightnings_banners(quiet, shared_data_dir, tmp_path, caplog):
    argv = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--epochs", "1", "--precision", "bf16-mixed"]
    assert run(*argv, *(["--quiet"] if quiet else [])) == 0
    lightning = [r.getMessage() for r in caplog.records if r.name.startswith(("pytorch_lightning", "lightning_fabric"))]
    assert any("GPU available" in m for m in lightning) != quiet
    assert any("Automatic Mixed Precision" in m for m in lightning) != quiet
    assert len(epoch_lines(tmp_path / "initial" / "version_0")) == 1  # our own lines stay


def test_save_dir_that_is_a_file(shared_data_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path / "afile", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot make the run folder under ") and err.count("\n") == 1, err
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.slow
def test_run_all_goes_on_from_the_initial_runs_last_checkpoint(shared_data_dir, tmp_path):
    """scripts/run_all.sh with a recipe-like change of --epochs: the full stage starts from that run's
    last.ckpt (there is no 020.ckpt), and the summary names both stages. Relative paths are taken from the
    folder it is run in."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    data = os.path.relpath(shared_data_dir, tmp_path)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_all.sh"), data, "runs", "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    full = json.loads((tmp_path / "runs" / "full" / "version_0" / "results.json").read_text())
    initial_last = tmp_path / "runs" / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    assert full["ckpt_from"] == str(initial_last.resolve()) and full["epoch"] == 22
    assert "initial  epoch  2" in proc.stdout and "full     epoch 22" in proc.stdout


def test_script_exit_code_and_single_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--stage", "full", "--save-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: --stage full needs --ckpt: the initial stage's checkpoint to go on from (e.g. last.ckpt)"
    ]


def test_speed_options_are_recorded_kept_on_resume_and_given_to_the_trainer(shared_data_dir, tmp_path, monkeypatch):
    from mnist_lit.cli import MNISTCLI

    instantiate_trainer = MNISTCLI.instantiate_trainer
    precisions = []  # what each run's Trainer really got

    def recording(self, **kwargs):
        trainer = instantiate_trainer(self, **kwargs)
        precisions.append(trainer.precision)
        return trainer

    monkeypatch.setattr(MNISTCLI, "instantiate_trainer", recording)
    common = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--quiet"]
    assert run(*common, "--epochs", "2", "--precision", "bf16-mixed", "--channels-last") == 0
    config = yaml.safe_load((tmp_path / "initial" / "version_0" / "config.yaml").read_text())
    assert (config["trainer"]["precision"], config["model"]["channels_last"]) == ("bf16-mixed", True)
    assert run(*common, "--ckpt", "last.ckpt", "--epochs", "3", "--precision", "32-true") == 2
    assert run(*common, "--stage", "full", "--ckpt", "last.ckpt", "--epochs", "3") == 0
    full = yaml.safe_load((tmp_path / "full" / "version_0" / "config.yaml").read_text())
    assert (full["trainer"]["precision"], full["model"]["channels_last"]) == ("bf16-mixed", True)
    assert precisions == ["bf16-mixed", "bf16-mixed"]  # the initial and the full stage's Trainers


def test_a_runs_config_yaml_trains_it_again_to_identical_weights(shared_data_dir, tmp_path):
    """config.yaml holds every setting: run from it alone, into a new folder, the weights are bit-identical."""
    assert (
        run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--recipe", "fast", "--lr", "0.02", "--quiet") == 0
    )
    first = tmp_path / "initial" / "version_0"
    assert run("--config", first / "config.yaml") == 0
    again = tmp_path / "initial" / "version_1"
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text()
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (first, again))
    assert same_tensors(a["state_dict"], b["state_dict"]) and a["global_step"] == b["global_step"] > 0
    assert a["config"] == (first / "config.yaml").read_text()  # the checkpoint carries it too


def event_scalar_tags(run_dir: Path) -> set[str]:
    """The scalar tags of a run's TensorBoard events, as written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def hparams_in_events(run_dir: Path) -> dict:
    """The settings of TensorBoard's HPARAMS tab, as its plugin reads them from the events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    # No experiment summary: TensorBoard would take every run's columns and metrics from one run's.
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in hparams.items()}


def test_runs_compare_by_their_settings_in_tensorboards_hparams_tab(initial_run):
    """HPARAMS: the settings that describe the experiment, no paths or switches; its metric columns are the runs'
    own curves (their last points: the final accuracy), so there is no one-point hp/ chart."""
    data_dir, save_dir, initial_dir = initial_run
    settings = hparams_in_events(initial_dir)
    assert settings["model/lr"] == 0.05 and settings["data/batch_size"] == 64 and settings["recipe"] == "seed"
    assert settings["trainer/max_epochs"] == 4 and settings["stage"] == "initial"
    assert not {"ckpt", "save_dir", "save_freq", "quiet", "data/data_dir", "data/download"} & settings.keys()
    assert not [name for name in settings if "progress_bar" in name or "hp/" in name]
    assert not [tag for tag in event_scalar_tags(initial_dir) if tag.startswith("hp")]
    scalars = read_scalars([initial_dir])
    final = json.loads((initial_dir / "results.json").read_text())["acc"]
    assert scalars["acc/val"][max(scalars["acc/val"])] == pytest.approx(final)
    full_dir = save_dir / "full" / "version_0"  # made by test_full_stage_continues_from_the_initial_checkpoint
    settings = hparams_in_events(full_dir)
    assert settings["model/lr"] == 0.0001 and settings["stage"] == "full" and "ckpt" not in settings


def test_gradient_clipping_and_accumulation_from_the_command_line(shared_data_dir, tmp_path):
    """Lightning's own options: 5 batches an epoch, accumulated by 2, are 3 optimizer steps; a tiny clipping
    norm keeps the weights where they started."""
    common = ["--data-dir", shared_data_dir, "--epochs", "1", "--lr", "0.05", "--quiet"]
    moved = {}
    for name, extra in (
        ("plain", []),
        ("accumulated", ["--trainer.accumulate_grad_batches", "2"]),
        ("clipped", ["--trainer.gradient_clip_val", "1e-6"]),
    ):
        assert run(*common, "--save-dir", tmp_path / name, *extra) == 0
        ckpt = torch.load(tmp_path / name / "initial" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        torch.manual_seed(0)
        start = {f"net.{k}": v for k, v in MNISTLitModule().net.state_dict().items()}
        moved[name] = max((ckpt["state_dict"][k] - v).abs().max().item() for k, v in start.items())
        moved[name + "_steps"] = ckpt["global_step"]
    assert (moved["plain_steps"], moved["accumulated_steps"], moved["clipped_steps"]) == (5, 3, 5)
    assert moved["plain"] > 1e-3 and moved["clipped"] < 1e-6


def test_trainer_options_callbacks_and_loggers_from_the_command_line(shared_data_dir, tmp_path):
    common = ["--data-dir", shared_data_dir, "--quiet", "--epochs", "2"]
    assert run(*common, "--save-dir", tmp_path / "limited", "--trainer.limit_train_batches", "2") == 0
    ckpt = tmp_path / "limited" / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    assert run(*common, "--save-dir", tmp_path / "dev", "--trainer.fast_dev_run", "true") == 0
    assert json.loads((tmp_path / "dev" / "initial" / "version_0" / "results.json").read_text())["epoch"] == 1
    extra = [  # stop as soon as val/acc reaches 0.01, i.e. after the first epoch; log to CSV too
        "--trainer.callbacks+=pytorch_lightning.callbacks.EarlyStopping",
        "--trainer.callbacks.monitor=val/acc",
        "--trainer.callbacks.mode=max",
        "--trainer.callbacks.stopping_threshold=0.01",
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'csv'}",
    ]
    assert run(*common, "--save-dir", tmp_path / "extra", *extra) == 0
    run_dir = tmp_path / "extra" / "initial" / "version_0"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["callbacks"][0]["class_path"] == "pytorch_lightning.callbacks.EarlyStopping"
    assert json.loads((run_dir / "results.json").read_text())["epoch"] == 1  # stopped by the extra callback
    assert "val/acc" in (next((tmp_path / "csv").rglob("metrics.csv"))).read_text()  # the second logger wrote
    assert len(read_scalars([run_dir])["acc/val"]) == 1  # and TensorBoard still has the run's curves


def test_a_run_leaves_the_loggers_as_it_found_them(shared_data_dir, tmp_path):
    import logging

    ours, lightning = logging.getLogger("mnist_lit"), logging.getLogger("pytorch_lightning")
    before = (ours.level, ours.propagate, lightning.level, list(ours.handlers))
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--epochs", "1", "--quiet") == 0
    assert (ours.level, ours.propagate, lightning.level, list(ours.handlers)) == before
