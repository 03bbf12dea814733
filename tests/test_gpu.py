"""On a CUDA GPU (skipped without one; CI has none): data kept on the device, bf16 autocast, every recipe."""

import json

import pytest
import pytorch_lightning as pl
import torch

from mnist_lit import evaluate
from mnist_lit.data import MNISTDataModule
from mnist_lit.flags import recipe_names
from mnist_lit.module import MNISTLitModule
from mnist_lit.train import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_batches_are_cut_on_the_gpu_and_run_under_bf16_autocast(shared_data_dir):
    model = MNISTLitModule(net="slim", channels_last=True)
    seen = []
    first_conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: seen.append((args[0].device.type, out.dtype)))
    datamodule = MNISTDataModule(shared_data_dir, batch_size=32)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=datamodule)
    loader = datamodule.train_dataloader()
    assert loader.images.is_cuda and loader.labels.is_cuda  # the split was moved once, not each batch
    assert seen and set(seen) == {("cuda", torch.bfloat16)}


@pytest.mark.parametrize("recipe", recipe_names())
def test_recipe_trains_both_stages_on_the_gpu_and_evaluates_on_the_cpu(recipe, shared_data_dir, tmp_path):
    common = ["--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path), "--quiet", "--accelerator", "gpu"]
    assert main([*common, "--recipe", recipe, "--epochs", "2", "--devices", "1"]) == 0
    last = tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    weights = torch.load(last, weights_only=True)["state_dict"]
    assert all(t.is_cuda for t in weights.values())  # trained on the GPU
    assert main([*common, "--stage", "full", "--ckpt", "last.ckpt", "--epochs", "3", "--devices", "1"]) == 0
    results = json.loads((tmp_path / "full" / "version_0" / "results.json").read_text())
    assert results["split"] == "test" and results["count"] == 120
    full_last = tmp_path / "full" / "version_0" / "checkpoints" / "last.ckpt"
    evaluation = ["--ckpt", str(full_last), "--data-dir", str(shared_data_dir), "--out", str(tmp_path / "ev")]
    assert evaluate.main(evaluation) == 0  # checkpoints load onto the CPU


class SyncsAreErrors(pl.Callback):
    """Inside every training step (batch start to batch end: forward, backward, optimizer and scheduler steps,
    metric updates, the callbacks' per-step hooks), a host synchronisation raises instead of waiting."""

    steps = 0  # over all instances: the CLI makes the one a run uses

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")
        SyncsAreErrors.steps += 1


@pytest.mark.parametrize("recipe", recipe_names())
def test_no_host_sync_inside_a_training_step(recipe, shared_data_dir, tmp_path):
    """Hundreds of steps of each recipe on the GPU, with the callback given on the command line as a user would;
    a `.item()`, a `.tolist()` or a CPU tensor copied in per step would raise there."""
    SyncsAreErrors.steps = 0
    argv = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--quiet", "--accelerator", "gpu", "--devices", "1"]
    argv += ["--recipe", recipe, "--epochs", "20", "--batch-size", "16", "--trainer.callbacks+=test_gpu.SyncsAreErrors"]
    try:
        assert main([str(a) for a in argv]) == 0
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert SyncsAreErrors.steps >= 20 * 288 // 16  # every step ran under the check (288 training images)


def test_benchmark_times_plain_ours_and_bare_auto_on_the_gpu(shared_data_dir, tmp_path):
    from test_benchmark import bench, check_report

    variants = ["plain", "ours", "bare_auto"]
    report = bench.benchmark(str(shared_data_dir), 1, 1, variants, str(tmp_path / "b.json"), False, "linear", "gpu")
    check_report(report, variants)
    assert report["accelerator"] == "gpu" and report["device"] == torch.cuda.get_device_name()
    assert all(v["ms_per_step"] > 0 and v["extra_s_per_epoch"] is not None for v in report["variants"].values())
