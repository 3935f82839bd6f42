"""Feature-extraction throughput of the default backbone (effnet-minilm), end to end, in one run.

    python benchmarks/speed/extract_throughput.py                       # all variants, 3 repeats
    python benchmarks/speed/extract_throughput.py --repeats 1 --tux 64 --fmnist 64 --skip compile,jit

Every variant decodes and encodes the same images (Tux Paint photo PNGs, RGBA pasted onto white,
and Fashion-MNIST test arrays) at 224 px, batch 64, with spatial tokens, and is timed from the
dataset's items to the features (decoding included). "naive" is the loop a user would write:
sequential decode + `backbone.preprocess`, `torch.stack` per batch, plain eager `encode_image`
under `torch.no_grad`, default threads. "library" is `extract_features` with the cache disabled.
Repeats run round-robin (naive, library, ..., naive, library, ...) so load swings hit every
variant alike; the table shows the median. The CPU is shared, so the load average is recorded
beside each run. Prints a table; writes JSON to benchmarks/results/extract_throughput.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vlclassify.backbones import create_backbone
from vlclassify.data import decode, fashion_mnist, tuxpaint
from vlclassify.features import FeatureCache, extract_features
from vlclassify.features.extract import item_source, iter_batches
from vlclassify.features.runtime import OnnxEncoder, TorchEncoder, onnx_trunk_path
from vlclassify.utils import write_json

OUT = Path(__file__).resolve().parent.parent / "results" / "extract_throughput.json"
BATCH = 64
_BB = None  # the backbone, inherited by forked decode processes


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- the image loops ------------------------------------------------------------------------
def collect(n: int, dim: int, grid: int = 49):
    """Preallocated outputs: image [n, D], pooled [n, F], spatial [n, P, D] (float32)."""
    return torch.zeros(n, dim), torch.zeros(n, 1280), torch.zeros(n, grid, dim)


def naive(bb, ds) -> tuple[torch.Tensor, ...]:
    items = ds.items
    img, pooled, sp = collect(len(items), bb.embed_dim)
    with torch.no_grad():
        for s in range(0, len(items), BATCH):
            x = torch.stack([bb.preprocess(decode(it)) for it in items[s : s + BATCH]])
            out = bb.encode_image(x)
            b = x.shape[0]
            img[s : s + b], pooled[s : s + b], sp[s : s + b] = out.embeds, out.pooled, out.tokens
    return img, pooled, sp


def sequential(encoder: Callable) -> Callable:
    """Sequential decode (as naive) + a faster encoder: isolates the model-side change."""

    def run(bb, ds):
        items = ds.items
        img, pooled, sp = collect(len(items), bb.embed_dim)
        with torch.no_grad():
            for s in range(0, len(items), BATCH):
                x = torch.stack([bb.preprocess(decode(it)) for it in items[s : s + BATCH]])
                out = encoder(x)
                b = x.shape[0]
                img[s : s + b], pooled[s : s + b], sp[s : s + b] = out.embeds, out.pooled, out.tokens
        return img, pooled, sp

    return run


def pipelined(make: Callable, workers: int) -> Callable:
    """The library's decode pipeline (`iter_batches`: threads decode the next batch) + an encoder."""

    def run(bb, ds):
        items = ds.items
        enc = make(bb)
        img, pooled, sp = collect(len(items), bb.embed_dim)
        s = 0
        for _, x, _ in iter_batches(bb, map(item_source, items), "orig", BATCH, workers, False):
            out = enc(x, spatial=True)
            b = x.shape[0]
            img[s : s + b], pooled[s : s + b], sp[s : s + b] = out.embeds, out.pooled, out.tokens
            s += b
        return img, pooled, sp

    return run


def _decode_in_child(item) -> np.ndarray:
    return _BB.preprocess(decode(item)).numpy()


def process_pool(make: Callable, procs: int) -> Callable:
    """Decoding in forked worker processes (results pickled back), encoder in the parent."""

    def run(bb, ds):
        global _BB
        items = ds.items
        _BB = bb
        enc = make(bb)
        img, pooled, sp = collect(len(items), bb.embed_dim)
        with mp.get_context("fork").Pool(procs) as pool:
            it = pool.imap(_decode_in_child, items, chunksize=8)
            for s in range(0, len(items), BATCH):
                arrs = [next(it) for _ in range(min(BATCH, len(items) - s))]
                out = enc(torch.from_numpy(np.stack(arrs)), spatial=True)
                b = len(arrs)
                img[s : s + b], pooled[s : s + b], sp[s : s + b] = out.embeds, out.pooled, out.tokens
        return img, pooled, sp

    return run


