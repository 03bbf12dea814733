"""mnist_lit.data: IDX parsing and its checks, preparing the files, splits, loaders, normalisation."""

import gzip
import json

import pytest
import torch
from helpers import REAL_DATA, digits, idx_bytes, write_mnist

from mnist_lit.data import EpochSampler, InMemoryLoader, MNISTDataModule, normalize, pixel_stats, split_indices
from mnist_lit.errors import UserError
from mnist_lit.idx import DATASETS, MEAN, STD, ensure_raw_files, load_split, raw_dir, read_idx
from mnist_lit.train import main


def test_read_idx_round_trip(tmp_path):
    images, labels = digits(7, seed=0)
    (tmp_path / "img").write_bytes(idx_bytes(images))
    (tmp_path / "lab").write_bytes(idx_bytes(labels))
    assert torch.equal(read_idx(tmp_path / "img", 3), images)
    assert torch.equal(read_idx(tmp_path / "lab", 1), labels)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b"\x00\x00\x09\x03" + b[4:], "magic"),  # not unsigned bytes
        (lambda b: b[:-10], "truncated"),  # body cut short
        (lambda b: b[:4] + (999).to_bytes(4, "big") + b[8:], "999 x 28 x 28"),  # wrong item count in the header
        (lambda b: b + b"\x00" * 5, "truncated or corrupt"),  # more bytes than the header says
        (lambda b: b[:8], "too short"),  # header cut short
        (lambda b: b"", "too short"),  # empty file
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, mangle, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(digits(5, seed=0)[0])))
    with pytest.raises(UserError, match=message) as err:
        read_idx(path, 3)
    assert str(path) in str(err.value)


def test_labels_file_read_as_images_is_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(digits(5, seed=0)[1]))
    with pytest.raises(UserError, match="magic"):
        read_idx(path, 3)


def test_official_size_with_wrong_md5_is_refused(tmp_path):
    name = "t10k-labels-idx1-ubyte"
    size, _ = DATASETS["mnist"].official[name]
    path = tmp_path / name
    path.write_bytes(idx_bytes(torch.zeros(size - 8, dtype=torch.uint8)))  # right size, wrong contents
    with pytest.raises(UserError, match="md5"):
        read_idx(path, 1, DATASETS["mnist"].official)


def test_count_mismatch_and_label_range_are_refused(data_dir):
    raw = raw_dir(data_dir)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(digits(119, seed=2)[1]))
    with pytest.raises(UserError, match="120 images but .* 119 labels"):
        load_split(raw, "test")
    labels = digits(120, seed=2)[1]
    labels[3] = 10
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(UserError, match="label 10 is out of range"):
        load_split(raw, "test")


def test_images_of_the_wrong_size_are_refused(data_dir):
    raw = raw_dir(data_dir)
    (raw / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(torch.zeros(120, 32, 32, dtype=torch.uint8)))
    with pytest.raises(UserError, match="expected 28 x 28"):
        load_split(raw, "test")


def test_gz_files_are_unpacked(tmp_path):
    data_dir = write_mnist(tmp_path / "data", gz=True)
    raw = ensure_raw_files(data_dir)
    images, labels = load_split(raw, "train")
    assert images.shape == (320, 28, 28) and labels.dtype == torch.int64
    assert not list(raw.glob("*.part"))


@pytest.mark.parametrize(
    "contents", [gzip.compress(bytes(range(256)) * 40)[:200], b"this is not gzip at all"], ids=["cut", "garbage"]
)
def test_corrupt_gz_is_refused(tmp_path, contents):
    data_dir = write_mnist(tmp_path / "data", gz=True)
    gz = raw_dir(data_dir) / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(contents)
    with pytest.raises(UserError, match="corrupt gzip"):
        ensure_raw_files(data_dir)
    assert not (raw_dir(data_dir) / "train-labels-idx1-ubyte").exists() and not list(raw_dir(data_dir).glob("*.part"))


def test_missing_files_offline_name_them(tmp_path):
    with pytest.raises(UserError, match="mnist files missing in .*t10k-labels-idx1-ubyte.*could not download") as err:
        ensure_raw_files(tmp_path / "empty")
    assert "train-images-idx3-ubyte" in str(err.value)


def test_split_sizes_disjoint_and_seeded():
    train, val = split_indices(60000, 0.1, seed=0)
    assert (len(train), len(val)) == (54000, 6000)
    assert len(set(train.tolist()) | set(val.tolist())) == 60000
    again_train, again_val = split_indices(60000, 0.1, seed=0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, split_indices(60000, 0.1, seed=1)[1])
    with pytest.raises(UserError, match="empty"):
        split_indices(10, 0.01, seed=0)


