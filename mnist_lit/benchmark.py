"""Is Lightning's structure free? Time three pipelines of the same training, interleaved, in one run.

1. ``plain``: a plain PyTorch loop over in-memory tensors (the reference, written out below);
2. ``ours``: this project, exactly as ``scripts/train.py --quiet`` runs it (DataModule + LightningModule +
   Trainer, checkpoints, TensorBoard, run directory and all);
3. ``obvious``: the usual Lightning tutorial setup: torchvision ``datasets.MNIST`` with ``ToTensor`` and
   ``Normalize``, ``random_split``, a ``DataLoader``, per-step ``self.log``, a default ``Trainer``.

Same net (LeNet), batch 64, SGD (lr 0.01, momentum 0.5), same number of epochs, each epoch = 54k training
images + 6k validation images. Every measurement runs in a fresh process (so peak RSS is its own) and times
everything after the imports: reading the data, building the model, training, validating. The variants take
turns round by round, and the median of the rounds is reported, with the ratio to ``plain``.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mnist_lit.data import load_split, normalize, pixel_stats, raw_dir, split_indices
from mnist_lit.errors import ArgumentParser, exit_code
from mnist_lit.net import LeNet

VARIANTS = ("plain", "ours", "obvious")
BATCH, EVAL_BATCH, LR, MOMENTUM = 64, 1000, 0.01, 0.5


def plain(data_dir: str, epochs: int) -> float:
    """The reference: a plain PyTorch loop. Returns the last validation accuracy."""
    torch.manual_seed(0)
    images, labels = load_split(raw_dir(data_dir), "train")
    mean, std = pixel_stats(images)
    train_idx, val_idx = split_indices(len(labels), 0.1, seed=0)
    train_x, train_y, val_x, val_y = images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
    net = LeNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(epoch))
        for idx in order.split(BATCH):
            optimizer.zero_grad()
            F.nll_loss(net(normalize(train_x[idx], mean, std)), train_y[idx]).backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            correct = sum(
                int((net(normalize(x, mean, std)).argmax(1) == y).sum())
                for x, y in zip(val_x.split(EVAL_BATCH), val_y.split(EVAL_BATCH))
            )
    return correct / len(val_y)


def ours(data_dir: str, epochs: int) -> float:
    """This project's pipeline, as scripts/train.py runs it."""
    from mnist_lit.training import main

    with tempfile.TemporaryDirectory() as save_dir:
        argv = ["--data-dir", data_dir, "--save-dir", save_dir, "--epochs", str(epochs), "--quiet"]
        argv += ["--milestones", str(epochs + 1)]  # one lr throughout, as in the other two variants
        if main(argv) != 0:
            raise SystemExit("training failed")
        return json.loads(next(Path(save_dir).glob("initial/version_0/results.json")).read_text())["acc"]


def obvious(data_dir: str, epochs: int) -> float:
    """The usual tutorial: torchvision dataset, transforms, DataLoader, per-step logging, default Trainer."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, random_split
    from torchmetrics.classification import MulticlassAccuracy
    from torchvision import datasets, transforms

    class TutorialModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = LeNet()
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
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    torch.manual_seed(0)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    full = datasets.MNIST(data_dir, train=True, transform=transform)
    train_set, val_set = random_split(full, [54000, 6000], generator=torch.Generator().manual_seed(0))
    module = TutorialModule()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(max_epochs=epochs, default_root_dir=root, enable_progress_bar=False)
        trainer.fit(module, DataLoader(train_set, batch_size=BATCH, shuffle=True), DataLoader(val_set, EVAL_BATCH))
    return float(trainer.callback_metrics["val_acc"])


def measure(variant: str, data_dir: str, epochs: int) -> dict:
    """Run one variant in this process; wall time after the imports, peak RSS of the process."""
    start = time.perf_counter()
    accuracy = {"plain": plain, "ours": ours, "obvious": obvious}[variant](data_dir, epochs)
    seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"variant": variant, "seconds": seconds, "val_acc": accuracy, "peak_rss_mb": peak_rss_mb}


def run_child(variant: str, data_dir: str, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "mnist_lit.benchmark", "--child", variant, "--data-dir", data_dir]
    proc = subprocess.run([*cmd, "--epochs", str(epochs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(data_dir: str, epochs: int, rounds: int, variants: list[str], out: str) -> dict:
    samples = epochs * (54000 + 6000)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(1, rounds + 1):
        for variant in variants:  # interleaved: a slow spell of the machine hits every variant alike
            result = run_child(variant, data_dir, epochs)
            runs[variant].append(result)
            print(
                f"round {round_} {variant:8s} {result['seconds']:7.2f} s  val acc {result['val_acc']:.4f}  "
                f"peak RSS {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    summary = {}
    reference = statistics.median(r["seconds"] for r in runs["plain"]) if "plain" in runs else None
    print(
        f"\nmedian of {rounds} rounds, {epochs} epoch(s) of 54k train + 6k val, torch threads "
        f"{torch.get_num_threads()}:"
    )
    for variant, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        summary[variant] = {
            "seconds": seconds,
            "seconds_per_epoch": seconds / epochs,
            "samples_per_s": samples / seconds,
            "ratio_to_plain": seconds / reference if reference else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "rounds": results,
        }
        ratio = f"{seconds / reference:5.3f}x plain" if reference else ""
        print(
            f"  {variant:8s} {seconds / epochs:7.2f} s/epoch  {samples / seconds:7.0f} samples/s  {ratio}  "
            f"peak RSS {summary[variant]['peak_rss_mb']:.0f} MB"
        )
    report = {
        "epochs": epochs,
        "rounds": rounds,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "variants": summary,
    }
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="holds MNIST/raw/")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", default="benchmark.json", help="where the figures go (JSON)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one measurement

    def body():
        args = parser.parse_args(argv)
        if args.child:  # one measurement, in its own process
            print(json.dumps(measure(args.child, args.data_dir, args.epochs)))
            return 0
        benchmark(args.data_dir, args.epochs, args.rounds, args.variants, args.out)
        return 0

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
