"""Cross-modal linear probe (Lin et al. 2023, "Multimodality helps unimodality"): the class text
embeddings (one per template) are extra labelled training samples beside the few-shot images, in
the shared embedding space, for a linear head initialised from the zero-shot classifier. Weight
decay (grid, in order) and the step to keep (every `eval_every` steps) are chosen on validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..training import Stage, select_best
from .base import Encoded, Method, TrainOptions, check_dim, normalize
from .registry import register_method
from .templates import resolve_templates


@dataclass
class CrossModalLinearProbeConfig(TrainOptions):
    """Options of the cross-modal linear probe: text samples, optimiser, weight-decay grid."""

    templates: str | list[str] = "select7"  # templates: their mean initialises the head; each one is a text sample
    # add the per-template class texts as training samples (False = image-only, zero-shot init)
    text_samples: bool = True
    steps: int = 300  # full-batch AdamW steps
    lr: float = 1e-3  # AdamW learning rate (constant)
    wd_grid: list[float] = field(
        default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2]
    )  # weight decays tried on val, in order
    eval_every: int = 25  # steps between validation checks (the best step is kept)


class ScaledLinearHead(nn.Module):
    """batch {"image": [B, D]} -> {"logits": scale * normalise(x) W^T + b [B, C]} (+ "loss" with targets)."""

    def __init__(self, num_classes: int, dim: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))  # [C, D], starts at the zero-shot classifier
        self.bias = nn.Parameter(torch.zeros(num_classes))  # [C]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {image [B, D]} -> scaled cosine logits [B, C] (and the loss with targets)."""
        check_dim(batch["image"], self.weight.shape[1], "cross-modal-linear-probe")
        z = self.scale * normalize(batch["image"]) @ self.weight.T + self.bias
        out = {"logits": z}
        if "targets" in batch:
            out["loss"] = F.cross_entropy(z, batch["targets"])
        return out


@register_method
class CrossModalLinearProbe(Method):
    """Linear head on joint-space features, trained on images + class texts, zero-shot initialised."""

    name = "cross-modal-linear-probe"
    Config = CrossModalLinearProbeConfig
    needs = frozenset({"image", "flip"})
    selects = "weight decay, step"

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        self.templates = resolve_templates(self.config.templates)

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        return ScaledLinearHead(spec["num_classes"], spec["dim"], float(self.backbone.logit_scale))

    def stages(self, train: Encoded, weight_decay: float = 0.0, rows: int = 1) -> list[Stage]:
        c = self.config
        return [
            Stage(
                "probe",
                steps=c.steps,
                eval_every=c.eval_every,
                lr=c.lr,
                weight_decay=weight_decay,
                batch_size=rows,
                schedule="constant",
            )
        ]

    def _fit(self, train: Encoded | None, val: Encoded | None) -> None:
        assert train is not None  # trains_on_images: fit encodes the training images
        c = self.config
        per_t, w0 = self.class_texts(self.templates)
        rows = self.train_tensors(train)  # images (every view)
        if c.text_samples:
            C, L, _ = per_t.shape
            rows = {
                "image": torch.cat([rows["image"], per_t.reshape(C * L, -1)]),
                "targets": torch.cat([rows["targets"], torch.arange(C).repeat_interleave(L)]),
            }
        n, d = rows["image"].shape
        heads: dict[float, tuple[nn.Module, Any, dict]] = {}

        def evaluate(wd: float) -> float:
            head = cast(ScaledLinearHead, self.init_head({"num_classes": len(self.classnames), "dim": d}))
            with torch.no_grad():
                head.weight.copy_(w0)
            res = self.train_head(
                train,
                val,
                self.stages(train, wd, n),
                batches=self.feature_batches(train, rows),
                work=n * d * len(self.classnames),
                run=f"wd-{wd:g}",
            )
            heads[wd] = (head, res.stages[0], self.fit_info.pop("training"))
            return res.stages[0].best_metric if res.stages[0].best_metric is not None else 0.0

        grid = list(c.wd_grid) if val is not None and len(val) else list(c.wd_grid[:1])
        sel = select_best(grid, evaluate)
        self.head, kept, training = heads[sel.best]
        self.fit_info.update({**sel.info("weight_decay"), "steps": kept.best_step, "training": training})
