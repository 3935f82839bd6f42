"""The one interface every method implements, and what it shares.

method = create_method("zero-shot", backbone, templates="select7")
method.fit(train, val)                 # Dataset or Encoded (dataset + cached features)
probs = method.predict_proba(test)      # [N, C] numpy
method.save_pretrained("out/")          # config.json + model.safetensors (no pickles)
same = load_method("out/")              # rebuilds the backbone from the saved config
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..backbones.base import Backbone
from ..data.items import Dataset, Item
from ..errors import ConfigError, DataError
from ..features import FeatureCache, FeatureSet, extract_features
from ..utils import atomic_path, read_json

FORMAT_VERSION = 1


@dataclass
class Encoded:
    """A dataset together with its (cached) features, row-aligned."""

    dataset: Dataset
    features: FeatureSet

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Encoded:
        return Encoded(self.dataset.subset(idx), self.features.index(idx))


def as_dataset(items: Dataset | Sequence[Item] | Sequence[str], classnames: Sequence[str]) -> Dataset:
    """Accept a Dataset, a list of Items or a list of image paths."""
    if isinstance(items, Dataset):
        return items
    items = list(items)
    if items and isinstance(items[0], str):
        from ..data.loaders import file_key

        missing = [p for p in items if not Path(p).is_file()]
        if missing:
            raise DataError(f"{missing[0]}: image file not found")
        items = [Item(image=p, key=file_key(p)) for p in items]
    return Dataset(items=items, classnames=list(classnames), name="input")


class Method:
    """Base class. Subclasses set `name`, `Config`, and implement `_fit` / `_logits`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    needs_spatial: ClassVar[bool] = False  # extract spatial tokens for this method
    train_views: ClassVar[tuple[str, ...]] = ("orig",)  # augmentation views cached for training
    multilabel: ClassVar[bool] = False  # outputs independent sigmoids instead of a softmax

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
        self.classnames: list[str] = []
        self.fit_info: dict[str, Any] = {}
        self.progress = True
        self.runtime = "auto"  # extraction runtime; "torch" once a method changes the backbone's weights

    # ---- features -----------------------------------------------------------------------
    def encode(self, data: Dataset | Encoded, views: Sequence[str] = ("orig",)) -> Encoded:
        if isinstance(data, Encoded):
            missing = [v for v in views[1:] if v not in data.features.views]
            if self.needs_spatial and data.features.spatial is None:
                raise ConfigError(f"method {self.name!r} needs spatial features; extract with spatial=True")
            if missing:
                raise ConfigError(f"method {self.name!r} needs cached view(s) {', '.join(missing)}")
            return data
        feats = extract_features(
            self.backbone,
            data,
            views=views,
            spatial=self.needs_spatial,
            cache=self.cache,
            progress=self.progress,
            runtime=self.runtime,
        )
        return Encoded(data, feats)

    # ---- API ----------------------------------------------------------------------------
    def fit(self, train: Dataset | Encoded, val: Dataset | Encoded | None = None) -> Method:
        tr = self.encode(train, self.train_views)
        va = self.encode(val) if val is not None and len(val) else None
        ds = tr.dataset
        if ds.num_classes < 2:
            raise DataError(f"{ds.name}: need at least 2 classes, got {ds.num_classes}")
        if not ds.multilabel:
            y = ds.labels()
            absent = [ds.classnames[c] for c in range(ds.num_classes) if not np.any(y == c)]
            if absent and self.requires_all_classes():
                raise DataError(f"{ds.name}: no training images for class(es) {', '.join(absent)}")
        check_finite(tr.features.image, f"{ds.name} image features")
        if self.needs_spatial and tr.features.spatial is not None:
            check_finite(tr.features.spatial, f"{ds.name} spatial features")
        if va is not None:
            check_finite(va.features.image, f"{va.dataset.name} (validation) image features")
        self.classnames = list(ds.classnames)
        self._fit(tr, va)
        return self

    def requires_all_classes(self) -> bool:
        return True

    def logits(self, data: Dataset | Encoded | Sequence[Item] | Sequence[str]) -> torch.Tensor:
        if not self.classnames:
            raise ConfigError(f"method {self.name!r} is not fitted; call fit() or load a saved model")
        enc = self.encode(data if isinstance(data, Encoded) else as_dataset(data, self.classnames))
        check_finite(enc.features.image, "image features")
        if self.needs_spatial and enc.features.spatial is not None:
            check_finite(enc.features.spatial, "spatial features")
        with torch.no_grad():
            return self._logits(enc)

    def predict_proba(self, data: Dataset | Encoded | Sequence[Item] | Sequence[str]) -> np.ndarray:
        z = self.logits(data)
        p = torch.sigmoid(z) if self.multilabel else torch.softmax(z, dim=-1)
        return p.float().numpy()

    def predict(self, data) -> np.ndarray:
        return self.predict_proba(data).argmax(-1)

    def explain(self, item: Item | str, target: str | None = None) -> np.ndarray:
        """[h, w] map of where the model looked in `item` (an Item or an image path) for `target`
        (a class name or a text token; None = the predicted class). Methods with attention override it."""
        raise ConfigError(f"method {self.name!r} has no attention to explain")

    # ---- subclass hooks -------------------------------------------------------------------
    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        raise NotImplementedError

    def _logits(self, data: Encoded) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """What to save (besides config and class names)."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def extra_config(self) -> dict[str, Any]:
        """More JSON for config.json (e.g. a multi-task method's task -> class lists)."""
        return {}

    def load_extra_config(self, cfg: dict[str, Any]) -> None:
        """Read back what `extra_config` wrote; called before `load_tensors`."""

    # ---- persistence --------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        if not self.classnames:
            raise ConfigError(f"method {self.name!r} is not fitted; nothing to save")
        directory = Path(directory)
        cfg = {
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "options": dataclasses.asdict(self.config),
            "classnames": self.classnames,
            "backbone": self.backbone.config(),
            "embed_dim": self.backbone.embed_dim,
            "fit_info": self.fit_info,
            **self.extra_config(),
        }
        directory.mkdir(parents=True, exist_ok=True)
        import json

        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()},
                str(tmp),
                metadata={"method": self.name},
            )
        with atomic_path(directory / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: Backbone | None = None, cache: FeatureCache | None = None
    ) -> Method:
        return load_method(directory, backbone=backbone, cache=cache, expect=cls.name or None)


