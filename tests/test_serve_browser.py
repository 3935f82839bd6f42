"""The web page in a real browser: Debian's chromium, driven by selenium through /usr/bin/chromedriver
(never selenium's driver download), against `vlclassify serve` started here on 127.0.0.1.

A zero-shot model on the real effnet-minilm backbone is fitted with the CLI on the Tux Paint data
spec; a Tux Paint photo is uploaded through the page's file input; the top bar must name the class
that `vlclassify predict --json` gives for the same file. Screenshots land in the test's tmp folder,
and in $VLCLASSIFY_SCREENSHOTS when set (how docs/figures/serving-*.png are made).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PHOTO = "/usr/share/tuxpaint/stamps/animals/amphibians/frog.png"
CHROMIUM_FLAGS = (  # /work/.library/env/machines/python.md: no background traffic on a closed network
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


def _cli(*args: str, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "vlclassify.cli", *args, "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, Path]:
    if not os.path.exists(PHOTO):
        pytest.fail(f"{PHOTO} missing: install Debian's tuxpaint-stamps-default (make data)")
    root = tmp_path_factory.mktemp("served")
    cache = root / "cache"
    _cli("fit", "-m", "zero-shot", "-d", "tuxpaint", "-o", str(root / "model"), cache=cache)
    return root / "model", cache


@contextlib.contextmanager
def serving(model: Path, cache: Path, tmp_path: Path):
    """`vlclassify serve MODEL` on a free loopback port until /healthz answers; stopped by its PID."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "VLCLASSIFY_CACHE": str(cache)}
    env.pop("VLCLASSIFY_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlclassify.cli", "serve", str(model), "--port", str(port), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /healthz in 300 s"
            time.sleep(0.5)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def screenshot(browser, tmp_path: Path, name: str, width: int) -> Path:
    """The page at `width` CSS pixels wide, its full height; copied to $VLCLASSIFY_SCREENSHOTS if set."""
    browser.set_window_size(width, 900)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, min(max(height + 140, 400), 2400))
    shot = tmp_path / f"{name}-{width}.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 5_000
    if os.environ.get("VLCLASSIFY_SCREENSHOTS"):
        import shutil

        shutil.copy(shot, Path(os.environ["VLCLASSIFY_SCREENSHOTS"]) / shot.name)
    return shot


