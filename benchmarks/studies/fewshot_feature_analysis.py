"""Why the adapters behave as they do on a backbone: how much class information its joint-space
embedding keeps compared with its raw pooled visual features.

    python benchmarks/studies/fewshot_feature_analysis.py --data fashion-mnist --split test
    python benchmarks/studies/fewshot_feature_analysis.py --data tuxpaint?min=16 --split all

Training-free, so it isolates the features from the methods: per feature space (joint `image`
embedding vs `pooled`), the mean cosine between images of the same class and of different
classes, and nearest-class-mean accuracy with K random images per class as prototypes (the rest
scored), mean over 3 seeds. Adapters (Tip-Adapter, CMM, VT-CLIP) all work in the joint space; the
linear probe works on the pooled features. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlclassify.utils import write_json


def cos_stats(x: torch.Tensor, y: np.ndarray, n: int = 3000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), size=min(n, len(y)), replace=False)
    z = F.normalize(x[idx].float(), dim=-1)
    s = z @ z.T
    same = torch.as_tensor(y[idx][:, None] == y[idx][None, :])
    off = ~torch.eye(len(idx), dtype=torch.bool)
    return {"same_class_cos": round(float(s[same & off].mean()), 4), "diff_class_cos": round(float(s[~same].mean()), 4)}


def ncm(x: torch.Tensor, y: np.ndarray, k: int, seeds=(1, 2, 3)) -> tuple[float, float]:
    accs = []
    z = F.normalize(x.float(), dim=-1)
    for s in seeds:
        rng = np.random.default_rng(s)
        proto_idx = np.concatenate([rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c in np.unique(y)])
        rest = np.setdiff1d(np.arange(len(y)), proto_idx)
        protos = torch.stack([z[proto_idx[y[proto_idx] == c]].mean(0) for c in np.unique(y)])
        pred = (z[rest] @ F.normalize(protos, dim=-1).T).argmax(-1).numpy()
        accs.append(float((np.unique(y)[pred] == y[rest]).mean()))
    return round(100 * float(np.mean(accs)), 2), round(100 * float(np.std(accs)), 2)


def main() -> None:
    from vlclassify.backbones import create_backbone
    from vlclassify.data import load_data
    from vlclassify.features import extract_features
    from vlclassify.fewshot import drop_small_classes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--split", default="test")
    ap.add_argument(
        "--min-per-class", type=int, default=0, help="drop classes with fewer images (as bench --min-per-class)"
    )
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--backbone", default="effnet-minilm")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    bb = create_backbone(a.backbone)
    ds = load_data(a.data)[a.split]
    if a.min_per_class:
        ds, _ = drop_small_classes(ds, a.min_per_class)
    fs = extract_features(bb, ds)
    y = ds.labels()
    from vlclassify.methods.templates import cached_template_embeddings, resolve_templates

    _, t = cached_template_embeddings(bb, ds.classnames, resolve_templates("select7"))
    zs = float(((F.normalize(fs.image.float(), dim=-1) @ t.T).argmax(-1).numpy() == y).mean())
    shots = [int(k) for k in a.shots.split(",")]
    res = {
        "command": "python " + " ".join(sys.argv),
        "data": a.data,
        "split": a.split,
        "n": len(y),
        "classes": len(ds.classnames),
        "backbone": a.backbone,
        "zero_shot_select7": round(100 * zs, 2),
        "spaces": {},
    }
    for name, x in (
        (f"image (joint, {fs.image.shape[1]}-d)", fs.image),
        (f"pooled ({fs.pooled.shape[1]}-d)", fs.pooled),
    ):
        row = cos_stats(x, y)
        for k in shots:
            row[f"ncm_{k}shot"] = ncm(x, y, k)
        res["spaces"][name] = row
        print(name, json.dumps(row))
    print("zero-shot (select7):", res["zero_shot_select7"])
    stem = "".join(c if c.isalnum() else "-" for c in a.data.split("?")[0])
    out = Path(a.out or Path(__file__).resolve().parent.parent / "results" / f"feature_analysis_{stem}.json")
    write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
