"""benchmarks/benchmark.py: every variant runs in its own process and is reported against the plain loop."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is tooling, not a package: load the script from its path
_spec = importlib.util.spec_from_file_location("benchmark", ROOT / "benchmarks" / "benchmark.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
benchmark, main, measure = bench.benchmark, bench.main, bench.measure
STEPS_PER_EPOCH = -(-288 // 64)  # helpers.write_mnist's 320 images, 10 % for validation, batch 64


def check_report(report: dict, variants: list[str]) -> None:
    assert list(report["variants"]) == variants
    assert report["variants"]["plain"]["ratio_to_plain"] == 1.0
    for figures in report["variants"].values():
        assert figures["ratio_to_plain"] > 0 and figures["samples_per_s"] > 0
        assert figures["peak_rss_mb"] > 100  # a process that imported torch
        assert all(0 <= r["acc"] <= 1 + 1e-6 for r in figures["rounds"])  # a float32 mean may round past 1
        assert len(figures["round_ratios"]) == len(figures["rounds"]) and all(q > 0 for q in figures["round_ratios"])
    assert report["variants"]["plain"]["round_ratios"] == [1.0] * report["rounds"]
    assert report["variants"]["plain"]["median_round_ratio_to_plain"] == 1.0
    if "bare_auto" in variants:
        assert report["variants"]["bare_auto"]["ratio_to_bare_auto"] == 1.0
        assert all(figures["ratio_to_bare_auto"] > 0 for figures in report["variants"].values())
    else:
        assert all(figures["ratio_to_bare_auto"] is None for figures in report["variants"].values())


@pytest.mark.slow
def test_protocol_mode_times_both_stages(shared_data_dir, tmp_path):
    variants = ["plain", "ours"]
    report = benchmark(str(shared_data_dir), 1, 1, variants, str(tmp_path / "b.json"), protocol=True)
    check_report(report, variants)
    assert report["protocol"] and report["variants"]["ours"]["seconds_per_epoch"] * 2 == pytest.approx(
        report["variants"]["ours"]["seconds"]
    )


@pytest.mark.parametrize("variant", ["ours_bf16_cl", "plain_bf16_cl"])
def test_speed_option_variants_run(variant, shared_data_dir):
    result = measure(variant, str(shared_data_dir), epochs=1, protocol=False)
    assert result["variant"] == variant and 0 <= result["acc"] <= 1


@pytest.mark.parametrize("variant", [v for v in bench.VARIANTS if v.startswith("bare_auto_")])
def test_what_is_added_to_bare_auto_leaves_its_steps_as_they_are(variant, shared_data_dir):
    reference, result = (measure(v, str(shared_data_dir), 1, False) for v in ("bare_auto", variant))
    assert (result["acc"], result["steps_stamped"]) == (reference["acc"], reference["steps_stamped"])


def test_bad_requests_are_one_line_errors(shared_data_dir, tmp_path, capsys):
    base = ["--data-dir", str(shared_data_dir), "--out", str(tmp_path / "b.json")]
    assert main([*base, "--protocol", "--variants", "plain", "bare_auto"]) != 0
    assert (
        capsys.readouterr().err
        == "error: bare_auto: no --protocol mode (one stage, no checkpoints); leave out of --variants\n"
    )
    assert main([*base, "--epochs", "0"]) != 0
    assert "--epochs and --rounds must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
    (tmp_path / "b.json").write_text("earlier figures")
    assert main([*base, "--variants", "plain"]) == 2  # refused before any timing
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'b.json'} exists; pass --force to replace it")
    assert (tmp_path / "b.json").read_text() == "earlier figures"


@pytest.mark.slow
def test_every_variant_runs_the_same_steps_and_each_step_after_the_first_epoch_is_timed(shared_data_dir, tmp_path):
    out = tmp_path / "bench.json"
    variants = ["plain", "bare_auto", "obvious"]  # the reference, the Lightning floor, the unstamped tutorial
    # the one-layer net: the run is all code around the net, as when the per-step cost is measured
    report = benchmark(str(shared_data_dir), 2, 1, variants, str(out), False, net_name="linear")
    check_report(report, variants)
    assert json.loads(out.read_text()) == report
    assert report["net"] == "linear"
    # plain, ours, bare and bare_auto make the same steps on the same batches from the same initial weights
    # (ours and bare measured here, in this process, as each child measures itself: they add no report figure)
    results = {v: report["variants"][v]["rounds"][0] for v in ("plain", "bare_auto")}
    results |= {v: measure(v, str(shared_data_dir), 2, False, net_name="linear") for v in ("ours", "bare")}
    assert len({result["acc"] for result in results.values()}) == 1, results
    for result in results.values():
        assert result["steps_stamped"] == 2 * STEPS_PER_EPOCH  # every training batch, no evaluation batch
        assert result["step_ms"] > 0
    for variant in ("plain", "bare_auto"):
        assert report["variants"][variant]["step_ms"] == results[variant]["step_ms"]
    assert report["variants"]["bare_auto"]["step_ratio_to_bare_auto"] == 1.0
    assert report["variants"]["plain"]["step_extra_ms_over_plain"] == 0.0
    assert report["variants"]["obvious"]["rounds"][0]["step_ms"] is None  # torch's DataLoader: not stamped
    assert "step_ms" not in report["variants"]["obvious"]


def test_the_step_clock_times_the_epochs_after_the_first_without_their_boundaries():
    clock = bench.StepClock()
    clock.epochs = [[0.0, 5.0, 9.0], [20.0, 20.002, 20.004], [30.0, 30.003]]  # seconds; gaps between epochs
    assert clock.ms_per_step() == pytest.approx(1000 * (0.004 + 0.003) / 3)
    clock.epochs = clock.epochs[:1]
    assert clock.ms_per_step() is None  # one epoch: nothing after the warm-up


def test_one_epoch_has_no_step_figures(shared_data_dir):
    result = measure("bare_auto", str(shared_data_dir), epochs=1, protocol=False, net_name="linear")
    assert result["step_ms"] is None and result["steps_stamped"] == STEPS_PER_EPOCH


def test_accelerator_gpu_without_cuda_is_one_line(shared_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    argv = ["--data-dir", str(shared_data_dir), "--out", str(tmp_path / "b.json"), "--accelerator", "gpu"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: --accelerator gpu: no CUDA GPU here\n"
    assert not (tmp_path / "b.json").exists()