def load_method(
    directory: str | Path,
    backbone: Backbone | None = None,
    cache: FeatureCache | None = None,
    expect: str | None = None,
) -> Method:
    """Rebuild a saved method (and its backbone, unless one is given)."""
    from ..backbones import create_backbone
    from .registry import METHODS

    directory = Path(directory)
    cfg = read_json(directory / "config.json")
    name = cfg.get("method")
    if expect and name != expect:
        raise ConfigError(f"{directory}: holds a {name!r} model, not {expect!r}")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{directory}: format_version {cfg.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    if backbone is None:
        bcfg = dict(cfg["backbone"])
        backbone = create_backbone(bcfg.pop("name"), **bcfg)
    if backbone.embed_dim != cfg.get("embed_dim", backbone.embed_dim):
        raise ConfigError(
            f"{directory}: saved for a {cfg['embed_dim']}-d backbone, "
            f"but {backbone.name} gives {backbone.embed_dim}-d features"
        )
    method = METHODS.get(name)(backbone, cache=cache, **cfg.get("options", {}))
    method.classnames = list(cfg["classnames"])
    method.fit_info = cfg.get("fit_info", {})
    method.load_extra_config(cfg)
    path = directory / "model.safetensors"
    if not path.exists():
        raise ConfigError(f"{path}: missing")
    method.load_tensors(load_file(str(path)))
    return method


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
    if x.numel() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=-1).nonzero()[0, 0]) if x.dim() > 1 else 0
        raise DataError(f"{what}: NaN or infinite values (first at row {bad})")


def check_dim(x: torch.Tensor, expected: int, what: str) -> None:
    """A saved head met features of another width (e.g. loaded with a different backbone)."""
    if x.shape[-1] != expected:
        raise ConfigError(f"{what}: features are {x.shape[-1]}-d but the saved head expects {expected}-d")


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    return [10 ** (math.log10(lo) + i * (math.log10(hi) - math.log10(lo)) / (n - 1)) for i in range(n)]
