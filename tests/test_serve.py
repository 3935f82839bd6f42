"""The prediction service through Starlette's ASGI test client: every route, every error status,
the limits, the token, micro-batching and the metrics (models fitted here on the toy backbone)."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from vlclassify.context import RunContext
from vlclassify.data import Dataset, Item, load_data
from vlclassify.errors import ConfigError
from vlclassify.features import FeatureCache
from vlclassify.methods import create_method
from vlclassify.serve import BatchConfig, MicroBatcher, ServeConfig, create_app
from vlclassify.serve.app import check_bind

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def png_bytes(rgb, size=(40, 30), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 15, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with a few bytes of data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from conftest import make_color_folder

    return load_data(str(make_color_folder(tmp_path_factory.mktemp("colors"), per_class=6)))


@pytest.fixture(scope="module")
def zero_shot(toy):
    return create_method("zero-shot", toy).set_classes(list(COLORS))


@pytest.fixture(scope="module")
def vt_clip(toy, splits, tmp_path_factory):
    from vlclassify.data import train_val_test

    s = train_val_test(splits, seed=0, val_fraction=0.3, test_fraction=0.2)
    m = create_method("vt-clip", toy, steps=8, eval_every=4)
    return m.fit(s["train"], s["val"], ctx=RunContext(cache=FeatureCache(tmp_path_factory.mktemp("c")), progress=False))


@pytest.fixture
def client(zero_shot):
    with local(create_app(zero_shot)) as c:
        yield c


def expected(method, data: bytes, text=None, top=5):
    item = Item(image=decoded(data), text=text, key="x")  # arrays are keyed by name: no cache
    ctx = RunContext(cache=FeatureCache(enabled=False), progress=False)
    return method.predict_results(Dataset([item], method.classnames, "t"), top=top, ctx=ctx)[0].to_dict()


def local(app) -> TestClient:
    """A test client that names a loopback Host (the service's default --allowed-hosts)."""
    return TestClient(app, base_url="http://127.0.0.1")


def assert_one_line_error(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "detail"} and all(body.values()), body
    assert "\n" not in r.text and "Traceback" not in r.text
    assert code is None or body["code"] == code, body
    return body


# ---- routes ------------------------------------------------------------------------------------
def test_predict_raw_body_and_multipart_answer_as_predict_results(client, zero_shot):
    img = png_bytes(COLORS["green"])
    want = expected(zero_shot, img)
    r = client.post("/predict", content=img, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["labels"] == want["labels"] and got["uncertain"] is False
    assert [s["label"] for s in got["scores"]] == [s["label"] for s in want["scores"]]  # HF: [{"label", "score"}]
    assert np.allclose([s["score"] for s in got["scores"]], [s["score"] for s in want["scores"]], atol=1e-6)
    r = client.post("/predict", files={"image": ("leaf.png", img, "image/png")}, data={"top": "2"})
    assert r.status_code == 200 and len(r.json()["scores"]) == 2 and r.json()["item"] == "leaf.png"
    r = client.post("/predict?top=1", content=img)  # curl --data-binary: x-www-form-urlencoded, still raw bytes
    assert r.status_code == 200 and r.json()["scores"] == got["scores"][:1]


def test_predict_batch_keeps_the_order(client, zero_shot):
    imgs = [png_bytes(COLORS[c], seed=i) for i, c in enumerate(["red", "blue", "green"])]
    files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(imgs)]
    r = client.post("/predict/batch", files=files, data={"top": "3"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [g["item"] for g in got] == ["0.png", "1.png", "2.png"]
    for g, b in zip(got, imgs):
        w = expected(zero_shot, b, top=3)
        assert g["labels"] == w["labels"] and np.allclose(
            [s["score"] for s in g["scores"]], [s["score"] for s in w["scores"]], atol=1e-6
        )


def test_model_healthz_metrics(client, zero_shot):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["method"] == "zero-shot" and info["classes"] == list(COLORS) and info["takes_text"] is False
    assert info["decisions"]["label"]["rule"] == "the top class" and info["explain"] is False
    assert info["limits"]["max_pixels"] == ServeConfig().max_pixels
    client.post("/predict", content=png_bytes(COLORS["red"]))
    client.post("/predict", content=b"not an image")
    text = client.get("/metrics").text
    assert 'vlclassify_requests_total{route="/predict",status="200"} 1.0' in text
    assert 'vlclassify_requests_total{route="/predict",status="400"} 1.0' in text
    assert 'vlclassify_request_seconds_count{route="/predict"} 2.0' in text
    assert "vlclassify_batch_size_count" in text and "vlclassify_queue_depth 0.0" in text


def test_page_and_assets_are_local(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/page.js"' in r.text and "connect-src 'self'" in r.headers["content-security-policy"]
    for name, kind in (("/page.js", "text/javascript"), ("/page.css", "text/css")):
        a = client.get(name)
        assert a.status_code == 200 and a.headers["content-type"].startswith(kind)
        assert "http://" not in a.text and "https://" not in a.text  # no external assets: works offline
    assert "http" not in r.text.replace("http-equiv", "")


def test_explain_png_for_attention_and_400_otherwise(client, vt_clip):
    assert_one_line_error(client.post("/explain", content=png_bytes(COLORS["red"])), 400)
    with local(create_app(vt_clip)) as c:
        assert c.get("/model").json()["explain"] is True
        r = c.post("/explain", files={"image": ("r.png", png_bytes(COLORS["red"], size=(64, 48)), "image/png")})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (64, 48) and r.headers["x-explained"] in vt_clip.classnames
        r = c.post("/explain?target=blue", content=png_bytes(COLORS["red"]))
        assert r.status_code == 200 and r.headers["x-explained"] == "blue"
        assert_one_line_error(c.post("/explain?target=purple", content=png_bytes(COLORS["red"])), 400)


def test_paired_text_is_read_when_the_model_takes_it(toy):
    m = create_method("zero-shot", toy, modality="both")
    m.set_classes(list(COLORS))
    img = png_bytes(COLORS["red"])
    with local(create_app(m)) as c:
        assert c.get("/model").json()["takes_text"] is True
        plain = c.post("/predict", files={"image": ("a.png", img)}).json()
        titled = c.post("/predict", files={"image": ("a.png", img)}, data={"text": "a blue square"}).json()
        assert plain["scores"] != titled["scores"]
        want = expected(m, img, text="a blue square")
        assert np.allclose([s["score"] for s in titled["scores"]], [s["score"] for s in want["scores"]], atol=1e-6)
        assert c.post("/predict?text=a%20blue%20square", content=img).json()["scores"] == titled["scores"]


# ---- errors and limits ---------------------------------------------------------------------------
def test_bad_requests_get_one_line_errors(client):
    img = png_bytes(COLORS["red"])
    assert_one_line_error(client.post("/predict", content=b""), 400)
    assert_one_line_error(client.post("/predict", content=b"GIF89a but not really"), 400)
    assert_one_line_error(client.post("/predict", content=img[: len(img) // 2]), 400)  # truncated
    assert_one_line_error(client.post("/predict?top=abc", content=img), 400)
    assert_one_line_error(client.post("/predict?top=0", content=img), 400)
    two = [("image", ("a.png", img)), ("image", ("b.png", img))]
    assert_one_line_error(client.post("/predict", files=two), 400)
    assert_one_line_error(client.post("/predict/batch", files=two, data={"text": "only one"}), 400)
    assert_one_line_error(client.post("/predict/batch", content=b""), 400)
    assert_one_line_error(client.get("/predict"), 405)
    assert_one_line_error(client.get("/nowhere"), 404)


def test_no_request_reads_a_path(client):
    path = "/usr/share/tuxpaint/stamps/animals/amphibians/frog.png"
    assert_one_line_error(client.post("/predict", content=path.encode()), 400)
    assert_one_line_error(client.post("/predict", data={"image": path}), 400)  # a text field, not a file
    assert_one_line_error(client.post("/predict", files={"image": (path, b"")}), 400)  # its name is only a name
    r = client.post("/predict", files={"image": ("../../etc/passwd", png_bytes(COLORS["blue"]))})
    assert r.status_code == 200 and r.json()["item"] == "passwd"


def test_limits_body_pixels_images(zero_shot, monkeypatch):
    from PIL import ImageFile

    cfg = ServeConfig(max_bytes=50_000, max_pixels=100_000, max_images=2)
    with local(create_app(zero_shot, cfg)) as c:
        assert_one_line_error(c.post("/predict", content=b"\0" * 50_001), 413)  # by Content-Length

        def chunks():  # no Content-Length: counted while it streams
            for _ in range(10):
                yield b"\0" * 10_000

        assert_one_line_error(c.post("/predict", content=chunks()), 413)
        loads = []
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or None)
        r = c.post("/predict", content=bomb_png(30_000, 30_000))
        assert_one_line_error(r, 413)
        assert "900000000 pixels" in r.json()["detail"] and loads == []  # refused from the header, never decoded
        monkeypatch.undo()
        big = png_bytes(COLORS["red"], size=(400, 300))  # 120,000 pixels
        assert_one_line_error(c.post("/predict", content=big), 413)
        three = [("image", (f"{i}.png", png_bytes(COLORS["red"]))) for i in range(3)]
        assert_one_line_error(c.post("/predict/batch", files=three), 400)
        assert c.post("/predict/batch", files=three[:2]).status_code == 200


class Slow:
    """Wraps a method's predict_results: waits `gate` (if set) and sleeps, to hold the model thread."""

    def __init__(self, method, seconds, gate=None):
        self.inner, self.seconds, self.gate = method.predict_results, seconds, gate
        self.running = threading.Event()
        self.batches: list[int] = []

    def __call__(self, data, top=5, **kw):
        self.running.set()
        self.batches.append(len(data))
        time.sleep(self.seconds)
        return self.inner(data, top=top, **kw)


def test_timeout_504_and_full_queue_503(zero_shot, monkeypatch):
    img = png_bytes(COLORS["red"])
    with local(create_app(zero_shot, ServeConfig(timeout=0.3))) as c:
        monkeypatch.setattr(zero_shot, "predict_results", Slow(zero_shot, 1.0))
        assert_one_line_error(c.post("/predict", content=img), 504)
        monkeypatch.undo()
    cfg = ServeConfig(batching=BatchConfig(max_batch=1, queue_size=1))
    with local(create_app(zero_shot, cfg)) as c:
        slow = Slow(zero_shot, 1.0)
        monkeypatch.setattr(zero_shot, "predict_results", slow)
        svc = c.app.state.service
        first = threading.Thread(target=lambda: c.post("/predict", content=img))
        first.start()
        assert slow.running.wait(5)  # the model thread is busy with the first request
        second = threading.Thread(target=lambda: c.post("/predict", content=img))
        second.start()
        for _ in range(200):
            if svc.batcher.depth == 1:
                break
            time.sleep(0.01)
        r = c.post("/predict", content=img)  # the queue's one place is taken
        assert_one_line_error(r, 503)
        assert r.headers["retry-after"] == "1"
        first.join()
        second.join()
        assert 'status="503"' in c.get("/metrics").text


def test_micro_batching_gathers_concurrent_requests(zero_shot, monkeypatch):
    imgs = [png_bytes(COLORS[c], seed=i) for i, c in enumerate(["red", "green", "blue"] * 3)]
    for max_batch in (8, 1):
        cfg = ServeConfig(batching=BatchConfig(max_batch=max_batch, max_wait_ms=300))
        with local(create_app(zero_shot, cfg)) as c:
            slow = Slow(zero_shot, 0.0)
            monkeypatch.setattr(zero_shot, "predict_results", slow)
            out = [None] * len(imgs)

            def send(i, out=out):
                out[i] = c.post("/predict", content=imgs[i], headers={"Content-Type": "image/png"}).json()

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(imgs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            monkeypatch.undo()
            for got, img in zip(out, imgs):
                assert got["labels"] == expected(zero_shot, img)["labels"]
            assert sum(slow.batches) == len(imgs)
            if max_batch == 1:
                assert set(slow.batches) == {1}
            else:
                assert max(slow.batches) > 1 and max(slow.batches) <= 8  # one forward pass for several requests
            text = c.get("/metrics").text
            assert f"vlclassify_batch_size_count {float(len(slow.batches))}" in text


# ---- the token -----------------------------------------------------------------------------------
def test_token_on_every_route_but_healthz(zero_shot):
    img = png_bytes(COLORS["red"])
    with local(create_app(zero_shot, ServeConfig(token="s3cret"))) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in (("GET", "/"), ("GET", "/model"), ("GET", "/metrics"), ("GET", "/page.js")):
            assert_one_line_error(c.request(method, path), 401)
        assert_one_line_error(c.post("/predict", content=img), 401)
        assert_one_line_error(c.post("/predict", content=img, headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/predict", content=img, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert_one_line_error(c.get("/?token=wrong"), 401)
        r = c.get("/?token=s3cret", follow_redirects=False)  # the page's sign-in: a cookie, then the bare URL
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        assert c.get("/model").status_code == 200  # the client keeps the cookie
        assert c.post("/predict", content=img).status_code == 200
        r = c.get("/?token=wrong", follow_redirects=False)  # signed in by the cookie: a wrong token is not kept
        assert r.status_code == 303 and "set-cookie" not in r.headers
        assert c.get("/model").status_code == 200
    with local(create_app(zero_shot, ServeConfig(token=None))) as c:
        assert c.get("/model").status_code == 200 and c.post("/predict", content=img).status_code == 200


def test_non_loopback_host_needs_a_token():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        check_bind(host, None, False)
    for host in ("0.0.0.0", "192.168.1.4", "::", "example.org"):
        with pytest.raises(ConfigError, match="--token"):
            check_bind(host, None, False)
        check_bind(host, "t", False)
        check_bind(host, None, True)


def test_cli_serve_refuses_an_open_public_bind(tmp_path, zero_shot):
    import subprocess
    import sys

    zero_shot.save_pretrained(tmp_path / "m")
    r = subprocess.run(
        [sys.executable, "-m", "vlclassify.cli", "serve", str(tmp_path / "m"), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "VLCLASSIFY_TOKEN": ""},
    )
    assert r.returncode == 2 and r.stderr.startswith("error: --host 0.0.0.0") and "Traceback" not in r.stderr


# ---- the batcher alone -----------------------------------------------------------------------------
def test_batcher_orders_results_shares_errors_and_skips_cancelled():
    async def main():
        seen = []

        def run(jobs):
            seen.append(list(jobs))
            if "boom" in jobs:
                raise ValueError("boom")
            return [j * 2 for j in jobs]

        b = MicroBatcher(run, BatchConfig(max_batch=4, max_wait_ms=50, queue_size=8))
        await b.start()
        assert await asyncio.gather(*(b.submit(i) for i in range(6))) == [0, 2, 4, 6, 8, 10]
        assert [len(s) for s in seen] == [4, 2]
        with pytest.raises(ValueError):
            await asyncio.gather(b.submit("boom"), b.submit(1))
        seen.clear()
        gone = asyncio.ensure_future(b.submit(100))
        await asyncio.sleep(0)
        gone.cancel()
        assert await b.submit(7) == 14 and seen == [[7]]  # the cancelled job never reached the model
        await b.stop()

    asyncio.run(main())


# ---- hostile clients, operator hygiene (ASGI) ---------------------------------------------------------
def test_host_header_check(zero_shot):
    from vlclassify.serve.app import default_hosts, host_allowed

    img = png_bytes(COLORS["red"])
    with local(create_app(zero_shot)) as c:
        assert c.post("/predict", content=img).status_code == 200
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
            r = c.post("/predict", content=img, headers={"Host": host})
            assert_one_line_error(r, 400, "bad_host")
        assert c.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "[::1]:8000"}).status_code == 200
    with local(create_app(zero_shot, ServeConfig(allowed_hosts=("*",)))) as c:
        assert c.get("/model", headers={"Host": "evil.example"}).status_code == 200
    assert default_hosts("10.0.0.5") == ("10.0.0.5", "localhost", "127.0.0.1", "::1")
    assert default_hosts("0.0.0.0") == ("*",)  # every interface: the token (required there) guards
    assert host_allowed(b"10.0.0.5:80", default_hosts("10.0.0.5")) and not host_allowed(b"10.0.0.6", ("10.0.0.5",))


def test_requests_in_progress_limit_is_json_503_with_retry_after(zero_shot, monkeypatch):
    img = png_bytes(COLORS["red"])
    with local(create_app(zero_shot, ServeConfig(max_requests=1))) as c:
        slow = Slow(zero_shot, 1.0)
        monkeypatch.setattr(zero_shot, "predict_results", slow)
        first = threading.Thread(target=lambda: c.post("/predict", content=img))
        first.start()
        assert slow.running.wait(5)
        r = c.post("/predict", content=img)
        body = assert_one_line_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1" and "requests in progress" in body["detail"]
        assert c.get("/healthz").status_code == 200  # liveness is never refused for load
        first.join()
        monkeypatch.undo()
        assert c.post("/predict", content=img).status_code == 200


def test_error_codes_and_messages_for_people(client):
    r = client.post("/predict", content=b"GIF89a but not really")
    body = assert_one_line_error(r, 400, "not_an_image")
    assert body["message"].startswith("This file is not an image") and "PIL" in body["detail"]
    assert_one_line_error(client.post("/predict", content=bomb_png(30_000, 4)), 413, "bad_aspect")
    assert_one_line_error(client.post("/predict", content=bomb_png(7_000, 7_000)), 413, "too_many_pixels")
    assert_one_line_error(client.post("/predict?top=x", content=png_bytes(COLORS["red"])), 400, "bad_request")
    assert_one_line_error(client.get("/nowhere"), 404, "not_found")
    assert_one_line_error(client.post("/explain", content=png_bytes(COLORS["red"])), 400, "no_attention")
    assert client.get("/favicon.svg").headers["content-type"] == "image/svg+xml"


def test_sign_in_page_for_browsers_and_json_for_programs(zero_shot):
    with local(create_app(zero_shot, ServeConfig(token="s3cret"))) as c:
        r = c.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
        assert "/?token=" in r.text and "s3cret" not in r.text
        assert_one_line_error(c.get("/"), 401, "unauthorized")  # no Accept: text/html
        assert c.get("/page.css").status_code == 200 and c.get("/favicon.svg").status_code == 200
        assert_one_line_error(c.get("/page.js"), 401)


def test_log_line_escapes_the_path(client, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="vlclassify.serve"):
        client.get("/x%0d%0aGET%20/fake%20200")
    lines = [r.getMessage() for r in caplog.records if r.name == "vlclassify.serve"]
    assert lines == ["GET /x%0D%0AGET%20/fake%20200 404 " + lines[0].split(" 404 ")[1]]
    assert "\n" not in lines[0] and "\r" not in lines[0]


def test_pixel_budget_holds_images_until_answered():
    from vlclassify.serve.app import PixelBudget

    async def main():
        budget, order = PixelBudget(100), []

        async def job(name, pixels, seconds):
            async with budget.hold(pixels):
                order.append((name, budget.used))
                await asyncio.sleep(seconds)

        await asyncio.gather(job("a", 60, 0.05), job("b", 60, 0.01), job("c", 40, 0.01))
        assert order[0] == ("a", 60) and ("b", 60) in order and ("c", 100) in order  # b waited for a
        t = asyncio.ensure_future(job("d", 100, 1.0))
        await asyncio.sleep(0.01)
        t.cancel()  # a request's timeout: its share comes back
        with pytest.raises(asyncio.CancelledError):
            await t
        assert budget.used == 0

    asyncio.run(main())


def test_free_memory_is_given_back_after_every_batch(zero_shot, monkeypatch):
    import vlclassify.serve.app as app_module

    assert app_module.MALLOC_TRIM is not None  # glibc: this machine's libc has malloc_trim
    calls = []
    monkeypatch.setattr(app_module, "MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    with local(create_app(zero_shot)) as c:
        calls.clear()  # the warm-up batch
        for _ in range(3):
            assert c.post("/predict", content=png_bytes(COLORS["red"])).status_code == 200
    assert calls == [0, 0, 0]
