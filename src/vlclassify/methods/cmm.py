"""CMM: cross-modal mapping (paper 002). A residual linear map W takes normalised image features
into the text space, learnable class prototypes T (initialised from the template-mean text
embeddings) classify them, a triplet loss on the pre-mapping features pulls images towards their
class text, and the result is fused with the zero-shot logits with a weight alpha searched on
validation.

Two schedules: `paper` (batch 8, AdamW 1e-4, 50 warm-up steps, cosine to 1e-5, 16,000 steps) and
`fast` (the same number of samples seen in batches of `fast_batch`, learning rates scaled by
sqrt(batch / 8)), which benchmarks/cmm_speed.py shows to match the paper schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..modules.cpu import cpu_threads
from ..modules.losses.triplet import prototype_triplet_loss
from ..modules.schedules import set_lr, warmup_cosine
from .base import Encoded, Method, check_dim, normalize
from .registry import register_method
from .templates import cached_template_embeddings, resolve_templates

ALPHA_GRID = [round(0.1 * i, 1) for i in range(1, 21)]  # 0.1 ... 2.0, the paper's search


@dataclass
class CMMConfig:
    templates: str | list[str] = (
        "select7"  # prompt templates whose mean embedding initialises T (and gives the zero-shot logits)
    )
    iters: int = (
        16000  # training steps at batch_size (paper: 16,000); the fast schedule sees the same number of samples
    )
    batch_size: int = 8  # paper: 8
    lr: float = 1e-4  # AdamW peak learning rate at batch_size (paper: 1e-4)
    weight_decay: float = 1e-4  # AdamW weight decay (paper: 1e-4)
    min_lr: float = 1e-5  # cosine floor (paper: 1e-5)
    warmup_iters: int = (
        50  # linear warm-up steps at batch_size (paper: "50 warm-up"; 16k steps are ~4 epochs, so steps)
    )
    margin: float = 1.0  # triplet margin (paper: 1.0)
    alpha: float = 1.0  # fusion weight in training, and at inference when fixed_alpha (paper: 1.0)
    alpha_grid: list[float] = field(
        default_factory=lambda: list(ALPHA_GRID)
    )  # alphas tried on validation (paper: 0.1..2.0 step 0.1)
    fusion: str = (
        "prob"  # prob: alpha*softmax(s/tau) + softmax(zero-shot) as in the paper's eq. 9 | logit: the same on logits
    )
    schedule: str = "paper"  # paper (batch_size steps) | fast (fast_batch, scaled lr, same samples seen)
    fast_batch: int = 256  # batch of the fast schedule
    fast_lr_scale: str = "sqrt"  # learning-rate scaling of the fast schedule with batch: sqrt | linear
    bf16: bool = False  # bf16 autocast for the matmuls (measured in benchmarks/cmm_speed.py; off by default)
    no_w: bool = False  # ablation: no mapping W (only T is learned)
    no_triplet: bool = False  # ablation: cross-entropy only
    no_clip_fusion: bool = False  # ablation: Logits_CMM alone, no zero-shot logits (train and test)
    fixed_alpha: bool = False  # ablation: keep alpha at `alpha` instead of searching it on validation
    seed: int = 0  # batch sampling seed
    threads: int = 0  # torch threads while training; 0 = auto (1 for small problems, where more threads only contend)


@dataclass
class Schedule:
    steps: int
    batch: int
    lr: float
    min_lr: float
    warmup: int
    bf16: bool


def schedule_of(cfg: CMMConfig) -> Schedule:
    """The paper's schedule, or the fast one: same samples seen, larger batch, scaled learning rate."""
    if cfg.schedule == "paper":
        return Schedule(cfg.iters, cfg.batch_size, cfg.lr, cfg.min_lr, cfg.warmup_iters, bool(cfg.bf16))
    if cfg.schedule != "fast":
        raise ConfigError(f"cmm: schedule must be paper or fast, got {cfg.schedule!r}")
    ratio = cfg.fast_batch / cfg.batch_size
    if cfg.fast_lr_scale not in ("sqrt", "linear"):
        raise ConfigError(f"cmm: fast_lr_scale must be sqrt or linear, got {cfg.fast_lr_scale!r}")
    k = math.sqrt(ratio) if cfg.fast_lr_scale == "sqrt" else ratio
    steps = max(1, math.ceil(cfg.iters * cfg.batch_size / cfg.fast_batch))
    warm = math.ceil(cfg.warmup_iters * cfg.batch_size / cfg.fast_batch)
    return Schedule(steps, cfg.fast_batch, cfg.lr * k, cfg.min_lr * k, warm, bool(cfg.bf16))


