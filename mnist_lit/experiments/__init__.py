"""Experiments over many runs: each run is ``scripts/train.py`` in its own process, the runs of an experiment are
trials of an Optuna study (a SQLite file, or a database server shared by several machines).

launch (starting runs, the study's storage) - sweep (seeds x settings, resumable) - tune (an Optuna search) -
pruning (tune's callback inside a trial's run) - records (runs as records: folders, trials) - table (the runs
table of scripts/runs.py, mean ± sd per group) - selection (an ensemble's members chosen on a shared validation
split: scripts/select_ensemble.py).
"""
