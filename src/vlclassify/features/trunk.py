"""Cached activations of a backbone's frozen trunk (image feature maps, text hidden states).

Methods that fine-tune a backbone's top (CMA-CLIP, DiCLS with image_blocks / text_layers) train
on the activations where the top of a `backbone.split(...)` begins, not on the features of
`extract_features`. `trunk_features` computes them once per (backbone, split, dataset) and keeps
them in the feature cache (float16 safetensors), so a training step runs only the top.
Missing images (Item.image None) and empty texts are allowed and flagged in `has_image` /
`has_text`; an unreadable image file is an error naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..backbones.base import BackboneSplit
from ..data.decoder import decode
from ..data.items import Dataset, Item
from ..errors import DataError
from .cache import FeatureCache
from .protocol import Features

TRUNK_VERSION = 2


@dataclass
class TrunkSet:
    """Row-aligned trunk activations of a dataset."""

    image: torch.Tensor  # [N, ...] image trunk activations (float16), zeros where has_image is False
    text: torch.Tensor  # [N, L, H] text trunk hidden states (float16), zeros where has_text is False ([N, 0, 0]: none)
    text_mask: torch.Tensor  # [N, L] bool, True for real tokens
    has_image: torch.Tensor  # [N] bool
    has_text: torch.Tensor  # [N] bool

    views: ClassVar[Mapping[str, Features]] = {}  # activations of the original images only
    grid: ClassVar[tuple[int, int] | None] = None
    skipped: ClassVar[list[int]] = []

    def __len__(self) -> int:
        return self.image.shape[0]

    def has(self, key: str) -> bool:
        """Only the `trunk` key: image (and text) activations."""
        return key == "trunk"

    def tensor(self, key: str) -> torch.Tensor:
        """`trunk`: the image trunk activations [N, ...] (float16)."""
        if key != "trunk":
            raise DataError(f"features: trunk activations have no {key!r} features")
        return self.image

    def batch(self, keys: Sequence[str], start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows start:stop of the image activations under `trunk`, as stored."""
        return {k: self.tensor(k)[start:stop] for k in keys}

    def vectors_per_row(self) -> int:
        """Activation vectors per row (image positions + text tokens): a problem's size."""
        positions = int(np.prod(self.image.shape[2:])) if self.image.dim() > 3 else self.image.shape[1]
        return max(1, positions) + self.text.shape[1]

    def index(self, idx) -> TrunkSet:
        """The rows at `idx`, so a subset keeps its cached trunk activations."""
        i = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return TrunkSet(
            *(t.index_select(0, i) for t in (self.image, self.text, self.text_mask, self.has_image, self.has_text))
        )


def _pixels(split: BackboneSplit, item: Item) -> torch.Tensor | None:
    if item.image is None:
        return None
    return split.backbone.preprocess(decode(item, size=split.backbone.image_size))


@torch.no_grad()
def compute_trunk(
    split: BackboneSplit,
    items: list[Item],
    max_tokens: int | None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "trunk",
    texts: bool = True,
) -> TrunkSet:
    """Trunk activations of `items`' images and (`texts`) paired texts, truncated to `max_tokens`."""
    from tqdm.auto import tqdm

    bb = split.backbone
    was = bb.training
    bb.eval()
    n = len(items)
    img_parts, txt_parts, mask_parts = [], [], []
    has_image = torch.zeros(n, dtype=torch.bool)
    has_text = torch.tensor([texts and bool((it.text or "").strip()) for it in items], dtype=torch.bool)
    bar = tqdm(total=n, desc=desc, unit="item", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for s in range(0, n, batch_size):
            chunk = items[s : s + batch_size]
            pix = list(pool.map(lambda it: _pixels(split, it), chunk))
            ok = [p is not None for p in pix]
            has_image[s : s + len(chunk)] = torch.tensor(ok)
            if any(ok):
                acts = split.image_trunk(torch.stack([p for p in pix if p is not None]))
                full = torch.zeros((len(chunk), *acts.shape[1:]), dtype=torch.float16)
                full[torch.tensor(ok)] = acts.half()
            else:
                full = None
            img_parts.append(full)
            strings = [(it.text or "").strip() if texts else "" for it in chunk]
            idx = [i for i, t in enumerate(strings) if t]
            if idx:
                h, m = split.text_trunk([strings[i] for i in idx], max_tokens)
                hh = torch.zeros(len(chunk), h.shape[1], h.shape[2], dtype=torch.float16)
                mm = torch.zeros(len(chunk), m.shape[1], dtype=torch.bool)
                hh[idx], mm[idx] = h.half(), m
            else:
                hh, mm = None, None
            txt_parts.append(hh)
            mask_parts.append(mm)
            bar.update(len(chunk))
    bar.close()
    bb.train(was)
    ref_img = next((p for p in img_parts if p is not None), None)
    if ref_img is None:  # no image at all: shape the zeros with one blank image
        blank = torch.zeros(1, 3, bb.image_size, bb.image_size)
        ref_img = split.image_trunk(blank).half()
    img = (
        torch.cat(
            [
                p
                if p is not None
                else torch.zeros(
                    (len(items[i * batch_size : (i + 1) * batch_size]), *ref_img.shape[1:]), dtype=torch.float16
                )
                for i, p in enumerate(img_parts)
            ]
        )
        if n
        else ref_img[:0]
    )
    ref_txt = next((p for p in txt_parts if p is not None), None)
    if ref_txt is not None:
        H, L = ref_txt.shape[2], max(p.shape[1] for p in txt_parts if p is not None)
    elif texts:  # no item has a text: shape the zeros with one short text
        H, L = split.text_trunk(["a"], max_tokens)[0].shape[2], 1
    else:
        H, L = 0, 0
    text = torch.zeros(n, L, H, dtype=torch.float16)
    mask = torch.zeros(n, L, dtype=torch.bool)
    for i, (th, tm) in enumerate(zip(txt_parts, mask_parts)):
        if th is not None and tm is not None:  # both set, or both None (a chunk without texts)
            s = i * batch_size
            text[s : s + th.shape[0], : th.shape[1]] = th
            mask[s : s + tm.shape[0], : tm.shape[1]] = tm
    return TrunkSet(img, text, mask, has_image, has_text)


def trunk_features(
    split: BackboneSplit,
    dataset: Dataset,
    max_tokens: int | None,
    cache: FeatureCache | None = None,
    progress: bool = True,
    texts: bool = True,
    write: bool = True,
) -> TrunkSet:
    """`compute_trunk` for every item of `dataset`, through the feature cache (`write=False`: read
    a cached entry, keep a new one in memory only)."""
    cache = cache or FeatureCache()
    bb = split.backbone
    key = {
        "kind": "trunk",
        "v": TRUNK_VERSION,
        "backbone": bb.identity(),
        "split": split.config(),
        "dataset": dataset.fingerprint(),
        "preprocess": bb.preprocess_config(),
        "max_tokens": max_tokens,
        "texts": texts,
    }
    names = ["image", "text", "text_mask", "has_image", "has_text"]
    got = cache.load(key, names)
    if got is not None:
        return TrunkSet(*(got[k] for k in names))
    ts = compute_trunk(
        split, dataset.items, max_tokens, progress=progress, desc=f"trunk {dataset.name}".strip(), texts=texts
    )
    if write:
        cache.save(key, {k: getattr(ts, k) for k in names})
    return ts
