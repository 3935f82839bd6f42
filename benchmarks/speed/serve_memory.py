"""Resident memory of `vlclassify serve` under load: 16 keep-alive clients send Tux Paint photos
(with their captions when the model reads text) to one served model, and the server's RSS (all
its processes) is read every --every answers. Bounded: --requests answers, 900 s per step.

    nice python benchmarks/speed/serve_memory.py --model runs/tux-cma --requests 500 --max-batch 32

The server is the `vlclassify` on PYTHONPATH (to compare a change, run it once per source tree),
started on 127.0.0.1 and stopped by its PID. Prints one line per step.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.parse
from pathlib import Path

import serve_load as sl

from vlclassify.data import tuxpaint
from vlclassify.methods import load_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a fitted model folder")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--every", type=int, default=50, help="answers between two readings")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--log", type=Path, default=Path("serve_memory.log"), help="the server's log")
    args = ap.parse_args()

    reads = "text" in load_method(args.model).takes()
    images = [
        (Path(it.image.path).read_bytes(), "&text=" + urllib.parse.quote(it.text) if reads and it.text else "")
        for it in tuxpaint()["all"].items[:64]
    ]
    proc, port = sl.start_server(args.model, args.max_batch, 256, args.workers, args.log)
    try:
        print(f"answers 0: {sl.rss_mb(proc.pid):.0f} MB", flush=True)
        done, t0 = 0, time.time()
        while done < args.requests:
            r = asyncio.run(sl.run_clients(port, images, 16, args.every, 900))
            done += r["ok"]
            print(
                f"answers {done}: {sl.rss_mb(proc.pid):.0f} MB, {r['images_per_s']:.1f} images/s, "
                f"{time.time() - t0:.0f} s, {r['statuses']}",
                flush=True,
            )
    finally:
        sl.stop_server(proc)


if __name__ == "__main__":
    main()
