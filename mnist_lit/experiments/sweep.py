"""``scripts/sweep.py``: many train.py runs from one command: seeds x settings (the cross product), each run in a
train.py process of its own, all into one --save-dir; at the end the runs table grouped by the swept settings.

The grid is an Optuna study (GridSampler) kept in a database, by default the sqlite file SAVE_DIR/sweep.db.
``--jobs N`` runs N grid points at a time here; the same command on other machines with a database URL that all
reach (``--storage postgresql://...``) adds workers there, each with a --save-dir of its own. The database is the
shared record: a point's trial keeps its runs' settings, results, folders and host (``scripts/runs.py --storage``
reads them), and a point one worker finished is not run by another. Each worker's trials send heartbeats: the
trial of a worker that died is failed after the grace period (3 heartbeats) and queued again
(RetryHeartbeatStaleTrialCallback). Re-running the same command completes a sweep: a grid point whose run
finished (results.json, or a complete trial) is not run again, an interrupted run in this --save-dir resumes
exactly from its last.ckpt (``--ckpt``), a run that never saved a checkpoint starts again. Kill a sweep by its
process group (Ctrl-C does): a train.py process whose sweep died goes on alone.
"""

import itertools
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.experiments.launch import (
    HEARTBEAT_S,
    RunFailed,
    add_run_options,
    check_run_options,
    results_of,
    retry_callback,
    run_train,
    shown,
    study_name,
    study_storage,
)
from mnist_lit.experiments.records import read_config, record_run
from mnist_lit.experiments.table import report
from mnist_lit.runs import run_dirs

KEY = re.compile(r"(model|data|trainer)\.\w+(\.\w+)*")  # a train.py setting by its full name


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if not found or (found[2] and int(found[2]) < int(found[1])):
            raise UserError(f"--seeds takes seeds and ranges such as 0-4 or 0,2,5 (got {text!r})")
        seeds += range(int(found[1]), int(found[2] or found[1]) + 1)
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {text} names a seed twice")
    return seeds


def parse_set(item: str) -> tuple[str, list[str]]:
    key, _, text = item.partition("=")
    values = [value.strip() for value in text.split(",")]
    if not KEY.fullmatch(key) or "" in values:
        raise UserError(f"--set takes KEY=V1,V2,... with KEY a full train.py name such as model.lr (got {item!r})")
    if len(set(values)) < len(values):
        raise UserError(f"--set {item} names a value twice")
    return key, values


def command_line(run: Path) -> list[str]:
    """The train.py arguments a run was started with (train.py writes command.txt right after making its folder)."""
    try:
        return shlex.split((run / "command.txt").read_text())[2:]
    except (OSError, ValueError):
        return []


# A grid point's runs are found on disk, by the command lines in their command.txt, not through the study: a point's
# command starts with its settings followed by --save-dir, and a resume or a full stage names the checkpoint it goes
# on from (--ckpt), whose run folder chains it to the point. This needs no record written between the child making
# its folder and a crash; it serves any trial of the point (Optuna's retry of a failed trial, or GridSampler giving
# a dead worker's point again within the grace period), also with a new database. A point finished in another
# worker's --save-dir (another machine) is found in the study instead: its complete trial (earlier_result).
def point_runs(save_dir: Path, stage: str, starts: Callable[[list[str]], bool], chain=()) -> list[Path]:
    """A grid point's runs of a stage, newest first: those whose command `starts` the point and those that go on
    from a checkpoint of one of them (or of a run in `chain`)."""
    mine, found = {Path(run) for run in chain}, []
    for run in reversed(run_dirs(save_dir, stage)):  # oldest first: a run comes after the one it goes on from
        args = command_line(run)
        source = Path(args[args.index("--ckpt") + 1]).parent.parent if "--ckpt" in args[:-1] else None
        if args and (starts(args) or source in mine):
            mine.add(run)
            found.append(run)
    return found[::-1]


