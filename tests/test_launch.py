"""mnist_lit.experiments.launch: several workers on one study never take the same waiting trial (on sqlite, the
race that made tune.py's two workers run an enqueued trial twice, optuna/optuna#4002; PostgreSQL locks the row:
SELECT ... FOR UPDATE)."""

import collections
import subprocess
import sys

import optuna

WORKER = """
import sys, optuna
from mnist_lit.experiments import launch
study = optuna.load_study(study_name="q", storage=launch.open_storage(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()  # all workers ask at once
print(" ".join(str(study.ask().number) for _ in range(10)))
"""


def test_workers_on_one_study_never_take_the_same_waiting_trial(new_database):
    url = new_database()
    study = optuna.create_study(study_name="q", storage=url)
    for x in range(40):
        study.enqueue_trial({"x": x})
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for worker in workers:
        assert worker.stdout.readline() == "ready\n"
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    taken = [int(n) for worker in workers for n in worker.communicate(timeout=120)[0].split()]
    assert sorted(taken) == list(range(40)), collections.Counter(taken).most_common(3)  # each trial once
    assert {t.state for t in study.get_trials()} == {optuna.trial.TrialState.RUNNING}


def test_a_study_name_changes_with_every_part_of_the_command():
    """Different sweeps or searches never share a study (a --then-full sweep would find the plain one's points
    done); the same command finds its own again."""
    from mnist_lit.experiments.launch import study_name

    base = (["--recipe", "seed"], {"seed_everything": [0, 1]}, False, None)
    variants = [base]
    for i, other in enumerate((["--recipe", "fast"], {"seed_everything": [0, 2]}, True, 5)):
        variants.append((*base[:i], other, *base[i + 1 :]))
    names = [study_name("sweep", *what) for what in variants]
    assert len(set(names)) == len(variants) and study_name("sweep", *base) == names[0]
    assert study_name("tune", *base) != names[0]
