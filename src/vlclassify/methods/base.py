"""The method contract: what every method declares, and everything methods share.

    method = create_method("linear-probe", backbone)
    method.fit(train, val)                  # Dataset or Encoded (dataset + cached features)
    probs = method.predict_proba(test)      # [N, C] scores
    found = method.predict(test)            # decisions: [N] class or -1 ("uncertain"), or [N, C] bool
    for r in method.predict_results(test):  # per item: labels found, top scores, per task
        print(r.labels, r.scores)
    method.save_pretrained("out/")          # config.json + model.safetensors (no pickles)
    same = load_method("out/")              # rebuilds the backbone from the saved config

What a method file declares (docs/methods.md is generated from these, `vlclassify methods --contract`):

| declaration | meaning |
|---|---|
| `kinds` | the data it takes: single-label, multi-label, paired-text (an image's text as input), multi-task |
| `optional_kinds` | kinds that an option enables (a probe on paired texts, zero-shot on them) |
| `needs` | the features it reads: image (joint embedding), pooled, spatial, text (paired-text embedding), flip, trunk |
| `build_head(spec)` | the nn.Module whose forward maps a feature batch to `{"logits"}` (and, with targets, `"loss"`) |
| `stages(train)` | the Trainer stages that train the head; none for training-free methods |
| `selects` | what validation chooses (C, alpha, the training step, ...) with the one selection rule |
| decision | chosen on validation by `fit`: argmax, a target precision, or per-class thresholds |

A kind the method does not take is refused with one line *before any feature is extracted*,
naming the methods that take it. Paired texts or extra tasks that a method cannot use are not an
error: it learns the image and the main label, and `fit_info["ignored"]` says so.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, cast

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone
from ..data.items import Dataset, Item
from ..data.precomputed import class_text_of
from ..errors import ConfigError, DataError
from ..features import FeatureCache, FeatureSet, extract_features
from ..features.stream import StoredRows, StreamedFeatures, stored_rows
from ..training import Stage, Trainer, TrainResult
from ..training.trainer import BatchFn
from ..utils import atomic_path, read_json, seeded, sha256_file
from .decision import MAIN as MAIN  # the main task's name, re-exported: the method modules import it from here
from .decision import DecisionRule, Prediction, choose_rule, default_rule, task_prediction
from .templates import cached_template_embeddings

FORMAT_VERSION = 2
SINGLE, MULTI, TEXT, TASKS = "single-label", "multi-label", "paired-text", "multi-task"
KINDS = (SINGLE, MULTI, TEXT, TASKS)
FEATURES = ("image", "pooled", "spatial", "text", "flip", "trunk")  # trunk: activations at a backbone.split cut


@dataclass
class Encoded:
    """A dataset together with its (cached) features, row-aligned."""

    dataset: Dataset
    features: FeatureSet
    rows: StoredRows | None = None  # streamed training: the rows stay in the store, read per batch

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Encoded:
        """The rows at `idx` of the items and their features together."""
        return Encoded(self.dataset.subset(idx), self.features.index(idx))


@dataclass
class TrainOptions:
    """Options every trainable method has, under one name each (method configs inherit them)."""

    seed: int = 0  # initialisation, batch order and dropout (the caller's global RNG is left alone)
    threads: int = 0  # torch threads while training; 0 = auto (1 for small problems or a loaded machine)
    run_dir: str | None = None  # checkpoints + log.jsonl; a killed fit re-run with the same folder resumes


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
    from .registry import METHODS

    return [n for n in METHODS.names() if kind in METHODS.get(n).kinds | METHODS.get(n).optional_kinds]


def as_dataset(items: Dataset | Sequence[Item] | Sequence[str], classnames: Sequence[str]) -> Dataset:
    """Accept a Dataset, a list of Items or a list of image paths."""
    if isinstance(items, Dataset):
        return items
    rows = list(items)
    if rows and isinstance(rows[0], str):
        from ..data.loaders import file_key

        paths = cast(list[str], rows)
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{missing[0]}: image file not found")
        rows = [Item(image=p, key=file_key(p)) for p in paths]
    return Dataset(items=cast(list[Item], rows), classnames=list(classnames), name="input")


class Method:
    """Base class. A subclass sets `name`, `Config`, `kinds`, `needs`, and implements `_fit`
    (build `self.head`, train it through `train_head` or choose its grid with
    training.select_best) and `build_head(spec)` (rebuild the head from its saved spec)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    kinds: ClassVar[frozenset[str]] = frozenset({SINGLE})
    optional_kinds: ClassVar[frozenset[str]] = frozenset()  # kinds an option enables (e.g. feature="text")
    selects: ClassVar[str] = ""  # what validation chooses besides the decision rule (docs/methods.md)
    needs: ClassVar[frozenset[str]] = frozenset({"image"})
    infer_batch: ClassVar[int] = 1024  # rows per head forward at inference
    trains_on_images: ClassVar[bool] = True  # False: fit reads only the class names (and validation images)

    def __init__(self, backbone: Backbone, cache: FeatureCache | None = None, **options: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(
                f"method {self.name!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
            )
        check_option_types(self.name, self.Config, options)
        self.config = self.Config(**options)
        self.backbone = backbone
        self.cache = cache or FeatureCache()
        self.classnames: list[str] = []  # the main task's classes
        self.task_classes: dict[str, list[str]] = {}  # every task the model answers (main first) -> classes
        self.multilabel = False  # the main task has independent labels (sigmoid scores, thresholds)
        self.decisions: dict[str, DecisionRule] = {}  # task -> rule chosen on validation
        self.head: nn.Module | None = None
        self.head_spec: dict[str, Any] = {}  # JSON that `build_head` rebuilds the head from
        self.fit_info: dict[str, Any] = {}
        self.progress = True
        self.runtime = "auto"  # extraction runtime; "torch" once a method changes the backbone's weights
        self.skip_bad = False  # unreadable images: skipped with a warning (True) or an error naming them
        self.stream = False  # train on batches read from the feature store, not one in-memory tensor
        self.class_text: torch.Tensor | None = None  # [C, D] class texts given with the data (a feature file)

    # ---- declarations (per instance: some depend on options) ------------------------------
    def takes(self) -> frozenset[str]:
        """The data kinds this configured method takes."""
        return type(self).kinds

    def feature_needs(self) -> frozenset[str]:
        """The features this configured method reads."""
        return type(self).needs

    def training_views(self) -> tuple[str, ...]:
        """The image views `fit` extracts for the training images, "orig" first (features/extract.py
        VIEWS): with "flip" in `needs`, the original and the mirror image."""
        return ("orig", "flip") if "flip" in self.feature_needs() else ("orig",)

    def stages(self, train: Encoded) -> list[Stage]:
        """The Trainer stages that train the head (none: training-free)."""
        return []

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        """The head module described by `spec` (shapes, class count), with fresh weights."""
        raise NotImplementedError

    def requires_all_classes(self) -> bool:
        """Whether every class needs a training image (False for methods that classify by name)."""
        return True

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

    def encode(self, data: Dataset | Encoded, training: bool = False) -> Encoded:
        """The features this method needs (training: with the augmented views it trains on)."""
        needs = self.feature_needs()
        views = self.training_views() if training else ("orig",)
        if isinstance(data, Encoded):
            if "spatial" in needs and data.features.spatial is None:
                raise ConfigError(f"method {self.name!r} needs spatial features; extract with spatial=True")
            missing = [v for v in views[1:] if v not in data.features.views]
            if missing:
                raise ConfigError(f"method {self.name!r} needs cached view(s) {', '.join(missing)}")
            return data
        if training and self.stream and data.features is None:
            keys = feature_keys(needs)
            y = torch.from_numpy(data.multi_hot() if data.multilabel else data.labels())
            rows = stored_rows(self.backbone, data, views, keys, y, self.cache, self.runtime, self.progress)
            return Encoded(data, StreamedFeatures(len(data), rows.grid, self.name), rows)  # type: ignore[arg-type]
        feats = extract_features(
            self.backbone,
            data,
            views=views,
            spatial="spatial" in needs,
            text="text" in needs or None,
            cache=self.cache,
            progress=self.progress,
            runtime=self.runtime,
            skip_bad=self.skip_bad,
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
        precision: float | None = None,
        thresholds: str = "per-class",
    ) -> Self:
        """Learn from `train`, choose hyper-parameters, checkpoints and the decision rule on `val`.

        precision: for single-label data, answer only when the top class reaches this precision on
        validation, else "uncertain". thresholds: per-class | global (multi-label decisions).
        """
        if thresholds not in ("per-class", "global"):
            raise ConfigError(f"thresholds must be per-class or global, got {thresholds!r}")
        ds = dataset_of(train)
        notes = self.check_data(ds)
        if val is not None and len(val):
            self.check_data(dataset_of(val))
        if ds.num_classes < 2:
            raise DataError(f"{ds.name}: need at least 2 classes, got {ds.num_classes}")
        tr = self.encode(train, training=True) if self.trains_on_images else None
        va = self.encode(val) if val is not None and len(val) else None
        if not ds.multilabel and self.requires_all_classes():
            y = ds.labels()
            absent = [ds.classnames[c] for c in range(ds.num_classes) if not np.any(y == c)]
            if absent:
                raise DataError(f"{ds.name}: no training images for class(es) {', '.join(absent)}")
        for enc, what in ((tr, ds.name), (va, "validation")):
            if enc is not None and enc.rows is None:
                check_features(enc.features, self.feature_needs(), f"{what} ")
        self.classnames = list(ds.classnames)
        self.class_text = class_text_of(ds)
        self.multilabel = bool(ds.multilabel)
        self.task_classes = {MAIN: list(ds.classnames)}
        self.fit_info = {}
        with torch.enable_grad():
            self._fit(tr, va)
        assert self.head is not None, f"{self.name}: _fit must build self.head"
        self.head.requires_grad_(False).eval()  # a fitted model is for inference; training re-enables what it trains
        if notes:
            self.fit_info["ignored"] = notes
        self.choose_decisions(va, precision=precision, per_class=thresholds == "per-class")
        return self

    def update(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        *,
        classes: Sequence[str] = (),
        descriptions: dict[str, str] | None = None,
        precision: float | None = None,
        thresholds: str = "per-class",
    ) -> Method:
        """Add labelled examples (`train`) and classes (`classes`, or new ones in `train`) to a fitted
        model. Methods that can add to what they learnt override `_update` (zero-shot, Tip-Adapter,
        linear probe, iCAR); the others refit on `train` alone, and fit_info["update"] says so."""
        self._check_fitted()
        merged = list(dict.fromkeys([*self.classnames, *classes, *(train.classnames if train is not None else [])]))
        added = [c for c in merged if c not in self.classnames]
        train = train.with_classes(merged) if train is not None else None
        val = val.with_classes(merged) if val is not None and len(val) else None
        how = self._update(train, val, merged, descriptions or {})
        if how is None:
            if train is None:
                raise DataError(f"{self.name} learns from images and cannot add to a fitted model: give new data")
            absent = [c for i, c in enumerate(merged) if not train.multilabel and not np.any(train.labels() == i)]
            if absent and self.requires_all_classes():
                from .registry import METHODS

                adders = [n for n in METHODS.names() if METHODS.get(n)._update is not Method._update]
                raise DataError(
                    f"{self.name} cannot add to a fitted model, so update refits it on the new data, which has no "
                    f"images of {', '.join(absent)}: give data with every class, or use {', '.join(adders)}"
                )
            self.fit(train, val, precision=precision, thresholds=thresholds)
            how = f"refit from scratch on the new data ({self.name} cannot add to a fitted model)"
        else:
            self.choose_decisions(self.encode(val) if val is not None else None, precision, thresholds == "per-class")
        self.fit_info["update"] = {"how": how, "added_classes": added, "new_examples": len(train or [])}
        return self

    def _update(
        self, train: Dataset | None, val: Dataset | None, classes: list[str], descriptions: dict[str, str]
    ) -> str | None:
        """Add `train`'s examples and the classes `classes` (the old ones first) in place; -> how it
        was done, or None when this method cannot (update then refits)."""
        return None

    def _fit(self, train: Encoded | None, val: Encoded | None) -> None:
        """Build `self.head` (`init_head`) and train it or choose its grid on `val`; `train` is
        None for methods that do not train on images (`trains_on_images = False`)."""
        raise NotImplementedError

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
            self.backbone, self.classnames, templates, self.cache, descriptions, self.class_text
        )

    def default_decision(self, task: str, num_classes: int) -> DecisionRule:
        """The rule without validation data."""
        multi = self.multilabel and task == MAIN
        return default_rule(multi, num_classes, "no validation set: labels scoring >= 0.5" if multi else "")

    def task_targets(self, ds: Dataset, task: str) -> np.ndarray:
        """Validation targets of `task` in the model's class indices ([N], or [N, C] multi-hot)."""
        if task == MAIN:
            return ds.multi_hot() if self.multilabel else ds.labels()
        return ds.task_labels(task)

    # ---- training through the one Trainer ---------------------------------------------------
    def train_head(
        self,
        train: Encoded,
        val: Encoded | None,
        stages: Sequence[Stage],
        batches: BatchFn | None = None,
        metric: Callable[[nn.Module], dict[str, float]] | None = None,
        work: int | None = None,
        run: str = "",
    ) -> TrainResult:
        """Train `self.head` with the Trainer: batches of cached features (default), validated on
        the main task's score (accuracy, or mAP for multi-label data) unless `metric` is given.
        `run` names a sub-folder of `run_dir` when one fit trains several heads (a grid)."""
        cfg = self.config
        assert self.head is not None, "train_head trains the head init_head built"
        if metric is None and val is not None:
            metric = self.val_metric(val)
        run_dir = getattr(cfg, "run_dir", None)
        result = Trainer(
            self.head,
            batches or self.feature_batches(train),
            None,
            stages,
            metric=metric,
            monitor="score" if metric else None,
            mode="max" if metric else None,
            out_dir=(Path(run_dir) / run if run else run_dir) if run_dir else None,
            seed=getattr(cfg, "seed", 0),
            progress=self.progress,
            threads=getattr(cfg, "threads", 0),
            work=work,
        ).fit()
        self.head.eval()
        self.fit_info["training"] = {
            "monitor": "validation accuracy" if not self.multilabel else "validation mAP",
            "stages": [dataclasses.asdict(s) for s in result.stages],
            "history": [
                {k: v for k, v in r.items() if k in ("stage", "epoch", "step", "train_loss", "val_score")}
                for r in result.history
            ],
        }
        return result

    def train_tensors(self, train: Encoded) -> dict[str, torch.Tensor]:
        """Row-aligned training tensors: every cached view is a sample of its own."""
        f, needs = train.features, self.feature_needs()
        views = [f] + ([f.views["flip"]] if "flip" in needs and "flip" in f.views else [])
        out = {k: torch.cat([v.tensor(k).float() for v in views]) for k in feature_keys(needs)}
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
        from ..metrics import mean_average_precision

        if self.multilabel:
            y = val.dataset.multi_hot()
            return lambda head: {"score": mean_average_precision(y, self._scores(self._forward(head, val)["logits"]))}
        yt = torch.as_tensor(val.dataset.labels())
        return lambda head: {"score": float((self._forward(head, val)["logits"].argmax(-1) == yt).float().mean())}

    def init_head(self, spec: dict[str, Any]) -> nn.Module:
        """Build the head for a new fit, its random initialisation drawn from the method's seed."""
        self.head_spec = dict(spec)
        with seeded(getattr(self.config, "seed", 0)):
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

    def outputs(self, data: Dataset | Encoded | Sequence[Item] | Sequence[str]) -> dict[str, Any]:
        """Head outputs for `data`: "logits" [N, C] (main task), optional "task_logits" {task: [N, C_t]}
        and "modality_weights" [N, K] (image weight per task)."""
        self._check_fitted()
        enc = self.encode(data if isinstance(data, Encoded) else as_dataset(data, self.classnames))
        check_features(enc.features, self.feature_needs(), "")
        return self._outputs(enc)

    def _outputs(self, enc: Encoded) -> dict[str, Any]:
        assert self.head is not None, "callers check that the model is fitted"
        return self._forward(self.head, enc)

    def _scores(self, logits: torch.Tensor, task: str = MAIN) -> np.ndarray:
        """Logits -> scores: sigmoid for the multi-label main task, else softmax."""
        z = logits.float()
        return (torch.sigmoid(z) if self.multilabel and task == MAIN else torch.softmax(z, -1)).numpy()

    def logits(self, data: Dataset | Encoded | Sequence[Item] | Sequence[str]) -> torch.Tensor:
        """[N, C] main-task logits (before the sigmoid / softmax of `predict_proba`)."""
        logits: torch.Tensor = self.outputs(data)["logits"]
        return logits

    def predict_proba(self, data: Dataset | Encoded | Sequence[Item] | Sequence[str]) -> np.ndarray:
        """[N, C] scores of the main task."""
        return self._scores(self.logits(data))

    def task_probs(self, data: Dataset | Encoded | Sequence[Item] | Sequence[str]) -> dict[str, np.ndarray]:
        """{task: [N, C_t] scores} for every task the model answers, the main task first."""
        out = self.outputs(data)
        probs = {MAIN: self._scores(out["logits"])}
        for task, z in (out.get("task_logits") or {}).items():
            probs[task] = self._scores(z, task)
        return {t: probs[t] for t in self.task_classes if t in probs}

    def predict(self, data: Dataset | Encoded | Sequence[Item] | Sequence[str]) -> np.ndarray:
        """Decisions of the main task: [N] class index (-1 = uncertain), or [N, C] bool (multi-label)."""
        return self.decision(MAIN).apply(self.predict_proba(data))

    def decision(self, task: str = MAIN) -> DecisionRule:
        """The decision rule of `task` (chosen on validation at fit, else the default)."""
        if task not in self.decisions:
            self.decisions[task] = self.default_decision(task, len(self.task_classes.get(task, self.classnames)))
        return self.decisions[task]

    def predict_results(
        self, data: Dataset | Encoded | Sequence[Item] | Sequence[str], top: int = 5
    ) -> list[Prediction]:
        """One Prediction per item: every task's decision and top scores, and modality weights."""
        self._check_fitted()
        enc = self.encode(data if isinstance(data, Encoded) else as_dataset(data, self.classnames))
        out = self._outputs(enc)
        probs = {MAIN: self._scores(out["logits"])}
        probs.update({t: self._scores(z, t) for t, z in (out.get("task_logits") or {}).items()})
        decided = {t: self.decision(t).apply(p) for t, p in probs.items()}
        lam = out.get("modality_weights")
        results = []
        for i, it in enumerate(enc.dataset.items):
            tasks = {
                self.task_name(t): task_prediction(probs[t][i], decided[t][i], self.task_classes[t], top)
                for t in self.task_classes
                if t in probs
            }
            weights = None
            if lam is not None:
                weights = {
                    self.task_name(t): {"image": float(lam[i, k]), "text": float(1 - lam[i, k])}
                    for k, t in enumerate(self.task_classes)
                }
            name = it.image if isinstance(it.image, str) else it.key
            results.append(Prediction(tasks, weights, str(name)))
        return results

    def task_name(self, task: str) -> str:
        """The name `task` is shown under in predictions: the data column it answers (the main
        label of single-task data is `label`)."""
        return task

    def explain(self, item: Item | str, target: str | None = None) -> np.ndarray:
        """[h, w] map of where the model looked in `item` (an Item or an image path) for `target`
        (a class name or a text token; None = the predicted class). Methods with attention override it."""
        raise ConfigError(f"method {self.name!r} has no attention to explain")

    # ---- persistence --------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """What model.safetensors holds: the head's state (methods may add more)."""
        assert self.head is not None, "save_pretrained checks that the model is fitted"
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Rebuild the head from config.json's spec and load its weights; errors name `where`."""
        self.head = self.build_head(self.head_spec)
        state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        try:
            self.head.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"{where}: the saved weights do not fit the model ({str(e).splitlines()[0]})") from None
        self.head.requires_grad_(False).eval()

    def extra_config(self) -> dict[str, Any]:
        """More JSON for config.json (what `load_extra_config` reads back)."""
        return {}

    def load_extra_config(self, cfg: dict[str, Any]) -> None:
        """Read back what `extra_config` wrote; called before `load_tensors`."""

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors. config.json is written last and records the weights'
        SHA-256, so a crash in between (or a damaged weights file) is detected at load time."""
        from safetensors.torch import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "model.safetensors") as tmp:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
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
    def from_pretrained(
        cls, directory: str | Path, backbone: Backbone | None = None, cache: FeatureCache | None = None
    ) -> Method:
        """Load a saved model of this method class (see `load_method`)."""
        return load_method(directory, backbone=backbone, cache=cache, expect=cls.name or None)


def load_method(
    directory: str | Path,
    backbone: Backbone | None = None,
    cache: FeatureCache | None = None,
    expect: str | None = None,
) -> Method:
    """Rebuild a saved method (and its backbone, unless one is given); errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..backbones import create_backbone
    from .registry import METHODS

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
    method = METHODS.get(name)(backbone, cache=cache, **cfg.get("options", {}))
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
    method.load_extra_config(cfg)
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{wpath}: damaged ({e})") from None
    method.load_tensors(tensors, str(wpath))
    n = len(method.classnames)
    probe = method.head_spec.get("num_classes")
    if probe is not None and probe != n:
        raise ConfigError(f"{cpath}: {n} classnames but the saved head scores {probe} classes")
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
    """The FeatureSet tensors a head reads (`needs` minus the augmentation views)."""
    return [k for k in ("image", "pooled", "spatial", "text") if k in needs]


def check_features(f: FeatureSet, needs: frozenset[str], what: str) -> None:
    """Fail early, naming the field, when features a method needs are missing or not finite."""
    for key in feature_keys(needs):
        x = getattr(f, key)
        if x is None:
            raise ConfigError(f"{what}features: no {key!r} features (extract them, or use data that has them)")
        check_finite(x, f"{what}{key} features")


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
