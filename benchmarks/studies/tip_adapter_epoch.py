"""What choosing Tip-Adapter-F's epoch on validation (vlclassify) instead of on test (Tip-Adapter's
public code) changes: the one departure of `--preset tip-adapter` (docs/reproducing.md).

Tip-Adapter-F is fitted under the `tip-adapter` preset (seed protocol, full val split, 10
augmented views, unnormalised adapter, one view an epoch). Its epoch is kept on validation. The
same run records, after every epoch, the test accuracy at the training alpha/beta and the adapter
weights; Tip-Adapter's choice is the epoch with the best test accuracy (first strict improvement
over epochs 1..E), after which alpha/beta are searched on validation exactly as for ours. The
table compares the final test accuracy of the two choices.

Fashion-MNIST has no val split: a stratified `--val-per-class` (default 25, about CoOp's val size
per class) is carved from its training split, and few-shot training images are drawn from the rest.

    python benchmarks/studies/tip_adapter_epoch.py [--shots 1,2,4,8,16] [--seeds 1,2,3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vlclassify import create_backbone, extract_features, load_data
from vlclassify.context import RunContext
from vlclassify.data import plan_splits, stratified_split
from vlclassify.features import FeatureCache
from vlclassify.methods import Encoded
from vlclassify.methods.tip_adapter_f import TipAdapterF
from vlclassify.protocols import resolve_presets
from vlclassify.utils import write_json


class EpochProbe(TipAdapterF):
    """Tip-Adapter-F that also records, at every validation round, the test accuracy at the
    training alpha/beta and a copy of the adapter (the keys): what Tip-Adapter's code picks on."""

    def __init__(self, backbone, test: Encoded, **options) -> None:
        super().__init__(backbone, **options)
        self.test, self.curve = test, []

    def val_metric(self, val):
        base = super().val_metric(val)
        y = torch.as_tensor(self.test.dataset.labels())

        def metric(head):
            out = base(head)
            acc = float((self._forward(head, self.test)["logits"].argmax(-1) == y).float().mean())
            self.curve.append({"val": out["score"], "test": acc, "keys": head.keys.detach().clone()})
            return out

        return metric

    def test_accuracy(self) -> float:
        y = torch.as_tensor(self.test.dataset.labels())
        return float((self.logits(self.test).argmax(-1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="effnet-minilm")
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--val-per-class", type=int, default=25)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    shots = [int(k) for k in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    bb = create_backbone(args.backbone)
    cache = FeatureCache()
    raw = load_data("fashion-mnist")
    n = len(raw["train"])
    frac = raw["train"].num_classes * args.val_per_class / n
    parts = stratified_split(raw["train"], {"pool": 1 - frac, "val": frac}, 0)
    data = {"train": parts["pool"], "val": parts["val"], "test": raw["test"]}
    presets = resolve_presets("tip-adapter")
    options = {**presets.options("tip-adapter-f"), "templates": "fashion-mnist"}  # the dataset's prompt

    plans = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in shots:
            for s in seeds:
                plans[(k, s)] = plan_splits(data, shots=k, seed=s, protocol=presets.protocol)
    keys = {it.key for p in plans.values() for it in p["train"].items}
    rows = [i for i, it in enumerate(data["train"].items) if it.key in keys]
    pool = data["train"].subset(rows, name="fmnist-tip-pool")
    probe = EpochProbe(bb, None, **options)
    t0 = time.perf_counter()
    enc_pool = Encoded(pool, extract_features(bb, pool, views=probe.training_views(), cache=cache))
    enc_val = Encoded(data["val"], extract_features(bb, data["val"], cache=cache))
    enc_test = Encoded(data["test"], extract_features(bb, data["test"], cache=cache))
    extract_s = time.perf_counter() - t0
    row = {it.key: i for i, it in enumerate(pool.items)}

    runs = []
    for (k, s), plan in plans.items():
        tr = enc_pool.subset([row[it.key] for it in plan["train"].items])
        m = EpochProbe(bb, enc_test, **options)
        m.fit(tr, enc_val, ctx=RunContext(cache=cache, progress=False))
        ours_epoch, ours = m.fit_info["epoch"], m.test_accuracy()
        trained = m.curve[1:]  # after epochs 1..E (Tip-Adapter never keeps the untrained cache)
        best = max(range(len(trained)), key=lambda e: (trained[e]["test"], -e))  # first strict improvement
        with torch.no_grad():
            m.head.keys.copy_(trained[best]["keys"])
        m.search(enc_val)
        theirs = m.test_accuracy()
        runs.append(
            {
                "shots": k,
                "seed": s,
                "epoch_on_val": ours_epoch,
                "test_acc_epoch_on_val": ours,
                "epoch_on_test": best + 1,
                "test_acc_epoch_on_test": theirs,
                "best_epoch_test_acc_at_train_alpha": trained[best]["test"],
                "curve": [{"val": c["val"], "test": c["test"]} for c in m.curve],
            }
        )
        print(
            f"K={k:<2} seed={s} epoch on val {ours_epoch:>2} -> test {100 * ours:5.2f} | "
            f"epoch on test {best + 1:>2} -> test {100 * theirs:5.2f} | gap {100 * (theirs - ours):+5.2f}",
            flush=True,
        )
    summary = {}
    for k in shots:
        rs = [r for r in runs if r["shots"] == k]
        gap = [100 * (r["test_acc_epoch_on_test"] - r["test_acc_epoch_on_val"]) for r in rs]
        summary[str(k)] = {
            "epoch_on_val": float(np.mean([100 * r["test_acc_epoch_on_val"] for r in rs])),
            "epoch_on_test": float(np.mean([100 * r["test_acc_epoch_on_test"] for r in rs])),
            "gap_mean": float(np.mean(gap)),
            "gap_min": float(np.min(gap)),
            "gap_max": float(np.max(gap)),
        }
    lines = [
        "| shots | epoch on val (ours) | epoch on test (Tip-Adapter's code) | gap, mean (min..max) |",
        "|---|---|---|---|",
    ]
    for k, v in summary.items():
        lines.append(
            f"| {k} | {v['epoch_on_val']:.2f} | {v['epoch_on_test']:.2f} | "
            f"{v['gap_mean']:+.2f} ({v['gap_min']:+.2f}..{v['gap_max']:+.2f}) |"
        )
    print("\n".join(lines))
    out = Path(args.out) / f"tip_adapter_epoch_fashion-mnist_{args.backbone}.json"
    write_json(
        out,
        {
            "command": "python benchmarks/studies/tip_adapter_epoch.py "
            f"--backbone {args.backbone} --shots {args.shots} --seeds {args.seeds} "
            f"--val-per-class {args.val_per_class}",
            "data": f"fashion-mnist: val {len(data['val'])} carved from train (stratified, seed 0), "
            f"test {len(data['test'])}",
            "options": {k: v for k, v in options.items() if k not in ("alpha_grid", "beta_grid")},
            "extract_seconds": extract_s,
            "summary": summary,
            "table": "\n".join(lines),
            "runs": runs,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
