"""Scale benchmark: WebDataset extraction at growing sizes, one process and torchrun, and the linear-probe fit.

    nice python benchmarks/speed/scale.py                                   # 10k, 50k, 200k
    python benchmarks/speed/scale.py --sizes 200,1000 --name scale-quick   # a quick check

Data: WebDataset tars (1,000 samples each) built from the installed Fashion-MNIST (train + test:
70,000 28x28 images, PNG-encoded, json `category`, txt caption). Sizes past 70,000 use augmented
copies: copy c of an image is rolled c pixels sideways, and mirrored when c is odd, so its bytes
(its content hash, its features) differ. Per size and backbone, in one run:

- `vlclassify extract --data TARS` into an empty store: wall time, images/s, the peak RSS of each
  extracting process (VmHWM, polled), and the same command again (everything stored: every tar is
  skipped unread), whose wall time is the fixed start-up cost; images/s "excl. start-up" subtracts it.
- the same under `torchrun --standalone --nproc_per_node 2`, and whether its rows equal the
  one-process rows bit for bit (max |difference| otherwise).
- extract, then fit: `vlclassify fit -m linear-probe --data 'TARS?label=json:category'` on the
  one-process store: its wall time, and the image rows the fit added to the store (0: it extracted
  nothing again).
- the linear probe on the stored pooled features (80/20 stratified train/val, the default C grid, C
  by `training.select_best`): `training.logistic.fit_logistic_path` against scikit-learn's per-C
  LogisticRegression (the old methods/linear_probe.py; skipped above --sklearn-max rows).
  benchmarks/speed/linear_probe.py is the full comparison (test split, multi-label).
- cma-clip head training: not measured (its default schedule is 28 epochs through a backbone top);
  the notes say so.

A size is skipped, and the table says so, when the previous size's rate predicts more than
--max-minutes for it. Writes benchmarks/results/<name>.json and docs/results/<name>.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlclassify.backbones import create_backbone
from vlclassify.data import FASHION_MNIST_CLASSES, fashion_mnist
from vlclassify.data.splits import stratified_split
from vlclassify.data.webdataset import load_webdataset, write_webdataset
from vlclassify.features import FeatureCache, extract_features
from vlclassify.methods.base import normalize
from vlclassify.training import select_best
from vlclassify.training.logistic import fit_logistic_path
from vlclassify.utils import atomic_path, write_json

ROOT = Path(__file__).resolve().parents[2]
GRID = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
PER_TAR = 1000


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- data ---------------------------------------------------------------------------------------
def build_tars(n: int, work: Path) -> str:
    """`n` samples as tars under work/data-n/ (reused when complete); returns the brace spec."""
    d = work / f"data-{n}"
    n_tars = (n + PER_TAR - 1) // PER_TAR
    spec = f"{d}/shard-{{00000..{n_tars - 1:05d}}}.tar"
    if (d / "done.json").exists():
        return spec
    shutil.rmtree(d, ignore_errors=True)
    fm = fashion_mnist()
    items = fm["train"].items + fm["test"].items

    def samples():
        for i in range(n):
            it = items[i % len(items)]
            c = i // len(items)
            arr = np.roll(it.image.array, c, axis=1)[:, ::-1] if c % 2 else np.roll(it.image.array, c, axis=1)
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr), "L").save(buf, format="PNG")
            name = FASHION_MNIST_CLASSES[it.label]
            yield {
                "__key__": f"{i:08d}",
                "png": buf.getvalue(),
                "json": json.dumps({"category": name}).encode(),
                "txt": f"a photo of a {name}".encode(),
            }

    write_webdataset(samples(), d, per_shard=PER_TAR)
    (d / "done.json").write_text(json.dumps({"n": n}))
    return spec


# ---- extraction runs ----------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process tree (torchrun waits for its workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _hwm_kb(pid: int) -> tuple[int, str]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return 0, ""
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return (int(m.group(1)) if m else 0), cmd


def run_extract(spec: str, cache: Path, backbone: str, nproc: int, precision: str = "auto") -> dict:
    """One `vlclassify extract` (or torchrun of it): wall seconds, rows extracted, peak RSS per worker."""
    cmd = [sys.executable, "-m", "vlclassify", "extract"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += ["-m", "vlclassify", "extract"]
    cmd += ["--data", spec, "--backbone", backbone, "--cache-dir", str(cache), "--precision", precision]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            kb, line = _hwm_kb(pid)
            if "vlclassify" in line and "torch.distributed.run" not in line:
                peaks[pid] = max(peaks.get(pid, 0), kb)
        time.sleep(0.25)
    out, err = proc.communicate()
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-3000:]}")
    m = re.search(r"(\d+) extracted", out)
    workers = sorted(peaks.values(), reverse=True)[:nproc]
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "extracted": int(m.group(1)) if m else None,
        "peak_rss_mb": [round(k / 1024, 1) for k in workers],
        "command": " ".join(shlex.quote(c) for c in cmd),
    }


def _stored(spec: str, cache: Path, bb, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    ds = load_webdataset(spec.split("?")[0], label="json:category")["all"]
    fs = extract_features(bb, ds, cache=FeatureCache(cache), progress=False, text=False, precision=precision)
    return fs.image, fs.pooled, ds.labels().tolist()


def image_rows(cache: Path) -> int:
    return sum(s["rows"] for s in FeatureCache(cache).info()["spaces"] if s["kind"] == "image")


def fit_after_extract(spec: str, cache: Path, backbone: str, work: Path) -> dict:
    """`vlclassify fit -m linear-probe` on the stored tars: wall seconds, image rows it added to the store."""
    out = work / "fit-model"
    shutil.rmtree(out, ignore_errors=True)
    before = image_rows(cache)
    cmd = [sys.executable, "-m", "vlclassify", "fit", "-m", "linear-probe", "--data", f"{spec}?label=json:category"]
    cmd += ["--backbone", backbone, "--cache-dir", str(cache), "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    info = json.loads((out / "fit.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": time.perf_counter() - t0, "added_rows": image_rows(cache) - before,
            "C": info.get("fit_info", info).get("C")}  # fmt: skip


# ---- the linear probe ---------------------------------------------------------------------------
def probe(pooled: torch.Tensor, labels: list[int], sklearn: bool) -> dict:
    from vlclassify.data import Dataset, Item

    ds = Dataset([Item(image=None, label=y, key=str(i)) for i, y in enumerate(labels)], list(FASHION_MNIST_CLASSES))
    parts = stratified_split(ds, {"train": 0.8, "val": 0.2}, seed=0)
    idx = {k: [int(it.key) for it in v.items] for k, v in parts.items()}
    x, xv = normalize(pooled[idx["train"]]), normalize(pooled[idx["val"]])
    y, yv = torch.tensor(labels)[idx["train"]], torch.tensor(labels)[idx["val"]]

    def acc(W, b):
        return float(((xv @ W.T + b).argmax(-1) == yv).float().mean())

    t, c = time.perf_counter(), time.process_time()
    path = fit_logistic_path(x, y, GRID, num_classes=10)
    ours, ours_cpu = time.perf_counter() - t, time.process_time() - c
    sel = select_best(GRID, lambda C: acc(*path[GRID.index(C)]), default=GRID[len(GRID) // 2])
    res = {"n_train": len(y), "torch_seconds": ours, "torch_cpu_seconds": ours_cpu}
    res |= {"torch_C": sel.best, "torch_acc": max(sel.scores)}
    if sklearn:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        def fit(C):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(C=C, max_iter=1000).fit(x.numpy(), y.numpy())
            return torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()

        t, c = time.perf_counter(), time.process_time()
        sk = {C: acc(*fit(C)) for C in GRID}
        sel = select_best(GRID, sk.__getitem__, default=GRID[len(GRID) // 2])
        res |= {"sklearn_seconds": time.perf_counter() - t, "sklearn_cpu_seconds": time.process_time() - c}
        res |= {"sklearn_C": sel.best, "sklearn_acc": max(sel.scores)}
    return res


# ---- report -------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    lines = [
        "# Scale: WebDataset extraction and the linear probe at growing sizes",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; load average {res['load_start']} at start, {res['load_end']} at end "
        "(2 cores shared with other jobs: absolute rates vary with the load).",
        "",
        "Data: Fashion-MNIST (train + test, 70,000 images) as PNG samples in WebDataset tars of 1,000; "
        "past 70,000, augmented copies (rolled, mirrored every other copy), so every image is new to the store.",
        "",
        "| backbone | images | procs | wall s | images/s | images/s excl. start-up | start-up s | CPU s "
        "| images / CPU s | peak RSS / process MB | = 1 process | probe: torch s, CPU s (C, val acc) "
        "| probe: sklearn s, CPU s (C, val acc) | fit after extract: s (image rows it added) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['backbone']} | {r['size']:,} | | skipped: {r['skipped']} | | | | | | | | | | |")
            continue
        p = r.get("probe", {})
        tp = f"{p['torch_seconds']:.1f}, {p['torch_cpu_seconds']:.1f} ({p['torch_C']:g}, {100 * p['torch_acc']:.2f}%)"
        sp = (
            f"{p['sklearn_seconds']:.1f}, {p['sklearn_cpu_seconds']:.1f} ({p['sklearn_C']:g}, "
            f"{100 * p['sklearn_acc']:.2f}%)"
            if "sklearn_seconds" in p
            else "not run (--sklearn-max)"
        )
        f = r.get("fit")
        fit = f"{f['seconds']:.0f} ({f['added_rows']})" if f else "-"
        for e in r["runs"]:
            same = "" if e["nproc"] == 1 else ("bit for bit" if e["equal"] else f"max diff {e['max_diff']:.2g}")
            excl = f"{e['rate_excl']:.1f}" if e["rate_excl"] else "-"
            rss = ", ".join(map(str, e["peak_rss_mb"]))
            first = e["nproc"] == 1
            lines.append(
                f"| {r['backbone']} | {r['size']:,} | {e['nproc']} | {e['seconds']:.0f} | {e['rate']:.1f} "
                f"| {excl} | {e['startup']:.0f} | {e['cpu_seconds']:.0f} | {e['size'] / e['cpu_seconds']:.1f} "
                f"| {rss} | {same} | {tp if first else ''} | {sp if first else ''} "
                f"| {fit if first else ''} |"
            )
    lines += ["", *res["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--backbones", default="effnet-minilm")
    work = Path(os.environ.get("VLCLASSIFY_SCALE_WORK", "/tmp/vlclassify-scale"))
    ap.add_argument("--work", type=Path, default=work, help="tars and stores ($VLCLASSIFY_SCALE_WORK)")
    ap.add_argument("--max-minutes", type=float, default=40.0, help="skip a size predicted to take longer")
    ap.add_argument("--sklearn-max", type=int, default=60000, help="largest size the sklearn probe runs at")
    ap.add_argument("--name", default="scale")
    ap.add_argument("--precision", default="auto", help="extraction precision: auto (fp32 on CPU) or int8")
    ap.add_argument("--nprocs", default="1,2", help="process counts to run at each size")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    res = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
        "load_start": loadavg(),
        "precision": args.precision,
        "rows": [],
        "notes": [],
    }
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.backbones.split(","):
        bb = create_backbone(name)
        rate, prev = None, 0
        for n in sizes:
            if rate and 3 * n / rate / 60 > args.max_minutes:  # 1 process + 2 processes + checks
                est = 3 * n / rate / 60
                res["rows"].append({"backbone": name, "size": n, "skipped": f"~{est:.0f} min predicted"})
                res["notes"].append(
                    f"{name} at {n:,}: skipped, the {prev:,} rate predicts ~{est:.0f} min (> {args.max_minutes:g})."
                )
                continue
            spec = build_tars(n, args.work)
            row = {"backbone": name, "size": n, "runs": []}
            ref = None
            for nproc in (int(p) for p in args.nprocs.split(",")):
                cache = args.work / f"cache-{name}-{n}-{nproc}"
                shutil.rmtree(cache, ignore_errors=True)
                print(f"{name} {n:,} x {nproc} process(es): extracting; load {loadavg()}", flush=True)
                e = run_extract(spec, cache, name, nproc, args.precision)
                again = run_extract(spec, cache, name, nproc, args.precision)  # all stored: start-up, skipping
                e |= {"nproc": nproc, "size": n, "startup": again["seconds"], "rerun_extracted": again["extracted"]}
                e["rate"] = n / e["seconds"]
                work_s = e["seconds"] - again["seconds"]  # noisy when start-up dominates: then not shown
                e["rate_excl"] = n / work_s if work_s > 0.25 * e["seconds"] else None
                if nproc == 1 and args.precision != "int8":  # fit reads fp32 features: int8 rows are not its
                    print("  fit after extract", flush=True)
                    row["fit"] = fit_after_extract(spec, cache, name, args.work)
                image, pooled, labels = _stored(spec, cache, bb, args.precision)
                if ref is None:
                    ref = (image, pooled, labels)
                else:
                    diff = max(float((image - ref[0]).abs().max()), float((pooled - ref[1]).abs().max()))
                    e |= {"equal": diff == 0.0, "max_diff": diff}
                del image, pooled
                print(f"  {e['seconds']:.0f}s, {e['rate']:.1f} img/s, RSS {e['peak_rss_mb']} MB", flush=True)
                row["runs"].append(e)
            shutil.rmtree(args.work / f"cache-{name}-{n}-2", ignore_errors=True)
            rate, prev = n / row["runs"][0]["seconds"], n
            print(f"  linear probe on {n:,}", flush=True)
            row["probe"] = probe(ref[1], ref[2], sklearn=n <= args.sklearn_max)
            shutil.rmtree(args.work / f"cache-{name}-{n}-1", ignore_errors=True)
            res["rows"].append(row)
            write(res, args.name)
    write(res, args.name, final=True)


NOTES = [
    "peak RSS: VmHWM of each extracting process (torchrun's agent excluded), polled every 0.25 s. "
    "start-up: the wall time of the same command once everything is stored (model load, tar skip, index sync).",
    "CPU s: user + system seconds of the extracting process tree (torchrun included); on a shared machine it "
    "moves far less with the load than wall time does. images / CPU s: size / CPU s, start-up included.",
    "cma-clip head fit: not measured (its default schedule, 28 epochs through a backbone top, takes hours "
    "per size on 2 shared cores).",
    "2 processes on this 2-core machine share the cores the 1-process run already uses (each process gets "
    "half: LOCAL_WORLD_SIZE), so they check correctness and overhead, not speed-up.",
]


def write(res: dict, name: str, final: bool = False) -> None:
    """JSON + markdown after every size (a long run stopped early keeps what it measured)."""
    res["load_end"] = loadavg()
    out = {**res, "notes": res["notes"] + NOTES + ([] if final else ["(partial: the run was still going)"])}
    md = markdown(out)
    write_json(ROOT / "benchmarks" / "results" / f"{name}.json", out)
    with atomic_path(ROOT / "docs" / "results" / f"{name}.md") as tmp:
        tmp.write_text(md)
    if final:
        print(md)
        print(f"wrote benchmarks/results/{name}.json and docs/results/{name}.md")


if __name__ == "__main__":
    main()
