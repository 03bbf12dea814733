"""What TensorBoard shows of a two-stage run, checked in a real browser: TensorBoard's own server and web app,
loaded in headless Chromium (Debian's ``chromium``, driven by Playwright; ``make install`` installs both)."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import unavailable

from mnist_lit.train import main

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).is_file()), None)
if CHROMIUM is None:
    unavailable("needs Chromium: apt-get install chromium (make system-deps)")
try:
    from playwright import sync_api
except ImportError:
    unavailable("needs Playwright: pip install -e '.[dev]'")
PATHS_AND_SWITCHES = {"ckpt", "save_dir", "save_freq", "quiet", "data/data_dir", "data/download"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(read, timeout: float = 60.0):
    """read()'s first non-empty answer (a web app renders bit by bit); its last one after the timeout."""
    end = time.monotonic() + timeout
    while True:
        value = read()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.25)


@pytest.fixture(scope="module")
def tensorboard(tmp_path_factory, request):
    """TensorBoard on 127.0.0.1 over a tiny initial run and the full stage from it; yields its URL."""
    from helpers import write_mnist

    root = tmp_path_factory.mktemp("tensorboard")
    data_dir, save_dir = write_mnist(root / "data"), root / "logs"
    common = ["--data-dir", str(data_dir), "--save-dir", str(save_dir), "--quiet"]
    assert main([*common, "--epochs", "1", "--lr", "0.05"]) == 0
    assert main([*common, "--stage", "full", "--ckpt", "last.ckpt", "--epochs", "2"]) == 0
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", save_dir, "--host", "127.0.0.1", "--port", port]
    server = subprocess.Popen([str(a) for a in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request.addfinalizer(lambda: (server.terminate(), server.wait()))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=2).status == 200
        except OSError:
            assert server.poll() is None, "tensorboard exited"
            return False

    assert poll(up), "tensorboard did not answer"
    return url


@pytest.fixture(scope="module")
def page(tensorboard):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(tensorboard)  # the app loads once; the tests switch its dashboards by the URL's #fragment
        yield page
        browser.close()


def texts(page, selector: str, script: str, ready=bool) -> list[str]:
    """``script`` (JavaScript on the elements) over what ``selector`` matches, inside shadow DOMs too, once
    ``ready`` says the page has rendered that far (a loaded machine renders slowly; [] after the timeout)."""

    def read() -> list[str]:
        found = [t for t in page.locator(selector).evaluate_all(script) if t]
        return found if ready(found) else []

    return poll(read)


def test_time_series_and_scalars_open_on_accuracy_and_loss(page, tensorboard):
    page.goto(f"{tensorboard}/#timeseries")
    groups = texts(page, ".group-title", "els => els.map(e => e.textContent.trim())", lambda found: len(found) >= 3)
    assert groups[:3] == ["Pinned", "acc", "loss"], groups
    page.goto(f"{tensorboard}/#scalars")
    script = "els => els.filter(e => e.opened).map(e => e.category && e.category.name)"  # the opened groups
    opened = set(texts(page, "tf-category-paginated-view", script, lambda found: len(found) >= 2))
    assert {"acc", "loss"} <= opened <= {"acc", "loss", "curves"}, opened  # curves: the custom-scalars layout's


def test_custom_scalars_show_every_split_and_stage_of_a_metric_on_one_chart(page, tensorboard):
    page.goto(f"{tensorboard}/#custom_scalars")
    cards = "tf-custom-scalar-multi-line-chart-card"
    titles = texts(page, cards, "els => els.map(e => e.title)", lambda found: len(found) >= 3)
    assert titles == ["accuracy", "loss", "learning rate"]
    # the accuracy chart's lines: train and val of the initial stage, train and test of the full stage
    entries = page.locator(cards).first.locator(".match-list-entry")

    def lines() -> set[str]:
        found = [t for t in entries.evaluate_all("els => els.map(e => e.textContent)") if t]
        return {" ".join(t.split()[1:]) for t in found} if len(found) >= 4 else set()

    assert poll(lines) == {
        "acc/train (initial/version_0)",
        "acc/val (initial/version_0)",
        "acc/train (full/version_0)",
        "acc/test (full/version_0)",
    }


def test_hparams_table_shows_the_settings_and_the_final_accuracy_without_paths(page, tensorboard):
    page.goto(f"{tensorboard}/#hparams")
    script = "els => els.map(e => e.textContent.trim())"
    cells = texts(
        page, "tf-hparams-table-view vaadin-grid-cell-content", script, lambda found: "full/version_0" in found
    )
    header = cells[: cells.index("full/version_0")]  # the first row's name ends the header
    settings = header[2 : header.index("acc/test")]  # after Trial ID and Show Metrics, before the metrics
    assert settings[:3] == ["model/lr", "stage", "trainer/max_epochs"], header  # those that differ come first
    assert {"acc/test", "acc/val"} <= set(header) and not PATHS_AND_SWITCHES & set(header)
