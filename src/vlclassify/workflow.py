"""The library workflow: `fit`, `evaluate` and `predict` as functions, which the CLI only parses for
and prints.

    result = fit("photos/", "linear-probe", backbone=create_backbone("effnet-minilm"))
    result.save("model/")                       # config.json + model.safetensors, split.json, fit.json
    data, spec = eval_data("model/")            # the fit's own test items (split.json)
    report = evaluate(load_method("model/"), data, spec=spec)   # with its decision rule: one report
    report.save("model/eval-test.json")         # + predictions-test.csv beside it
    for r in predict(load_method("model/"), ["a.jpg", "b.jpg"]):
        print(r.labels, r.scores)

What a fit records (fit.json), how its splits are planned again at evaluation, which numbers a
report headlines and what validation scores are kept are decided here, once. Validation images are
encoded once per fit: the encoded set goes to `Method.fit` and the headline scores are read from it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .context import RunContext
from .data.items import Dataset, Item
from .errors import DataError
from .methods.decision import Prediction
from .methods.tags import MULTI, SINGLE, TASKS, TEXT
from .metrics.openset import KEEP

if TYPE_CHECKING:  # the methods import torch; `predict` with an ONNX export (onnx_predict.py) must not
    from .methods.base import Encoded, Method

Log = Callable[[str], None]


def _quiet(_line: str) -> None:
    """The default `log`: a library call prints nothing."""


def _warn(line: str) -> None:
    """The default `note`: a library user sees notes as warnings."""
    warnings.warn(line, stacklevel=3)


def absolute_spec(spec: str) -> str:
    """A data spec whose path is absolute (fit.json then works from any directory); built-ins unchanged."""
    base, sep, query = spec.partition("?")
    p = Path(base)
    return str(p.resolve()) + sep + query if p.exists() else spec


def validation_scores(m: Method, val: Dataset | Encoded, ctx: RunContext | None = None) -> dict[str, float]:
    """Headline validation numbers (metrics.score): accuracy, or mAP and micro-F1 (multi-label)."""
    from .methods.base import Encoded
    from .metrics import score

    ds = val.dataset if isinstance(val, Encoded) else val
    probs = m.predict_proba(val, ctx=ctx)
    if m.multilabel:
        return score(MULTI, ds.multi_hot(), probs, thresholds=m.decision().thresholds)
    return score(SINGLE, ds.labels(), probs)


# ---- fit ----------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """A fitted model with what its fit used and found: `info` is what fit.json records."""

    model: Method
    splits: Mapping[str, Dataset]  # train / val (/ test) as planned; empty for a fit by class names
    validation: dict[str, float]  # headline validation scores (empty without validation images)
    info: dict[str, Any]
    data: str | None = None  # the data spec, absolute

    def save(self, out: str | Path) -> Path:
        """Write the model folder whole (temp folder, then rename): the model, split.json, fit.json."""
        from .data import write_split_file
        from .utils import atomic_path, write_json

        out = Path(out).resolve()
        with atomic_path(out, is_dir=True) as tmp:
            self.model.save_pretrained(tmp)
            if self.splits and self.data is not None:
                write_split_file(tmp / "split.json", self.splits, self.data)
            write_json(tmp / "fit.json", self.info)
        return out


def _split_warnings(splits: Mapping[str, Dataset], shots: int | None) -> list[str]:
    """An empty val or test split, and why (K-shot sampling takes K + min(K, 4) images per class)."""
    train = splits["train"]
    sizes: dict[str, int] = {}
    for ds in splits.values():
        for i in range(len(ds)):
            for c in _true(ds, i):
                name = ds.classnames[c]
                sizes[name] = sizes.get(name, 0) + 1
    out = []
    for name in ("val", "test"):
        if name in splits and not len(splits[name]):
            why = ""
            if shots:
                why = (
                    f"; --shots {shots} takes {shots} training and up to {min(shots, 4)} validation images per "
                    f"class, and the largest class has {max(sizes.values(), default=0)}"
                )
            out.append(f"no images are left for {name} ({len(train)} train){why}")
    return out


def fit(
    data: str | Mapping[str, Dataset] | Dataset | None,
    method: str | Method,
    *,
    backbone: Any = None,
    options: Mapping[str, Any] | None = None,
    classes: Sequence[str] = (),
    descriptions: Mapping[str, str] | None = None,
    shots: int | None = None,
    seed: int | None = None,
    preset: str | None = None,
    precision: float | None = None,
    thresholds: str = "per-class",
    keep: float = KEEP,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_file: str | Path | None = None,
    ctx: RunContext | None = None,
    record: Mapping[str, Any] | None = None,
    log: Log = _quiet,
    note: Log = _warn,
) -> FitResult:
    """Plan the splits of `data` (a data spec, a dict of splits, or one Dataset to split), fit
    `method` (a name, built on `backbone` with the preset's and `options`, or a Method), choose its
    decision rule on validation and score it there, and say what fit.json records.

    `data` None fits a names-only method (`tags.names_only`) on `classes`. `record` adds fields to
    fit.json (the CLI's command line and the spec as typed); `log` gets progress lines, `note`
    notes and warnings (default: `warnings.warn`)."""
    from .protocols import resolve_presets

    spec = absolute_spec(data) if isinstance(data, str) else None
    name = method if isinstance(method, str) else method.name
    presets = resolve_presets(preset, spec)
    seed = seed if seed is not None else (presets.seeds or (1,))[0]
    for line in presets.log(spec, [name]):
        log(line)
    if isinstance(method, str):
        from .methods import create_method

        method = create_method(method, backbone, **{**presets.options(method), **dict(options or {})})
    m, ctx = method, ctx or RunContext()
    splits: Mapping[str, Dataset] = {}
    validation: dict[str, float] = {}
    if data is None:
        if not type(m).tags.names_only:
            raise DataError(f"fit: {name} learns from images; give data (names alone make a zero-shot model)")
        with m.using(ctx):
            cast(Any, m).set_classes(list(classes), dict(descriptions or {}))  # what `names_only` declares
        log(f"{name}: {len(classes)} classes by name, no images")
    else:
        splits = _plan(data, spec, shots, seed, val_fraction, test_fraction, split_file, presets.protocol)
        train = splits["train"]
        if classes and list(classes) != train.classnames:
            raise DataError(f"classes {list(classes)[:5]}... do not match the data's classes {train.classnames[:5]}...")
        m.check_data(train)  # a kind the method does not take stops here, before any extraction
        log(f"fit {name} on {spec or train.name}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
        for line in _split_warnings(splits, shots):
            note(f"warning: {line}")
        if descriptions and type(m).tags.names_only:
            cast(Any, m).descriptions = dict(descriptions)  # the class names' descriptions, as set_classes takes
        val = splits.get("val")
        va = m.encode(val, ctx=ctx) if val is not None and len(val) else None  # encoded once: fit and scores read it
        m.fit(train, va, ctx=ctx, precision=precision, thresholds=thresholds, keep=keep)
        validation = validation_scores(m, va, ctx) if va is not None else {}
    for line in m.fit_info.get("ignored", []):
        note(f"note: {line}")
    if presets.presets:
        m.fit_info["preset"] = presets.record([name])  # config.json records it with the fit
    plan: dict[str, Any] = {"shots": shots, "seed": seed, "split_file": str(split_file) if split_file else None}
    plan |= {"val_fraction": val_fraction, "test_fraction": test_fraction}
    info = _fit_json(m, spec, list(classes), plan, presets.record([name]) if presets.presets else None, splits)
    info = {**info, **dict(record or {})} | ({"validation": validation} if validation else {})
    return FitResult(m, splits, validation, info, spec)


def _plan(data, spec, shots, seed, val_fraction, test_fraction, split_file, protocol) -> Mapping[str, Dataset]:
    """The fit's splits: of a data spec (`spec`), a dict of splits, or one Dataset (split like "all")."""
    from .data import plan_splits

    given = {"all": data} if isinstance(data, Dataset) else data
    return plan_splits(spec or given, shots, seed, val_fraction, test_fraction, split_file, protocol)


def _fit_json(m: Method, spec, classes, plan: dict, preset, splits) -> dict[str, Any]:
    """What fit.json records about a fit (the workflow's caller adds its command line)."""
    return {
        "method": m.name,
        "data": spec,
        "classes": classes or None,
        **plan,
        "preset": preset,
        "sizes": {k: len(v) for k, v in splits.items()},
        "decisions": {t: r.describe() for t, r in m.decisions.items()},
        "fit_info": m.fit_info,
    }


def update(
    model: Method,
    model_dir: str | Path,
    data: str | None = None,
    *,
    classes: Sequence[str] = (),
    descriptions: Mapping[str, str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 1,
    ctx: RunContext | None = None,
    record: Mapping[str, Any] | None = None,
) -> FitResult:
    """Add `data`'s examples and `classes` to `model` (loaded from `model_dir`), refitting methods
    that cannot add; its fit.json carries over with what the update did."""
    import time

    from .data import plan_splits
    from .utils import read_json

    model_dir = Path(model_dir)
    splits = plan_splits(absolute_spec(data), None, seed, val_fraction, 0.0) if data else {}
    t0 = time.perf_counter()
    train, val = splits.get("train"), splits.get("val")
    model.update(train, val, classes=classes, descriptions=dict(descriptions or {}), ctx=ctx)
    seconds = time.perf_counter() - t0
    old = read_json(model_dir / "fit.json") if (model_dir / "fit.json").exists() else {}
    info = {
        **old,
        "data": None,
        **dict(record or {}),
        "updated_from": str(model_dir.resolve()),
        "update": model.fit_info["update"],
        "update_seconds": round(seconds, 3),
        "update_data": absolute_spec(data) if data else None,
        "decisions": {t: r.describe() for t, r in model.decisions.items()},
        "fit_info": model.fit_info,
    }
    return FitResult(model, {}, {}, info)


# ---- evaluate -----------------------------------------------------------------------------------
HEADLINE = {
    SINGLE: ("n", "top1", "top5", "mean_per_class_accuracy", "macro_f1"),
    MULTI: (
        "n",
        "subset_accuracy",
        "label_accuracy",
        "micro_f1",
        "macro_f1",
        "macro_mAP",
        "micro_mAP",
        "macro_roc_auc",
    ),
}


@dataclass
class Report:
    """One evaluation: every metric (`metrics`, the eval JSON), the ones to headline (`headline`),
    and each item's prediction."""

    metrics: dict[str, Any]
    headline: tuple[str, ...]
    predictions: list[Prediction]
    truth: list[str]  # each item's true label(s) of the main task, ";"-joined
    dataset: Dataset
    probs: np.ndarray  # [N, C] main-task scores
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # multi-task models: per task
    task_probs: dict[str, np.ndarray] = field(default_factory=dict)  # models of several tasks: {task: [N, C_t]}

    def save(self, path: str | Path) -> list[Path]:
        """The metrics JSON at `path` and `predictions-<split>.csv` beside it."""
        from .utils import write_json

        path = Path(path)
        write_json(path, self.metrics)
        csv_path = path.with_name(f"predictions-{self.metrics['split']}.csv")
        write_predictions_csv(csv_path, self.predictions, self.truth)
        return [path, csv_path]


def rows_of(data: str, split: str) -> Dataset:
    """The rows of `data` for `split`: a file without splits gives all of its rows; `all` joins every split."""
    from .data import load_data

    raw = load_data(data)
    if split in raw:
        return raw[split]
    if "all" in raw and split in ("test", "all"):
        return raw["all"]
    if split == "all":
        first = next(iter(raw.values()))
        return dataclasses.replace(first, items=[it for ds in raw.values() for it in ds.items])
    raise DataError(f"{data}: no {split!r} split (have: {', '.join(raw)}, all)")


def eval_data(model_dir: str | Path, data: str | None = None, split: str = "test") -> tuple[Dataset, str]:
    """The items to evaluate a saved model on, and the spec: the fit's own `split` (its split.json,
    or the splits planned again from fit.json) on the data it was fitted on, else every row of
    `data` for `split`."""
    from .data import plan_splits
    from .data.plan import DEFAULT, Protocol
    from .utils import read_json

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"{model_dir}: no such model folder")
    info = read_json(model_dir / "fit.json") if (model_dir / "fit.json").exists() else {}
    fitted_on = info.get("data")
    spec = absolute_spec(data) if data else fitted_on
    if not spec:
        raise DataError(f"{model_dir}: no data to evaluate on (no fit.json, or a model fitted by name); pass --data")
    if spec != fitted_on or split == "all":
        ds = rows_of(spec, split)
    else:
        own = model_dir / "split.json"
        protocol = (info.get("preset") or {}).get("protocol")
        splits = plan_splits(
            spec,
            info.get("shots"),
            info.get("seed", 1),
            info.get("val_fraction", 0.2),
            info.get("test_fraction", 0.2),
            own if own.exists() else None,
            Protocol(**protocol) if protocol else DEFAULT,
        )
        if split not in splits:
            raise DataError(f"{spec}: no {split!r} split (have: {', '.join(splits)}, all)")
        ds = splits[split]
        was = (info.get("sizes") or {}).get(split)
        if was is not None and was != len(ds):  # files removed or added since the fit: say so, never score quietly
            warnings.warn(
                f"{spec}: the {split} split has {len(ds)} image(s), {was} at fit time: the data changed since",
                stacklevel=2,
            )
    if not len(ds):
        raise DataError(f"{spec}: the {split!r} split is empty (too few images per class for this split)")
    return ds, spec


def task_report(m: Method, enc: Encoded, ctx: RunContext | None = None) -> dict[str, dict[str, Any]]:
    """Per task a multi-task model answers: n, accuracy, recall at 90% precision and its threshold,
    the mean image weight λ (models that weigh modalities), and rows missing an image or a text."""
    from .metrics import recall_at_precision, score

    probs = m.task_probs(enc, ctx=ctx)
    lam = m.outputs(enc, ctx=ctx).get("modality_weights")  # [N, K]
    items = enc.dataset.items
    out = {}
    for k, (task, p) in enumerate(probs.items()):
        y = np.asarray(m.task_targets(enc.dataset, task))
        rap = recall_at_precision(y, p, 0.9)
        out[m.task_name(task)] = {
            "n": int((y >= 0).sum()),
            "accuracy": score(SINGLE, y, p)["accuracy"],
            "recall@90P": rap["recall"],
            "threshold@90P": rap["threshold"],
            **({"lambda": float(lam[:, k].mean())} if lam is not None else {}),
            "missing_image": sum(it.image is None for it in items),
            "missing_text": sum(not (it.text or "").strip() for it in items),
        }
    return out


def evaluate(
    model: Method,
    data: Dataset,
    *,
    split: str = "test",
    spec: str | None = None,
    ctx: RunContext | None = None,
    top: int = 3,
    unknown: Dataset | None = None,
    reliability: str | Path | None = None,
) -> Report:
    """Score `model` on `data` with its decision rule: one report (single-label: top-1/top-5,
    per-class accuracy, macro-F1, confusion matrix, the answered share at a target precision;
    multi-label: subset accuracy, per-label P/R/F1, mAP, ROC-AUC; multi-task: per task), and
    its scores' calibration (trust/report.py; the reliability diagram at `reliability`); with
    `unknown` (images of no known class) how well each open-set score tells them apart."""
    from .metrics import classification_report, multilabel_report
    from .trust.report import trust_report

    if data.classnames != model.classnames:
        extra = [c for c in data.classnames if c not in model.classnames]
        if extra:
            raise DataError(
                f"{spec or data.name}: class(es) {', '.join(extra[:5])} are not among the model's "
                f"({', '.join(model.classnames[:8])}{', ...' if len(model.classnames) > 8 else ''})"
            )
        data = data.with_classes(model.classnames)  # a subset (or another order) of the model's classes
    enc = model.encode(data, ctx=ctx)  # encoded once: every score below reads it
    probs = model.predict_proba(enc, ctx=ctx)
    predictions = model.predict_results(enc, top=top, ctx=ctx)
    tasks = task_report(model, enc, ctx) if TASKS in model.takes() else {}
    task_probs = model.task_probs(enc, ctx=ctx) if len(model.task_classes) > 1 else {}
    ds = enc.dataset
    rule = model.decision()
    if ds.multilabel or model.multilabel:
        thresholds = rule.thresholds if rule.thresholds is not None else float("inf")  # argmax: no label passes
        metrics = multilabel_report(ds.multi_hot(), probs, model.classnames, thresholds)
        headline = HEADLINE[MULTI]
    else:
        metrics = classification_report(ds.labels(), probs, model.classnames)
        headline = HEADLINE[SINGLE]
        if rule.kind == "precision":
            decided = rule.apply(probs)
            answered = decided >= 0
            metrics["answered"] = float(answered.mean())
            right = decided[answered] == ds.labels()[answered]
            metrics["precision_answered"] = float(right.mean()) if answered.any() else float("nan")
            headline += ("answered", "precision_answered")
    metrics["decision"] = {"rule": rule.describe(), **rule.to_dict()}
    if tasks:
        metrics["tasks"] = tasks
    targets = ds.multi_hot() if model.multilabel else ds.labels()
    title = f"{model.name} on {spec or ds.name} ({split})"
    metrics.update(trust_report(model, enc, targets, unknown, reliability, title, ctx))
    metrics.update({"data": spec or ds.name, "split": split})
    truth = [";".join(ds.classnames[c] for c in _true(ds, i)) for i in range(len(ds))]
    return Report(metrics, headline, predictions, truth, ds, probs, tasks, task_probs)


def write_plots(model: Method, report: Report, folder: str | Path, title: str, ctx: RunContext | None = None):
    """The report's figures (plots/report.py): ROC/PR curves (one per task for models of several
    tasks), and the figures the method declares (t-SNE, alignment matrix)."""
    from .plots.report import TaskScores, write_eval_plots

    ds, per_task = report.dataset, report.task_probs
    tasks = {
        t: TaskScores(c, model.task_targets(ds, t), per_task[t]) for t, c in model.task_classes.items() if per_task
    }
    with model.using(ctx):
        return write_eval_plots(model, ds, report.probs, folder, title=title, tasks=tasks or None)


def explain(
    model: Method,
    image: str | Path,
    text: str | None = None,
    target: str | None = None,
    out: str | Path | None = None,
    *,
    ctx: RunContext | None = None,
) -> tuple[np.ndarray, str]:
    """The [h, w] attention map of `target` (a class or a token of `text`; default: the predicted
    class, or the token cma-clip picks) over `image`, drawn to `out` when given; -> (map, target)."""
    from .data.decoder import decode
    from .plots.heatmap import save_heatmap

    if not Path(image).is_file():
        raise DataError(f"{image}: image file not found")
    item = Item(image=str(image), text=text, key=str(image))
    heat = model.explain(item if text else str(image), target, ctx=ctx)
    if target is None:
        token = getattr(model, "explained_token", None)  # set by an explain that picks a text token
        target = token or model.classnames[int(model.predict([item] if text else [str(image)], ctx=ctx)[0])]
    if out is not None:
        save_heatmap(decode(str(image)), heat, out, title=f"{model.name}: {target}")
    return heat, str(target)


# ---- predict ------------------------------------------------------------------------------------
def predict_items(
    images: Sequence[str | Path] = (), texts: Sequence[str] = (), data: str | None = None
) -> tuple[list[Item], dict[str, str] | None]:
    """The items to predict: image files, every image under a folder given among them (hidden files
    and folders left out), or every item of a data spec; and their true labels by item name when
    the data has them."""
    from .data.loaders import IMAGE_EXTS, file_key

    if texts and len(texts) != len(images):
        raise DataError(f"predict: {len(texts)} --text value(s) for {len(images)} image(s); give one per image")
    if data:
        from .data import load_data

        parts = list(load_data(data).values())
    else:
        items = []
        for i, p in enumerate(map(Path, images)):
            if p.is_dir():
                if texts:
                    raise DataError(f"{p}: a folder; --text pairs a text with an image file")
                found = sorted(
                    f
                    for f in p.rglob("*")
                    if f.suffix.lower() in IMAGE_EXTS and not any(s.startswith(".") for s in f.relative_to(p).parts)
                )
                if not found:
                    raise DataError(f"{p}: a folder without images ({', '.join(sorted(IMAGE_EXTS))})")
                items += [Item(image=str(f), key=file_key(f)) for f in found]
            elif p.is_file():
                items.append(Item(image=str(p), text=texts[i] if texts else None, key=file_key(p)))
            else:
                raise DataError(f"{p}: image file not found")
        parts = [Dataset(items=items, classnames=[], name="predict")]
    rows, truth = [], {}
    for ds in parts:
        for i, it in enumerate(ds.items):
            rows.append(it)
            truth[item_name(it)] = ";".join(ds.classnames[c] for c in _true(ds, i))
    return rows, (truth if any(truth.values()) else None)


def predict(
    model: Method, items: Sequence[Item] | Sequence[str], *, top: int = 5, ctx: RunContext | None = None
) -> list[Prediction]:
    """Each item's decision (a class, "uncertain", or the labels found) and top scores; with
    `ctx.skip_bad`, unreadable images are left out (fewer predictions than items)."""
    rows = [it if isinstance(it, Item) else Item(image=str(it), key=str(it)) for it in items]
    ctx = ctx or RunContext(progress=False, cache_write=False)
    return model.predict_results(Dataset(items=rows, classnames=model.classnames, name="predict"), top=top, ctx=ctx)


def _decision_text(t: Any, unknown: bool = False) -> str:
    if unknown:
        return "unknown"
    if t.uncertain:
        return "uncertain"
    if not t.labels:
        return "no label found"
    scores = dict(t.scores)
    return ", ".join(f"{c} ({100 * scores[c]:.1f}%)" if c in scores else c for c in t.labels)


def format_prediction(r: Prediction) -> str:
    """`image: decision | top scores` (one line per task for multi-task models, with modality weights)."""
    lines = []
    for k, (task, t) in enumerate(r.tasks.items()):
        head = r.item if len(r.tasks) == 1 else f"  {task}"
        scores = ", ".join(f"{c} {100 * s:.1f}%" for c, s in t.scores)
        line = f"{head}: {_decision_text(t, r.unknown and k == 0)}  | {scores}"
        if k == 0 and r.open_set is not None:  # the open-set score and the threshold below which it is "unknown"
            o = r.open_set
            line += f"  [{o['score']} {o['value']:.4f}, unknown below {o['threshold']:.4f}]"
        if r.modality_weights and task in r.modality_weights:
            w = r.modality_weights[task]
            line += f"  [weights: image {w['image']:.2f}, text {w['text']:.2f}]"
        lines.append(line)
    return "\n".join(([r.item] if len(r.tasks) > 1 else []) + lines)


def ignored_texts(model: Method, items: Sequence[Item]) -> str | None:
    """A note when items carry texts that `model` does not read."""
    if any(it.text for it in items) and TEXT not in model.takes():
        return f"{model.name} reads images only; the texts are ignored"
    return None


def item_name(it: Item) -> str:
    """How an item is named in predictions (as `Method.predict_results` names it): its image's
    description (a path, `shard.tar:member`), else its key."""
    return it.image.describe() if it.image is not None else it.key


def _true(ds: Dataset, i: int) -> list[int]:
    it = ds.items[i]
    return list(it.labels) if it.labels is not None else ([it.label] if it.label is not None and it.label >= 0 else [])


def write_predictions_csv(
    path: str | Path, results: Sequence[Prediction], truth: Sequence[str] | Mapping[str, str] | None = None
) -> Path:
    """One row per item and task: item, task, decision, uncertain, unknown (the main task's row:
    none of the classes), top scores (label:score;...), and the true label(s) of the main task when
    known (`truth` per result, or by item name)."""
    import csv

    from .utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        head = ["item", "task", "decision", "uncertain", "unknown", "scores"]
        w.writerow(head + (["truth"] if truth is not None else []))
        for i, r in enumerate(results):
            known = "" if truth is None else (truth.get(r.item, "") if isinstance(truth, Mapping) else truth[i])
            for k, (task, t) in enumerate(r.tasks.items()):
                row = [
                    r.item,
                    task,
                    ";".join(t.labels),
                    int(t.uncertain),
                    int(r.unknown and k == 0),
                    ";".join(f"{c}:{s:.6f}" for c, s in t.scores),
                ]
                w.writerow(row + ([known if k == 0 else ""] if truth is not None else []))
    return path


__all__ = [
    "FitResult",
    "Report",
    "absolute_spec",
    "eval_data",
    "evaluate",
    "explain",
    "fit",
    "format_prediction",
    "predict",
    "predict_items",
    "rows_of",
    "task_report",
    "update",
    "validation_scores",
    "write_plots",
    "write_predictions_csv",
]
