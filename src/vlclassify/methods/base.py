"""The method contract: what every method declares, the few hooks it provides, and what methods share.

    method = create_method("linear-probe", backbone)
    method.fit(train, val, ctx=RunContext(cache=FeatureCache("cache/")))  # Dataset or Encoded
    probs = method.predict_proba(test)      # [N, C] scores
    found = method.predict(test)            # decisions: [N] class or -1 ("uncertain"), or [N, C] bool
    for r in method.predict_results(test):  # per item: labels found, top scores, per task
        print(r.labels, r.scores)
    method.save_pretrained("out/")          # config.json + model.safetensors (no pickles)
    same = load_method("out/")              # rebuilds the backbone from the saved config

Run options (feature cache, progress bars, runtime, skip-bad, streaming) are a `RunContext`
passed to each call (`ctx=`), never set on the model. docs/methods.md is generated from the
declarations (`vlclassify methods --contract`); docs/extending.md walks through adding a method.

Declarations (class attributes; a trained method's `Config` inherits `TrainOptions`: lr,
weight_decay, batch_size, seed, threads and run_dir in `config.train`, given flat as `lr=...`):

| declaration | meaning |
|---|---|
| `name`, `Config` | the registered name; options: a frozen dataclass validated in `__post_init__` |
| `kinds`, `optional_kinds` | the data it takes (single-label, multi-label, paired-text, multi-task); by option |
| `needs` | feature keys it reads (features/protocol.py): image (joint), pooled, spatial, text, trunk |
| `train_views` | the image views it trains on: orig, and flip for the mirror image |
| `tags` | capabilities (methods/tags.py): update, explain, onnx, stream, names_only, activation |
| `selects` | what validation chooses besides the decision rule (docs/methods.md) |
| `needs_every_class`, `trains_on_images` | every class needs a training image; fit encodes the training images |
| `state`, `tensor_state` | attributes config.json / model.safetensors keep besides the options and the head |

Hooks (methods a subclass overrides; a registered method overrides at most six):

| hook | who provides it | what |
|---|---|---|
| `build_head(spec)` | every method | the head module of `spec`, fresh weights (load_method rebuilds with it) |
| `stages(train)` | trained methods | the Trainer stages; with stages, `fit` runs the Trainer itself |
| `prepare(train, val)` | trained methods | build, initialise the head (`init_head`); -> `Feed` (batches, metric) |
| `finish(val, result)` | trained methods, optional | what is chosen on the trained head (a fusion weight), fit_info |
| `fit_head(train, val)` | methods without stages | build the head and choose on validation (a cache, a solver's grid) |
| `_update(train, val, classes, descriptions)` | methods tagged `update` | add examples / classes in place |
| `explain(item, target)` | methods tagged `explain` | an attention map |
| `takes()`, `feature_needs()`, `training_views()` | methods whose options change them | configured declarations |
| `_encode(data, training)` | methods reading trunk activations | features other than `extract_features`' |
| `_forward(head, data)`, `_outputs(enc)` | methods whose inference is not one head over feature batches | the outputs |

`fit` checks the data (a kind not taken is refused in one line before any extraction, naming the
methods that take it), encodes train and validation once, runs the Trainer (stages) or
`fit_head`, then chooses each task's decision rule on validation. The thread policy of training
comes from the problem's size (`problem_size`), not from each method.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, cast

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone
from ..context import RunContext
from ..data.classes import check_spellings
from ..data.items import Dataset, Item
from ..data.precomputed import class_text_of
from ..errors import ConfigError, DataError
from ..features import FeatureCache, FeatureSet, extract_features
from ..features.protocol import KEYS, Features
from ..features.stream import StoredRows, StreamedFeatures, stored_rows
from ..metrics.openset import KEEP
from ..registry import Registry
from ..training import Stage, Trainer, TrainResult
from ..training.trainer import BatchFn
from ..trust.calibration import Calibration, identity
from ..trust.model import Trust, fit_trust, open_set_feature
from ..utils import atomic_path, read_json, seeded, sha256_file
from .decision import MAIN as MAIN  # the main task's name, re-exported: the method modules import it from here
from .decision import DecisionRule, Prediction, choose_rule, default_rule, task_prediction
from .tags import KINDS as KINDS  # the kinds, re-exported: methods and tests import them from here
from .tags import MULTI as MULTI
from .tags import SINGLE as SINGLE
from .tags import TASKS as TASKS
from .tags import TEXT as TEXT
from .tags import Tags
from .templates import cached_template_embeddings

FORMAT_VERSION = 3  # 3: calibration and "unknown" in config.json, fusion weights as head buffers (tip-adapter, cmm)
FEATURES = KEYS  # image (joint embedding), pooled, spatial, text, trunk (activations at a backbone.split cut)


@dataclass
class Encoded:
    """A dataset together with its (cached) features, row-aligned."""

    dataset: Dataset
    features: Features  # in memory, trunk activations or streamed (features/protocol.py)
    rows: StoredRows | None = None  # streamed training: the rows stay in the store, read per batch

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Encoded:
        """The rows at `idx` of the items and their features together."""
        return Encoded(self.dataset.subset(idx), self.features.index(idx))


@dataclass(frozen=True)
class TrainConfig:
    """The training options every trainable method shares, in one place (`config.train`). Given
    flat, as `--opt lr=1e-3` or `create_method(..., seed=1)`, they land here; a method's own
    defaults are its `train` field's default."""

    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW / Adam weight decay (a method with a weight-decay grid chooses its own)
    batch_size: int = 32  # rows per optimizer step (a full-batch method uses every row)
    seed: int = 0  # initialisation, batch order and dropout (the caller's global RNG is left alone)
    threads: int = 0  # torch threads while training; 0 = auto (1 for small problems or a loaded machine)
    run_dir: str | None = None  # checkpoints + log.jsonl; a killed fit re-run with the same folder resumes

    def __post_init__(self) -> None:
        if self.lr < 0 or self.weight_decay < 0 or self.batch_size < 1 or self.threads < 0:
            raise ConfigError(
                f"training options: need lr >= 0, weight_decay >= 0, batch_size >= 1, threads >= 0; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, batch_size={self.batch_size}, threads={self.threads}"
            )


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class TrainOptions:
    """The config of a method trained through the Trainer: its `train` field holds the shared options
    (a method sets its own defaults with `field(default_factory=lambda: TrainConfig(lr=...))`)."""

    train: TrainConfig = field(default_factory=TrainConfig)


