"""The few-shot benchmark: methods x shots x seeds under the CoOp protocol, mean ± std.

Features are extracted once per split (the few-shot pools of all shots and seeds together, and
the test set) and every method trains on cached features. Hyper-parameters are chosen by each
method on the few-shot validation set; the test set is only scored. Presets (protocols.py)
change the protocol for the whole table (e.g. `tip-adapter`: the whole val split, short classes
sampled with replacement) and the options of the methods they name.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from .backbones.base import Backbone
from .context import RunContext
from .data import Dataset, plan_splits, stratified_split
from .data.plan import prepare_data
from .errors import DataError
from .features import FeatureCache, extract_features
from .methods import Encoded, create_method
from .metrics import score
from .protocols import Resolved


@dataclass
class MethodSpec:
    """One row of the few-shot table: a registered method with its options."""

    label: str  # row name in the table
    method: str  # registry name
    options: dict[str, Any] = field(default_factory=dict)


def _pools(data_spec: str, test_limit: int | None, presets: Resolved) -> tuple[Dataset, Dataset | None, Dataset | None]:
    splits = prepare_data(data_spec, presets.protocol)
    if "all" in splits:
        return splits["all"], None, None
    train = splits.get("train")
    if train is None:
        raise DataError(f"{data_spec}: no train split")
    test = splits.get("test")
    if test is not None and test_limit and test_limit < len(test):
        test = stratified_split(test, {"keep": test_limit / len(test), "rest": 1 - test_limit / len(test)}, seed=0)[
            "keep"
        ]
    return train, splits.get("val"), test


def run_fewshot(
    backbone: Backbone,
    data_spec: str,
    methods: list[MethodSpec],
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    test_limit: int | None = None,
    cache: FeatureCache | None = None,
    progress: bool = True,
    log=print,
    min_per_class: int | None = None,
    presets: Resolved | None = None,
) -> dict[str, Any]:
    """`presets` (protocols.py `resolve_presets`): their protocol plans every split, their
    options come before each method spec's own."""
    cache = cache or FeatureCache()
    ctx = RunContext(cache=cache, progress=False)
    presets = presets or Resolved()
    pool, val_pool, test = _pools(data_spec, test_limit, presets)
    dropped: list[str] = []
    if min_per_class:
        pool, dropped = drop_small_classes(pool, min_per_class)
        if dropped:
            log(
                f"{pool.name}: dropped {len(dropped)} class(es) with fewer than {min_per_class} images: "
                f"{', '.join(dropped)}"
            )
    options = {m.label: {**presets.options(m.method), **m.options} for m in methods}
    probes = [create_method(m.method, backbone, **options[m.label]) for m in methods]  # validates options early
    views = tuple(dict.fromkeys(v for p in probes for v in p.training_views()))  # "orig" first
    spatial = any("spatial" in p.feature_needs() for p in probes)

    # Every (shots, seed) split, sampled up front so features are extracted once.
    raw = {"train": pool, **({"val": val_pool} if val_pool is not None else {})}  # the test set is handled below
    plans = {}
    for k in shots:
        for s in seeds:
            plan = plan_splits(raw, shots=k, seed=s, protocol=presets.protocol)
            plans[(k, s)] = (plan["train"], plan["val"])

    def encode_rows(ds: Dataset, keys: set[str], tag: str, v: Sequence[str]) -> tuple[Encoded, dict[str, int]]:
        """Features of the items of `ds` whose key is in `keys` (one cache entry), and key -> row."""
        sub = ds.subset([i for i, it in enumerate(ds.items) if it.key in keys], name=f"{ds.name}-{tag}")
        enc = Encoded(sub, extract_features(backbone, sub, views=v, spatial=spatial, cache=cache, progress=progress))
        return enc, {it.key: i for i, it in enumerate(sub.items)}

    if test is None:  # no test split: every pool image not sampled is the test set, per (shots, seed)
        enc_pool, row = encode_rows(pool, {it.key for it in pool.items}, "all", views)
        enc_val, vrow = enc_pool, row
    else:
        enc_pool, row = encode_rows(
            pool,
            {it.key for tr, va in plans.values() for it in tr.items + (va.items if val_pool is None else [])},
            "fewshot",
            views,
        )
        enc_val, vrow = (
            (enc_pool, row)
            if val_pool is None
            else encode_rows(
                val_pool, {it.key for _, va in plans.values() for it in va.items}, "fewshot-val", ("orig",)
            )
        )
        enc_test = Encoded(test, extract_features(backbone, test, spatial=spatial, cache=cache, progress=progress))

    runs = []
    for (k, s), (tr, va) in plans.items():
        etr = enc_pool.subset([row[it.key] for it in tr.items])
        eva = enc_val.subset([vrow[it.key] for it in va.items])
        if test is None:
            used = {it.key for it in tr.items + va.items}
            ete = enc_pool.subset([i for i, it in enumerate(enc_pool.dataset.items) if it.key not in used])
        else:
            ete = enc_test
        for spec in methods:
            m = create_method(spec.method, backbone, **options[spec.label])
            t0 = time.perf_counter()
            m.fit(etr, eva, ctx=ctx)
            fit_s = time.perf_counter() - t0
            acc = score("single-label", ete.dataset.labels(), m.predict_proba(ete, ctx=ctx))["accuracy"]
            runs.append(
                {
                    "method": spec.label,
                    "shots": k,
                    "seed": s,
                    "test_accuracy": acc,
                    "fit_seconds": fit_s,
                    "n_train": len(etr),
                    "n_val": len(eva),
                    "n_test": len(ete),
                    "fit_info": m.fit_info,
                }
            )
            log(f"shots={k:<2} seed={s} {spec.label:<28} acc={100 * acc:6.2f}  fit {fit_s:6.2f}s")
    return {
        "data": data_spec,
        "backbone": backbone.config(),
        "shots": list(shots),
        "seeds": list(seeds),
        "methods": [m.__dict__ for m in methods],
        "presets": presets.record([m.method for m in methods]) if presets.presets else None,
        "test_limit": test_limit,
        "min_per_class": min_per_class,
        "dropped_classes": dropped,
        "classes": list(pool.classnames),
        "environment": {"python": sys.version.split()[0], "platform": platform.platform()},
        "runs": runs,
        "summary": summarize(runs),
    }


