"""Zero-shot accuracy through a backbone's bridge beside its own joint embedding.

`backbone.bridge()` maps the pooled visual features into the joint space (exact for CLIP, fitted
by ridge regression for effnet-minilm's ConSE join). Joint-space methods start from it, so its
zero-shot accuracy is where they start. Scored like benchmarks/studies/zero_shot_default.py: every
Tux Paint photo (15 classes) and the Fashion-MNIST test split; nothing here is tuned on them.

    python benchmarks/studies/bridge_zero_shot.py [--backbone effnet-minilm] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch.nn.functional as F

from vlclassify import create_backbone, create_method, extract_features, load_data
from vlclassify.methods import Encoded
from vlclassify.metrics import score
from vlclassify.utils import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="effnet-minilm")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    bb = create_backbone(args.backbone)
    w, b = bb.bridge()  # [D, F], [D]
    tux = load_data("tuxpaint")["all"]
    fm = load_data("fashion-mnist")["test"]
    rows = []
    for name, ds in (("tuxpaint (439 photos, 15 classes)", tux), ("fashion-mnist test (10k, 10 classes)", fm)):
        feats = extract_features(bb, ds)
        bridged = feats.pooled @ w.T + b  # [N, D]
        cos = float(F.cosine_similarity(bridged, feats.image, dim=-1).mean())
        for templates in ("single", "select7"):
            zs = create_method("zero-shot", bb, templates=templates).fit(ds)
            y = ds.labels()
            joint = score("single-label", y, zs.predict_proba(Encoded(ds, feats)))["accuracy"]
            feats_b = type(feats)(image=bridged, pooled=feats.pooled)
            through = score("single-label", y, zs.predict_proba(Encoded(ds, feats_b)))["accuracy"]
            rows.append({"data": name, "templates": templates, "joint": joint, "bridge": through, "mean_cosine": cos})
    print(f"{'data':40} {'templates':9} {'joint':>7} {'bridge':>7} {'cos':>6}")
    for r in rows:
        acc = f"{100 * r['joint']:7.2f} {100 * r['bridge']:7.2f}"
        print(f"{r['data']:40} {r['templates']:9} {acc} {r['mean_cosine']:6.3f}")
    out = Path(args.out) / f"bridge_zero_shot_{args.backbone}.json"
    write_json(out, {"backbone": bb.config(), "rows": rows, "time": time.ctime()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