def library(**kw) -> Callable:
    def run(bb, ds):
        fs = extract_features(
            bb, ds, spatial=True, text=False, cache=FeatureCache(enabled=False), batch_size=BATCH, progress=False, **kw
        )
        return fs.image, fs.pooled, fs.spatial.float()

    return run


class ModelVariant:
    """An encoder around a transformed trunk (channels-last, compile, jit) with the usual head."""

    def __init__(self, bb, kind: str) -> None:
        self.bb, self.kind = bb, kind
        if kind == "cl":  # channels-last + inference mode, unfolded weights
            self.trunk = bb.inference_trunk(fold_bn=False)
        elif kind == "compile":
            self.trunk = torch.compile(bb.inference_trunk())
        elif kind == "jit":
            with torch.no_grad():
                ex = torch.zeros(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
                self.trunk = torch.jit.optimize_for_inference(
                    torch.jit.freeze(torch.jit.trace(bb.inference_trunk(), ex))
                )
        else:
            raise ValueError(kind)

    @torch.inference_mode()
    def __call__(self, x, spatial: bool = True):
        return self.bb.image_head(self.trunk(x.contiguous(memory_format=torch.channels_last)), spatial=spatial)


class Threads:
    """Run a variant with a given torch intra-op thread count, then restore it."""

    def __init__(self, run: Callable, n: int) -> None:
        self.run, self.n = run, n

    def __call__(self, *a, **k):
        old = torch.get_num_threads()
        torch.set_num_threads(self.n)
        try:
            return self.run(*a, **k)
        finally:
            torch.set_num_threads(old)


def variants(bb, skip: set[str]) -> dict[str, tuple[str, Callable, float]]:
    """name -> (what it is, run(bb, dataset) -> (image, pooled, spatial), set-up seconds outside the timing)."""
    out: dict[str, tuple[str, Callable, float]] = {}

    def add(name, desc, make_run):
        if name in skip:
            return
        t = time.perf_counter()
        run = make_run()
        out[name] = (desc, run, time.perf_counter() - t)

    add("naive", "sequential decode, eager encode_image under no_grad, default threads", lambda: naive)
    add(
        "library",
        "extract_features() defaults: runtime=auto (ONNX Runtime), decode threads = half the cores",
        lambda: library(),
    )
    add(
        "library-torch",
        "extract_features(runtime='torch'): folded BN, channels-last, inference_mode",
        lambda: library(runtime="torch"),
    )
    add(
        "seq+channels-last",
        "sequential decode; trunk channels-last + inference_mode",
        lambda: sequential(ModelVariant(bb, "cl")),
    )
    add(
        "seq+folded-bn",
        "sequential decode; + batch norms folded into convs (the torch runtime)",
        lambda: sequential(TorchEncoder(bb)),
    )
    add(
        "seq+folded-bn-1thread",
        "as seq+folded-bn with torch.set_num_threads(1)",
        lambda: Threads(sequential(TorchEncoder(bb)), 1),
    )
    add(
        "seq+onnx",
        "sequential decode; trunk in ONNX Runtime (2 threads, no spinning)",
        lambda: sequential(OnnxEncoder(bb)),
    )
    add(
        "onnx-1thread+decode-threads",
        "ONNX Runtime with 1 intra-op thread; 4 decode threads",
        lambda: pipelined(lambda b: OnnxEncoder(b, threads=1), 4),
    )
    add("onnx+decode-1thread", "library pipeline with 1 decode thread", lambda: library(workers=1))
    add("onnx+decode-2threads", "library pipeline with 2 decode threads", lambda: library(workers=2))
    add(
        "onnx+decode-2procs",
        "ONNX Runtime; decoding in 2 forked processes",
        lambda: process_pool(lambda b: OnnxEncoder(b), 2),
    )
    add(
        "seq+jit-freeze",
        "sequential decode; torch.jit.trace + freeze + optimize_for_inference",
        lambda: sequential(ModelVariant(bb, "jit")),
    )
    add(
        "seq+compile",
        "sequential decode; torch.compile (inductor) of the folded trunk",
        lambda: sequential(ModelVariant(bb, "compile")),
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tux", type=int, default=0, help="Tux Paint photos to use (0 = all 439)")
    ap.add_argument("--fmnist", type=int, default=320, help="Fashion-MNIST test images to use")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    ap.add_argument("--skip", default="", help="comma-separated variant names to leave out (short: compile, jit)")
    ap.add_argument("--out", default=str(OUT), help="JSON output path")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    skip |= {alias for short, alias in (("jit", "seq+jit-freeze"), ("compile", "seq+compile")) if short in skip}

    load_start = uptime()
    bb = create_backbone("effnet-minilm").eval()
    tux = tuxpaint()["all"]
    tux = tux.subset(range(min(args.tux or len(tux), len(tux))))
    fm = fashion_mnist()["test"]
    fm = fm.subset(range(min(args.fmnist, len(fm))))
    sets = {"tuxpaint": tux, "fashion-mnist": fm}

    t = time.perf_counter()
    existed = onnx_trunk_path(bb).exists()
    OnnxEncoder(bb)  # export once (cached in the cache dir), outside the timings
    export_s = None if existed else time.perf_counter() - t

    # warm-up: one small batch per variant and data set (first-call allocations, compile, sessions)
    vs = variants(bb, skip)
    warm = {}
    for name, (_, run, _) in vs.items():
        t = time.perf_counter()
        for ds in sets.values():
            sub = ds.subset(range(8))
            run(bb, sub)
        warm[name] = time.perf_counter() - t
        print(f"warm-up {name}: {warm[name]:.1f}s", file=sys.stderr, flush=True)

    runs: dict[str, dict[str, list[dict]]] = {d: {v: [] for v in vs} for d in sets}
    feats: dict[str, dict[str, tuple]] = {d: {} for d in sets}
    for r in range(args.repeats):
        for dname, ds in sets.items():
            for name, (_, run, _) in vs.items():
                la = os.getloadavg()[0]
                t = time.perf_counter()
                out = run(bb, ds)
                dt = time.perf_counter() - t
                runs[dname][name].append(
                    {"seconds": dt, "images_per_s": len(ds) / dt, "load1_before": la, "load1_after": os.getloadavg()[0]}
                )
                feats[dname].setdefault(name, out)
                print(
                    f"[{r + 1}/{args.repeats}] {dname:13s} {name:28s} {len(ds) / dt:7.1f} img/s  (load {la:.1f})",
                    file=sys.stderr,
                    flush=True,
                )

    rows = []
    for dname, ds in sets.items():
        ref = feats[dname]["naive"]
        base = statistics.median(x["images_per_s"] for x in runs[dname]["naive"])
        fp16_floor = float((ref[2] - ref[2].half().float()).abs().max())
        for name, (desc, _, setup) in vs.items():
            ips = [x["images_per_s"] for x in runs[dname][name]]
            med = statistics.median(ips)
            f = feats[dname][name]
            rows.append(
                {
                    "dataset": dname,
                    "variant": name,
                    "what": desc,
                    "images": len(ds),
                    "images_per_s_median": med,
                    "images_per_s_runs": ips,
                    "speedup_vs_naive": med / base,
                    "max_abs_diff_image": float((f[0] - ref[0]).abs().max()),
                    "max_abs_diff_pooled": float((f[1] - ref[1]).abs().max()),
                    "max_abs_diff_spatial": float((f[2] - ref[2]).abs().max()),
                    "spatial_fp16_rounding_of_naive": fp16_floor,
                    "setup_s": setup,
                    "warmup_s": warm[name],
                    "runs": runs[dname][name],
                }
            )

    hdr = f"| data | variant | img/s (median of {args.repeats}) | x naive | max diff image / pooled / spatial |"
    lines = [hdr, "|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {r['images_per_s_median']:.1f} | {r['speedup_vs_naive']:.2f} | "
            f"{r['max_abs_diff_image']:.1e} / {r['max_abs_diff_pooled']:.1e} / {r['max_abs_diff_spatial']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    load_end = uptime()
    print(f"load average (1/5/15 min, running/total, last pid) at start: {load_start}; at end: {load_end}")
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "backbone": bb.identity(),
        "batch_size": BATCH,
        "image_size": bb.image_size,
        "spatial": True,
        "repeats": args.repeats,
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "onnx_export_s": export_s,
        "uptime_start": load_start,
        "uptime_end": load_end,
        "load1_during_runs": [x["load1_before"] for d in runs.values() for v in d.values() for x in v],
        "rows": rows,
        "table_md": table,
    }
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
