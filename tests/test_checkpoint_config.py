"""A checkpoint's stored settings are data: read through the schema of this project's settings, never by a
config parser; nothing they name runs, their paths never direct a run, their size bounds the work."""

from pathlib import Path

import pytest
import torch
import yaml
from helpers import OVERSIZED_YAML, crafted_checkpoint, train_from

from mnist_lit.checkpoint_config import TRAINER_TYPES, TRUST_FLAG, checkpoint_config
from mnist_lit.errors import UserError
from mnist_lit.flags import recipe_names
from mnist_lit.schema import accepts
from mnist_lit.train import main

LAMBDA = [{"class_path": "pytorch_lightning.callbacks.LambdaCallback", "init_args": {"on_fit_start": "builtins.print"}}]
# Each case: (where in the stored config, the value); the error line names the key the case's third item gives.
REFUSED = {
    "callback_calling_any_function": (("trainer", "callbacks"), LAMBDA, "trainer.callbacks[0].class_path"),
    "callbacks_as_a_yaml_string": (("trainer", "callbacks"), yaml.safe_dump(LAMBDA), "trainer.callbacks"),
    "callback_by_short_name": (("trainer", "callbacks"), ["LearningRateFinder"], "trainer.callbacks[0]"),
    "allowed_callback_by_short_name": (
        ("trainer", "callbacks"),
        [{"class_path": "EarlyStopping", "init_args": {"monitor": "val/acc"}}],
        "trainer.callbacks[0].class_path",
    ),
    "second_model_checkpoint": (
        ("trainer", "callbacks"),
        [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"dirpath": "{outside}"}}],
        "trainer.callbacks[0].class_path",
    ),
    "callable_in_an_allowed_callback": (
        ("trainer", "callbacks"),
        [{"class_path": "mnist_lit.callbacks.EMAWithFreshBatchNorm", "init_args": {"multi_avg_fn": "os.system"}}],
        "trainer.callbacks[0].init_args.multi_avg_fn",
    ),
    "class_nested_in_an_allowed_callback": (
        ("trainer", "callbacks"),
        [
            {
                "class_path": "mnist_lit.callbacks.EMAWithFreshBatchNorm",
                "init_args": {"decay": {"class_path": "subprocess.Popen", "init_args": {"args": "true"}}},
            }
        ],
        "trainer.callbacks[0].init_args.decay",
    ),
    "extra_kwargs": (
        ("trainer", "callbacks"),
        [{"class_path": "pytorch_lightning.callbacks.LearningRateMonitor", "dict_kwargs": {"x": 1}}],
        "trainer.callbacks[0]",
    ),
    "strategy_class": (
        ("trainer", "strategy"),
        {"class_path": "pytorch_lightning.strategies.DDPStrategy"},
        "trainer.strategy",
    ),
    "strategy_import_path": (("trainer", "strategy"), "pytorch_lightning.strategies.DDPStrategy", "trainer.strategy"),
    "plugin_class": (("trainer", "plugins"), [{"class_path": "my_plugins.Anything"}], "trainer.plugins"),
    "profiler_as_import_path": (
        ("trainer", "profiler"),
        "pytorch_lightning.profilers.AdvancedProfiler",
        "trainer.profiler",
    ),
    "trainer_as_a_file": (("trainer",), "./x.yaml", "trainer"),
    "data_as_a_string": (("data",), "{data_dir: /elsewhere}", "data"),
    "unknown_top_level_key": (("print_config",), True, "print_config"),
    "net_options_as_a_string": (("model", "net_options"), "abc", "model.net_options"),
    "net_option_of_another_type": (("model", "net_options"), {"dropout": "0.1"}, "model.net_options.dropout"),
    "net_not_registered": (("model", "net"), "mnist_lit.net.LeNet", "model.net"),
    "a_number_as_a_string": (("model", "lr"), "0.1", "model.lr"),
    "a_bool_for_an_int": (("trainer", "max_epochs"), True, "trainer.max_epochs"),
    "devices_as_a_yaml_list_string": (("trainer", "devices"), "[0, 1]", "trainer.devices"),
    "model_registry_upload": (("trainer", "model_registry"), "my-model", "trainer.model_registry"),
}


def crafted_config(text: str, where: tuple, value, outside: Path) -> str:
    config = yaml.safe_load(text)
    section = config
    for key in where[:-1]:
        section = section[key]
    section[where[-1]] = yaml.safe_load(yaml.safe_dump(value).replace("'{outside}'", str(outside)))
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture(scope="module")
def stored_config(trained_ckpt) -> str:
    """The config a real (tiny) run stored in its checkpoint."""
    return torch.load(trained_ckpt, weights_only=True)["config"]


