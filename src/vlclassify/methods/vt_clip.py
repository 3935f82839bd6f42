"""VT-CLIP (paper 003): visual-guided texts. A transformer decoder block takes the class text
features as queries and the image's spatial tokens as keys/values (self-attention over the texts,
cross-attention text -> visual, feed-forward); VT_c = CrossAttn(V_s, V_s, T_c) + T_c and
P = softmax(V_c · VT_cᵀ / τ). Only the block trains (CE); the backbone stays frozen. The last
cross-attention map is the `explain` output: where a class's text looked in the image.

The block's output is gated by a scalar initialised at 0, so training starts from zero-shot; the
step to keep is chosen on validation (every `eval_every` steps, the start included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..context import RunContext
from ..data.items import Item
from ..errors import ConfigError
from ..modules.fusions.cross_attention import CrossAttentionDecoder
from ..training import Stage, TrainResult
from .base import Encoded, Feed, Method, TrainConfig, TrainOptions, as_dataset, check_dim, normalize
from .registry import register_method
from .tags import Tags
from .templates import resolve_templates


@dataclass(frozen=True)
class VTCLIPConfig(TrainOptions):
    """VT-CLIP's options: the text-guided cross-attention decoder and its training."""

    templates: str | list[str] = "select7"  # prompt templates for the class text features T_c
    heads: int = 2  # attention heads (paper: 2 best)
    layers: int = 1  # decoder layers (paper: 1 best)
    ffn_mult: int = 4  # feed-forward width as a multiple of the feature width
    dropout: float = 0.0  # attention / FFN dropout
    steps: int = 300  # training steps
    # AdamW at batch 32 and learning rate 2e-3 (the paper's), weight decay 1e-4
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, weight_decay=1e-4, batch_size=32))
    warmup_steps: int = 10  # linear warm-up steps before the cosine decay
    eval_every: int = 25  # steps between validation checks; the best checkpoint is kept


class VTCLIPHead(nn.Module):
    """batch {"image": [B, D], "spatial": [B, P, D]} -> {"logits": [B, C], "attention": [B, H, C, P]}
    (+ "loss" with targets): class texts [C, D] (a buffer) cross-attend to the spatial tokens."""

    def __init__(self, num_classes: int, dim: int, scale: float, cfg: VTCLIPConfig) -> None:
        super().__init__()
        self.decoder = CrossAttentionDecoder(
            dim, cfg.heads, cfg.layers, cfg.ffn_mult, cfg.dropout, residual=False, zero_init=True
        )
        self.dim, self.scale = dim, scale
        self.texts: torch.Tensor  # the buffer below
        self.register_buffer("texts", torch.zeros(num_classes, dim))  # [C, D] template-mean class texts

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {image [B, D], spatial [B, P, D]} -> logits [B, C] and the attention over the grid."""
        image, tokens = batch["image"], batch["spatial"]
        check_dim(image, self.dim, "vt-clip")
        s = math.sqrt(self.dim)  # unit vectors scaled to LayerNorm's magnitude
        q = (F.normalize(self.texts, dim=-1) * s).unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, C, D]
        out = self.decoder(q, F.normalize(tokens.float(), dim=-1) * s)
        vt = self.texts.unsqueeze(0) + out.out / s  # [B, C, D]
        z = self.scale * torch.einsum("bd,bcd->bc", normalize(image), F.normalize(vt, dim=-1))
        res = {"logits": z, "attention": out.cross_weights}
        if "targets" in batch:
            res["loss"] = F.cross_entropy(z, batch["targets"])
        return res


@register_method
class VTCLIP(Method):
    """Visual-guided texts: class texts cross-attend to spatial tokens (decoder block), CE-trained."""

    name = "vt-clip"
    tags = Tags(explain=True, onnx=True)
    Config = VTCLIPConfig
    needs = frozenset({"image", "spatial"})
    train_views = ("orig", "flip")
    selects = "step"
    infer_batch = 256

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        c = self.config
        if c.heads < 1 or c.layers < 1 or backbone.embed_dim % c.heads:
            raise ConfigError(
                f"vt-clip: heads ({c.heads}) must divide the feature width {backbone.embed_dim}; layers >= 1"
            )
        self.templates = resolve_templates(c.templates)

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        return VTCLIPHead(spec["num_classes"], spec["dim"], float(self.backbone.logit_scale), self.config)

    def stages(self, train: Encoded) -> list[Stage]:
        c = self.config
        return [
            Stage(
                "vt-clip",
                steps=c.steps,
                batch_size=c.train.batch_size,
                lr=c.train.lr,
                weight_decay=c.train.weight_decay,
                warmup_steps=c.warmup_steps,
                schedule="cosine",
                eval_every=c.eval_every,
            )
        ]

    def prepare(self, train: Encoded, val: Encoded | None) -> Feed:
        texts = self.class_texts(self.templates)[1]
        spec = {"num_classes": len(self.classnames), "dim": texts.shape[1], "grid": list(train.features.grid or ())}
        head = cast(VTCLIPHead, self.init_head(spec))
        head.texts.copy_(texts)
        return Feed()

    def finish(self, val: Encoded | None, result: TrainResult) -> None:
        self.fit_info.update(
            {
                "steps": result.stages[0].best_step,
                "val_accuracy": result.stages[0].best_metric,
                "eval_every": self.config.eval_every,
            }
        )

    def explain(self, item: Item | str, target: str | None = None, *, ctx: RunContext | None = None) -> np.ndarray:
        """[h, w] attention of `target`'s text (a class name; None = the predicted class) over the grid."""
        self._check_fitted()
        rows: list[Item] | list[str] = [item] if isinstance(item, Item) else [item]
        enc = self.encode(as_dataset(rows, self.classnames), ctx=ctx)
        out = self._outputs(enc)
        logits, w = out["logits"], out["attention"]  # [1, C], [1, H, C, P]
        if target is None:
            c = int(logits.argmax(-1))
        elif target in self.classnames:
            c = self.classnames.index(target)
        else:
            raise ConfigError(f"vt-clip: unknown class {target!r}; classes: {', '.join(self.classnames)}")
        f = enc.features
        h, wd = tuple(f.grid) if f.grid else (1, w.shape[-1])
        return w[0, :, c].mean(0).reshape(h, wd).numpy()
