"""The settings a checkpoint stores (its run's config), read through a schema, never by a config parser.

``train.py --ckpt X`` starts from the settings stored in the checkpoint. A config parser would do what such a
file says: instantiate the classes it names, parse a string again as YAML, read a string as a file. So the stored
YAML is first read as plain data (small, not deeply nested, no anchors or aliases) and every key checked against
this project's settings: the model's and the data's (their constructors' annotations), the Trainer's plain flags,
and callbacks from a short allow-list, named in full in the ``class_path``/``init_args`` form, with plain
arguments. A value must be of its setting's type: a string stays a string. Where a run reads and writes (its
paths) and its loggers are dropped: they come from the command line. Anything else is refused with one line
naming the key, before a run folder is made, unless ``--trust-checkpoint-config``.
"""

import inspect
from typing import Literal

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import DeviceStatsMonitor, EarlyStopping, LearningRateMonitor, ModelSummary, Timer

from mnist_lit.callbacks import EMAWithFreshBatchNorm
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import UserError
from mnist_lit.idx import DATASETS
from mnist_lit.module import MNISTLitModule
from mnist_lit.net import NETS, net_option_types
from mnist_lit.runs import PATH_KEYS
from mnist_lit.schema import Matching, SchemaError, check, check_mapping, plain_yaml, shown, signature_types

TRUST_FLAG = "--trust-checkpoint-config"

# Set by the command line, never by a checkpoint: where a run reads and writes, and what it logs to.
DROPPED = {*PATH_KEYS, "trainer.logger"}
# Set from other settings as the run is made (LightningCLI's links): not in a config.
LINKED = {"seed", "eval_split", "pixel_stats", "stage"}

TOP_LEVEL = {
    "seed_everything": int,
    "stage": Literal["initial", "full"],
    "save_freq": int,
    "quiet": bool,
    "full_epochs": int | None,
    "recipe": Matching.of(r"[\w.-]{1,64}", "a recipe name"),
}
DEVICE = Matching.of(r"(cpu|cuda|mps|auto)(:\d+)?", "a device name")
DURATION = Matching.of(r"\d{1,3}:\d\d:\d\d:\d\d", "DD:HH:MM:SS") | dict[str, int] | None
# The Trainer's flags with the types they take from a file: their own annotations, except where those admit
# objects or free strings (a Strategy, a Profiler, a registry name).
TRAINER_TYPES = {
    **signature_types(pl.Trainer),
    "accelerator": Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"],
    "strategy": Matching.of(
        r"auto|ddp(_spawn|_fork|_notebook)?(_find_unused_parameters_(true|false))?", "a DDP strategy"
    ),
    "devices": int | list[int] | Matching.of(r"auto|-1|\d+(,\d+)*,?", "auto, -1 or device numbers"),
    "max_time": DURATION,
    "val_check_interval": int | float | None,
    "gradient_clip_algorithm": Literal["norm", "value"] | None,
    "profiler": Literal["simple", "advanced", "pytorch"] | None,
    "model_registry": None,
    "plugins": None,
}
TRAINER_TYPES = {flag: hint for flag, hint in TRAINER_TYPES.items() if f"trainer.{flag}" not in DROPPED}


def argument_types(cls, names: str, **narrower) -> dict:
    """The arguments a file may set for ``cls``: ``names`` with the constructor's types, and those ``narrower``."""
    declared = signature_types(cls)
    return {**{name: declared[name] for name in names.split()}, **narrower}


# The callbacks a stored config may name (in full), with the arguments it may set.
CALLBACK_TYPES = {
    "mnist_lit.callbacks.EMAWithFreshBatchNorm": argument_types(
        EMAWithFreshBatchNorm,
        "use_buffers decay update_every_n_steps update_starting_at_step update_starting_at_epoch",
        device=DEVICE | int | None,
    ),
    "pytorch_lightning.callbacks.EarlyStopping": argument_types(
        EarlyStopping,
        "monitor min_delta patience verbose strict check_finite stopping_threshold divergence_threshold "
        "check_on_train_epoch_end log_rank_zero_only",
        mode=Literal["min", "max"],
    ),
    "pytorch_lightning.callbacks.LearningRateMonitor": argument_types(
        LearningRateMonitor, "logging_interval log_momentum log_weight_decay"
    ),
    "pytorch_lightning.callbacks.DeviceStatsMonitor": argument_types(DeviceStatsMonitor, "cpu_stats"),
    "pytorch_lightning.callbacks.ModelSummary": argument_types(ModelSummary, "max_depth"),
    "pytorch_lightning.callbacks.Timer": argument_types(
        Timer, "verbose", duration=DURATION, interval=Literal["step", "epoch"]
    ),
}


