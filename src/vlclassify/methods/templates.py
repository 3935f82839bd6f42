"""Prompt templates: CLIP's 80 ImageNet templates, its 7 "select" ones, and CoOp's per-dataset ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

SINGLE = ["a photo of a {}."]

# CLIP's 7 templates selected on ImageNet (the "select" ensemble used by Tip-Adapter and CMM).
SELECT7 = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

# CLIP's 80 ImageNet templates.
IMAGENET80 = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

# CoOp / Tip-Adapter per-dataset templates.
DATASET_TEMPLATES = {
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "oxford_flowers": ["a photo of a {}, a type of flower."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "stanford_cars": ["a photo of a {}."],
    "sun397": ["a photo of a {}."],
    "caltech101": ["a photo of a {}."],
    "food101": ["a photo of {}, a type of food."],
    "ucf101": ["a photo of a person doing {}."],
    "imagenet": SELECT7,  # Tip-Adapter's ImageNet ensemble (CoOp's zero-shot CLIP: "a photo of a {}.")
    "fashion-mnist": ["a photo of a {}, a type of clothing."],
    "tuxpaint": ["a photo of {}."],
}

NAMED = {"single": SINGLE, "select7": SELECT7, "imagenet80": IMAGENET80}


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """A named set (single, select7, imagenet80, or a dataset name) or a list of `{}` templates."""
    if isinstance(templates, str):
        if templates in NAMED:
            return list(NAMED[templates])
        if templates in DATASET_TEMPLATES:
            return list(DATASET_TEMPLATES[templates])
        if "{}" in templates:
            return [templates]
        raise ConfigError(
            f"unknown template set {templates!r}; use one of {', '.join(list(NAMED) + list(DATASET_TEMPLATES))} "
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
