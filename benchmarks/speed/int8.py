"""INT8 against fp32 image trunk (effnet-minilm, ONNX Runtime): throughput and few-shot accuracy.

    python benchmarks/speed/int8.py [--data fashion-mnist,tuxpaint] [--shots 4,16] [--test 300]
                                    [--rounds 6] [--batch 32] [--out benchmarks/results/int8.json]

Throughput: the two encoders (`make_encoder(..., precision=fp32|int8)`, trunk + head) run on the
same preprocessed batches of each dataset's test images, in turn (fp32, int8, fp32, ...), so both
see the same machine load; images/s is the median over `--rounds`. Accuracy: features of the
few-shot train / val items (seed 1, CoOp protocol) and of `--test` test items (every k-th) are
extracted once per precision (their own rows in the store), and zero-shot, linear-probe and
tip-adapter are fitted and scored on each; the table gives test accuracy and int8 - fp32 in
points.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlclassify.backbones import create_backbone
from vlclassify.context import RunContext
from vlclassify.data import Dataset, decode, plan_splits
from vlclassify.features import FeatureCache, extract_features
from vlclassify.features.runtime import make_encoder
from vlclassify.methods import Encoded, create_method
from vlclassify.utils import write_json

METHODS = ("zero-shot", "linear-probe", "tip-adapter")


def every_kth(ds: Dataset, n: int) -> Dataset:
    """At most `n` items of `ds`, evenly spread (a fixed subset: every k-th)."""
    step = max(1, len(ds) // n)
    return ds.subset(list(range(0, len(ds), step))[:n])


def throughput(bb, ds: Dataset, cache: Path, rounds: int, batch: int) -> dict[str, float]:
    """Median images/s of the fp32 and int8 encoders on the same batches, alternating."""
    enc = {p: make_encoder(bb, "onnx", cache, precision=p) for p in ("fp32", "int8")}
    items = ds.items[: rounds * batch]
    pix = torch.stack([bb.preprocess(decode(it, size=bb.image_size)) for it in items])  # [rounds * batch, 3, H, W]
    times: dict[str, list[float]] = {p: [] for p in enc}
    for p in enc:  # warm-up: sessions built, first-call allocations done
        enc[p](pix[:batch], spatial=False)
    for r in range(rounds):
        x = pix[r * batch : (r + 1) * batch]
        for p, e in enc.items():
            t = time.perf_counter()
            e(x, spatial=False)
            times[p].append(time.perf_counter() - t)
    return {p: batch / statistics.median(t) for p, t in times.items()}


def accuracy(bb, data: str, shots: int, n_test: int, cache: FeatureCache) -> dict[str, dict[str, float]]:
    """{method: {fp32, int8, delta_points}} accuracy on `n_test` of the plan's test items at `shots` (seed 1)."""
    plan = plan_splits(data, shots=shots, seed=1)
    test = every_kth(plan["test"], n_test)
    out: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    for p in ("fp32", "int8"):

        def enc(ds: Dataset, p: str = p, views: tuple[str, ...] = ("orig",)) -> Encoded:
            fs = extract_features(bb, ds, views=views, cache=cache, progress=False, runtime="onnx", precision=p)
            return Encoded(ds, fs)

        # training items with their mirrored view (tip-adapter's cache keys average both)
        train, val, te = enc(plan["train"], views=("orig", "flip")), enc(plan["val"]), enc(test)
        y = test.labels()
        for name in METHODS:
            m = create_method(name, bb)
            ctx = RunContext(cache=cache, progress=False)
            m.fit(train, val, ctx=ctx)
            out[name][p] = float((m.predict(te, ctx=ctx) == y).mean())
    for name in METHODS:
        out[name]["delta_points"] = 100 * (out[name]["int8"] - out[name]["fp32"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist,tuxpaint")
    ap.add_argument("--shots", default="4,16")
    ap.add_argument("--test", type=int, default=300, help="test items per dataset (every k-th)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "int8.json"))
    a = ap.parse_args()
    bb = create_backbone("effnet-minilm")
    root = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    cache = FeatureCache(root)
    result: dict = {"command": "python " + " ".join(sys.argv), "datasets": {}}
    for data in a.data.split(","):
        plan = plan_splits(data, shots=4, seed=1)
        test = every_kth(plan["test"], a.test)
        speed = throughput(bb, test, root, a.rounds, a.batch)
        acc = {k: accuracy(bb, data, int(k), a.test, cache) for k in a.shots.split(",")}
        result["datasets"][data] = {"test_items": len(test), "images_per_s": speed, "accuracy": acc}
        print(
            f"{data}: fp32 {speed['fp32']:.1f} img/s, int8 {speed['int8']:.1f} img/s "
            f"({speed['int8'] / speed['fp32']:.2f}x), {len(test)} test items",
            flush=True,
        )
        for k, per in acc.items():
            for name, r in per.items():
                print(
                    f"  {k}-shot {name:<13} fp32 {100 * r['fp32']:.1f}  int8 {100 * r['int8']:.1f}  "
                    f"delta {r['delta_points']:+.1f}",
                    flush=True,
                )
    result["loadavg_after"] = os.getloadavg()
    write_json(a.out, result)
    print(json.dumps({"wrote": a.out}))


if __name__ == "__main__":
    main()
