"""Does a run keep its fair share of a CPU it shares? A short run timed alone and beside one busy process, with
torch's default threads and with this project's choice, interleaved, in one run.

Run: ``python benchmarks/contention.py --data-dir ../shared/data [--steps 300] [--rounds 2] [--out FILE]
[-- TRAIN_OPTIONS]``.

Each measurement is ``scripts/train.py --recipe fast --epochs 1 --trainer.limit_train_batches STEPS`` (and any
TRAIN_OPTIONS) in a fresh process; its time is the run's own ``wall_s`` (results.json: training and evaluation,
after the imports). The neighbour is a single-threaded torch loop of matrix products, started by the benchmark
before the measurement and stopped after it: what anyone has beside a run (a browser, a second experiment, a test
suite). The two settings:

- ``default``: ``OMP_NUM_THREADS`` = the cores: torch's own threads, spinning while they wait;
- ``ours``: the environment as a user has it: OpenMP's threads sleep while they wait if other processes run when
  the script starts (``mnist_lit.threads.share_the_cpu``), the results the same as on an idle machine;
- ``follow``: ``MNIST_LIT_THREADS=follow``: the thread count also follows the free cores as the run goes (the
  results then depend on the load).

Reported, as the median of each round's own ratio to ``default`` alone: each setting alone (what it costs on an
idle machine) and beside the neighbour (a fair share of 2 cores with one taken is 2x).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.threads import CHOSEN_HERE, USER_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "ours", "follow")
PLACES = ("alone", "beside")
NEIGHBOUR = """
import sys, torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
print("ready", flush=True)
while True:
    a = torch.tanh(a @ a)
"""


def environment(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*USER_SETTINGS, CHOSEN_HERE, "MNIST_LIT_THREADS")}
    if setting == "default":
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    elif setting == "follow":
        env["MNIST_LIT_THREADS"] = "follow"
    return env


def start_neighbour() -> subprocess.Popen:
    """The busy single-threaded process, once it computes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdout=subprocess.PIPE, text=True, env=env)
    if neighbour.stdout.readline().strip() != "ready":
        raise UserError("the busy neighbour process did not start")
    return neighbour


def timed_run(setting: str, beside: bool, data_dir: str, steps: int, options: list[str]) -> float:
    """One short run's own wall_s, with the setting's threads, alone or beside the busy neighbour."""
    with tempfile.TemporaryDirectory() as save_dir:
        cmd = [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "--recipe",
            "fast",
            "--epochs",
            "1",
            "--trainer.limit_train_batches",
            str(steps),
            "--data-dir",
            data_dir,
            "--save-dir",
            save_dir,
            "--quiet",
            *options,
        ]
        neighbour = start_neighbour() if beside else None
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=environment(setting))
        finally:
            if neighbour:
                neighbour.kill()
                neighbour.wait()
        if done.returncode != 0:
            raise UserError(f"the {setting} run failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        results = json.loads(next(Path(save_dir).glob("initial/version_*/results.json")).read_text())
        return results["wall_s"]


def contention(data_dir: str, steps: int, rounds: int, options: list[str]) -> dict:
    """Every (setting, place) each round, in turns (reversed every other round); ratios to default alone."""
    order = [(s, p) for p in PLACES for s in SETTINGS]
    times: dict[str, list[float]] = {f"{s} {p}": [] for s, p in order}
    for round_ in range(rounds):
        for setting, place in order if round_ % 2 == 0 else order[::-1]:
            seconds = timed_run(setting, place == "beside", data_dir, steps, options)
            times[f"{setting} {place}"].append(seconds)
            print(f"round {round_ + 1}: {setting:7} {place:6} {seconds:6.2f} s", flush=True)
    reference = times["default alone"]
    figures = {
        name: {
            "seconds": values,
            "median_s": statistics.median(values),
            "ratio_to_default_alone": statistics.median(v / r for v, r in zip(values, reference)),
        }
        for name, values in times.items()
    }
    return {"steps": steps, "rounds": rounds, "cores": os.cpu_count(), "options": options, "runs": figures}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="contention.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="holds MNIST/raw/")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run (default 300)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="contention.json", help="where the figures go (JSON)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("train_options", nargs="*", help="after --: more options for scripts/train.py")

    def body():
        args = parser.parse_args(argv)
        if args.steps < 1 or args.rounds < 1:
            raise UserError("--steps and --rounds must be >= 1")
        if Path(args.out).exists() and not args.force:
            raise UserError(f"{args.out} exists; pass --force to replace it, or another --out")
        figures = contention(args.data_dir, args.steps, args.rounds, args.train_options)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
        for name, row in figures["runs"].items():
            print(f"{name:15} median {row['median_s']:6.2f} s   {row['ratio_to_default_alone']:.3f}x default alone")
        return 0

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
