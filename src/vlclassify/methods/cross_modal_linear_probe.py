"""Cross-modal linear probe (Lin et al. 2023, "Multimodality helps unimodality"): the class text
embeddings (one per template) are extra labelled training samples beside the few-shot images, in
the shared embedding space, for a linear head initialised from the zero-shot classifier. Weight
decay (grid, in order) and the step to keep (every `eval_every` steps) are chosen on validation.

Two inputs (`input`): `joint` (default), the paper's form, the head on the joint image embedding;
`bridge`, the images enter through a trainable copy of the backbone's bridge on their pooled
visual features (initialised at `backbone.bridge()`, trained with the head), and the class texts,
already in the joint space, enter the head directly. The paper's form stays the default because
the bridged one wins on Fashion-MNIST but loses at 1-4 shots on Tux Paint with effnet-minilm
(docs/fewshot.md, "The bridge")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import BridgeLayer
from ..errors import ConfigError
from ..training import Stage, select_best
from .base import Encoded, Method, TrainConfig, TrainOptions, check_dim, normalize
from .registry import register_method
from .tags import Tags
from .templates import resolve_templates


@dataclass(frozen=True)
class CrossModalLinearProbeConfig(TrainOptions):
    """Options of the cross-modal linear probe: text samples, optimiser, weight-decay grid."""

    templates: str | list[str] = "select7"  # templates: their mean initialises the head; each one is a text sample
    # add the per-template class texts as training samples (False = image-only, zero-shot init)
    text_samples: bool = True
    steps: int = 300  # full-batch AdamW steps (weight decay: wd_grid)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3))  # AdamW learning rate 1e-3, constant
    wd_grid: list[float] = field(
        default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2]
    )  # weight decays tried on val, in order
    eval_every: int = 25  # steps between validation checks (the best step is kept)
    # joint: the joint image embedding (the paper's form) | bridge: images through a trainable copy of
    # the backbone's bridge on the pooled features
    input: str = "joint"

    def __post_init__(self) -> None:
        if self.input not in ("bridge", "joint"):
            raise ConfigError(f"cross-modal-linear-probe: input must be bridge or joint, got {self.input!r}")


class ScaledLinearHead(nn.Module):
    """batch {"image": [B, D]} (joint) or {"pooled": [B, F]} (bridged: x = bridge(pooled); training
    rows flagged "is_text" [B] take x from "image", a class text) -> {"logits": scale * normalise(x) W^T
    + b [B, C]} (+ "loss" with targets)."""

    def __init__(self, num_classes: int, dim: int, scale: float, pooled_dim: int = 0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))  # [C, D], starts at the zero-shot classifier
        self.bias = nn.Parameter(torch.zeros(num_classes))  # [C]
        self.bridge = BridgeLayer(pooled_dim, dim) if pooled_dim else None  # F -> D

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {image [B, D]} or {pooled [B, F], image, is_text [B]} (bridge) -> scaled cosine logits
        [B, C] (and the loss with targets)."""
        if self.bridge is None:
            x = batch["image"]
        else:
            check_dim(batch["pooled"], self.bridge.w0.shape[1], "cross-modal-linear-probe (pooled)")
            x = self.bridge(batch["pooled"])
            if "is_text" in batch:
                x = torch.where(batch["is_text"][:, None], batch["image"].float(), x)
        check_dim(x, self.weight.shape[1], "cross-modal-linear-probe")
        z = self.scale * normalize(x) @ self.weight.T + self.bias
        out = {"logits": z}
        if "targets" in batch:
            out["loss"] = F.cross_entropy(z, batch["targets"])
        return out


@register_method
class CrossModalLinearProbe(Method):
    """Linear head on joint-space features, trained on images + class texts, zero-shot initialised."""

    name = "cross-modal-linear-probe"
    tags = Tags(onnx=True)
    Config = CrossModalLinearProbeConfig
    needs = frozenset({"image", "pooled"})  # image: input=joint; pooled: input=bridge
    train_views = ("orig", "flip")
    selects = "weight decay, step"

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        self.templates = resolve_templates(self.config.templates)

    def feature_needs(self) -> frozenset[str]:
        return frozenset({"pooled" if self.config.input == "bridge" else "image"})

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        return ScaledLinearHead(
            spec["num_classes"], spec["dim"], float(self.backbone.logit_scale), spec.get("pooled_dim", 0)
        )

    def _stages(self, weight_decay: float, rows: int) -> list[Stage]:
        """The probe's one full-batch stage at weight decay `weight_decay` (a grid point)."""
        c = self.config
        return [
            Stage(
                "probe",
                steps=c.steps,
                eval_every=c.eval_every,
                lr=c.train.lr,
                weight_decay=weight_decay,
                batch_size=rows,
                schedule="constant",
            )
        ]

    def fit_head(self, train: Encoded, val: Encoded | None) -> None:
        """One Trainer run per weight decay of the grid; the best on validation is kept."""
        c = self.config
        per_t, w0 = self.class_texts(self.templates)
        rows = self.train_tensors(train)  # images (every view)
        d = w0.shape[1]
        spec = {"num_classes": len(self.classnames), "dim": d}
        if c.input == "bridge":
            spec["pooled_dim"] = int(rows["pooled"].shape[1])
            n_img = len(rows["targets"])
            rows = {**rows, "image": torch.zeros(n_img, d), "is_text": torch.zeros(n_img, dtype=torch.bool)}
        if c.text_samples:
            C, L, _ = per_t.shape
            texts = {"image": per_t.reshape(C * L, -1), "targets": torch.arange(C).repeat_interleave(L)}
            if c.input == "bridge":  # text rows skip the bridge: they are in the joint space already
                texts |= {
                    "pooled": torch.zeros(C * L, spec["pooled_dim"]),
                    "is_text": torch.ones(C * L, dtype=torch.bool),
                }
            rows = {k: torch.cat([rows[k], texts[k]]) for k in rows}
        n = len(rows["targets"])
        heads: dict[float, tuple[nn.Module, Any, dict]] = {}

        def evaluate(wd: float) -> float:
            head = cast(ScaledLinearHead, self.init_head(spec))
            with torch.no_grad():
                head.weight.copy_(w0)
            if head.bridge is not None:
                head.bridge.reset(self.backbone)
            res = self.train_head(
                train, val, self._stages(wd, n), batches=self.feature_batches(train, rows), run=f"wd-{wd:g}"
            )
            heads[wd] = (head, res.stages[0], self.fit_info.pop("training"))
            return res.stages[0].best_metric if res.stages[0].best_metric is not None else 0.0

        grid = list(c.wd_grid) if val is not None and len(val) else list(c.wd_grid[:1])
        sel = select_best(grid, evaluate)
        self.head, kept, training = heads[sel.best]
        self.fit_info.update({**sel.info("weight_decay"), "steps": kept.best_step, "training": training})
