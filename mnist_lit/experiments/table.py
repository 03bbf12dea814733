"""``scripts/runs.py``: what has been run under save dirs, one row per run folder, read only from what the runs
left (config.yaml, results.json, checkpoints/last.ckpt): the settings that differ between the listed runs as
columns, the final accuracy, the status; or, with --group-by, mean ± sd of the final accuracy per group. With
``--storage URL``, the same from a sweep's or search's study instead, read from the database alone (each trial
keeps its finished runs' settings, results, folder and host as user attrs): no access to the runs' disks. The
runs themselves and their status: ``mnist_lit.experiments.records``."""

import csv
import difflib
import io
import statistics
import sys
from pathlib import Path

from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.experiments.records import Run, read_runs, study_runs
from mnist_lit.runs import OUTPUT_SWITCHES, PATH_KEYS

FIXED = ("stage", "version", "recipe", "status")  # keys of every row, beside config.yaml's dotted settings
RESULT_COLUMNS = ("epoch", "split", "correct/count", "acc %", "wall s")
# Where a run went and what it printed: never columns (--filter and --group-by still take them).
LOCATION_KEYS = {*PATH_KEYS, *OUTPUT_SWITCHES}
SETTINGS = "settings"  # --group-by's key for all the settings but the seed: the runs that differ only in it
SEED_KEYS = {"seed_everything", "data.seed", "model.seed"}
SECTIONS = ("seed_everything", "model", "data", "trainer")  # the order of the settings' columns
FORMATS = ("table", "csv", "markdown")


def differing_keys(runs: list[Run]) -> list[str]:
    """The settings whose values are not the same in every listed run with a readable config.yaml."""
    configured = [run for run in runs if run.settings]
    keys = dict.fromkeys(key for run in configured for key in run.settings)
    keep = [key for key in keys if key not in LOCATION_KEYS and key not in FIXED]
    keep = [key for key in keep if len({run.settings.get(key) for run in configured}) > 1]
    section = {name: i for i, name in enumerate(SECTIONS)}
    return sorted(keep, key=lambda key: section.get(key.split(".")[0], len(SECTIONS)))


def group_keys(keys: list[str], runs: list[Run]) -> list[str]:
    """--group-by's keys, with ``settings`` as recipe and every setting that differs between the runs but the
    seed (and where the runs went and what they printed): a changed setting is never averaged with its recipe."""
    if SETTINGS not in keys:
        return keys
    every = ["recipe", *(key for key in differing_keys(runs) if key not in SEED_KEYS)]
    i = keys.index(SETTINGS)
    return list(dict.fromkeys([*keys[:i], *every, *keys[i + 1 :]]))


def result_cells(results: dict | None) -> list[str]:
    """epoch, split, correct/count, acc %, wall s of a results.json ("-" where there is none)."""
    if not results:
        return ["-"] * len(RESULT_COLUMNS)
    evaluated = None not in (results["correct"], results["count"], results["acc"])
    score = [f"{results['correct']}/{results['count']}", f"{100 * results['acc']:.2f}"] if evaluated else ["-", "-"]
    wall = "-" if results["wall_s"] is None else f"{results['wall_s']:.1f}"
    return [str(results["epoch"]), str(results["split"]), *score, wall]


def cell(run: Run, key: str) -> str:
    """A run's value of a column; "-" where the run has no such setting, empty for an option its net lacks."""
    value = run.value(key)
    return value if value is not None else "" if key.startswith("model.net_options.") else "-"


def runs_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """One row per run: stage, version, recipe, the differing settings, the results, the status."""
    keys = differing_keys(runs)
    where = len({run.where for run in runs}) > 1  # runs of several save dirs: which one
    header = [*(["save dir"] if where else []), "stage", "version", "recipe", *keys, *RESULT_COLUMNS, "status"]
    rows = [
        [*([run.where] if where else []), run.stage, str(run.version)]
        + [*(cell(run, key) for key in ["recipe", *keys]), *result_cells(run.results), run.status]
        for run in runs
    ]
    return header, rows


