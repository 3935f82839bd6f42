"""The CMA-CLIP benchmark: k-fold cross-validation on image+text data with several tasks.

    python benchmarks/studies/cma.py --opt e2e_epochs=1 --opt tune_epochs=5   # docs/results/cma-tuxpaint.*

Rows: image-only and text-only linear probes (`linear-probe` on the joint-space image embedding /
the paired-text embedding), zero-shot image+text (`zero-shot[modality=both]`, the class names as
words), CMA-CLIP, CMA-CLIP without
modality attention (MA), without MA and sequence attention (SA), optionally CMA-CLIP trained with
modality noise; then the noisy-modality rows (text emptied / replaced by an unrelated caption,
image replaced by noise / an unrelated image) for the CMA-CLIP variants. Per task: accuracy and
recall at 90% precision (metrics.ranking), mean ± std over folds, and the mean image weight λ.
Inside every training fold, 20% (stratified) is held out as validation: it picks the probes'
regularisation and each CMA-CLIP stage's best epoch; the test fold is only scored.
The trunk activations of the whole pool are computed once and shared by all folds and variants.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from vlclassify.backbones import create_backbone
from vlclassify.backbones.base import Backbone
from vlclassify.context import RunContext
from vlclassify.data import Dataset, Item, kfold, load_data, stratified_split
from vlclassify.errors import DataError
from vlclassify.features import FeatureCache, FeatureSet, extract_features
from vlclassify.features.trunk import TrunkSet
from vlclassify.methods import Encoded, create_method
from vlclassify.methods.cma_clip import CMAClip
from vlclassify.metrics import recall_at_precision, score
from vlclassify.utils import parse_options

VARIANTS: dict[str, dict[str, Any]] = {  # label -> CMA-CLIP options
    "CMA-CLIP": {},
    "CMA-CLIP w/o MA": {"modality_attention": False},
    "CMA-CLIP w/o MA and SA": {"modality_attention": False, "sequence_attention": False},
    "CMA-CLIP w/o SA": {"sequence_attention": False},
    "CMA-CLIP + modality-noise training": {"modality_noise": 0.3},
    "CMA-CLIP w/o SA + modality-noise training": {"sequence_attention": False, "modality_noise": 0.3},
}
NOISES = ("text emptied", "text unrelated", "image noise", "image unrelated")


def _pool(data: str) -> Dataset:
    raw = load_data(data)
    if "all" in raw:
        return raw["all"]
    parts = [raw[k] for k in ("train", "val", "test") if k in raw]
    first = parts[0]
    return Dataset(
        items=[it for p in parts for it in p.items],
        classnames=first.classnames,
        name=first.name,
        tasks=first.tasks,
        source=first.source,
    )


def _scores(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {**score("single-label", y, probs), "recall@90P": recall_at_precision(y, probs, 0.9)["recall"]}


def _as_task(ds: Dataset, feats: FeatureSet, task: str, rows: np.ndarray, classes: list[str]) -> Encoded:
    """Rows of `ds` whose main label is task `task`'s, among `classes` (-1 outside them)."""
    names = ds.tasks[task]
    pos = {c: i for i, c in enumerate(classes)}
    y = ds.task_labels(task)
    items = [replace(ds.items[i], label=pos.get(names[y[i]], -1) if y[i] >= 0 else None) for i in rows]
    return Encoded(Dataset(items=items, classnames=list(classes), name=f"{ds.name}-{task}"), feats.index(rows))


def _probe(backbone, ds, feats, task: str, feature: str, tr, va, te, ctx: RunContext) -> np.ndarray:
    """`linear-probe` on `feature`, C chosen on validation -> test probs [N, C] over all the task's
    classes (classes absent from the fold's training rows score 0)."""
    y = ds.task_labels(task)
    seen = sorted(set(y[tr][y[tr] >= 0].tolist()))
    classes = [ds.tasks[task][c] for c in seen]
    m = create_method("linear-probe", backbone, feature=feature)
    m.fit(_as_task(ds, feats, task, tr[y[tr] >= 0], classes), _as_task(ds, feats, task, va, classes), ctx=ctx)
    probs = np.zeros((len(te), len(ds.tasks[task])))
    probs[:, seen] = m.predict_proba(_as_task(ds, feats, task, te, classes), ctx=ctx)
    return probs