def fused_log_probs(
    cmm_logits: torch.Tensor, zs_logits: torch.Tensor | None, alpha: float, fusion: str
) -> torch.Tensor:
    """[N, C] log-probabilities of the fused prediction (eq. 9); with prob fusion the mixture
    alpha*p_cmm + p_clip is renormalised by 1 + alpha so it stays a distribution."""
    if zs_logits is None:
        return F.log_softmax(cmm_logits, dim=-1)
    if fusion == "logit":
        return F.log_softmax(alpha * cmm_logits + zs_logits, dim=-1)
    a = torch.log(torch.tensor(alpha / (1 + alpha)))
    b = torch.log(torch.tensor(1 / (1 + alpha)))
    return torch.logaddexp(F.log_softmax(cmm_logits, dim=-1) + a, F.log_softmax(zs_logits, dim=-1) + b)


def cmm_logits(x: torch.Tensor, W: torch.Tensor | None, T: torch.Tensor, scale: float) -> torch.Tensor:
    """x [N, D] normalised image features -> [N, C] scale * normalise(x W + x) · T."""
    v = x @ W + x if W is not None else x
    return scale * F.normalize(v, dim=-1) @ T.T


def train_cmm(
    x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, scale: float, cfg: CMMConfig, progress: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, Any]]:
    """x [N, D] normalised features (all views), y [N], t0 [C, D] normalised class texts -> (W, T, info).

    The zero-shot logits of the training rows are computed once (T0 is frozen), the batches are
    index draws from per-epoch permutations, and the triplet backward touches two prototype rows.
    """
    sch = schedule_of(cfg)
    with cpu_threads(min(sch.batch, x.shape[0]) * x.shape[1] * max(x.shape[1], t0.shape[0]), cfg.threads, small=2**26):
        return _train(x, y, t0, scale, cfg, sch, progress)