def train_options(config_cls: type, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the training keys given flat (`lr=`, `seed=`, ... from the CLI, presets or
    older config.json files) or as a dict (config.json) gathered into one `TrainConfig`."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, TrainOptions)):
        return options
    out = {k: v for k, v in options.items() if k not in TRAIN_FIELDS}
    given = out.pop("train", None)
    flat = {k: v for k, v in options.items() if k in TRAIN_FIELDS}
    if isinstance(given, dict):
        unknown = sorted(set(given) - set(TRAIN_FIELDS))
        if unknown:
            raise ConfigError(f"method {method!r}: unknown training option(s) {', '.join(unknown)}")
        flat = {**given, **flat}
    elif given is not None and not isinstance(given, TrainConfig):
        raise ConfigError(f"method {method!r}: option train={given!r} must be a TrainConfig or a dict")
    check_option_types(method, TrainConfig, flat)
    default = given if isinstance(given, TrainConfig) else config_cls().train
    out["train"] = dataclasses.replace(default, **flat) if flat else default
    return out


Metric = Callable[[nn.Module], dict[str, float]]  # head -> {"score": validation score, ...}


@dataclass(frozen=True)
class Feed:
    """How the Trainer feeds a head (`Method.prepare`): None keeps the default."""

    batches: BatchFn | None = None  # (stage, epoch, seed) -> batches; default: the cached feature rows
    metric: Metric | None = None  # head -> {"score"}; default: the main task's accuracy (mAP multi-label)


def problem_size(head: nn.Module, train: Encoded, batch_size: int) -> int:
    """Multiply-adds of one training step, roughly: rows per step x feature vectors per row (1 for an
    embedding, the tokens of a token grid) x head parameters (utils.torch_threads reads it)."""
    rows = min(batch_size, max(1, len(train.rows) if train.rows is not None else len(train)))
    params = sum(p.numel() for p in head.parameters())
    return rows * train.features.vectors_per_row() * params


def dataset_of(data: Dataset | Encoded) -> Dataset:
    """The Dataset behind a Dataset or an Encoded."""
    return data.dataset if isinstance(data, Encoded) else data


def data_kinds(ds: Dataset) -> set[str]:
    """The kinds a dataset needs a method to take (see the module docstring)."""
    kinds = {MULTI if ds.multilabel else SINGLE}
    if any(it.text for it in ds.items):
        kinds.add(TEXT)
    if len(ds.tasks) >= 2:
        kinds.add(TASKS)
    return kinds


def methods_taking(kind: str) -> list[str]:
    """Names of the methods that read input kind `kind` (e.g. text), for CLI notes."""
    return [n for n in METHODS.names() if kind in METHODS.get(n).kinds | METHODS.get(n).optional_kinds]


def methods_tagged(tag: str) -> list[str]:
    """Names of the methods declaring capability `tag` (a `Tags` field: update, explain, onnx, ...)."""
    return [n for n in METHODS.names() if getattr(METHODS.get(n).tags, tag)]


def as_dataset(items: Dataset | Sequence[Item] | Sequence[str], classnames: Sequence[str]) -> Dataset:
    """Accept a Dataset, a list of Items or a list of image paths."""
    if isinstance(items, Dataset):
        return items
    rows = list(items)
    if rows and isinstance(rows[0], str):
        from ..data.source import file_key

        paths = cast(list[str], rows)
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{missing[0]}: image file not found")
        rows = [Item(image=p, key=file_key(p)) for p in paths]
    return Dataset(items=cast(list[Item], rows), classnames=list(classnames), name="input")


SUPPORT = {"base", "decision", "registry", "tags", "templates"}  # the package's modules that are not methods


def _import_methods() -> None:
    """Import every method module of the package: each registers itself (registry.register_method).
    Run at the registry's first lookup, so that importing `methods` (or `methods.decision`) alone
    imports no method and no torch."""
    import importlib
    import pkgutil

    package = importlib.import_module(__package__ or "vlclassify.methods")
    for m in pkgutil.iter_modules(package.__path__):
        if m.name not in SUPPORT and not m.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{m.name}")


METHODS: Registry[type[Method]] = Registry("method", load=_import_methods)  # filled by registry.register_method


class Method:
    """Base class: a subclass declares and provides what the module docstring's tables list."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    kinds: ClassVar[frozenset[str]] = frozenset({SINGLE})
    optional_kinds: ClassVar[frozenset[str]] = frozenset()  # kinds an option enables (e.g. feature="text")
    selects: ClassVar[str] = ""  # what validation chooses besides the decision rule (docs/methods.md)
    needs: ClassVar[frozenset[str]] = frozenset({"image"})  # feature keys read (features/protocol.py KEYS)
    train_views: ClassVar[tuple[str, ...]] = ("orig",)  # image views fit trains on ("flip": and the mirror image)
    infer_batch: ClassVar[int] = 1024  # rows per head forward at inference
    trains_on_images: ClassVar[bool] = True  # False: fit reads only the class names (and validation images)
    needs_every_class: ClassVar[bool] = True  # every class needs a training image (False: classes by name)
    state: ClassVar[tuple[str, ...]] = ()  # JSON attributes config.json keeps besides the options (e.g. descriptions)
    tensor_state: ClassVar[tuple[str, ...]] = ()  # tensor attributes model.safetensors keeps beside the head

    tags: ClassVar[Tags] = Tags()  # declared capabilities (methods/tags.py)

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Config)}
        if "train" in fields:
            fields |= set(TRAIN_FIELDS)
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(
                f"method {self.name!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
            )
        options = train_options(self.Config, self.name, options)
        check_option_types(self.name, self.Config, options)
        self.config = self.Config(**options)
        self.backbone = backbone
        self._ctx: RunContext | None = None  # the run options of the call in progress (`using`)
        self.classnames: list[str] = []  # the main task's classes
        self.task_classes: dict[str, list[str]] = {}  # every task the model answers (main first) -> classes
        self.multilabel = False  # the main task has independent labels (sigmoid scores, thresholds)
        self.decisions: dict[str, DecisionRule] = {}  # task -> rule chosen on validation
        self.trust = Trust()  # calibration per task, the "unknown" rule, feature statistics (trust/model.py)
        self.head: nn.Module | None = None
        self.head_spec: dict[str, Any] = {}  # JSON that `build_head` rebuilds the head from
        self.fit_info: dict[str, Any] = {}
        self.task_columns: list[str] = []  # the data column each task answers, in task_classes order ([]: the task)
        self.notes: list[str] = []  # what the current call noticed about its data (missing images or texts)
        self.class_text: torch.Tensor | None = None  # [C, D] class texts given with the data (a feature file)

    # ---- run options ----------------------------------------------------------------------
    @contextmanager
    def using(self, ctx: RunContext | None) -> Iterator[RunContext]:
        """Bind the run options of one public call (fit, predict, ...) for its duration: the call's
        own `ctx`, else the enclosing call's, else the defaults. Nothing outlives the call."""
        if ctx is None and self._ctx is not None:
            yield self._ctx
            return
        ctx = ctx or RunContext()
        if ctx.cache is None:
            ctx = dataclasses.replace(ctx, cache=FeatureCache())
        if self._ctx is None:
            self.notes = []
        prev, self._ctx = self._ctx, ctx
        try:
            yield ctx
        finally:
            self._ctx = prev

    @property
    def ctx(self) -> RunContext:
        """The run options of the call in progress (the defaults outside one)."""
        return self._ctx or RunContext(cache=FeatureCache())

    @property
    def feature_cache(self) -> FeatureCache:
        """The feature store of the call in progress (the context's cache)."""
        cache = self.ctx.cache
        assert cache is not None, "using() resolves the default cache"
        return cache

    # ---- declarations (per instance: some depend on options) ------------------------------
    def takes(self) -> frozenset[str]:
        """The data kinds this configured method takes."""
        return type(self).kinds

    def feature_needs(self) -> frozenset[str]:
        """The features this configured method reads."""
        return type(self).needs

    def training_views(self) -> tuple[str, ...]:
        """The image views `fit` extracts for the training images, "orig" first (features/extract.py
        VIEWS): the declared `train_views`."""
        return type(self).train_views

    def stages(self, train: Encoded) -> list[Stage]:
        """The Trainer stages that train the head (none: training-free)."""
        return []

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        """The head module described by `spec` (shapes, class count), with fresh weights."""
        raise NotImplementedError

    # ---- data ---------------------------------------------------------------------------
    def check_data(self, ds: Dataset) -> list[str]:
        """Refuse, in one line, data of a kind this method does not take; -> what it will ignore."""
        takes = self.takes()
        label = MULTI if ds.multilabel else SINGLE
        if label not in takes:
            raise DataError(
                f"{ds.name or 'data'}: {self.name} does not take {label} data; methods that do: "
                f"{', '.join(methods_taking(label))}"
            )
        if ds.features is None and ("image" in self.feature_needs() or "pooled" in self.feature_needs()):
            blank = next((it for it in ds.items if it.image is None), None)
            if blank is not None:
                raise DataError(
                    f"{ds.name}: item {blank.key} has no image; {self.name} classifies images "
                    f"(items with only a text: {', '.join(methods_taking(TEXT))})"
                )
        notes = []
        kinds = data_kinds(ds)
        if TEXT in kinds and TEXT not in takes:
            notes.append(
                f"{self.name} reads images only: the items' texts are ignored "
                f"(methods that use them: {', '.join(methods_taking(TEXT))})"
            )
        if TASKS in kinds and TASKS not in takes:
            others = [t for t in ds.tasks if ds.tasks[t] != ds.classnames]
            notes.append(
                f"{self.name} learns one label per image: task(s) {', '.join(others)} are ignored "
                f"(methods that learn several tasks: {', '.join(methods_taking(TASKS))})"
            )
        return notes

    def encode(self, data: Dataset | Encoded, training: bool = False, *, ctx: RunContext | None = None) -> Encoded:
        """The features this method needs (training: with the augmented views it trains on)."""
        with self.using(ctx):
            return self._encode(data, training)

    def _encode(self, data: Dataset | Encoded, training: bool) -> Encoded:
        ctx, cache = self.ctx, self.feature_cache
        needs = self.feature_needs()
        views = self.training_views() if training else ("orig",)
        if isinstance(data, Encoded):
            if "spatial" in needs and not data.features.has("spatial"):
                raise ConfigError(f"method {self.name!r} needs spatial features; extract with spatial=True")
            missing = [v for v in views[1:] if v not in data.features.views]
            if missing:
                raise ConfigError(f"method {self.name!r} needs cached view(s) {', '.join(missing)}")
            return data
        if training and ctx.stream and not type(self).tags.stream:
            raise ConfigError(
                f"method {self.name!r} reads whole training feature tensors, so it cannot train streamed from the "
                f"feature store; fit it without streaming (methods that stream: {', '.join(methods_tagged('stream'))})"
            )
        if training and ctx.stream and data.features is None:
            keys = feature_keys(needs)
            y = torch.from_numpy(data.multi_hot() if data.multilabel else data.labels())
            rows = stored_rows(self.backbone, data, views, keys, y, cache, ctx.runtime, ctx.progress)
            return Encoded(data, StreamedFeatures(len(data), rows.grid, self.name, keys), rows)
        feats = extract_features(
            self.backbone,
            data,
            views=views,
            spatial="spatial" in needs,
            text="text" in needs or None,
            cache=cache,
            progress=ctx.progress,
            runtime=ctx.runtime,
            skip_bad=ctx.skip_bad,
            write=ctx.cache_write,
        )
        enc = Encoded(data, feats)
        if feats.skipped:
            bad = set(feats.skipped)
            first = data.items[min(bad)]
            warnings.warn(
                f"{data.name}: skipped {len(bad)} unreadable image(s) (first: {first.origin or first.key})",
                stacklevel=2,
            )
            enc = enc.subset([i for i in range(len(data)) if i not in bad])
        return enc

    # ---- fitting ------------------------------------------------------------------------
    def fit(
        self,
        train: Dataset | Encoded,
        val: Dataset | Encoded | None = None,
        *,
        ctx: RunContext | None = None,
        precision: float | None = None,
        thresholds: str = "per-class",
        keep: float = KEEP,
    ) -> Self:
        """Learn from `train`, choose hyper-parameters, checkpoints, the calibration, the "unknown"
        rule and the decision rule on `val`.

        ctx: run options (feature cache, progress, runtime, skip-bad, streaming). precision: for
        single-label data, answer only when the top class reaches this precision on validation,
        else "uncertain". thresholds: per-class | global (multi-label decisions). keep: the share of
        known validation images the "unknown" threshold keeps (trust/openset.py).
        """
        with self.using(ctx):
            return self._fit_all(train, val, precision, thresholds, keep)

    def _fit_all(
        self,
        train: Dataset | Encoded,
        val: Dataset | Encoded | None,
        precision: float | None,
        thresholds: str,
        keep: float,
    ) -> Self:
        if thresholds not in ("per-class", "global"):
            raise ConfigError(f"thresholds must be per-class or global, got {thresholds!r}")
        ds = dataset_of(train)
        notes = self.check_data(ds)
        if val is not None and len(val):
            self.check_data(dataset_of(val))
        if ds.num_classes < 2:
            raise DataError(f"{ds.name}: need at least 2 classes, got {ds.num_classes}")
        tr = self.encode(train, training=True) if self.trains_on_images else Encoded(ds, FeatureSet.names_only(len(ds)))
        va = self.encode(val) if val is not None and len(val) else None
        if not ds.multilabel and self.needs_every_class:
            y = ds.labels()
            absent = [ds.classnames[c] for c in range(ds.num_classes) if not np.any(y == c)]
            if absent:
                raise DataError(f"{ds.name}: no training images for class(es) {', '.join(absent)}")
        for enc, what in ((tr if self.trains_on_images else None, ds.name), (va, "validation")):
            if enc is not None and enc.rows is None:
                check_features(enc.features, self.feature_needs(), f"{what} ")
        self.classnames = list(ds.classnames)
        self.class_text = class_text_of(ds)
        self.multilabel = bool(ds.multilabel)
        self.task_classes = {MAIN: list(ds.classnames)}
        self.fit_info = {}
        self.trust = Trust()  # a refit trains on raw scores
        self.task_columns = []
        with torch.enable_grad():
            stages = self.stages(tr)
            if stages:  # trained through the one Trainer
                feed = self.prepare(tr, va)
                self.finish(va, self.train_head(tr, va, stages, feed.batches, feed.metric))
            else:
                self.fit_head(tr, va)
        assert self.head is not None, f"{self.name}: prepare / fit_head must build self.head"
        self.head.requires_grad_(False).eval()  # a fitted model is for inference; training re-enables what it trains
        if notes:
            self.fit_info["ignored"] = notes
        self.calibrate(tr, va, keep)
        self.choose_decisions(va, precision=precision, per_class=thresholds == "per-class")
        return self

    def update(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        *,
        classes: Sequence[str] = (),
        descriptions: dict[str, str] | None = None,
        ctx: RunContext | None = None,
        precision: float | None = None,
        thresholds: str = "per-class",
    ) -> Method:
        """Add labelled examples (`train`) and classes (`classes`, or new ones in `train`) to a fitted
        model. Methods that can add to what they learnt override `_update` (zero-shot, Tip-Adapter,
        linear probe, iCAR); the others refit on `train` alone, and fit_info["update"] says so."""
        with self.using(ctx):
            return self._update_all(train, val, classes, descriptions, precision, thresholds)

    def _update_all(
        self,
        train: Dataset | None,
        val: Dataset | None,
        classes: Sequence[str],
        descriptions: dict[str, str] | None,
        precision: float | None,
        thresholds: str,
    ) -> Method:
        self._check_fitted()
        merged = list(dict.fromkeys([*self.classnames, *classes, *(train.classnames if train is not None else [])]))
        check_spellings(merged, f"update of {self.name}")
        added = [c for c in merged if c not in self.classnames]
        train = train.with_classes(merged) if train is not None else None
        val = val.with_classes(merged) if val is not None and len(val) else None
        how = self._update(train, val, merged, descriptions or {})
        if how is None:
            if train is None:
                raise DataError(f"{self.name} learns from images and cannot add to a fitted model: give new data")
            absent = [c for i, c in enumerate(merged) if not train.multilabel and not np.any(train.labels() == i)]
            if absent and self.needs_every_class:
                adders = ", ".join(methods_tagged("update"))
                raise DataError(
                    f"{self.name} cannot add to a fitted model, so update refits it on the new data, which has no "
                    f"images of {', '.join(absent)}: give data with every class, or use {adders}"
                )
            self.fit(train, val, precision=precision, thresholds=thresholds, keep=self.trust.open_set.keep)
            how = f"refit from scratch on the new data ({self.name} cannot add to a fitted model)"
        else:
            va = self.encode(val) if val is not None else None
            covers = train is not None and (train.multilabel or set(range(len(merged))) <= set(train.labels().tolist()))
            self.calibrate(self.encode(train) if covers and train is not None else None, va, self.trust.open_set.keep)
            self.choose_decisions(va, precision, thresholds == "per-class")
        self.fit_info["update"] = {"how": how, "added_classes": added, "new_examples": len(train or [])}
        return self

    def _update(
        self, train: Dataset | None, val: Dataset | None, classes: list[str], descriptions: dict[str, str]
    ) -> str | None:
        """Add `train`'s examples and the classes `classes` (the old ones first) in place; -> how it
        was done, or None when this method cannot (update then refits)."""
        return None

    def fit_head(self, train: Encoded, val: Encoded | None) -> None:
        """A method without `stages`: build `self.head` (`init_head`) and choose what it chooses on
        `val` (a training-free cache, a grid of solver fits). Names-only methods get `train` without
        image features."""
        raise NotImplementedError(f"{self.name}: a method provides stages + prepare, or fit_head")

    def prepare(self, train: Encoded, val: Encoded | None) -> Feed:
        """A method with `stages`: build and initialise the head for a new fit (`init_head`); -> how
        the Trainer feeds it (default: the cached feature rows, the main task's validation score)."""
        raise NotImplementedError(f"{self.name}: a method with stages provides prepare")

    def finish(self, val: Encoded | None, result: TrainResult) -> None:
        """After training: what is chosen on the trained head (a fusion weight), and `fit_info`."""

    def calibrate(self, train: Encoded | None, val: Encoded | None, keep: float = KEEP) -> None:
        """Calibration per task, then the "unknown" rule on the calibrated main task, both chosen on
        `val` (trust/model.py); the class means and covariance are of `train`'s features (pooled,
        else the joint embedding; none when the method reads neither, or trains streamed)."""
        key = open_set_feature(self.feature_needs())
        feats = targets = val_feats = None
        if self.trains_on_images and train is not None and train.rows is None and key is not None:
            feats = getattr(train.features, key)  # [N, D] the original view of each training image
            ds = train.dataset
            targets = ds.multi_hot() if self.multilabel else ds.labels()
        logits = tgt = None
        if val is not None and len(val):
            out = self._outputs(val)
            logits = {MAIN: out["logits"], **(out.get("task_logits") or {})}
            tgt = {t: self.task_targets(val.dataset, t) for t in self.task_classes}
            val_feats = getattr(val.features, key) if key is not None else None
        acts = {t: self.score_activation(t) for t in self.task_classes}
        self.trust = fit_trust(
            len(self.classnames), logits, tgt, acts, feats, targets, val_feats, key, keep, type(self).tags.calibrated
        )
        self.fit_info["trust"] = {
            "calibration": {t: c.describe() for t, c in self.trust.calibrations.items()},
            "unknown": self.trust.open_set.describe(),
        }

    def choose_decisions(self, val: Encoded | None, precision: float | None = None, per_class: bool = True) -> None:
        """One decision rule per task, chosen on validation scores (see methods/decision.py)."""
        probs = self.task_probs(val) if val is not None else {}
        rules = {}
        for task, classes in self.task_classes.items():
            multi = self.multilabel and task == MAIN
            y = self.task_targets(val.dataset, task) if val is not None else None
            default = self.default_decision(task, len(classes))
            rules[task] = choose_rule(
                probs.get(task), y, multi, len(classes), precision if not multi else None, per_class, default
            )
        self.decisions = rules
        for task, rule in rules.items():
            if rule.note:
                warnings.warn(f"{self.name} ({task}): {rule.note}", stacklevel=3)

    def class_texts(
        self, templates: Sequence[str], descriptions: dict[str, str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-template [C, L, D], ensemble [C, D]) normalised class text embeddings of the current
        classes: the data's own when it brought them (`class_text`), else the prompts encoded."""
        return cached_template_embeddings(
            self.backbone, self.classnames, templates, self.feature_cache, descriptions, self.class_text
        )

    def default_decision(self, task: str, num_classes: int) -> DecisionRule:
        """The rule without validation data: labels scoring >= 0.5 for sigmoid multi-label scores,
        above 1/C for softmax ones (relative scores), else the argmax."""
        multi = self.multilabel and task == MAIN
        if multi and self.activation == "softmax":
            return DecisionRule(
                "thresholds",
                [1.0 / num_classes] * num_classes,
                source="default",
                note=f"no validation set: multi-label decisions are the labels scoring above 1/C "
                f"(= {1.0 / num_classes:.3f}); give validation data to choose thresholds",
            )
        return default_rule(multi, num_classes, "no validation set: labels scoring >= 0.5" if multi else "")

    def task_targets(self, ds: Dataset, task: str) -> np.ndarray:
        """Targets of `task` in the model's class indices ([N], -1 for a class the model does not
        know or no label; [N, C] multi-hot for the multi-label main task)."""
        if task == MAIN and self.multilabel:
            return ds.multi_hot()
        column = self.task_name(task)  # the data column the task answers ("label": the main label)
        if column not in ds.tasks and column != MAIN:
            raise DataError(
                f"{ds.name}: the model was trained with task column {column!r}, which the data lacks "
                f"(data tasks: {', '.join(ds.tasks) or 'none'})"
            )
        names = ds.tasks[column] if column in ds.tasks else ds.classnames
        y = ds.task_labels(column) if column in ds.tasks else ds.labels()
        known = {c: i for i, c in enumerate(self.task_classes.get(task, self.classnames))}
        remap = np.array([known.get(c, -1) for c in names] + [-1], dtype=np.int64)
        targets: np.ndarray = remap[y]  # y == -1 picks the trailing -1
        return targets

    # ---- training through the one Trainer ---------------------------------------------------
    def train_head(
        self,
        train: Encoded,
        val: Encoded | None,
        stages: Sequence[Stage],
        batches: BatchFn | None = None,
        metric: Metric | None = None,
        run: str = "",
    ) -> TrainResult:
        """Train `self.head` with the Trainer: batches of cached features (default), validated on
        the main task's score (accuracy, or mAP for multi-label data) unless `metric` is given.
        `run` names a sub-folder of `run_dir` when one fit trains several heads (a grid). The thread
        policy sees the problem's size: rows per step x feature vectors per row x head parameters."""
        cfg = self.config
        assert self.head is not None, "train_head trains the head init_head built"
        if metric is None and val is not None:
            metric = self.val_metric(val)
        tc = cfg.train if isinstance(cfg, TrainOptions) else TrainConfig()
        result = Trainer(
            self.head,
            batches or self.feature_batches(train),
            None,
            stages,
            metric=metric,
            monitor="score" if metric else None,
            mode="max" if metric else None,
            out_dir=(Path(tc.run_dir) / run if run else tc.run_dir) if tc.run_dir else None,
            seed=tc.seed,
            progress=self.ctx.progress,
            threads=tc.threads,
            work=problem_size(self.head, train, stages[0].batch_size),
        ).fit()
        self.head.eval()
        self.fit_info["training"] = {
            "monitor": "validation accuracy" if not self.multilabel else "validation mAP",
            "stages": [dataclasses.asdict(s) for s in result.stages],
            "history": [
                {k: v for k, v in r.items() if k in ("stage", "epoch", "step", "val_score") or k.startswith("train_")}
                for r in result.history
            ],
        }
        return result

    def train_tensors(self, train: Encoded) -> dict[str, torch.Tensor]:
        """Row-aligned training tensors: every cached view is a sample of its own."""
        f = train.features
        views = [f] + [f.views[v] for v in self.training_views()[1:] if v in f.views]
        out = {k: torch.cat([v.tensor(k).float() for v in views]) for k in feature_keys(self.feature_needs())}
        y = torch.from_numpy(train.dataset.multi_hot() if self.multilabel else train.dataset.labels())
        out["targets"] = y.repeat(len(views), *([1] * (y.dim() - 1)))
        return out

    def feature_batches(self, train: Encoded, tensors: dict[str, torch.Tensor] | None = None) -> BatchFn:
        """The Trainer's batches: a fresh permutation of the rows every epoch, cut into global batches."""
        if tensors is None and train.rows is not None:
            return train.rows.batches()
        rows = tensors if tensors is not None else self.train_tensors(train)
        n = len(rows["targets"])

        def make(stage: Stage, epoch: int, seed: int) -> list[dict[str, torch.Tensor]]:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            bs = min(stage.batch_size, n)
            return [{k: v[order[i : i + bs]] for k, v in rows.items()} for i in range(0, n, bs)]

        return make

    def val_metric(self, val: Encoded) -> Callable[[nn.Module], dict[str, float]]:
        """Validation score of the main task for the Trainer: accuracy, or mAP (multi-label)."""
        from ..metrics import score

        if self.multilabel:
            y = val.dataset.multi_hot()
            return lambda head: {"score": score(MULTI, y, self._scores(self._forward(head, val)["logits"]))["mAP"]}
        yt = val.dataset.labels()
        return lambda head: {"score": score(SINGLE, yt, self._forward(head, val)["logits"].numpy())["accuracy"]}

    def init_head(self, spec: dict[str, Any]) -> nn.Module:
        """Build the head for a new fit, its random initialisation drawn from the method's seed."""
        self.head_spec = dict(spec)
        with seeded(self.config.train.seed if isinstance(self.config, TrainOptions) else 0):
            self.head = self.build_head(self.head_spec)
        return self.head

    # ---- inference ----------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.classnames or self.head is None:
            raise ConfigError(f"method {self.name!r} is not fitted; call fit() or load a saved model")

    def _forward(self, head: nn.Module, data: Encoded) -> dict[str, Any]:
        """The head over every row of `data` in batches, eval mode, no gradients: concatenated outputs."""
        was = head.training
        head.eval()
        parts: list[dict[str, Any]] = []
        with torch.no_grad():
            for s in range(0, max(1, len(data)), self.infer_batch):
                parts.append(head(data.features.batch(feature_keys(self.feature_needs()), s, s + self.infer_batch)))
        head.train(was)
        return _concat_outputs(parts)

    def outputs(
        self, data: Dataset | Encoded | Sequence[Item] | Sequence[str], *, ctx: RunContext | None = None
    ) -> dict[str, Any]:
        """Head outputs for `data`: "logits" [N, C] (main task), optional "task_logits" {task: [N, C_t]}
        and "modality_weights" [N, K] (image weight per task)."""
        self._check_fitted()
        with self.using(ctx):
            enc = self.encode(data if isinstance(data, Encoded) else as_dataset(data, self.classnames))
            check_features(enc.features, self.feature_needs(), "")
            return self._outputs(enc)

    def _outputs(self, enc: Encoded) -> dict[str, Any]:
        assert self.head is not None, "callers check that the model is fitted"
        return self._forward(self.head, enc)

    @property
    def activation(self) -> str:
        """The main task's score activation: the declared one (the tags' activation), else sigmoid for
        multi-label data and softmax otherwise. Other tasks are single-label: softmax."""
        declared = type(self).tags.activation
        return declared if declared != "auto" else ("sigmoid" if self.multilabel else "softmax")

    def score_activation(self, task: str = MAIN) -> str:
        """softmax or sigmoid: what `task`'s logits become (the main task's `activation`, else softmax)."""
        return self.activation if task == MAIN else "softmax"

    def calibration(self, task: str = MAIN) -> Calibration:
        """The calibration of `task`'s scores, chosen on validation at fit (trust/calibration.py)."""
        return self.trust.calibration(task, self.score_activation(task))

    def _scores(self, logits: torch.Tensor, task: str = MAIN, calibrated: bool = True) -> np.ndarray:
        """Logits -> scores: the task's calibration, or (calibrated=False) the raw activation."""
        cal = self.calibration(task) if calibrated else identity(self.score_activation(task))
        return cal.probs(logits)

    def logits(
        self, data: Dataset | Encoded | Sequence[Item] | Sequence[str], *, ctx: RunContext | None = None
    ) -> torch.Tensor:
        """[N, C] main-task logits (before the sigmoid / softmax of `predict_proba`)."""
        logits: torch.Tensor = self.outputs(data, ctx=ctx)["logits"]
        return logits

    def predict_proba(
        self,
        data: Dataset | Encoded | Sequence[Item] | Sequence[str],
        *,
        ctx: RunContext | None = None,
        calibrated: bool = True,
    ) -> np.ndarray:
        """[N, C] calibrated scores of the main task (calibrated=False: the raw softmax / sigmoid)."""
        return self._scores(self.logits(data, ctx=ctx), calibrated=calibrated)

    def open_set_scores(
        self, data: Dataset | Encoded | Sequence[Item] | Sequence[str], *, ctx: RunContext | None = None
    ) -> dict[str, np.ndarray]:
        """{score: [N]} every open-set score of `data` (higher = more like a known class; trust/openset.py)."""
        self._check_fitted()
        with self.using(ctx):
            enc = self.encode(data if isinstance(data, Encoded) else as_dataset(data, self.classnames))
            return self._open_set(enc, self._outputs(enc)["logits"])

    def _open_set(self, enc: Encoded, logits: torch.Tensor) -> dict[str, np.ndarray]:
        feats = getattr(enc.features, self.trust.feature) if self.trust.feature else None
        return self.trust.open_set_scores(logits, self.calibration(), feats)

    def task_probs(
        self, data: Dataset | Encoded | Sequence[Item] | Sequence[str], *, ctx: RunContext | None = None
    ) -> dict[str, np.ndarray]:
        """{task: [N, C_t] scores} for every task the model answers, the main task first."""
        out = self.outputs(data, ctx=ctx)
        probs = {MAIN: self._scores(out["logits"])}
        for task, z in (out.get("task_logits") or {}).items():
            probs[task] = self._scores(z, task)
        return {t: probs[t] for t in self.task_classes if t in probs}

    def predict(
        self, data: Dataset | Encoded | Sequence[Item] | Sequence[str], *, ctx: RunContext | None = None
    ) -> np.ndarray:
        """Decisions of the main task: [N] class index (-1 = uncertain), or [N, C] bool (multi-label)."""
        return self.decision(MAIN).apply(self.predict_proba(data, ctx=ctx))

    def decision(self, task: str = MAIN) -> DecisionRule:
        """The decision rule of `task` (chosen on validation at fit, else the default)."""
        if task not in self.decisions:
            self.decisions[task] = self.default_decision(task, len(self.task_classes.get(task, self.classnames)))
        return self.decisions[task]

    def predict_results(
        self,
        data: Dataset | Encoded | Sequence[Item] | Sequence[str],
        top: int = 5,
        *,
        ctx: RunContext | None = None,
    ) -> list[Prediction]:
        """One Prediction per item: every task's decision and top scores, and modality weights."""
        self._check_fitted()
        with self.using(ctx):
            enc = self.encode(data if isinstance(data, Encoded) else as_dataset(data, self.classnames))
            out = self._outputs(enc)
        probs = {MAIN: self._scores(out["logits"])}
        probs.update({t: self._scores(z, t) for t, z in (out.get("task_logits") or {}).items()})
        decided = {t: self.decision(t).apply(p) for t, p in probs.items()}
        rule = self.trust.open_set
        known = self._open_set(enc, out["logits"]) if rule.enabled else {}
        # multi-label: no label found is already an answer; the score is reported
        unknown = rule.unknown(known) if known and not self.multilabel else np.zeros(len(enc), dtype=bool)
        lam = out.get("modality_weights")
        results = []
        for i, it in enumerate(enc.dataset.items):
            tasks = {
                self.task_name(t): task_prediction(probs[t][i], decided[t][i], self.task_classes[t], top)
                for t in self.task_classes
                if t in probs
            }
            if unknown[i]:  # none of the classes: no label, and not "uncertain" between them either
                main = self.task_name(MAIN)
                tasks[main] = dataclasses.replace(tasks[main], labels=[], uncertain=False)
            scored = None
            if known:
                scored = {"score": rule.score, "value": float(known[rule.score][i]), "threshold": rule.threshold}
            weights = None
            if lam is not None:
                weights = {
                    self.task_name(t): {"image": float(lam[i, k]), "text": float(1 - lam[i, k])}
                    for k, t in enumerate(self.task_classes)
                }
            name = it.image.describe() if it.image is not None else it.key
            results.append(Prediction(tasks, weights, str(name), bool(unknown[i]), scored))
        return results

    def task_name(self, task: str) -> str:
        """The name `task` is shown under in predictions: the data column it answers (the main
        label of single-task data is `label`)."""
        if self.task_columns:
            return self.task_columns[list(self.task_classes).index(task)]
        return task

    def explain(self, item: Item | str, target: str | None = None, *, ctx: RunContext | None = None) -> np.ndarray:
        """[h, w] map of where the model looked in `item` (an Item or an image path) for `target`
        (a class name or a text token; None = the predicted class). Methods with attention override it."""
        raise ConfigError(f"method {self.name!r} has no attention to explain")

    # ---- persistence --------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """What model.safetensors holds: the head's state and the declared `tensor_state`."""
        assert self.head is not None, "save_pretrained checks that the model is fitted"
        extra = {k: getattr(self, k) for k in self.tensor_state if getattr(self, k) is not None}
        return {f"head.{k}": v for k, v in self.head.state_dict().items()} | extra

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Rebuild the head from config.json's spec and load its weights; errors name `where`."""
        for k in self.tensor_state:
            setattr(self, k, tensors.get(k))
        self.head = self.build_head(self.head_spec)
        state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        try:
            self.head.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"{where}: the saved weights do not fit the model ({str(e).splitlines()[0]})") from None
        self.head.requires_grad_(False).eval()

    def extra_config(self) -> dict[str, Any]:
        """The declared `state` and the task columns, as config.json keeps them."""
        cols = {"task_columns": self.task_columns} if self.task_columns else {}
        return {k: getattr(self, k) for k in self.state} | cols

    def load_extra_config(self, cfg: dict[str, Any], where: str) -> None:
        """Read back what `extra_config` wrote (a key an older file lacks keeps its default); called
        before `load_tensors`."""
        for k in self.state:
            if k in cfg:
                setattr(self, k, type(getattr(self, k))(cfg[k]))
        cols = cfg.get("task_columns", [])
        if not isinstance(cols, list) or cols and len(cols) != len(self.task_classes):
            raise ConfigError(f"{where}: 'task_columns' must name the data column of every task")
        self.task_columns = [str(c) for c in cols]

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors. config.json is written last and records the weights'
        SHA-256, so a crash in between (or a damaged weights file) is detected at load time."""
        from safetensors.torch import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "model.safetensors") as tmp:
            tensors = {k: v.detach().contiguous().cpu() for k, v in {**self.tensors(), **self.trust.tensors()}.items()}
            save_file(tensors, str(tmp), metadata={"method": self.name})
            digest = sha256_file(tmp)
        cfg = {
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "options": dataclasses.asdict(self.config),
            "classnames": self.classnames,
            "multilabel": self.multilabel,
            "tasks": self.task_classes,
            "decisions": {t: r.to_dict() for t, r in self.decisions.items()},
            **self.trust.config(),
            "head": self.head_spec,
            "backbone": self.backbone.config(),
            "embed_dim": self.backbone.embed_dim,
            "weights_sha256": digest,
            "fit_info": self.fit_info,
            **self.extra_config(),
        }
        import json

        with atomic_path(directory / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Backbone | None = None) -> Method:
        """Load a saved model of this method class (see `load_method`)."""
        return load_method(directory, backbone=backbone, expect=cls.name or None)


def load_method(
    directory: str | Path,
    backbone: Backbone | None = None,
    expect: str | None = None,
) -> Method:
    """Rebuild a saved method (and its backbone, unless one is given); errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..backbones import create_backbone

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such model folder")
    cpath, wpath = directory / "config.json", directory / "model.safetensors"
    if not cpath.is_file():
        raise ConfigError(f"{directory}: not a model folder (no config.json)")
    cfg = read_json(cpath)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cpath}: expected a JSON object")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{cpath}: format_version {cfg.get('format_version')} is not supported (expected {FORMAT_VERSION}; "
            "refit the model with this version)"
        )
    name = cfg.get("method")
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{cpath}: unknown method {name!r}; available: {', '.join(METHODS.names())}")
    if expect and name != expect:
        raise ConfigError(f"{directory}: holds a {name!r} model, not {expect!r}")
    for key, typ in (("classnames", list), ("tasks", dict), ("decisions", dict), ("head", dict), ("backbone", dict)):
        if not isinstance(cfg.get(key), typ):
            raise ConfigError(f"{cpath}: {key!r} missing or not a {typ.__name__}")
    if not wpath.is_file():
        raise ConfigError(f"{wpath}: missing")
    if cfg.get("weights_sha256") != sha256_file(wpath):
        raise ConfigError(f"{wpath}: damaged (its SHA-256 does not match config.json); refit or restore the file")
    if backbone is None:
        bcfg = dict(cfg["backbone"])
        backbone = create_backbone(bcfg.pop("name"), **bcfg)
    if backbone.embed_dim != cfg.get("embed_dim", backbone.embed_dim):
        raise ConfigError(
            f"{directory}: saved for a {cfg['embed_dim']}-d backbone, "
            f"but {backbone.name} gives {backbone.embed_dim}-d features"
        )
    method = METHODS.get(name)(backbone, **cfg.get("options", {}))
    method.classnames = [str(c) for c in cfg["classnames"]]
    method.multilabel = bool(cfg.get("multilabel", False))
    method.task_classes = {str(t): [str(c) for c in cs] for t, cs in cfg["tasks"].items()}
    if not method.task_classes or next(iter(method.task_classes.values())) != method.classnames:
        raise ConfigError(f"{cpath}: 'tasks' must start with the main task, whose classes are 'classnames'")
    method.head_spec = dict(cfg["head"])
    method.fit_info = cfg.get("fit_info", {})
    method.decisions = {
        t: DecisionRule.from_dict(d, len(method.task_classes.get(t, [])), f"{cpath}: decisions[{t!r}]")
        for t, d in cfg["decisions"].items()
    }
    method.trust = Trust.from_config(cfg, method.task_classes, str(cpath))
    method.load_extra_config(cfg, str(cpath))
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{wpath}: damaged ({e})") from None
    # the class count of config.json against what the weights were saved for, before any tensor is
    # read: an edited class list is named as config.json's error, not as a shape mismatch in the weights
    n = len(method.classnames)
    probe = method.head_spec.get("num_classes")
    if probe is not None and probe != n:
        raise ConfigError(f"{cpath}: {n} classnames but the saved head scores {probe} classes")
    means = tensors.get("openset.means")
    if means is not None and means.ndim >= 1 and means.shape[0] != n:
        raise ConfigError(f"{cpath}: {n} classnames but {wpath.name} holds class means of {means.shape[0]} classes")
    method.load_tensors(tensors, str(wpath))
    method.trust.load_tensors(tensors, n, str(wpath))
    return method


