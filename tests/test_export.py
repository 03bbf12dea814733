"""mnist_lit.export and scripts/export.py: both formats end to end on the tiny checkpoint, contract, refusals."""

import contextlib
import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from helpers import previous_version_checkpoint

import mnist_lit.export
from mnist_lit.export import CONTRACT_KEY, main
from mnist_lit.idx import load_split, raw_dir
from mnist_lit.inference import load_trained

ROOT = Path(__file__).resolve().parents[1]
CHECKED = re.compile(r"checked on (\d+) mnist test images: (\d+) predictions differ, max abs diff (\S+) ")


def run(*argv) -> int:
    return main([str(a) for a in argv])


def run_quietly(*argv) -> tuple[int, str]:
    """Exit code and stdout of one export."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run(*argv)
    return code, printed.getvalue()


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def exported(request, trained_ckpt, shared_data_dir, tmp_path_factory):
    """One export per format, made once: (format, path, what it printed)."""
    out = tmp_path_factory.mktemp("export") / f"model.{request.param}"
    code, printed = run_quietly(
        "--ckpt", trained_ckpt, "--format", request.param, "--out", out, "--data-dir", shared_data_dir
    )
    assert code == 0, printed
    return request.param, out, printed


def test_export_is_checked_on_the_whole_test_set(exported):
    _, out, printed = exported
    images, differing, max_abs_diff = CHECKED.search(printed).groups()
    assert (int(images), int(differing)) == (120, 0)
    assert float(max_abs_diff) <= 1e-4
    assert f"wrote {out}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, f"{out.name}.json"]  # no .part, no .data


def test_contract_file_says_how_to_use_the_export(exported, trained_ckpt):
    export_format, out, _ = exported
    contract = json.loads(Path(f"{out}.json").read_text())
    mean, std = load_trained(trained_ckpt).module.pixel_stats
    assert contract["format"] == export_format
    assert contract["input"]["name"] == "pixels"
    assert contract["input"]["shape"] == ["batch", 1, 28, 28]
    assert (contract["input"]["dtype"], contract["input"]["range"]) == ("float32", [0, 255])
    assert contract["input"]["normalisation"] == {
        "inside": True,
        "mean": mean,
        "std": std,
        "formula": "(pixels / 255 - mean) / std",
    }
    assert (contract["output"]["name"], contract["output"]["shape"]) == ("log_probs", ["batch", 10])
    assert contract["classes"] == list("0123456789")
    assert contract["dataset"] == "mnist"
    assert contract["checkpoint"] == str(trained_ckpt.resolve())


def test_contract_is_also_inside_the_model(exported):
    export_format, out, _ = exported
    if export_format == "onnx":
        embedded = {p.key: p.value for p in onnx.load(str(out)).metadata_props}[CONTRACT_KEY]
    else:
        extra_files = {CONTRACT_KEY: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
            torch.jit.load(str(out), _extra_files=extra_files)
        embedded = extra_files[CONTRACT_KEY].decode()  # torch.jit.load fills it with bytes
    assert embedded == Path(f"{out}.json").read_text()


def test_saved_model_runs_on_its_own_like_the_checkpoint(exported, trained_ckpt, shared_data_dir):
    export_format, out, _ = exported
    images, _ = load_split(raw_dir(shared_data_dir), "test")
    pixels = images[:7].unsqueeze(1).float()  # 7: a batch size the export was not traced with
    with torch.no_grad():
        expected = load_trained(trained_ckpt).module(pixels)
        if export_format == "onnx":
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            (name,) = [i.name for i in session.get_inputs()]
            got = torch.from_numpy(session.run(None, {name: pixels.numpy()})[0])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                got = torch.jit.load(str(out))(pixels)
    assert got.shape == (7, 10)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_existing_files_are_kept_unless_forced(trained_ckpt, shared_data_dir, tmp_path, capsys):
    out = tmp_path / "model.pt"
    common = ["--ckpt", trained_ckpt, "--format", "torchscript", "--data-dir", shared_data_dir]
    out.write_text("precious")
    assert run(*common, "--out", out) == 2
    assert error_lines(capsys) == [f"error: {out} exists; pass --force to replace it"]
    assert out.read_text() == "precious"
    Path(f"{out}.json").write_text("{}")
    assert run(*common, "--out", tmp_path / "other.pt") == 0  # only FILE and FILE.json count
    capsys.readouterr()
    out.unlink()
    assert run(*common, "--out", out) == 2  # a contract alone is not overwritten either
    assert error_lines(capsys) == [f"error: {out}.json exists; pass --force to replace it"]
    out.write_text("precious")
    assert run(*common, "--out", out, "--force") == 0
    assert out.read_bytes() != b"precious"
    assert json.loads(Path(f"{out}.json").read_text())["format"] == "torchscript"


def test_out_that_is_a_folder_is_refused(trained_ckpt, shared_data_dir, tmp_path, capsys):
    (tmp_path / "afolder").mkdir()
    common = ["--ckpt", trained_ckpt, "--format", "torchscript", "--data-dir", shared_data_dir, "--force"]
    assert run(*common, "--out", tmp_path / "afolder") == 2
    assert error_lines(capsys) == [f"error: --out {tmp_path / 'afolder'} is a folder: name the file to write"]


def test_bad_format_is_one_error_line(trained_ckpt, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            ROOT / "scripts" / "export.py",
            "--ckpt",
            trained_ckpt,
            "--format",
            "pickle",
            "--out",
            tmp_path / "m",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: argument --format: invalid choice: 'pickle'")  # Python's wording follows
    assert list(tmp_path.iterdir()) == []


def test_dataset_mismatch_is_refused(trained_ckpt, shared_data_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    argv = ["--ckpt", trained_ckpt, "--format", "onnx", "--out", out, "--data-dir", shared_data_dir]
    assert run(*argv, "--dataset", "fashion_mnist") == 2
    assert error_lines(capsys) == [f"error: {trained_ckpt} was trained on mnist, not fashion_mnist"]
    assert not out.exists()


def test_checkpoint_of_the_previous_version_exports(trained_ckpt, shared_data_dir, tmp_path):
    """The version before models took raw pixels kept the statistics as a float32 buffer among the weights: its
    export normalises with those."""
    old = previous_version_checkpoint(torch.load(trained_ckpt, weights_only=True))
    torch.save(old, tmp_path / "old.ckpt")
    out = tmp_path / "old.pt"
    code, printed = run_quietly(
        "--ckpt", tmp_path / "old.ckpt", "--format", "torchscript", "--out", out, "--data-dir", shared_data_dir
    )
    assert code == 0, printed
    assert CHECKED.search(printed).group(2) == "0"
    normalisation = json.loads(Path(f"{out}.json").read_text())["input"]["normalisation"]
    assert [normalisation["mean"], normalisation["std"]] == old["state_dict"]["pixel_stats"].tolist()


def perturbing(save, export_format: str, delta: float):
    """export's save function for a format, followed by an edit of the written file: ``delta`` added to one
    class's bias in the last layer (a bias shift of all classes would cancel in the log-softmax)."""

    def save_then_perturb(model, path, contract_text):
        save(model, path, contract_text)
        if export_format == "onnx":
            graph = onnx.load(str(path))
            (bias,) = [t for t in graph.graph.initializer if t.name.endswith("fc2.bias")]
            values = onnx.numpy_helper.to_array(bias).copy()
            values[3] += delta
            bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
            onnx.save(graph, str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
                module = torch.jit.load(str(path))
                with torch.no_grad():
                    dict(module.named_parameters())["nets.0.fc2.bias"][3] += delta
                module.save(str(path), _extra_files={CONTRACT_KEY: contract_text})

    return save_then_perturb


@pytest.mark.parametrize("export_format", list(mnist_lit.export.FORMATS))
def test_an_export_off_by_more_than_the_tolerance_is_refused_and_within_it_kept(
    export_format, trained_ckpt, shared_data_dir, tmp_path, capsys, monkeypatch
):
    """The exported file itself is edited: its outputs move by 1/2 to 1 times the bias change, so 4x the
    tolerance is refused (with every prediction still the same: the tolerance alone refuses it) and 1/4 is kept."""
    save, load = mnist_lit.export.FORMATS[export_format]
    tolerance = 1e-4  # what README and docs/using.md promise; not read from the code under test
    for factor, code in ((4, 2), (0.25, 0)):
        monkeypatch.setitem(
            mnist_lit.export.FORMATS, export_format, (perturbing(save, export_format, factor * tolerance), load)
        )
        out = tmp_path / f"{factor}.{export_format}"
        argv = ["--ckpt", trained_ckpt, "--format", export_format, "--out", out, "--data-dir", shared_data_dir]
        assert run(*argv) == code, factor
        captured = capsys.readouterr()
        images, differing, max_abs_diff = CHECKED.search(captured.out).groups()
        assert (images, differing) == ("120", "0"), factor
        assert factor * tolerance / 2 <= float(max_abs_diff) <= factor * tolerance + tolerance / 10, factor
        if code:
            (line,) = captured.err.splitlines()
            assert line.startswith(f"error: the {export_format} export does not match the checkpoint")
            assert line.endswith(f"it was deleted, {out} not written")
            assert not out.exists() and not list(tmp_path.iterdir())
        else:
            assert out.is_file() and captured.err == ""


def test_the_contract_names_the_checkpoint_absolutely_from_any_folder(
    trained_ckpt, shared_data_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(trained_ckpt.parent)
    out = tmp_path / "model.pt"
    code, printed = run_quietly(
        "--ckpt", trained_ckpt.name, "--format", "torchscript", "--out", out, "--data-dir", shared_data_dir
    )
    assert code == 0, printed
    assert json.loads(Path(f"{out}.json").read_text())["checkpoint"] == str(trained_ckpt.resolve())
