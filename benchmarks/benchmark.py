"""Is Lightning's structure free? Time the same training several ways, interleaved, in one run.

Run: ``python benchmarks/benchmark.py --data-dir ../shared/data [--epochs 1] [--rounds 3] [--net linear]
[--variants plain ours ...] [--out benchmark.json]``, or ``python benchmarks/benchmark.py --data-dir ../shared/data
--protocol --epochs 20`` for the whole two-stage protocol.

1. ``plain``: a plain PyTorch loop over in-memory tensors (the reference, written out below);
2. ``ours``: this project, exactly as its command line (``mnist_lit.train``) runs it with ``--quiet`` (DataModule +
   LightningModule + Trainer, checkpoints, TensorBoard, run directory and all);
3. ``obvious``: the usual Lightning tutorial setup: torchvision ``datasets.MNIST`` with ``ToTensor`` and
   ``Normalize``, ``random_split``, a ``DataLoader``, per-step ``self.log``, a default ``Trainer``;
4. ``bare``: the floor of Lightning's own cost: the plain loop's step as a LightningModule's (manual) training_step,
   under a Trainer with checkpoints, logging, progress bar and model summary off;
5. ``bare_auto``: ``bare`` with Lightning's automatic optimization (training_step returns the loss,
   configure_optimizers the SGD; the Trainer zeroes the gradients, calls backward and steps): the floor of the
   usual way to write a LightningModule;
``bare_auto_callbacks`` and ``bare_auto_metrics`` add to ``bare_auto`` one part of what this project adds to a
step: five callbacks that do nothing (as many as ``ours`` has), the training metrics' updates; and, to see what
the speed options buy: ``ours_bf16_cl`` (``--precision bf16-mixed --channels-last``), the plain
loop with the same two (``plain_bf16_cl``) and the plain loop under ``torch.compile`` (``plain_compiled``).

Same net (LeNet; ``--net linear``: one Linear layer, so that the times are almost all the code around the
net), the seed protocol's batch and SGD (64, lr 0.01, momentum 0.5: the defaults of MNISTDataModule and
MNISTLitModule, read from there), same number of epochs, each epoch = 54k training images + 6k validation images.
With ``--protocol`` each measurement is the whole two-stage protocol instead (``scripts/run_all.sh``: EPOCHS
initial epochs with lr /10 after epochs 2 and 10, then EPOCHS full-stage epochs on all 60k at configs/full.yaml's
lr (1e-4) from a fresh SGD, each evaluated on the 10k test images). Every measurement runs in a fresh process (so
peak RSS is its own) and times everything after the imports: reading the data, building the model, training,
evaluating. The variants take turns round by round (in reverse order every other round); the median of the rounds
is reported, with the ratio to ``plain`` and, where it ran, to ``bare_auto`` (the median of each round's own ratio),
seconds per epoch, milliseconds per training step (the whole run's time over its steps) and the seconds per epoch
over the plain loop (Lightning's own parity test allows 0.3 s).

The per-step cost itself (``--epochs`` 2 or more): every variant but ``obvious`` stamps each training batch as it
is taken (``StepClock``: the plain loop in its loop, the others where ``InMemoryLoader`` yields the batch), and
the mean interval between stamps within the epochs after the first is the cost of one step with a run's one-time
costs (parsing, TensorBoard's import, the run folder, reading the data, the first epoch's warm-up) and each
epoch's end (evaluation, checkpoint) left out; ratios again as the median of each round's own.

``--accelerator gpu``: every variant on one CUDA GPU, each split moved to the GPU once and every batch cut out
there (the plain loop draws its permutation there too), accuracies counted on the device and read once; CUDA's
start-up is inside every timing alike. Use ``--epochs 3`` or more there: an epoch takes about a second.
"""

import argparse
import contextlib
import functools
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mnist_lit.threads import share_the_cpu

share_the_cpu()  # before torch starts: OpenMP reads its environment once

import torch
import torch.nn.functional as F
import yaml

