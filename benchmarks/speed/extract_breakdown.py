"""Where one batch's extraction time goes, and what the ConSE join costs (effnet-minilm, batch 64).

    python benchmarks/speed/extract_breakdown.py

On 64 Tux Paint photos: decode + preprocess (one thread), the one-off ONNX export, the image trunk (eager torch, the
folded channels-last torch trunk, ONNX Runtime), the ImageNet head on the pooled vector and the
49 cells, and the ConSE join (`probs @ class_text` for 50 rows per image) written densely as
before vs the top-k `embedding_bag` now in the backbone. Median of --repeats timings of each
step; the load average is recorded. Writes benchmarks/results/extract_breakdown.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlclassify.backbones import create_backbone
from vlclassify.data import decode, tuxpaint
from vlclassify.features.runtime import OnnxEncoder, export_onnx_trunk, onnx_trunk_path
from vlclassify.utils import write_json

OUT = Path(__file__).resolve().parent.parent / "results" / "extract_breakdown.json"


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    load_start = Path("/proc/loadavg").read_text().strip()
    bb = create_backbone("effnet-minilm").eval()
    items = tuxpaint()["all"].items[:64]
    k, temp = bb.options["topk"], bb.options["temperature"]

    def dense_join(logits):  # the join as first written: full softmax, scatter top-k, dense product
        probs = torch.softmax(logits / temp, dim=-1)
        top = probs.topk(k, dim=-1)
        probs = torch.zeros_like(probs).scatter_(-1, top.indices, top.values)
        return (probs / probs.sum(-1, keepdim=True)) @ bb.class_text

    steps = {}
    with torch.inference_mode():
        steps["decode+preprocess (1 thread)"], x = timed(
            lambda: torch.stack([bb.preprocess(decode(it)) for it in items]), args.repeats
        )
        steps["trunk: eager torch"], fmap = timed(lambda: bb.image_trunk(x), args.repeats)
        folded = bb.inference_trunk()
        xcl = x.contiguous(memory_format=torch.channels_last)
        steps["trunk: folded BN + channels-last (torch runtime)"], _ = timed(lambda: folded(xcl), args.repeats)
        with tempfile.TemporaryDirectory() as tmp:  # the one-off export, timed in a fresh cache dir
            t = time.perf_counter()
            export_onnx_trunk(bb, onnx_trunk_path(bb, tmp))
            export_s = time.perf_counter() - t
        onnx = OnnxEncoder(bb)
        steps["trunk: ONNX Runtime"], _ = timed(lambda: onnx.session.run(None, {"pixels": x.numpy()}), args.repeats)
        pooled = fmap.mean(dim=(2, 3))
        cells = fmap.flatten(2).transpose(1, 2)
        fc = bb.vision._fc
        steps["head: fc on pooled + 49 cells"], logits = timed(
            lambda: torch.cat([fc(pooled)[:, None], fc(cells)], 1), args.repeats
        )  # [64, 50, 1000]
        steps["join: dense softmax/scatter/matmul (before)"], a = timed(lambda: dense_join(logits), args.repeats)
        steps["join: top-k embedding_bag (now)"], b = timed(lambda: bb._to_text_space(logits), args.repeats)
    diff = float((a - b).abs().max())
    rows = [{"step": s, "ms_per_batch": 1000 * v, "ms_per_image": 1000 * v / len(items)} for s, v in steps.items()]
    lines = ["| step (batch of 64 Tux Paint photos) | ms / batch | ms / image |", "|---|---:|---:|"]
    lines += [f"| {r['step']} | {r['ms_per_batch']:.0f} | {r['ms_per_image']:.2f} |" for r in rows]
    table = "\n".join(lines)
    load_end = Path("/proc/loadavg").read_text().strip()
    print(table)
    print(f"join: max abs diff dense vs top-k = {diff:.1e}; one-off ONNX export {export_s:.1f} s")
    print(f"load average at start: {load_start}; at end: {load_end}")
    write_json(
        args.out,
        {
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "cpu_affinity": len(os.sched_getaffinity(0)),
            "rows": rows,
            "join_max_abs_diff": diff,
            "onnx_export_s": export_s,
            "uptime_start": load_start,
            "uptime_end": load_end,
            "table_md": table,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
