"""A tiny random stand-in backbone (TorchMultimodal style): tests and examples build models
with it in milliseconds, no weights needed. Its features mean nothing semantically."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..utils import json_fingerprint
from .base import Backbone, ImageFeatures, TextFeatures, pil_to_unit_tensor
from .registry import register_backbone


class ToyBackbone(Backbone):
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

    def weights_fingerprint(self) -> str:
        return json_fingerprint(self.options)

    def preprocess_config(self) -> dict:
        return {"size": self.image_size}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return pil_to_unit_tensor(image, self.image_size)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        cells = F.adaptive_avg_pool2d(pixels, self.grid)  # [N, 3, g, g]
        tokens = self.proj(cells.flatten(2).transpose(1, 2))  # [N, g*g, D]
        return ImageFeatures(embeds=tokens.mean(1), tokens=tokens, pooled=cells.flatten(1), grid=(self.grid, self.grid))

    def _ids(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode()) % self.vocab for w in text.lower().replace(".", " ").split()] or [0]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = [self._ids(t) for t in texts]
        L = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), L, dtype=torch.long)
        mask = torch.zeros(len(ids), L, dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        batch = self.tokenize(texts)
        tokens = self.word(batch["input_ids"])
        m = batch["attention_mask"].unsqueeze(-1).float()
        strings = [t.lower().replace(".", " ").split() or [""] for t in texts]
        L = tokens.shape[1]
        strings = [s + [""] * (L - len(s)) for s in strings]
        return TextFeatures(
            embeds=(tokens * m).sum(1) / m.sum(1), tokens=tokens, mask=m.squeeze(-1).bool(), token_strings=strings
        )


@register_backbone("toy", "tiny random stand-in for tests and examples (no weights, meaningless features)")
def toy(**options) -> ToyBackbone:
    return ToyBackbone(**options)
