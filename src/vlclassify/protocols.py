"""Presets: a paper's protocol, or a dataset's published settings, chosen by name.

    vlclassify fit -m tip-adapter-f -d split_zhou_OxfordPets.json --shots 16 --preset tip-adapter
    vlclassify bench fewshot -d split_zhou_DescribableTextures.json --methods tip-adapter --preset tip-adapter
    vlclassify methods --presets                  # every preset, one line each

A preset is declarative (`Preset`): option overrides per method, the prompt templates of every
method that has a `templates` option, and protocol settings: the seeds, and data/plan.py's
`Protocol` (sampling short classes with replacement, which split the search validates on, the
class-name clean-up, the split scored as test). Two kinds:

- protocol presets (`tip-adapter`): how a paper samples, validates, caches and trains;
- dataset presets (`coop-<dataset>`, CoOp's 11 datasets): that dataset's CoOp prompt, CoOp's class
  names, and each paper's settings for it where the paper gives them. The dataset's CoOp split
  file (`split_zhou_OxfordPets.json`, ...) applies it automatically; `--preset none` turns that off.

`resolve_presets` applies protocol presets first and the dataset preset after them (its per-dataset
values win, e.g. Tip-Adapter's search grid), and the user's own `--opt` last. Without a preset the
protocol is vlclassify's honest default: CoOp's sampling, the few-shot val, seeds 1-3.
docs/reproducing.md gives the command for each paper's table.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.plan import Protocol
from .errors import ConfigError
from .features.extract import RRC_VIEWS
from .methods.tip_adapter import search_grid
from .registry import Registry

KINDS = ("protocol", "dataset")


@dataclass(frozen=True)
class Preset:
    """Named option overrides (a paper's protocol, a dataset's settings) applied to methods and data."""

    name: str
    description: str  # one line, for `vlclassify methods --presets`
    kind: str = "protocol"  # protocol | dataset (applied after the protocol presets: its values win)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # method name -> option overrides
    templates: str | None = None  # the prompt templates of every method with a `templates` option
    seeds: tuple[int, ...] | None = None  # the protocol's seeds (None: the caller's, fit 1 and bench 1,2,3)
    protocol: Mapping[str, Any] = field(default_factory=dict)  # the data/plan.py Protocol fields it sets
    split_file: str | None = None  # a data file of this name applies the preset automatically

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"preset {self.name!r}: kind must be one of {KINDS}")
        Protocol(**self.protocol)  # a misspelt protocol field fails at import


PRESETS: Registry = Registry("preset")


def register_preset(preset: Preset) -> Preset:
    """Add a preset to the registry (under its name, with its description)."""
    PRESETS.register(preset.name, preset.description)(preset)
    return preset


def list_presets() -> list[str]:
    """Registered preset names, for `vlclassify methods --presets`."""
    return PRESETS.names()


def get_preset(name: str) -> Preset:
    """The preset `name`; a ConfigError naming the available ones otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())} (or none)")
    return PRESETS.get(name)


# ---- Tip-Adapter ---------------------------------------------------------------------------
# Tip-Adapter's configs/*.yaml (github.com/gaopengcuhk/Tip-Adapter): per dataset, the search
# scales [beta s0, alpha s1] (200 and 20 steps from 0.1), init_beta / init_alpha, train_epoch.
# Every dataset: lr 0.001, augment_epoch 10, shots 16, RN50.


@dataclass(frozen=True)
class TipConfig:
    """Tip-Adapter's per-dataset yaml values (search scales, initial alpha and beta, epochs)."""

    beta_scale: float  # search_scale[0]: beta takes 200 steps in [0.1, beta_scale)
    alpha_scale: float  # search_scale[1]: alpha takes 20 steps in [0.1, alpha_scale)
    init_beta: float  # beta of the training (Tip-Adapter-F) and of the unsearched cache
    init_alpha: float  # alpha of the training (Tip-Adapter-F) and of the unsearched cache
    epochs: int = 20  # train_epoch of Tip-Adapter-F


TIP_STEPS = (200, 20)  # search_step: beta, alpha
TIP_FALLBACK = TipConfig(7, 3, 1, 1.17)  # data that is none of CoOp's: ImageNet's configuration


def tip_options(cfg: TipConfig) -> dict[str, dict[str, Any]]:
    """Tip-Adapter's per-dataset values as tip-adapter / tip-adapter-f options."""
    common = {
        "input": "joint",  # the paper's cache: keys are joint (CLIP) embeddings, not pooled features
        "beta_grid": search_grid(cfg.beta_scale, TIP_STEPS[0]),
        "alpha_grid": search_grid(cfg.alpha_scale, TIP_STEPS[1]),
        "alpha": float(cfg.init_alpha),
        "beta": float(cfg.init_beta),
    }
    train = {"train_alpha": float(cfg.init_alpha), "train_beta": float(cfg.init_beta), "epochs": cfg.epochs}
    return {"tip-adapter": common, "tip-adapter-f": {**common, **train}}