def resumable(run: Path) -> Path | None:
    """The run's last.ckpt if training can go on from it (train.py refuses one of its last epoch)."""
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    from mnist_lit.checkpoint_file import load_checkpoint  # torch: only when there is something to resume

    config, problem = read_config(run)
    trainer = config.get("trainer") if config else None
    epochs = trainer.get("max_epochs") if isinstance(trainer, dict) else None
    if type(epochs) is not int:
        why = problem or "config.yaml has no whole number at trainer.max_epochs"
        raise UserError(f"{run}: {why}; cannot tell whether it can go on (move the folder away to start anew)")
    return ckpt if load_checkpoint(ckpt)["epoch"] + 1 < epochs else None


def stage_run(find: Callable[[], list[Path]], argv: Callable[[Path | None], list[str]], jobs: int) -> Path:
    """A grid point's finished run of a stage: one on disk, else a resume of its newest checkpoint, else a new run."""
    if not any(results_of(run) for run in find()):
        run_train(argv(next(filter(None, map(resumable, find())), None)), jobs)
    done = next((run for run in find() if results_of(run)), None)
    if done is None:
        raise RunFailed("train.py finished without results.json")
    return done


def sweep(args, space: dict[str, list]) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial prints its own line; failures still show
    done_states = (optuna.trial.TrialState.COMPLETE,)
    points = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    base = args.settings
    name = args.study or study_name("sweep", base, space, args.then_full, args.full_epochs)
    study = optuna.create_study(
        study_name=name,
        storage=study_storage(args, args.heartbeat),
        sampler=optuna.samplers.GridSampler(space, seed=0),  # trial k < len(grid): point k of its seeded order
        direction="maximize",
        load_if_exists=True,
    )
    print(f"study {name} in {shown(args.storage)}: {len(points)} grid points", flush=True)
    running_here: list[dict] = []  # the points of this process's running trials (--jobs: threads)

    def objective(trial: optuna.Trial) -> float:
        point = {key: trial.suggest_categorical(key, values) for key, values in space.items()}
        running_here.append(point)
        try:
            return run_point(args, trial, point, [*base, *(a for k, v in point.items() for a in (f"--{k}", str(v)))])
        finally:
            running_here.remove(point)

    def settled(point: dict, states=done_states) -> bool:
        return any(t.params == point and t.state in states for t in study.get_trials(deepcopy=False))

    def stop_when_all_started(study: optuna.Study, _) -> None:  # else GridSampler hands out a running point again
        if all(settled(p, (*done_states, optuna.trial.TrialState.FAIL)) or p in running_here for p in points):
            study.stop()

    def waiting() -> int:
        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))

    for point in points:  # a point whose run failed (its worker did not die) runs again when the command is rerun
        trials = [t for t in study.get_trials() if t.params == point]  # copies: the callback changes its attrs
        if trials and all(t.state == optuna.trial.TrialState.FAIL for t in trials):
            retry_callback(max_retry=None)(study, trials[-1])
    catch = (RunFailed,)
    if not all(settled(point) for point in points):
        study.optimize(objective, n_jobs=args.jobs, catch=catch, callbacks=[stop_when_all_started])
    while waiting():  # retries of dead workers' trials queued meanwhile (a point done by now: from the study or disk)
        study.optimize(objective, n_trials=waiting(), n_jobs=args.jobs, catch=catch)
    keys = [key for key in space if key != "seed_everything"]  # the seeds are the repetitions
    try:  # from the study: every worker's runs, wherever they ran
        print(report(["--storage", args.storage, "--study", name, "--group-by", *(keys or ["recipe"])]))
    except UserError as err:  # e.g. no run finished, so no run has the swept keys
        print(f"no table: {err}", file=sys.stderr)
    left = [point for point in points if not settled(point)]
    elsewhere = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)  # another worker's
    running = [point for point in left if settled(point, elsewhere)]
    failed = [point for point in left if point not in running]

    def named(some: list[dict]) -> str:
        return "; ".join(" ".join(f"{k}={v}" for k, v in point.items()) for point in some)

    if running:
        print(
            f"{len(running)} of {len(points)} grid points still running in other workers (give the same command "
            f"again if they died): {named(running)}",
            file=sys.stderr,
        )
    if failed:
        print(
            f"{len(failed)} of {len(points)} grid points failed (give the same command again to retry them): "
            f"{named(failed)}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def run_point(args, trial, point: dict, settings: list[str]) -> float:
    """A trial: the grid point's result from an earlier trial of the study, else its initial run (and full stage),
    each found on disk, resumed or started."""
    wait_for_earlier(trial, point, args.heartbeat)
    done = earlier_result(trial, point)
    if done is not None:
        return done
    ident = [*settings, "--save-dir"]

    def initial_runs() -> list[Path]:
        return point_runs(args.save_dir, "initial", lambda a: a[: len(ident)] == ident)

    initial = stage_run(
        initial_runs, lambda ckpt: [*settings, *args.where, *(["--ckpt", str(ckpt)] if ckpt else [])], args.jobs
    )
    record_run(trial, initial)
    results = results_of(initial)
    if results["acc"] is None:
        raise RunFailed(f"{initial} has no accuracy (no evaluation)")
    line = f"trial {trial.number} {' '.join(f'{k}={v}' for k, v in point.items())}: {100 * results['acc']:.2f} %"
    if args.then_full:
        epochs = ["--epochs", str(results["epoch"] + args.full_epochs)] if args.full_epochs else []
        first = initial / "checkpoints" / "last.ckpt"
        full = stage_run(
            lambda: point_runs(args.save_dir, "full", lambda a: False, chain=initial_runs()),
            lambda ckpt: ["--stage", "full", *epochs, *args.where, "--ckpt", str(ckpt or first)],
            args.jobs,
        )
        record_run(trial, full)
        trial.set_user_attr("test_acc", results_of(full)["acc"])  # recorded, never used to choose anything
        line += f", full stage test {100 * results_of(full)['acc']:.2f} % ({full})"
    print(f"{line} ({initial})", flush=True)
    return results["acc"]


def wait_for_earlier(trial, point: dict, heartbeat: int) -> None:
    """Wait while an earlier trial runs the same point (GridSampler gives a started point again once all have
    started: a live worker's, or a dead one's within the grace period) until it ends or Optuna fails it as stale:
    a point never runs twice at once. Only earlier trials: two trials never wait for each other. An earlier trial
    still choosing its settings (created a moment ago, by any worker) may be choosing this point: a short wait."""
    import optuna

    while True:
        trials = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        same = [t for t in trials if t.number < trial.number and t.params.items() <= point.items()]
        if not same:
            return
        time.sleep(heartbeat if any(t.params == point for t in same) else 0.1)
        optuna.storages.fail_stale_trials(trial.study)


def earlier_result(trial, point: dict) -> float | None:
    """The point's value from a complete trial of the study (whichever worker ran it, on whichever machine)."""
    import optuna

    trials = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    done = next((t for t in trials if t.params == point), None)
    if done is None:
        return None
    trial.set_user_attr("result_of_trial", done.number)
    print(
        f"trial {trial.number} {' '.join(f'{k}={v}' for k, v in point.items())}: {100 * done.value:.2f} % "
        f"(trial {done.number}'s)",
        flush=True,
    )
    return done.value


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0].replace("``", ""))
    add_run_options(p)
    p.add_argument("--seeds", help="the runs' seeds: 0-4, 0,2,5 (default: the config's seed)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a setting's values, e.g. model.lr=0.01,0.1 (repeatable: the cross product)",
    )
    p.add_argument("--then-full", action="store_true", help="each initial run followed by its full stage")
    p.add_argument(
        "--full-epochs",
        type=int,
        help="with --then-full: its last epoch is the initial run's + this (default: train.py's)",
    )
    p.add_argument(
        "--heartbeat",
        type=int,
        default=HEARTBEAT_S,
        metavar="S",
        help=f"seconds between a trial's heartbeats; a dead worker's trial is retried 3 later (default {HEARTBEAT_S})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """scripts/sweep.py: bad options are one line and exit code 2; 1 if a grid point failed."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        space = {"seed_everything": parse_seeds(args.seeds)} if args.seeds else {}
        for key, values in map(parse_set, args.set):
            if key in space:
                raise UserError(f"--set {key} given twice")
            space[key] = values
        if not space:
            raise UserError("nothing to sweep: give --seeds and/or --set KEY=V1,V2")
        if args.heartbeat < 1 or (args.full_epochs is not None and args.full_epochs < 1):
            raise UserError("--heartbeat and --full-epochs must be >= 1")
        check_run_options(args, "sweep")
        return sweep(args, space)

    return exit_code(body)
