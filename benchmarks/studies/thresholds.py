"""Multi-label decision thresholds chosen on validation: one global, per class, or per class shrunk
halfway to the global one. Test micro- and macro-F1 of a linear probe on the multi-label data.

    python benchmarks/studies/thresholds.py --data fmnist-mosaic --data tuxpaint-composite

Per-class thresholds that maximise each class's validation F1 overfit the validation set (a
class with a few dozen validation positives gets thresholds as low as 0.01); the shrunk form keeps
what is class-specific and halves the noise. methods/decision.py uses the shrunk form.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from vlclassify.backbones import create_backbone
from vlclassify.context import RunContext
from vlclassify.data import load_data
from vlclassify.methods import create_method
from vlclassify.methods.decision import choose_rule
from vlclassify.utils import write_json_and_markdown


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((pred * y).sum())
    return 2 * tp / max(float(pred.sum() + y.sum()), 1e-12)


def run(spec: str, backbone) -> dict:
    splits = load_data(spec)
    m = create_method("linear-probe", backbone)
    ctx = RunContext(progress=False)
    m.fit(splits["train"], splits["val"], ctx=ctx)
    pv, yv = m.predict_proba(splits["val"], ctx=ctx), splits["val"].multi_hot()
    pt, yt = m.predict_proba(splits["test"], ctx=ctx), splits["test"].multi_hot()
    C = yv.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        glob = np.full(C, choose_rule(pv, yv, True, C, per_class=False).thresholds[0])
        shrunk = np.array(choose_rule(pv, yv, True, C).thresholds)
    raw = 2 * shrunk - glob  # the rule's per-class F1 optima, before the shrinkage
    out = {"data": spec, "val_positives": yv.sum(0).astype(int).tolist()}
    for name, thr in (("global", glob), ("per-class", raw), ("per-class, shrunk halfway", shrunk)):
        pred = (pt >= thr[None]).astype(float)
        out[name] = {
            "micro_f1": _f1(yt, pred),
            "macro_f1": float(np.mean([_f1(yt[:, c], pred[:, c]) for c in range(C)])),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", default=None, help="multi-label data spec (repeatable)")
    ap.add_argument("--out", default="docs/results")
    a = ap.parse_args()
    backbone = create_backbone("effnet-minilm")
    rows = [run(spec, backbone) for spec in a.data or ["fmnist-mosaic", "tuxpaint-composite"]]
    rules = ("global", "per-class", "per-class, shrunk halfway")
    lines = ["| data | " + " | ".join(f"{r}: micro-F1 / macro-F1" for r in rules) + " |", "|---|" + "---|" * len(rules)]
    for r in rows:
        cells = [f"{100 * r[k]['micro_f1']:.1f} / {100 * r[k]['macro_f1']:.1f}" for k in rules]
        lines.append(f"| {r['data']} | " + " | ".join(cells) + " |")
    command = "python " + " ".join(sys.argv)
    md = "\n".join(lines) + "\n"
    print(md)
    paths = write_json_and_markdown(
        {"command": command, "rows": rows},
        a.out,
        "thresholds",
        f"Command: `{command}`\n\nLinear probe on the offline default backbone, test "
        f"split, thresholds chosen on the validation split.\n\n{md}",
    )
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
