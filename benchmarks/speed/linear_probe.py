"""The linear probe's C search on full Fashion-MNIST: torch L-BFGS against scikit-learn, same features, one run.

    nice python benchmarks/speed/linear_probe.py               # both solvers (sklearn: minutes)
    nice python benchmarks/speed/linear_probe.py --limit 6000  # a quick check on a subset

Features: `extract_features(create_backbone("effnet-minilm"), fashion_mnist()["train"])` (read from
the feature store; the first run extracts them, ~6-8 min on 2 quiet cores), split as
`vlclassify fit -m linear-probe -d fashion-mnist` splits it (train_val_test, seed 1: 48,000 train,
12,000 val), pooled [N, 1280], L2-normalised. The C grid is the linear probe's default.

- sklearn: what methods/linear_probe.py does today: `LogisticRegression(C, max_iter=1000)` per C
  (lbfgs, float64), C chosen by val accuracy (ties: val NLL), then the refit at that C.
- torch: `training.logistic.fit_logistic_path(x, y, grid)`: float32 full-batch L-BFGS, warm-started
  from one C to the next, same objective and stopping rule; the chosen C's weights are the model
  (the refit would solve the same problem again, so it is not run).

Prints a table; writes benchmarks/results/linear_probe_solver.json and docs/results/linear-probe-solver.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from vlclassify.backbones import create_backbone
from vlclassify.data import fashion_mnist, train_val_test
from vlclassify.features import extract_features
from vlclassify.methods.base import normalize
from vlclassify.training.logistic import fit_logistic_path
from vlclassify.utils import atomic_path, write_json

ROOT = Path(__file__).resolve().parents[2]
GRID = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def features(limit: int | None):
    splits = train_val_test(fashion_mnist(), seed=1)
    bb = create_backbone("effnet-minilm")
    out = {}
    for name in ("train", "val"):
        ds = splits[name]
        if limit:
            ds = ds.subset(range(min(limit * (4 if name == "train" else 1), len(ds))))
        fs = extract_features(bb, ds, text=False)
        out[name] = (normalize(fs.pooled), torch.from_numpy(ds.labels()))
    return out


def score(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    z = x @ W.T + b
    return float((z.argmax(-1) == y).float().mean()), float(torch.nn.functional.cross_entropy(z, y))


def pick(rows: dict[float, tuple[float, float]]) -> float:
    return max(rows, key=lambda c: (rows[c][0], -rows[c][1]))  # linear_probe's rule: accuracy, then NLL


def run_sklearn(x, y, xv, yv, max_iter: int) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def fit(C):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=max_iter).fit(x.numpy(), y.numpy())
        return torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float(), int(clf.n_iter_[0])

    per_c, t0, c0 = {}, time.perf_counter(), time.process_time()
    for C in GRID:
        t = time.perf_counter()
        W, b, it = fit(C)
        per_c[C] = {
            "seconds": time.perf_counter() - t,
            "iterations": it,
            **dict(zip(("acc", "nll"), score(W, b, xv, yv))),
        }
        print(f"  sklearn C={C:g}: {per_c[C]['seconds']:.1f}s, {it} it, val {100 * per_c[C]['acc']:.2f}%", flush=True)
    best = pick({c: (r["acc"], r["nll"]) for c, r in per_c.items()})
    t = time.perf_counter()
    W, b, _ = fit(best)  # the refit LinearProbe._fit does today
    refit = time.perf_counter() - t
    return {"per_C": per_c, "C": best, "val_accuracy": score(W, b, xv, yv)[0], "refit_seconds": refit,
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}  # fmt: skip


def run_torch(x, y, xv, yv, max_iter: int, cold: bool) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    path = fit_logistic_path(x, y, GRID, num_classes=10, max_iter=max_iter)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_c = {C: dict(zip(("acc", "nll"), score(W, b, xv, yv))) for C, (W, b) in zip(GRID, path)}
    best = pick({c: (r["acc"], r["nll"]) for c, r in per_c.items()})
    out = {"per_C": per_c, "C": best, "val_accuracy": per_c[best]["acc"], "seconds": seconds, "cpu_seconds": cpu}
    if cold:  # each C alone, from zero: what the warm start saves
        for C in GRID:
            t = time.perf_counter()
            fit_logistic_path(x, y, [C], num_classes=10, max_iter=max_iter)
            per_c[C]["cold_seconds"] = time.perf_counter() - t
        out["cold_seconds"] = sum(per_c[C]["cold_seconds"] for C in GRID)
    return out


def markdown(res: dict) -> str:
    sk, tc = res.get("sklearn"), res["torch"]
    lines = [
        f"# Linear-probe solver: full Fashion-MNIST ({res['n_train']:,} x {res['dim']} train, {res['n_val']:,} val)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; load average at start {res['load_start']}, at end {res['load_end']} "
        "(2 shared cores: other jobs ran alongside; both solvers saw the same load).",
        "",
        "| C | sklearn val acc | sklearn s (iterations) | torch val acc | torch s (this C alone, cold; --cold) |",
        "|---|---|---|---|---|",
    ]
    for C in GRID:
        t = tc["per_C"][C]
        s = sk["per_C"][C] if sk else None
        sk_cells = f"{100 * s['acc']:.2f}% | {s['seconds']:.1f} ({s['iterations']})" if s else "- | -"
        cold = f"{t['cold_seconds']:.1f}" if "cold_seconds" in t else "-"
        lines.append(f"| {C:g} | {sk_cells} | {100 * t['acc']:.2f}% | {cold} |")
    lines += [
        "",
        "| solver | C chosen on val | val accuracy | wall time (6 C + refit) | CPU time |",
        "|---|---|---|---|---|",
    ]
    if sk:
        lines.append(
            f"| scikit-learn LogisticRegression (today) | {sk['C']:g} | {100 * sk['val_accuracy']:.2f}% | "
            f"{sk['seconds']:.1f} s (refit {sk['refit_seconds']:.1f} s) | {sk['cpu_seconds']:.1f} s |"
        )
    lines.append(
        f"| torch L-BFGS, warm-started path | {tc['C']:g} | {100 * tc['val_accuracy']:.2f}% | "
        f"{tc['seconds']:.1f} s (no refit: the path's weights) | {tc['cpu_seconds']:.1f} s |"
    )
    if sk:
        wall, cpu = sk["seconds"] / tc["seconds"], sk["cpu_seconds"] / tc["cpu_seconds"]
        gap = 100 * (tc["val_accuracy"] - sk["val_accuracy"])
        lines += ["", f"Speed-up: **{wall:.1f}x** wall, {cpu:.1f}x CPU; accuracy difference {gap:+.2f} points."]
    if "cold_seconds" in tc:
        lines += ["", f"torch: the warm-started path took {tc['seconds']:.1f} s; fitting each C from zero "
                  f"instead takes {tc['cold_seconds']:.1f} s in all."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="val rows (train: 4x) for a quick check")
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--cold", action="store_true", help="also time each C fitted from zero (the warm start's gain)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "linear-probe-solver.md")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "linear_probe_solver.json")
    args = ap.parse_args()
    feats = features(args.limit)
    (x, y), (xv, yv) = feats["train"], feats["val"]
    res = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "load_start": loadavg(),
        "n_train": len(y),
        "n_val": len(yv),
        "dim": x.shape[1],
        "grid": GRID,
    }
    print(f"train {tuple(x.shape)}, val {tuple(xv.shape)}; load {res['load_start']}", flush=True)
    res["torch"] = run_torch(x, y, xv, yv, args.max_iter, args.cold)
    print(
        f"torch: C={res['torch']['C']:g}, val {100 * res['torch']['val_accuracy']:.2f}%, {res['torch']['seconds']:.1f}s"
    )
    if not args.skip_sklearn:
        res["sklearn"] = run_sklearn(x, y, xv, yv, args.max_iter)
    res["load_end"] = loadavg()
    md = markdown(res)
    print(md)
    write_json(args.json, res)
    with atomic_path(args.out) as tmp:
        tmp.write_text(md)
    print(f"wrote {args.json} and {args.out}")


if __name__ == "__main__":
    main()
