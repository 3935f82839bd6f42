"""How CMA-CLIP's CPU-sized defaults were chosen: fit configurations on fold 1 of the Tux Paint
5-fold split and print the VALIDATION mean accuracy (over tasks) of each stage's best epoch —
the number the choice was made on — next to the test-fold scores (reported, not used to choose).

    python benchmarks/cma_defaults.py '{}' '{"width": 256, "layers": 1, "frozen_epochs": 15}' ...

Each argument is a JSON dict of CMA-CLIP options on top of: 8 frozen-top epochs, no stage 2, 4 tuning epochs.
(The table in docs/cma-clip.md was made when `frozen_epochs` was called `warmup_epochs`.)
"""

from __future__ import annotations

import json
import sys
import time

from vlclassify.backbones import create_backbone
from vlclassify.context import RunContext
from vlclassify.data import kfold, load_data, stratified_split
from vlclassify.methods import create_method


def main(specs: list[str]) -> None:
    bb = create_backbone("effnet-minilm")
    ds = load_data("tuxpaint")["all"]
    first = create_method("cma-clip", bb)
    trunk = first.trunk(ds)  # computed once at the default cut (image_blocks = text_layers = 1, 32 tokens)
    tr_idx, te_idx = kfold(ds, 5, 0)[0]
    parts = stratified_split(ds.subset(tr_idx), {"train": 0.8, "val": 0.2}, 0)
    test = ds.subset(te_idx)
    print("| options | val mean acc per stage | test category acc / R@90P | test subcategory acc / R@90P | fit s |")
    print("|---|---|---|---|---|")
    for spec in specs:
        opts = json.loads(spec)
        m = create_method("cma-clip", bb, **{"frozen_epochs": 8, "e2e_epochs": 0, "tune_epochs": 4, **opts})
        m.provide_trunk(ds, trunk)
        t = time.time()
        m.fit(parts["train"], parts["val"], ctx=RunContext(progress=False))
        secs = time.time() - t
        r = m.task_report(test)
        val = " / ".join(f"{s['best_metric']:.3f}" for s in m.fit_info["training"]["stages"])
        cells = [f"{100 * r[k]['accuracy']:.1f} / {100 * r[k]['recall@90P']:.1f}" for k in ("category", "subcategory")]
        print(f"| `{spec}` | {val} | {cells[0]} | {cells[1]} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["{}"])