from mnist_lit.data import InMemoryLoader, MNISTDataModule, normalize, pixel_stats, split_indices
from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.idx import load_split, raw_dir
from mnist_lit.module import MNISTLitModule, split_metrics
from mnist_lit.net import NETS

ROOT = Path(__file__).resolve().parents[1]
SPEED_OPTIONS = ("--precision", "bf16-mixed", "--channels-last")
DEVICES = {"cpu": "cpu", "gpu": "cuda"}  # --accelerator -> torch device


class StepClock:
    """perf_counter() stamps of the training batches as they are taken, epoch by epoch."""

    def __init__(self):
        self.epochs: list[list[float]] = []

    def new_epoch(self) -> None:
        self.epochs.append([])

    def tick(self) -> None:
        self.epochs[-1].append(time.perf_counter())

    def ms_per_step(self) -> float | None:
        """The mean interval between consecutive stamps of the same epoch, over the epochs after the first."""
        later = [stamps for stamps in self.epochs if stamps][1:]  # an iterator started and left unused: no epoch
        intervals = sum(len(stamps) - 1 for stamps in later)
        return 1000 * sum(stamps[-1] - stamps[0] for stamps in later) / intervals if intervals else None


CLOCK = StepClock()  # one measurement per process (run_child)


@functools.cache
def seed_settings() -> dict:
    """The seed protocol's settings that the hand-written variants copy, read from their single source: the
    constructor defaults of MNISTLitModule and MNISTDataModule, and configs/full.yaml's lr for the full stage."""

    def defaults(cls, *names: str) -> dict:
        return {name: inspect.signature(cls).parameters[name].default for name in names}

    full_stage = yaml.safe_load((ROOT / "configs" / "full.yaml").read_text())["model"]
    return {
        **defaults(MNISTLitModule, "lr", "momentum", "milestones", "gamma"),
        **defaults(MNISTDataModule, "batch_size", "eval_batch_size", "val_fraction"),
        "full_stage_lr": full_stage["lr"],
    }


def plain(
    data_dir: str,
    epochs: int,
    protocol: bool,
    net_name: str,
    accelerator: str = "cpu",
    bf16_cl: bool = False,
    compiled: bool = False,
) -> float:
    """The reference: a plain PyTorch loop. On a GPU the whole dataset is moved to it once and every batch is cut
    out there, with the permutation drawn there too: no host-to-device copy and no host sync per step. Returns the
    last evaluation's accuracy."""
    s = seed_settings()
    batch, eval_batch = s["batch_size"], s["eval_batch_size"]
    device = torch.device(DEVICES[accelerator])
    torch.manual_seed(0)
    images, labels = load_split(raw_dir(data_dir), "train")
    mean, std = pixel_stats(images)
    train_idx, val_idx = split_indices(len(labels), s["val_fraction"], seed=0)
    initial_milestones = s["milestones"] if protocol else [epochs + 1]  # one lr throughout, unless the protocol's
    # (training images, labels, evaluation images, labels, lr, milestones) of each stage
    stages = [(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], s["lr"], initial_milestones)]
    if protocol:  # the full stage: a constant lr (configs/full.yaml's milestones: [])
        stages.append((images, labels, *load_split(raw_dir(data_dir), "test"), s["full_stage_lr"], []))
    stages = [(*(t.to(device) for t in stage[:4]), *stage[4:]) for stage in stages]  # no-op on the CPU
    net = NETS[net_name]().to(device)
    if bf16_cl:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if compiled else net

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, mean, std)
        if bf16_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16_cl else contextlib.nullcontext():
            return model(x).float()

    for train_x, train_y, eval_x, eval_y, lr, milestones in stages:
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=s["momentum"])  # fresh in each stage
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, s["gamma"])
        for epoch in range(epochs):
            net.train()
            generator = torch.Generator(device).manual_seed(epoch)
            order = torch.randperm(len(train_y), generator=generator, device=device)
            CLOCK.new_epoch()
            for idx in order.split(batch):
                CLOCK.tick()
                optimizer.zero_grad()
                F.nll_loss(forward(train_x[idx]), train_y[idx]).backward()
                optimizer.step()
            scheduler.step()
            net.eval()
            with torch.no_grad():  # counted on the device; read once, after the last evaluation
                correct = sum(
                    (forward(x).argmax(1) == y).sum()
                    for x, y in zip(eval_x.split(eval_batch), eval_y.split(eval_batch))
                )
    return int(correct) / len(eval_y)


