"""The DiCLS ablation (the paper's Sec. 4.2) on the multi-label benchmarks, on cached features.

    python benchmarks/studies/dicls.py                  # docs/results/dicls-ablation.*

Rows: a linear probe (`linear-probe`, one-vs-rest on the pooled features, C chosen by validation
mAP), the plain backbone + BCE, DiCLS with focal loss only, focal + each of ALN / CTA / CPA /
ArcFace, all losses, and the number of fusion layers 0 / 1 / 3 (2 is "all losses"). The backbone
is frozen: every row trains on the same cached features (pooled global features, spatial tokens,
prompt token features). Each row is trained with several seeds; the best epoch and the decision
rule (one global threshold, best micro-F1: `fit(..., thresholds="global")`) are chosen on the
validation split, the test split is scored once per run. Rows run in parallel worker processes
(one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import cast

import numpy as np

AUX = {"w_aln": 0.0, "w_cta": 0.0, "w_cpa": 0.0, "w_arcface": 0.0}  # focal only
ALL = {
    "w_aln": 1.0,
    "w_cta": 0.1,
    "w_cpa": 0.1,
    "w_arcface": 0.1,
}  # the auxiliary losses brought to the focal loss's scale
ROWS: list[tuple[str, str, dict]] = [
    ("linear probe (pooled features, one-vs-rest logistic)", "linear", {}),
    ("plain backbone + BCE (no fusion, no text)", "dicls", {**AUX, "fusion_layers": 0, "focal_gamma": 0.0}),
    ("DiCLS, focal only", "dicls", dict(AUX)),
    ("+ ALN (w 1)", "dicls", {**AUX, "w_aln": 1.0}),
    ("+ CTA (w 0.1)", "dicls", {**AUX, "w_cta": 0.1}),
    ("+ CPA (w 0.1)", "dicls", {**AUX, "w_cpa": 0.1}),
    ("+ ArcFace (w 0.1)", "dicls", {**AUX, "w_arcface": 0.1}),
    ("all losses (L = 2)", "dicls", dict(ALL)),
    ("all losses, L = 0", "dicls", {**ALL, "fusion_layers": 0}),
    ("all losses, L = 1", "dicls", {**ALL, "fusion_layers": 1}),
    ("all losses, L = 3", "dicls", {**ALL, "fusion_layers": 3}),
]
METRICS = ("macro_mAP", "micro_mAP", "macro_roc_auc", "micro_f1", "subset_accuracy")


def _load(data: str, backbone_name: str, backbone_opts: dict, cache_dir: str | None):
    key = (data, backbone_name, json.dumps(backbone_opts, sort_keys=True), cache_dir)
    if key not in _LOADED:  # a worker process runs many jobs: build the backbone and read the features once
        _LOADED[key] = _load_uncached(data, backbone_name, backbone_opts, cache_dir)
    return _LOADED[key]


_LOADED: dict = {}


def _load_uncached(data: str, backbone_name: str, backbone_opts: dict, cache_dir: str | None):
    from vlclassify.backbones import create_backbone
    from vlclassify.data import load_data, train_val_test
    from vlclassify.features import FeatureCache, extract_features
    from vlclassify.methods.base import Encoded

    bb = create_backbone(backbone_name, **backbone_opts)
    cache = FeatureCache(cache_dir)
    splits = train_val_test(load_data(data))
    enc = {k: Encoded(v, extract_features(bb, v, spatial=True, cache=cache, progress=False)) for k, v in splits.items()}
    return bb, cache, enc


def run_one(job: dict) -> dict:
    """One (data, row, seed) run in a worker process -> test metrics at the val-chosen threshold."""
    from vlclassify.utils import torch_threads

    with torch_threads(1):
        return _run_one(job)


def _run_one(job: dict) -> dict:
    from vlclassify.methods import create_method
    from vlclassify.methods.dicls import DiCLS
    from vlclassify.metrics.multilabel import multilabel_report

    bb, cache, enc = _load(job["data"], job["backbone"], job["backbone_opts"], job["cache_dir"])
    from vlclassify.context import RunContext

    ctx = RunContext(cache=cache, progress=False)
    ys = enc["test"].dataset.multi_hot()
    names = enc["test"].dataset.classnames
    t0, c0 = time.time(), time.process_time()
    out = {"data": job["data"], "row": job["row"], "seed": job["seed"]}
    if job["kind"] == "linear":
        m = create_method("linear-probe", bb, feature="pooled")
    else:
        m = create_method("dicls", bb, seed=job["seed"], threads=1, **job["options"])
    m.fit(enc["train"], enc["val"], thresholds="global", ctx=ctx)
    sources = ("head", "align") if job["kind"] != "linear" and m.config.w_aln > 0 else ("head",)
    outputs = {}
    for src in sources:
        if job["kind"] != "linear":
            cast(DiCLS, m).set_output(src, enc["val"], per_class=False)
        thresholds = m.decision().thresholds
        assert thresholds is not None and thresholds[0] is not None  # fit with thresholds="global"
        outputs[src] = (m.predict_proba(enc["test"], ctx=ctx), thresholds[0])
    info = m.fit_info
    out["fit_info"] = info["training"]["stages"][0] if "training" in info else {k: info[k] for k in ("C", "C_score")}
    out["fit_s"] = round(time.time() - t0, 2)  # wall clock (depends on what else runs on the machine)
    out["cpu_s"] = round(time.process_time() - c0, 2)  # CPU seconds of this run (one thread)
    for src, (ps, t) in outputs.items():
        rep = multilabel_report(ys, ps, names, t)
        out[src] = {k: rep[k] for k in METRICS} | {"threshold": t}
    return out


def run_ablation(
    datas: Sequence[str],
    seeds: Sequence[int],
    rows: Sequence[int] | None = None,
    base: dict | None = None,
    jobs: int = 2,
    backbone: str = "effnet-minilm",
    backbone_opts: dict | None = None,
    cache_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every row x dataset x seed (the linear probe is deterministic: one seed). Features are
    extracted (or read from the cache) once in this process before the workers start."""
    backbone_opts = backbone_opts or {}
    for d in datas:
        _load(d, backbone, backbone_opts, cache_dir)
    chosen = list(range(len(ROWS))) if rows is None else list(rows)
    todo = []
    for d in datas:
        for r in chosen:
            label, kind, opts = ROWS[r]
            for s in seeds[:1] if kind == "linear" else seeds:
                todo.append(
                    {
                        "data": d,
                        "row": label,
                        "kind": kind,
                        "options": {**(base or {}), **opts},
                        "seed": s,
                        "backbone": backbone,
                        "backbone_opts": backbone_opts,
                        "cache_dir": cache_dir,
                    }
                )
    t0 = time.time()
    results = []
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for res in pool.map(run_one, todo):
            results.append(res)
            log(
                f"[{time.time() - t0:6.0f}s] {res['data']:<20} {res['row']:<52} seed {res['seed']}: "
                f"mAP {100 * res['head']['macro_mAP']:.1f}"
                + (f" / align {100 * res['align']['macro_mAP']:.1f}" if "align" in res else "")
                + f" ({res['fit_s']}s, cpu {res['cpu_s']}s)"
            )
    return {
        "datas": list(datas),
        "seeds": list(seeds),
        "base_options": base or {},
        "backbone": backbone,
        "rows": [ROWS[r][0] for r in chosen],
        "runs": results,
        "total_s": round(time.time() - t0, 1),
        "total_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "jobs": jobs,
    }