def parse_method_specs(text: str) -> list[MethodSpec]:
    """`zero-shot,linear-probe,cmm[no_triplet=true]` -> MethodSpecs (options in brackets, `;`-separated)."""
    from .utils import parse_options

    specs, depth, cur = [], 0, ""
    for ch in text + ",":
        if ch == "," and depth == 0:
            if cur.strip():
                specs.append(cur.strip())
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    out = []
    for s in specs:
        name, _, rest = s.partition("[")
        if rest and not rest.endswith("]"):
            raise DataError(f"method spec {s!r}: options must be in brackets, e.g. cmm[alpha=1.0;steps=500]")
        out.append(MethodSpec(label=s, method=name, options=parse_options(rest[:-1].split(";")) if rest else {}))
    return out


def drop_small_classes(ds: Dataset, min_count: int) -> tuple[Dataset, list[str]]:
    """Keep the classes with at least `min_count` images (labels re-indexed); -> (dataset, dropped names)."""
    import dataclasses

    if ds.multilabel:
        raise DataError(f"{ds.name}: min_per_class applies to single-label data only")
    counts = np.bincount(ds.labels(), minlength=ds.num_classes)
    keep = [c for c in range(ds.num_classes) if counts[c] >= min_count]
    dropped = [ds.classnames[c] for c in range(ds.num_classes) if counts[c] < min_count]
    if len(keep) < 2:
        raise DataError(
            f"{ds.name}: fewer than 2 classes have {min_count} images "
            f"(counts: {dict(zip(ds.classnames, counts.tolist()))})"
        )
    new = {c: i for i, c in enumerate(keep)}
    sub = ds.subset([i for i, it in enumerate(ds.items) if it.label in new])  # keeps precomputed features aligned
    # every item of `sub` has a kept label (filtered above)
    items = [dataclasses.replace(it, label=new[cast(int, it.label)], tasks=None) for it in sub.items]
    # the other tasks' indices would no longer match: the filtered set keeps the main task only
    return dataclasses.replace(sub, items=items, classnames=[ds.classnames[c] for c in keep], tasks={}), dropped


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Runs -> method -> shots -> mean and std of test accuracy and fit time over seeds."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}  # method -> shots -> acc / fit values
    for r in runs:
        cell = out.setdefault(r["method"], {}).setdefault(str(r["shots"]), {"acc": [], "fit": []})
        cell["acc"].append(r["test_accuracy"])
        cell["fit"].append(r["fit_seconds"])
    return {
        m: {
            k: {
                "mean": float(np.mean(v["acc"]) * 100),
                "std": float(np.std(v["acc"]) * 100),
                "fit_seconds": float(np.mean(v["fit"])),
                "n_seeds": len(v["acc"]),
            }
            for k, v in d.items()
        }
        for m, d in out.items()
    }


def markdown_table(result: dict, command: str | None = None) -> str:
    """The few-shot results as a Markdown table (mean ± std per method and shot count)."""
    shots = [str(k) for k in result["shots"]]
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Data: `{result['data']}` · backbone: `{result['backbone']['name']}` · seeds {result['seeds']}"
        + (f" · test limited to {result['test_limit']} images" if result.get("test_limit") else "")
        + (
            f" · classes with fewer than {result['min_per_class']} images dropped: "
            f"{', '.join(result['dropped_classes'])}"
            if result.get("dropped_classes")
            else ""
        ),
        "",
    ]
    lines.append("| method | " + " | ".join(f"{k}-shot" for k in shots) + " | fit s (mean) |")
    lines.append("|---|" + "---|" * (len(shots) + 1))
    for m, d in result["summary"].items():
        cells = [f"{d[k]['mean']:.1f} ± {d[k]['std']:.1f}" if k in d else "–" for k in shots]
        fit = np.mean([d[k]["fit_seconds"] for k in shots if k in d])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fit:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: str | Path, name: str, command: str | None = None) -> tuple[Path, Path]:
    """Write the few-shot benchmark's JSON and Markdown table."""
    from .utils import write_json_and_markdown

    if command:
        result = {**result, "command": command}
    return write_json_and_markdown(result, out_dir, name, markdown_table(result, command))
