"""A checkpoint's stored settings are data: nothing they name runs, their paths never direct a new run."""

from pathlib import Path

import pytest
import torch
import yaml

from mnist_lit.checkpoint_config import TRUST_FLAG, checkpoint_config
from mnist_lit.errors import UserError
from mnist_lit.flags import recipe_names
from mnist_lit.train import main

# Each case: where in the stored config it is put, the value, and the key the error line names.
CRAFTED = {
    "logger_writing_elsewhere": (
        ("trainer", "logger"),
        [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "{outside}"}}],
        "trainer.logger[0]",
    ),
    "callback_calling_any_function": (
        ("trainer", "callbacks"),
        [{"class_path": "pytorch_lightning.callbacks.LambdaCallback", "init_args": {"on_fit_start": "builtins.print"}}],
        "trainer.callbacks[0]",
    ),
    "second_model_checkpoint": (
        ("trainer", "callbacks"),
        [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"dirpath": "{outside}"}}],
        "trainer.callbacks[0]",
    ),
    "callable_in_an_allowed_callback": (
        ("trainer", "callbacks"),
        [{"class_path": "mnist_lit.callbacks.EMAWithFreshBatchNorm", "init_args": {"multi_avg_fn": "os.system"}}],
        "trainer.callbacks[0]",
    ),
    "nested_class_in_an_allowed_callback": (
        ("trainer", "callbacks"),
        [
            {
                "class_path": "mnist_lit.callbacks.EMAWithFreshBatchNorm",
                "init_args": {"decay": {"class_path": "subprocess.Popen", "init_args": {"args": "true"}}},
            }
        ],
        "trainer.callbacks[0].init_args.decay",
    ),  # fmt: skip
    "strategy_class": (
        ("trainer", "strategy"),
        {"class_path": "pytorch_lightning.strategies.DDPStrategy"},
        "trainer.strategy",
    ),
    "plugin_class": (("trainer", "plugins"), [{"class_path": "my_plugins.Anything"}], "trainer.plugins[0]"),
    "profiler_as_import_path": (
        ("trainer", "profiler"),
        "pytorch_lightning.profilers.AdvancedProfiler",
        "trainer.profiler",
    ),
    "extra_kwargs": (
        ("trainer", "callbacks"),
        [{"class_path": "pytorch_lightning.callbacks.LearningRateMonitor", "dict_kwargs": {"x": 1}}],
        "trainer.callbacks[0]",
    ),
}


def crafted_config(text: str, case: str, outside: Path) -> str:
    (section, key), value, _ = CRAFTED[case]
    config = yaml.safe_load(text)
    config[section][key] = yaml.safe_load(yaml.safe_dump(value).replace("'{outside}'", str(outside)))
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture(scope="module")
def stored_config(trained_ckpt) -> str:
    """The config a real (tiny) run stored in its checkpoint."""
    return torch.load(trained_ckpt, weights_only=True)["config"]


@pytest.mark.parametrize("case", CRAFTED)
def test_code_named_in_stored_settings_is_refused_naming_the_key(case, stored_config, tmp_path):
    with pytest.raises(UserError) as refused:
        checkpoint_config(crafted_config(stored_config, case, tmp_path), "x.ckpt")
    message = str(refused.value)
    assert f"name code at {CRAFTED[case][2]} " in message and TRUST_FLAG in message and "\n" not in message


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipes_stored_settings_are_accepted_without_their_paths(recipe, shared_data_dir, tmp_path, capsys):
    """What a run of each recipe stores (e.g. the strong recipe's EMA callback) passes; only its paths go."""
    argv = ["--recipe", recipe, "--data-dir", shared_data_dir, "--save-dir", tmp_path, "--trainer.default_root_dir",
            tmp_path, "--print_config"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    stored = capsys.readouterr().out
    accepted = yaml.safe_load(checkpoint_config(stored, "x.ckpt"))
    original = yaml.safe_load(stored)
    for section, key in (("data", "data_dir"), ("trainer", "default_root_dir")):
        assert original[section].pop(key) and key not in accepted[section]
    assert original.pop("save_dir") and original.pop("ckpt", 0) is None
    assert accepted == original


def test_not_a_config_is_refused():
    with pytest.raises(UserError, match="not a config"):
        checkpoint_config("- a list", "x.ckpt")


def write_crafted(trained_ckpt: Path, folder: Path, case: str, outside: Path) -> Path:
    ckpt = torch.load(trained_ckpt, weights_only=True)
    ckpt["config"] = crafted_config(ckpt["config"], case, outside)
    path = folder / f"{case}.ckpt"
    torch.save(ckpt, path)
    torch.load(path, weights_only=True)  # tensors and plain strings: the safe loader takes it
    return path


@pytest.mark.parametrize(
    "case", ["logger_writing_elsewhere", "callback_calling_any_function", "second_model_checkpoint"]
)
def test_crafted_checkpoint_is_refused_before_anything_runs(case, trained_ckpt, shared_data_dir, tmp_path, capsys):
    outside, save_dir = tmp_path / "outside", tmp_path / "runs"
    ckpt = write_crafted(trained_ckpt, tmp_path, case, outside)
    for stage in ("full", "initial"):  # a new full stage, and a resume (refused for its epochs otherwise)
        argv = ["--stage", stage, "--ckpt", ckpt, "--data-dir", shared_data_dir, "--save-dir", save_dir, "--quiet"]
        assert main([str(a) for a in argv]) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and CRAFTED[case][2] in err and TRUST_FLAG in err
        assert "Trainer object" not in out + err  # builtins.print was never called with the trainer
    assert not outside.exists() and not save_dir.exists()


def test_trusted_checkpoint_runs_its_settings(trained_ckpt, shared_data_dir, tmp_path, capsys):
    """The flag is the user's word for a checkpoint they know: then its config is used as stored."""
    ckpt = write_crafted(trained_ckpt, tmp_path, "callback_calling_any_function", tmp_path / "outside")
    argv = ["--stage", "full", "--ckpt", ckpt, "--data-dir", shared_data_dir, "--save-dir", tmp_path / "runs",
            "--epochs", "4", "--quiet", TRUST_FLAG]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert "Trainer object" in capsys.readouterr().out


def test_stored_paths_never_direct_where_a_new_run_reads_or_writes(
    trained_ckpt, shared_data_dir, tmp_path, monkeypatch
):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    config = yaml.safe_load(ckpt["config"])
    elsewhere = tmp_path / "elsewhere"
    config["save_dir"], config["data"]["data_dir"] = str(elsewhere / "runs"), str(elsewhere / "data")
    config["trainer"]["default_root_dir"] = str(elsewhere / "root")
    ckpt["config"] = yaml.safe_dump(config)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    monkeypatch.chdir(tmp_path)
    argv = ["--stage", "full", "--ckpt", "moved.ckpt", "--data-dir", shared_data_dir, "--epochs", "4", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    assert (tmp_path / "lightning_logs" / "full" / "version_0" / "results.json").is_file()  # the default save dir
    assert not elsewhere.exists()
