"""mnist_lit.module: the LightningModule's training step, schedule, metrics and checkpoint loading."""

import pytest
import torch
from conftest import digits, loss_before_and_after_one_step

from mnist_lit.data import normalize
from mnist_lit.module import MNISTLitModule, SplitMetrics, format_eval


def batch(n=64, seed=0):
    images, labels = digits(n, seed)
    return normalize(images), labels.long()


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    before, after = loss_before_and_after_one_step(MNISTLitModule(lr=0.05), batch())
    assert after < before


def lrs_per_epoch(milestones, epochs=20):
    model = MNISTLitModule(milestones=milestones)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing, keeps the optimizer-then-scheduler order
        scheduler.step()
    return [round(lr, 10) for lr in lrs]


def test_code_schedule_is_the_default():
    assert MNISTLitModule().hparams.milestones == [2, 10]
    assert lrs_per_epoch([2, 10]) == [0.01] * 2 + [0.001] * 8 + [0.0001] * 10


def test_readme_schedule():
    assert lrs_per_epoch([2, 4]) == [0.01] * 2 + [0.001] * 2 + [0.0001] * 16


def test_split_metrics_weigh_every_sample_equally():
    metrics = SplitMetrics(num_classes=3)
    # batch of 3 with loss 1.0, then a partial batch of 1 with loss 5.0: the mean over 4 samples is 2.0
    metrics.update(torch.eye(3).log(), torch.tensor([0, 1, 2]), torch.tensor(1.0))
    metrics.update(torch.eye(3)[:1].log(), torch.tensor([1]), torch.tensor(5.0))
    result = metrics.compute_and_reset()
    assert result["loss"].item() == pytest.approx(2.0)
    assert result["acc"].item() == pytest.approx(0.75) and result["count"].item() == 4
    assert format_eval("val", result) == "val 3/4 (75.00%)" and result["first_bad"] == -1
    assert metrics.pending == []  # reset: the next epoch starts empty


def test_split_metrics_find_the_first_non_finite_loss():
    metrics = SplitMetrics(num_classes=3)
    losses = [1.0] * (SplitMetrics.FLUSH_EVERY + 2) + [float("inf"), float("nan")]  # found after a flush too
    for loss in losses:
        metrics.update(torch.eye(3).log(), torch.tensor([0, 1, 2]), torch.tensor(loss))
    result = metrics.compute_and_reset()
    assert result["first_bad"] == SplitMetrics.FLUSH_EVERY + 2 and result["steps"] == len(losses)
    assert result["loss"].isnan() and result["count"].item() == 3 * len(losses)


def test_hparams_are_plain_data():
    hparams = dict(MNISTLitModule(milestones=(3, 7)).hparams)
    assert hparams["milestones"] == [3, 7]
    plain = (str, int, float, bool, list, type(None))
    assert all(isinstance(v, plain) for v in hparams.values()), hparams


def test_channels_last_changes_the_layout_not_the_result():
    torch.manual_seed(0)
    plain = MNISTLitModule(net="bnnet").eval()
    nhwc = MNISTLitModule(net="bnnet", channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = batch(8)
    with torch.no_grad():
        plain._step((x, y), "val")
        nhwc._step((x, y), "val")
        assert torch.allclose(plain(x), nhwc(x), atol=1e-5)
    assert plain.val_metrics.compute_and_reset()["loss"] == pytest.approx(
        float(nhwc.val_metrics.compute_and_reset()["loss"]), abs=1e-5
    )


def test_recompute_batchnorm_stats_takes_the_images_statistics_under_the_current_weights():
    torch.manual_seed(0)
    model = MNISTLitModule(net="slim").eval()
    first_bn = next(m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn.running_mean.fill_(5.0)
    first_bn.running_var.fill_(5.0)
    images, _ = digits(500, seed=1)  # two chunks of 250: their averaged means are the mean of all 500
    seen = []
    first_bn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model.recompute_batchnorm_stats(images)
    assert not model.training and len(seen) == 2
    inputs = torch.cat(seen).transpose(0, 1).flatten(1)  # channels x (images * pixels)
    torch.testing.assert_close(first_bn.running_mean, inputs.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_bn.running_var, inputs.var(1), rtol=0.05, atol=1e-4)
