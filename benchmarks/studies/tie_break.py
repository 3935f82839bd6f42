"""Which tie-break should the one selection rule use? Measured on the few-shot protocol.

    python benchmarks/studies/tie_break.py --data fashion-mnist --data 'tuxpaint' --min-per-class 16

For every (dataset, shots, seed) the grids the methods search on validation are scored candidate
by candidate — linear-probe's C, Tip-Adapter's (alpha, beta), CMM's alpha — on the few-shot
validation set (accuracy and NLL) and on the test set (accuracy). Two rules then pick among the
candidates tied at the best validation accuracy: `first` (the first in the method's preference
order: most regularised C, smallest alpha) and `loss` (the lowest validation NLL, the rule used
before). The table gives the test accuracy each rule leads to (mean over seeds) and how many
candidates tied. Everything is computed through the library's methods and heads.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from vlclassify.backbones import create_backbone
from vlclassify.context import RunContext
from vlclassify.data import fewshot, load_data
from vlclassify.features import extract_features
from vlclassify.fewshot import drop_small_classes
from vlclassify.methods import Encoded, create_method
from vlclassify.methods.cmm import fused_log_probs
from vlclassify.training import select_best
from vlclassify.utils import write_json_and_markdown

RULES = ("first", "loss", "middle", "default")
DEFAULTS = {  # each search's default candidate (what the method uses without validation data)
    "linear-probe (C)": lambda grid: grid.index(10.0),  # the middle of the grid, as LinearProbe without val
    "tip-adapter (alpha, beta)": lambda grid: grid.index((1.0, 1.0)),
    "cmm (alpha)": lambda grid: grid.index(1.0),
}


def pick_all(row: dict) -> dict:
    """The candidate each rule picks among those tied at the best validation accuracy, and its test accuracy.

    first: the first in the method's order of preference; loss: the lowest validation NLL; middle:
    the median position among the tied; default: the tied one nearest (in grid position) the default."""
    val, test, d = row["val"], row["test"], row["default"]
    out = {}
    for rule in RULES:
        sel = select_best(list(range(len(val))), lambda i: val[i][0], default=d if rule == "default" else None)
        ties = [i for i, v in enumerate(val) if v[0] >= sel.score - 1e-9]
        pick = {
            "first": sel.best,
            "default": sel.best,
            "middle": ties[len(ties) // 2],
            "loss": min(ties, key=lambda i: val[i][1]),
        }[rule]
        tied = sel.tied
        out[rule] = {"pick": row["grid"][pick], "test_accuracy": test[pick], "tied": tied}
    return out


def _grid_scores(logits_val, y_val, logits_test, y_test):
    """Per candidate: (validation accuracy, validation NLL), test accuracy."""
    yv, yt = torch.as_tensor(y_val), torch.as_tensor(y_test)
    val = [(float((z.argmax(-1) == yv).float().mean()), float(F.cross_entropy(z, yv))) for z in logits_val]
    test = [float((z.argmax(-1) == yt).float().mean()) for z in logits_test]
    return val, test


def linear_probe(backbone, cache, tr, va, te):
    grid = sorted(create_method("linear-probe", backbone).config.C_grid)
    zv, zt = [], []
    for C in grid:
        m = create_method("linear-probe", backbone, C_grid=[C])
        m.fit(tr, ctx=RunContext(cache=cache, progress=False))
        zv.append(m.logits(va))
        zt.append(m.logits(te))
    return grid, *_grid_scores(zv, va.dataset.labels(), zt, te.dataset.labels())


def tip_adapter(backbone, cache, tr, va, te):
    m = create_method("tip-adapter", backbone)
    m.fit(tr, va, ctx=RunContext(cache=cache, progress=False))
    h, c = m.head, m.config
    grid = [(a, b) for b in c.beta_grid for a in c.alpha_grid]
    pv, pt = h.parts(va.features.image), h.parts(te.features.image)
    zv = [h.combine(*pv, a, b) for a, b in grid]
    zt = [h.combine(*pt, a, b) for a, b in grid]
    return grid, *_grid_scores(zv, va.dataset.labels(), zt, te.dataset.labels())


def cmm(backbone, cache, tr, va, te):
    m = create_method("cmm", backbone, schedule="fast", steps=4000)
    m.fit(tr, va, ctx=RunContext(cache=cache, progress=False))
    h, c = m.head, m.config
    (sv, zsv), (st, zst) = h.parts(va.features.image), h.parts(te.features.image)
    grid = list(c.alpha_grid)
    zv = [fused_log_probs(sv, zsv, a, c.fusion) for a in grid]
    zt = [fused_log_probs(st, zst, a, c.fusion) for a in grid]
    return grid, *_grid_scores(zv, va.dataset.labels(), zt, te.dataset.labels())


STUDIES = {"linear-probe (C)": linear_probe, "tip-adapter (alpha, beta)": tip_adapter, "cmm (alpha)": cmm}


def run(spec: str, shots: list[int], seeds: list[int], min_per_class: int | None, backbone, log=print) -> list[dict]:
    raw = load_data(spec)
    pool = raw["train"] if "train" in raw else raw["all"]
    if min_per_class:
        pool, _ = drop_small_classes(pool, min_per_class)
    splits = {"train": pool, **({"test": raw["test"]} if "test" in raw else {})}
    rows = []
    feats = {}

    def enc(ds, views=("orig",)):
        key = (ds.name, tuple(it.key for it in ds.items), views)
        if key not in feats:
            feats[key] = Encoded(ds, extract_features(backbone, ds, views=views, progress=False))
        return feats[key]

    for k in shots:
        for s in seeds:
            tr, va = fewshot(splits, k, s)
            if "test" in splits:
                te = splits["test"]
            else:
                used = {it.key for it in tr.items + va.items}
                te = pool.subset([i for i, it in enumerate(pool.items) if it.key not in used])
            etr, eva, ete = enc(tr, ("orig", "flip")), enc(va), enc(te)
            for study, fn in STUDIES.items():
                t0 = time.perf_counter()
                grid, val, test = fn(backbone, None, etr, eva, ete)
                row = {
                    "data": spec,
                    "study": study,
                    "shots": k,
                    "seed": s,
                    "grid": grid,
                    "val": val,
                    "test": test,
                    "default": DEFAULTS[study](grid),
                }
                row.update(pick_all(row))
                rows.append(row)
                log(
                    f"{spec} {study:<26} K={k:<2} seed={s} tied {row['first']['tied']:>3}/{len(grid):<3} "
                    + " ".join(f"{r} {100 * row[r]['test_accuracy']:5.1f}" for r in RULES)
                    + f"  ({time.perf_counter() - t0:.1f}s)"
                )
    return rows


def table(rows: list[dict]) -> str:
    """Test accuracy (mean ± std over seeds) under each tie rule, per data, search and shots."""
    head = ["data", "search", "shots", "tied / candidates"] + [f"ties: {r}" for r in RULES]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["data"], r["study"], r["shots"]) for r in rows})
    for d, st, k in keys:
        rs = [r for r in rows if (r["data"], r["study"], r["shots"]) == (d, st, k)]
        cells = []
        for rule in RULES:
            acc = [100 * r[rule]["test_accuracy"] for r in rs]
            cells.append(f"{np.mean(acc):.1f} ± {np.std(acc):.1f}")
        tied = np.mean([r["first"]["tied"] for r in rs])
        out.append(f"| {d} | {st} | {k} | {tied:.1f} / {len(rs[0]['grid'])} | " + " | ".join(cells) + " |")
    for st in sorted({r["study"] for r in rows}) + ["all"]:
        rs = [r for r in rows if st in ("all", r["study"])]
        means = [f"**{100 * np.mean([r[rule]['test_accuracy'] for r in rs]):.2f}**" for rule in RULES]
        out.append(f"| mean | {st} | all | | " + " | ".join(means) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", default=None, help="data spec (repeatable)")
    ap.add_argument("--min-per-class", type=int, default=16, help="drop classes with fewer images (no test split)")
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", default="docs/results", help="folder for tie-break.json and tie-break.md")
    a = ap.parse_args()
    backbone = create_backbone("effnet-minilm")
    shots, seeds = [int(x) for x in a.shots.split(",")], [int(x) for x in a.seeds.split(",")]
    rows = []
    for spec in a.data or ["fashion-mnist", "tuxpaint"]:
        rows += run(spec, shots, seeds, a.min_per_class if "test" not in load_data(spec) else None, backbone)
    command = "python " + " ".join(sys.argv)
    md = table(rows)
    print(md)
    paths = write_json_and_markdown(
        {"command": command, "rows": rows}, a.out, "tie-break", f"Command: `{command}`\n\n{md}"
    )
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
