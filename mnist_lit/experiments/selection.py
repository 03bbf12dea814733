"""``scripts/select_ensemble.py``: an ensemble's members chosen from candidate checkpoints on the validation split
they share, never on the test set (which it does not read): greedy forward selection (Caruana, Niculescu-Mizil,
Crew and Ksikes, "Ensemble selection from libraries of models", ICML 2004) on each candidate's validation
predictions, computed once. It prints each candidate's validation accuracy and the chosen members in order with
the ensemble's validation accuracy after each, and writes their list (``mnist_lit.members``) atomically, for
``evaluate.py``, ``predict.py`` and ``export.py --members FILE``. The same candidates give the same list.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.evaluate import member_log_probs, split_data, split_of
from mnist_lit.idx import DATA_DIR
from mnist_lit.inference import load_members, mean_probability
from mnist_lit.members import write_members

MAX_MEMBERS = 5


@dataclass(frozen=True)
class Step:
    """One addition of the selection: the candidate added (its index) and the ensemble's correct count after it."""

    candidate: int
    correct: int


def check_max_members(max_members: int) -> None:
    if max_members < 1:
        raise UserError(f"--max-members must be >= 1 (got {max_members})")


def ensemble_correct(log_probs: Sequence[torch.Tensor], labels: torch.Tensor) -> int:
    """How many images the mean of the members' probabilities classifies right."""
    return int((mean_probability(log_probs).argmax(1) == labels).sum())


def greedy_selection(log_probs: Sequence[torch.Tensor], labels: torch.Tensor, max_members: int = MAX_MEMBERS):
    """Greedy forward selection *without* replacement: from no member, each step adds the candidate (N x C
    log-probabilities each) that makes the ensemble, the mean of its members' probabilities, classify the most
    ``labels`` right; among equal counts, the earliest candidate in the given order. It stops when no candidate
    adds a right image (a strict gain) or at ``max_members``. Returns the steps, in order.

    Caruana et al. select with replacement (a model added again weighs more); here every member counts once, as
    in evaluate.py's ensembles, so ``max_members`` counts distinct nets."""
    check_max_members(max_members)
    steps: list[Step] = []
    while len(steps) < max_members:
        members = [log_probs[step.candidate] for step in steps]
        taken = {step.candidate for step in steps}
        scores = [
            (ensemble_correct([*members, candidate], labels), i)
            for i, candidate in enumerate(log_probs)
            if i not in taken
        ]
        if not scores:
            break
        correct, best = max(scores, key=lambda score: (score[0], -score[1]))  # the earliest of equal counts
        if steps and correct <= steps[-1].correct:
            break
        steps.append(Step(best, correct))
    return steps


def format_report(ckpts: Sequence, member_correct: Sequence[int], steps: Sequence[Step], count: int) -> str:
    """Each candidate's validation accuracy, then the chosen members in order with the ensemble's after each."""

    def pct(correct: int) -> str:
        return f"{100 * correct / count:7.2f}"

    lines = [f"{'candidate':>9s} {'correct':>7s} {'acc %':>7s}  checkpoint"]
    lines += [f"{i:9d} {c:7d} {pct(c)}  {ckpt}" for i, (ckpt, c) in enumerate(zip(ckpts, member_correct), 1)]
    lines.append(f"{'chosen':>9s} {'correct':>7s} {'acc %':>7s}  the ensemble's after adding candidate")
    lines += [
        f"{n:9d} {s.correct:7d} {pct(s.correct)}  {s.candidate + 1}: {ckpts[s.candidate]}"
        for n, s in enumerate(steps, 1)
    ]
    return "\n".join(lines)


def select(args) -> list[Step]:
    """Choose on the shared validation split, print the table, write the list; returns the steps."""
    out = Path(args.out)
    if out.exists() and not args.force:  # checked first: never after the work is done
        raise UserError(f"{out} exists; pass --force to replace it, or another --out")
    check_max_members(args.max_members)
    members = load_members(args.ckpt)
    images, labels = split_data(members, args.data_dir, "val")  # refuses members whose splits differ
    log_probs = member_log_probs(members, images)
    member_correct = [ensemble_correct([lp], labels) for lp in log_probs]
    steps = greedy_selection(log_probs, labels, args.max_members)
    settings = split_of(members[0].ckpt)
    if settings["folds"] is None:  # fold means nothing without folds
        del settings["fold"]
    split = ", ".join(f"{key} {value}" for key, value in settings.items() if value is not None)
    print(f"the validation split the {len(members)} candidates share: {len(labels)} images ({split})")
    print(format_report(args.ckpt, member_correct, steps, len(labels)))
    final = steps[-1].correct
    comments = [
        f"chosen by select_ensemble.py from {len(members)} candidates: greedy forward selection (without "
        f"replacement, at most {args.max_members}) on the validation split they share ({split}, {len(labels)} "
        "images); the test set was not read",
        f"the ensemble's validation accuracy: {final}/{len(labels)} = {100 * final / len(labels):.2f} %",
        "the candidates, in the order given (ties go to the earliest), and their validation accuracy alone:",
        *(f"  {c}/{len(labels)} {ckpt}" for ckpt, c in zip(args.ckpt, member_correct)),
    ]
    write_members(out, [members[step.candidate].path for step in steps], comments, args.force)
    print(f"wrote {len(steps)} member{'s' * (len(steps) > 1)} to {out}")
    return steps


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="select_ensemble.py", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument(
        "--ckpt",
        required=True,
        nargs="+",
        action="extend",
        metavar="PATH",
        help="the candidates: initial-stage checkpoints that share a validation split",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the list of the chosen members to write")
    p.add_argument("--data-dir", default=DATA_DIR, help="holds the dataset's raw/ files (default: %(default)s)")
    p.add_argument(
        "--max-members",
        type=int,
        default=MAX_MEMBERS,
        metavar="K",
        help=f"choose at most K members (default {MAX_MEMBERS})",
    )
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    """scripts/select_ensemble.py: bad input is one error line and exit code 2."""
    return exit_code(lambda: select(build_parser().parse_args(argv)))
