"""Scores a user can trust (issue 22), measured on the few-shot protocol.

    python benchmarks/studies/trust.py --data fashion-mnist --data tuxpaint --shots 1 4 16 --seeds 1 2 3

For each dataset, shots and seed, every method is fitted on the few-shot train / validation
split (the CoOp protocol of `vlclassify fit --shots`), calibration and the "unknown" rule being
chosen on that validation set as `fit` does. On the test set (at most --test-limit images,
a fixed random subset) it reports the expected calibration error (15 bins) of the raw and the
calibrated scores, and with the other dataset's images as unknowns (at most --unknown-limit)
the AUROC of each open-set score, the one the fit chose marked, and the held-out-class proxy's
own numbers for the scores (trust/openset.py). Features come from the feature cache, so a
second run is quick.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np

from vlclassify.backbones import create_backbone
from vlclassify.context import RunContext
from vlclassify.data import Dataset, plan_splits
from vlclassify.methods import create_method
from vlclassify.metrics import auroc, ece
from vlclassify.trust import SCORES
from vlclassify.trust.report import unknown_images
from vlclassify.utils import read_json, write_json_and_markdown

METHODS = ("zero-shot", "linear-probe", "tip-adapter")  # the default rows; every method runs with its defaults


def subset(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of at most n items (all when n is None)."""
    if n is None or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return ds.subset(idx)


def run(args: argparse.Namespace) -> dict:
    bb = create_backbone(args.backbone)
    ctx = RunContext(progress=False)
    runs = []
    for d, spec in enumerate(args.data):
        other = args.data[(d + 1) % len(args.data)]
        for k in args.shots:
            for s in args.seeds:
                splits = plan_splits(spec, k, s)
                test = subset(splits["test"], args.test_limit)
                odd = subset(unknown_images(other, test.classnames), args.unknown_limit)
                odd = replace(odd, items=[replace(it, label=None) for it in odd.items])
                for name in args.methods:
                    t0 = time.perf_counter()
                    m = create_method(name, bb).fit(splits["train"], splits["val"], ctx=ctx)
                    y = test.labels()
                    probs, raw = m.predict_proba(test, ctx=ctx), m.predict_proba(test, ctx=ctx, calibrated=False)
                    known, unknown = m.open_set_scores(test, ctx=ctx), m.open_set_scores(odd, ctx=ctx)
                    rule = m.trust.open_set
                    row = {
                        "data": spec,
                        "unknowns": other,
                        "method": name,
                        "shots": k,
                        "seed": s,
                        "n_val": len(splits["val"]),
                        "n_test": len(test),
                        "n_unknown": len(odd),
                        "accuracy": float((probs.argmax(-1) == y).mean()),
                        "ece_raw": ece(raw, y),
                        "ece": ece(probs, y),
                        "calibration": m.calibration().describe(),
                        "chosen": rule.score or None,
                        "auroc": {sc: auroc(known[sc], unknown[sc]) for sc in known},
                        "proxy": rule.heldout_auroc,
                        "seconds": time.perf_counter() - t0,
                    }
                    runs.append(row)
                    print(
                        f"{spec:<14} {name:<12} shots={k:<2} seed={s} acc={row['accuracy']:.3f} "
                        f"ECE {row['ece_raw']:.3f} -> {row['ece']:.3f}  chosen {row['chosen']} "
                        f"AUROC {row['auroc'].get(row['chosen'] or '', float('nan')):.3f}  "
                        + " ".join(f"{sc}={v:.3f}" for sc, v in row["auroc"].items()),
                        flush=True,
                    )
    return {"command": " ".join(["python", *sys.argv]), "args": vars(args), "runs": runs}


def markdown(result: dict) -> str:
    """Mean (min-max over seeds) per dataset, method and shots."""
    lines = [
        "# Calibration and unknown detection on the few-shot protocol",
        "",
        f"Command: `{result['command']}`",
        "",
        "ECE: 15 bins, test set. AUROC: the test images (known) against the other dataset's images "
        "(unknown); `chosen` is the score the fit chose on validation (its AUROC in bold).",
        "",
        "| data | method | shots | accuracy | ECE raw | ECE calibrated | chosen | "
        + " | ".join(f"AUROC {s}" for s in SCORES)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(SCORES),
    ]
    keys = sorted({(r["data"], r["method"], r["shots"]) for r in result["runs"]}, key=lambda t: (t[0], t[1], t[2]))

    def cell(vals: list[float]) -> str:
        return f"{np.mean(vals):.3f} ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else f"{vals[0]:.3f}"

    for d, m, k in keys:
        rs = [r for r in result["runs"] if (r["data"], r["method"], r["shots"]) == (d, m, k)]
        chosen = sorted({r["chosen"] for r in rs if r["chosen"]})
        aur = []
        for s in SCORES:
            v = [r["auroc"][s] for r in rs if s in r["auroc"]]
            txt = cell(v) if v else "-"
            aur.append(f"**{txt}**" if s in chosen else txt)
        lines.append(
            f"| {d} | {m} | {k} | {cell([r['accuracy'] for r in rs])} | {cell([r['ece_raw'] for r in rs])} | "
            f"{cell([r['ece'] for r in rs])} | {', '.join(chosen) or 'off'} | " + " | ".join(aur) + " |"
        )
    lines += [
        "",
        "The held-out-class proxy on validation (mean over seeds; what the fit ranks the scores by) "
        "beside the AUROC against the other dataset's images:",
        "",
        "| data | method | shots | " + " | ".join(f"{s} proxy / real" for s in SCORES) + " |",
        "|---|---|---|" + "---|" * len(SCORES),
    ]
    for d, m, k in keys:
        rs = [r for r in result["runs"] if (r["data"], r["method"], r["shots"]) == (d, m, k) and r["proxy"]]
        if not rs:
            continue
        pairs = []
        for s in SCORES:
            prox = [r["proxy"][s] for r in rs if s in r["proxy"]]
            real = [r["auroc"][s] for r in rs if s in r["auroc"]]
            pairs.append(f"{np.mean(prox):.3f} / {np.mean(real):.3f}" if prox and real else "-")
        lines.append(f"| {d} | {m} | {k} | " + " | ".join(pairs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the options, run, write docs/results/trust.{json,md}."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", help="data spec (repeat: each is the others' unknowns)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--test-limit", type=int, default=500)
    p.add_argument("--unknown-limit", type=int, default=300)
    p.add_argument("--backbone", default="effnet-minilm")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--stem", default="trust")
    p.add_argument("--table", help="only re-render the Markdown of this result JSON")
    args = p.parse_args()
    if not args.table and not args.data:
        p.error("give --data (twice or more: each dataset is the others' unknowns), or --table")
    result = read_json(args.table) if args.table else run(args)
    for path in write_json_and_markdown(result, args.out, args.stem, markdown(result)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