def _train(x, y, t0, scale, cfg: CMMConfig, sch: Schedule, progress: bool):
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    x = x.float().contiguous()
    zs = None if cfg.no_clip_fusion else (scale * x @ t0.T)  # [N, C], fixed
    T = torch.nn.Parameter(t0.clone().float())  # [C, D]
    W = None if cfg.no_w else torch.nn.Parameter(torch.zeros(x.shape[1], x.shape[1]))  # [D, D]; 0 = start at zero-shot
    params = [p for p in (W, T) if p is not None]
    try:
        opt = torch.optim.AdamW(params, lr=sch.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=sch.lr, weight_decay=cfg.weight_decay)
    need = sch.steps * sch.batch
    if n > sch.batch:  # per-epoch permutations cut into batches
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need].view(
            sch.steps, sch.batch
        )
    else:  # the whole set fits in a batch: full-batch steps (the expected gradient of any batch drawn from it)
        order = torch.arange(n).expand(sch.steps, n)
    t_start = time.perf_counter()
    losses = []
    for step in tqdm(range(sch.steps), desc="cmm", disable=not progress, leave=False):
        set_lr(opt, warmup_cosine(step, sch.steps, sch.lr, sch.min_lr, sch.warmup))
        idx = order[step]
        xb, yb = x[idx], y[idx]  # [B, D], [B]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sch.bf16):
            s = cmm_logits(xb, W, T, scale)  # [B, C]
        s = s.float()
        if zs is None:
            loss = F.cross_entropy(s, yb)
        else:
            loss = F.nll_loss(fused_log_probs(s, zs[idx], cfg.alpha, cfg.fusion), yb)
        if not cfg.no_triplet:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sch.bf16):
                loss = loss + prototype_triplet_loss(xb, T, yb, cfg.margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == sch.steps - 1:
            losses.append(float(loss.detach()))
    info = {
        "steps": sch.steps,
        "batch": sch.batch,
        "peak_lr": sch.lr,
        "bf16": sch.bf16,
        "train_seconds": time.perf_counter() - t_start,
        "final_loss": losses[-1],
    }
    return (None if W is None else W.detach()), T.detach(), info


def search_alpha(
    cmm: torch.Tensor, zs: torch.Tensor, y: np.ndarray, grid: list[float], fusion: str
) -> tuple[float, dict]:
    """Best alpha by validation accuracy; ties go to the lower validation NLL."""
    yt = torch.as_tensor(y)
    scores = {}
    for a in grid:
        lp = fused_log_probs(cmm, zs, a, fusion)
        scores[a] = (float((lp.argmax(-1) == yt).float().mean()), float(F.nll_loss(lp, yt)))
    best = max(grid, key=lambda a: (scores[a][0], -scores[a][1]))
    return best, {str(a): round(v[0], 4) for a, v in scores.items()}


@register_method
class CMM(Method):
    """Cross-modal mapping (residual W, learnable T, triplet loss, alpha fusion searched on val)."""

    name = "cmm"
    Config = CMMConfig
    train_views = ("orig", "flip")

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        if self.config.fusion not in ("prob", "logit"):
            raise ConfigError(f"cmm: fusion must be prob or logit, got {self.config.fusion!r}")
        schedule_of(self.config)  # validates the schedule options now
        if not self.config.alpha_grid or min(self.config.alpha_grid) < 0:
            raise ConfigError(f"cmm: alpha_grid must be non-empty and >= 0, got {self.config.alpha_grid}")
        self.templates = resolve_templates(self.config.templates)
        self.t0: torch.Tensor | None = None  # [C, D] frozen zero-shot class texts
        self.T: torch.Tensor | None = None  # [C, D] learned prototypes
        self.W: torch.Tensor | None = None  # [D, D] learned map (None with no_w)
        self.alpha = self.config.alpha

    @property
    def scale(self) -> float:
        return float(self.backbone.logit_scale)

    def _train_xy(self, train: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        f = train.features
        views = [f.image] + [f.views[v].image for v in self.train_views[1:] if v in f.views]
        y = torch.as_tensor(train.dataset.labels())
        return normalize(torch.cat(views)), y.repeat(len(views))

    def _parts(self, data: Encoded) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = normalize(data.features.image)
        check_dim(x, self.T.shape[1], "cmm")
        zs = None if self.config.no_clip_fusion else self.scale * x @ self.t0.T
        return cmm_logits(x, self.W, self.T, self.scale), zs

    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        self.t0 = cached_template_embeddings(self.backbone, self.classnames, self.templates, self.cache)[1].clone()
        x, y = self._train_xy(train)
        with torch.enable_grad():
            self.W, self.T, info = train_cmm(x, y, self.t0, self.scale, self.config, progress=self.progress)
        info["alpha_source"] = "fixed"
        self.alpha = self.config.alpha
        if not self.config.no_clip_fusion and not self.config.fixed_alpha and val is not None and len(val):
            with torch.no_grad(), cpu_threads(len(val) * self.T.shape[1] * max(self.T.shape)):
                cmm, zs = self._parts(val)
            self.alpha, info["val_accuracy_by_alpha"] = search_alpha(
                cmm, zs, val.dataset.labels(), list(self.config.alpha_grid), self.config.fusion
            )
            info["alpha_source"] = "validation"
        info["alpha"] = self.alpha
        self.fit_info = info

    def _logits(self, data: Encoded) -> torch.Tensor:
        cmm, zs = self._parts(data)
        return fused_log_probs(cmm, zs, self.alpha, self.config.fusion)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"T": self.T, "t0": self.t0, "alpha": torch.tensor([self.alpha], dtype=torch.float64)}
        if self.W is not None:
            out["W"] = self.W
        return out

    def load_tensors(self, tensors) -> None:
        self.T, self.t0 = tensors["T"], tensors["t0"]
        self.W = tensors.get("W")
        if self.W is None and not self.config.no_w:
            raise ConfigError("cmm: saved model has no W but its config says no_w=false")
        self.alpha = float(tensors["alpha"][0])
