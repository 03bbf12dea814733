"""A checkpoint read as data: its contents (tensors and plain data only), the settings it records, and the config
stored in it.

``train.py --ckpt X`` starts from the config stored inside the checkpoint. LightningCLI instantiates any
``class_path`` a config names and resolves import paths given for callables, so a checkpoint from elsewhere
could choose which code runs. Before that config is parsed, ``checkpoint_config`` refuses anything in it that
names code, unless it is on the short allow-list below, and drops the paths it holds, so that where a new run
reads and writes comes from the command line (or the defaults), never from the checkpoint.
``--trust-checkpoint-config`` skips the check for a checkpoint the user vouches for.
"""

import pickle
import re
from pathlib import Path

import torch
import yaml

from mnist_lit.errors import UserError
from mnist_lit.runs import PATH_KEYS


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint safely (tensors and plain data only) and check it is one of ours."""
    if Path(path).is_dir():
        raise UserError(f"{path}: a folder, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:  # the pickle names a function or class: loading it could run code
            raise UserError(f"{path}: refused, it asks to load {found[1]} (only tensors and plain data)") from None
        raise UserError(f"{path}: not a readable checkpoint (not a torch file)") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError ... for truncated or foreign files
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or not a torch file: {type(err).__name__})"
        ) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "stage" not in run_settings(ckpt) or "state_dict" not in ckpt:
        raise UserError(f"{path}: not an mnist_lit checkpoint (no stage or weights in it)")
    return ckpt


def run_settings(ckpt: dict) -> dict:
    """The model's and the data's settings a checkpoint records (stage, dataset, seed, net, ...). Checkpoints of
    mnist_lit 0.1 kept stage and dataset among the model's hyperparameters; they are read the same way."""
    return {**ckpt.get("hyper_parameters", {}), **ckpt.get("datamodule_hyper_parameters", {})}


# Classes a stored config may name, with the arguments it may set for them: plain values only, no paths and no
# callables (an argument not listed, e.g. EMA's multi_avg_fn, must be null).
ALLOWED_CLASSES = {
    "mnist_lit.callbacks.EMAWithFreshBatchNorm": {
        "device", "use_buffers", "decay", "update_every_n_steps", "update_starting_at_step",
        "update_starting_at_epoch",
    },
    "pytorch_lightning.callbacks.EarlyStopping": {
        "monitor", "min_delta", "patience", "verbose", "mode", "strict", "check_finite", "stopping_threshold",
        "divergence_threshold", "check_on_train_epoch_end", "log_rank_zero_only",
    },
    "pytorch_lightning.callbacks.LearningRateMonitor": {"logging_interval", "log_momentum", "log_weight_decay"},
    "pytorch_lightning.callbacks.DeviceStatsMonitor": {"cpu_stats"},
    "pytorch_lightning.callbacks.ModelSummary": {"max_depth"},
    "pytorch_lightning.callbacks.Timer": {"duration", "interval", "verbose"},
}  # fmt: skip
# A dotted name such as ``builtins.print``: jsonargparse resolves such a string to the object it names.
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
TRUST_FLAG = "--trust-checkpoint-config"


def checkpoint_config(text: str, source) -> str:
    """The config stored in a checkpoint as YAML to parse: its paths dropped; UserError if it names code that is
    not allowed."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        raise UserError(f"{source}: its stored settings are not a config (not a YAML mapping)")
    refuse_code(config, "", source)
    for *parents, key in (path.split(".") for path in PATH_KEYS):  # from the command line, never a checkpoint
        section = config
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(key, None)
    return yaml.safe_dump(config, sort_keys=False)


def refuse_code(value, key: str, source) -> None:
    """Raise UserError naming the first key under ``value`` that names code not on the allow-list."""

    def refuse(what: str):
        raise UserError(
            f"{source}: its stored settings name code at {key or 'the top level'} ({what}); refused, since a "
            f"checkpoint's settings are data. If you trust this checkpoint, pass {TRUST_FLAG}"
        )

    if isinstance(value, dict):
        if "class_path" in value:
            class_path = value["class_path"]
            allowed = ALLOWED_CLASSES.get(class_path)
            if allowed is None:
                refuse(f"class {class_path}")
            extra = set(value) - {"class_path", "init_args"}
            if extra:
                refuse(f"{', '.join(sorted(extra))} of {class_path}")
            init_args = value.get("init_args") or {}
            if not isinstance(init_args, dict):
                refuse(f"init_args of {class_path}")
            for name, arg in init_args.items():
                if name not in allowed and arg is not None:
                    refuse(f"argument {name} of {class_path}")
                refuse_code(arg, f"{key}.init_args.{name}", source)
            return
        for name, item in value.items():
            refuse_code(item, f"{key}.{name}" if key else str(name), source)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            refuse_code(item, f"{key}[{i}]", source)
    elif isinstance(value, str) and IMPORT_PATH.fullmatch(value):
        refuse(f"import path {value}")
