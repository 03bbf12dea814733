"""scripts/gpu_check.sh, rehearsed on the CPU (ACCELERATOR=cpu) with the small files: GPU time is scarce, so the
script that spends it must not fail on its own bugs there."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
NUMBER = r"[0-9.]+"


def gpu_check(*args, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_fast_and_protocol_parts_report_their_figures(shared_data_dir, tmp_path):
    run = gpu_check(
        shared_data_dir, tmp_path / "gc", "fast", "protocol", ACCELERATOR="cpu", FAST_SEEDS="0 3", PROTOCOL_EPOCHS="2"
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = (tmp_path / "gc" / "gpu_check_cpu.txt").read_text().splitlines()
    assert lines[0].endswith("scripts/gpu_check.sh, parts: fast protocol") and lines[-1] == "# exit 0"
    seed_line = (
        rf"fast seed (\d): epoch 2 val \d+/\d+ \({NUMBER}%\) \| run {NUMBER} s \| process {NUMBER} s \| "
        rf"test \d+/120 \({NUMBER}%\)"
    )
    seeds = [m.group(1) for m in map(re.compile(seed_line).fullmatch, lines) if m]
    assert seeds == list("03")
    mean = [line for line in lines if line.startswith("fast mean of 2 seeds: run ")]
    assert len(mean) == 1 and re.search(rf"test {NUMBER}% \(sd {NUMBER}\)$", mean[0])
    assert sorted(p.name for p in (tmp_path / "gc" / "fast").glob("seed*/initial/version_0")) == ["version_0"] * 2
    # run_all.sh ran (with this interpreter as its `python`) and the plain loop's protocol beside it
    assert any(re.fullmatch(rf"run_all.sh: full +epoch 22 +test \d+/120 \({NUMBER}%\).*", line) for line in lines)
    assert any(re.fullmatch(rf"run_all.sh: whole script {NUMBER} s", line) for line in lines)
    assert any(re.fullmatch(rf" +plain +{NUMBER} s/epoch +{NUMBER} ms/step +1.000x plain.*", line) for line in lines)


def test_an_unknown_part_is_one_line_and_exit_2(tmp_path):
    run = gpu_check(tmp_path / "data", tmp_path / "gc", "fast", "speed", ACCELERATOR="cpu")
    assert (run.returncode, run.stderr, run.stdout) == (2, "error: unknown part speed\n", "")
    assert not (tmp_path / "gc").exists()
