"""Choosing an ensemble on validation: data.split_seed (a validation split runs with different seeds share),
greedy forward selection (mnist_lit.experiments.selection), members files (mnist_lit.members) and
scripts/select_ensemble.py, evaluate.py, predict.py and export.py with --members."""

import json
from pathlib import Path

import pytest
import torch
from helpers import REAL_DATA
from PIL import Image

from mnist_lit import evaluate, export, predict
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import UserError
from mnist_lit.experiments.selection import Step, ensemble_correct, greedy_selection
from mnist_lit.experiments.selection import main as select
from mnist_lit.idx import load_split, raw_dir
from mnist_lit.inference import load_members
from mnist_lit.members import MAX_BYTES, read_members, write_members
from mnist_lit.train import main as train

SPLIT_SEED = 7
# Candidates unlike each other (seed and net), trained on one validation split; 1 epoch (5 steps) each.
CANDIDATES = [("0", "lenet"), ("1", "linear"), ("2", "slim")]


def truth_probabilities(q: list[float]) -> torch.Tensor:
    """Hand-made predictions of a candidate for images all of class 0: probability q of class 0, 1 - q of class
    1, so an image is right when q > 0.5, and an ensemble's when the mean of its members' q is."""
    q = torch.tensor(q)
    return torch.stack([q, 1 - q], 1).clamp(min=1e-6).log()


def test_selection_adds_the_complementary_candidate_not_the_second_best_and_stops_without_a_gain():
    labels = torch.zeros(10, dtype=torch.long)
    best = truth_probabilities([0.9] * 8 + [0.2] * 2)  # 8 right
    copy = truth_probabilities([0.9] * 7 + [0.2] * 3)  # 7 right, the same mistakes and one more
    complement = truth_probabilities([0.4] * 8 + [0.95] * 2)  # 2 right, unsure where it is wrong
    candidates = [copy, complement, best, complement.clone()]
    assert [ensemble_correct([c], labels) for c in candidates] == [7, 2, 8, 2]
    # best first; best + copy would stay at 8, best + complement gets all 10 (the earlier of the two equal ones);
    # adding its twin keeps the 10 right: no gain, so it stops there.
    assert ensemble_correct([best, complement, complement], labels) == 10
    assert greedy_selection(candidates, labels) == [Step(2, 8), Step(1, 10)]
    assert greedy_selection(candidates, labels, max_members=1) == [Step(2, 8)]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_selection_breaks_ties_by_the_earliest_candidate_in_the_given_order(order):
    labels = torch.zeros(4, dtype=torch.long)
    right_on = {0: [0.9, 0.9, 0.2, 0.2], 1: [0.2, 0.2, 0.9, 0.9]}  # 2 right each, on different images
    candidates = [truth_probabilities(right_on[i]) for i in order]
    # Either alone: 2 right; the one given first is taken; both: a mean q of 0.55, all 4 right.
    assert greedy_selection(candidates, labels) == [Step(0, 2), Step(1, 4)]
    assert greedy_selection(candidates, labels, max_members=1) == [Step(0, 2)]


@pytest.mark.parametrize("limit", [1, 3, 5, 7, 9])
def test_selection_never_takes_more_than_the_limit_nor_a_candidate_twice(limit):
    """Seven candidates, each sure of one image of its own and a little wrong on the others: each addition (up to
    seven) makes one more image right, so the selection goes on to the limit or until every candidate is in."""
    labels = torch.zeros(7, dtype=torch.long)
    candidates = [truth_probabilities([0.99 if j == i else 0.45 for j in range(7)]) for i in range(7)]
    steps = greedy_selection(candidates, labels, max_members=limit)
    taken = min(limit, 7)
    assert [step.candidate for step in steps] == list(range(taken))  # equal gains: the earliest first
    assert [step.correct for step in steps] == list(range(1, taken + 1))


def test_selection_needs_a_positive_limit():
    with pytest.raises(UserError, match="--max-members must be >= 1"):
        greedy_selection([truth_probabilities([0.9])], torch.zeros(1, dtype=torch.long), max_members=0)