def groups_table(runs: list[Run], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per group of runs sharing the keys' values (always the stage: val and test accuracies are not
    mixed): n finished runs, mean and sample sd of their final accuracy in percent, how many other runs."""
    keys = keys if "stage" in keys else ["stage", *keys]
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.value(key) or "-" for key in keys), []).append(run)
    rows = []
    for values, members in groups.items():
        accs = [acc for acc in (run.accuracy() for run in members) if acc is not None]
        mean = f"{statistics.mean(accs):.2f}" if accs else "-"
        sd = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
        rows.append([*values, str(len(accs)), mean, sd, str(len(members) - len(accs))])
    return [*keys, "n", "acc % mean", "sd", "other runs"], rows


def number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    """The rows as aligned plain text (numbers to the right), CSV or a Markdown table."""
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *rows])
        return out.getvalue().rstrip("\n")
    numeric = [
        bool(rows) and all(row[i] == "-" or number(row[i]) is not None for row in rows) for i in range(len(header))
    ]
    if fmt == "markdown":
        rule = ["---:" if right else "---" for right in numeric]
        lines = [[cell.replace("|", "\\|") for cell in row] for row in [header, *rows]]
        return "\n".join(f"| {' | '.join(row)} |" for row in [lines[0], rule, *lines[1:]])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(row, widths, numeric)).rstrip()
        for row in [header, *rows]
    )


def check_key(key: str, known: set[str], option: str) -> None:
    if key in known:
        return
    close = difflib.get_close_matches(key, sorted(known), n=3)
    keys = "keys are stage, version, recipe, status and config.yaml's dotted settings, such as model.lr"
    hint = f"did you mean {' or '.join(close)}?" if close else f"{keys} or seed_everything"
    raise UserError(f"unknown key for {option}: {key}; {hint}")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="runs.py", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument(
        "save_dir", nargs="*", metavar="SAVE_DIR", help="the runs' --save-dir, or several (default lightning_logs)"
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="instead: the runs a study's trials recorded in this Optuna "
        "database (sweep.py's or tune.py's --storage; a sqlite file: sqlite:///SAVE_DIR/sweep.db)",
    )
    p.add_argument("--study", metavar="NAME", help="with --storage: the study (needed if it holds several)")
    p.add_argument(
        "--group-by",
        nargs="+",
        default=[],
        metavar="KEY",
        help="mean ± sd of the final accuracy over the finished runs sharing these keys' values, e.g. "
        "recipe model.lr (seed_everything is the seed); settings: all settings but the seed, i.e. the "
        "runs that differ only in their seed",
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only the runs whose KEY reads VALUE (numbers compare as numbers); repeatable",
    )
    p.add_argument("--format", choices=FORMATS, default="table", help="aligned text (default), csv or markdown")
    return p


def report(argv: list[str] | None) -> str:
    """What scripts/runs.py prints."""
    args = build_parser().parse_args(argv)
    filters = [item.partition("=")[::2] for item in args.filter]
    for item, (key, _) in zip(args.filter, filters):
        if "=" not in item or not key:
            raise UserError(f"--filter takes KEY=VALUE, e.g. recipe=strong (got {item})")
    for key in args.group_by:  # nargs: `--group-by recipe logs` takes logs for a key
        if Path(key).is_dir():
            raise UserError(f"--group-by {key}: a folder, not a key (SAVE_DIR goes before --group-by)")
    if args.storage and args.save_dir:
        raise UserError("give SAVE_DIRs or --storage, not both")
    if args.study and not args.storage:
        raise UserError("--study goes with --storage URL")
    if args.storage:
        runs = study_runs(args.storage, args.study)
        if not runs:
            print("no finished run recorded in the study", file=sys.stderr)
    else:
        save_dirs = args.save_dir or ["lightning_logs"]
        runs = [run for save_dir in save_dirs for run in read_runs(save_dir)]
        if not runs:
            print(f"no runs under {', '.join(map(str, save_dirs))} (in initial/ or full/)", file=sys.stderr)
    known = {*FIXED, *(key for run in runs for key in run.settings)}
    for option, keys in (("--group-by", args.group_by), ("--filter", [key for key, _ in filters])):
        for key in keys if runs else []:  # no runs: no settings to know the keys by
            check_key(key, known | ({SETTINGS} if option == "--group-by" else set()), option)
    runs = [run for run in runs if all(matches(run.value(key), value, key) for key, value in filters)]
    if not runs and filters:
        print("no run matches the filters", file=sys.stderr)
    table = groups_table(runs, group_keys(args.group_by, runs)) if args.group_by else runs_table(runs)
    return render(*table, args.format)


def matches(have: str | None, want: str, key: str) -> bool:
    """--filter's test: the same text, the same number (1e-4 is 0.0001), or status=broken for any broken run."""
    if have is None:
        return False
    status = key == "status" and have.split(":")[0] == want
    return have == want or status or (number(have) is not None and number(have) == number(want))


def main(argv: list[str] | None = None) -> int:
    """scripts/runs.py: a missing SAVE_DIR, an unknown key or a bad option is one line and exit code 2."""
    return exit_code(lambda: print(report(argv)))
