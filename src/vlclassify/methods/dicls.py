"""DiCLS (Tang 2023): multi-label classification as phrase grounding, with XMA-B deep fusion and
the ALN / CTA / CPA / focal / ArcFace losses.

One prompt lists every class ("Detect: scab, healthy, rust."). The image's global feature O and
the prompt's token features P meet in L XMA-B layers (gated bidirectional cross-attention, then a
vision and a text transformer layer each). Outputs: the classification head p^v (sigmoid;
softmax on single-label data), and the word-image alignment S_align = sigmoid(O . P^T) whose
phrase probability is the mean over the tokens that spell the class. Which one predicts is
selectable (`predict_from`); the decision threshold is chosen on validation data.

The backbone is frozen by default and training runs on cached features: the global feature
(pooled visual features by default), the spatial tokens, and the prompt's token features,
computed once (the prompt is fixed). `train_backbone` lists backbone parameter-name prefixes to
fine-tune instead (the paper froze the early visual layers); then images go through the backbone
at every step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..modules.fusions.cross_attention import MultiHeadAttention
from ..modules.fusions.gated_cross_attention import GatedBiCrossAttention
from ..modules.losses.arcface import ArcFaceHead, arcface_loss
from ..modules.losses.focal import sigmoid_focal_loss, softmax_focal_loss
from ..modules.losses.prototype import prototype_alignment_loss
from ..modules.losses.token_alignment import cta_loss
from ..modules.phrases import build_prompt, phrase_token_mask
from .base import Encoded, Method
from .registry import register_method


@dataclass
class DiCLSConfig:
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
    dropout: float = (
        0.0  # dropout in the attention and feed-forward layers (costly on CPU; the best epoch is picked on val)
    )
    spatial_grid: int | None = (
        4  # average-pool the backbone's spatial token grid to g x g before fusion (None = keep all)
    )
    global_feature: str = (
        "pooled"  # global image token from: pooled (raw visual features) | image (joint-space embedding)
    )
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
    threshold_metric: str = "micro_f1"  # what the validation-chosen decision threshold maximises
    # training (shared Trainer, one stage, cosine LR sized and stepped in optimizer steps)
    epochs: int = 10  # passes over the training data; the best epoch on validation mAP is kept
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    batch_size: int = 64  # images per step
    warmup: float = 0.05  # fraction of steps with linear LR warm-up
    grad_clip: float | None = 1.0  # max gradient norm (None = no clipping)
    seed: int = 0  # initialisation and batch order
    out_dir: str | None = None  # checkpoint folder (resumable); None keeps the best weights in memory
    # backbone
    train_backbone: list[str] = field(
        default_factory=list
    )  # backbone parameter-name prefixes to fine-tune (the later layers); [] = frozen backbone, cached features
    num_threads: int | None = 1  # torch threads while training (small batches run best on one core); None = unchanged


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

    def forward(self, batch: dict) -> dict:
        """batch: glob [B, G], spatial [B, P, D], targets [B, C] (+ text_tokens [L, D] when fine-tuning)."""
        out = self.outputs(batch["glob"], batch["spatial"], batch.get("text_tokens"))
        parts = self.losses(out, batch["targets"])
        w = {
            "focal": self.cfg.w_focal,
            "aln": self.cfg.w_aln,
            "cta": self.cfg.w_cta,
            "cpa": self.cfg.w_cpa,
            "arcface": self.cfg.w_arcface,
        }
        loss = sum(w[k] * v for k, v in parts.items())
        return {"loss": loss, **{f"loss_{k}": v.detach() for k, v in parts.items()}}


@register_method
class DiCLS(Method):
    """DiCLS: multi-label as phrase grounding, XMA-B fusion, ALN/CTA/CPA/focal/ArcFace losses."""

    name = "dicls"
    Config = DiCLSConfig
    needs_spatial = True
    multilabel = True  # per instance: False after fitting on single-label data (softmax)

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        c = self.config
        if c.global_feature not in ("pooled", "image"):
            raise ConfigError(f"dicls: global_feature must be pooled or image, got {c.global_feature!r}")
        if c.predict_from not in ("head", "align"):
            raise ConfigError(f"dicls: predict_from must be head or align, got {c.predict_from!r}")
        if c.fusion_layers < 0 or c.dim < 1 or c.dim % c.heads:
            raise ConfigError(f"dicls: need fusion_layers >= 0 and dim ({c.dim}) divisible by heads ({c.heads})")
        if c.predict_from == "align" and c.w_aln <= 0:
            raise ConfigError("dicls: predict_from=align needs the alignment loss (w_aln > 0)")
        if c.threshold_metric not in ("micro_f1", "macro_f1", "subset_accuracy"):
            raise ConfigError(
                f"dicls: threshold_metric must be micro_f1, macro_f1 or subset_accuracy, got {c.threshold_metric!r}"
            )
        if c.prototypes < 1 or c.sinkhorn_iters < 1 or c.sinkhorn_eps <= 0:
            raise ConfigError("dicls: prototypes >= 1, sinkhorn_iters >= 1 and sinkhorn_eps > 0 required")
        if c.train_backbone:
            from ..features import FeatureCache

            self._check_trainable_backbone()
            # Fine-tuning changes the weights in memory: train a private copy, never use cached
            # features or the ONNX trunk (both are keyed by the weights on disk).
            self.backbone = copy.deepcopy(self.backbone)
            self.cache = FeatureCache(self.cache.root, enabled=False)
            self.runtime = "torch"
        self.net: DiCLSNet | None = None
        self.prompt = ""
        self.token_strings: list[str] = []

    # ---- prompt ---------------------------------------------------------------------------
    def _encode_prompt(self, classnames: list[str]):
        """-> (text tokens [L, D], valid [L] bool, phrase mask [C, L]); errors name a class not found."""
        c = self.config
        self.prompt, spans = build_prompt(
            classnames, c.prefix, c.suffix, c.separator, c.descriptions, c.description_format
        )
        with torch.no_grad():
            tf = self.backbone.encode_text([self.prompt])
        valid = tf.mask[0].bool()
        self.token_strings = list(tf.token_strings[0]) if tf.token_strings else []
        if len(self.token_strings) != tf.tokens.shape[1]:
            raise ConfigError(
                f"dicls: backbone {self.backbone.name!r} gives no token strings to find the class names in"
            )
        mask = phrase_token_mask(self.prompt, spans, classnames, self.token_strings, valid.tolist())
        return tf.tokens[0].float(), valid, mask

    # ---- data -----------------------------------------------------------------------------
    def _spatial(self, feats) -> torch.Tensor:
        if feats.spatial is None:
            raise ConfigError("dicls needs spatial features; extract with spatial=True")
        return pool_grid(feats.spatial.float(), feats.grid, self.config.spatial_grid)

    def _glob(self, feats) -> torch.Tensor:
        return (feats.pooled if self.config.global_feature == "pooled" else feats.image).float()

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

    def _batches(self, tensors: dict[str, torch.Tensor], shuffle: bool):
        n = len(next(iter(tensors.values())))
        bs = self.config.batch_size

        def make(stage, epoch, seed):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
            return [{k: v[order[i : i + bs]] for k, v in tensors.items()} for i in range(0, n, bs)]

        return make

    # ---- fitting --------------------------------------------------------------------------
    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        with _threads(self.config.num_threads):
            self._fit_inner(train, val)

    def _fit_inner(self, train: Encoded, val: Encoded | None) -> None:
        from ..metrics.multilabel import best_threshold, mean_average_precision
        from ..training import Stage, Trainer

        c = self.config
        ds = train.dataset
        self.multilabel = bool(ds.multilabel)
        y = self._targets(ds)
        self._check_targets(ds, y)
        text, valid, mask = self._encode_prompt(self.classnames)
        f = train.features
        sp = self._spatial(f)  # [N, P, D]
        torch.manual_seed(c.seed)  # TODO(port): seeded()
        self.net = DiCLSNet(
            c, self._glob(f).shape[1], sp.shape[2], sp.shape[1], text.shape[0], ds.num_classes, self.multilabel
        )
        self.net.text_tokens.copy_(text)
        self.net.text_valid.copy_(valid)
        self.net.phrase_mask.copy_(mask)
        yv = self._targets(val.dataset).numpy() if val is not None else None
        stage = Stage(
            "dicls",
            epochs=c.epochs,
            lr=c.lr,
            weight_decay=c.weight_decay,
            batch_size=c.batch_size,
            warmup=c.warmup,
            grad_clip=c.grad_clip,
            schedule="cosine",
        )
        if c.train_backbone:
            model = _EndToEnd(self, self.net)
            stage.trainable = ["net."] + [f"backbone.{p}" for p in c.train_backbone]
            batches = self._batches({"pixels": self._pixels(ds), "targets": y}, True)
            val_pixels = self._pixels(val.dataset) if val is not None else None
            probs = lambda m: self._probs_e2e(val_pixels, m)  # noqa: E731
        else:
            model = self.net
            batches = self._batches({"glob": self._glob(f), "spatial": sp, "targets": y}, True)
            probs = lambda m: self._probs(val.features, m)  # noqa: E731

        def metric(m):
            return {"mAP": mean_average_precision(yv, probs(m))}

        trainer = Trainer(
            model,
            batches,
            None,
            [stage],
            metric=metric if val is not None else None,
            monitor="mAP" if val is not None else None,
            mode="max",
            out_dir=c.out_dir,
            seed=c.seed,
            progress=self.progress,
        )
        result = trainer.fit()
        self.net.eval()
        if c.train_backbone:  # the prompt's token features under the fine-tuned text layers
            self.backbone.eval()
            with torch.no_grad():
                self.net.text_tokens.copy_(self.backbone.encode_text([self.prompt]).tokens[0].float())
        info = {
            "multilabel": self.multilabel,
            "prompt": self.prompt,
            "token_strings": self.token_strings,
            "shapes": {
                "global_dim": self._glob(f).shape[1],
                "token_dim": sp.shape[2],
                "num_tokens": sp.shape[1],
                "text_len": text.shape[0],
            },
            "frozen": "backbone except " + ", ".join(c.train_backbone) if c.train_backbone else "whole backbone",
            "best_epoch": result.stages[0].best_epoch,
            "best_val_mAP": result.stages[0].best_metric,
            "history": [
                {k: v for k, v in r.items() if k.startswith(("epoch", "train_loss", "val_", "time"))}
                for r in result.history
            ],
        }
        if val is not None:
            info["thresholds"] = {}
            val_feats = self.encode(val.dataset).features if c.train_backbone else val.features
            for src in ("head", "align") if c.w_aln > 0 else ("head",):
                p = self._probs(val_feats, self.net, src)
                info["thresholds"][src] = best_threshold(yv, p, c.threshold_metric) if self.multilabel else None
                info[f"val_mAP_{src}"] = mean_average_precision(yv, p)
        self.fit_info = info

    # ---- backbone fine-tuning ---------------------------------------------------------------
    def _check_trainable_backbone(self) -> None:
        names = [n for n, _ in self.backbone.named_parameters()]
        for pre in self.config.train_backbone:
            if not any(n.startswith(pre) for n in names):
                raise ConfigError(
                    f"dicls: train_backbone prefix {pre!r} matches no parameter of backbone "
                    f"{self.backbone.name!r} (e.g. {', '.join(names[:3])}, ..., {names[-1]})"
                )

    def _pixels(self, ds) -> torch.Tensor:
        """[N, 3, H, W] float16 preprocessed images, decoded once for the whole run."""
        from tqdm.auto import tqdm

        from ..data.images import load_image

        return torch.stack(
            [
                self.backbone.preprocess(load_image(it)).half()
                for it in tqdm(ds.items, desc="decode", leave=False, disable=not self.progress)
            ]
        )

    @torch.no_grad()
    def _probs_e2e(self, pixels: torch.Tensor, model: _EndToEnd, batch: int = 64) -> np.ndarray:
        model.eval()
        text = model.text_tokens()
        outs = []
        for i in range(0, len(pixels), batch):
            glob, sp = model.image(pixels[i : i + batch])
            o = model.net.outputs(glob, sp, text)
            outs.append(self._logits_from(o, model.net, self.config.predict_from))
        z = torch.cat(outs)
        return (torch.sigmoid(z) if self.multilabel else torch.softmax(z, -1)).numpy()

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def _forward_all(self, feats, net: DiCLSNet | None = None, batch: int = 256) -> dict[str, torch.Tensor]:
        net = net or self.net
        was = net.training
        net.eval()
        glob, sp = self._glob(feats), self._spatial(feats)
        for x, want, what in (
            (glob, net.proj_g[1].in_features, "global feature"),
            (sp, net.proj_v[1].in_features, "spatial tokens"),
        ):
            if x.shape[-1] != want:
                raise ConfigError(f"dicls: {what} are {x.shape[-1]}-d but the saved model expects {want}-d")
        outs: dict[str, list] = {"logits": [], "align_logits": [], "global": []}
        for i in range(0, glob.shape[0], batch):
            o = net.outputs(glob[i : i + batch], sp[i : i + batch].float())
            for k in outs:
                outs[k].append(o[k])
        net.train(was)
        d = glob.shape[0]
        return {k: torch.cat(v) if v else torch.zeros(d, 0) for k, v in outs.items()}

    def _logits_from(self, out: dict, net: DiCLSNet, source: str) -> torch.Tensor:
        if source == "head":
            return out["logits"]
        p = net.phrase_probs(out["align_logits"]).clamp(1e-6, 1 - 1e-6)  # [N, C]
        return torch.log(p) - torch.log1p(-p) if self.multilabel else torch.log(p)

    def _probs(self, feats, net: DiCLSNet, source: str | None = None) -> np.ndarray:
        z = self._logits_from(self._forward_all(feats, net), net, source or self.config.predict_from)
        p = torch.sigmoid(z) if self.multilabel else torch.softmax(z, -1)
        return p.numpy()

    def _logits(self, data: Encoded) -> torch.Tensor:
        return self._logits_from(self._forward_all(data.features), self.net, self.config.predict_from)

    def threshold(self) -> float:
        """The decision threshold chosen on validation for the current `predict_from` (0.5 without)."""
        t = (self.fit_info.get("thresholds") or {}).get(self.config.predict_from)
        return 0.5 if t is None else float(t)

    # ---- what the plots need ----------------------------------------------------------------
    def embeddings(self, data) -> dict[str, np.ndarray]:
        """{'plain': backbone global features [N, G], 'fused': fused global features [N, d]}."""
        enc = self.encode(data)
        out = self._forward_all(enc.features)
        return {"plain": self._glob(enc.features).numpy(), "fused": out["global"].numpy()}

    def alignment(self, data) -> dict:
        """Token-image alignment: predicted S_align [N, L], ground truth M [N, L], token strings."""
        enc = self.encode(data)
        out = self._forward_all(enc.features)
        y = torch.from_numpy(enc.dataset.multi_hot())
        valid = self.net.text_valid
        return {
            "pred": torch.sigmoid(out["align_logits"])[:, valid].numpy(),
            "truth": (y @ self.net.phrase_mask).clamp(max=1)[:, valid].numpy(),
            "tokens": [t for t, v in zip(self.fit_info.get("token_strings", []), valid.tolist()) if v],
        }

    # ---- persistence ------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.net.state_dict())
        for n, t in self.backbone.state_dict().items():
            if any(n.startswith(p) for p in self.config.train_backbone):
                out[f"backbone.{n}"] = t
        return out

    def load_tensors(self, tensors) -> None:
        self.multilabel = bool(self.fit_info.get("multilabel", True))
        self.prompt = self.fit_info.get("prompt", "")
        self.token_strings = self.fit_info.get("token_strings", [])
        s = self.fit_info["shapes"]
        self.net = DiCLSNet(
            self.config,
            s["global_dim"],
            s["token_dim"],
            s["num_tokens"],
            s["text_len"],
            len(self.classnames),
            self.multilabel,
        )
        own = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
        tuned = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
        self.net.load_state_dict(own)
        if tuned:
            missing = set(tuned) - set(self.backbone.state_dict())
            if missing:
                raise ConfigError(
                    f"dicls: saved backbone weights {sorted(missing)[:3]} do not fit backbone {self.backbone.name!r}"
                )
            self.backbone.load_state_dict(tuned, strict=False)
        self.net.eval()


class _EndToEnd(nn.Module):
    """Backbone + DiCLSNet as one module, for fine-tuning the backbone's later layers."""

    def __init__(self, method: DiCLS, net: DiCLSNet) -> None:
        super().__init__()
        self.backbone, self.net = method.backbone, net
        self.prompt, self.use_pooled = method.prompt, method.config.global_feature == "pooled"
        self.grid = method.config.spatial_grid

    def image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone.encode_image(pixels.float())
        return (f.pooled if self.use_pooled else f.embeds).float(), pool_grid(
            f.tokens.float(), f.grid, self.grid
        )  # [B, G], [B, P, D]

    def text_tokens(self) -> torch.Tensor:
        return self.backbone.encode_text([self.prompt]).tokens[0].float()  # [L, D]

    def forward(self, batch: dict) -> dict:
        glob, sp = self.image(batch["pixels"])
        return self.net({"glob": glob, "spatial": sp, "targets": batch["targets"], "text_tokens": self.text_tokens()})


def pool_grid(sp: torch.Tensor, grid: tuple[int, int] | None, g: int | None) -> torch.Tensor:
    """sp [N, h*w, D] -> [N, g*g, D] average-pooled over the (h, w) grid; unchanged if g is None or >= the grid."""
    h, w = grid or (0, 0)
    if g is None or h * w != sp.shape[1] or (h <= g and w <= g):
        return sp
    x = sp.view(sp.shape[0], h, w, -1).permute(0, 3, 1, 2)  # [N, D, h, w]
    return F.adaptive_avg_pool2d(x, (min(g, h), min(g, w))).flatten(2).transpose(1, 2).contiguous()


class _threads:
    """Context manager: run with `n` torch threads (None = unchanged), then restore."""

    def __init__(self, n: int | None) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
