"""CMM: cross-modal mapping (paper 002). A linear map takes image features into the text space,
learnable class prototypes T (initialised from the template-mean text embeddings) classify them,
a triplet loss on the pre-mapping features pulls images towards their class text, and the result
is fused with the zero-shot logits with a weight alpha searched on validation.

Two inputs (`input`): `joint`, the paper's form, a residual map W (D x D, zero-initialised) on the
normalised joint embedding; `bridge` (default), the map is a trainable copy of the backbone's
bridge on the pooled visual features (F -> D, initialised at `backbone.bridge()`), so CMM starts
from the backbone's zero-shot and can recover what the joint embedding dropped (docs/fewshot.md
measures both). The triplet loss and the fused zero-shot logits read the joint embedding in both.

Two schedules: `paper` (batch 8, AdamW 1e-4, 50 warm-up steps, cosine to 1e-5, 16,000 steps) and
`fast` (the same number of samples seen in batches of `fast_batch`, learning rates scaled by
sqrt(batch / 8); benchmarks/speed/cmm_speed.py measures both). Both train with the shared Trainer
and end on the last step, as the paper does; validation is logged every `eval_every` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import BridgeLayer
from ..errors import ConfigError
from ..modules.losses.triplet import prototype_triplet_loss
from ..training import Stage, TrainResult, select_best
from .base import Encoded, Feed, Method, TrainConfig, TrainOptions, check_dim, feature_keys, normalize
from .registry import register_method
from .tags import Tags
from .templates import resolve_templates

ALPHA_GRID = [round(0.1 * i, 1) for i in range(1, 21)]  # 0.1 ... 2.0, the paper's search


@dataclass(frozen=True)
class CMMConfig(TrainOptions):
    """CMM's options: the schedule, the class-prototype training and the zero-shot fusion."""

    # templates whose mean embedding initialises T (and gives the zero-shot logits)
    templates: str | list[str] = "select7"
    # training steps at batch_size (paper: 16,000); the fast schedule sees the same number of samples
    steps: int = 16000
    # AdamW at batch 8, peak learning rate 1e-4 (at that batch), weight decay 1e-4: the paper's
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, weight_decay=1e-4, batch_size=8))
    min_lr: float = 1e-5  # cosine floor (paper: 1e-5)
    warmup_steps: int = 50  # linear warm-up steps at batch_size (paper: "50 warm-up")
    eval_every: int = 0  # steps between validation logs and checkpoints (0: ten per run)
    margin: float = 1.0  # triplet margin (paper: 1.0)
    alpha: float = 1.0  # fusion weight in training, and at inference when fixed_alpha (paper: 1.0)
    alpha_grid: list[float] = field(default_factory=lambda: list(ALPHA_GRID))  # alphas tried on validation, in order
    fusion: str = "prob"  # prob: alpha*softmax(s/tau) + softmax(zero-shot) as in the paper's eq. 9 | logit
    schedule: str = "paper"  # paper (batch_size steps) | fast (fast_batch, scaled lr, same samples seen)
    fast_batch: int = 256  # batch of the fast schedule
    fast_lr_scale: str = "sqrt"  # learning-rate scaling of the fast schedule with batch: sqrt | linear
    bf16: bool = False  # bf16 autocast for the matmuls (measured in benchmarks/speed/cmm_speed.py; off by default)
    no_w: bool = False  # ablation: no mapping W (only T is learned)
    no_triplet: bool = False  # ablation: cross-entropy only
    no_clip_fusion: bool = False  # ablation: Logits_CMM alone, no zero-shot logits (train and test)
    fixed_alpha: bool = False  # ablation: keep alpha at `alpha` instead of searching it on validation
    # bridge: the map is a trainable copy of the backbone's bridge on the pooled features | joint: the
    # paper's residual W on the joint embedding (no_w then keeps the bridge fixed)
    input: str = "bridge"

    def __post_init__(self) -> None:
        if self.fusion not in ("prob", "logit"):
            raise ConfigError(f"cmm: fusion must be prob or logit, got {self.fusion!r}")
        schedule_of(self).check()  # validates the schedule options now
        if self.input not in ("bridge", "joint"):
            raise ConfigError(f"cmm: input must be bridge or joint, got {self.input!r}")
        if not self.alpha_grid or min(self.alpha_grid) < 0:
            raise ConfigError(f"cmm: alpha_grid must be non-empty and >= 0, got {self.alpha_grid}")


