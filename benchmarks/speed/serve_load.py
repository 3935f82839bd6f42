"""Load benchmark of `vlclassify serve` on loopback: concurrent clients, micro-batching on and off,
one or several `--workers`, beside the offline `predict` throughput on the same images, in one run.

    nice python benchmarks/speed/serve_load.py                                  # 1 and 16 clients
    nice python benchmarks/speed/serve_load.py --model runs/tux-lp --clients 16 --workers 1,2 --repeats 1

Model: zero-shot on effnet-minilm with the Tux Paint classes (no training), saved to a temporary
folder, unless --model names a fitted one. Images: the first --images Tux Paint photos, sent as
their PNG bytes (raw request bodies), each client cycling through them; a model that reads text
(cma-clip) gets each photo's caption as `?text=` (offline: the same captions).

- offline: `predict_results` in this process over the same photo files, one call (decoding,
  preprocessing and the forward pass in batches of 64 inside extract_features), model loaded.
- served: `vlclassify serve` started on 127.0.0.1 (a free port) with `--max-batch 32` (batching
  on) or `--max-batch 1` (off) and `--workers W`; N clients, each one keep-alive HTTP/1.1 connection sending one
  request after another, until --requests answers in all or --time-limit seconds. Latency is
  from the first byte sent to the last byte read. The server is stopped by its PID.

Variants run round-robin over --repeats (load swings on the shared CPU hit them alike); the
table shows the median of the repeats and the load average. Everything is loopback, bounded in
requests and time, and stops by itself. Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from vlclassify.utils import write_json

OUT = Path(__file__).resolve().parent.parent / "results" / "serve_load.json"
HOST = "127.0.0.1"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0] if Path("/proc/loadavg").exists() else "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---- a minimal keep-alive HTTP/1.1 client (as little client CPU as possible) -------------------
async def post(reader, writer, body: bytes, query: str, port: int, timeout: float) -> tuple[int, bytes]:
    head = (
        f"POST /predict?top=1{query} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length")
    return status, await asyncio.wait_for(reader.readexactly(length), timeout)


async def run_clients(
    port: int, images: list[tuple[bytes, str]], clients: int, requests: int, time_limit: float
) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop_at = time.perf_counter() + time_limit
    left = [requests]

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        i = k
        try:
            while left[0] > 0 and time.perf_counter() < stop_at:
                left[0] -= 1
                t = time.perf_counter()
                body, query = images[i % len(images)]
                status, _ = await post(reader, writer, body, query, port, timeout=120)
                latencies.append(time.perf_counter() - t)
                statuses[status] = statuses.get(status, 0) + 1
                i += clients
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    ok = statuses.get(200, 0)
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": wall,
        "images_per_s": ok / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "stopped_by_time": time.perf_counter() >= stop_at,
    }


# ---- the server ------------------------------------------------------------------------------
def start_server(model: Path, max_batch: int, queue: int, workers: int, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "vlclassify.cli", "serve", str(model), "--host", HOST, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--queue-size", str(queue), "--log-level", "warning"]
    cmd += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "VLCLASSIFY_TOKEN"}
    proc = subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2):
                if workers == 1 or len(children(proc.pid)) >= workers:
                    time.sleep(5 if workers > 1 else 0)  # the other workers load their model meanwhile
                    return proc, port
        except OSError:
            if time.monotonic() > deadline:
                stop_server(proc)
                raise SystemExit("the server did not answer /healthz in 300 s") from None
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout
    return [int(p) for p in out.split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the workers), all threads (a
    load-independent cost measure)."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of the server and its worker processes, MB (VmRSS, summed)."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        total += next((int(ln.split()[1]) for ln in lines if ln.startswith("VmRSS:")), 0)
    return total / 1024


def batch_totals(port: int) -> dict[str, float]:
    """Images, forward passes and seconds in forward passes so far, from the server's /metrics."""
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    vals = dict(ln.split(" ", 1) for ln in text.splitlines() if ln.startswith("vlclassify_batch_"))
    keys = ("vlclassify_batch_size_sum", "vlclassify_batch_size_count", "vlclassify_batch_seconds_sum")
    return dict(zip(("images", "batches", "seconds"), (float(vals[k]) for k in keys)))


def served(
    model: Path, images: list[tuple[bytes, str]], clients: int, requests: int, max_batch: int, workers: int, args, log
) -> dict:
    proc, port = start_server(model, max_batch, queue=max(128, 2 * clients), workers=workers, log=log)
    try:
        asyncio.run(run_clients(port, images, clients, max(clients * 2, 32), args.time_limit))  # warm every worker
        b0, c0, m0 = batch_totals(port), cpu_seconds(proc.pid), rss_mb(proc.pid)
        res = asyncio.run(run_clients(port, images, clients, requests, args.time_limit))
        b1, c1, m1 = batch_totals(port), cpu_seconds(proc.pid), rss_mb(proc.pid)
        d = {k: b1[k] - b0[k] for k in b0}
        # /metrics is per worker process: batch sizes and model time are one worker's when several run
        return {
            **res,
            "mean_batch": d["images"] / max(1.0, d["batches"]) if workers == 1 else None,
            "cpu_ms_per_image": 1000 * (c1 - c0) / res["ok"],
            "model_busy": d["seconds"] / res["wall_s"] if workers == 1 else None,
            "rss_mb_before": m0,  # after the warm-up requests
            "rss_mb_after": m1,
        }
    finally:
        stop_server(proc)


