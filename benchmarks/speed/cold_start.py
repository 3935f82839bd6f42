"""Cold start of `vlclassify predict` on the ONNX path, side by side with `python -c "import torch"`.

    python benchmarks/speed/cold_start.py MODEL_DIR IMAGE [--repeats 7] [--int8] [--src OTHER/src]

Each repeat runs, in fresh processes and in turn (so every variant sees the same machine load):
`python -c "import torch"`; `vlclassify predict MODEL_DIR IMAGE` (the model's ONNX export, made
beforehand by one warm-up predict, answers without torch); with `--int8`, the same with
`--precision int8`; with `--src`, the same command from another source tree (e.g. one whose
predict still runs torch) on the same model folder. Then a driver times the ONNX path's phases
(importing the CLI, loading the export, predicting). Medians and every run go to
benchmarks/results/cold_start.json.
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

SRC = str(Path(__file__).resolve().parents[2] / "src")
CLI = "import sys; from vlclassify.cli import main; sys.argv[0] = 'vlclassify'; main()"
DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
import vlclassify.cli  # noqa: F401  (what the command imports before it runs)
t1 = time.perf_counter()
from vlclassify.onnx_predict import OnnxModel
m = OnnxModel(sys.argv[1])
t2 = time.perf_counter()
m.predict_results([sys.argv[2]])
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "predict_s": t3 - t2, "torch": "torch" in sys.modules}))
"""


def _env(src: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def timed(cmd: list[str], src: str = SRC) -> float:
    """Wall seconds of one fresh process (it must succeed)."""
    t = time.perf_counter()
    out = subprocess.run(cmd, env=_env(src), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} (PYTHONPATH {src}) failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("image")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--int8", action="store_true", help="also time `predict --precision int8`")
    ap.add_argument("--src", default=None, help="another source tree's src/ to time the same predict from")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "cold_start.json"))
    a = ap.parse_args()
    predict = [sys.executable, "-c", CLI, "predict", a.model, a.image]
    variants: dict[str, tuple[list[str], str]] = {
        "import torch": ([sys.executable, "-c", "import torch"], SRC),
        "predict (onnx)": (predict, SRC),
    }
    if a.int8:
        variants["predict --precision int8"] = (predict + ["--precision", "int8"], SRC)
    if a.src:
        variants["predict (--src tree)"] = (predict, a.src)
    for cmd, src in variants.values():  # warm-up: makes the exports, fills the OS file cache
        timed(cmd, src)
    runs: dict[str, list[float]] = {k: [] for k in variants}
    phases = []
    for _ in range(a.repeats):
        for name, (cmd, src) in variants.items():
            runs[name].append(timed(cmd, src))
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, a.model, a.image], check=True, env=_env(SRC), capture_output=True, text=True
        )
        phases.append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = {k: statistics.median(v) for k, v in runs.items()}
    phase = {k: statistics.median(p[k] for p in phases) for k in ("import_s", "load_s", "predict_s")}
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, v in runs.items():
        print(f"{name:<28} {median[name]:>9.2f} {min(v):>7.2f} {max(v):>7.2f}")
    print("onnx path phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in phase.items()))
    print(f"torch imported on the onnx path: {any(p['torch'] for p in phases)}")
    result = {
        "command": "python " + " ".join(sys.argv),
        "median_s": median,
        "runs_s": runs,
        "onnx_phases_median_s": phase,
        "torch_imported": any(p["torch"] for p in phases),
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    from vlclassify.utils import write_json

    write_json(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
