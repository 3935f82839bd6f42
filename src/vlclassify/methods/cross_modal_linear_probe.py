"""Cross-modal linear probe (Lin et al. 2023, "Multimodality helps unimodality"): the class text
embeddings (one per template) are extra labelled training samples beside the few-shot images, in
the shared embedding space, for a linear head initialised from the zero-shot classifier. Weight
decay and the number of epochs are chosen on validation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..modules.cpu import cpu_threads
from .base import Encoded, Method, check_dim, normalize
from .registry import register_method
from .templates import cached_template_embeddings, resolve_templates


@dataclass
class CrossModalLinearProbeConfig:
    templates: str | list[str] = "select7"  # templates: their mean initialises the head; each one is a text sample
    text_samples: bool = (
        True  # add the per-template class texts as training samples (False = image-only, zero-shot init)
    )
    epochs: int = 300  # full-batch AdamW steps
    lr: float = 1e-3  # AdamW learning rate
    wd_grid: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2])  # weight decays tried on val
    eval_every: int = 25  # steps between validation checks (best step kept)


@register_method
class CrossModalLinearProbe(Method):
    """Linear head on joint-space features, trained on images + class texts, zero-shot initialised."""

    name = "cross-modal-linear-probe"
    Config = CrossModalLinearProbeConfig
    train_views = ("orig", "flip")

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        self.templates = resolve_templates(self.config.templates)
        self.weight: torch.Tensor | None = None  # [C, D], logits = scale * normalise(x) · Wᵀ + b
        self.bias: torch.Tensor | None = None  # [C]

    @property
    def scale(self) -> float:
        return float(self.backbone.logit_scale)

    def _train_once(self, x, y, w0, wd, xv, yv):
        cfg = self.config
        w = torch.nn.Parameter(w0.clone())
        b = torch.nn.Parameter(torch.zeros(w0.shape[0]))
        opt = torch.optim.AdamW([w, b], lr=cfg.lr, weight_decay=wd)
        best = (-1.0, 0, w0.clone(), torch.zeros(w0.shape[0]))
        for step in range(cfg.epochs + 1):
            if xv is not None and (step % cfg.eval_every == 0 or step == cfg.epochs):
                with torch.no_grad():
                    acc = float(((self.scale * xv @ w.T + b).argmax(-1) == yv).float().mean())
                if acc > best[0]:
                    best = (acc, step, w.detach().clone(), b.detach().clone())
            if step == cfg.epochs:
                break
            with torch.enable_grad():
                loss = F.cross_entropy(self.scale * x @ w.T + b, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if xv is None:
            return -1.0, cfg.epochs, w.detach(), b.detach()
        return best

    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        per_t, w0 = cached_template_embeddings(self.backbone, self.classnames, self.templates, self.cache)
        per_t, w0 = per_t.clone(), w0.clone()  # [C, L, D] text samples, [C, D] the zero-shot classifier
        f = train.features
        xs = [f.image] + [f.views[v].image for v in self.train_views[1:] if v in f.views]
        x = normalize(torch.cat(xs))
        y = torch.as_tensor(train.dataset.labels()).repeat(len(xs))
        if self.config.text_samples:
            C, L, _ = per_t.shape
            x = torch.cat([x, per_t.reshape(C * L, -1)])
            y = torch.cat([y, torch.arange(C).repeat_interleave(L)])
        xv = normalize(val.features.image) if val is not None and len(val) else None
        yv = torch.as_tensor(val.dataset.labels()) if xv is not None else None
        grid = list(self.config.wd_grid) if xv is not None else [self.config.wd_grid[0]]
        with cpu_threads(x.shape[0] * x.shape[1] * w0.shape[0]):
            results = {wd: self._train_once(x, y, w0, wd, xv, yv) for wd in grid}
        wd = max(grid, key=lambda k: (results[k][0], -results[k][1]))  # ties: fewer steps
        acc, step, self.weight, self.bias = results[wd]
        self.fit_info = {
            "weight_decay": wd,
            "steps": step,
            "val_accuracy": acc,
            "val_accuracy_by_wd": {str(k): round(v[0], 4) for k, v in results.items()},
        }

    def _logits(self, data: Encoded) -> torch.Tensor:
        x = normalize(data.features.image)
        check_dim(x, self.weight.shape[1], self.name)
        return self.scale * x @ self.weight.T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def load_tensors(self, tensors) -> None:
        self.weight, self.bias = tensors["weight"], tensors["bias"]
