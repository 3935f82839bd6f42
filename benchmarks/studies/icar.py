"""The iCAR benchmark: open-vocabulary zero-shot, few-shot and full-data accuracy with the paper's
ablations (Tables 1-2): linear vs cosine classifier, split heads vs shared text encoder, with vs
without descriptions, with vs without image-text pairs.

    python benchmarks/studies/icar.py                   # docs/results/icar.*

Per dataset and seed, some classes are held out of training entirely (no labels, no pairs, no
images). Each variant is trained on the seen classes (classification data mixed with image-text
pairs) and scored on:
- seen:   test images of the seen classes among the seen classes (full data);
- 0-shot: test images of the held-out classes among the held-out classes, classes given by name
          (+ description) only;
- K-shot: the same test images after fine-tuning on K images per held-out class (validation
          min(K, 4) per class from the same pool, CoOp protocol), starting from the variant's
          trained model with the text encoder as the initial classifier (paper §3.4).
Data: Fashion-MNIST (a fixed stratified subset of train as the pool, of test as the test set)
with the Tux Paint photos + captions as pairs; Tux Paint by category (stratified 60/20/20 split
per seed) with the seen classes' training photos + captions as pairs (test photos never are).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from vlclassify.backbones import create_backbone
from vlclassify.backbones.base import Backbone
from vlclassify.context import RunContext
from vlclassify.data import Dataset, fashion_mnist, fewshot, stratified_split, tuxpaint
from vlclassify.data.descriptions import builtin_descriptions
from vlclassify.data.splits import sample_per_class
from vlclassify.features import FeatureCache, extract_features
from vlclassify.methods import Encoded, create_method
from vlclassify.methods.icar import ICAR
from vlclassify.metrics import score


@dataclass
class Variant:
    """One row of the iCAR benchmark: options, and which columns it runs."""

    label: str  # row name
    options: dict[str, Any] = field(default_factory=dict)  # icar options
    train: bool = True  # False: the untrained backbone (zero-shot classifier from text)
    fewshot: bool = True  # also run the few-shot columns
    probe: bool = False  # the linear-probe baseline instead of icar


VARIANTS = [
    Variant("backbone zero-shot, name only", {"descriptions": "none"}, train=False),
    Variant("backbone zero-shot, name + desc.", {}, train=False),
    Variant("linear probe (pooled features)", probe=True),
    Variant("sup-only: linear classifier", {"head": "linear", "pairs": "none"}, fewshot=False),
    Variant("sup-only: cosine classifier", {"head": "cosine", "pairs": "none"}, fewshot=False),
    Variant("split heads: linear cls + text for pairs", {"head": "linear"}),
    Variant("shared text encoder, name only", {"descriptions": "none"}),
    Variant("iCAR: shared text encoder, name + desc.", {}),
    Variant("iCAR without pairs", {"pairs": "none"}),
]


def class_subset(enc: Encoded, classes: Sequence[str], rows: Sequence[int] | None = None) -> Encoded:
    """Rows (default: all) of `enc` whose class is in `classes`, relabelled 0..len(classes)-1."""
    ds = enc.dataset
    names = ds.classnames
    keep = set(classes)
    pos = {c: i for i, c in enumerate(classes)}
    rows = range(len(ds)) if rows is None else rows
    y = ds.labels()  # [N], -1 where an item has no label
    idx = [i for i in rows if y[i] >= 0 and names[y[i]] in keep]
    items = [replace(ds.items[i], label=pos[names[y[i]]]) for i in idx]
    sub = Dataset(items=items, classnames=list(classes), name=ds.name, source=ds.source)
    return Encoded(sub, enc.features.index(idx))


def _rows(enc: Encoded, part: Dataset) -> list[int]:
    row = {it.key: i for i, it in enumerate(enc.dataset.items)}
    return [row[it.key] for it in part.items]


@dataclass
class Task:
    """One (dataset, seed) problem: seen/held-out classes and their encoded splits."""

    data: str
    seed: int
    seen: list[str]
    held: list[str]
    seen_train: Encoded
    seen_val: Encoded
    seen_test: Encoded
    held_pool: Encoded  # few-shot pool of the held-out classes (never the test images)
    held_test: Encoded
    pairs: Encoded | None  # image-text pairs for training (None: the items' own captions)


def _pick_held(rng: np.random.Generator, candidates: Sequence[str], n: int) -> list[str]:
    return sorted(rng.choice(list(candidates), size=n, replace=False).tolist())


def fashion_mnist_tasks(
    backbone, seeds, cache, per_class: int, test_per_class: int, n_held: int, pairs: Encoded, progress: bool
) -> list[Task]:
    """Seen / held-out class tasks on Fashion-MNIST, one per seed (held-out classes drawn by the seed)."""
    raw = fashion_mnist()
    pool = raw["train"].subset(sample_per_class(raw["train"], per_class, seed=0), name="fashion-mnist")
    test = raw["test"].subset(sample_per_class(raw["test"], test_per_class, seed=0), name="fashion-mnist")
    enc_pool = Encoded(pool, extract_features(backbone, pool, cache=cache, progress=progress))
    enc_test = Encoded(test, extract_features(backbone, test, cache=cache, progress=progress))
    tasks = []
    for s in seeds:
        held = _pick_held(np.random.default_rng(1000 + s), pool.classnames, n_held)
        seen = [c for c in pool.classnames if c not in held]
        seen_pool = class_subset(enc_pool, seen)
        parts = stratified_split(seen_pool.dataset, {"train": 0.8, "val": 0.2}, seed=s)
        tasks.append(
            Task(
                "fashion-mnist",
                s,
                seen,
                held,
                seen_train=Encoded(parts["train"], seen_pool.features.index(_rows(seen_pool, parts["train"]))),
                seen_val=Encoded(parts["val"], seen_pool.features.index(_rows(seen_pool, parts["val"]))),
                seen_test=class_subset(enc_test, seen),
                held_pool=class_subset(enc_pool, held),
                held_test=class_subset(enc_test, held),
                pairs=pairs,
            )
        )
    return tasks


def tuxpaint_tasks(enc_all: Encoded, seeds, n_held: int, min_held_images: int) -> list[Task]:
    """Seen / held-out class tasks on the Tux Paint stamps, held-out classes drawn among those with enough images."""
    ds = enc_all.dataset
    counts = np.bincount(ds.labels(), minlength=ds.num_classes)
    candidates = [c for c, n in zip(ds.classnames, counts) if n >= min_held_images]
    tasks = []
    for s in seeds:
        held = _pick_held(np.random.default_rng(2000 + s), candidates, n_held)
        seen = [c for c in ds.classnames if c not in held]
        parts = stratified_split(ds, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=s)
        r = {k: _rows(enc_all, v) for k, v in parts.items()}
        seen_train = class_subset(enc_all, seen, r["train"])
        # Pairs: the seen classes' training photos with their captions (held-out and test photos never).
        cap = [i for i, it in enumerate(seen_train.dataset.items) if it.text and it.text.strip()]
        tasks.append(
            Task(
                "tuxpaint",
                s,
                seen,
                held,
                seen_train=seen_train,
                seen_val=class_subset(enc_all, seen, r["val"]),
                seen_test=class_subset(enc_all, seen, r["test"]),
                held_pool=class_subset(enc_all, held, r["train"] + r["val"]),
                held_test=class_subset(enc_all, held, r["test"]),
                pairs=seen_train.subset(cap),
            )
        )
    return tasks


def _acc(method, enc: Encoded, ctx: RunContext) -> float:
    return score("single-label", enc.dataset.labels(), method.predict_proba(enc, ctx=ctx))["accuracy"]


def run_task(
    backbone: Backbone,
    task: Task,
    variants: Sequence[Variant],
    shots: Sequence[int],
    cache: FeatureCache,
    base_options: dict[str, Any],
    log: Callable[[str], None],
) -> list[dict]:
    """Every variant on one task: seen accuracy, held-out zero-shot accuracy, then the few-shot columns."""
    ctx = RunContext(cache=cache, progress=False)
    runs = []
    name = task.data
    desc_all = builtin_descriptions(name)
    for v in variants:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {
            "data": name,
            "seed": task.seed,
            "variant": v.label,
            "seen": task.seen,
            "held_out": task.held,
        }
        if v.probe:
            m = create_method("linear-probe", backbone)
            m.fit(task.seen_train, task.seen_val, ctx=ctx)
            rec["seen_acc"] = _acc(m, task.seen_test, ctx)
        else:
            opts = {**base_options, **v.options}
            uses_desc = opts.get("descriptions", "auto") != "none"
            m = cast(ICAR, create_method("icar", backbone, **opts))
            if v.train:
                m.use_pairs(task.pairs if opts.get("pairs", "auto") != "none" else None)
                m.fit(task.seen_train, task.seen_val, ctx=ctx)
                rec["fit_seconds"] = round(time.perf_counter() - t0, 2)
                rec["best"] = m.fit_info["best"]
            else:
                m.set_classes(task.seen, {c: desc_all[c] for c in task.seen if c in desc_all} if uses_desc else None)
            rec["seen_acc"] = _acc(m, task.seen_test, ctx)
            m.set_classes(task.held, {c: desc_all[c] for c in task.held if c in desc_all} if uses_desc else None)
            rec["zero_shot_acc"] = _acc(m, task.held_test, ctx)
        for k in shots if v.fewshot else ():
            tr, va = fewshot(task.held_pool.dataset, k, task.seed)
            etr = Encoded(tr, task.held_pool.features.index(_rows(task.held_pool, tr)))
            eva = Encoded(va, task.held_pool.features.index(_rows(task.held_pool, va)))
            t1 = time.perf_counter()
            if v.probe:
                fm = create_method("linear-probe", backbone)
                fm.fit(etr, eva, ctx=ctx)
            else:
                if v.train:
                    # start from the variant's trained weights (m is its ICAR), text encoder as classifier
                    fm = cast(ICAR, m).clone()
                    fm.config = dataclasses.replace(fm.config, pairs="none")
                    fm.finetune(etr, eva, ctx=ctx)
                else:
                    fm = create_method("icar", backbone, **{**base_options, **v.options, "pairs": "none"})
                    fm.fit(etr, eva, ctx=ctx)
            rec[f"{k}_shot_acc"] = _acc(fm, task.held_test, ctx)
            rec[f"{k}_shot_seconds"] = round(time.perf_counter() - t1, 2)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        runs.append(rec)
        cols = [f"{c}={100 * rec[c]:.1f}" for c in rec if c.endswith("_acc")]
        log(f"{name} seed {task.seed} | {v.label}: " + " ".join(cols) + f" ({rec['seconds']:.0f} s)")
    return runs


COLUMNS = ["seen_acc", "zero_shot_acc"]


def summarize(runs: list[dict], shots: Sequence[int]) -> dict:
    """Runs -> data -> variant -> column: mean and std over seeds."""
    cols = COLUMNS + [f"{k}_shot_acc" for k in shots]
    out: dict[str, dict[str, dict]] = {}
    for data in dict.fromkeys(r["data"] for r in runs):
        out[data] = {}
        for label in dict.fromkeys(r["variant"] for r in runs if r["data"] == data):
            rs = [r for r in runs if r["data"] == data and r["variant"] == label]
            row: dict[str, Any] = {}
            for c in cols:
                vals = [r[c] for r in rs if c in r]
                if vals:
                    row[c] = {"mean": float(np.mean(vals) * 100), "std": float(np.std(vals) * 100), "n": len(vals)}
            fits = [r["fit_seconds"] for r in rs if "fit_seconds" in r]
            row["fit_seconds"] = float(np.mean(fits)) if fits else None
            out[data][label] = row
    return out


def markdown_table(result: dict) -> str:
    """The iCAR results as Markdown tables, one per dataset."""
    shots = result["shots"]
    cols = COLUMNS + [f"{k}_shot_acc" for k in shots]
    heads = ["seen classes (full data)", "held-out 0-shot"] + [f"held-out {k}-shot" for k in shots]
    lines = []
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    lines += [
        f"Backbone `{result['backbone']['name']}` · seeds {result['seeds']} · mean ± std over seeds · "
        f"total {result['seconds']:.0f} s on {result['threads']} threads",
        "",
    ]
    for data, rows in result["summary"].items():
        held = sorted({tuple(r["held_out"]) for r in result["runs"] if r["data"] == data})
        lines += [f"### {data}", "", "Held-out classes per seed: " + "; ".join(", ".join(h) for h in held), ""]
        lines.append("| variant | " + " | ".join(heads) + " | train s |")
        lines.append("|---|" + "---|" * (len(heads) + 1))
        for label, row in rows.items():
            cells = [f"{row[c]['mean']:.1f} ± {row[c]['std']:.1f}" if c in row else "–" for c in cols]
            fit = f"{row['fit_seconds']:.1f}" if row.get("fit_seconds") else "–"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {fit} |")
        lines.append("")
    return "\n".join(lines)


def run_icar_bench(
    backbone: Backbone,
    datasets: Sequence[str] = ("fashion-mnist", "tuxpaint"),
    seeds: Sequence[int] = (1, 2, 3),
    shots: Sequence[int] = (1, 4, 16),
    variants: Sequence[Variant] = tuple(VARIANTS),
    cache: FeatureCache | None = None,
    fmnist_per_class: int = 150,
    fmnist_test_per_class: int = 100,
    n_held: int = 3,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """The iCAR benchmark: tasks per dataset and seed, every variant on each, summarised."""
    cache = cache or FeatureCache()
    t0 = time.perf_counter()
    tux = tuxpaint()["all"]
    enc_tux = Encoded(tux, extract_features(backbone, tux, cache=cache, progress=progress))
    tux_pairs = enc_tux.subset([i for i, it in enumerate(tux.items) if it.text and it.text.strip()])
    runs: list[dict] = []
    for data in datasets:
        if data == "fashion-mnist":
            tasks = fashion_mnist_tasks(
                backbone, seeds, cache, fmnist_per_class, fmnist_test_per_class, n_held, tux_pairs, progress
            )
        elif data == "tuxpaint":
            tasks = tuxpaint_tasks(enc_tux, seeds, n_held, min_held_images=30)
        else:
            raise ValueError(f"icar bench: unknown dataset {data!r} (fashion-mnist, tuxpaint)")
        for task in tasks:
            runs += run_task(backbone, task, variants, shots, cache, dict(options or {}), log)
    return {
        "benchmark": "icar",
        "backbone": backbone.config(),
        "datasets": list(datasets),
        "seeds": list(seeds),
        "shots": list(shots),
        "n_held_out": n_held,
        "fmnist_per_class": fmnist_per_class,
        "fmnist_test_per_class": fmnist_test_per_class,
        "options": dict(options or {}),
        "variants": [{"label": v.label, "options": v.options, "train": v.train, "probe": v.probe} for v in variants],
        "runs": runs,
        "summary": summarize(runs, shots),
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write_icar_results(result: dict, out_dir: str | Path, name: str = "icar") -> tuple[Path, Path]:
    """Write the iCAR benchmark's JSON and Markdown table."""
    from vlclassify.utils import write_json_and_markdown

    return write_json_and_markdown(result, out_dir, name, markdown_table(result))


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
    """Run the benchmark and write `<name>.json` and `<name>.md` under --out."""
    from vlclassify.cli import parse_ints
    from vlclassify.utils import parse_options

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", "-d", default="fashion-mnist,tuxpaint", help="comma-separated: fashion-mnist, tuxpaint")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (each picks its own held-out classes)")
    p.add_argument("--shots", default="1,4,16", help="comma-separated few-shot sizes on the held-out classes")
    p.add_argument("--held-out", type=int, default=3, help="classes held out of training, per dataset and seed")
    p.add_argument("--fmnist-per-class", type=int, default=150, help="Fashion-MNIST training pool per class")
    p.add_argument("--fmnist-test-per-class", type=int, default=100, help="Fashion-MNIST test images per class")
    p.add_argument("--variants", default=None, help="comma-separated row indices (default: all; see VARIANTS)")
    _common(p, "icar")
    a = p.parse_args(argv)
    result = run_icar_bench(
        create_backbone(a.backbone, **parse_options(a.backbone_opt)),
        [d.strip() for d in a.data.split(",")],
        parse_ints(a.seeds, "seeds"),
        parse_ints(a.shots, "shots"),
        [VARIANTS[i] for i in parse_ints(a.variants, "variants")] if a.variants else list(VARIANTS),
        cache=FeatureCache(a.cache_dir),
        fmnist_per_class=a.fmnist_per_class,
        fmnist_test_per_class=a.fmnist_test_per_class,
        n_held=a.held_out,
        options=parse_options(a.opt),
    )
    result["command"] = _command(argv)
    print(markdown_table(result))
    print("wrote {} and {}".format(*write_icar_results(result, a.out, a.name)))


if __name__ == "__main__":
    main()
