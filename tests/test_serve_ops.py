"""The service as an operator runs it and a hostile client meets it: `vlclassify serve` started
here on 127.0.0.1 (a free port, stopped by its PID), a toy-backbone zero-shot model. Idle and slow
sockets, uvicorn's own errors, a client gone mid-upload, SIGTERM with requests in flight and
pipelined, `--workers`, and the server's peak memory (VmHWM) under near-limit images. Every loop
is bounded in count and time."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h11
import pytest
from PIL import Image

from vlclassify.methods import create_method

HOST = "127.0.0.1"
CLASSES = ["red", "green", "blue"]


def png(width: int, height: int, rgb=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(toy, tmp_path_factory) -> Path:
    m = create_method("zero-shot", toy)
    m.set_classes(CLASSES)
    path = tmp_path_factory.mktemp("served") / "model"
    m.save_pretrained(path)
    return path


class Server:
    """A `vlclassify serve` process: its port, PID and log."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{HOST}:{self.port}{path}", data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def peak_rss_mb(self) -> float:
        """The server's peak resident memory so far (VmHWM), MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc")


@contextlib.contextmanager
def serving(model: Path, tmp_path: Path, *args: str):
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    env = {**os.environ, "VLCLASSIFY_TOKEN": ""}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlclassify.cli", "serve", str(model), "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                if server.get("/healthz", timeout=2)[0] == 200:
                    break
            assert time.monotonic() < deadline, "no /healthz in 180 s"
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def responses(sock: socket.socket, n: int, timeout: float = 30) -> tuple[list[tuple[h11.Response, bytes]], bool]:
    """Up to `n` HTTP responses read from `sock` (with h11), and whether the server closed it after."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", HOST)]))  # h11 pairs answers with requests
    conn.send(h11.EndOfMessage())
    out: list[tuple[h11.Response, bytes]] = []
    head, body = None, b""
    sock.settimeout(timeout)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        if isinstance(event, h11.Response):
            head, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((head, body))
            if len(out) == n or conn.their_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", HOST)]))
            conn.send(h11.EndOfMessage())
        elif isinstance(event, h11.ConnectionClosed):
            return out, True
    closed = sock.recv(1) == b""
    return out, closed


def header(resp: h11.Response, name: bytes) -> bytes | None:
    return next((v for k, v in resp.headers if k == name), None)


def one_line_json(body: bytes) -> dict:
    assert b"\n" not in body, body
    got = json.loads(body)
    assert set(got) == {"code", "message", "detail"}, got
    return got


# ---- connections ----------------------------------------------------------------------------------
def test_idle_and_slow_sockets_do_not_starve_anyone(model, tmp_path):
    img = png(40, 30)
    with serving(model, tmp_path, "--workers", "1", "--header-timeout", "20", "--max-connections", "300") as s:
        idle = []
        try:
            for _ in range(250):  # connected, never a byte sent: uvicorn alone 503'd everyone from 191 on
                idle.append(socket.create_connection((HOST, s.port), timeout=10))
            assert s.get("/healthz")[0] == 200
            status, body = s.post("/predict", img)
            assert status == 200 and json.loads(body)["labels"][0] in CLASSES
            for sock in idle[:10]:  # answered while the idle sockets are still open, not once they time out
                assert select.select([sock], [], [], 0)[0] == []  # nothing to read: neither data nor EOF
            # slowloris: one header byte per 0.5 s is cut at the header-read timeout like an idle socket
            slow = socket.create_connection((HOST, s.port), timeout=10)
            started, cut = time.monotonic(), None
            for ch in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                try:
                    slow.sendall(bytes([ch]))
                except OSError:  # reset: the server closed it
                    cut = time.monotonic() - started
                    break
                readable, _, _ = select.select([slow], [], [], 0.5)
                if readable and slow.recv(1) == b"":  # closed by the server
                    cut = time.monotonic() - started
                    break
            assert cut is not None and 19.5 < cut < 30, cut
            for sock in idle:  # the idle ones were closed at the same timeout
                sock.settimeout(5)
                assert sock.recv(1) == b""
                sock.close()
            # past --max-connections: a JSON 503 with Retry-After, then closed
            idle = [socket.create_connection((HOST, s.port), timeout=10) for _ in range(300)]
            extra = socket.create_connection((HOST, s.port), timeout=10)
            ((resp, body),), closed = responses(extra, 1)
            assert resp.status_code == 503 and header(resp, b"retry-after") == b"1" and closed
            assert one_line_json(body)["code"] == "busy"
        finally:
            for sock in idle:
                sock.close()
        # uvicorn's own "Invalid HTTP request" answer is JSON too
        bad = socket.create_connection((HOST, s.port), timeout=10)
        bad.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        ((resp, body),), closed = responses(bad, 1)
        assert resp.status_code == 400 and one_line_json(body)["code"] == "bad_request" and closed


