"""A run's checkpoint files: a checkpoint's callback state is data too. Going on from a checkpoint (a new full
stage or a resume), no path from its callback state is used unless it is a file of the run's own checkpoints
folder, whatever Lightning asks to remove is removed only there, and the state of stopping callbacks is checked
against the run's settings (or dropped when a new stage starts)."""

import http.server
import os
import threading
from pathlib import Path

import pytest
import torch
from helpers import crafted_checkpoint, run, train_from

from mnist_lit.checkpoint_io import RunCheckpointIO, own_file

# train/loss: logged in both stages (val/acc is test/acc in the full stage)
EARLY_STOPPING = [
    "--trainer.callbacks+=EarlyStopping",
    "--trainer.callbacks.monitor=train/loss",
    "--trainer.callbacks.patience=3",
]


def test_only_plain_files_of_the_folder_are_its_own(tmp_path):
    folder, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    (folder / "last.ckpt").write_text("x"), (elsewhere / "victim").write_text("x")
    (folder / "inner").mkdir()
    (folder / "link.ckpt").symlink_to(elsewhere / "victim")
    assert own_file(str(folder / "last.ckpt"), folder) == (folder / "last.ckpt").resolve()
    for path in [
        f"local://{folder}/last.ckpt",
        f"file://{folder}/last.ckpt",
        "http://127.0.0.1:9/last.ckpt",
        f"{folder}/../elsewhere/victim",
        f"{folder}/inner/../last.ckpt",
        str(folder / "link.ckpt"),
        str(folder / "inner"),
        str(folder),
        str(elsewhere / "victim"),
        "",
        12345,
        None,
    ]:
        assert own_file(path, folder) is None, path


def test_checkpoint_io_removes_nothing_outside_the_runs_folder(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("keep me")
    io = RunCheckpointIO(folder)
    for path in (f"local://{victim}", f"{folder}/../victim", str(victim / "data")):
        io.remove_checkpoint(path)
    assert (victim / "data").read_text() == "keep me"
    io.save_checkpoint({"epoch": 1}, folder / "005.ckpt")
    io.remove_checkpoint(str(folder / "005.ckpt"))
    assert not (folder / "005.ckpt").exists()


class Requests(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET  # noqa: N815
    do_DELETE = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A local HTTP server that records every request it gets: its URL and the list of paths asked for."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Requests)
    Requests.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Requests.seen
    server.shutdown()


def point_paths_at(victims: dict[str, str], own_dir: Path):
    """An edit: every ModelCheckpoint state names the victims as its best, last and top-k files, some with the
    new run's own checkpoints folder as its dirpath (Lightning then restores all of them, not only the best)."""

    def edit(ckpt):
        for i, state in enumerate(s for s in ckpt["callbacks"].values() if "best_model_path" in s):
            paths = list(victims.values())
            state.update(
                best_model_path=paths[i % len(paths)],
                last_model_path=paths[(i + 1) % len(paths)],
                kth_best_model_path=paths[(i + 2) % len(paths)],
            )
            state["best_k_models"] = {path: torch.tensor(1.0) for path in paths}
            if i == 0:
                state["dirpath"] = os.path.realpath(own_dir)

    return edit


@pytest.mark.parametrize("stage", ["full", "initial"])  # a new full stage, and a resume of the initial stage
def test_paths_in_a_checkpoints_callback_state_delete_nothing_and_reach_no_server(
    stage, trained_ckpt, shared_data_dir, tmp_path, http_server
):
    url, requests = http_server
    victim_folder, save_dir = tmp_path / "victim_folder", tmp_path / "runs"
    victim_folder.mkdir()
    (victim_folder / "results.json").write_text("a result")
    (tmp_path / "victim_file").write_text("another")
    own_dir = save_dir / stage / "version_0" / "checkpoints"
    victims = {
        "folder": f"local://{victim_folder}",
        "file": f"{own_dir}/../../../../victim_file",  # inside the folder as Lightning compares (.absolute())
        "url": f"{url}/last.ckpt",
    }
    ckpt = crafted_checkpoint(trained_ckpt, tmp_path / "crafted.ckpt", point_paths_at(victims, own_dir))
    assert train_from(ckpt, shared_data_dir, save_dir, "--epochs", 5, "--save-freq", 1, stage=stage) == 0
    assert (victim_folder / "results.json").read_text() == "a result"
    assert (tmp_path / "victim_file").read_text() == "another"
    assert requests == []
    assert sorted(p.name for p in own_dir.iterdir()) == ["004.ckpt", "005.ckpt", "last.ckpt"]


def stopping_state(edit_state):
    def edit(ckpt):
        for key, state in ckpt["callbacks"].items():
            if key.startswith(("EarlyStopping", "DivergenceStop")):
                edit_state(state)

    return edit


@pytest.fixture(scope="module")
def stopping_run(shared_data_dir, tmp_path_factory) -> Path:
    """A 3-epoch initial run with an early-stopping callback (patience 3): its last.ckpt."""
    save_dir = tmp_path_factory.mktemp("stopping")
    assert run("--data-dir", shared_data_dir, "--save-dir", save_dir, "--epochs", 3, *EARLY_STOPPING, "--quiet") == 0
    return save_dir / "initial" / "version_0" / "checkpoints" / "last.ckpt"


def test_a_new_stage_starts_with_fresh_stopping_state(stopping_run, shared_data_dir, tmp_path):
    """A stored patience 0, a used-up wait and a best loss of 0 would end the full stage after its first epoch."""
    used_up = stopping_state(lambda s: s.update(patience=0, wait_count=5, best_score=torch.tensor(0.0)))
    ckpt = crafted_checkpoint(stopping_run, tmp_path / "x.ckpt", used_up)
    save_dir = tmp_path / "runs"
    assert train_from(ckpt, shared_data_dir, save_dir, "--full_epochs", 3) == 0
    assert torch.load(save_dir / "full" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 5


@pytest.mark.parametrize("field,value", [("patience", 0), ("wait_count", 99), ("best_score", "x")])
def test_a_resume_refuses_stopping_state_its_settings_do_not_allow(
    field, value, stopping_run, shared_data_dir, tmp_path, capsys
):
    ckpt = crafted_checkpoint(stopping_run, tmp_path / "x.ckpt", stopping_state(lambda s: s.update({field: value})))
    save_dir = tmp_path / "runs"
    assert train_from(ckpt, shared_data_dir, save_dir, "--epochs", 5, stage="initial") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its state of" in err
    assert not list(save_dir.rglob("*"))  # its run folder, and the stage folder, removed again


def test_a_resume_with_its_own_stopping_state_goes_on(stopping_run, shared_data_dir, tmp_path):
    save_dir = tmp_path / "runs"
    assert train_from(stopping_run, shared_data_dir, save_dir, "--epochs", 4, stage="initial") == 0


@pytest.mark.parametrize("field,value", [("best_model_path", 12345), ("best_model_score", "abc"), ("monitor", 3)])
def test_checkpoint_state_of_the_wrong_type_is_one_line(field, value, trained_ckpt, shared_data_dir, tmp_path, capsys):
    def edit(ckpt):
        for state in ckpt["callbacks"].values():
            if "best_model_path" in state:
                state[field] = value

    ckpt = crafted_checkpoint(trained_ckpt, tmp_path / "x.ckpt", edit)
    assert train_from(ckpt, shared_data_dir, tmp_path / "runs", "--epochs", 4) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and not list((tmp_path / "runs").rglob("*"))
