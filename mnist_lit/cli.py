"""The settings of ``scripts/train.py`` (run by ``mnist_lit.train``): LightningCLI over MNISTLitModule,
MNISTDataModule and the Trainer, for both stages.

Every constructor argument is a setting: ``--model.X``, ``--data.X``, ``--trainer.X``, or a key of a YAML file
given with ``--config`` (``configs/seed.yaml`` is always read first; ``--recipe NAME`` is short for ``--config
configs/NAME.yaml``). One code path serves every run:
- a new ``initial`` stage (no ``--ckpt``);
- a new ``full`` stage from an initial-stage checkpoint: the run's settings from the checkpoint, then
  ``configs/full.yaml``, then the command line; Lightning restores weights, epoch and step (the curves go on),
  then a fresh optimizer takes over, as in the original project;
- an exact resume of an interrupted run (``--ckpt`` of the same stage): the checkpoint's settings, unchanged;
  Lightning restores weights, optimizer, scheduler, epoch and step; the data order depends only on (seed, epoch).
Each invocation writes into a new ``<save_dir>/<stage>/version_N`` and never touches an earlier run.
"""

import logging
import os
from pathlib import Path
from typing import Literal

import yaml
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from mnist_lit import callbacks, loggers
from mnist_lit.checkpoint_config import TRUST_FLAG, checkpoint_config
from mnist_lit.checkpoint_file import load_checkpoint
from mnist_lit.checkpoint_io import RunCheckpointIO
from mnist_lit.data import MNISTDataModule, eval_split_of
from mnist_lit.errors import UserError
from mnist_lit.flags import CONFIGS
from mnist_lit.inference import check_weights, model_settings
from mnist_lit.module import MNISTLitModule
from mnist_lit.net import draws_random_numbers
from mnist_lit.run_config import RunConfig
from mnist_lit.runs import launched_as_rank_zero, new_run_dir, remove_run_dir, resolve_ckpt, run_version
from mnist_lit.threads import training_follows

# Lightning-launched DDP processes read the checkpoint rank 0 resolved: a bare name could name another file by then.
CKPT_ENV = "MNIST_LIT_CKPT"

# What a resume may change: where things go, what is printed, the hardware, and (not for OneCycle) the last epoch.
MAY_CHANGE_ON_RESUME = set(
    "ckpt save_dir save_freq quiet data.data_dir data.download trainer.max_epochs trainer.accelerator "
    "trainer.devices trainer.strategy trainer.num_nodes trainer.deterministic trainer.enable_progress_bar "
    "trainer.enable_model_summary trainer.logger".split()
)
TRAINER_DEFAULTS = {
    "num_sanity_val_steps": 0,  # no sanity check: the first real validation comes after one epoch anyway
    "use_distributed_sampler": False,  # our in-memory loaders split the batches between DDP processes themselves
}