def ours(
    data_dir: str, epochs: int, protocol: bool, net_name: str, accelerator: str = "cpu", options: tuple[str, ...] = ()
) -> float:
    """This project's pipeline, as its command line (and, with ``protocol``, scripts/run_all.sh) runs it."""
    from mnist_lit.train import main

    with tempfile.TemporaryDirectory() as save_dir:
        common = ["--data-dir", data_dir, "--save-dir", save_dir, "--quiet"]
        common += ["--accelerator", "gpu", "--devices", "1"] if accelerator == "gpu" else []
        initial = [*common, "--epochs", str(epochs), "--net", net_name, *options]
        if not protocol:
            initial += ["--milestones", str(epochs + 1)]  # one lr throughout, as in the other variants
        if main(initial) != 0:
            raise UserError("training failed")
        if protocol and main([*common, "--stage", "full", "--ckpt", "last.ckpt", "--epochs", str(2 * epochs)]) != 0:
            raise UserError("full stage failed")
        stage = "full" if protocol else "initial"
        return json.loads(next(Path(save_dir).glob(f"{stage}/version_0/results.json")).read_text())["acc"]


def bare(
    data_dir: str,
    epochs: int,
    protocol: bool,
    net_name: str,
    accelerator: str = "cpu",
    automatic: bool = False,
    callbacks: int = 0,
    metrics: bool = False,
) -> float:
    """The least the Trainer's loop can cost: the plain loop's step as a LightningModule's training_step (manual
    optimization; ``automatic``: Lightning's automatic optimization), the same in-memory batches (on a GPU: cut
    out on the device, as in the plain loop), and a Trainer with checkpoints, logging, progress bar and model
    summary off. What this project adds to a step, one part at a time: ``callbacks`` that do nothing (the cost of
    the Trainer calling their hooks), ``metrics``: the training step's accuracy and mean loss, MNISTLitModule's
    torchmetrics objects, updated every step and logged per epoch as it does."""
    import pytorch_lightning as pl

    if protocol:
        raise UserError("the bare Lightning loop has no --protocol mode (it has no checkpoints to go on from)")
    s = seed_settings()

    class BareModule(pl.LightningModule):
        def __init__(self, mean: float, std: float):
            super().__init__()
            self.net, self.mean, self.std = NETS[net_name](), mean, std
            self.automatic_optimization = automatic
            self.correct = torch.zeros((), dtype=torch.long)
            if metrics:
                self.train_acc, self.train_loss = split_metrics()

        def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            log_probs = self.net(normalize(images, self.mean, self.std))
            loss = F.nll_loss(log_probs, targets)
            if metrics:
                self.train_acc.update(log_probs, targets)
                self.train_loss.update(loss.detach().expand(len(targets)))
            return loss

        def on_train_epoch_end(self):
            if metrics:
                self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
                self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)

        def training_step(self, batch, batch_idx):
            if automatic:  # the Trainer zeroes the gradients, calls backward and steps the optimizer
                return self.loss(*batch)
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(self.loss(*batch))
            optimizer.step()

        def on_validation_epoch_start(self):
            self.correct = torch.zeros((), dtype=torch.long, device=self.device)

        def validation_step(self, batch, batch_idx):  # counted on the device, as in the plain loop
            images, targets = batch
            self.correct += (self.net(normalize(images, self.mean, self.std)).argmax(1) == targets).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=s["lr"], momentum=s["momentum"])

    torch.manual_seed(0)
    images, labels = load_split(raw_dir(data_dir), "train")
    train_idx, val_idx = split_indices(len(labels), s["val_fraction"], seed=0)
    module = BareModule(*pixel_stats(images))
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[pl.Callback() for _ in range(callbacks)],
    )
    device = DEVICES[accelerator]
    train = InMemoryLoader(images[train_idx].to(device), labels[train_idx].to(device), s["batch_size"], shuffle=True)
    val = InMemoryLoader(images[val_idx].to(device), labels[val_idx].to(device), s["eval_batch_size"], shuffle=False)
    trainer.fit(module, train, val)
    return int(module.correct) / len(val_idx)


