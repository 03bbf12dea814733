"""mnist_lit.module: the LightningModule's input, training step, schedule, metrics and checkpoint loading."""

import inspect
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from helpers import digits, loss_before_and_after_one_step, previous_version_checkpoint, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from mnist_lit.data import pixel_stats
from mnist_lit.idx import MEAN, STD
from mnist_lit.module import MNISTLitModule, format_eval


def batch(n=64, seed=0):
    images, labels = digits(n, seed)
    return images, labels.long()


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


def test_epoch_loss_is_the_mean_over_samples_and_accuracy_counts_every_sample(shared_data_dir):
    """A full batch of 3 with loss 1.0 and a partial batch of 1 with loss 5.0: the epoch's mean loss is 2.0
    (each sample weighs the same); the torchmetrics objects give the epoch's values."""
    model = MNISTLitModule()
    model.log = lambda *args, **kwargs: None  # outside a Trainer: only the metric objects are checked here
    model.net = torch.nn.Identity()  # the "images" pass through: log-probabilities chosen below
    model.preprocess = lambda images: images
    log_probs = torch.eye(3).log()
    with patch("mnist_lit.module.nll_loss", side_effect=[torch.tensor(1.0), torch.tensor(5.0)]):
        model.validation_step((log_probs, torch.tensor([0, 1, 2])), 0)
        model.validation_step((log_probs[:1], torch.tensor([1])), 0)
    assert model.val_loss.compute().item() == pytest.approx(2.0)
    assert model.val_acc.compute().item() == pytest.approx(0.75) and model.val_count.compute().item() == 4
    assert format_eval("val", 3, 4) == "val 3/4 (75.00%)"


def test_a_nan_loss_makes_the_epoch_loss_nan_it_is_never_dropped():
    model = MNISTLitModule()
    model.log = lambda *args, **kwargs: None
    model.net = torch.nn.Identity()
    model.preprocess = lambda images: images
    with patch("mnist_lit.module.nll_loss", side_effect=[torch.tensor(1.0), torch.tensor(float("nan"))]):
        model.training_step((torch.eye(3).log(), torch.tensor([0, 1, 2])), 0)
        model.training_step((torch.eye(3).log(), torch.tensor([0, 1, 2])), 0)
    assert model.train_loss.compute().isnan()


def test_hparams_are_plain_data():
    hparams = dict(MNISTLitModule(milestones=(3, 7), net_options={"dropout": 0.5}, pixel_stats=(0.1, 0.3)).hparams)
    assert set(hparams) == set(inspect.signature(MNISTLitModule).parameters)  # every setting is kept
    assert hparams["milestones"] == [3, 7] and hparams["net_options"] == {"dropout": 0.5}
    plain = (str, int, float, bool, list, dict, type(None))
    assert all(isinstance(v, plain) for v in hparams.values()), hparams


