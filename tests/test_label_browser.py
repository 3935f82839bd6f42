"""The labelling page (`vlclassify label`) in a real browser: Debian's chromium through
/usr/bin/chromedriver (the harness of test_serve_browser.py), against the CLI's server on 127.0.0.1.

A Tip-Adapter model on the toy backbone (fitted on a few colour images) orders the buttons and is
refreshed as the labels come in. Ten pool images are labelled by keyboard (one undo on the way);
the server is killed with SIGKILL after six and restarted on the same labels.csv.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import make_color_folder
from test_serve_browser import _cli, _free_port, browser  # noqa: F401 - the browser fixture

CLASSES = ("red", "green", "blue")


@contextlib.contextmanager
def label_page(args: list[str], log_path: Path):
    """`vlclassify label ...` on a free loopback port until /healthz answers; yields (url, process)."""
    port = _free_port()
    log = open(log_path, "a")
    env = {k: v for k, v in os.environ.items() if k != "VLCLASSIFY_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlclassify.cli", "label", *args, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, "the page did not answer /healthz in 300 s"
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _rows(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "image,label"
    return [tuple(line.rsplit(",", 1)) for line in lines[1:]]  # type: ignore[misc]


def _current(driver) -> tuple[str, str]:
    """(pool id, file name) of the image the page shows now."""
    from selenium.webdriver.common.by import By

    body = driver.find_element(By.TAG_NAME, "body")
    return body.get_attribute("data-current"), driver.find_element(By.ID, "name").text.split(" ")[0]


def _press(driver, key: str, before: str) -> str:
    """Type `key` on the page; wait until it shows another image -> the new pool id."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.TAG_NAME, "body").send_keys(key)
    WebDriverWait(driver, 60).until(lambda d: _current(d)[0] not in ("", before))
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    return _current(driver)[0]


def _answer(driver) -> str:
    """Press the number key of the shown image's true colour (its file name's prefix) -> that file name."""
    from selenium.webdriver.common.by import By

    shown, name = _current(driver)
    buttons = [b.get_attribute("data-label") for b in driver.find_elements(By.CSS_SELECTOR, "#buttons button")]
    assert sorted(buttons) == sorted(CLASSES)
    _press(driver, str(buttons.index(name.split("_")[0]) + 1), shown)
    return name


def _open(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 120).until(lambda d: _current(d)[0] not in (None, ""))


def _model(url: str) -> dict:
    with urllib.request.urlopen(url + "/model", timeout=10) as r:
        return json.loads(r.read())


def test_label_ten_images_by_keyboard_through_a_crash(browser, tmp_path):  # noqa: F811 - the fixture
    from vlclassify.data import load_data

    cache = tmp_path / "cache"
    train = make_color_folder(tmp_path / "train", per_class=3, seed=1)
    pool = make_color_folder(tmp_path / "pool", per_class=6, seed=2)
    model = tmp_path / "model"
    _cli("fit", "-m", "tip-adapter", "-d", str(train), "-b", "toy", "-o", str(model), cache=cache)
    labels = tmp_path / "labels.csv"
    args = [
        "--pool",
        str(pool),
        "--classes",
        ",".join(CLASSES),
        "--labels",
        str(labels),
        "--model",
        str(model),
        "--refresh-every",
        "2",
        "--cache-dir",
        str(cache),
    ]
    done: list[str] = []
    with label_page(args, tmp_path / "page.log") as (url, proc):
        _open(browser, url)
        for _ in range(3):
            done.append(_answer(browser))
        assert len(_rows(labels)) == 3
        _press(browser, "u", _current(browser)[0])  # undo: the third image comes back, its row goes
        assert _current(browser)[1] == done[-1] and len(_rows(labels)) == 2
        done.pop()
        for _ in range(4):
            done.append(_answer(browser))
        assert [Path(p).name for p, _ in _rows(labels)] == done and len(done) == 6
        browser.save_screenshot(str(tmp_path / "label-page.png"))
        os.kill(proc.pid, signal.SIGKILL)  # a crash mid-session: nothing answered may be lost
        proc.wait()
    assert [Path(p).name for p, _ in _rows(labels)] == done
    with label_page(args, tmp_path / "page.log") as (url, _):
        _open(browser, url)
        after = []
        for _ in range(4):
            after.append(_answer(browser))
        assert not set(after) & set(done)  # nothing asked twice
        done += after
        deadline = time.monotonic() + 120
        while (m := _model(url))["examples"] < 10 or m["refreshing"]:
            assert time.monotonic() < deadline, m
            time.sleep(0.5)
    rows = _rows(labels)
    assert [Path(p).name for p, _ in rows] == done and len(set(done)) == 10
    assert all(lab == Path(p).name.split("_")[0] and Path(p).parent.parent == pool for p, lab in rows)
    assert m["method"] == "tip-adapter" and m["error"] is None and "10 key(s) added" in m["how"]
    ds = load_data(str(labels))["all"]  # the manifest `fit` reads, as it is
    assert len(ds) == 10 and sorted(ds.classnames) == sorted({lab for _, lab in rows})