def summarize(result: dict) -> list[dict]:
    """Mean and std over seeds per (data, row, output)."""
    out = []
    for d in result["datas"]:
        for row in result["rows"]:
            runs = [r for r in result["runs"] if r["data"] == d and r["row"] == row]
            for src in ("head", "align"):
                got = [r[src] for r in runs if src in r]
                if not got:
                    continue
                rec = {
                    "data": d,
                    "row": row,
                    "output": "p^v" if src == "head" else "S_align",
                    "seeds": len(got),
                    "fit_s": float(np.mean([r["fit_s"] for r in runs])),
                    "cpu_s": float(np.mean([r["cpu_s"] for r in runs])),
                }
                for k in METRICS:
                    v = np.array([g[k] for g in got], dtype=np.float64)
                    rec[k] = [float(v.mean()), float(v.std())]
                out.append(rec)
    return out


def markdown_table(result: dict) -> str:
    """The DiCLS ablation results as Markdown tables, one per dataset."""
    lines = []
    for d in result["datas"]:
        lines += [
            f"#### {d}",
            "",
            "| row | output | macro mAP | micro mAP | ROC-AUC | micro F1 | subset acc. | CPU s / run |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in summarize(result):
            if r["data"] != d:
                continue
            cells = " | ".join(f"{100 * r[k][0]:.1f} ± {100 * r[k][1]:.1f}" for k in METRICS)
            lines.append(f"| {r['row']} | {r['output']} | {cells} | {r['cpu_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def write_results(result: dict, out: str | Path, stem: str, command: str) -> tuple[Path, Path]:
    """Write the DiCLS ablation's JSON and Markdown (with its summary and command)."""
    from vlclassify.utils import write_json_and_markdown

    result = {**result, "command": command, "summary": summarize(result)}
    text = (
        f"# DiCLS ablation\n\nCommand: `{command}`\n\nMean ± std over seeds {result['seeds']} (test split; best "
        f"epoch and threshold chosen on validation). Wall clock {result['total_s']:.0f} s with {result['jobs']} "
        f"worker(s); {result['total_cpu_s']:.0f} CPU seconds in all.\n\n" + markdown_table(result)
    )
    return write_json_and_markdown(result, out, stem, text)


RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"  # this checkout's published tables


def _common(p: argparse.ArgumentParser, name: str | None) -> None:
    p.add_argument("--opt", action="append", default=[], help="option key=value for every row (JSON values)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the JSON + markdown (default {RESULTS})")
    p.add_argument("--name", default=name, help="file name stem")
    p.add_argument("--backbone", "-b", default="effnet-minilm")
    p.add_argument("--backbone-opt", action="append", default=[], help="backbone option key=value")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder")


def _command(argv: Sequence[str] | None) -> str:
    return (
        "python benchmarks/studies/"
        + Path(__file__).name
        + " "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ablation and write `<name>.json` and `<name>.md` under --out."""
    from vlclassify.cli import parse_ints
    from vlclassify.utils import parse_options

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", "-d", default="fmnist-mosaic,tuxpaint-composite", help="comma-separated multi-label specs")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--rows", default=None, help="comma-separated row indices (default: all; see ROWS)")
    p.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one torch thread each)")
    _common(p, "dicls-ablation")
    a = p.parse_args(argv)
    result = run_ablation(
        a.data.split(","),
        parse_ints(a.seeds, "seeds"),
        rows=parse_ints(a.rows, "rows") if a.rows else None,
        base=parse_options(a.opt),
        jobs=a.jobs,
        backbone=a.backbone,
        backbone_opts=parse_options(a.backbone_opt),
        cache_dir=str(a.cache_dir) if a.cache_dir else None,
    )
    print(markdown_table(result))
    print("wrote {} and {}".format(*write_results(result, a.out, a.name, _command(argv))))


if __name__ == "__main__":
    main()