def test_default_split_is_the_seed_protocols():
    """The validation images of seed 0 that every figure of the seed protocol was measured on."""
    val = split_indices(60000, 0.1, seed=0)[1]
    assert val[:5].tolist() == [1, 3, 47, 49, 80] and int(val.sum()) == 179547942


@pytest.mark.parametrize("folds", [2, 5, 10])
def test_k_folds_are_disjoint_and_cover_the_training_images(folds):
    parts = []
    for fold in range(folds):
        train, val = split_indices(60000, 0.1, seed=0, folds=folds, fold=fold)
        assert len(train) + len(val) == 60000 and not set(train.tolist()) & set(val.tolist())
        parts.append(set(val.tolist()))
    assert len(set().union(*parts)) == sum(map(len, parts)) == 60000
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_fold_0_of_10_is_the_default_split():
    default, fold0 = split_indices(60000, 0.1, seed=0), split_indices(60000, 0.1, seed=0, folds=10, fold=0)
    assert all(torch.equal(a, b) for a, b in zip(default, fold0))


@pytest.mark.parametrize("folds, fold", [(5, 5), (5, -1), (1, 0)])
def test_bad_fold_settings(folds, fold):
    with pytest.raises(UserError, match="data.fold must be in"):
        split_indices(100, 0.1, seed=0, folds=folds, fold=fold)


def test_datamodule_validates_on_its_fold(shared_data_dir):
    data = MNISTDataModule(str(shared_data_dir), folds=4, fold=3)
    data.setup()
    assert (len(data.val_set[1]), len(data.train_set[1])) == (80, 240)  # 320 images in 4 parts


def test_datamodule_stages(shared_data_dir):
    initial = MNISTDataModule(str(shared_data_dir), stage="initial", val_fraction=0.25, batch_size=64)
    initial.prepare_data()
    initial.setup("fit")
    assert len(initial.train_set[1]) == 240 and len(initial.val_set[1]) == 80 and len(initial.test_set[1]) == 120
    assert initial.train_set[0].dtype == torch.uint8  # kept as bytes in memory
    full = MNISTDataModule(str(shared_data_dir), stage="full")
    full.setup("fit")
    assert len(full.train_set[1]) == 320 and full.val_set[1] is full.test_set[1]


def test_loader_keeps_last_batch_and_shuffles_per_epoch():
    images, labels = digits(100, seed=3)
    loader = InMemoryLoader(images, labels.long(), batch_size=32, shuffle=True, seed=5)
    assert len(loader) == 4
    epoch0 = [y for _, y in loader]
    assert [len(y) for y in epoch0] == [32, 32, 32, 4]
    assert sorted(torch.cat(epoch0).tolist()) == sorted(labels.tolist())
    assert torch.equal(torch.cat(epoch0), torch.cat([y for _, y in loader]))  # same epoch, same order
    loader.sampler.set_epoch(1)
    assert not torch.equal(torch.cat(epoch0), torch.cat([y for _, y in loader]))
    other_seed = InMemoryLoader(images, labels.long(), batch_size=32, shuffle=True, seed=6)
    assert not torch.equal(torch.cat(epoch0), torch.cat([y for _, y in other_seed]))
    plain = InMemoryLoader(images, labels.long(), batch_size=32, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in plain]), labels.long())


