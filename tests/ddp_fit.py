"""Fit every method named in the options on a manifest and write the validation results (rank 0).

    python tests/ddp_fit.py data.csv '{"cmm": {"steps": 40}}' out.json
    torchrun --standalone --nproc_per_node 2 tests/ddp_fit.py data.csv '{...}' out.json [stream]

Used by tests/test_contract.py to compare one process with two (the Trainer splits each global
batch across the ranks, so both take the same optimizer steps) and by tests/test_stream.py
(`stream`: training batches read from the feature store, `RunContext.stream`).
"""

import json
import os
import sys

from vlclassify.backbones import create_backbone
from vlclassify.context import RunContext
from vlclassify.data import load_data
from vlclassify.methods import create_method


def main(manifest: str, options: str, out: str, stream: str = "") -> None:
    splits = load_data(manifest)
    toy = create_backbone("toy")
    results = {}
    for name, opts in json.loads(options).items():
        m = create_method(name, toy, **opts)
        m.fit(splits["train"], splits["val"], ctx=RunContext(stream=stream == "stream"))
        p = m.predict_proba(splits["val"])
        acc = float((p.argmax(-1) == splits["val"].labels()).mean())
        results[name] = {"val_accuracy": acc, "probs": p.tolist(), "world": int(os.environ.get("WORLD_SIZE", "1"))}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
