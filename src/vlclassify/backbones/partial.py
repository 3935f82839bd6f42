"""Partial fine-tuning of a backbone: a frozen trunk run once (and cached) + a trainable top.

End-to-end training on 2 CPU cores is only affordable if the frozen part of the encoders is not
recomputed every step. A `Split` cuts a backbone where its trainable top begins: `image_trunk` /
`text_trunk` give the activations at the cut (cached per dataset by `features.trunk`), and
`image_top` / `text_top` finish the forward pass with gradients. `top_prefixes` names the
parameters (relative to the backbone) that the top owns, for the trainer's freeze rules.

- effnet-minilm: the last `image_blocks` MBConv blocks + conv head + ImageNet head (the
  projection into the joint space), and the last `text_layers` MiniLM layers.
- toy: the patch projection (image) and nothing on the text side.
- any other backbone: no split yet; the encoders stay frozen and the top is empty (stage 2 of
  CMA-CLIP then trains its own modules only, which `trainable_backbone` reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .base import Backbone

if TYPE_CHECKING:
    from .effnet_minilm import EffNetMiniLM
    from .toy import ToyBackbone


class Split:
    """Generic fallback: the trunk is the whole (frozen) backbone, the top is the identity."""

    def __init__(self, backbone: Backbone, image_blocks: int = 1, text_layers: int = 1) -> None:
        self.backbone = backbone
        self.image_blocks, self.text_layers = image_blocks, text_layers

    def config(self) -> dict[str, Any]:
        return {"split": type(self).__name__, "image_blocks": self.image_blocks, "text_layers": self.text_layers}

    def top_prefixes(self) -> list[str]:
        return []

    # image: pixels [N, 3, H, W] -> acts; acts -> (embeds [N, D], tokens [N, P, D])
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.backbone.encode_image(pixels)
        return torch.cat([out.embeds.unsqueeze(1), out.tokens], 1)  # [N, 1 + P, D]

    def image_top(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return acts[:, 0], acts[:, 1:]

    def grid(self) -> tuple[int, int] | None:
        return None

    # text: texts -> (hidden [N, L, H], mask [N, L] bool); (hidden, mask) -> (embeds [N, D], tokens [N, L, D])
    def tokenize(self, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
        batch = self.backbone.tokenize(texts)
        return {k: v[:, :max_tokens] for k, v in batch.items()}

    def text_trunk(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.encode_text(texts)
        tokens, mask = out.tokens[:, :max_tokens], out.mask[:, :max_tokens]
        # slot 0 carries the global embedding so the top can return it unchanged
        return torch.cat([out.embeds.unsqueeze(1), tokens], 1), torch.cat([mask[:, :1], mask], 1)

    def text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden[:, 0], hidden[:, 1:]

    def text_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The token mask matching `text_top`'s tokens."""
        return mask[:, 1:]


class EffNetMiniLMSplit(Split):
    backbone: EffNetMiniLM

    def __init__(self, backbone: EffNetMiniLM, image_blocks: int = 1, text_layers: int = 1) -> None:
        image_blocks = max(0, min(image_blocks, len(backbone.vision._blocks)))
        text_layers = max(0, min(text_layers, len(backbone.text.encoder.layer)))
        super().__init__(backbone, image_blocks, text_layers)

    def _vision(self) -> Any:  # efficientnet_lite_pytorch.EfficientNet (untyped)
        return self.backbone.vision

    def top_prefixes(self) -> list[str]:
        v = self._vision()
        n = len(v._blocks)
        image = [f"vision._blocks.{i}." for i in range(n - self.image_blocks, n)]
        image += ["vision._conv_head.", "vision._bn1.", "vision._fc."]
        L = len(self.backbone.text.encoder.layer)
        text = [f"text.encoder.layer.{i}." for i in range(L - self.text_layers, L)]
        return image + text

    def _run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        v = self._vision()
        n = len(v._blocks)
        for idx in range(start, stop):
            rate = v._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / n
            x = v._blocks[idx](x, drop_connect_rate=rate)
        return x

    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self._vision()
        x = v._swish(v._bn0(v._conv_stem(pixels)))
        return self._run_blocks(x, 0, len(v._blocks) - self.image_blocks)  # [N, C, h, w]

    def image_top(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self._vision()
        x = self._run_blocks(acts, len(v._blocks) - self.image_blocks, len(v._blocks))
        fmap = v._swish(v._bn1(v._conv_head(x)))  # [N, 1280, h, w]
        cells = fmap.flatten(2).transpose(1, 2)  # [N, h*w, 1280]
        embeds = self.backbone._to_text_space(v._fc(fmap.mean(dim=(2, 3))))  # [N, D]
        tokens = self.backbone._to_text_space(v._fc(cells))  # [N, h*w, D]
        return embeds, tokens

    def tokenize(self, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
        return self.backbone.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        )

    def text_trunk(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenize(texts, max_tokens)
        out = self.backbone.text(**batch, output_hidden_states=True)
        L = len(self.backbone.text.encoder.layer)
        return out.hidden_states[L - self.text_layers], batch["attention_mask"].bool()  # [N, L, H], [N, L]

    def text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .effnet_minilm import mean_pool

        layers = self.backbone.text.encoder.layer
        ext = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
        ext = ext.masked_fill(~mask, torch.finfo(hidden.dtype).min)[:, None, None, :]  # [N, 1, 1, L] additive
        x = hidden
        for layer in layers[len(layers) - self.text_layers :]:
            x = layer(x, ext)
            x = x[0] if isinstance(x, tuple) else x
        return mean_pool(x, mask), x

    def text_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask

    def grid(self) -> tuple[int, int] | None:
        return None


class ToySplit(Split):
    backbone: ToyBackbone

    def top_prefixes(self) -> list[str]:
        return ["proj."]

    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        g = self.backbone.grid
        return F.adaptive_avg_pool2d(pixels, g).flatten(2).transpose(1, 2)  # [N, g*g, 3]

    def image_top(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone.proj(acts)  # [N, P, D]
        return tokens.mean(1), tokens

    def tokenize(self, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
        batch = self.backbone.tokenize(texts)
        return {k: v[:, :max_tokens] for k, v in batch.items()}

    def text_trunk(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenize(texts, max_tokens)
        return self.backbone.word(batch["input_ids"]), batch["attention_mask"].bool()

    def text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0), hidden

    def text_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask


def make_split(backbone: Backbone, image_blocks: int = 1, text_layers: int = 1) -> Split:
    """The split for `backbone` (see the module docstring for what each one trains)."""
    cls: type[Split] = {"effnet-minilm": EffNetMiniLMSplit, "toy": ToySplit}.get(backbone.name, Split)
    return cls(backbone, image_blocks, text_layers)