def _merge(*parts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in parts:
        for method, opts in p.items():
            out.setdefault(method, {}).update(opts)
    return out


_cache_views = {"views": [f"rrc{i}" for i in range(RRC_VIEWS)], "key_mean": "raw"}
register_preset(
    Preset(
        "tip-adapter",
        "Tip-Adapter's protocol: seed 1, search on the full val split, short classes repeated, "
        "10 augmented views, unnormalised adapter",
        options=_merge(
            {"tip-adapter": _cache_views, "tip-adapter-f": _cache_views},
            tip_options(TIP_FALLBACK),
            {
                "tip-adapter-f": {
                    "normalize_keys": False,
                    "epoch_views": "cycle",
                    "lr": 1e-3,
                    "batch_size": 256,
                    "weight_decay": 0.01,
                }
            },
        ),
        seeds=(1,),
        protocol={"repeat": True, "val": "full"},
    )
)


# ---- CoOp's 11 datasets --------------------------------------------------------------------
# CMM (paper 002): one setting for every dataset (AdamW 1e-4, wd 1e-4, 50 warm-up, cosine to
# 1e-5, batch 8, 16,000 iterations, triplet margin 1, alpha 1 in training, 0.1..2.0 on val);
# its templates are Tip-Adapter's, i.e. the dataset's.
CMM_PAPER = {
    "steps": 16000,
    "batch_size": 8,
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "min_lr": 1e-5,
    "warmup_steps": 50,
    "margin": 1.0,
    "alpha": 1.0,
    "alpha_grid": [round(0.1 * i, 1) for i in range(1, 21)],
    "schedule": "paper",
    "input": "joint",  # the paper's residual W on the joint embedding, not the bridge on pooled features
}
# VT-CLIP (paper 003): batch 32, lr 2e-3 for all 11 datasets, CLIP's hand-crafted prompt, 2 heads, 1 layer.
VTCLIP_PAPER = {"batch_size": 32, "lr": 2e-3, "heads": 2, "layers": 1}
# Cross-modal linear probe (Lin et al. 2023): its head on CLIP's joint image embedding, not on the bridge.
CROSS_MODAL_PAPER = {"input": "joint"}


@dataclass(frozen=True)
class CoOpDataset:
    """One CoOp dataset: its split file, templates, class renames and Tip-Adapter values (makes a coop-NAME preset)."""

    name: str  # the preset is coop-<name>
    coop: str  # CoOp's dataset class name: its split file is split_zhou_<coop>.json
    templates: str  # a methods/templates.py dataset_templates() key: CoOp's / Tip-Adapter's prompt
    tip: TipConfig  # Tip-Adapter's yaml values
    rename: Mapping[str, str] = field(default_factory=dict)  # CoOp's NEW_CNAMES (already applied in its split files)
    protocol: Mapping[str, Any] = field(default_factory=dict)  # more of the dataset's data side


COOP_DATASETS = (
    # CoOp's ImageNet has no split file: images/{train,val}/<wnid>/ with classnames.txt beside
    # them ("n01440764 tench"); its val split is the test set.
    CoOpDataset(
        "imagenet",
        "ImageNet",
        "imagenet",
        TipConfig(7, 3, 1, 1.17),
        {},
        {"classnames_file": "classnames.txt", "test_split": "val"},
    ),
    CoOpDataset(
        "caltech101",
        "Caltech101",
        "caltech101",
        TipConfig(12, 5, 1, 3),
        {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"},
    ),
    CoOpDataset("oxfordpets", "OxfordPets", "oxford_pets", TipConfig(7, 3, 1, 1.17)),
    CoOpDataset("stanfordcars", "StanfordCars", "stanford_cars", TipConfig(20, 10, 1, 3)),
    CoOpDataset("flowers102", "OxfordFlowers", "oxford_flowers", TipConfig(50, 50, 1, 10)),
    CoOpDataset("food101", "Food101", "food101", TipConfig(10, 10, 1, 1.17)),
    # CoOp's FGVCAircraft has no split file (images_variant_{train,val,test}.txt); see docs/reproducing.md
    CoOpDataset("fgvcaircraft", "FGVCAircraft", "fgvc_aircraft", TipConfig(30, 30, 1, 5)),
    CoOpDataset("sun397", "SUN397", "sun397", TipConfig(12, 10, 1, 1.17)),
    CoOpDataset("dtd", "DescribableTextures", "dtd", TipConfig(13, 13, 1, 2)),
    CoOpDataset(
        "eurosat",
        "EuroSAT",
        "eurosat",
        TipConfig(12, 10, 1, 2, epochs=100),
        {
            "AnnualCrop": "Annual Crop Land",
            "HerbaceousVegetation": "Herbaceous Vegetation Land",
            "Highway": "Highway or Road",
            "Industrial": "Industrial Buildings",
            "Pasture": "Pasture Land",
            "PermanentCrop": "Permanent Crop Land",
            "Residential": "Residential Buildings",
            "SeaLake": "Sea or Lake",
        },
    ),
    CoOpDataset("ucf101", "UCF101", "ucf101", TipConfig(7, 3, 1, 3)),
)

for _d in COOP_DATASETS:
    _file = None if _d.name == "imagenet" else f"split_zhou_{_d.coop}.json"  # CoOp reads ImageNet's folders
    register_preset(
        Preset(
            f"coop-{_d.name}",
            f"CoOp's {_d.coop} ({f'automatic for {_file}' if _file else 'by name'}): its prompt and class names, "
            f"Tip-Adapter's grid ({_d.tip.beta_scale:g}, {_d.tip.alpha_scale:g}), "
            "CMM / VT-CLIP / cross-modal-probe settings",
            kind="dataset",
            options=_merge(
                tip_options(_d.tip),
                {"cmm": CMM_PAPER, "vt-clip": VTCLIP_PAPER, "cross-modal-linear-probe": CROSS_MODAL_PAPER},
            ),
            templates=_d.templates,
            protocol={"spaces": True, "rename": dict(_d.rename), **_d.protocol},
            split_file=_file,
        )
    )


# ---- resolution ----------------------------------------------------------------------------


@dataclass
class Resolved:
    """The presets of one fit or benchmark, in the order they apply."""

    presets: list[Preset] = field(default_factory=list)
    automatic: str | None = None  # the dataset preset the data's file name chose

    @property
    def names(self) -> list[str]:
        """The resolved presets' names, in the order applied."""
        return [p.name for p in self.presets]

    @property
    def protocol(self) -> Protocol:
        """The data protocol of the resolved presets (later ones win)."""
        fields: dict[str, Any] = {}
        for p in self.presets:
            fields.update(p.protocol)
        return Protocol(**fields)

    @property
    def seeds(self) -> tuple[int, ...] | None:
        """The seeds the last preset that sets them names, or None."""
        return next((p.seeds for p in reversed(self.presets) if p.seeds is not None), None)

    def options(self, method: str) -> dict[str, Any]:
        """The presets' options for `method` (before the user's own --opt)."""
        from .methods import METHODS

        if method not in METHODS:
            return {}
        fields = {f.name for f in dataclasses.fields(METHODS.get(method).Config)}
        out: dict[str, Any] = {}
        for p in self.presets:
            if p.templates is not None and "templates" in fields:
                out["templates"] = p.templates
            out.update(copy.deepcopy(dict(p.options.get(method, {}))))  # a fit never shares the registry's lists
        return out

    def log(self, data: str | None, methods: Sequence[str]) -> list[str]:
        """Which presets apply and why (named, or the data's file name), and what they set: lines for a log."""
        out = []
        for p in self.presets:
            why = "named"
            if p.name == self.automatic and data:
                why = f"automatic for {Path(data.partition('?')[0]).name}; --preset none turns it off"
            out.append(f"preset {p.name} ({why}): {p.description}")
        if self.presets:
            out += [f"  {m} options set: {', '.join(sorted(self.options(m))) or 'none'}" for m in methods]
            out.append(f"  protocol: {self.protocol.describe()}")
        return out

    def record(self, methods: Sequence[str] = ()) -> dict[str, Any]:
        """JSON for fit.json / config.json / a benchmark's results: what the presets set."""
        return {
            "names": self.names,
            "automatic": self.automatic,
            "seeds": list(self.seeds) if self.seeds else None,
            "protocol": self.protocol.to_dict(),
            "options": {m: self.options(m) for m in methods},
        }


def preset_for_data(spec: str | None) -> Preset | None:
    """The dataset preset whose CoOp split file `spec` is (by file name), or None."""
    if not spec:
        return None
    name = Path(spec.partition("?")[0]).name
    return next((PRESETS.get(n) for n in list_presets() if PRESETS.get(n).split_file == name), None)


def resolve_presets(names: str | Sequence[str] | None, data: str | None = None) -> Resolved:
    """Named presets (comma-separated or a list; "none" = no automatic one) plus the dataset preset
    the data's file name selects, in the order they apply."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names or [])
    chosen = [get_preset(n) for n in names if n != "none"]
    if len(set(names)) != len(names):
        raise ConfigError(f"--preset names a preset twice: {', '.join(names)}")
    datasets = [p for p in chosen if p.kind == "dataset"]
    if len(datasets) > 1:
        raise ConfigError(f"presets {', '.join(p.name for p in datasets)}: name one dataset preset at most")
    auto = None
    if not datasets and "none" not in names:
        found = preset_for_data(data)
        if found is not None:
            chosen.append(found)
            auto = found.name
    order = sorted(chosen, key=lambda p: KINDS.index(p.kind))  # stable: protocol presets, then the dataset's
    return Resolved(order, auto)
