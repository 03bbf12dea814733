"""What the tests share besides fixtures: small MNIST-format IDX files written by the tests themselves (no
network, no real data), scripts/train.py run in-process, and readers of what its runs leave."""

import gzip
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from mnist_lit.idx import FILES, raw_dir
from mnist_lit.train import main

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9)
)
OVERSIZED_YAML = {  # configs no run writes, each refused before it is parsed into data
    "alias_bomb": ALIAS_BOMB,  # under 2 KB; 9^10 strings once expanded
    "huge_string": "recipe: " + "x" * 20_000_000,
    "deep_nesting": "seed_everything: 0\nmodel: " + "[" * 200 + "]" * 200,
}


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor: magic 0x0800 + ndim, big-endian dimensions, then the bytes."""
    header = (0x800 + array.dim()).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.contiguous().numpy().tobytes()


def digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: label k lights a 6x6 block at a fixed place of its own, over faint noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8)
    images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = 2 + 5 * (label // 5) * 2, 2 + 5 * (label % 5)
        images[i, row : row + 6, col : col + 6] = 255
    return images, labels


def loss_before_and_after_one_step(model, batch, precision="32-true") -> tuple[float, float]:
    """The model's training-mode loss on ``batch`` (pixels 0..255, labels) before and after one step of
    training_step, run by a minimal Trainer."""

    def loss() -> float:
        model.train()
        with torch.no_grad():
            return F.nll_loss(model(batch[0]), batch[1]).item()

    before = loss()
    trainer = quiet_trainer(max_epochs=1, precision=precision)
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(*batch), batch_size=len(batch[1])))
    assert trainer.global_step == 1
    return before, loss()


def write_mnist(data_dir: Path, n_train: int = 320, n_test: int = 120, gz: bool = False, dataset="mnist") -> Path:
    """Write the four IDX files (optionally as .gz) under data_dir/<dataset folder>/raw; returns data_dir."""
    raw = raw_dir(data_dir, dataset)
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = digits(n, seed)
        for name, array in zip(FILES[split], (images, labels), strict=True):
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return data_dir


def previous_version_checkpoint(ckpt: dict) -> dict:
    """A checkpoint as the version before models took raw pixels wrote it: the pixel statistics as a float32
    buffer ``pixel_stats`` among the weights (that model took normalised images), no eval_split or pixel_stats
    among the hyperparameters."""
    old = {**ckpt, "hyper_parameters": dict(ckpt["hyper_parameters"]), "state_dict": dict(ckpt["state_dict"])}
    old["state_dict"]["pixel_stats"] = torch.tensor(old["hyper_parameters"].pop("pixel_stats"))
    del old["hyper_parameters"]["eval_split"]
    return old


# scripts/train.py in-process, and what its runs leave: shared by the test_cli_* files.
ROOT = Path(__file__).resolve().parents[1]


# 320 training images -> 288 train / 32 val with the default 10 %; batch 64 -> 5 steps per epoch.
INITIAL = ["--epochs", "4", "--save-freq", "2", "--lr", "0.05", "--milestones", "2", "3", "--quiet"]


def run(*argv) -> int:
    return main([str(a) for a in argv])


def train_from(ckpt, data_dir, save_dir, *argv, stage: str = "full") -> int:
    """scripts/train.py going on from ``ckpt`` (a new full stage, or with ``stage="initial"`` a resume), quietly."""
    return run("--stage", stage, "--ckpt", ckpt, "--data-dir", data_dir, "--save-dir", save_dir, "--quiet", *argv)


def quiet_trainer(**settings) -> pl.Trainer:
    """A Trainer on the CPU that writes and prints nothing: no logger, checkpoints, progress bar or summary."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def net_weights(ckpt_path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def epoch_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "log.txt").read_text().splitlines() if line.startswith("epoch ")]


def resolved_config(capsys, *argv) -> dict:
    """What --print_config prints: the settings a run with these options would have."""
    capsys.readouterr()
    assert run(*argv, "--print_config") == 0
    return yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])  # after the "--ckpt x -> path" line


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


def crafted_checkpoint(source: Path, out: Path, edit) -> Path:
    """A copy of a real checkpoint edited as plain data, as anyone can before handing a file out: ``edit``
    changes the loaded dict in place; torch's safe loader still reads the result."""
    ckpt = torch.load(source, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, out)
    torch.load(out, weights_only=True)
    return out
