"""GDA (Wang et al., ICLR 2024, "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation"):
Gaussian discriminant analysis on the few-shot features, fused with the zero-shot logits.

On the normalised features x of the support images and their augmented views (the cached flip),
class means mu_k, centred samples z_i = x_i - mu_{y_i}, their covariance S, and a shrunk precision
P = D * pinv((N - 1) S + tr(S) I_D) (D the feature width, N the samples); then W_k = P mu_k and
b_k = log(1/K) - mu_k' P mu_k / 2, i.e. the linear classifier of Gaussians with one shared
covariance and uniform priors. Closed form: nothing is trained.

logits = w_zs * zero-shot + w_data * (x W' + b), the pair chosen on validation over
training/fusion.py's grid, from zero-shot only to GDA only, in units of the two logit sets'
spread on the training data. Two inputs (`input`): `pooled` (default), the Gaussians live on the
pooled visual features (wider and richer than a ConSE join's embeddings, as for Tip-Adapter's
cache); `joint`, the paper's, on the joint embedding. The zero-shot logits read the joint
embedding in both. Multi-label data is refused: the model is one Gaussian per image's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..training import select_best
from ..training.fusion import DEFAULT_RATIO, RATIOS, ratio_weights, spread_scale
from .base import Encoded, Method, check_dim, feature_keys, normalize
from .registry import register_method
from .tags import Tags
from .templates import resolve_templates


@dataclass(frozen=True)
class GDAConfig:
    """GDA's options: the zero-shot templates and the features the Gaussians live on."""

    templates: str | list[str] = "select7"  # prompt templates for the zero-shot classifier
    input: str = "pooled"  # pooled: the pooled visual features | joint: the joint embedding (the paper's)

    def __post_init__(self) -> None:
        if self.input not in ("pooled", "joint"):
            raise ConfigError(f"gda: input must be pooled or joint, got {self.input!r}")


def gda_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] normalised features, y [N] labels -> (W [K, D], b [K]) of GDA with the paper's
    shrinkage (float64 throughout: the precision of a D x D covariance from a few samples)."""
    x = x.double()
    onehot = torch.nn.functional.one_hot(y, num_classes).double()  # [N, K]
    mu = (onehot.T @ x) / onehot.sum(0)[:, None]  # [K, D] class means
    z = x - mu[y]  # [N, D] centred samples
    n, d = x.shape
    cov = torch.cov(z.T) if n > 1 else torch.zeros(d, d, dtype=x.dtype)  # [D, D], unbiased
    shrunk = (n - 1) * cov + torch.trace(cov) * torch.eye(d, dtype=x.dtype)
    # P mu = D pinv(shrunk) mu: the shrunk matrix is positive definite unless every sample sits on its
    # class mean (tr S = 0, pinv = 0: GDA then adds a constant), so a solve gives the pinv's product
    # (an eigendecomposition of a 1280 x 1280 matrix takes ~100 times as long)
    if float(torch.trace(cov)) > 0:
        w = d * torch.linalg.solve(shrunk, mu.T).T  # [K, D] (P is symmetric)
    else:
        w = torch.zeros_like(mu)
    b = torch.log(torch.tensor(1.0 / num_classes, dtype=x.dtype)) - 0.5 * (w * mu).sum(-1)  # [K]
    return w.float(), b.float()


class GDAHead(nn.Module):
    """batch {"image": [B, D], "pooled": [B, F] (input=pooled)} -> {"logits": w_zs * zero-shot +
    w_data * (normalise(x) W' + b) [B, C]}."""

    def __init__(self, num_classes: int, dim: int, scale: float, feature: str, feat_dim: int) -> None:
        super().__init__()
        self.scale, self.feature = scale, feature
        self.class_embeds: torch.Tensor  # the buffers below
        self.weight: torch.Tensor
        self.bias: torch.Tensor
        self.weights: torch.Tensor
        self.register_buffer("class_embeds", torch.zeros(num_classes, dim))  # [C, D] zero-shot classifier
        self.register_buffer("weight", torch.zeros(num_classes, feat_dim))  # [C, F] GDA's W
        self.register_buffer("bias", torch.zeros(num_classes))  # [C] GDA's b
        self.register_buffer("weights", torch.tensor([1.0, 0.0], dtype=torch.float64))  # (w_zs, w_data)

    def parts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (zero-shot logits [B, C], GDA logits [B, C])."""
        check_dim(batch["image"], self.class_embeds.shape[1], "gda")
        x = batch[self.feature]
        check_dim(x, self.weight.shape[1], f"gda ({self.feature})")
        return self.scale * normalize(batch["image"]) @ self.class_embeds.T, normalize(x) @ self.weight.T + self.bias

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch -> fused logits [B, C] at the stored weights."""
        zs, data = self.parts(batch)
        w_zs, w_data = (float(w) for w in self.weights)
        return {"logits": w_zs * zs + w_data * data}


@register_method
class GDA(Method):
    """Gaussian discriminant analysis (class means, one shrunk covariance) fused with zero-shot; weights on val."""

    name = "gda"
    Config = GDAConfig
    needs = frozenset({"image", "pooled"})  # pooled: input=pooled
    train_views = ("orig", "flip")  # the support images and their mirror images are samples
    selects = "fusion weights"
    tags = Tags(onnx=True)  # reads whole training tensors: no streaming

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        self.templates = resolve_templates(self.config.templates)

    def feature_needs(self) -> frozenset[str]:
        return self.needs if self.config.input == "pooled" else frozenset({"image"})

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        feature = "pooled" if self.config.input == "pooled" else "image"
        return GDAHead(spec["num_classes"], spec["dim"], float(self.backbone.logit_scale), feature, spec["feat_dim"])

    def fit_head(self, train: Encoded, val: Encoded | None) -> None:
        rows = self.train_tensors(train)  # every cached view is a sample
        feature = "pooled" if self.config.input == "pooled" else "image"
        x, y = normalize(rows[feature]), rows["targets"]
        text = self.class_texts(self.templates)[1]
        spec = {"num_classes": len(self.classnames), "dim": text.shape[1], "feat_dim": x.shape[1]}
        head = cast(GDAHead, self.init_head(spec))
        w, b = gda_classifier(x, y, len(self.classnames))
        with torch.no_grad():
            head.class_embeds.copy_(text)
            head.weight.copy_(w)
            head.bias.copy_(b)
            k = spread_scale(*head.parts(rows))  # the training logits' spreads (every view)
        grid = [ratio_weights(r, k) for r in RATIOS]
        default = ratio_weights(DEFAULT_RATIO, k)
        info: dict[str, Any] = {"samples": len(y), "feature": feature}
        if val is not None and len(val):
            with torch.no_grad():
                zs, data = head.parts(val.features.batch(feature_keys(self.feature_needs()), 0, len(val)))
            yv = torch.as_tensor(val.dataset.labels())
            sel = select_best(
                grid, lambda wt: float(((wt[0] * zs + wt[1] * data).argmax(-1) == yv).float().mean()), default
            )
            chosen, info = sel.best, {**info, **sel.info("fusion"), "fusion_source": "validation"}
        else:
            chosen, info = default, {**info, "fusion": list(default), "fusion_source": "default (no validation set)"}
        head.weights.copy_(torch.tensor(chosen, dtype=torch.float64))
        info["zs_weight"], info["data_weight"] = chosen
        self.fit_info.update(info)
