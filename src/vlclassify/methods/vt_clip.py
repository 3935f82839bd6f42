"""VT-CLIP (paper 003): visual-guided texts. A transformer decoder block takes the class text
features as queries and the image's spatial tokens as keys/values (self-attention over the texts,
cross-attention text -> visual, feed-forward); VT_c = CrossAttn(V_s, V_s, T_c) + T_c and
P = softmax(V_c · VT_cᵀ / τ). Only the block trains (CE); the backbone stays frozen. The last
cross-attention map is the `explain` output: where a class's text looked in the image.

The block's output is gated by a scalar initialised at 0, so training starts from zero-shot; the
step count is chosen on validation (the best of periodic checks is kept).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.items import Item
from ..errors import ConfigError
from ..modules.cpu import cpu_threads
from ..modules.fusions.cross_attention import CrossAttentionDecoder
from ..modules.schedules import set_lr, warmup_cosine
from .base import Encoded, Method, as_dataset, check_dim, normalize
from .registry import register_method
from .templates import cached_template_embeddings, resolve_templates


@dataclass
class VTCLIPConfig:
    templates: str | list[str] = "select7"  # prompt templates for the class text features T_c
    heads: int = 2  # attention heads (paper: 2 best)
    layers: int = 1  # decoder layers (paper: 1 best)
    ffn_mult: int = 4  # feed-forward width as a multiple of the feature width
    dropout: float = 0.0  # attention / FFN dropout
    iters: int = 300  # training steps
    batch_size: int = 32  # paper: 32
    lr: float = 2e-3  # AdamW learning rate (paper: 2e-3)
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_iters: int = 10  # linear warm-up steps before the cosine decay
    eval_every: int = 25  # steps between validation checks; the best checkpoint is kept
    seed: int = 0  # initialisation and batch order


class VTCLIPHead(nn.Module):
    """texts [C, D], tokens [B, P, D] -> (VT [B, C, D], cross-attention [B, H, C, P])."""

    def __init__(self, dim: int, heads: int, layers: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.decoder = CrossAttentionDecoder(dim, heads, layers, ffn_mult, dropout, residual=False, zero_init=True)
        self.dim = dim

    def forward(self, texts: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = math.sqrt(self.dim)  # unit vectors scaled to LayerNorm's magnitude
        q = (F.normalize(texts, dim=-1) * s).unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, C, D]
        out = self.decoder(q, F.normalize(tokens.float(), dim=-1) * s)
        return texts.unsqueeze(0) + out.out / s, out.cross_weights


@register_method
class VTCLIP(Method):
    """Visual-guided texts: class texts cross-attend to spatial tokens (decoder block), CE-trained."""

    name = "vt-clip"
    Config = VTCLIPConfig
    needs_spatial = True
    train_views = ("orig", "flip")

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        c = self.config
        if c.heads < 1 or c.layers < 1 or backbone.embed_dim % c.heads:
            raise ConfigError(
                f"vt-clip: heads ({c.heads}) must divide the feature width {backbone.embed_dim}; layers >= 1"
            )
        self.templates = resolve_templates(c.templates)
        torch.manual_seed(c.seed)
        self.head = VTCLIPHead(backbone.embed_dim, c.heads, c.layers, c.ffn_mult, c.dropout)
        self.texts: torch.Tensor | None = None  # [C, D]
        self.grid: tuple[int, int] | None = None

    @property
    def scale(self) -> float:
        return float(self.backbone.logit_scale)

    def _forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, D], tokens [B, P, D] -> logits [B, C], attention [B, H, C, P]."""
        vt, w = self.head(self.texts, tokens)
        return self.scale * torch.einsum("bd,bcd->bc", normalize(image), F.normalize(vt, dim=-1)), w

    def _batched(self, data: Encoded, batch: int = 256) -> torch.Tensor:
        f = data.features
        with cpu_threads(batch * f.image.shape[-1] ** 2 * (f.spatial.shape[1] if f.spatial is not None else 1)):
            return self._batched_logits(data, batch)

    def _batched_logits(self, data: Encoded, batch: int) -> torch.Tensor:
        f = data.features
        if f.spatial is None:
            raise ConfigError("vt-clip needs spatial features; extract with spatial=True")
        check_dim(f.image, self.texts.shape[1], self.name)
        self.head.eval()
        return (
            torch.cat(
                [self._forward(f.image[i : i + batch], f.spatial[i : i + batch])[0] for i in range(0, len(f), batch)]
            )
            if len(f)
            else torch.zeros(0, len(self.classnames))
        )

    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        f = train.features
        work = self.config.batch_size * f.spatial.shape[1] * f.image.shape[1] ** 2 if f.spatial is not None else 0
        with cpu_threads(work):
            self._train(train, val)

    def _train(self, train: Encoded, val: Encoded | None) -> None:
        cfg = self.config
        self.texts = cached_template_embeddings(self.backbone, self.classnames, self.templates, self.cache)[1].clone()
        f = train.features
        self.grid = tuple(f.grid) if f.grid else None
        views = [f] + [f.views[v] for v in self.train_views[1:] if v in f.views]
        img = torch.cat([v.image for v in views]).float()  # [V*N, D]
        tok = torch.cat([v.spatial for v in views]).float()  # [V*N, P, D]
        y = torch.as_tensor(train.dataset.labels()).repeat(len(views))
        opt = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        g = torch.Generator().manual_seed(cfg.seed)
        yv = torch.as_tensor(val.dataset.labels()) if val is not None and len(val) else None
        best, history = (-1.0, 0, copy.deepcopy(self.head.state_dict())), []
        order = torch.cat(
            [torch.randperm(len(y), generator=g) for _ in range(math.ceil(cfg.iters * cfg.batch_size / len(y)) + 1)]
        )
        for step in range(cfg.iters + 1):
            if yv is not None and (step % cfg.eval_every == 0 or step == cfg.iters):
                with torch.no_grad():
                    acc = float((self._batched(val).argmax(-1) == yv).float().mean())
                history.append(round(acc, 4))
                if acc > best[0]:
                    best = (acc, step, copy.deepcopy(self.head.state_dict()))
            if step == cfg.iters:
                break
            self.head.train()
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            set_lr(opt, warmup_cosine(step, cfg.iters, cfg.lr, 0.0, cfg.warmup_iters))
            with torch.enable_grad():
                loss = F.cross_entropy(self._forward(img[idx], tok[idx])[0], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if yv is not None:
            self.head.load_state_dict(best[2])
        self.head.eval()
        self.fit_info = {
            "steps": best[1] if yv is not None else cfg.iters,
            "val_accuracy": best[0],
            "val_accuracy_by_check": history,
            "eval_every": cfg.eval_every,
        }

    def _logits(self, data: Encoded) -> torch.Tensor:
        return self._batched(data)

    def explain(self, item: Item | str, target: str | None = None) -> np.ndarray:
        """[h, w] attention of `target`'s text (a class name; None = the predicted class) over the grid."""
        if not self.classnames:
            raise ConfigError("vt-clip is not fitted; call fit() or load a saved model")
        enc = self.encode(as_dataset([item], self.classnames))
        f = enc.features
        check_dim(f.image, self.texts.shape[1], self.name)
        with torch.no_grad():
            self.head.eval()
            logits, w = self._forward(f.image, f.spatial)  # [1, C], [1, H, C, P]
        if target is None:
            c = int(logits.argmax(-1))
        elif target in self.classnames:
            c = self.classnames.index(target)
        else:
            raise ConfigError(f"vt-clip: unknown class {target!r}; classes: {', '.join(self.classnames)}")
        h, wd = tuple(f.grid) if f.grid else (1, w.shape[-1])
        return w[0, :, c].mean(0).reshape(h, wd).numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"texts": self.texts, **{f"head.{k}": v for k, v in self.head.state_dict().items()}}

    def load_tensors(self, tensors) -> None:
        self.texts = tensors["texts"]
        state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        try:
            self.head.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(
                f"vt-clip: saved head does not fit this configuration/backbone: {str(e).splitlines()[0]}"
            ) from e
        self.head.eval()
