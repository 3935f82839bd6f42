"""DiCLS (Tang 2023): multi-label classification as phrase grounding, with XMA-B deep fusion and
the ALN / CTA / CPA / focal / ArcFace losses.

One prompt lists every class ("Detect: scab, healthy, rust."). The image's global feature O and
the prompt's token features P meet in L XMA-B layers (gated bidirectional cross-attention, then a
vision and a text transformer layer each). Outputs: the classification head p^v (sigmoid;
softmax on single-label data), and the word-image alignment S_align = sigmoid(O . P^T) whose
phrase probability is the mean over the tokens that spell the class. Which one predicts is
selectable (`predict_from`); the decisions (per-class thresholds on multi-label data) are chosen
on validation by the method contract (methods/decision.py).

The backbone is frozen by default and training runs on cached features: the global feature
(pooled visual features by default), the spatial tokens, and the prompt's token features,
computed once (the prompt is fixed). `image_blocks` / `text_layers` fine-tune the top of the
backbone instead (the paper froze the early visual layers), through `backbone.split`: the frozen
trunk's activations are cached once and the head holds its own copy of the top.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import BackboneSplit
from ..data.items import Dataset
from ..errors import ConfigError, DataError
from ..features.trunk import TrunkSet, trunk_features
from ..modules.fusions.cross_attention import MultiHeadAttention
from ..modules.fusions.gated_cross_attention import GatedBiCrossAttention
from ..modules.losses.arcface import ArcFaceHead, arcface_loss
from ..modules.losses.focal import sigmoid_focal_loss, softmax_focal_loss
from ..modules.losses.prototype import prototype_alignment_loss
from ..modules.losses.token_alignment import cta_loss
from ..modules.phrases import build_prompt, phrase_token_mask
from .base import (
    MULTI,
    SINGLE,
    Encoded,
    Feed,
    Method,
    TrainConfig,
    TrainOptions,
    _concat_outputs,
    check_dim,
    dataset_of,
)
from .registry import register_method
from .tags import Tags

SOURCES = ("head", "align")


@dataclass(frozen=True)
class DiCLSConfig(TrainOptions):
    """DiCLS's options: the class-list prompt, the fusion encoder, the losses and fine-tuning."""

    # prompt = prefix + body + suffix; the body lists the classes joined by `separator`
    prefix: str = "Detect: "  # text before the class list
    suffix: str = "."  # text after the class list
    separator: str = ", "  # between class entries
    descriptions: dict[str, str] = field(default_factory=dict)  # class name -> description added to its entry
    description_format: str = "{name} ({description})"  # how a described class is written in the body
    # architecture
    dim: int = 64  # width of the fusion module (features are projected to it)
    heads: int = 4  # attention heads in XMA-B and the transformer layers
    fusion_layers: int = 2  # L, the number of XMA-B + vision/text layer pairs (0 = no fusion)
    dropout: float = 0.0  # dropout in attention and feed-forward layers (costly on CPU; the best epoch is kept)
    spatial_grid: int | None = 4  # average-pool the spatial token grid to g x g before fusion (None = keep all)
    global_feature: str = "pooled"  # global image token from: pooled (raw visual features) | image (joint space)
    gate_init: float = 0.0  # initial value g of the tanh gates (0 = fusion starts switched off)
    prototypes: int = 32  # K, CPA prototypes
    # losses: total = w_focal * focal + w_aln * ALN + w_cta * CTA + w_cpa * CPA + w_arcface * ArcFace
    w_focal: float = 1.0  # focal loss on the classification head (the fixed component)
    focal_gamma: float = 2.0  # focusing parameter (0 with focal_alpha None = plain BCE / CE)
    focal_alpha: float | None = None  # positive-class weight of the sigmoid focal loss (None = unweighted)
    w_aln: float = 1.0  # word-image alignment loss (BCE with logits on S_align, one sigmoid)
    w_cta: float = 0.1  # cross-attention token alignment (local InfoNCE both ways)
    w_cpa: float = 0.1  # cross-modal prototype alignment (Sinkhorn-Knopp swapped prediction)
    w_arcface: float = 0.0  # ArcFace loss on the fused global feature (0 = off)
    arcface_scale: float = 16.0  # ArcFace s
    arcface_margin: float = 0.3  # ArcFace additive angular margin m (radians)
    cta_temperature: float = 0.1  # temperature of the local InfoNCE
    cpa_temperature: float = 0.1  # temperature of the prototype softmax
    sinkhorn_eps: float = 0.05  # Sinkhorn-Knopp epsilon
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations
    # prediction
    predict_from: str = "head"  # head (p^v) | align (phrase probabilities from S_align)
    # training (the shared Trainer, one stage, cosine LR sized and stepped in optimizer steps)
    epochs: int = 10  # passes over the training data; the best epoch on validation (mAP) is kept
    # AdamW at peak learning rate 1e-3, weight decay 1e-4, 64 images per step
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=1e-4, batch_size=64))
    warmup_steps: int = 8  # optimizer steps of linear LR warm-up (5% of 10 epochs of 1,000 images at batch 64)
    grad_clip: float | None = 1.0  # max gradient norm (None = no clipping)
    # fine-tuning the backbone's top (backbone.split); None = that encoder frozen, its features cached
    image_blocks: int | None = None  # last image-encoder blocks fine-tuned, plus the image head (projection)
    text_layers: int | None = None  # last text-encoder layers fine-tuned (prompt tokens), plus the text head

    def __post_init__(self) -> None:
        if self.global_feature not in ("pooled", "image"):
            raise ConfigError(f"dicls: global_feature must be pooled or image, got {self.global_feature!r}")
        if self.predict_from not in SOURCES:
            raise ConfigError(f"dicls: predict_from must be head or align, got {self.predict_from!r}")
        if self.fusion_layers < 0 or self.dim < 1 or self.dim % self.heads:
            raise ConfigError(f"dicls: need fusion_layers >= 0 and dim ({self.dim}) divisible by heads ({self.heads})")
        if self.predict_from == "align" and self.w_aln <= 0:
            raise ConfigError("dicls: predict_from=align needs the alignment loss (w_aln > 0)")
        if self.prototypes < 1 or self.sinkhorn_iters < 1 or self.sinkhorn_eps <= 0:
            raise ConfigError("dicls: prototypes >= 1, sinkhorn_iters >= 1 and sinkhorn_eps > 0 required")
        if self.warmup_steps < 0:
            raise ConfigError(f"dicls: warmup_steps must be >= 0, got {self.warmup_steps}")