def schedule_of(cfg: CMMConfig) -> Stage:
    """The paper's schedule, or the fast one: same samples seen, larger batch, scaled learning rate."""
    if cfg.schedule not in ("paper", "fast"):
        raise ConfigError(f"cmm: schedule must be paper or fast, got {cfg.schedule!r}")
    if cfg.fast_lr_scale not in ("sqrt", "linear"):
        raise ConfigError(f"cmm: fast_lr_scale must be sqrt or linear, got {cfg.fast_lr_scale!r}")
    t = cfg.train
    steps, batch, k, warm = cfg.steps, t.batch_size, 1.0, cfg.warmup_steps
    if cfg.schedule == "fast":
        ratio = cfg.fast_batch / t.batch_size
        k = math.sqrt(ratio) if cfg.fast_lr_scale == "sqrt" else ratio
        steps = max(1, math.ceil(cfg.steps * t.batch_size / cfg.fast_batch))
        warm, batch = math.ceil(cfg.warmup_steps * t.batch_size / cfg.fast_batch), cfg.fast_batch
    return Stage(
        "cmm",
        steps=steps,
        batch_size=batch,
        lr=t.lr * k,
        min_lr=cfg.min_lr * k,
        warmup_steps=warm,
        weight_decay=t.weight_decay,
        schedule="cosine",
        keep="last",
        eval_every=cfg.eval_every or max(1, steps // 10),
    )


def fused_log_probs(
    cmm_logits: torch.Tensor, zs_logits: torch.Tensor | None, alpha: float, fusion: str
) -> torch.Tensor:
    """[N, C] log-probabilities of the fused prediction (eq. 9); with prob fusion the mixture
    alpha*p_cmm + p_clip is renormalised by 1 + alpha so it stays a distribution."""
    if zs_logits is None:
        return F.log_softmax(cmm_logits, dim=-1)
    if fusion == "logit":
        return F.log_softmax(alpha * cmm_logits + zs_logits, dim=-1)
    a = math.log(alpha / (1 + alpha)) if alpha > 0 else -math.inf
    b = math.log(1 / (1 + alpha))
    return torch.logaddexp(F.log_softmax(cmm_logits, dim=-1) + a, F.log_softmax(zs_logits, dim=-1) + b)


class CMMHead(nn.Module):
    """x -> scale * normalise(x W + x) · T (joint) or scale * normalise(bridge(pooled)) · T (bridge),
    fused with the frozen zero-shot logits of the joint embedding x.

    batch {"image": [B, D], "pooled": [B, F] (bridge)} -> {"logits": [B, C] fused log-probabilities};
    with "targets": {"loss": NLL of the fused prediction (+ the triplet loss on the pre-mapping features)}.
    """

    def __init__(self, num_classes: int, dim: int, scale: float, cfg: CMMConfig, pooled_dim: int = 0) -> None:
        super().__init__()
        self.scale, self.cfg = scale, cfg
        bridged = cfg.input == "bridge"
        # [D, D] residual map (joint); 0 = start at zero-shot
        self.W = None if cfg.no_w or bridged else nn.Parameter(torch.zeros(dim, dim))
        self.bridge = BridgeLayer(pooled_dim, dim, trainable=not cfg.no_w) if bridged else None  # F -> D
        self.T = nn.Parameter(torch.zeros(num_classes, dim))  # [C, D] learnable prototypes
        self.t0: torch.Tensor  # the buffers below
        self.alpha: torch.Tensor
        self.register_buffer("t0", torch.zeros(num_classes, dim))  # [C, D] frozen zero-shot class texts
        self.register_buffer("alpha", torch.tensor([cfg.alpha], dtype=torch.float64))  # fusion weight

    def parts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (CMM logits [B, C], zero-shot logits [B, C] or None)."""
        image = batch["image"]
        check_dim(image, self.T.shape[1], "cmm")
        x = normalize(image)
        if self.bridge is not None:
            check_dim(batch["pooled"], self.bridge.w0.shape[1], "cmm (pooled)")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            if self.bridge is not None:
                v = self.bridge(batch["pooled"])
            else:
                v = x @ self.W + x if self.W is not None else x
            s = self.scale * F.normalize(v, dim=-1) @ self.T.T
        zs = None if self.cfg.no_clip_fusion else self.scale * x @ self.t0.T
        return s.float(), zs

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {image [B, D], pooled [B, F] (bridge)} -> fused log-probabilities [B, C] (+ the loss with targets)."""
        s, zs = self.parts(batch)
        logp = fused_log_probs(s, zs, float(self.alpha), self.cfg.fusion)
        out = {"logits": logp}
        if "targets" in batch:
            y = batch["targets"]
            loss = F.nll_loss(logp, y)
            if not self.cfg.no_triplet:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
                    loss = loss + prototype_triplet_loss(batch["image"], self.T, y, self.cfg.margin)
            out["loss"] = loss
        return out


@register_method
class CMM(Method):
    """Cross-modal mapping (residual W, learnable T, triplet loss, alpha fusion searched on val)."""

    name = "cmm"
    tags = Tags(onnx=True, stream=True)
    Config = CMMConfig
    needs = frozenset({"image", "pooled"})  # pooled: input=bridge
    train_views = ("orig", "flip")
    selects = "alpha (training ends on its last step)"

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        self.templates = resolve_templates(self.config.templates)

    @property
    def scale(self) -> float:
        """The backbone's logit scale (CLIP's temperature)."""
        return float(self.backbone.logit_scale)

    def feature_needs(self) -> frozenset[str]:
        return self.needs if self.config.input == "bridge" else frozenset({"image"})

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        return CMMHead(spec["num_classes"], spec["dim"], self.scale, self.config, spec.get("pooled_dim", 0))

    def stages(self, train: Encoded) -> list[Stage]:
        return [schedule_of(self.config)]

    def prepare(self, train: Encoded, val: Encoded | None) -> Feed:
        t0 = self.class_texts(self.templates)[1]
        spec = {"num_classes": len(self.classnames), "dim": t0.shape[1]}
        if self.config.input == "bridge":
            spec["pooled_dim"] = int(self.backbone.pooled_dim)  # not the features: a streamed fit has none in memory
        head = cast(CMMHead, self.init_head(spec))
        with torch.no_grad():
            head.t0.copy_(t0)
            head.T.copy_(t0)
        if head.bridge is not None:
            head.bridge.reset(self.backbone)
        return Feed()

    def finish(self, val: Encoded | None, result: TrainResult) -> None:
        """Alpha, the fusion weight, chosen on validation over the trained head's logits."""
        c, st, head = self.config, schedule_of(self.config), cast(CMMHead, self.head)
        info: dict[str, Any] = {
            "steps": st.steps,
            "batch": st.batch_size,
            "peak_lr": st.lr,
            "bf16": c.bf16,
            "alpha_source": "fixed",
        }
        if not c.no_clip_fusion and not c.fixed_alpha and val is not None and len(val):
            with torch.no_grad():
                s, zs = head.parts(val.features.batch(feature_keys(self.feature_needs()), 0, len(val)))
            y = torch.as_tensor(val.dataset.labels())
            sel = select_best(
                list(c.alpha_grid),
                lambda a: float((fused_log_probs(s, zs, a, c.fusion).argmax(-1) == y).float().mean()),
                default=c.alpha if c.alpha in c.alpha_grid else None,
            )
            head.alpha.fill_(sel.best)
            info.update({**sel.info("alpha"), "alpha_source": "validation"})
        info["alpha"] = float(head.alpha)
        self.fit_info.update(info)
