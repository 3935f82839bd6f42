"""A tiny random stand-in backbone (TorchMultimodal style): tests and examples build models
with it in milliseconds, no weights needed. Its features mean nothing semantically.

    image: pixels -> g x g cell means [N, P, 3] -> image blocks -> proj -> tokens [N, P, D]; embeds = mean
    text:  words -> hashed ids -> word table [N, L, D] -> text blocks -> tokens; embeds = masked mean

The blocks are residual (x + W tanh(x)) with W = 0, so they change no feature until a split's
copy of them is trained: the toy has something to fine-tune on either side.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..pixels import recipe_pixels
from ..utils import json_fingerprint
from .base import Backbone, BackboneSplit, ImageFeatures, TextFeatures, copy_module
from .registry import register_backbone


class ResidualBlock(nn.Module):
    """x + W tanh(x), W initialised to 0 (the identity until trained)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, ..., D] -> x + fc(tanh(x))."""
        return x + self.fc(torch.tanh(x))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class ToyBackbone(Backbone):
    """A tiny random backbone for tests: every backbone code path in milliseconds, no weight files."""

    name = "toy"

    def __init__(
        self,
        dim: int = 16,
        image_size: int = 32,
        grid: int = 4,
        vocab: int = 512,
        seed: int = 0,
        logit_scale: float = 10.0,
    ) -> None:
        super().__init__()
        self.options = {
            "dim": dim,
            "image_size": image_size,
            "grid": grid,
            "vocab": vocab,
            "seed": seed,
            "logit_scale": logit_scale,
        }
        self.embed_dim, self.pooled_dim, self.image_size, self.grid, self.vocab = (
            dim,
            3 * grid * grid,
            image_size,
            grid,
            vocab,
        )
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(3, dim)
        self.word = nn.Embedding(vocab, dim)
        with torch.no_grad():
            for p in (*self.proj.parameters(), self.word.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.cell_blocks = nn.ModuleList([ResidualBlock(3)])
        self.word_blocks = nn.ModuleList([ResidualBlock(dim)])
        self.eval()

    def weights_fingerprint(self) -> str:
        """Hash of the options (the seeded weights follow from them)."""
        return json_fingerprint(self.options)

    def preprocess_config(self) -> dict:
        """The image size, for the feature cache key."""
        return {"size": self.image_size}

    def pixel_recipe(self) -> dict[str, Any]:
        """Short side to `image_size`, centre crop, [0, 1]."""
        return {"size": self.image_size, "range": [0.0, 1.0]}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(recipe_pixels(image, self.pixel_recipe()))  # [3, H, W]

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        return _image_head(self._cells(pixels, 0), self.cell_blocks, self.proj, self.grid)

    def bridge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact: embeds = mean over cells of proj(cell), and pooled is the cells side by side."""
        p = self.grid * self.grid
        w = self.proj.weight.detach().repeat(1, p) / p  # [D, P * 3]
        return w.clone(), self.proj.bias.detach().clone()

    def _cells(self, pixels: torch.Tensor, stop: int) -> torch.Tensor:
        """pixels -> [N, g*g, 3] cell means after image blocks 0..stop-1."""
        x = F.adaptive_avg_pool2d(pixels, self.grid).flatten(2).transpose(1, 2)
        for block in self.cell_blocks[:stop]:
            x = block(x)
        return x

    def _words(self, text: str) -> list[str]:
        return text.lower().replace(".", " ").split() or [""]

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        words = [self._words(t)[:max_tokens] for t in texts]
        L = max(len(w) for w in words)
        input_ids = torch.zeros(len(words), L, dtype=torch.long)
        mask = torch.zeros(len(words), L, dtype=torch.long)
        for r, row in enumerate(words):
            input_ids[r, : len(row)] = torch.tensor([zlib.crc32(w.encode()) % self.vocab if w else 0 for w in row])
            mask[r, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def token_strings(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[str]]:
        words = [self._words(t)[:max_tokens] for t in texts]
        L = max(len(w) for w in words)
        return [w + [""] * (L - len(w)) for w in words]

    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        """texts -> word-block token features and their masked mean."""
        batch = self.tokenize(texts)
        x = self.word(batch["input_ids"])
        for block in self.word_blocks:
            x = block(x)
        mask = batch["attention_mask"].bool()
        return TextFeatures(embeds=_masked_mean(x, mask), tokens=x, mask=mask, token_strings=self.token_strings(texts))

    def split(self, image_blocks: int | None = 0, text_layers: int | None = 0) -> ToySplit:
        return ToySplit(self, image_blocks, text_layers).eval()  # eval like the backbone; trainers set modes


def _image_head(cells: torch.Tensor, blocks, proj: nn.Module, g: int) -> ImageFeatures:
    for block in blocks:
        cells = block(cells)
    tokens = proj(cells)  # [N, P, D]
    return ImageFeatures(embeds=tokens.mean(1), tokens=tokens, pooled=cells.flatten(1), grid=(g, g))


class ToySplit(BackboneSplit):
    """Image top: the last `image_blocks` image blocks + proj; text top: the last `text_layers`
    text blocks + masked mean pooling."""

    backbone: ToyBackbone

    def __init__(self, backbone: ToyBackbone, image_blocks: int | None, text_layers: int | None) -> None:
        super().__init__(backbone, image_blocks, text_layers, (len(backbone.cell_blocks), len(backbone.word_blocks)))
        if image_blocks is not None:
            n = len(backbone.cell_blocks)
            self.cell_blocks = nn.ModuleList(copy_module(b) for b in backbone.cell_blocks[n - image_blocks :])
            self.proj = copy_module(backbone.proj)
        if text_layers is not None:
            n = len(backbone.word_blocks)
            self.word_blocks = nn.ModuleList(copy_module(b) for b in backbone.word_blocks[n - text_layers :])

    def _image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        assert self.image_blocks is not None  # image_trunk checked it
        return self.backbone._cells(pixels, len(self.backbone.cell_blocks) - self.image_blocks)  # [N, P, 3]

    def _image_top(self, acts: torch.Tensor) -> ImageFeatures:
        return _image_head(acts, self.cell_blocks, self.proj, self.backbone.grid)

    def _text_trunk(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.text_layers is not None  # text_trunk checked it
        x = self.backbone.word(batch["input_ids"])
        for block in self.backbone.word_blocks[: len(self.backbone.word_blocks) - self.text_layers]:
            x = block(x)
        return x, batch["attention_mask"].bool()  # [N, L, D], [N, L]

    def _text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        x = hidden
        for block in self.word_blocks:
            x = block(x)
        return TextFeatures(embeds=_masked_mean(x, mask), tokens=x, mask=mask)


@register_backbone("toy", "tiny random stand-in for tests and examples (no weights, meaningless features)")
def toy(**options) -> ToyBackbone:
    """Registry factory of the `toy` test backbone."""
    return ToyBackbone(**options)