def tutorial(data_dir: str, epochs: int, net_name: str, accelerator: str) -> float:
    """The usual tutorial: torchvision dataset, transforms, DataLoader, per-step logging, default Trainer."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, random_split
    from torchmetrics.classification import MulticlassAccuracy
    from torchvision import datasets, transforms

    s = seed_settings()

    class TutorialModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = NETS[net_name]()
            self.val_acc = MulticlassAccuracy(10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.nll_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.val_acc(logits, y)
            self.log("val_loss", F.nll_loss(logits, y))
            self.log("val_acc", self.val_acc)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=s["lr"], momentum=s["momentum"])

    torch.manual_seed(0)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    full = datasets.MNIST(data_dir, train=True, transform=transform)
    train_set, val_set = random_split(full, [0.9, 0.1], generator=torch.Generator().manual_seed(0))
    module = TutorialModule()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=accelerator, devices=1, max_epochs=epochs, default_root_dir=root, enable_progress_bar=False
        )
        train_loader = DataLoader(train_set, batch_size=s["batch_size"], shuffle=True)
        trainer.fit(module, train_loader, DataLoader(val_set, s["eval_batch_size"]))
    return float(trainer.callback_metrics["val_acc"])


def obvious(data_dir: str, epochs: int, protocol: bool, net_name: str, accelerator: str = "cpu") -> float:
    if protocol:
        raise UserError("the obvious setup has no --protocol mode (it is the one-stage tutorial)")
    return tutorial(data_dir, epochs, net_name, accelerator)


VARIANTS = {
    "plain": plain,
    "ours": ours,
    "obvious": obvious,
    "bare": bare,
    "bare_auto": functools.partial(bare, automatic=True),
    # ours's Trainer has 5 callbacks under --quiet (DivergenceStop, LearningRateMonitor, RunConfig, two checkpoints)
    "bare_auto_callbacks": functools.partial(bare, automatic=True, callbacks=5),
    "bare_auto_metrics": functools.partial(bare, automatic=True, metrics=True),
    "ours_bf16_cl": functools.partial(ours, options=SPEED_OPTIONS),
    "plain_bf16_cl": functools.partial(plain, bf16_cl=True),
    "plain_compiled": functools.partial(plain, compiled=True),
}
# The one-stage setups, without checkpoints to go on from: every variant of bare and obvious
NO_PROTOCOL = tuple(name for name, run in VARIANTS.items() if getattr(run, "func", run) in (bare, obvious))


@contextlib.contextmanager
def stamping_training_batches():
    """``InMemoryLoader`` (the batches of ours, bare and bare_auto) ticks ``CLOCK`` for each training batch."""
    iterate = InMemoryLoader.__iter__

    def stamped(loader: InMemoryLoader):
        training = loader.sampler.shuffle  # evaluation batches come in order
        if training:
            CLOCK.new_epoch()
        for batch in iterate(loader):
            if training:
                CLOCK.tick()
            yield batch

    InMemoryLoader.__iter__ = stamped
    try:
        yield
    finally:
        InMemoryLoader.__iter__ = iterate


def measure(
    variant: str, data_dir: str, epochs: int, protocol: bool, net_name: str = "lenet", accelerator: str = "cpu"
) -> dict:
    """Run one variant in this process; wall time after the imports (CUDA's initialisation included), peak RSS of
    the process, and (after 2 or more epochs) the milliseconds per training step by ``CLOCK``."""
    from mnist_lit.train import keep_freed_memory

    keep_freed_memory()  # as the command line does: every variant runs under the same malloc settings
    seed_settings()  # read before the clock starts
    CLOCK.epochs.clear()
    with stamping_training_batches():
        start = time.perf_counter()
        accuracy = VARIANTS[variant](data_dir, epochs, protocol, net_name, accelerator)
        seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    figures = {"variant": variant, "seconds": seconds, "acc": accuracy, "peak_rss_mb": peak_rss_mb}
    return figures | {"step_ms": CLOCK.ms_per_step(), "steps_stamped": sum(map(len, CLOCK.epochs))}


def run_child(variant: str, data_dir: str, epochs: int, protocol: bool, net_name: str, accelerator: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--data-dir", data_dir]
    cmd += ["--net", net_name, "--epochs", str(epochs), "--accelerator", accelerator]
    cmd += ["--protocol"] if protocol else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last_line = (proc.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise UserError(f"{variant} failed: {last_line}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def round_ratios(results: list[dict], reference: list[dict] | None) -> list[float]:
    """Each round's time over the reference's time in the same round (none without a reference)."""
    return [r["seconds"] / ref["seconds"] for r, ref in zip(results, reference)] if reference else []


def benchmark(
    data_dir: str,
    epochs: int,
    rounds: int,
    variants: list[str],
    out: str,
    protocol: bool,
    net_name: str = "lenet",
    accelerator: str = "cpu",
) -> dict:
    if protocol and set(NO_PROTOCOL) & set(variants):
        one_stage = ", ".join(v for v in variants if v in NO_PROTOCOL)
        raise UserError(f"{one_stage}: no --protocol mode (one stage, no checkpoints); leave out of --variants")
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UserError("--accelerator gpu: no CUDA GPU here")
    # images seen per epoch: training + evaluation; the protocol's full stage trains on 60k, tests on 10k
    samples = epochs * (54000 + 6000) + (epochs * (60000 + 10000) if protocol else 0)
    epoch_count = 2 * epochs if protocol else epochs
    batch = seed_settings()["batch_size"]
    steps = epochs * -(-54000 // batch) + (epochs * -(-60000 // batch) if protocol else 0)  # training steps
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(1, rounds + 1):
        # Interleaved, in reverse order every other round: a slow spell or a drift of the machine's speed hits
        # every variant alike.
        for variant in variants if round_ % 2 else variants[::-1]:
            result = run_child(variant, data_dir, epochs, protocol, net_name, accelerator)
            runs[variant].append(result)
            print(
                f"round {round_} {variant:14s} {result['seconds']:7.2f} s  acc {result['acc']:.4f}  "
                f"peak RSS {result['peak_rss_mb']:.0f} MiB"
                + (f"  {result['step_ms']:.3f} ms/step after the first epoch" if result["step_ms"] else ""),
                flush=True,
            )
    summary = {}
    reference = statistics.median(r["seconds"] for r in runs["plain"]) if "plain" in runs else None
    what = f"{epochs} + {epochs} epochs of the two-stage protocol" if protocol else f"{epochs} epoch(s)"
    device = torch.cuda.get_device_name() if accelerator == "gpu" else f"CPU, torch threads {torch.get_num_threads()}"
    print(f"\nmedian of {rounds} rounds, {what} of {net_name}, {device}:")
    for variant, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        # Each round's own ratio (against that round's plain loop, or bare_auto) shows how much the machine's
        # noise moves it; their median is the figure least moved by a slow spell.
        to_plain = round_ratios(results, runs.get("plain"))
        to_bare_auto = round_ratios(results, runs.get("bare_auto"))
        summary[variant] = {
            "seconds": seconds,
            "seconds_per_epoch": seconds / epoch_count,
            "ms_per_step": 1000 * seconds / steps,  # the whole run's time over its training steps
            # Lightning's parity test (tests/parity_pytorch) allows 0.3 s per epoch over the plain loop
            "extra_s_per_epoch": (seconds - reference) / epoch_count if reference else None,
            "samples_per_s": samples / seconds,
            "ratio_to_plain": seconds / reference if reference else None,
            "median_round_ratio_to_plain": statistics.median(to_plain) if to_plain else None,
            "round_ratios": to_plain,
            "ratio_to_bare_auto": statistics.median(to_bare_auto) if to_bare_auto else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "rounds": results,
        }
        figures = summary[variant]
        ratio = f"{figures['ratio_to_plain']:5.3f}x plain" if reference else ""
        if reference and variant != "plain":
            ratio += f" (rounds: {min(to_plain):.3f}-{max(to_plain):.3f}; {figures['extra_s_per_epoch']:+.2f} s/epoch)"
        if to_bare_auto:
            ratio += f"  {figures['ratio_to_bare_auto']:5.3f}x bare_auto"
        if results[0]["step_ms"]:
            figures.update(step_figures(results, runs))
            ratio += f"\n  {'':14s} a step after the first epoch: {figures['step_ms']:6.3f} ms"
            if figures.get("step_extra_ms_over_plain") is not None:
                ratio += f"  {figures['step_extra_ms_over_plain']:+.3f} ms over plain"
            if figures.get("step_ratio_to_bare_auto") is not None:
                ratio += f"  {figures['step_ratio_to_bare_auto']:5.3f}x bare_auto"
        print(
            f"  {variant:14s} {figures['seconds_per_epoch']:7.2f} s/epoch  {figures['ms_per_step']:6.2f} ms/step  "
            f"{ratio}  peak RSS {figures['peak_rss_mb']:.0f} MiB"
        )
    report = {
        "net": net_name,
        "epochs": epochs,
        "protocol": protocol,
        "rounds": rounds,
        "accelerator": accelerator,
        "device": device,
        "steps": steps,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "variants": summary,
    }
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def step_figures(results: list[dict], runs: dict[str, list[dict]]) -> dict:
    """The milliseconds per step after the first epoch, median over the rounds; the difference to plain and the
    ratio to bare_auto as the medians of each round's own (None where that variant did not run)."""

    def per_round(reference: str, compare) -> float | None:
        if reference not in runs:
            return None
        return statistics.median(compare(r["step_ms"], ref["step_ms"]) for r, ref in zip(results, runs[reference]))

    return {
        "step_ms": statistics.median(r["step_ms"] for r in results),
        "step_extra_ms_over_plain": per_round("plain", lambda ms, ref: ms - ref),
        "step_ratio_to_bare_auto": per_round("bare_auto", lambda ms, ref: ms / ref),
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="holds MNIST/raw/")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (with --protocol: of each stage; 20 as in it)")
    parser.add_argument("--protocol", action="store_true", help="time the whole two-stage protocol")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--net", default="lenet", choices=["lenet", "linear"], help="lenet (default) or linear")
    parser.add_argument("--accelerator", default="cpu", choices=DEVICES, help="cpu (default) or gpu (one CUDA GPU)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help="default: plain ours bare bare_auto obvious (--protocol: plain ours)",
    )
    parser.add_argument("--out", default="benchmark.json", help="where the figures go (JSON)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one measurement

    def body():
        args = parser.parse_args(argv)
        if args.child:  # one measurement, in its own process
            print(
                json.dumps(measure(args.child, args.data_dir, args.epochs, args.protocol, args.net, args.accelerator))
            )
            return 0
        if args.epochs < 1 or args.rounds < 1:
            raise UserError("--epochs and --rounds must be >= 1")
        if Path(args.out).exists() and not args.force:  # before the minutes of timing, not after
            raise UserError(f"{args.out} exists; pass --force to replace it, or another --out")
        variants = args.variants or ["plain", "ours"] + ([] if args.protocol else ["bare", "bare_auto", "obvious"])
        benchmark(
            args.data_dir, args.epochs, args.rounds, variants, args.out, args.protocol, args.net, args.accelerator
        )
        return 0

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