def model_types(linked: bool = False) -> dict:
    """The model's settings and their types (with ``linked``: also those the run sets, as a checkpoint's
    hyperparameters hold them)."""
    types = {**signature_types(MNISTLitModule), "net": Literal[tuple(NETS)]}
    return {name: hint for name, hint in types.items() if linked or name not in LINKED}


def data_types(linked: bool = False) -> dict:
    types = {**signature_types(MNISTDataModule), "dataset": Literal[tuple(DATASETS)]}
    return {name: hint for name, hint in types.items() if linked or name not in LINKED}


def check_model_settings(values, key: str, linked: bool = False) -> None:
    """SchemaError unless ``values`` are model settings of their types, ``net_options`` those of the net."""
    types = model_types(linked)
    check_mapping(values, {**types, "net_options": dict | None}, key)
    if values.get("net_options") is not None:
        net = values.get("net", inspect.signature(MNISTLitModule).parameters["net"].default)
        check_mapping(values["net_options"], net_option_types(net), f"{key}.net_options")


def check_callbacks(value, key: str) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise SchemaError(key, f"{shown(value)} is not a list of callbacks (class_path and init_args each)")
    for i, spec in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(spec, dict) or not set(spec) <= {"class_path", "init_args"} or "class_path" not in spec:
            raise SchemaError(where, "a callback is a mapping of class_path and init_args only")
        if spec["class_path"] not in CALLBACK_TYPES:
            allowed = ", ".join(CALLBACK_TYPES)
            raise SchemaError(f"{where}.class_path", f"{shown(spec['class_path'])} is not one of {allowed}")
        # An argument a config dump lists as null is not given: only those of the allow-list may be set.
        init_args = spec.get("init_args") or {}
        check(init_args, dict, f"{where}.init_args")
        arguments = {name: value for name, value in init_args.items() if value is not None}
        check_mapping(arguments, CALLBACK_TYPES[spec["class_path"]], f"{where}.init_args")


def check_settings(config) -> dict:
    """The stored settings checked (SchemaError naming the first key that is not plain data of its type), with
    the paths and loggers dropped, in any spelling."""
    if not isinstance(config, dict):
        raise SchemaError("the top level", "not a mapping of settings")
    config = {key: value for key, value in config.items() if key not in DROPPED}
    for key, value in config.items():
        if key in ("model", "data", "trainer"):
            if not isinstance(value, dict):
                raise SchemaError(key, f"{shown(value)} is not a mapping of settings")
            config[key] = {name: v for name, v in value.items() if f"{key}.{name}" not in DROPPED}
        elif key not in TOP_LEVEL:
            raise SchemaError(str(key), "not a setting this version knows")
        else:
            check(value, TOP_LEVEL[key], key)
    check_model_settings(config.get("model", {}), "model")
    check_mapping(config.get("data", {}), data_types(), "data")
    trainer = dict(config.get("trainer", {}))
    check_callbacks(trainer.pop("callbacks", None), "trainer.callbacks")
    check_mapping(trainer, TRAINER_TYPES, "trainer")
    return config


def checkpoint_config(text, source) -> str:
    """The settings stored in a checkpoint, checked and without paths, as YAML to parse; UserError naming the
    first key that is not one of this project's settings of its type."""
    try:
        config = plain_yaml(text)
    except SchemaError as err:
        raise UserError(f"{source}: its stored settings are refused: {err.problem}") from None
    except yaml.YAMLError as err:
        why = " ".join(str(err).split())[:120]
        raise UserError(f"{source}: its stored settings are refused: not YAML ({why})") from None
    try:
        config = check_settings(config)
    except SchemaError as err:
        raise UserError(
            f"{source}: its stored settings are refused at {err.key}: {err.problem}; a checkpoint's settings are "
            f"data. If you trust this checkpoint, pass {TRUST_FLAG}"
        ) from None
    return yaml.safe_dump(config, sort_keys=False)
