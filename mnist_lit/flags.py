"""The command line's short forms: the flags of the original project and of earlier versions as the full names
LightningCLI derives from the classes, and ``--recipe NAME`` as ``--config configs/NAME.yaml``."""

from pathlib import Path

from mnist_lit.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The short flags of the original project and of earlier versions, as the full names the parser derives.
SHORT_FLAGS = {
    "--data-dir": "--data.data_dir",
    "--dataset": "--data.dataset",
    "--batch-size": "--data.batch_size",
    "--eval-batch-size": "--data.eval_batch_size",
    "--val-fraction": "--data.val_fraction",
    "--net": "--model.net",
    "--lr": "--model.lr",
    "--momentum": "--model.momentum",
    "--epochs": "--trainer.max_epochs",
    "--precision": "--trainer.precision",
    "--accelerator": "--trainer.accelerator",
    "--devices": "--trainer.devices",
    "--strategy": "--trainer.strategy",
    "--num-nodes": "--trainer.num_nodes",
    "--seed": "--seed_everything",
    "--save-dir": "--save_dir",
    "--save-freq": "--save_freq",
    "--resume": "--ckpt",
}
SWITCHES = {  # short flags without a value
    "--deterministic": "--trainer.deterministic=true",
    "--channels-last": "--model.channels_last=true",
    "--no-channels-last": "--model.channels_last=false",
    "--quiet": "--quiet=true",
}


def recipe_names() -> list[str]:
    """The recipes in configs/ (full.yaml is the full stage's settings, not a recipe)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "full")


def expand_short_flags(argv: list[str]) -> list[str]:
    """The short flags as their full names; ``--recipe NAME`` as ``--config configs/NAME.yaml``; the original's
    ``--train-full 0|1`` as ``--stage initial|full``. Everything else is left to the parser."""
    out, stages, i = [], {}, 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else None)
        step = 1 if inline else 2
        if flag in SWITCHES and not inline:
            out.append(SWITCHES[flag])
            step = 1
        elif flag == "--milestones":  # nargs: the numbers that follow
            numbers = [] if not inline else [inline]
            j = i + 1
            while not inline and j < len(argv) and argv[j].lstrip("-").isdigit():
                numbers.append(argv[j])
                j += 1
            out.append(f"--model.milestones=[{', '.join(numbers)}]")
            step = 1 if inline else j - i
        elif flag == "--recipe" and value is not None:
            if value not in recipe_names():
                raise UserError(f"unknown --recipe {value!r}: choose one of {', '.join(recipe_names())} ({CONFIGS})")
            out += ["--config", str(CONFIGS / f"{value}.yaml")]
        elif flag in ("--train-full", "--stage") and value is not None:
            stage = {"0": "initial", "1": "full"}.get(value, value) if flag == "--train-full" else value
            stages[flag] = (f"{flag} {value}", stage)
            out += ["--stage", stage]
        elif flag in SHORT_FLAGS and value is not None:
            out += [SHORT_FLAGS[flag], value]
        else:
            out.append(argv[i])
            step = 1
        i += step
    if len(stages) == 2 and stages["--train-full"][1] != stages["--stage"][1]:
        raise UserError(f"{stages['--train-full'][0]} contradicts {stages['--stage'][0]}")
    return out
