"""Prompt templates: CLIP's 80 ImageNet templates, its 7 "select" ones (used by Tip-Adapter and CMM),
and CoOp's per-dataset ones. The lists live in resources/templates.json."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


@functools.cache
def _templates() -> dict[str, dict[str, list[str]]]:
    """resources/templates.json: {"named": {set: [...]}, "datasets": {dataset: [...]}}."""
    return json.loads(resources.files("vlclassify").joinpath("resources", "templates.json").read_text("utf-8"))


def dataset_templates() -> dict[str, list[str]]:
    """The per-dataset prompt sets (CoOp's and Tip-Adapter's, and the offline data's), by dataset name."""
    return {k: list(v) for k, v in _templates()["datasets"].items()}


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """A named set (single, select7, imagenet80, or a dataset name) or a list of `{}` templates."""
    if isinstance(templates, str):
        named, datasets = _templates()["named"], _templates()["datasets"]
        if templates in named:
            return list(named[templates])
        if templates in datasets:
            return list(datasets[templates])
        if "{}" in templates:
            return [templates]
        raise ConfigError(
            f"unknown template set {templates!r}; use one of {', '.join(list(named) + list(datasets))} "
            "or a template containing '{}'"
        )
    out = list(templates)
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise ConfigError(f"templates must each contain '{{}}'; bad: {bad or 'empty list'}")
    return out


def class_text_embeddings(
    backbone,
    classnames: Sequence[str],
    templates: Sequence[str],
    descriptions: dict[str, str] | None = None,
    cache=None,
    class_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised template embeddings, normalised (CLIP's ensemble)."""
    return cached_template_embeddings(backbone, classnames, templates, cache, descriptions, class_text)[1]


def cached_template_embeddings(
    backbone,
    classnames: Sequence[str],
    templates: Sequence[str],
    cache=None,
    descriptions: dict[str, str] | None = None,
    class_text: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-template [C, L, D], ensemble [C, D]) normalised class text embeddings, through the
    feature cache: few-shot sweeps refit many times on the same classes, so encode them once.
    A class's description, if given, follows each of its prompts.

    `class_text` [C, D], class text embeddings given with the data (a feature file's entry, see
    `data.precomputed.class_text_of`), replaces the prompts: ([C, 1, D], [C, D]), both normalised,
    and the backbone encodes nothing."""
    import torch

    if class_text is not None:
        if class_text.shape[0] != len(classnames):
            raise ConfigError(f"class_text has {class_text.shape[0]} rows for {len(classnames)} classes")
        ens = torch.nn.functional.normalize(class_text.float(), dim=-1)
        return ens[:, None, :], ens

    from ..features import encode_texts

    descriptions = descriptions or {}
    prompts = [
        f"{t.format(c)} {descriptions[c]}" if descriptions.get(c) else t.format(c)
        for c in classnames
        for t in templates
    ]
    per = encode_texts(backbone, prompts, cache=cache).view(len(classnames), len(templates), -1).float()
    return per, torch.nn.functional.normalize(per.mean(1), dim=-1)