@pytest.mark.parametrize("seeds", [(0, 1), (3, 11), (5, 2)])
def test_runs_with_one_split_seed_hold_out_the_same_images_whatever_their_seed(shared_data_dir, seeds):
    modules = {}
    for seed in seeds:
        for split_seed in (None, SPLIT_SEED):
            modules[seed, split_seed] = MNISTDataModule(str(shared_data_dir), seed=seed, split_seed=split_seed)
            modules[seed, split_seed].setup()
    a, b = seeds
    for part in ("val_set", "train_set"):
        for x, y in zip(getattr(modules[a, SPLIT_SEED], part), getattr(modules[b, SPLIT_SEED], part), strict=True):
            assert torch.equal(x, y)
    assert not torch.equal(modules[a, None].val_set[0], modules[b, None].val_set[0])  # each seed its own split
    # No split_seed: the run's seed splits, as before split_seed existed.
    default = MNISTDataModule(str(shared_data_dir), seed=0, split_seed=a)
    default.setup()
    assert torch.equal(default.val_set[0], modules[a, None].val_set[0])
    # The order of the training batches still follows the run's seed.
    orders = [modules[seed, SPLIT_SEED]._loader(modules[seed, SPLIT_SEED].train_set, 64, True) for seed in seeds]
    assert not torch.equal(*(next(iter(order))[1] for order in orders))


def test_a_negative_split_seed_is_refused():
    with pytest.raises(UserError, match=r"data.split_seed must be >= 0 \(got -1\)"):
        MNISTDataModule(split_seed=-1)


