"""Zero-shot accuracy and calibration of a backbone (default: the offline effnet-minilm).

Zero-shot learns nothing from images, so it is scored on every Tux Paint photo and on the
Fashion-MNIST test split. The NLL columns show how `logit_scale` calibrates the softmax
(Fashion-MNIST NLL on its *train* split: the scale is a backbone default, not tuned on test).

    python benchmarks/studies/zero_shot_default.py [--backbone effnet-minilm] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlclassify import create_backbone, create_method, extract_features, fewshot, load_data
from vlclassify.methods import Encoded
from vlclassify.metrics import score
from vlclassify.utils import write_json

SCALES = [5, 10, 20, 50, 100]


def nll_by_scale(method, enc: Encoded) -> dict[str, float]:
    s = torch.nn.functional.normalize(enc.features.image, dim=-1) @ method.class_embeds.T
    y = torch.as_tensor(enc.dataset.labels())
    return {str(sc): float(torch.nn.functional.cross_entropy(sc * s, y)) for sc in SCALES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="effnet-minilm")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    bb = create_backbone(args.backbone)
    rows = []
    tux = load_data("tuxpaint")["all"]
    fm = load_data("fashion-mnist")
    data = {
        "tuxpaint (439 photos, 15 classes)": Encoded(tux, extract_features(bb, tux)),
        "fashion-mnist test (10k, 10 classes)": Encoded(fm["test"], extract_features(bb, fm["test"])),
    }
    for name, enc in data.items():
        modalities = ["image", "text", "both"] if enc.features.text is not None else ["image"]
        for templates in ["single", "select7", "imagenet80"]:
            for mod in modalities:
                m = create_method("zero-shot", bb, templates=templates, modality=mod).fit(enc)
                rows.append(
                    {
                        "data": name,
                        "templates": templates,
                        "modality": mod,
                        "accuracy": score("single-label", enc.dataset.labels(), m.predict_proba(enc))["accuracy"],
                    }
                )
    # Calibration: Tux Paint (all photos) and the Fashion-MNIST train split (few-shot pools, seeds 1-3).
    zs = create_method("zero-shot", bb).fit(tux)
    calib = {"tuxpaint": nll_by_scale(zs, data["tuxpaint (439 photos, 15 classes)"])}
    keys = set()
    for k in (1, 2, 4, 8, 16):
        for s in (1, 2, 3):
            tr, va = fewshot(fm["train"], k, s)
            keys |= {it.key for it in tr.items + va.items}
    pool = fm["train"].subset([i for i, it in enumerate(fm["train"].items) if it.key in keys])
    zs_fm = create_method("zero-shot", bb).fit(pool)
    calib["fashion-mnist train"] = nll_by_scale(zs_fm, Encoded(pool, extract_features(bb, pool)))
    print(f"{'data':40} {'templates':11} {'modality':8} accuracy")
    for r in rows:
        print(f"{r['data']:40} {r['templates']:11} {r['modality']:8} {100 * r['accuracy']:6.2f}")
    print("\nzero-shot NLL by logit scale:", json.dumps(calib, indent=1))
    out = Path(args.out) / f"zero_shot_{args.backbone}.json"
    write_json(out, {"backbone": bb.config(), "rows": rows, "nll_by_logit_scale": calib, "time": time.ctime()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