def test_every_seed_and_epoch_has_an_order_of_its_own():
    """The shuffle of epoch e of a run with seed s depends on both: no two (seed, epoch) pairs share an order (nor
    the draws of any other (seed, counter) generator: augmentation, dropout)."""
    orders = set()
    for seed in range(4):
        for epoch in range(4):
            sampler = EpochSampler(50, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
            orders.add(tuple(sampler.indices().tolist()))
    assert len(orders) == 4 * 4


def test_processes_share_each_epoch_every_sample_once_in_the_same_number_of_steps():
    """With DDP, each global batch is split between the ranks; the "images" here are their own indices."""
    n = 101
    for world_size, batch_size in ((2, 16), (3, 16), (4, 25)):  # 101 = 4 x 25 + 1: the 1 joins the last batch
        for epoch in (0, 1):
            loaders = [
                InMemoryLoader(torch.arange(n), torch.arange(n), batch_size, True, 7, rank, world_size)
                for rank in range(world_size)
            ]
            for loader in loaders:
                loader.sampler.set_epoch(epoch)
            batches = [list(loader) for loader in loaders]
            assert [len(b) for b in batches] == [len(loader) for loader in loaders] == [len(loaders[0])] * world_size
            seen = torch.cat([images for rank_batches in batches for images, _ in rank_batches])
            assert sorted(seen.tolist()) == list(range(n)), (world_size, batch_size, epoch)
            single = InMemoryLoader(torch.arange(n), torch.arange(n), batch_size, True, 7)
            single.sampler.set_epoch(epoch)
            global_batches = [set(images.tolist()) for images, _ in single]
            for step in range(len(loaders[0])):  # each step's parts are one global batch of the one-process order
                part = set().union(*(set(batches[rank][step][0].tolist()) for rank in range(world_size)))
                assert part == global_batches[step] or step == len(loaders[0]) - 1
    with pytest.raises(UserError, match="a batch of 1 cannot be split between 2 processes"):
        InMemoryLoader(torch.arange(n), torch.arange(n), 1, True, 7, 0, 2)  # one process's batches would be empty


def test_the_data_modules_seed_decides_its_training_order(shared_data_dir):
    for seed in (0, 1):
        data = MNISTDataModule(str(shared_data_dir), seed=seed)
        data.setup()
        labels = data.train_set[1]
        expected = labels[EpochSampler(len(labels), shuffle=True, seed=seed).indices()]
        assert torch.equal(torch.cat([y for _, y in data.train_dataloader()]), expected), seed


def test_normalize():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = normalize(images)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    expected = (torch.tensor([[0.0, 1.0], [0.2, 0.4]]) - MEAN) / STD
    assert torch.allclose(x[0, 0], expected)
    assert torch.allclose(normalize(images.unsqueeze(1).float(), 0.5, 0.25)[0, 0], (expected * STD + MEAN - 0.5) / 0.25)


def test_pixel_stats_are_exact():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    pixels = images.double() / 255
    mean, std = pixel_stats(images)
    assert mean == pytest.approx(pixels.mean().item(), abs=1e-12)
    assert std == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-12)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "kmnist"])
def test_sister_datasets_use_their_own_folder_and_statistics(tmp_path, dataset):
    data_dir = write_mnist(tmp_path / "data", dataset=dataset)
    assert (raw_dir(data_dir, dataset).parent.name,) == (
        {"fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}[dataset],
    )
    with pytest.raises(UserError, match="mnist files missing"):  # the MNIST folder is empty
        ensure_raw_files(data_dir, "mnist")
    module = MNISTDataModule(str(data_dir), dataset=dataset)
    module.prepare_data()
    module.setup()
    assert (module.mean, module.std) == pixel_stats(load_split(raw_dir(data_dir, dataset), "train")[0])
    assert module.mean != pytest.approx(MEAN)
    assert len(module.classes) == 10 and module.classes != DATASETS["mnist"].classes


@pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw").is_dir(), reason="the real MNIST files are not beside the repo")
def test_normalisation_constants_match_real_training_images():
    images, labels = load_split(raw_dir(REAL_DATA), "train")  # also checks the official md5s
    assert len(labels) == 60000
    mean, std = pixel_stats(images)
    assert mean == pytest.approx(MEAN, abs=1e-12) and std == pytest.approx(STD, abs=1e-12)


def test_a_fold_from_the_command_line(shared_data_dir, tmp_path, capsys):
    common = ["--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path), "--epochs", "1", "--quiet"]
    assert main([*common, "--data.folds", "4", "--data.fold", "5"]) == 2
    assert (
        capsys.readouterr().err.startswith("error: data.fold must be in 0..3") and not (tmp_path / "initial").exists()
    )
    assert main([*common, "--data.folds", "4", "--data.fold", "1"]) == 0
    assert json.loads((tmp_path / "initial" / "version_0" / "results.json").read_text())["count"] == 80


@pytest.mark.parametrize("split", [{}, {"val_fraction": 0.25, "seed": 3}, {"folds": 4, "fold": 2}])
def test_datamodule_validates_on_the_splits_images_and_never_on_a_training_image(shared_data_dir, split):
    images, labels = load_split(raw_dir(shared_data_dir), "train")
    data = MNISTDataModule(str(shared_data_dir), **split)
    data.setup()
    hp = data.hparams
    train_idx, val_idx = split_indices(len(labels), hp.val_fraction, hp.seed, hp.folds, hp.fold)
    for (got_images, got_labels), idx in ((data.train_set, train_idx), (data.val_set, val_idx)):
        assert torch.equal(got_images, images[idx]) and torch.equal(got_labels, labels[idx])
    trained_on = {image.numpy().tobytes() for image in data.train_set[0]}
    assert not [image for image in data.val_set[0] if image.numpy().tobytes() in trained_on]
