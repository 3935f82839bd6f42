"""Cold start of `vlclassify predict`: one image, a fresh process each time, where the time goes.

    python benchmarks/speed/cold_start.py MODEL_DIR IMAGE [--src OTHER/src --other-model DIR] [--repeats 5]

Each repeat runs, in fresh processes, (a) `vlclassify predict MODEL_DIR IMAGE` end to end and
(b) a driver that times its phases: importing the CLI, `load_method`, and the prediction. With
`--src`, the same runs alternate with another checkout's source tree (PYTHONPATH) and its model
folder (`--other-model`: a folder that checkout wrote), so a before / after comparison is side by
side in one run on a shared machine. Medians are reported; JSON goes
to benchmarks/results/cold_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
import vlclassify.cli  # noqa: F401  (what the command imports before it runs)
t1 = time.perf_counter()
from vlclassify.methods import load_method
m = load_method(sys.argv[1])
t2 = time.perf_counter()
getattr(m, 'predict_results', m.predict_proba)([sys.argv[2]])  # older trees have only scores
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "predict_s": t3 - t2}))
"""


def _env(src: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def one(model: str, image: str, src: str | None) -> dict[str, float]:
    t = time.perf_counter()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from vlclassify.cli import main; sys.argv[0] = 'vlclassify'; main()",
        "predict",
        model,
        image,
    ]
    subprocess.run(cmd, check=True, env=_env(src), capture_output=True)
    total = time.perf_counter() - t
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, model, image], check=True, env=_env(src), capture_output=True, text=True
    )
    return {"command_s": total, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("image")
    ap.add_argument("--src", default=None, help="another source tree to compare with (its src/ folder)")
    ap.add_argument("--other-model", default=None, help="the model folder for --src (default: MODEL_DIR)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "cold_start.json"))
    a = ap.parse_args()
    trees = {"this": (None, a.model), **({"other": (a.src, a.other_model or a.model)} if a.src else {})}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for _ in range(a.repeats):
        for name, (src, model) in trees.items():  # alternate, so both see the same machine load
            runs[name].append(one(model, a.image, src))
    table = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"{'tree':<6} {'command s':>10} {'import s':>9} {'load s':>7} {'predict s':>10}")
    for name, r in table.items():
        print(f"{name:<6} {r['command_s']:>10.2f} {r['import_s']:>9.2f} {r['load_s']:>7.2f} {r['predict_s']:>10.2f}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "command": "python " + " ".join(sys.argv),
        "median": table,
        "runs": runs,
        "loadavg_after": load,
        "trees": {k: v or str(Path(__file__).resolve().parents[2] / "src") for k, v in trees.items()},
    }
    from vlclassify.utils import write_json

    write_json(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
