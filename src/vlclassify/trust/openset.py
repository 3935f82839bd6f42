""" "Unknown": an open-set score per image, chosen on validation, and the threshold below which
a model answers that the image shows none of its classes.

Scores (higher = more like a known class):

    max_prob     the top calibrated probability ("max softmax")
    energy       T * logsumexp(logits / T) (Liu et al. 2020), T the calibration's temperature
    cosine       max cosine between the image's feature and the class means of the training features
    mahalanobis  minus the smallest Mahalanobis distance to a class mean, one shared (shrunk) covariance

Which one: a feature score whenever the model holds the class means of its training features
(issue 22 measured max cosine at 0.99 AUROC where max softmax gave 0.57-0.88; docs/trust.md
measures all four), else a logit score; within that family the one with the best held-out-class
AUROC on validation, ties going to the first (cosine, max_prob). The proxy: each class in turn
plays the unknown, its validation images against the others', every score computed as if the
class were not there (its column, or its class mean, left out), AUROC averaged over classes.

Why not rank all four by the proxy: it is exact for the feature scores (the class means left
are those of a model that never saw the class) but flatters max_prob and energy, whose head was
trained with the held-out class as a negative: docs/trust.md sets the proxy's numbers beside the
AUROC against real unknowns. Within a family the bias is shared, so the comparison is fair.

Threshold: the score that keeps `keep` (default 95%) of the known validation images. A model
fitted without validation data, or whose validation data lacks a class (an update's new data
often has only some of the classes), has no threshold: it never answers "unknown", and says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..metrics.openset import KEEP, auroc, keep_threshold
from ..training.selection import select_best
from .calibration import Calibration

SCORES = ("cosine", "mahalanobis", "max_prob", "energy")
FEATURE_SCORES = ("cosine", "mahalanobis")  # candidate order within a family: ties go to the first
LOGIT_SCORES = ("max_prob", "energy")
UNKNOWN = "unknown"


@dataclass
class FeatureStats:
    """Class means [C, D] and the shared precision matrix [D, D] of the L2-normalised training features."""

    means: torch.Tensor  # [C, D] mean of each class's unit feature vectors
    precision: torch.Tensor  # [D, D] inverse of the Ledoit-Wolf-shrunk within-class covariance

    @classmethod
    def fit(cls, features: torch.Tensor, targets: np.ndarray, num_classes: int) -> FeatureStats:
        """From training features [N, D] and labels ([N] class index, or [N, C] 0/1 multi-hot).

        Few shots give far fewer images than dimensions, so the covariance is shrunk towards a
        scaled identity (Ledoit-Wolf) before it is inverted. A multi-label image counts towards
        every class it has; its residual is taken from the mean of its classes' means. One image
        per class leaves no residual: the covariance is then the identity (Euclidean distance).
        """
        from sklearn.covariance import ledoit_wolf

        x = torch.nn.functional.normalize(features.double(), dim=-1).numpy()
        y = np.asarray(targets)
        onehot = y.astype(np.float64) if y.ndim == 2 else np.eye(num_classes)[y]
        count = onehot.sum(0)
        means = (onehot.T @ x) / np.maximum(count, 1)[:, None]  # [C, D]; a class without images stays 0
        share = onehot / np.maximum(onehot.sum(1, keepdims=True), 1)  # [N, C] each image's classes, equally
        centre = share @ means + (onehot.sum(1, keepdims=True) == 0) * x.mean(0)  # [N, D]
        cov = ledoit_wolf(x - centre, assume_centered=True)[0]  # [D, D]
        scale = float(np.trace(cov)) / cov.shape[0]
        # one image per class leaves no residual: the distance is then the Euclidean one
        cov = np.eye(cov.shape[0]) if scale <= 1e-12 else cov + 1e-6 * scale * np.eye(cov.shape[0])
        return cls(torch.from_numpy(means).float(), torch.from_numpy(np.linalg.inv(cov)).float())

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C] cosine between each image's feature [N, D] and each class mean (in the features' dtype)."""
        x = torch.nn.functional.normalize(features, dim=-1)
        m = torch.nn.functional.normalize(self.means.to(features.dtype), dim=-1)
        return x @ m.T

    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C] minus the squared Mahalanobis distance of each unit feature [N, D] to each class mean."""
        x = torch.nn.functional.normalize(features, dim=-1)
        m, p = self.means.to(features.dtype), self.precision.to(features.dtype)
        xp = x @ p  # [N, D]
        d = (xp * x).sum(-1, keepdim=True) - 2 * (xp @ m.T) + ((m @ p) * m).sum(-1)[None]
        return -d

    def tensors(self, prefix: str = "openset.") -> dict[str, torch.Tensor]:
        """What model.safetensors holds of them."""
        return {f"{prefix}means": self.means, f"{prefix}precision": self.precision}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], where: str, prefix: str = "openset."
    ) -> FeatureStats | None:
        """Read back `tensors()`; None when the file holds none; errors name `where`."""
        if f"{prefix}means" not in tensors:
            return None
        means, prec = tensors[f"{prefix}means"], tensors.get(f"{prefix}precision")
        if prec is None or means.dim() != 2 or tuple(prec.shape) != (means.shape[1], means.shape[1]):
            raise ConfigError(f"{where}: {prefix}means / {prefix}precision are missing or of mismatched shapes")
        return cls(means.float(), prec.float())


def score_tensors(
    logits: torch.Tensor,
    calibration: Calibration,
    features: torch.Tensor | None = None,
    stats: FeatureStats | None = None,
    classes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{score: [N]} in the dtype of the raw logits [N, C] (torch ops only: the ONNX graph traces
    them); with `stats`, the feature scores of the images' features [N, D]. `classes`: computed
    as if only these classes existed (the held-out-class proxy)."""
    z = calibration.logits(logits)  # [N, C] calibrated logits
    if classes is not None:
        z = z[:, classes]
    top, lse = z.max(-1).values, torch.logsumexp(z, -1)
    out = {
        "max_prob": torch.exp(top - lse) if calibration.activation == "softmax" else torch.sigmoid(top),
        "energy": calibration.temperature * lse,
    }
    if stats is not None and features is not None:
        f = features.to(logits.dtype)
        for name, mat in (("cosine", stats.cosine(f)), ("mahalanobis", stats.mahalanobis(f))):
            out[name] = (mat if classes is None else mat[:, classes]).max(-1).values
    return out


