"""CMM training speed on ImageNet-shaped synthetic features: the paper's batch-8 schedule vs fast ones.

    python benchmarks/speed/cmm_speed.py                 # all schedules, JSON to benchmarks/results/
    python benchmarks/speed/cmm_speed.py --only fast-b256-bf16

1000 classes x 16 shots (+ a flipped view each), d = 1024, features drawn around class centres;
class texts sit off the image centres (a modality gap) so zero-shot is imperfect and training
has something to learn. Budget: the paper's 16,000 steps x batch 8 = 128,000 samples. Each
schedule runs in a fresh subprocess, so its peak memory (ru_maxrss growth over the data set-up)
is its own. Held-out accuracy: 10 images per class, alpha searched on a 4-per-class validation set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from vlclassify.utils import write_json

SCHEDULES = {  # name -> CMMConfig overrides
    "paper-b8": {"schedule": "paper"},
    "fast-b256-bf16": {"schedule": "fast", "fast_batch": 256, "bf16": True},
    "fast-b256-fp32": {"schedule": "fast", "fast_batch": 256, "bf16": False},
    "fast-b1024-bf16": {"schedule": "fast", "fast_batch": 1024, "bf16": True},
    "fast-b256-linear": {"schedule": "fast", "fast_batch": 256, "fast_lr_scale": "linear"},
    "fast-b128-linear": {"schedule": "fast", "fast_batch": 128, "fast_lr_scale": "linear"},
    "fast-b64-linear": {"schedule": "fast", "fast_batch": 64, "fast_lr_scale": "linear"},
    "fast-b128": {"schedule": "fast", "fast_batch": 128},
    "fast-b64": {"schedule": "fast", "fast_batch": 64},
    "fast-b32": {"schedule": "fast", "fast_batch": 32},
}


def make_data(classes: int, shots: int, dim: int, seed: int = 0):
    """Class centres on the sphere; texts = centre + a shared gap direction + noise; images = centre + noise."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    gap = F.normalize(torch.randn(dim, generator=g), dim=0)
    texts = F.normalize(centres + 0.8 * gap + 1.5 * F.normalize(torch.randn(classes, dim, generator=g), dim=-1), dim=-1)

    def draw(per_class: int):
        y = torch.arange(classes).repeat_interleave(per_class)
        x = centres[y] + 5.0 * F.normalize(torch.randn(len(y), dim, generator=g), dim=-1)
        return x, y

    x_tr, y_tr = draw(shots)
    x_flip = x_tr + 0.3 * F.normalize(torch.randn_like(x_tr), dim=-1)  # the "flipped" view: a nearby sample
    x_val, y_val = draw(4)
    x_te, y_te = draw(10)
    n = lambda t: F.normalize(t, dim=-1)  # noqa: E731
    return n(torch.cat([x_tr, x_flip])), y_tr.repeat(2), texts, n(x_val), y_val, n(x_te), y_te


def run_one(name: str, classes: int, shots: int, dim: int, threads: int) -> dict:
    import torch

    from vlclassify.methods.cmm import CMMConfig, cmm_logits, fused_log_probs, search_alpha, train_cmm

    torch.set_num_threads(threads)
    x, y, t0, xv, yv, xt, yt = make_data(classes, shots, dim)
    scale = 100.0
    zs_te = scale * xt @ t0.T
    zs_acc = float((zs_te.argmax(-1) == yt).float().mean())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cfg = CMMConfig(threads=threads, **SCHEDULES[name])
    t = time.perf_counter()
    W, T, info = train_cmm(x, y, t0, scale, cfg)
    wall = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        alpha, _ = search_alpha(cmm_logits(xv, W, T, scale), scale * xv @ t0.T, yv.numpy(), cfg.alpha_grid, cfg.fusion)
        lp = fused_log_probs(cmm_logits(xt, W, T, scale), zs_te, alpha, cfg.fusion)
        acc = float((lp.argmax(-1) == yt).float().mean())
        acc_a1 = float(
            (fused_log_probs(cmm_logits(xt, W, T, scale), zs_te, 1.0, cfg.fusion).argmax(-1) == yt).float().mean()
        )
    return {
        "schedule": name,
        "options": SCHEDULES[name],
        "steps": info["steps"],
        "batch": info["batch"],
        "samples_seen": info["steps"] * info["batch"],
        "peak_lr": info["peak_lr"],
        "bf16": info["bf16"],
        "wall_seconds": round(wall, 2),
        "ms_per_step": round(1000 * wall / info["steps"], 3),
        "peak_mem_mb": round((rss1 - rss0) / 1024, 1),
        "alpha": alpha,
        "heldout_accuracy": round(100 * acc, 2),
        "heldout_accuracy_alpha1": round(100 * acc_a1, 2),
        "zero_shot_accuracy": round(100 * zs_acc, 2),
        "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="Comma-separated schedules (default: all): " + ", ".join(SCHEDULES))
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "cmm_speed.json"))
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(run_one(a._child, a.classes, a.shots, a.dim, a.threads)))
        return
    names = [n for n in (a.only.split(",") if a.only else SCHEDULES) if n]
    unknown = [n for n in names if n not in SCHEDULES]
    if unknown:
        sys.exit(f"error: unknown schedule(s) {', '.join(unknown)}; known: {', '.join(SCHEDULES)}")
    rows = []
    for n in names:
        load_before = os.getloadavg()
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_child",
                n,
                "--classes",
                str(a.classes),
                "--shots",
                str(a.shots),
                "--dim",
                str(a.dim),
                "--threads",
                str(a.threads),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(f"error: schedule {n} failed:\n{out.stderr}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["loadavg_before"] = [round(v, 2) for v in load_before]
        row["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
        rows.append(row)
        print(
            f"{n:<18} steps {row['steps']:>6} x {row['batch']:<5} {row['wall_seconds']:>8.2f} s  "
            f"{row['ms_per_step']:>7.2f} ms/step  peak +{row['peak_mem_mb']:>7.1f} MB  "
            f"acc {row['heldout_accuracy']:.2f}% "
            f"(alpha {row['alpha']}; zero-shot {row['zero_shot_accuracy']:.2f}%)  load {row['loadavg_before'][0]}",
            flush=True,
        )
    ref = next((r for r in rows if r["schedule"] == "paper-b8"), None)
    if ref:
        for r in rows:
            r["accuracy_delta_vs_paper"] = round(r["heldout_accuracy"] - ref["heldout_accuracy"], 2)
    import torch

    result = {
        "command": "python " + " ".join(sys.argv),
        "classes": a.classes,
        "shots": a.shots,
        "dim": a.dim,
        "budget_samples": 16000 * 8,
        "rows": rows,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
    }
    path = Path(a.out)
    write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