@pytest.fixture(scope="module")
def candidates(shared_data_dir, tmp_path_factory) -> list[Path]:
    """Three initial-stage runs, seeds and nets unlike each other, one validation split (data.split_seed)."""
    save_dir = tmp_path_factory.mktemp("pool")
    for seed, net in CANDIDATES:
        argv = ["--data-dir", shared_data_dir, "--save-dir", save_dir / seed, "--seed", seed, "--net", net]
        assert (
            train(
                [str(a) for a in [*argv, "--epochs", "1", "--lr", "0.05", "--data.split_seed", SPLIT_SEED, "--quiet"]]
            )
            == 0
        )
    return [save_dir / seed / "initial" / "version_0" / "checkpoints" / "last.ckpt" for seed, _ in CANDIDATES]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_select_ensemble_chooses_on_validation_and_writes_a_list_evaluate_takes(
    candidates, shared_data_dir, tmp_path, capsys
):
    out = tmp_path / "lists" / "members.txt"
    argv = ["--ckpt", *candidates, "--data-dir", shared_data_dir, "--out", out]
    assert select([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    # What it chose is greedy_selection on the members' validation predictions, computed here by hand.
    members = load_members(candidates)
    images, labels = evaluate.split_data(members, shared_data_dir, "val")
    assert len(labels) == 32
    with torch.no_grad():
        log_probs = [member.module(images) for member in members]
    steps = greedy_selection(log_probs, labels)
    chosen = [candidates[step.candidate] for step in steps]
    assert [p.resolve() for p in read_members(out)] == [c.resolve() for c in chosen]
    text = out.read_text()
    assert not any(line.startswith("/") for line in text.splitlines())  # relative to the list's folder
    for i, member_log_probs in enumerate(log_probs, 1):
        correct = ensemble_correct([member_log_probs], labels)
        row = [str(i), str(correct), f"{100 * correct / 32:.2f}", str(candidates[i - 1])]
        assert any(line.split() == row for line in printed.splitlines()), printed
    for n, step in enumerate(steps, 1):
        row = [str(n), str(step.correct), f"{100 * step.correct / 32:.2f}", f"{step.candidate + 1}:"]
        assert any(line.split()[:4] == row for line in printed.splitlines()), printed
    assert f"# the ensemble's validation accuracy: {steps[-1].correct}/32" in text
    assert all(f"/32 {candidate}" in text for candidate in candidates)
    # The runs share their validation images, so evaluate.py takes all three together on them.
    result = tmp_path / "all"
    assert (
        evaluate.main(
            [
                "--ckpt",
                *map(str, candidates),
                "--split",
                "val",
                "--data-dir",
                str(shared_data_dir),
                "--out",
                str(result),
            ]
        )
        == 0
    )
    assert [m["correct"] for m in json.loads((result / "metrics.json").read_text())["members"]] == [
        ensemble_correct([lp], labels) for lp in log_probs
    ]
    # The list as evaluate.py's members, on validation: the ensemble's accuracy the selection printed.
    result = tmp_path / "val"
    assert (
        evaluate.main(
            ["--members", str(out), "--split", "val", "--data-dir", str(shared_data_dir), "--out", str(result)]
        )
        == 0
    )
    metrics = json.loads((result / "metrics.json").read_text())
    assert (metrics["correct"], len(metrics["members"])) == (steps[-1].correct, len(steps))
    # The same candidates, the same list (written again only with --force).
    assert select([str(a) for a in argv]) == 2
    assert "exists; pass --force" in error_line(capsys)
    assert select([str(a) for a in [*argv, "--force"]]) == 0 and out.read_text() == text


def test_select_ensemble_refuses_candidates_that_do_not_share_a_split(
    candidates, trained_ckpt, shared_data_dir, tmp_path, capsys
):
    out = tmp_path / "members.txt"
    cases = [
        ([*candidates, trained_ckpt], "validated on different splits"),  # trained_ckpt: split seed 0 (its seed)
        ([candidates[0], candidates[0]], "is given twice"),
        ([*candidates, "--max-members", "0"], "--max-members must be >= 1"),
        ([tmp_path / "missing.ckpt"], "checkpoint not found"),
    ]
    for ckpts, message in cases:
        assert select(["--ckpt", *map(str, ckpts), "--data-dir", str(shared_data_dir), "--out", str(out)]) == 2
        assert message in error_line(capsys)
        assert not out.exists()


def without_split_seed(ckpt: Path, to: Path, seed: int) -> Path:
    """A copy of ``ckpt`` as a version before data.split_seed wrote it, with ``seed`` as its seed."""
    content = torch.load(ckpt, weights_only=True)
    del content["datamodule_hyper_parameters"]["split_seed"]
    content["datamodule_hyper_parameters"]["seed"] = content["hyper_parameters"]["seed"] = seed
    torch.save(content, to)
    return to


def test_a_checkpoint_without_split_seed_reads_as_split_by_its_seed(candidates, shared_data_dir, tmp_path, capsys):
    same = without_split_seed(candidates[1], tmp_path / "older_same.ckpt", SPLIT_SEED)
    other = without_split_seed(candidates[1], tmp_path / "older_other.ckpt", SPLIT_SEED + 1)
    common = ["--split", "val", "--data-dir", str(shared_data_dir)]
    assert evaluate.main(["--ckpt", str(candidates[0]), str(same), *common, "--out", str(tmp_path / "ev")]) == 0
    assert evaluate.main(["--ckpt", str(candidates[0]), str(other), *common]) == 2
    assert "validated on different splits" in error_line(capsys)


def test_members_file_round_trip_and_what_the_reader_refuses(candidates, tmp_path):
    out = tmp_path / "a" / "members.txt"
    write_members(out, candidates[:2], ["chosen for a test", ""])
    lines = out.read_text().splitlines()
    assert lines[:2] == ["# chosen for a test", "#"] and len(lines) == 4
    assert [p.resolve() for p in read_members(out)] == [c.resolve() for c in candidates[:2]]
    with pytest.raises(UserError, match="exists; pass --force"):
        write_members(out, candidates[:1])
    write_members(out, candidates[:1], force=True)
    assert len(read_members(out)) == 1 and not list(out.parent.glob("*.part"))
    absolute = tmp_path / "absolute.txt"
    absolute.write_text(f"\n  # a comment\n{candidates[2].resolve()}\n\n")
    assert read_members(absolute) == [candidates[2].resolve()]
    bad = {
        "missing.txt": (None, "cannot read the members file"),
        "empty.txt": ("# nothing\n\n", "lists no checkpoint"),
        "typo.txt": (f"{candidates[0].resolve()}\nnot/there.ckpt\n", "line 2: not/there.ckpt is not a file"),
        "folder.txt": (f"{tmp_path}\n", "line 1:"),
        "binary.txt": (b"\xff\xfe\x00", "not UTF-8 text"),
        "large.txt": ("#" * (MAX_BYTES + 1), "larger than 64 KiB"),
    }
    for name, (content, message) in bad.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(UserError, match=message):
            read_members(path)


def test_predict_and_export_take_a_members_file(candidates, shared_data_dir, tmp_path, capsys):
    members = tmp_path / "members.txt"
    write_members(members, candidates[:2])
    images, _ = load_split(raw_dir(shared_data_dir), "test")
    folder = tmp_path / "digits"
    folder.mkdir()
    Image.fromarray(images[0].numpy()).save(folder / "0.png")
    rows = {}
    for how in (["--members", str(members)], ["--ckpt", str(candidates[0]), "--ckpt", str(candidates[1])]):
        out = tmp_path / f"{how[0][2:]}.csv"
        assert predict.main([*how, str(folder), "--out", str(out)]) == 0
        rows[how[0]] = out.read_text()
    assert rows["--members"] == rows["--ckpt"]
    out = tmp_path / "ensemble.pt"
    argv = ["--members", members, "--format", "torchscript", "--out", out, "--data-dir", shared_data_dir]
    assert export.main([str(a) for a in argv]) == 0
    contract = json.loads(Path(f"{out}.json").read_text())
    assert contract["checkpoint"] == [str(c.resolve()) for c in candidates[:2]]
    capsys.readouterr()
    for main in (evaluate.main, export.main, predict.main):
        assert main(["--members", str(members), "--ckpt", str(candidates[0]), str(folder)]) == 2
        assert "not allowed with argument" in error_line(capsys)
        assert main(["--format", "onnx", "--out", "x"] if main is export.main else [str(folder)]) == 2
        assert "one of the arguments --ckpt --members is required" in error_line(capsys)


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw").is_dir(), reason="no real MNIST files beside the repo")
def test_on_real_mnist_an_ensemble_chosen_on_validation_is_evaluated_once_on_test(tmp_path, capsys):
    """Three short runs that differ (seed, net) on one validation split; chosen on it; the test set opened last."""
    runs = [("0", "slim"), ("1", "slim"), ("2", "linear")]
    common = ["--recipe", "fast", "--precision", "32-true", "--epochs", "1", "--trainer.limit_train_batches", "60"]
    common += ["--data-dir", str(REAL_DATA), "--data.split_seed", "0", "--quiet"]
    ckpts = []
    for seed, net in runs:
        assert train([*common, "--seed", seed, "--net", net, "--save-dir", str(tmp_path / seed)]) == 0
        ckpts.append(tmp_path / seed / "initial" / "version_0" / "checkpoints" / "last.ckpt")
    out = tmp_path / "members.txt"
    assert select(["--ckpt", *map(str, ckpts), "--data-dir", str(REAL_DATA), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    chosen = read_members(out)
    members = load_members(ckpts)
    images, labels = evaluate.split_data(members, REAL_DATA, "val")
    assert len(labels) == 6000  # the fast recipe's 10 %, the same images for the three
    with torch.no_grad():
        singles = [ensemble_correct([m.module(images)], labels) for m in members]
    assert chosen[0].resolve() == ckpts[singles.index(max(singles))].resolve()  # the best alone comes first
    assert 1 <= len(chosen) <= 3 and f"wrote {len(chosen)} member" in printed
    result = tmp_path / "test"
    assert evaluate.main(["--members", str(out), "--data-dir", str(REAL_DATA), "--out", str(result)]) == 0
    metrics = json.loads((result / "metrics.json").read_text())
    assert metrics["count"] == 10000 and metrics["acc"] > 0.95 and len(metrics["members"]) == len(chosen)
