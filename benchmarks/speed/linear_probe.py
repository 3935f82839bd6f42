"""The linear probe's C search on full data: the torch L-BFGS path against the old scikit-learn path, one run.

    nice python benchmarks/speed/linear_probe.py                      # Fashion-MNIST + Tux Paint composites
    nice python benchmarks/speed/linear_probe.py --limit 3000 --out /tmp/lp.md --json /tmp/lp.json  # quick check

Data as `vlclassify fit -m linear-probe -d <spec>` splits it (`plan_splits(spec, seed=1)`): for
fashion-mnist 48,000 train and 12,000 val carved from its 60,000 training images, its 10,000 test
images; features `extract_features(create_backbone("effnet-minilm"), split)` (read from the feature
store; the first run extracts them), pooled [N, 1280], L2-normalised, as LinearProbe reads them.

- sklearn (the old path, methods/linear_probe.py before the torch solver, `git show 21e3005^:...`):
  `LogisticRegression(C, max_iter=1000)` fitted from zero at every C of the grid (one per class,
  one-vs-rest, for multi-label data), no warm start.
- torch (the path now): `training.logistic.fit_logistic_path(x, y, grid)`, float32 full-batch
  L-BFGS warm-started along the grid, what `LinearProbe._fit` calls.

Both pick C with the package's rule (`training.select_best`: best validation accuracy, or mAP for
multi-label data; ties to the middle of the grid); the test split is scored once, at that C.
Prints a table; writes benchmarks/results/linear_probe_solver.json and docs/results/linear-probe-solver.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vlclassify.backbones import create_backbone
from vlclassify.data.plan import plan_splits
from vlclassify.features import extract_features
from vlclassify.methods.base import normalize
from vlclassify.metrics import mean_average_precision
from vlclassify.training import select_best
from vlclassify.training.logistic import fit_logistic_path
from vlclassify.utils import atomic_path, write_json

ROOT = Path(__file__).resolve().parents[2]
GRID = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]  # LinearProbeConfig.C_grid's default


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def features(spec: str, limit: int | None) -> dict:
    splits = plan_splits(spec, seed=1)
    bb = create_backbone("effnet-minilm")
    out = {}
    for name in ("train", "val", "test"):
        ds = splits[name]
        if limit:
            ds = ds.subset(range(min(limit * (4 if name == "train" else 1), len(ds))))
        x = normalize(extract_features(bb, ds, text=False, progress=False).pooled).numpy()  # [N, F]
        out[name] = (x, ds.multi_hot() if ds.multilabel else ds.labels())
    out["multilabel"], out["classes"] = splits["train"].multilabel, len(splits["train"].classnames)
    return out


def score(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    z = x @ w.T + b
    return mean_average_precision(y, z) if multilabel else float((z.argmax(-1) == y).mean())


def sklearn_fit(x, y, C: float, k: int, multilabel: bool, max_iter: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The old LinearProbe._train: -> (W [K, F], b [K], L-BFGS iterations)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    w = np.zeros((k, x.shape[1]), dtype=np.float32)
    b = np.full(k, -1e4, dtype=np.float32)
    its = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if multilabel:
            for c in range(k):
                yc = y[:, c]
                if yc.min() == yc.max():
                    b[c] = 1e4 if yc[0] else -1e4
                    continue
                clf = LogisticRegression(C=C, max_iter=max_iter).fit(x, yc)
                w[c], b[c], its = clf.coef_[0], clf.intercept_[0], its + int(clf.n_iter_[0])
            return w, b, its
        clf = LogisticRegression(C=C, max_iter=max_iter).fit(x, y)
    w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_  # (>2 classes here)
    return w, b, int(clf.n_iter_[0])


def run(spec: str, limit: int | None, max_iter: int, skip_sklearn: bool) -> dict:
    f = features(spec, limit)
    (x, y), (xv, yv), (xt, yt) = f["train"], f["val"], f["test"]
    ml, k = f["multilabel"], f["classes"]
    res = {"data": spec, "n_train": len(x), "n_val": len(xv), "n_test": len(xt), "dim": x.shape[1], "classes": k,
           "multilabel": ml, "metric": "mAP" if ml else "accuracy", "load_start": loadavg()}  # fmt: skip
    print(f"{spec}: train {x.shape}, val {xv.shape}, test {xt.shape}; load {res['load_start']}", flush=True)
    default = GRID[len(GRID) // 2]

    def summary(fits: dict, t0: float, c0: float) -> dict:
        """Time since (t0, c0) with the C search included, C chosen on validation (the library's
        rule), test scored at that C only."""
        sel = select_best(GRID, lambda C: score(*fits[C], xv, yv, ml), default=default)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        val_by_c = dict(zip(map(str, GRID), sel.scores))
        return {"seconds": seconds, "cpu_seconds": cpu, "C": sel.best, "val_by_C": val_by_c,
                "test": score(*fits[sel.best], xt, yt, ml)}  # fmt: skip

    t0, c0 = time.perf_counter(), time.process_time()
    path = fit_logistic_path(x, y, GRID, multilabel=ml, num_classes=k, max_iter=max_iter)
    res["torch"] = summary({C: (w.numpy(), b.numpy()) for C, (w, b) in zip(GRID, path)}, t0, c0)
    tr = res["torch"]
    print(f"  torch: {tr['seconds']:.1f}s, C={tr['C']:g}, test {100 * tr['test']:.2f}", flush=True)
    if skip_sklearn:
        return res
    t0, c0 = time.perf_counter(), time.process_time()
    sk, per_c = {}, {}
    for C in GRID:
        t = time.perf_counter()
        w, b, its = sklearn_fit(x, y, C, k, ml, max_iter)
        sk[C] = (w, b)
        per_c[str(C)] = {"seconds": time.perf_counter() - t, "iterations": its}
        print(f"  sklearn C={C:g}: {per_c[str(C)]['seconds']:.1f}s, {its} it", flush=True)
    res["sklearn"] = {**summary(sk, t0, c0), "per_C": per_c}
    res["load_end"] = loadavg()
    sr = res["sklearn"]
    print(f"  sklearn: {sr['seconds']:.1f}s, C={sr['C']:g}, test {100 * sr['test']:.2f}")
    return res


def markdown(res: dict) -> str:
    lines = [
        "# Linear-probe solver: torch L-BFGS path vs the old scikit-learn path",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}. The 2 cores were shared with other jobs (load averages below): both "
        "solvers ran in the same process, one after the other, on the same features.",
        "",
        "Old path: `LogisticRegression(C, max_iter=1000)` from zero at each C (one-vs-rest per class for "
        "multi-label data), as methods/linear_probe.py did before the torch solver. New path: "
        "`fit_logistic_path` (float32 full-batch L-BFGS, warm-started along the grid), what `LinearProbe` "
        "runs now. C chosen on validation by `select_best` for both; test scored once at that C.",
        "",
        "| data | train / val / test | solver | wall s | CPU s | C chosen | val at C | test | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        size = f"{r['n_train']:,} / {r['n_val']:,} / {r['n_test']:,} x {r['dim']}"
        for name, label in (("sklearn", "scikit-learn, old"), ("torch", "torch L-BFGS path")):
            s = r.get(name)
            if s is None:
                continue
            val = s["val_by_C"][str(s["C"])]
            lines.append(
                f"| {r['data']} ({r['metric']}) | {size} | {label} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} | "
                f"{s['C']:g} | {100 * val:.2f} | {100 * s['test']:.2f} | {r['load_start']} |"
            )
    lines.append("")
    for r in res["runs"]:
        if "sklearn" in r:
            sk, tc = r["sklearn"], r["torch"]
            lines.append(
                f"- {r['data']}: **{sk['seconds'] / tc['seconds']:.1f}x** faster wall, "
                f"{sk['cpu_seconds'] / tc['cpu_seconds']:.1f}x CPU; C {sk['C']:g} (sklearn) vs {tc['C']:g} (torch); "
                f"test {r['metric']} difference {100 * (tc['test'] - sk['test']):+.2f} points. sklearn per C: "
                + ", ".join(f"{c} {p['seconds']:.0f} s / {p['iterations']} it" for c, p in sk["per_C"].items())
                + ". Validation by C, sklearn / torch: "
                + ", ".join(f"{c} {100 * v:.2f} / {100 * tc['val_by_C'][c]:.2f}" for c, v in sk["val_by_C"].items())
                + "."
            )
            if sk["C"] != tc["C"]:
                a, b = str(sk["C"]), str(tc["C"])
                lines.append(
                    f"  The Cs differ: validation {100 * sk['val_by_C'][a]:.2f} / {100 * sk['val_by_C'][b]:.2f} "
                    f"(sklearn at C {a} / {b}), {100 * tc['val_by_C'][a]:.2f} / {100 * tc['val_by_C'][b]:.2f} (torch): "
                    f"a near-tie of {100 * abs(sk['val_by_C'][a] - sk['val_by_C'][b]):.2f} / "
                    f"{100 * abs(tc['val_by_C'][a] - tc['val_by_C'][b]):.2f} points that each solver's stopping "
                    "point (tolerance 1e-4 on the gradient) decides."
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from-json", type=Path, default=None, help="only rewrite the markdown from a saved JSON")
    ap.add_argument("--data", default="fashion-mnist,tuxpaint-composite", help="comma-separated data specs")
    ap.add_argument("--limit", type=int, default=None, help="val and test rows (train: 4x) for a quick check")
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "linear-probe-solver.md")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "linear_probe_solver.json")
    args = ap.parse_args()
    if args.from_json:
        with atomic_path(args.out) as tmp:
            tmp.write_text(markdown(json.loads(args.from_json.read_text())))
        return
    res = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "grid": GRID,
        "runs": [run(s, args.limit, args.max_iter, args.skip_sklearn) for s in args.data.split(",")],
    }
    md = markdown(res)
    print(md)
    write_json(args.json, res)
    with atomic_path(args.out) as tmp:
        tmp.write_text(md)
    print(f"wrote {args.json} and {args.out}")


if __name__ == "__main__":
    main()