class DiCLSNet(nn.Module):
    """The trainable part on top of the backbone: projections, XMA-B fusion, heads, loss modules.

    The prompt's token features are buffers (`text_tokens` [L, D]) so a saved model predicts
    without the text encoder; `phrase_mask` [C, L] marks the tokens of each class.
    """

    def __init__(
        self,
        cfg: DiCLSConfig,
        global_dim: int,
        token_dim: int,
        num_tokens: int,
        text_len: int,
        num_classes: int,
        multilabel: bool,
    ) -> None:
        super().__init__()
        d = cfg.dim
        self.cfg, self.multilabel = cfg, multilabel
        self.proj_g = nn.Sequential(nn.LayerNorm(global_dim), nn.Linear(global_dim, d))
        self.proj_v = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, d))
        self.proj_t = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + num_tokens, d) * 0.02)  # [1, 1+P, d]
        self.fusion = nn.ModuleList(
            GatedBiCrossAttention(d, cfg.heads, cfg.dropout, cfg.gate_init) for _ in range(cfg.fusion_layers)
        )

        def layer():
            return nn.TransformerEncoderLayer(
                d,
                cfg.heads,
                2 * d,
                cfg.dropout,
                activation="gelu",  # noqa: E731
                batch_first=True,
                norm_first=True,
            )

        self.vision_layers = nn.ModuleList(layer() for _ in range(cfg.fusion_layers))
        self.text_layers = nn.ModuleList(layer() for _ in range(cfg.fusion_layers))
        self.norm_o, self.norm_p = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)  # p^v
        self.align_v, self.align_t = nn.Linear(d, d), nn.Linear(d, d)
        self.align_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # S_align = sigmoid(exp(s) cos + b)
        self.align_bias = nn.Parameter(torch.tensor(-2.0))
        self.cta_t2i = MultiHeadAttention(d, 1)  # X-Attn of eq. 10: image token -> text tokens
        self.cta_i2t = MultiHeadAttention(d, 1)  # text token -> image tokens
        self.prototypes = nn.Parameter(torch.randn(cfg.prototypes, d) / math.sqrt(d))  # W_P [K, d]
        self.arcface = ArcFaceHead(d, num_classes) if cfg.w_arcface > 0 else None
        self.text_tokens: torch.Tensor  # the buffers below
        self.text_valid: torch.Tensor
        self.phrase_mask: torch.Tensor
        self.register_buffer("text_tokens", torch.zeros(text_len, token_dim))  # [L, D] prompt token features
        self.register_buffer("text_valid", torch.ones(text_len, dtype=torch.bool))  # [L] real tokens
        self.register_buffer("phrase_mask", torch.zeros(num_classes, text_len))  # [C, L] tokens of each class

    def encode(self, glob: torch.Tensor, spatial: torch.Tensor, text_tokens: torch.Tensor | None = None) -> dict:
        """glob [B, G], spatial [B, P, D], text_tokens [L, D] (default: the buffer) -> fused features."""
        b = glob.shape[0]
        o = torch.cat([self.proj_g(glob)[:, None], self.proj_v(spatial)], 1) + self.pos  # O^0 [B, 1+P, d]
        t = self.text_tokens if text_tokens is None else text_tokens
        p = self.proj_t(t)[None].expand(b, -1, -1)  # P^0 [B, L, d]
        pad = (~self.text_valid)[None].expand(b, -1)  # [B, L] True = padding
        weights = []
        for xma, vis, txt in zip(self.fusion, self.vision_layers, self.text_layers):
            g = xma(o, p, text_pad=pad)
            o = vis(o + g.image)  # eq. 8
            p = txt(p + g.text, src_key_padding_mask=pad)  # eq. 9
            weights.append(g.image_weights)
        return {"o": o, "p": p, "pad": pad, "weights": weights}

    def outputs(self, glob: torch.Tensor, spatial: torch.Tensor, text_tokens: torch.Tensor | None = None) -> dict:
        """Image features (and prompt tokens) -> fused global feature, alignment logits and what the losses need."""
        enc = self.encode(glob, spatial, text_tokens)
        o_glob = self.norm_o(enc["o"][:, 0])  # [B, d] fused global image feature
        p_tok = self.norm_p(enc["p"])  # [B, L, d]
        a_v = F.normalize(self.align_v(o_glob), dim=-1)  # [B, d]
        a_t = F.normalize(self.align_t(p_tok), dim=-1)  # [B, L, d]
        align = (
            self.align_scale.exp() * torch.einsum("bd,bld->bl", a_v, a_t) + self.align_bias
        )  # [B, L] logits of S_align
        return {**enc, "global": o_glob, "tokens_p": p_tok, "logits": self.head(o_glob), "align_logits": align}

    def phrase_probs(self, align_logits: torch.Tensor) -> torch.Tensor:
        """align_logits [B, L] -> [B, C]: each class's mean token probability (inference rule)."""
        m = self.phrase_mask  # [C, L]
        return torch.sigmoid(align_logits) @ m.T / m.sum(1).clamp_min(1)

    def losses(self, out: dict, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """out from `outputs`, targets [B, C] multi-hot (one-hot for single-label data)."""
        cfg, parts = self.cfg, {}
        if self.multilabel:
            parts["focal"] = sigmoid_focal_loss(out["logits"], targets, cfg.focal_gamma, cfg.focal_alpha)
        else:
            parts["focal"] = softmax_focal_loss(out["logits"], targets.argmax(-1), cfg.focal_gamma)
        if cfg.w_aln > 0:
            m = (targets @ self.phrase_mask).clamp(max=1)  # [B, L] target mask M
            valid = self.text_valid[None].expand_as(m).float()
            bce = F.binary_cross_entropy_with_logits(out["align_logits"], m, reduction="none")  # one sigmoid
            parts["aln"] = (bce * valid).sum() / valid.sum()
        if cfg.w_cta > 0:
            o_tok, p_tok = out["o"][:, 1:], out["p"]
            z_o = self.cta_t2i(o_tok, p_tok, key_padding_mask=out["pad"])[0]  # [B, P, d]
            z_p = self.cta_i2t(p_tok, o_tok)[0]  # [B, L, d]
            parts["cta"] = cta_loss(o_tok, z_o, p_tok, z_p, ~out["pad"], cfg.cta_temperature)
        if cfg.w_cpa > 0:
            valid = (~out["pad"]).float()[..., None]
            p_glob = (out["tokens_p"] * valid).sum(1) / valid.sum(1)  # [B, d] sentence feature
            parts["cpa"] = prototype_alignment_loss(
                out["global"], p_glob, self.prototypes, cfg.cpa_temperature, cfg.sinkhorn_eps, cfg.sinkhorn_iters
            )
        if self.arcface is not None:
            parts["arcface"] = arcface_loss(
                self.arcface(out["global"]), targets, self.multilabel, cfg.arcface_scale, cfg.arcface_margin
            )
        return parts

    def loss(self, out: dict, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss": the weighted sum of `losses`, "loss_<name>": each part (detached, for the log)}."""
        parts = self.losses(out, targets)
        w = {
            "focal": self.cfg.w_focal,
            "aln": self.cfg.w_aln,
            "cta": self.cfg.w_cta,
            "cpa": self.cfg.w_cpa,
            "arcface": self.cfg.w_arcface,
        }
        loss = cast(torch.Tensor, sum(w[k] * v for k, v in parts.items()))  # a tensor: focal is always a part
        return {"loss": loss, **{f"loss_{k}": v.detach() for k, v in parts.items()}}


class DiCLSHead(nn.Module):
    """The method's head: DiCLSNet on a feature batch, or on trunk activations through the head's
    own backbone top (fine-tuning).

    batch: {"pooled" or "image": [B, G], "spatial": [B, P, D]} (frozen image encoder) or
    {"trunk": [B, ...] image trunk activations}; optional "targets" [B, C] multi-hot (one-hot on
    single-label data) -> {"logits": [B, C] from `source`, "global": [B, d], "align_logits": [B, L],
    "loss", "loss_<part>"}.
    """

    prompt_hidden: torch.Tensor  # buffers registered when the text top is fine-tuned
    prompt_mask: torch.Tensor

    def __init__(
        self, net: DiCLSNet, top: BackboneSplit | None, cfg: DiCLSConfig, grid: tuple[int, int], text_dim: int
    ) -> None:
        super().__init__()
        self.net, self.top, self.cfg, self.grid = net, top, cfg, (grid[0], grid[1])
        self.source = cfg.predict_from
        if top is not None and top.text_layers is not None:  # the prompt's trunk states: text_top runs per step
            self.register_buffer("prompt_hidden", torch.zeros(1, net.text_tokens.shape[0], text_dim))  # [1, L, H]
            self.register_buffer("prompt_mask", torch.zeros(1, net.text_tokens.shape[0], dtype=torch.bool))  # [1, L]

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> global feature [B, G], pooled spatial tokens [B, P', D], prompt tokens [L, D] (None: the buffer)."""
        if "trunk" in batch:
            assert self.top is not None  # trunk rows come only with a fine-tuned image top
            f = self.top.image_top(batch["trunk"].float())
            glob = f.pooled if self.cfg.global_feature == "pooled" else f.embeds
            glob, sp, grid = glob.float(), f.tokens.float(), f.grid
        else:
            glob, sp, grid = batch[self.cfg.global_feature].float(), batch["spatial"].float(), self.grid
        check_dim(glob, cast(nn.Linear, self.net.proj_g[1]).in_features, "dicls global feature")
        check_dim(sp, cast(nn.Linear, self.net.proj_v[1]).in_features, "dicls spatial tokens")
        text = None
        if hasattr(self, "prompt_hidden"):
            assert self.top is not None  # the prompt buffers come only with a fine-tuned text top
            text = self.top.text_top(self.prompt_hidden, self.prompt_mask).tokens[0].float()
        return glob, pool_grid(sp, grid, self.cfg.spatial_grid), text

    def class_logits(self, out: dict) -> torch.Tensor:
        """[B, C] logits of `source`: p^v's, or the phrase probabilities' (sigmoid / softmax give them back)."""
        if self.source == "head":
            return out["logits"]
        p = self.net.phrase_probs(out["align_logits"]).clamp(1e-6, 1 - 1e-6)  # [B, C]
        return torch.log(p) - torch.log1p(-p) if self.net.multilabel else torch.log(p)

    def forward(self, batch: dict) -> dict:
        """batch -> class logits, the global feature and alignment logits (and the losses with targets)."""
        out = self.net.outputs(*self.inputs(batch))
        res = {"logits": self.class_logits(out), "global": out["global"], "align_logits": out["align_logits"]}
        if "targets" in batch:
            res.update(self.net.loss(out, batch["targets"].float()))
        return res


@register_method
class DiCLS(Method):
    """DiCLS: multi-label as phrase grounding, XMA-B fusion, ALN/CTA/CPA/focal/ArcFace losses."""

    name = "dicls"
    tags = Tags(figures=("tsne", "alignment"))
    Config = DiCLSConfig
    kinds = frozenset({SINGLE, MULTI})
    needs = frozenset({"pooled", "spatial"})
    selects = "the epoch kept"

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        c = self.config
        if self.fine_tunes():
            self._trunk_split = backbone.split(c.image_blocks, c.text_layers)  # checks the counts; cuts the trunk

    @property
    def prompt(self) -> str:
        """The prompt of the class names the fit grounded (fit_info keeps it)."""
        return str(self.fit_info.get("prompt", ""))

    def fine_tunes(self) -> bool:
        """Whether the backbone's top layers are trained (then trunk activations are cached instead of features)."""
        return self.config.image_blocks is not None or self.config.text_layers is not None

    def feature_needs(self) -> frozenset[str]:
        if self.config.image_blocks is not None:
            return frozenset({"trunk"})
        return frozenset({self.config.global_feature, "spatial"})

    def _encode(self, data: Dataset | Encoded, training: bool) -> Encoded:
        """Image trunk activations when the image top is fine-tuned, else the cached features."""
        if self.config.image_blocks is None:
            return super()._encode(data, training)
        if isinstance(data, Encoded) and isinstance(data.features, TrunkSet):
            return data
        ds = dataset_of(data)
        blank = next((it for it in ds.items if it.image is None), None)
        if blank is not None:  # before any activation is computed
            raise DataError(f"{ds.name}: item {blank.key} has no image; dicls classifies images")
        t = trunk_features(
            self._trunk_split,
            ds,
            None,
            cache=self.feature_cache,
            progress=self.ctx.progress,
            texts=False,
            write=self.ctx.cache_write,
        )
        return Encoded(ds, t)

    # ---- prompt ---------------------------------------------------------------------------
    def _encode_prompt(self, classnames: list[str]):
        """-> (prompt, text tokens [L, D], valid [L] bool, phrase mask [C, L], token strings [L]); errors
        name a class not found."""
        c = self.config
        prompt, spans = build_prompt(classnames, c.prefix, c.suffix, c.separator, c.descriptions, c.description_format)
        with torch.no_grad():
            tf = self.backbone.encode_text([prompt])
        valid = tf.mask[0].bool()
        strings = list(tf.token_strings[0]) if tf.token_strings else []
        if len(strings) != tf.tokens.shape[1]:
            raise ConfigError(
                f"dicls: backbone {self.backbone.name!r} gives no token strings to find the class names in"
            )
        mask = phrase_token_mask(prompt, spans, classnames, strings, valid.tolist())
        return prompt, tf.tokens[0].float(), valid, mask, strings

    # ---- data -----------------------------------------------------------------------------
    @staticmethod
    def _targets(ds) -> torch.Tensor:
        """[N, C] multi-hot (one-hot for single-label data); a label outside the classes is an error naming the item."""
        from ..data.loaders import check_labels

        check_labels(ds)
        return torch.from_numpy(ds.multi_hot())

    def _check_targets(self, ds, y: torch.Tensor) -> None:
        empty = (y.sum(1) == 0).nonzero().flatten()
        if len(empty):
            i = int(empty[0])
            raise DataError(
                f"{ds.name}: item {i} ({ds.items[i].key}) has no label; DiCLS trains on labelled images "
                f"only ({len(empty)} unlabelled)"
            )

    # ---- the head ---------------------------------------------------------------------------
    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        c = self.config
        net = DiCLSNet(
            c,
            spec["global_dim"],
            spec["token_dim"],
            spec["num_tokens"],
            spec["text_len"],
            spec["num_classes"],
            bool(spec["multilabel"]),
        )
        top = self.backbone.split(c.image_blocks, c.text_layers) if self.fine_tunes() else None
        return DiCLSHead(net, top, c, tuple(spec["grid"]), spec.get("text_dim", 0))

    def stages(self, train: Encoded) -> list:
        """One stage training the whole head: DiCLSNet, and the backbone top when fine-tuning."""
        from ..training import Stage

        c = self.config
        return [
            Stage(
                "dicls",
                epochs=c.epochs,
                lr=c.train.lr,
                weight_decay=c.train.weight_decay,
                batch_size=c.train.batch_size,
                warmup_steps=c.warmup_steps,
                grad_clip=c.grad_clip,
                schedule="cosine",
            )
        ]

    def prepare(self, train: Encoded, val: Encoded | None) -> Feed:
        """The head around the class-name prompt; batches of multi-hot targets (one-hot single-label)."""
        c, ds = self.config, train.dataset
        y = self._targets(ds)
        self._check_targets(ds, y)
        prompt, text, valid, mask, strings = self._encode_prompt(self.classnames)
        with torch.no_grad():  # the shapes the head sees: what the backbone (and so its top) gives
            f = self.backbone.encode_image(torch.zeros(1, 3, self.backbone.image_size, self.backbone.image_size))
        glob = f.pooled if c.global_feature == "pooled" else f.embeds
        spec: dict[str, Any] = {
            "num_classes": len(self.classnames),
            "multilabel": self.multilabel,
            "global_dim": int(glob.shape[1]),
            "token_dim": int(f.tokens.shape[2]),
            "num_tokens": int(pool_grid(f.tokens, f.grid, c.spatial_grid).shape[1]),
            "grid": list(f.grid),
            "text_len": int(text.shape[0]),
        }
        hidden = None
        if c.text_layers is not None:
            hidden, pmask = self._trunk_split.text_trunk([prompt])
            spec["text_dim"] = int(hidden.shape[2])
        head = cast(DiCLSHead, self.init_head(spec))
        head.net.text_tokens.copy_(text)
        head.net.text_valid.copy_(valid)
        head.net.phrase_mask.copy_(mask)
        if hidden is not None:
            head.prompt_hidden.copy_(hidden)
            head.prompt_mask.copy_(pmask)
        if c.image_blocks is not None:
            rows = {"trunk": train.features.tensor("trunk")}
        else:
            rows = {
                c.global_feature: train.features.tensor(c.global_feature).float(),
                "spatial": train.features.tensor("spatial"),
            }
        rows["targets"] = y
        self.fit_info.update(
            {
                "prompt": prompt,
                "token_strings": strings,
                "frozen": "backbone except its top (image_blocks / text_layers)"
                if self.fine_tunes()
                else "whole backbone",
            }
        )
        return Feed(batches=self.feature_batches(train, rows))

    # ---- inference ------------------------------------------------------------------------
    def _forward(self, head: nn.Module, data: Encoded) -> dict[str, Any]:
        if not isinstance(data.features, TrunkSet):
            return super()._forward(head, data)
        was = head.training
        head.eval()
        acts = data.features.image
        with torch.no_grad():
            parts = [head({"trunk": acts[s : s + 256]}) for s in range(0, max(1, len(acts)), 256)]
        head.train(was)
        return _concat_outputs(parts)

    def set_output(self, source: str, val: Dataset | Encoded | None = None, **decision: Any) -> DiCLS:
        """Predict from `source` (head: p^v | align: phrase probabilities) from now on; with `val`, the
        decision rule is chosen again for it (`decision`: choose_decisions' options)."""
        if source not in SOURCES:
            raise ConfigError(f"dicls: predict_from must be head or align, got {source!r}")
        if source == "align" and self.config.w_aln <= 0:
            raise ConfigError("dicls: predict_from=align needs the alignment loss (w_aln > 0)")
        self._check_fitted()
        self.config = dataclasses.replace(self.config, predict_from=source)
        cast(DiCLSHead, self.head).source = source
        if val is not None:
            self.choose_decisions(self.encode(val), **decision)
        return self

    # ---- what the plots need ----------------------------------------------------------------
    def embeddings(self, data) -> dict[str, torch.Tensor]:
        """{'plain': the frozen backbone's global features [N, G], 'fused': fused global features [N, d]}."""
        ds = dataset_of(data)
        plain = Method.encode(self, ds).features.tensor(self.config.global_feature) if self.fine_tunes() else None
        enc = self.encode(data)
        out = self._outputs(enc)
        if plain is None:
            plain = enc.features.tensor(self.config.global_feature)
        return {"plain": plain.float().numpy(), "fused": out["global"].numpy()}

    def alignment(self, data) -> dict:
        """Token-image alignment: predicted S_align [N, L], ground truth M [N, L], token strings."""
        enc = self.encode(data)
        out = self._outputs(enc)
        y = torch.from_numpy(enc.dataset.multi_hot())
        net = cast(DiCLSHead, self.head).net
        valid = net.text_valid
        return {
            "pred": torch.sigmoid(out["align_logits"])[:, valid].numpy(),
            "truth": (y @ net.phrase_mask).clamp(max=1)[:, valid].numpy(),
            "tokens": [t for t, v in zip(self.fit_info.get("token_strings", []), valid.tolist()) if v],
        }


def pool_grid(sp: torch.Tensor, grid: tuple[int, int] | None, g: int | None) -> torch.Tensor:
    """sp [N, h*w, D] -> [N, g*g, D] average-pooled over the (h, w) grid; unchanged if g is None or >= the grid."""
    h, w = grid or (0, 0)
    if g is None or h * w != sp.shape[1] or (h <= g and w <= g):
        return sp
    x = sp.view(sp.shape[0], h, w, -1).permute(0, 3, 1, 2)  # [N, D, h, w]
    return F.adaptive_avg_pool2d(x, (min(g, h), min(g, w))).flatten(2).transpose(1, 2).contiguous()