def test_gone_client_is_499_in_one_line_and_log_paths_are_escaped(model, tmp_path):
    with serving(model, tmp_path, "--workers", "1") as s:
        for _ in range(3):  # the headers and part of the body, then the client is gone
            sock = socket.create_connection((HOST, s.port), timeout=10)
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" + b"\0" * 2000
            )
            time.sleep(0.2)
            sock.close()
        assert s.get("/%0d%0aGET%20/fake%20200%200.1%20ms")[0] == 404
        deadline = time.monotonic() + 20
        while 'status="499"} 3.0' not in (metrics := s.get("/metrics")[1].decode()):
            assert time.monotonic() < deadline, metrics[-1500:]
            time.sleep(0.2)
        assert 'status="500"' not in metrics
    log = s.log.read_text()
    lines = [ln for ln in log.splitlines() if " 499 " in ln]
    assert len(lines) == 3 and all("client closed the connection" in ln for ln in lines), log[-2000:]
    assert "Traceback" not in log and "ClientDisconnect" not in log
    assert "GET /%0D%0AGET%20/fake%20200%200.1%20ms 404" in log
    assert not any(ln.startswith("GET /fake") for ln in log.splitlines())


def test_sigterm_answers_in_flight_and_pipelined_requests_then_exits_0(model, tmp_path):
    img = png(40, 30)
    post = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: {len(img)}\r\n\r\n"
    ).encode() + img
    # --max-wait-ms 1500: each request waits 1.5 s in the batcher for company, so it is in flight at SIGTERM
    with serving(model, tmp_path, "--workers", "1", "--max-wait-ms", "1500", "--timeout", "10") as s:
        one = socket.create_connection((HOST, s.port), timeout=10)
        two = socket.create_connection((HOST, s.port), timeout=10)
        idle = socket.create_connection((HOST, s.port), timeout=10)
        one.sendall(post)
        two.sendall(post + post)  # the second one pipelined behind the first
        time.sleep(0.5)
        t0 = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        got_one, closed_one = responses(one, 2)
        got_two, closed_two = responses(two, 3)
        idle.settimeout(10)
        assert idle.recv(1) == b""  # an idle keep-alive socket is closed, not left hanging
        assert s.proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
    assert [r.status_code for r, _ in got_one] == [200] and closed_one
    assert header(got_one[0][0], b"connection") == b"close"
    assert [r.status_code for r, _ in got_two] == [200, 200] and closed_two
    assert header(got_two[0][0], b"connection") is None  # more was asked on this connection
    assert header(got_two[1][0], b"connection") == b"close"
    assert len({json.loads(b)["labels"][0] for _, b in got_one + got_two}) == 1  # the same image, the same class


def test_workers_share_the_port_and_stop_on_sigterm(model, tmp_path):
    img = png(40, 30, (30, 40, 220))
    with serving(model, tmp_path, "--workers", "2") as s:
        answers = [s.post("/predict", img) for _ in range(6)]
        assert all(st == 200 for st, _ in answers) and len({json.loads(b)["labels"][0] for _, b in answers}) == 1
        children = subprocess.run(
            ["pgrep", "-P", str(s.proc.pid)], capture_output=True, text=True, timeout=10
        ).stdout.split()
        assert len(children) >= 2, children  # two workers (and multiprocessing's resource tracker)
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0
    assert "Started parent process" in s.log.read_text()


# ---- memory -----------------------------------------------------------------------------------------
def test_peak_memory_of_near_limit_images_is_bounded(model, tmp_path):
    near = png(6300, 6300)  # 39.7 M pixels, under the 40 M limit; a few KB of PNG
    strip = png(30000, 4)  # 120 k pixels, a side ratio of 7500
    files = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="image"; filename="n%d.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" % i + near + b"\r\n"
        for i in range(16)
    )
    # --timeout 300: a 6300 x 6300 PNG takes seconds to inflate on a loaded 2-core machine
    with serving(model, tmp_path, "--workers", "1", "--timeout", "300") as s:
        s.post("/predict", png(40, 30))
        base = s.peak_rss_mb()
        status, body = s.post("/predict", strip)  # first: the batch's higher peak would hide it
        strip_peak = s.peak_rss_mb() - base
        req = urllib.request.Request(
            f"http://{HOST}:{s.port}/predict/batch",
            data=files + b"--B--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=B"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            assert r.status == 200 and len(json.loads(r.read())) == 16
        batch_peak = s.peak_rss_mb() - base
    print(f"peak RSS over the warm server: strip +{strip_peak:.0f} MB, 16 x 6300 x 6300 +{batch_peak:.0f} MB")
    assert status == 413 and one_line_json(body)["code"] == "bad_aspect"
    assert strip_peak < 300, f"+{strip_peak:.0f} MB for a 30000 x 4 PNG"
    assert batch_peak < 800, f"+{batch_peak:.0f} MB for 16 images of 6300 x 6300"


def test_workers_that_cannot_load_the_model_stop_with_one_line(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "vlclassify.cli", "serve", str(bad), "--port", str(free_port()), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VLCLASSIFY_TOKEN": ""},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.rstrip().splitlines()[-1].startswith("error: ")
    assert r.stderr.count("Child process") <= 4  # stopped, not restarted in a loop