class MNISTCLI(LightningCLI):
    """LightningCLI with this project's run handling: stages, checkpoints found by name, one folder per run."""

    def __init__(self, args: list[str], trust_checkpoint_config: bool = False):
        self.trust_checkpoint_config = trust_checkpoint_config
        self.run_dir: Path | None = None
        self.ckpt_path: Path | None = None
        self.resume = False
        super().__init__(
            MNISTLitModule,
            MNISTDataModule,
            save_config_callback=RunConfig,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"default_config_files": [str(CONFIGS / "seed.yaml")], "exit_on_error": False},
            args=args,
            run=False,
            auto_configure_optimizers=False,  # the module's configure_optimizers reads its own settings
            load_from_checkpoint_support=False,  # hyperparameters stay plain keyword arguments
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--stage",
            type=Literal["initial", "full"],
            default="initial",
            help="initial: 90/10 split; full: all 60k, from an initial-stage checkpoint (--ckpt)",
        )
        parser.add_argument(
            "--ckpt",
            type=str | None,
            default=None,
            help="checkpoint to resume (same stage) or to start the full stage from; a bare name such as last.ckpt "
            "means that file of the newest initial-stage run under --save_dir. The checkpoint's stored settings are "
            f"read as data (no code they name runs; their paths are not used) unless {TRUST_FLAG} is given",
        )
        parser.add_argument("--save_dir", default="lightning_logs", help="runs go to SAVE_DIR/STAGE/version_N")
        parser.add_argument("--save_freq", type=int, default=5, help="keep a numbered checkpoint every N epochs")
        parser.add_argument("--quiet", type=bool, default=False, help="no progress bar or Lightning banners")
        parser.add_argument(
            "--full_epochs",
            type=int | None,
            default=None,
            help="the full stage's length when "
            "--epochs is not given: its last epoch is the checkpoint's + this (configs/full.yaml: "
            "20, epochs 21-40 as in the original)",
        )
        parser.add_argument(
            "--recipe",
            type=str | None,
            default=None,
            help="the recipe's name, for the records (set by its config file; --recipe NAME reads configs/NAME.yaml)",
        )
        parser.link_arguments("seed_everything", "data.seed")
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("stage", "data.stage")
        parser.link_arguments("stage", "model.eval_split", compute_fn=eval_split_of)
        parser.link_arguments("data", "model.pixel_stats", compute_fn=training_pixel_stats, apply_on="instantiate")

    def parse_arguments(self, parser, args: list[str]) -> None:
        """Parse; with --ckpt, parse again on top of the checkpoint's own config (and configs/full.yaml for a new
        full stage), so that the command line changes only what it names."""
        printing = [a for a in args if a.startswith("--print_config")]
        args = [a for a in args if a not in printing]
        first = parser.parse_args(args)
        if not first.ckpt:
            if first.stage == "full":
                raise UserError(
                    "--stage full needs --ckpt: the initial stage's checkpoint to go on from (e.g. last.ckpt)"
                )
            check_seed(first)
            check_last_epoch_validated(first)
            self.config = parser.parse_args([*args, *printing]) if printing else first
            return
        env_ckpt = None if launched_as_rank_zero() else os.environ.get(CKPT_ENV)
        self.ckpt_path = Path(env_ckpt) if env_ckpt else resolve_ckpt(first.ckpt, first.save_dir, first.stage)
        ckpt = load_checkpoint(self.ckpt_path)
        check_weights(ckpt, self.ckpt_path)  # its weights must fit its architecture before anything starts
        if "config" not in ckpt:
            raise UserError(
                f"{self.ckpt_path} was written by mnist_lit 0.1, before configs: train.py cannot go on from it "
                "(evaluate.py, predict.py and export.py still read it)"
            )
        stored = ckpt["config"]
        if not self.trust_checkpoint_config:  # data, not code: nothing it names runs, its paths are not used
            stored = checkpoint_config(stored, self.ckpt_path)
        saved_stage = yaml.safe_load(stored).get("stage")
        if saved_stage == "full" and first.stage == "initial":
            raise UserError(f"{self.ckpt_path} is a full-stage checkpoint: resume it with --stage full")
        self.resume = saved_stage == first.stage
        layers = ["--config", stored] + ([] if self.resume else ["--config", str(CONFIGS / "full.yaml")])
        ckpt_arg = ["--ckpt", str(self.ckpt_path.resolve())]
        base = parser.parse_args([*layers, *ckpt_arg])
        self.config = parser.parse_args([*layers, *args, *ckpt_arg])
        check_seed(self.config)
        done = ckpt["epoch"] + 1  # our checkpoints are written at the end of an epoch
        changed = changed_settings(parser, base, self.config)
        if self.resume:
            refused = sorted(changed - MAY_CHANGE_ON_RESUME)
            if refused:
                key = refused[0]
                raise UserError(
                    f"resuming keeps the run's settings: {key} {self.config[key]} differs from the checkpoint's "
                    f"{base[key]}"
                )
            if self.config.model.schedule == "onecycle" and self.config.trainer.max_epochs != base.trainer.max_epochs:
                raise UserError(f"a onecycle run keeps its --epochs {base.trainer.max_epochs}: its schedule is fixed")
        else:
            for key in ("model.net", "data.dataset"):  # the full stage goes on from the checkpoint's weights
                if key in changed:
                    raise UserError(
                        f"the full stage goes on from the checkpoint's weights: {key} {self.config[key]} differs "
                        f"from its {base[key]}"
                    )
            if self.config.trainer.max_epochs is None:
                full_epochs = self.config.full_epochs
                if type(full_epochs) is not int or full_epochs < 1:
                    raise UserError(f"--full_epochs must be an integer >= 1 (got {full_epochs}), or give --epochs")
                self.config.trainer.max_epochs = done + full_epochs
        # The net the settings make must be the checkpoint's (another dropout: fine; another width: not its weights).
        model = {**model_settings(ckpt, self.ckpt_path), **{k: self.config.model[k] for k in ("net", "net_options")}}
        check_weights(ckpt, self.ckpt_path, model)
        if self.config.trainer.max_epochs <= done:
            raise UserError(
                f"--epochs {self.config.trainer.max_epochs} is not beyond the checkpoint's epoch {done}: nothing to "
                "train"
            )
        check_last_epoch_validated(self.config)
        if printing:  # print the resolved settings and exit
            parser.parse_args(
                [*layers, *args, *ckpt_arg, f"--trainer.max_epochs={self.config.trainer.max_epochs}", *printing]
            )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # jsonargparse wraps what a link raises: data that cannot be read (see below)
            if isinstance(err.__cause__, UserError):
                raise err.__cause__ from None
            raise

    def instantiate_trainer(self, **kwargs):
        """The Trainer of a run, after rank 0 checked the data and made the run folder (other ranks have none)."""
        config, given = self.config, self.config_init.trainer
        if launched_as_rank_zero():  # the data was checked when the model was made (training_pixel_stats)
            self.run_dir = new_run_dir(config.save_dir, config.stage)
        checkpoints = self.run_dir / "checkpoints" if self.run_dir else None  # Lightning broadcasts rank 0's
        run_callbacks = [
            callbacks.DivergenceStop(),
            LearningRateMonitor(logging_interval="epoch"),
            callbacks.NumberedCheckpoint(checkpoints, every_n_epochs=config.save_freq),
            callbacks.last_checkpoint(checkpoints),
        ]
        if self.ckpt_path:  # the callback state it brings back is checked first
            run_callbacks.insert(0, callbacks.CheckedRestore(new_stage=not self.resume))
        if self.ckpt_path and not self.resume:
            run_callbacks.insert(0, callbacks.FreshOptimizer())
        if training_follows():  # only then (it changes the numbers): a callback's hooks cost time on every step
            run_callbacks.append(callbacks.ThreadsForFreeCores())
        if draws_random_numbers(self.model.net):  # only then: a callback's hooks cost time on every step
            run_callbacks.append(callbacks.StepSeededRNG())
        show = not config.quiet
        if config.quiet:  # Lightning's banners (GPU available, ...); console() restores the level afterwards
            logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        if show and given.enable_progress_bar is not False:
            run_callbacks.append(callbacks.EpochProgressBar(refresh_rate=20))
        version = run_version(self.run_dir) if self.run_dir else None
        tensorboard = loggers.TensorBoard(config.save_dir, name=config.stage, version=version)
        extra_loggers = listed([] if given.logger in (None, True) else given.logger)
        for logger in extra_loggers:  # a logger from the command line numbers its versions as the run folders
            if getattr(logger, "_version", 0) is None:  # Lightning's loggers: None until they pick one themselves
                logger._version = version
        extra_loggers = [loggers.EpochsFromOne(logger) for logger in extra_loggers]
        run_loggers = False if given.logger is False else [tensorboard, loggers.EpochLines(), *extra_loggers]
        self.save_config_kwargs = {"run_dir": self.run_dir}
        try:  # Lightning checks --accelerator, --devices, --strategy, --num-nodes here
            return super().instantiate_trainer(
                callbacks=[*listed(given.callbacks), *run_callbacks],
                logger=run_loggers,
                plugins=[RunCheckpointIO(checkpoints), *listed(given.plugins)],
                enable_progress_bar=show and given.enable_progress_bar is not False,
                enable_model_summary=show and given.enable_model_summary is not False,
            )
        except SETTINGS_ERRORS as err:
            if self.run_dir is not None:
                remove_run_dir(self.run_dir)  # still empty: a run that cannot start leaves nothing behind
            raise UserError(f"the Trainer refused the options: {first_error(err)}") from None