def _predict(m, enc: Encoded, ctx: RunContext) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A fitted CMA-CLIP's scores and image weights lambda per task column of `enc`."""
    out = m.outputs(enc, ctx=ctx)
    logits = [out["logits"], *out["task_logits"].values()]
    lam = out["modality_weights"].numpy()
    probs = {t: torch.softmax(z.float(), -1).numpy() for t, z in zip(m.task_columns, logits)}
    return probs, {t: lam[:, k] for k, t in enumerate(m.task_columns)}


def _display(name: str) -> str:
    """'animals/birds' -> 'birds', 'naturalforces' -> 'natural forces', 'body_parts' -> 'body parts'."""
    last = name.split("/")[-1].replace("_", " ")
    return {
        "naturalforces": "natural forces",
        "arttools": "art tools",
        "newyears": "new years",
        "masstransit": "mass transit",
        "roadsigns": "road signs",
    }.get(last, last)


def _noisy(t: TrunkSet, kind: str, labels0: np.ndarray, noise: TrunkSet, rng: np.random.Generator) -> TrunkSet:
    """A copy of `t` with one modality broken for every row."""
    n = len(t)
    out = TrunkSet(t.image.clone(), t.text.clone(), t.text_mask.clone(), t.has_image.clone(), t.has_text.clone())
    # "unrelated": the partner row is one of another main-task class
    partner = np.array([rng.choice(np.nonzero(labels0 != labels0[i])[0]) for i in range(n)])
    if kind == "text emptied":
        out.text.zero_()
        out.text_mask.zero_()
        out.has_text.zero_()
    elif kind == "text unrelated":
        out.text, out.text_mask, out.has_text = t.text[partner], t.text_mask[partner], t.has_text[partner]
    elif kind == "image noise":
        pick = torch.as_tensor(np.arange(n) % len(noise))
        out.image, out.has_image = noise.image[pick], torch.ones(n, dtype=torch.bool)
    elif kind == "image unrelated":
        out.image, out.has_image = t.image[partner], t.has_image[partner]
    keep = out.has_image | out.has_text  # a row left with nothing (no text and text emptied) keeps its image
    out.has_image = out.has_image | ~keep
    return out


DEFAULT_VARIANTS = [v for v in VARIANTS if v != "CMA-CLIP + modality-noise training"]  # keeps 5 folds in ~15 min