def offline(model: Path, paths: list[str], captions: list[str | None]) -> dict:
    from vlclassify.context import RunContext
    from vlclassify.data import Dataset, Item
    from vlclassify.features import FeatureCache
    from vlclassify.methods import load_method

    m = load_method(model)
    ctx = RunContext(cache=FeatureCache(enabled=False), progress=False)  # as the service: nothing cached
    reads = "text" in m.takes()
    items = [Item(image=p, text=c if reads else None, key=p) for p, c in zip(paths, captions, strict=True)]
    ds = Dataset(items, m.classnames, "offline")
    m.predict_results(ds, top=1, ctx=ctx)  # warm: the runtime's session
    t, c = time.perf_counter(), time.process_time()
    m.predict_results(ds, top=1, ctx=ctx)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {
        "images": len(paths),
        "wall_s": wall,
        "images_per_s": len(paths) / wall,
        "cpu_ms_per_image": 1000 * cpu / len(paths),
    }


def make_model(out: Path) -> Path:
    from vlclassify.backbones import create_backbone
    from vlclassify.context import RunContext
    from vlclassify.data import tuxpaint
    from vlclassify.features import FeatureCache
    from vlclassify.methods import create_method

    m = create_method("zero-shot", create_backbone("effnet-minilm"))
    with m.using(RunContext(cache=FeatureCache(enabled=False), progress=False)):
        m.set_classes(tuxpaint()["all"].classnames)
    return m.save_pretrained(out)


def markdown(result: dict) -> str:
    rows = [
        "| variant | workers | clients | images/s | vs offline | p50 ms | p95 ms | p99 ms | mean batch "
        "| CPU ms/image | answers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    off = result["offline"]["images_per_s"]
    cpu = result["offline"]["cpu_ms_per_image"]
    rows.append(f"| offline `predict_results` (batch 64) | 1 | — | {off:.1f} | 100% | — | — | — | 64 | {cpu:.0f} | — |")
    for r in result["served"]:
        batch = "—" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        rows.append(
            f"| served, micro-batching {'on' if r['max_batch'] > 1 else 'off'} (max batch {r['max_batch']}) | "
            f"{r['workers']} | {r['clients']} | {r['images_per_s']:.1f} | {100 * r['images_per_s'] / off:.0f}% | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {batch} | {r['cpu_ms_per_image']:.0f} | "
            f"{r['ok']}/{r['requests']} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a fitted model folder (default: zero-shot on the Tux Paint classes)")
    ap.add_argument("--images", type=int, default=64, help="Tux Paint photos used")
    ap.add_argument("--clients", default="1,16", help="comma-separated concurrent clients")
    ap.add_argument("--workers", default="1,2", help="comma-separated server processes (vlclassify serve --workers)")
    ap.add_argument("--max-batch", default="32,1", help="comma-separated --max-batch (1: micro-batching off)")
    ap.add_argument("--requests", type=int, default=192, help="requests per served variant")
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds per served variant at most")
    ap.add_argument("--repeats", type=int, default=2, help="round-robin repeats of every variant")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from vlclassify.data import tuxpaint

    chosen = tuxpaint()["all"].items[: args.images]
    paths = [it.image.path for it in chosen]
    captions = [it.text for it in chosen]
    clients = [int(c) for c in args.clients.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    batches = [int(b) for b in args.max_batch.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model = args.model or make_model(Path(tmp) / "model")
        from vlclassify.methods import load_method

        reads = "text" in load_method(model).takes()
        images = [
            (Path(p).read_bytes(), "&text=" + urllib.parse.quote(c) if reads and c else "")
            for p, c in zip(paths, captions, strict=True)
        ]
        log = Path(tmp) / "server.log"
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            runs.setdefault("offline", []).append({**offline(model, paths, captions), "load": loadavg()})
            o = runs["offline"][-1]
            print(f"repeat {rep + 1}: offline {o['images_per_s']:.1f} img/s, CPU {o['cpu_ms_per_image']:.0f} ms/image")
            for w in workers:
                for c in clients:
                    for mb in batches:
                        r = {**served(model, images, c, args.requests, mb, w, args, log), "load": loadavg()}
                        runs.setdefault(f"{w}:{c}:{mb}", []).append(r)
                        print(
                            f"repeat {rep + 1}: {w} worker(s), {c} clients, max batch {mb}: "
                            f"{r['images_per_s']:.1f} img/s, p99 {r['p99_ms']:.0f} ms, mean batch {r['mean_batch']}, "
                            f"CPU {r['cpu_ms_per_image']:.0f} ms/image, RSS {r['rss_mb_before']:.0f} -> "
                            f"{r['rss_mb_after']:.0f} MB, load {r['load']}, {r['statuses']}",
                            flush=True,
                        )

    def median(rs: list[dict]) -> dict:
        out = dict(rs[0])
        for k, v in rs[0].items():
            if isinstance(v, float):
                out[k] = statistics.median(r[k] for r in rs)
        return out

    result = {
        "command": "python " + " ".join(sys.argv),
        "model": str(args.model or "zero-shot on effnet-minilm, Tux Paint classes"),
        "images": len(paths),
        "cpus": os.cpu_count(),
        "offline": median(runs["offline"]),
        "served": [
            {**median(runs[f"{w}:{c}:{mb}"]), "workers": w, "clients": c, "max_batch": mb}
            for w in workers
            for c in clients
            for mb in batches
        ],
        "runs": runs,
    }
    write_json(args.out, result)
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