@pytest.mark.parametrize("case", REFUSED)
def test_settings_that_are_not_this_projects_plain_settings_are_refused_naming_the_key(case, stored_config, tmp_path):
    where, value, key = REFUSED[case]
    with pytest.raises(UserError) as refused:
        checkpoint_config(crafted_config(stored_config, where, value, tmp_path), "x.ckpt")
    message = str(refused.value)
    assert f"refused at {key}:" in message and TRUST_FLAG in message and "\n" not in message


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipes_stored_settings_are_accepted_without_their_paths(recipe, shared_data_dir, tmp_path, capsys):
    """What a run of each recipe stores (e.g. the strong recipe's EMA callback) passes; only its paths and
    loggers go."""
    argv = [
        "--recipe",
        recipe,
        "--data-dir",
        shared_data_dir,
        "--save-dir",
        tmp_path,
        "--trainer.default_root_dir",
        tmp_path,
        "--print_config",
    ]
    assert main([str(a) for a in argv]) == 0
    stored = capsys.readouterr().out
    accepted = yaml.safe_load(checkpoint_config(stored, "x.ckpt"))
    original = yaml.safe_load(stored)
    for section, key in (("data", "data_dir"), ("trainer", "default_root_dir")):
        assert original[section].pop(key) and key not in accepted[section]
    assert original.pop("save_dir") and original.pop("ckpt", 0) is None
    assert "logger" in original["trainer"] and original["trainer"].pop("logger") is None
    assert accepted == original


@pytest.mark.parametrize("spelling", ["data.data_dir", "save_dir", "ckpt", "trainer.default_root_dir"])
def test_paths_are_dropped_in_every_spelling(spelling, stored_config):
    config = yaml.safe_load(stored_config)
    config[spelling] = "/elsewhere"
    accepted = checkpoint_config(yaml.safe_dump(config), "x.ckpt")
    assert "/elsewhere" not in accepted


def test_no_trainer_flag_takes_a_free_string():
    """A string a Trainer flag takes from a file is one of a fixed set or of a narrow pattern: never a class, a
    file, a URL or YAML to parse again."""
    for flag, hint in TRAINER_TYPES.items():
        for value in ("pytorch_lightning.profilers.AdvancedProfiler", "./x.yaml", "http://127.0.0.1/", "[0, 1]"):
            assert not accepts(hint, value), f"trainer.{flag} takes {value!r}"


@pytest.mark.parametrize("case", OVERSIZED_YAML)
def test_a_config_out_of_proportion_is_refused_before_it_is_parsed(monkeypatch, case):
    monkeypatch.setattr(yaml, "safe_load", lambda text: pytest.fail("parsed into data: the alias bomb never ends"))
    with pytest.raises(UserError, match="its stored settings are refused"):
        checkpoint_config(OVERSIZED_YAML[case], "x.ckpt")


def test_yaml_tags_and_non_mappings_are_refused():
    for text in ("- a list", "!!python/object/apply:os.system [true]", "seed_everything: 2001-12-14"):
        with pytest.raises(UserError, match="its stored settings are refused"):
            checkpoint_config(text, "x.ckpt")


def write_crafted(trained_ckpt: Path, folder: Path, where: tuple, value, outside: Path) -> Path:
    def edit(ckpt):
        ckpt["config"] = crafted_config(ckpt["config"], where, value, outside)

    return crafted_checkpoint(trained_ckpt, folder / "crafted.ckpt", edit)


@pytest.mark.parametrize("case", ["callback_calling_any_function", "callbacks_as_a_yaml_string", "trainer_as_a_file"])
def test_crafted_checkpoint_is_refused_before_anything_runs(case, trained_ckpt, shared_data_dir, tmp_path, capsys):
    where, value, key = REFUSED[case]
    outside, save_dir = tmp_path / "outside", tmp_path / "runs"
    ckpt = write_crafted(trained_ckpt, tmp_path, where, value, outside)
    for stage in ("full", "initial"):  # a new full stage, and a resume
        assert train_from(ckpt, shared_data_dir, save_dir, stage=stage) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and key in err and TRUST_FLAG in err
        assert "Trainer object" not in out + err  # builtins.print was never called with the trainer
    assert not outside.exists() and not save_dir.exists()


def test_trusted_checkpoint_runs_its_settings(trained_ckpt, shared_data_dir, tmp_path, capsys):
    """The flag is the user's word for a checkpoint they know: then its config is used as stored."""
    where, value, _ = REFUSED["callback_calling_any_function"]
    ckpt = write_crafted(trained_ckpt, tmp_path, where, value, tmp_path / "outside")
    assert train_from(ckpt, shared_data_dir, tmp_path / "runs", "--epochs", 4, TRUST_FLAG) == 0
    assert "Trainer object" in capsys.readouterr().out


def test_stored_paths_and_loggers_never_direct_where_a_new_run_reads_or_writes(
    trained_ckpt, shared_data_dir, tmp_path, monkeypatch
):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    config = yaml.safe_load(ckpt["config"])
    elsewhere = tmp_path / "elsewhere"
    config["save_dir"], config["data"]["data_dir"] = str(elsewhere / "runs"), str(elsewhere / "data")
    config["data.data_dir"] = str(elsewhere / "dotted")
    config["trainer"]["default_root_dir"] = str(elsewhere / "root")
    config["trainer"]["logger"] = [
        {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(elsewhere / "csv")}}
    ]
    ckpt["config"] = yaml.safe_dump(config)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    monkeypatch.chdir(tmp_path)
    argv = ["--stage", "full", "--ckpt", "moved.ckpt", "--data-dir", shared_data_dir, "--epochs", "4", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    assert (tmp_path / "lightning_logs" / "full" / "version_0" / "results.json").is_file()  # the default save dir
    assert not elsewhere.exists()