# What building or setting up the Trainer, its callbacks, loggers and plugins raises for settings it cannot use
# (a clash of callbacks, a missing optional package, a bad value): one error line for the user, not a traceback.
SETTINGS_ERRORS = (MisconfigurationException, ImportError, ValueError, TypeError, RuntimeError)


def first_error(err: Exception) -> str:
    """An exception's message on one line; of jsonargparse's list of errors for a union type, the first."""
    text = str(err)
    if "\nErrors:\n" in text:
        text = text.split("\nErrors:\n", 1)[1].split("\n", 1)[0].lstrip(" -")
    return " ".join(text.split())[:400]


def training_pixel_stats(data: MNISTDataModule) -> tuple[float, float]:
    """The training images' pixel statistics, handed to the model as it is made (LightningCLI's link). Rank 0
    checks or downloads the files first: missing or corrupt data fails here, before a run folder is made. The
    other ranks read them (Lightning's DDP starts them after that; with torchrun or srun the files must already be
    there). The decoded tensors are kept for Lightning's own setup call."""
    if launched_as_rank_zero():
        data.prepare_data()
    data.setup()
    return data.mean, data.std


def listed(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def check_seed(config) -> None:
    seed = config.seed_everything
    if type(seed) is not int or seed < 0:
        raise UserError(f"--seed must be an integer >= 0 (got {seed}): runs are reproducible by their seed")


def check_last_epoch_validated(config) -> None:
    """A run's results are its last epoch's evaluation: --trainer.check_val_every_n_epoch N must reach it."""
    every, epochs = config.trainer.check_val_every_n_epoch, config.trainer.max_epochs
    if every and epochs and epochs % every:
        raise UserError(
            f"--trainer.check_val_every_n_epoch {every} skips the evaluation of the last epoch "
            f"({epochs}): the run's results would be an earlier epoch's; give a divisor of it"
        )


def changed_settings(parser, base, config) -> set[str]:
    """The dotted keys whose values differ between two parsed configs."""
    a, b = (yaml.safe_load(parser.dump(c, skip_unset=False)) for c in (base, config))

    def flat(d: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in d.items():
            if isinstance(value, dict) and key in ("model", "data", "trainer"):
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    fa, fb = flat(a), flat(b)
    return {key for key in fa.keys() | fb.keys() if fa.get(key) != fb.get(key)}