def open_set_scores(
    logits: torch.Tensor,
    calibration: Calibration,
    features: torch.Tensor | None = None,
    stats: FeatureStats | None = None,
    classes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """`score_tensors` in float64, as numpy: what fit, predict and eval compare."""
    idx = torch.as_tensor(classes) if classes is not None else None
    feats = features.double() if features is not None else None
    return {
        k: v.numpy() for k, v in score_tensors(torch.as_tensor(logits).double(), calibration, feats, stats, idx).items()
    }


@dataclass
class OpenSetRule:
    """When a model answers "unknown": its chosen score below `threshold` (saved in config.json)."""

    score: str = ""  # the chosen score ("" = off: no validation data)
    threshold: float | None = None  # answers "unknown" below it
    keep: float = KEEP  # share of known validation images the threshold keeps
    source: str = "default"  # validation | default
    note: str = ""  # why it is off, how it was chosen
    heldout_auroc: dict[str, float] | None = None  # the proxy's mean AUROC per candidate score

    def __post_init__(self) -> None:
        if self.score and self.score not in SCORES:
            raise ConfigError(f"open-set score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}")
        if self.score and (self.threshold is None or not math.isfinite(self.threshold)):
            raise ConfigError(f"open-set score {self.score!r} needs a finite threshold, got {self.threshold!r}")

    @property
    def enabled(self) -> bool:
        """Whether the model answers "unknown" at all."""
        return bool(self.score)

    def unknown(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """[N] bool: the images whose chosen score is below the threshold (all False when off)."""
        if not self.enabled:
            return np.zeros(len(next(iter(scores.values()))), dtype=bool)
        if self.score not in scores:
            raise ConfigError(f"open-set score {self.score!r} was not computed (the model has no feature statistics)")
        assert self.threshold is not None, "__post_init__: an enabled rule has a threshold"
        return np.asarray(scores[self.score]) < self.threshold

    def describe(self) -> str:
        """One line for the CLI."""
        if not self.enabled:
            return f"off ({self.note})" if self.note else "off"
        return (
            f"'{UNKNOWN}' below {self.threshold:.4g} of the {self.score} score "
            f"(keeps {100 * self.keep:.0f}% of the known validation images){'; ' + self.note if self.note else ''}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON for config.json "open_set" (`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "open_set") -> OpenSetRule:
        """Read back a saved rule; errors name `where`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls(**d)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{where}: not an open-set rule ({e})") from None


def heldout_class_auroc(
    logits: torch.Tensor,
    labels: np.ndarray,
    calibration: Calibration,
    features: torch.Tensor | None = None,
    stats: FeatureStats | None = None,
) -> dict[str, float]:
    """{score: mean over classes of the AUROC of that class's validation images (as unknowns)
    against the other classes' images, scores computed without the class}; single-label [N] labels."""
    y = np.asarray(labels)
    num = torch.as_tensor(logits).shape[1]
    per: dict[str, list[float]] = {}
    for c in range(num):
        out, known = y == c, (y >= 0) & (y != c)
        if not out.any() or not known.any():
            continue
        s = open_set_scores(logits, calibration, features, stats, classes=np.delete(np.arange(num), c))
        for name, v in s.items():
            per.setdefault(name, []).append(auroc(v[known], v[out]))
    return {name: float(np.mean(v)) for name, v in per.items()}


def choose_open_set(
    logits: torch.Tensor | None,
    targets: np.ndarray | None,
    calibration: Calibration,
    features: torch.Tensor | None = None,
    stats: FeatureStats | None = None,
    keep: float = KEEP,
) -> OpenSetRule:
    """The open-set rule for validation logits [N, C] and targets ([N], or [N, C] multi-label):
    the score (module docstring; multi-label: the family's first — no class can be held out of
    images that have several), and its threshold at `keep`. Without validation data the rule is
    off, with a note."""
    if logits is None or targets is None or not len(logits):
        return OpenSetRule(keep=keep, note="fitted without validation data: never answers 'unknown'")
    y = np.asarray(targets)
    seen = y.any(axis=0) if y.ndim == 2 else np.isin(np.arange(logits.shape[1]), y)
    if not seen.all():  # e.g. an update's new data: a threshold chosen without a class's images says nothing of them
        missing = np.flatnonzero(~seen).tolist()
        return OpenSetRule(
            keep=keep,
            note=f"no validation images of class(es) {', '.join(map(str, missing))}: never answers 'unknown'",
        )
    family, what = (
        (FEATURE_SCORES, "feature") if stats is not None and features is not None else (LOGIT_SCORES, "logit")
    )
    proxy = None
    if y.ndim == 2:
        name, note = family[0], f"multi-label: {family[0]}, the first {what} score"
    else:
        proxy = heldout_class_auroc(logits, y, calibration, features, stats)
        usable = [s for s in family if s in proxy]
        if not usable:
            name, note = family[0], f"too few validation classes to compare: {family[0]}, the first {what} score"
        else:
            name = select_best(usable, lambda s: proxy[s], default=usable[0]).best
            note = f"best held-out-class AUROC on validation among the {what} scores ({proxy[name]:.3f})"
    scores = open_set_scores(logits, calibration, features, stats)[name]
    thr = keep_threshold(scores, keep)
    return OpenSetRule(name, thr, keep, "validation", note, proxy)