def run_cma_bench(
    backbone: Backbone,
    data: str = "tuxpaint",
    folds: int = 5,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    variants: Sequence[str] | None = None,
    fold_limit: int | None = None,
    cache: FeatureCache | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark; returns a JSON-able dict (rows x tasks x metrics, per fold and mean ± std)."""
    t_start = time.time()
    cache = cache or FeatureCache()
    ctx = RunContext(cache=cache, progress=False)
    options = dict(options or {})
    ds = _pool(data)
    task_list = list(tasks) if tasks else list(ds.tasks)
    if not task_list:
        raise DataError(f"{data}: no task columns; the CMA-CLIP benchmark needs at least one task")
    options["tasks"] = task_list
    variants = list(variants) if variants else list(DEFAULT_VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise DataError(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    Y = {t: ds.task_labels(t) for t in task_list}
    log(f"{data}: {len(ds)} items, tasks " + ", ".join(f"{t} ({len(ds.tasks[t])})" for t in task_list))

    # shared, computed once: trunk activations of the pool, noise images, global embeddings
    probe_m = cast(CMAClip, create_method("cma-clip", backbone, **options))
    t0 = time.time()
    with probe_m.using(ctx):
        trunk = probe_m.trunk(ds)
    rng = np.random.default_rng(seed)
    noise_items = [
        Item(image=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), key=f"noise-{seed}-{i}", text="x")
        for i in range(32)
    ]
    noise_ds = Dataset(items=noise_items, classnames=["noise"], name="noise-images")
    with probe_m.using(ctx):
        noise = probe_m.trunk(noise_ds)
    feats = extract_features(backbone, ds, cache=cache)  # joint-space image + paired-text embeddings
    prep_s = time.time() - t0
    log(f"shared features ready in {prep_s:.0f}s")

    labels0 = Y[task_list[0]]
    per_fold: list[dict] = []
    fit_seconds: dict[str, list[float]] = {}
    splits = kfold(ds, folds, seed)[: fold_limit or folds]
    for f, (tr_idx, te_idx) in enumerate(splits):
        train_pool = ds.subset(tr_idx)
        parts = stratified_split(train_pool, {"train": 0.8, "val": 0.2}, seed + f)
        key_to_idx = {it.key: i for i, it in enumerate(ds.items)}
        tr = np.array([key_to_idx[it.key] for it in parts["train"].items])
        va = np.array([key_to_idx[it.key] for it in parts["val"].items])
        te = np.asarray(te_idx)
        rows: dict[str, dict] = {}
        for t in task_list:
            for row, feature in (("image-only (linear probe)", "image"), ("text-only (linear probe)", "text")):
                probs = _probe(backbone, ds, feats, t, feature, tr, va, te, ctx)
                rows.setdefault(row, {})[t] = _scores(Y[t][te], probs)
            names = [_display(c) for c in ds.tasks[t]]
            zs = create_method("zero-shot", backbone, modality="both")
            zs.fit(_as_task(ds, feats, t, tr, names), ctx=ctx)
            rows.setdefault("zero-shot image+text", {})[t] = _scores(
                Y[t][te], zs.predict_proba(_as_task(ds, feats, t, te, names), ctx=ctx)
            )
        test_ds = ds.subset(te)
        te_trunk = trunk.index(te)
        noise_rng = np.random.default_rng(seed * 1000 + f)
        noisy_sets = {k: _noisy(te_trunk, k, labels0[te], noise, noise_rng) for k in NOISES}
        for v in variants:
            m = cast(
                CMAClip,
                create_method("cma-clip", backbone, **{**options, **VARIANTS[v], "seed": seed + f}),
            )
            m.provide_trunk(ds, trunk)
            t1 = time.time()
            m.fit(parts["train"], parts["val"], ctx=ctx)
            fit_seconds.setdefault(v, []).append(time.time() - t1)
            for key, t_set in ((v, te_trunk), *((f"{v}, {k}", nt) for k, nt in noisy_sets.items())):
                # Encoded.features is annotated FeatureSet; CMA-CLIP reads a TrunkSet from it
                task_probs, lam = _predict(m, Encoded(test_ds, t_set), ctx)
                rows[key] = {t: {**_scores(Y[t][te], task_probs[t]), "lambda": float(lam[t].mean())} for t in task_list}
            log(
                f"fold {f + 1}/{len(splits)} {v}: "
                + ", ".join(
                    f"{t} acc {100 * rows[v][t]['accuracy']:.1f} R@90P {100 * rows[v][t]['recall@90P']:.1f} "
                    f"λ {rows[v][t]['lambda']:.2f}"
                    for t in task_list
                )
                + f" ({fit_seconds[v][-1]:.0f}s)"
            )
        per_fold.append(rows)

    summary: dict[str, dict] = {}
    for row in per_fold[0]:
        summary[row] = {}
        for t in task_list:
            summary[row][t] = {}
            for metric in per_fold[0][row][t]:
                vals = np.array([fr[row][t][metric] for fr in per_fold], dtype=np.float64)
                summary[row][t][metric] = {
                    "mean": float(np.nanmean(vals)),
                    "std": float(np.nanstd(vals)),
                    "folds": vals.tolist(),
                }
    return {
        "benchmark": "cma",
        "data": data,
        "n_items": len(ds),
        "tasks": {t: len(ds.tasks[t]) for t in task_list},
        "folds": len(splits),
        "seed": seed,
        "backbone": backbone.config(),
        "options": options,
        "variants": {v: VARIANTS[v] for v in variants},
        "rows": summary,
        "fit_seconds_mean": {v: float(np.mean(s)) for v, s in fit_seconds.items()},
        "prep_seconds": prep_s,
        "total_seconds": time.time() - t_start,
        "platform": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


def _cell(m: dict, metric: str) -> str:
    return f"{100 * m[metric]['mean']:.1f} ± {100 * m[metric]['std']:.1f}"


def markdown_table(result: dict) -> str:
    """The clean-data table (every row) and the robustness table (CMA-CLIP variants x noises)."""
    tasks = list(result["tasks"])
    rows = result["rows"]
    head = "| method | " + " | ".join(f"{t} acc | {t} R@90P | {t} λ" for t in tasks) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(tasks)]
    for row, per_task in rows.items():
        if any(row.endswith(", " + k) for k in NOISES):
            continue
        cells = []
        for t in tasks:
            m = per_task[t]
            cells += [
                _cell(m, "accuracy"),
                _cell(m, "recall@90P"),
                f"{m['lambda']['mean']:.2f}" if "lambda" in m else "–",
            ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    variants = [v for v in result["variants"] if f"{v}, {NOISES[0]}" in rows]
    if variants:
        lines += [
            "",
            f"Robustness: {tasks[0]} accuracy (%) and mean image weight λ of the {tasks[0]} head, with one "
            "modality broken on every test row"
            + (f"; {tasks[1]} accuracy in brackets" if len(tasks) > 1 else "")
            + ".",
            "",
            "| method | clean | " + " | ".join(NOISES) + " |",
            "|---|" + "---|" * (len(NOISES) + 1),
        ]
        for v in variants:
            cells = []
            for key in [v] + [f"{v}, {k}" for k in NOISES]:
                m = rows[key]
                c = f"{100 * m[tasks[0]]['accuracy']['mean']:.1f} (λ {m[tasks[0]]['lambda']['mean']:.2f})"
                if len(tasks) > 1:
                    c += f" [{100 * m[tasks[1]]['accuracy']['mean']:.1f}]"
                cells.append(c)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(result: dict, out_dir, stem: str, command: str) -> tuple[Any, Any]:
    """Write the CMA-CLIP benchmark's JSON and Markdown table (the command recorded beside them)."""
    from vlclassify.utils import write_json_and_markdown

    result = {**result, "command": command}
    text = (
        f"# CMA-CLIP benchmark: {result['data']}, {result['folds']}-fold cross-validation\n\n"
        f"Command: `{command}`\n\n"
        f"Accuracy and recall at 90% precision (%, mean ± std over folds); λ = mean image weight of the "
        f"task's modality attention on the test folds. Total time {result['total_seconds']:.0f}s "
        f"(shared features {result['prep_seconds']:.0f}s).\n\n" + markdown_table(result) + "\n"
    )
    return write_json_and_markdown(result, out_dir, stem, text)


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", "-d", default="tuxpaint", help="data spec with image, text and task columns")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    p.add_argument("--seed", type=int, default=0, help="seed for folds, validation carving and training")
    p.add_argument("--tasks", default=None, help="comma-separated task columns (default: all)")
    p.add_argument("--variants", default=None, help=f"comma-separated CMA-CLIP rows (default: all of {list(VARIANTS)})")
    p.add_argument("--fold-limit", type=int, default=None, help="run only the first N folds (quick checks)")
    _common(p, None)
    a = p.parse_args(argv)
    from vlclassify.features import FeatureCache

    result = run_cma_bench(
        create_backbone(a.backbone, **parse_options(a.backbone_opt)),
        a.data,
        folds=a.folds,
        seed=a.seed,
        tasks=a.tasks.split(",") if a.tasks else None,
        options=parse_options(a.opt),
        variants=a.variants.split(",") if a.variants else None,
        fold_limit=a.fold_limit,
        cache=FeatureCache(a.cache_dir),
    )
    stem = a.name or "cma-" + "".join(
        c if c.isalnum() or c in "-_" else "-" for c in a.data.split("?")[0].strip("/").split("/")[-1]
    )
    print(markdown_table(result))
    print("wrote {} and {}".format(*write_results(result, a.out, stem, _command(argv))))


if __name__ == "__main__":
    main()