def _concat_outputs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in parts[0].items():
        if isinstance(v, torch.Tensor) and v.dim():
            out[k] = torch.cat([p[k] for p in parts])
        elif isinstance(v, dict):
            out[k] = {t: torch.cat([p[k][t] for p in parts]) for t in v}
    return out


def feature_keys(needs: frozenset[str]) -> list[str]:
    """The feature keys a head reads, in the protocol's order."""
    return [k for k in KEYS if k in needs]


def check_features(f: Features, needs: frozenset[str], what: str) -> None:
    """Fail early, naming the field, when features a method needs are missing or not finite."""
    for key in feature_keys(needs):
        if not f.has(key):
            raise ConfigError(f"{what}features: no {key!r} features (extract them, or use data that has them)")
        check_finite(f.tensor(key), f"{what}{key} features")


def check_option_types(method: str, config_cls: type, options: dict[str, Any]) -> None:
    """A value of the wrong type (e.g. `--opt iters=abc`) is named here, not deep inside training.

    The expected type is the field's default's type; fields whose annotation admits several
    types (`str | list[str]`, `... | None`) are left to the method's own checks."""
    for f in dataclasses.fields(config_cls):
        if f.name not in options:
            continue
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "|" in ann or "Any" in ann or "Optional" in ann or "Union" in ann:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if default is None:
            continue
        value = options[f.name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(
                f"method {method!r}: option {f.name}={value!r} must be {type(default).__name__} (e.g. {default!r})"
            )


def check_finite(x: torch.Tensor, what: str) -> None:
    """A DataError naming the first row with NaN or infinite values."""
    if x.numel() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(dim=-1).nonzero()[0, 0]) if x.dim() > 1 else 0
        raise DataError(f"{what}: NaN or infinite values (first at row {bad})")


def check_dim(x: torch.Tensor, expected: int, what: str) -> None:
    """A saved head met features of another width (e.g. loaded with a different backbone)."""
    if x.shape[-1] != expected:
        raise ConfigError(f"{what}: features are {x.shape[-1]}-d but the saved head expects {expected}-d")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> float32 unit vectors (cosine scores everywhere)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """`n` values from `lo` to `hi`, evenly spaced in log scale (hyper-parameter grids)."""
    return [10 ** (math.log10(lo) + i * (math.log10(hi) - math.log10(lo)) / (n - 1)) for i in range(n)]
