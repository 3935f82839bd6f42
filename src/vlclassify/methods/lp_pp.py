"""LP++ (Huang et al., CVPR 2024, "LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP"): a
linear probe whose class weights blend a visual prototype with the class text,
logits_k = x' w_k + b_k + alpha_k (j' t_k), with class-wise blending weights alpha_k.

- x: the normalised features the visual part reads (`input`: `pooled`, default, the pooled visual
  features as the linear probe reads them; `joint`, the paper's, the joint embedding); j: the
  normalised joint embedding, t_k: the template-mean class texts (zero-shot's classifier).
- Initialisation from the data: w_k = n_k mu_k (the class sums over the support images, as the
  public code's centroids), b = 0, and every alpha_k such that the text part starts with the visual
  part's spread on the training data (`alpha_init=spread`). The public code's alpha_k = 250 x the
  mean own-class zero-shot similarity (`alpha_init=paper`) assumes CLIP's narrow band of cosines:
  on effnet-minilm's ConSE embeddings (cosines near 0.8) the text part drowns the visual one, and
  LP++ stays far below the probe (Fashion-MNIST, 4 shots, seed 1, 1,000 test
  images: 62.4 with it, 73.7 with the spread init, linear probe 72.1; `vlclassify bench fewshot
  --data fashion-mnist --methods 'lp++,lp++[alpha_init="spread"]' --shots 4 --seeds 1
  --test-limit 1000`, run while `paper` was the default).
- Full-batch gradient descent with momentum 0.9 (the code's SGD) and step sizes from the data, no
  learning-rate search: 4N / lambda_max(X'X) for w, b (the paper's Lipschitz bound) and
  N / (4 max_k sum_i (j_i' t_k)^2) for alpha. The Trainer has one learning rate, so each block is
  stored scaled by the square root of its step (w = sqrt(step_w) u): plain steps on u are steps of
  size step_w on w. Unlike the code, alpha steps every epoch with its own gradient (the code steps
  it every 10th epoch with a gradient it never zeroes).
- The epoch kept is chosen on validation (the Trainer's keep-best; the code picks it on validation
  too, but scores test at every improvement).

Like every fusing method here, the visual and text parts are then weighed on validation over
training/fusion.py's grid from text only to visual only, the trained blend (weights 1, 1) being
the default that ties go to. Every candidate is scaled by one factor, so that the text part has
the zero-shot classifier's spread on the training data: the paper's alpha init (250 x a cosine)
assumes CLIP's narrow band of similarities, and on a backbone with a wider band its logits
saturate the softmax (probabilities of exactly 0 and 1 leave the decision rule nothing to choose).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..training import Stage, TrainResult, select_best
from ..training.fusion import RATIOS, ratio_weights, spread_scale
from .base import Encoded, Feed, Method, TrainConfig, TrainOptions, check_dim, feature_keys, normalize
from .registry import register_method
from .tags import Tags
from .templates import resolve_templates

ALPHA_INIT = 250.0  # the public code's init_alpha factor


@dataclass(frozen=True)
class LPPPConfig(TrainOptions):
    """LP++'s options: templates, the visual features, the full-batch schedule (`train`'s seed, threads
    and run_dir apply; its lr and batch size do not: the steps come from the data, every row is one batch)."""

    train: TrainConfig = field(default_factory=TrainConfig)  # its seed, threads and run_dir (see above)
    templates: str | list[str] = "select7"  # prompt templates for the class texts t_k
    input: str = "pooled"  # pooled: the visual part reads the pooled features | joint: the joint embedding (paper)
    epochs: int = 300  # full-batch steps (the public code: 300); the best on validation is kept
    momentum: float = 0.9  # heavy-ball momentum of both blocks (the public code's SGD)
    # spread: every alpha_k such that the text part starts with the visual part's spread on the training
    # data | paper: 250 x the mean own-class similarity (the public code's, which assumes CLIP's scale)
    alpha_init: str = "spread"

    def __post_init__(self) -> None:
        if self.input not in ("pooled", "joint"):
            raise ConfigError(f"lp++: input must be pooled or joint, got {self.input!r}")
        if self.alpha_init not in ("spread", "paper"):
            raise ConfigError(f"lp++: alpha_init must be spread or paper, got {self.alpha_init!r}")
        if self.epochs < 1 or not 0 <= self.momentum < 1:
            raise ConfigError(f"lp++: epochs must be >= 1 and 0 <= momentum < 1, got {self.epochs}, {self.momentum}")


class LPPPHead(nn.Module):
    """batch {"image": [B, D], "pooled": [B, F] (input=pooled)} -> {"logits": w_zs * alpha * (j T') +
    w_data * (x W' + b) [B, C]} (+ "loss": cross-entropy, with targets)."""

    def __init__(self, num_classes: int, dim: int, feature: str, feat_dim: int) -> None:
        super().__init__()
        self.feature = feature
        self.u = nn.Parameter(torch.zeros(num_classes, feat_dim))  # [C, F] W / sqrt(step_w)
        self.ub = nn.Parameter(torch.zeros(num_classes))  # [C] b / sqrt(step_w)
        self.v = nn.Parameter(torch.zeros(num_classes))  # [C] alpha / sqrt(step_alpha)
        self.texts: torch.Tensor  # the buffers below
        self.steps: torch.Tensor
        self.weights: torch.Tensor
        self.register_buffer("texts", torch.zeros(num_classes, dim))  # [C, D] normalised class texts
        self.register_buffer("steps", torch.ones(2, dtype=torch.float64))  # sqrt of (step_w, step_alpha)
        self.register_buffer("weights", torch.ones(2, dtype=torch.float64))  # (w_zs, w_data) after training

    def parts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text part alpha * (j T') [B, C], visual part x W' + b [B, C])."""
        check_dim(batch["image"], self.texts.shape[1], "lp++")
        x = batch[self.feature]
        check_dim(x, self.u.shape[1], f"lp++ ({self.feature})")
        sw, sa = (float(s) for s in self.steps)
        text = (sa * self.v) * (normalize(batch["image"]) @ self.texts.T)
        return text, normalize(x) @ (sw * self.u).T + sw * self.ub

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch -> logits [B, C] at the stored weights (and the loss with targets)."""
        text, visual = self.parts(batch)
        w_zs, w_data = (float(w) for w in self.weights)
        z = w_zs * text + w_data * visual
        out = {"logits": z}
        if "targets" in batch:
            out["loss"] = F.cross_entropy(z, batch["targets"])
        return out


def lipschitz_steps(x: torch.Tensor, sims: torch.Tensor) -> tuple[float, float]:
    """x [N, F] normalised features, sims [N, C] = j' t_k -> LP++'s step sizes (w, alpha):
    4N / lambda_max(X'X) and N / (4 max_k sum_i sims_ik^2)."""
    n = x.shape[0]
    lam = float(torch.linalg.matrix_norm(x.double(), ord=2)) ** 2  # lambda_max(X'X) = sigma_max(X)^2
    return 4 * n / lam, n / (4 * float((sims.double() ** 2).sum(0).max()))


@register_method
class LPPP(Method):
    """LP++: a linear probe blending class prototypes with class texts; Lipschitz step sizes, epoch on val."""

    name = "lp++"
    Config = LPPPConfig
    needs = frozenset({"image", "pooled"})  # pooled: input=pooled
    train_views = ("orig", "flip")  # the support images and their mirror images are samples
    selects = "epoch, fusion weights"
    tags = Tags(onnx=True)  # full-batch on whole training tensors: no streaming

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        self.templates = resolve_templates(self.config.templates)

    @property
    def feature(self) -> str:
        """The FeatureSet field the visual part reads."""
        return "pooled" if self.config.input == "pooled" else "image"

    def feature_needs(self) -> frozenset[str]:
        return self.needs if self.config.input == "pooled" else frozenset({"image"})

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        return LPPPHead(spec["num_classes"], spec["dim"], self.feature, spec["feat_dim"])

    def stages(self, train: Encoded) -> list[Stage]:
        c = self.config
        rows = len(train) * len(self.training_views())  # full batch: every row of every view
        return [
            Stage(
                "lp++",
                epochs=c.epochs,
                lr=1.0,  # the steps are in the parametrisation (see the module docstring)
                optimizer="sgd",
                momentum=c.momentum,
                weight_decay=0.0,
                batch_size=rows,
                schedule="constant",
            )
        ]

    def prepare(self, train: Encoded, val: Encoded | None) -> Feed:
        rows = self.train_tensors(train)  # every cached view is a sample
        x, y, k = normalize(rows[self.feature]), rows["targets"], len(self.classnames)
        text = self.class_texts(self.templates)[1]  # [C, D]
        sims = normalize(rows["image"]) @ text.T  # [N, C] zero-shot similarities
        onehot = F.one_hot(y, k).float()  # [N, C]
        views = len(y) / len(train)
        step_w, step_a = lipschitz_steps(x, sims)
        own = (onehot * sims).sum(0) / onehot.sum(0)  # [C] each class's mean similarity to its own text
        head = cast(LPPPHead, self.init_head({"num_classes": k, "dim": text.shape[1], "feat_dim": x.shape[1]}))
        with torch.no_grad():
            head.texts.copy_(text)
            head.steps.copy_(torch.tensor([step_w, step_a], dtype=torch.float64).sqrt())
            w0 = (onehot.T @ x) / views  # [C, F] class sums over the images (not their views)
            head.u.copy_(w0 / step_w**0.5)
            paper = ALPHA_INIT * float(own.mean())
            a0 = paper if self.config.alpha_init == "paper" else spread_scale(x @ w0.T, sims)
            head.v.fill_(a0 / step_a**0.5)
        self.fit_info.update({"step_w": step_w, "step_alpha": step_a})
        self._rows = rows  # the training rows, for finish's spreads (dropped there)
        return Feed(batches=self.feature_batches(train, rows))

    def finish(self, val: Encoded | None, result: TrainResult) -> None:
        rows = self.__dict__.pop("_rows")
        head = cast(LPPPHead, self.head)
        zs = float(self.backbone.logit_scale) * (normalize(rows["image"]) @ head.texts.T)  # [N, C]
        self.fit_info["epoch"] = result.stages[0].best_epoch
        self.fit_info.update(self.search(head, val, rows, zs))

    def search(
        self, head: LPPPHead, val: Encoded | None, rows: dict[str, torch.Tensor], zs: torch.Tensor
    ) -> dict[str, Any]:
        """Weigh the text and visual parts on validation: training/fusion.py's grid, with the trained
        blend inserted where its ratio falls, as the default; all scaled to the spread of the zero-shot
        logits `zs` [N, C] of the training rows (the grid's pairs by their text part, the blend whole)."""
        with torch.no_grad():
            text, visual = head.parts(rows)
        k, c = spread_scale(text, visual), spread_scale(zs, text)
        grid = [(c * a, c * b) for a, b in (ratio_weights(r, k) for r in RATIOS)]
        t = spread_scale(zs, text + visual)
        trained = (t, t)  # the trained blend, its fused logits at zero-shot's spread
        grid.insert(bisect.bisect(RATIOS, 1 / k), trained)  # the trained blend's ratio is 1 / k
        if val is None or not len(val):
            head.weights.copy_(torch.tensor(trained, dtype=torch.float64))
            return {"fusion": list(trained), "fusion_source": "the trained blend (no validation set)"}
        with torch.no_grad():
            tv, dv = head.parts(val.features.batch(feature_keys(self.feature_needs()), 0, len(val)))
        yv = torch.as_tensor(val.dataset.labels())
        sel = select_best(grid, lambda w: float(((w[0] * tv + w[1] * dv).argmax(-1) == yv).float().mean()), trained)
        head.weights.copy_(torch.tensor(sel.best, dtype=torch.float64))
        return {**sel.info("fusion"), "fusion_source": "validation"}