def test_channels_last_changes_the_layout_not_the_result():
    torch.manual_seed(0)
    plain = MNISTLitModule(net="slim").eval()
    nhwc = MNISTLitModule(net="slim", channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, _ = batch(8)
    with torch.no_grad():
        assert torch.allclose(plain(x), nhwc(x), atol=1e-5)


def test_recompute_batchnorm_stats_takes_the_images_statistics_under_the_current_weights():
    torch.manual_seed(0)
    model = MNISTLitModule(net="slim").eval()
    first_bn = next(m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn.running_mean.fill_(5.0)
    first_bn.running_var.fill_(5.0)
    images, _ = digits(500, seed=1)  # two chunks of 250: their averaged means are the mean of all 500
    seen = []
    first_bn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model.recompute_batchnorm_stats(images, batch_size=250)
    assert not model.training and len(seen) == 2
    inputs = torch.cat(seen).transpose(0, 1).flatten(1)  # channels x (images * pixels)
    torch.testing.assert_close(first_bn.running_mean, inputs.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_bn.running_var, inputs.var(1), rtol=0.05, atol=1e-4)


def test_forward_takes_pixels_as_mnist_stores_them_and_normalises_them_with_the_saved_statistics():
    images, _ = digits(50, seed=2)
    stats = pixel_stats(images)
    model = MNISTLitModule(net="slim", pixel_stats=stats).eval()
    assert model.pixel_stats == stats and MNISTLitModule().pixel_stats == (MEAN, STD)  # None: MNIST's
    inputs = model.preprocess(images)
    assert inputs.shape == (50, 1, 28, 28) and inputs.dtype == torch.float32
    assert inputs.mean().item() == pytest.approx(0, abs=1e-5) and inputs.std().item() == pytest.approx(1, abs=1e-4)
    with torch.no_grad():
        expected = model.net(inputs)
        for pixels in (images, images.unsqueeze(1), images.float(), images.unsqueeze(1).double()):
            assert torch.equal(model(pixels), expected)
    for shape in ((50, 784), (50, 28, 28, 1), (25, 2, 28, 28), (28, 28)):
        with pytest.raises(ValueError, match="expected images of N x 28 x 28 or N x 1 x 28 x 28"):
            model(images.reshape(shape) if shape != (28, 28) else images[0])


def test_trainer_predict_gives_what_forward_gives():
    torch.manual_seed(0)
    images, labels = digits(70, seed=4)
    model = MNISTLitModule(net="slim")  # BatchNorm: eval mode matters, and trainer.predict sets it
    trainer = quiet_trainer()
    for dataset in (TensorDataset(images), TensorDataset(images, labels)):  # images, or (images, labels) pairs
        predicted = torch.cat(trainer.predict(model, dataloaders=DataLoader(dataset, batch_size=32)))
        with torch.no_grad():
            torch.testing.assert_close(predicted, model.eval()(images))
        model.train()


def test_checkpoints_of_the_previous_version_load_with_their_statistics(trained_ckpt, tmp_path):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    old_path = tmp_path / "old.ckpt"
    torch.save(previous_version_checkpoint(ckpt), old_path)
    new = MNISTLitModule.load_from_checkpoint(trained_ckpt, weights_only=True).eval()
    old = MNISTLitModule.load_from_checkpoint(old_path, weights_only=True).eval()
    assert new.pixel_stats == tuple(ckpt["hyper_parameters"]["pixel_stats"]) != (MEAN, STD)  # the tiny data's
    assert old.pixel_stats == pytest.approx(new.pixel_stats, rel=1e-7)  # its buffer's float32 values
    images, _ = digits(40, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(old(images), new(images))


def test_label_smoothing_and_augmentation_are_for_training_only_evaluation_reports_plain_nll():
    from mnist_lit.loss import nll_loss

    torch.manual_seed(0)
    images, labels = batch(48, seed=5)
    model = MNISTLitModule(net="slim", label_smoothing=0.3, augment=True).eval()
    with torch.no_grad():
        log_probs = model(images)
    plain, smoothed = F.nll_loss(log_probs, labels).item(), nll_loss(log_probs, labels, 0.3).item()
    assert abs(plain - smoothed) > 0.01  # the two differ here, so the check below can tell them apart
    loader = DataLoader(TensorDataset(images, labels), batch_size=20)  # a partial last batch too
    trainer = quiet_trainer()
    for split in ("val", "test"):
        model.hparams.eval_split = split  # the per-epoch evaluation: val (initial stage) or test (full stage)
        trainer.validate(model, dataloaders=loader, verbose=False)
        assert trainer.callback_metrics[f"{split}/loss"].item() == pytest.approx(plain, rel=1e-5)
    trainer.test(model, dataloaders=loader, verbose=False)
    assert trainer.callback_metrics["test/loss"].item() == pytest.approx(plain, rel=1e-5)
    model.train_loss.reset()
    model.hparams.augment = False  # the training loss of these very images
    model.training_step((images, labels), 0)
    assert model.train_loss.compute().item() == pytest.approx(nll_loss(model(images), labels, 0.3).item(), rel=1e-5)


def test_augmentation_draws_anew_at_every_training_step(monkeypatch):
    """Seeded by (seed, step) so that a resume draws the same, yet no two steps (of one epoch or of two) draw alike:
    the generator each step hands the augmentation is probed for its next numbers."""
    import mnist_lit.module

    real_affine, draws = mnist_lit.module.random_affine, []

    def recording_affine(inputs, generator, **kwargs):
        probe = torch.Generator(device=generator.device)
        probe.set_state(generator.get_state())
        draws.append(torch.rand(8, generator=probe))
        return real_affine(inputs, generator, **kwargs)

    monkeypatch.setattr(mnist_lit.module, "random_affine", recording_affine)
    images, labels = batch(96, seed=1)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(MNISTLitModule(net="linear", augment=True), DataLoader(TensorDataset(images, labels), batch_size=32))
    assert len(draws) == 2 * 3 and len({draw.numpy().tobytes() for draw in draws}) == len(draws)


def test_the_optimizer_settings_reach_the_optimizer():
    settings = {"lr": 0.03, "weight_decay": 1e-3}
    for optimizer, own in (("sgd", {"momentum": 0.7, "nesterov": True}), ("adam", {})):
        config = MNISTLitModule(optimizer=optimizer, **settings, **own).configure_optimizers()
        (group,) = config["optimizer"].param_groups
        assert type(config["optimizer"]).__name__.lower() == optimizer
        assert {key: group[key] for key in [*settings, *own]} == {**settings, **own}