@contextlib.contextmanager
def in_process(app):
    """uvicorn with the service's protocol, in a thread of this process, on a free loopback port."""
    import threading

    import uvicorn

    from vlclassify.serve.protocol import ServeProtocol

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=ServeProtocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            pytest.fail(f"{path} missing: install Debian's {what} (make data)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_upload_shows_the_predicted_class(browser, model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    model, cache = model_dir
    with serving(model, cache, tmp_path) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: "zero-shot" in d.find_element(By.ID, "model").text)
        assert not browser.find_element(By.ID, "title-box").is_displayed()  # zero-shot on images reads no title
        browser.find_element(By.ID, "file").send_keys(PHOTO)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#bars .bar")))
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        labels = [b.get_attribute("data-label") for b in bars]
        scores = [float(b.get_attribute("data-score")) for b in bars]
        decision = browser.find_element(By.ID, "decision").text
        assert browser.execute_script("return document.activeElement.id") == "result"  # focus on the answer
        assert browser.find_element(By.ID, "result").get_attribute("aria-live") == "polite"
        assert browser.find_element(By.ID, "result-title").text == "Decision"  # one task
        for width in (1280, 390):
            screenshot(browser, tmp_path, "serving-page", width)
        assert not browser.find_element(By.ID, "error").is_displayed()
        assert len(labels) == 5 and scores == sorted(scores, reverse=True)
        with urllib.request.urlopen(url + "/favicon.svg", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/svg+xml"
    log = (tmp_path / "server.log").read_text()
    assert "GET / 200" in log and "GET /favicon.svg 200" in log and " 404 " not in log, log[-2000:]

    r = _cli("predict", str(model), PHOTO, "--json", cache=cache)
    cli = json.loads(r.stdout.strip().splitlines()[0])
    assert labels[0] == cli["scores"][0]["label"]
    assert abs(scores[0] - cli["scores"][0]["score"]) < 1e-4
    assert decision == (", ".join(cli["labels"]) if cli["labels"] else "uncertain")


def test_page_draws_the_attention_map(browser, toy, tmp_path):
    """A method with attention (vt-clip, fitted here on the toy backbone): the heatmap appears under the bars."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import make_color_folder
    from vlclassify.context import RunContext
    from vlclassify.data import load_data, train_val_test
    from vlclassify.features import FeatureCache
    from vlclassify.methods import create_method

    s = train_val_test(load_data(str(make_color_folder(tmp_path / "colors"))), seed=0, val_fraction=0.3)
    m = create_method("vt-clip", toy, steps=8, eval_every=4)
    m.fit(s["train"], s["val"], ctx=RunContext(cache=FeatureCache(tmp_path / "cache"), progress=False))
    m.save_pretrained(tmp_path / "vt")
    photo = next((tmp_path / "colors" / "red").iterdir())
    with serving(tmp_path / "vt", tmp_path / "cache", tmp_path) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: "vt-clip" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.ID, "heat").is_displayed())
        heat = browser.find_element(By.ID, "heat-img")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat))
        caption = browser.find_element(By.ID, "heat-caption").text
        browser.save_screenshot(str(tmp_path / "page-heatmap.png"))
    top = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")[0].get_attribute("data-label")
    assert caption == f"where the model looked for \u201c{top}\u201d"
    assert browser.execute_script("return arguments[0].naturalWidth", heat) >= 24


def test_page_title_first_errors_shrinking_tasks_and_weights(browser, toy, tmp_path):
    """The page's rendering of the full answer shape (a second task, cma-clip's modality weights),
    its title box, its error messages and its shrinking of a 50 MP photo, on an in-process server:
    a zero-shot model reading image + text, whose answers get a second task and modality weights
    added (until cma-clip is on the method contract)."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from vlclassify.methods import create_method
    from vlclassify.methods.decision import TaskPrediction
    from vlclassify.serve import create_app

    m = create_method("zero-shot", toy, modality="both")
    m.set_classes(["red", "green", "blue"])
    m.task_classes["shade"] = ["warm and bright", "cold"]
    texts, sizes = [], []
    plain = m.predict_results

    def with_tasks(data, top=5, *, ctx=None):
        texts.extend(it.text for it in data.items)
        sizes.extend(it.image.image().size[::-1] for it in data.items)  # (height, width)
        out = plain(data, top=top, ctx=ctx)
        for p in out:
            p.tasks["shade"] = TaskPrediction(["warm and bright"], [("warm and bright", 0.7), ("cold", 0.3)])
            p.modality_weights = {"label": {"image": 0.62, "text": 0.38}, "shade": {"image": 0.25, "text": 0.75}}
        return out

    m.predict_results = with_tasks
    photo, broken, huge = tmp_path / "red.png", tmp_path / "notes.png", tmp_path / "phone.jpg"
    Image.new("RGB", (48, 40), (220, 30, 30)).save(photo)
    broken.write_bytes(b"this is a text file, not a picture")
    Image.new("RGB", (8160, 6120), (200, 60, 40)).save(huge, quality=90)  # 50 MP, over the 40 M limit
    with in_process(create_app(m)) as url:
        texts.clear(), sizes.clear()  # the start-up's warm-up prediction
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "tasks: label, shade" in d.find_element(By.ID, "model").text)
        title = browser.find_element(By.ID, "title")
        assert title.is_displayed()
        assert title.location["y"] < browser.find_element(By.ID, "file").location["y"]  # the title comes first
        # a file that is not an image: the service's message for people, no broken preview
        browser.find_element(By.ID, "file").send_keys(str(broken))
        wait.until(lambda d: d.find_element(By.ID, "classify").is_enabled())
        browser.find_element(By.ID, "classify").click()
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        error = browser.find_element(By.ID, "error").text
        assert error.startswith("This file is not an image") and "PIL" not in error and "Error" not in error
        assert not browser.find_element(By.ID, "preview").is_displayed()
        # the title, then the photo: nothing is sent until Classify
        title.send_keys("a bright red square")
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.ID, "classify").is_enabled())
        time.sleep(1.0)
        assert texts == []  # picking the file sent nothing
        browser.find_element(By.ID, "classify").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#tasks [data-task="shade"] .bar'))
        assert not browser.find_element(By.ID, "error").is_displayed()
        shade = browser.find_element(By.CSS_SELECTOR, '#tasks [data-task="shade"] h3').text
        legends = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#weights .legend")]
        heading = browser.find_element(By.ID, "result-title").text
        focused = browser.execute_script("return document.activeElement.id")
        tracks = browser.execute_script(
            "return [...document.querySelectorAll('.bar-track')].map(e => {"
            " const r = e.getBoundingClientRect(); return [r.left, r.right]; })"
        )
        for width in (1280, 390):
            screenshot(browser, tmp_path, "serving-tasks", width)
        # a 50 MP phone photo: shrunk in the browser, then answered
        browser.set_window_size(1280, 900)
        browser.find_element(By.ID, "file").send_keys(str(huge))
        wait.until(lambda d: d.find_element(By.ID, "shrunk").is_displayed())
        note = browser.find_element(By.ID, "shrunk").text
        browser.find_element(By.ID, "classify").click()
        wait.until(lambda d: len(texts) == 2)
        wait.until(lambda d: d.find_element(By.ID, "busy").get_attribute("hidden") is not None)
        assert not browser.find_element(By.ID, "error").is_displayed()
    assert shade == "shade: warm and bright" and heading == "label"  # the main task named, not "Decision"
    assert legends == ["label: image 0.62 \u00b7 text 0.38", "shade: image 0.25 \u00b7 text 0.75"]
    assert texts == ["a bright red square"] * 2  # the title went with the image, both times
    assert focused == "result"
    assert len(tracks) == 3 + 2 and len({tuple(t) for t in tracks}) == 1  # every task's bars line up
    assert note.startswith("Shrunk from 8160 \u00d7 6120 to ")
    h, w = sizes[1]
    assert w * h <= 12e6 and abs(w / h - 8160 / 6120) < 0.01


def test_page_without_the_cookie_shows_how_to_sign_in(browser, toy, tmp_path):
    """With a token set, a browser opening / without the cookie gets a sign-in page (not bare
    401 JSON); opening /?token=T once signs in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from vlclassify.methods import create_method
    from vlclassify.serve import ServeConfig, create_app

    m = create_method("zero-shot", toy)
    m.set_classes(["red", "green", "blue"])
    with in_process(create_app(m, ServeConfig(token="s3cret"))) as url:
        browser.get(url + "/")
        heading = browser.find_element(By.CSS_SELECTOR, "#sign-in h2").text
        body = browser.find_element(By.TAG_NAME, "body").text
        styled = browser.execute_script("return getComputedStyle(document.body).fontFamily")
        for width in (1280, 390):
            screenshot(browser, tmp_path, "serving-sign-in", width)
        browser.get(url + "/?token=s3cret")
        WebDriverWait(browser, 60).until(lambda d: "zero-shot" in d.find_element(By.ID, "model").text)
        assert browser.current_url == url + "/"
    assert heading == "Sign in" and "/?token=" in body and "{" not in body
    assert "system-ui" in styled  # the page's style sheet loads without the token
