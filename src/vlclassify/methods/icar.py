"""iCAR (paper 004): the text encoder as the classifier, trained on classification data and
image-text pairs with one contrastive loss.

- Cosine classifier (Eq. 3): L2-normalised image features and class weights, temperature tau
  (0.05, optionally learnable). `head=linear` is the linear classifier it replaces (Eq. 1) and
  `head=cosine` a parametric cosine classifier: both are the paper's "split heads" ablation, where
  classification has its own weights and only the image-text pairs train the text encoder.
- Text encoder as meta classifier (Eq. 4-5, `head=text`, the default): the class weights are
  f_t(T_i), the text embeddings of the class sentences T_i = prompt + name + description,
  recomputed from text at every step. The text tower trains with the image side (the top of
  `backbone.split(None, text_layers)`: its own copies of the last text layers, + a residual
  projection; see modules/text_tower.py).
- Unified contrastive loss (Eq. 6, modules/losses/contrastive.py): each batch mixes
  classification images (text set = all class sentences) and image-text pairs (text set = the
  batch's captions); `pair_fraction` of the batch are pairs (paper: 0.5).

Because classes are text, `set_classes(names, descriptions)` scores classes never trained on.
Images enter as cached backbone features: a trainable residual projection on the joint-space
embedding and on the pooled visual features (zero-initialised, so an untrained model is the
backbone's zero-shot classifier) stands in for fine-tuning the image encoder.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.descriptions import class_sentence, resolve_descriptions
from ..data.items import Dataset
from ..errors import ConfigError, DataError
from ..modules.heads import CosineClassifier, LinearClassifier
from ..modules.losses.contrastive import unified_contrastive_loss
from ..modules.text_tower import TrainableTextTower
from ..training import Stage, TrainResult
from ..trust.model import Trust
from .base import MAIN, SINGLE, TEXT, Encoded, Feed, Method, TrainConfig, TrainOptions, check_finite
from .registry import register_method
from .tags import Tags

HEADS = ("text", "cosine", "linear")
IMAGE_INPUTS = ("embed", "pooled", "both")


@dataclass(frozen=True)
class ICARConfig(TrainOptions):
    """iCAR's options: the classifier head, class sentences, pairs and training."""

    head: str = "text"  # text: class weights = f_t(class sentence) (iCAR) | cosine | linear: split heads (ablation)
    tau: float = 0.05  # temperature of the cosine classifier and the contrastive loss (paper: 0.05)
    learn_tau: bool = False  # learn tau (log-parametrised, floored at 0.01)
    descriptions: str = (
        "auto"  # auto (built-in for known data, else WordNet) | none | builtin | wordnet | path.json/.csv
    )
    wordnet_dir: str = ""  # WordNet folder with index.noun + data.noun ("" = $VLCLASSIFY_WORDNET or /usr/share/wordnet)
    sentence: str = "a photo of a {name}, {description}."  # class sentence with a description
    sentence_no_desc: str = "a photo of a {name}."  # class sentence for classes without one
    # image-text pairs: auto (the training items' own texts, if any) | none | self | a data spec, e.g. tuxpaint
    pairs: str = "auto"
    pair_fraction: float = 0.5  # share of each batch that is image-text pairs (paper: 0.5)
    text_layers: int | None = 1  # last text-encoder layers trained, with the text head (None = frozen text encoder)
    text_proj: bool = True  # residual D x D projection on the text embedding (zero-initialised)
    image_input: str = "both"  # embed: residual map of the joint-space embedding | pooled: of pooled features | both
    image_epochs: int = 3  # stage 1 "image": image projection (and parametric head) only, at lr
    joint_epochs: int = 3  # stage 2 "joint": image projection + text tower (+ head) jointly, at joint_lr
    # AdamW at peak learning rate 1e-3 in stage 1 (cosine schedule), weight decay 0.01 (pulls the
    # zero-initialised residuals back towards the backbone), 64 images per step (classification + pairs)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=0.01, batch_size=64))
    joint_lr: float = 1e-4  # AdamW peak learning rate of stage 2 (gentle: it moves pretrained text layers)
    min_steps_per_epoch: int = 10  # an epoch of a tiny (few-shot) set still takes this many steps
    grad_clip: float = 5.0  # max gradient norm (paper: 5)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"icar: head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.image_input not in IMAGE_INPUTS:
            raise ConfigError(f"icar: image_input must be one of {', '.join(IMAGE_INPUTS)}, got {self.image_input!r}")
        if not 0.0 <= self.pair_fraction < 1.0:
            raise ConfigError(f"icar: pair_fraction must be in [0, 1), got {self.pair_fraction}")
        if self.tau <= 0:
            raise ConfigError(f"icar: tau must be > 0, got {self.tau}")
        for key in ("sentence", "sentence_no_desc"):
            if "{name}" not in getattr(self, key):
                raise ConfigError(f"icar: {key} must contain '{{name}}', got {getattr(self, key)!r}")
        if "{description}" not in self.sentence:
            raise ConfigError(f"icar: sentence must contain '{{description}}', got {self.sentence!r}")
        if self.image_epochs < 0 or self.joint_epochs < 0 or self.image_epochs + self.joint_epochs == 0:
            raise ConfigError("icar: image_epochs and joint_epochs must be >= 0, not both 0 (nothing to train)")


class ImageSide(nn.Module):
    """Cached image features -> [N, D] image embedding v_i, starting as the backbone's embedding."""

    def __init__(self, dim: int, pooled_dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.embed_map = nn.Linear(dim, dim) if mode in ("embed", "both") else None  # residual, zero-init
        self.pooled_map = nn.Linear(pooled_dim, dim) if mode in ("pooled", "both") else None
        for lin in (self.embed_map, self.pooled_map if mode == "both" else None):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """embeds [N, D], pooled [N, F] -> [N, D]."""
        e = F.normalize(embeds.float(), dim=-1)
        if self.mode == "pooled":
            assert self.pooled_map is not None  # built for mode pooled
            return self.pooled_map(F.normalize(pooled.float(), dim=-1))
        assert self.embed_map is not None  # built for modes embed and both
        v = e + self.embed_map(e)
        if self.pooled_map is not None:
            v = v + self.pooled_map(F.normalize(pooled.float(), dim=-1))
        return v


class ICARNet(nn.Module):
    """The head: image side, text tower and (for split heads) a parametric classifier.

    forward(mixed batch) -> {"loss": Eq. 6, "loss_cls", "loss_pair"}; `class_logits` scores images.
    """

    def __init__(self, split, cfg: ICARConfig, num_classes: int) -> None:
        super().__init__()
        dim = split.backbone.embed_dim
        self.image = ImageSide(dim, split.backbone.pooled_dim, cfg.image_input)
        self.text = TrainableTextTower(split, cfg.text_proj)
        # tau lives in the cosine classifier; for head=text its weights come from the text tower.
        n_param = num_classes if cfg.head == "cosine" else 0
        self.cos = CosineClassifier(dim, n_param, tau=cfg.tau, learnable_tau=cfg.learn_tau)
        self.linear = LinearClassifier(dim, num_classes) if cfg.head == "linear" else None
        self.head = cfg.head
        self.sentences: list[str] = []  # the training classes' sentences T_i

    def class_logits(self, v: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """v [N, D] -> [N, C] with the parametric head, or cosine against class_weights [C, D]."""
        if class_weights is not None:
            return self.cos(v, class_weights)
        if self.head == "linear":
            assert self.linear is not None  # built for head linear
            return self.linear(v)
        return self.cos(v)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Eq. 6 on a mixed batch; split heads score their images with their own head."""
        cls: dict[str, torch.Tensor] = {}
        if batch["cls_embeds"].shape[0]:
            v = self.image(batch["cls_embeds"], batch["cls_pooled"])  # [Nc, D]
            if self.head == "text":
                cls = {"cls_images": v, "class_texts": self.text(self.sentences)}  # [C, D] class weights from text
            else:
                cls = {"cls_logits": self.class_logits(v)}
        pairs: dict[str, torch.Tensor] = {}
        if batch["pair_embeds"].shape[0] and len(batch["captions"]) >= 2:
            pairs = {
                "pair_images": self.image(batch["pair_embeds"], batch["pair_pooled"]),  # [Np, D]
                "pair_texts": self.text(batch["captions"]),  # [U, D] the batch's distinct captions
                "pair_targets": batch["pair_idx"],
            }
        return unified_contrastive_loss(self.cos.scale, cls_targets=batch["cls_y"], **cls, **pairs)


class MixedBatch(dict):
    """One training batch: classification rows (cls_*) and image-text pairs (pair_*, captions: the
    distinct captions, pair_idx: each pair's caption). Under torchrun each part is split across the
    processes on its own, and each process keeps the captions its pairs point to."""

    def shard(self, rank: int, world: int) -> MixedBatch:
        """This rank's share of a global batch (rows rank::world)."""
        rows = slice(rank, None, world)
        out = MixedBatch(self)
        for k in ("cls_embeds", "cls_pooled", "cls_y", "pair_embeds", "pair_pooled"):
            out[k] = self[k][rows]
        idx = self["pair_idx"][rows].tolist()
        used = sorted(set(idx))
        out["captions"] = [self["captions"][i] for i in used]
        out["pair_idx"] = torch.tensor([used.index(i) for i in idx], dtype=torch.long)
        return out


def _resolve_pairs(spec: str, train: Dataset, val: Dataset | None) -> Dataset | None:
    """The image-text pair set named by `spec`, never holding a validation (or unseen test) image."""
    if spec == "none":
        return None
    if spec in ("auto", "self"):
        has = [it for it in train.items if it.text and it.text.strip()]
        if spec == "self" and not has:
            raise DataError(f"{train.name}: pairs=self but no training item has a caption/text")
        return (
            train.subset(
                [i for i, it in enumerate(train.items) if it.text and it.text.strip()], name=f"{train.name}-pairs"
            )
            if has
            else None
        )
    from ..data import load_data

    splits = load_data(spec)
    ds = splits.get("train") or splits.get("all")
    if ds is None:
        raise DataError(f"pairs {spec!r}: no train or all split")
    train_keys = {it.key for it in train.items}
    blocked = {it.key for it in val.items} if val is not None else set()
    if train_keys & {it.key for it in ds.items}:
        # The pairs come from the classification data itself: only its training split may be used,
        # so validation and test images never appear as pairs.
        keep = [i for i, it in enumerate(ds.items) if it.key in train_keys]
        if len(keep) < len(ds):
            warnings.warn(
                f"pairs {spec!r} overlaps the classification data; using only the {len(keep)} "
                f"training images' captions (of {len(ds)}) so held-out images stay unseen",
                stacklevel=3,
            )
    else:
        keep = [i for i, it in enumerate(ds.items) if it.key not in blocked]
    ds = ds.subset(keep, name=f"{ds.name}-pairs")
    empty = [it.key for it in ds.items if not (it.text and it.text.strip())]
    if len(empty) == len(ds):
        raise DataError(f"pairs {spec!r}: no item has a caption (image-text pairs need texts)")
    return ds


@register_method
class ICAR(Method):
    """iCAR: cosine classifier whose class weights come from a jointly trained text encoder."""

    name = "icar"
    tags = Tags(update=True)
    Config = ICARConfig
    kinds = frozenset({SINGLE, TEXT})
    needs = frozenset({"image", "pooled"})
    selects = "the epoch kept in each stage (the start if none beats it)"
    needs_every_class = False  # depends on the head: prepare checks it
    state = ("trained_classes", "descriptions")
    tensor_state = ("class_weights",)

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        backbone.split(None, self.config.text_layers or 0)  # checks text_layers against the text encoder
        self.trained_classes: list[str] = []  # the classes the parametric head (if any) knows
        self.descriptions: dict[str, str] = {}  # class -> description for the current classes
        self.class_weights: torch.Tensor | None = None  # [C, D] text class weights of the current classes
        self._pairs: Dataset | Encoded | None = None  # image-text pairs of the next fit (`use_pairs`)
        self._continue = False  # finetune(): train the current head instead of a fresh one
        self._started = 0.0  # perf_counter at the start of the fit in progress
        self._n_pairs = self._n_train = 0

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        split = self.backbone.split(None, self.config.text_layers or 0)
        net = ICARNet(split, self.config, spec["trained_classes"])
        net.sentences = self.sentences_for(self.trained_classes, self.descriptions)
        return net

    # ---- classes ------------------------------------------------------------------------
    def _descriptions_for(self, names: Sequence[str], dataset: str = "") -> dict[str, str]:
        return resolve_descriptions(
            names, self.config.descriptions, dataset=dataset, wordnet_dir=self.config.wordnet_dir or None
        )

    @property
    def _net(self) -> ICARNet:
        """The head as its class (built by init_head or load_tensors)."""
        assert isinstance(self.head, ICARNet), "icar: no head yet (fit, load or set_classes first)"
        return self.head

    def sentences_for(self, names: Sequence[str], descriptions: dict[str, str]) -> list[str]:
        """The class sentences of `names`, with descriptions where there are any."""
        c = self.config
        return [class_sentence(n, descriptions.get(n), c.sentence, c.sentence_no_desc) for n in names]

    def set_classes(self, classnames: Sequence[str], descriptions: dict[str, str] | None = None) -> ICAR:
        """Score these classes from now on (open vocabulary): their weights come from the text tower.

        descriptions: class -> description; classes missing from it are looked up with the
        `descriptions` source (built-in / WordNet / file), then fall back to the name alone.
        The decision rule goes back to the top class (a threshold chosen for other classes does not apply).
        """
        names = [str(n) for n in classnames]
        if len(names) < 2:
            raise ConfigError(f"icar: need at least 2 classes to choose between, got {names}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"icar: duplicate class name(s) {', '.join(dup)}")
        if self.head is None:  # untrained: the backbone's zero-shot classifier
            self.init_head({"trained_classes": 0}).eval()
        given = {k: v for k, v in (descriptions or {}).items() if v and str(v).strip()}
        unknown = sorted(set(given) - set(names))
        if unknown:
            warnings.warn(
                f"icar: descriptions given for classes that are not among the classes and ignored: "
                f"{', '.join(unknown)}",
                stacklevel=2,
            )
        missing = [n for n in names if n not in given]
        found = self._descriptions_for(missing) if missing and self.config.descriptions != "none" else {}
        self.descriptions = {n: d for n in names if (d := given.get(n) or found.get(n))}
        self.classnames = names
        self.task_classes = {MAIN: list(names)}
        self.decisions, self.trust = {}, Trust()  # rules chosen for other classes do not apply
        self._update_class_weights()
        return self

    @torch.no_grad()
    def _update_class_weights(self) -> None:
        self._net.eval()
        self.class_weights = self._net.text(self.sentences_for(self.classnames, self.descriptions)).detach()  # [C, D]

    def _uses_parametric_head(self) -> bool:
        return self.config.head != "text" and self.classnames == self.trained_classes

    # ---- training -----------------------------------------------------------------------
    def use_pairs(self, pairs: Dataset | Encoded | None) -> ICAR:
        """Mix these image-text `pairs` into the next fit instead of the `pairs` option's."""
        self._pairs = pairs
        return self

    def finetune(self, train, val=None, pairs: Dataset | Encoded | None = None, **kwargs: Any) -> ICAR:
        """Continue training this model on `train`, whose classes may be new: the (trained) text
        encoder is the initial classifier, so a few labelled images improve on zero-shot."""
        if self.head is None:
            raise ConfigError("icar: finetune needs a trained (or loaded) model; use fit() to train from the backbone")
        self._continue = True
        try:
            return self.use_pairs(pairs).fit(train, val, **kwargs)
        finally:
            self._continue, self._pairs = False, None

    def _update(self, train, val, classes, descriptions):
        """New classes are scored by their text at once; new images continue training (finetune)."""
        if train is None:
            self.set_classes(classes, {**self.descriptions, **descriptions})
            return "classes added by name (the text encoder classifies them)"
        self.finetune(train, val)
        return f"fine-tuned on {len(train)} new image(s), the trained text encoder as the start"

    def clone(self) -> ICAR:
        """An independent copy of the trained state (same backbone; the frozen-text cache is shared)."""
        other = type(self)(self.backbone, **dataclasses.asdict(self.config))
        other.classnames, other.trained_classes = list(self.classnames), list(self.trained_classes)
        other.task_classes = {t: list(c) for t, c in self.task_classes.items()}
        other.descriptions, other.fit_info = dict(self.descriptions), dict(self.fit_info)
        other.decisions = dict(self.decisions)
        if self.head is not None:
            other.head_spec = dict(self.head_spec)
            other.head = net = cast(ICARNet, other.build_head(other.head_spec))
            net.load_state_dict({k: v.clone() for k, v in self.head.state_dict().items()})
            net.sentences = list(self._net.sentences)
            net.head = self._net.head
            net.text._cache = self._net.text._cache
            net.eval()
        other.class_weights = None if self.class_weights is None else self.class_weights.clone()
        return other

    def _pair_set(self, train: Encoded, val: Encoded | None) -> Encoded | None:
        p = self._pairs
        if p is None:
            ds = _resolve_pairs(self.config.pairs, train.dataset, val.dataset if val is not None else None)
            if ds is None:
                return None
            p = ds
        enc = p if isinstance(p, Encoded) else self.encode(p)
        texts = enc.dataset.texts()
        keep = [i for i, t in enumerate(texts) if t and t.strip()]
        if not keep:
            raise DataError(f"{enc.dataset.name}: image-text pairs have only empty captions")
        if len(keep) < len(texts):
            first = next(enc.dataset.items[i].key for i, t in enumerate(texts) if not (t and t.strip()))
            warnings.warn(
                f"{enc.dataset.name}: skipping {len(texts) - len(keep)} pair(s) with an empty caption (first: {first})",
                stacklevel=3,
            )
            enc = enc.subset(keep)
        if len({t.strip() for t in enc.dataset.texts()}) < 2:
            raise DataError(f"{enc.dataset.name}: image-text pairs need at least 2 distinct captions to contrast")
        check_finite(enc.features.tensor("image"), f"{enc.dataset.name} (pairs) image features")
        return enc

    def _batches(self, train: Encoded, pairs: Encoded | None):
        """A callable (stage, epoch, seed) -> list of mixed batches, for the shared trainer."""
        c = self.config
        n_pair = int(round(c.train.batch_size * c.pair_fraction)) if pairs is not None else 0
        n_pair = max(2, n_pair) if pairs is not None else 0
        n_cls = max(1, c.train.batch_size - n_pair)
        x_e, x_p = train.features.tensor("image"), train.features.tensor("pooled")  # [N, D], [N, F]
        y = torch.as_tensor(train.dataset.labels())  # [N]
        labelled = torch.nonzero(y >= 0).flatten()
        if pairs is not None:
            p_e, p_p = pairs.features.tensor("image"), pairs.features.tensor("pooled")
            caps = [t.strip() for t in pairs.dataset.texts()]
        steps = max(math.ceil(len(labelled) / n_cls), c.min_steps_per_epoch)
        empty_e, empty_p = x_e[:0], x_p[:0]

        def make(stage, epoch, seed) -> list[MixedBatch]:
            g = torch.Generator().manual_seed(int(seed) + c.train.seed)
            order = labelled[torch.randperm(len(labelled), generator=g)]
            while len(order) < steps * n_cls:  # tiny sets: reshuffle and continue
                order = torch.cat([order, labelled[torch.randperm(len(labelled), generator=g)]])
            if pairs is not None:
                porder = torch.randperm(len(caps), generator=g)
                while len(porder) < steps * n_pair:
                    porder = torch.cat([porder, torch.randperm(len(caps), generator=g)])
            out = []
            for s in range(steps):
                idx = order[s * n_cls : (s + 1) * n_cls]
                b = MixedBatch(
                    {
                        "cls_embeds": x_e[idx],
                        "cls_pooled": x_p[idx],
                        "cls_y": y[idx],
                        "pair_embeds": empty_e,
                        "pair_pooled": empty_p,
                        "pair_idx": y[:0],
                        "captions": [],
                    }
                )
                if pairs is not None:
                    pidx = porder[s * n_pair : (s + 1) * n_pair]
                    texts = [caps[i] for i in pidx.tolist()]
                    uniq = list(dict.fromkeys(texts))  # identical captions are one text, not false negatives
                    b.update(
                        {
                            "pair_embeds": p_e[pidx],
                            "pair_pooled": p_p[pidx],
                            "captions": uniq,
                            "pair_idx": torch.tensor([uniq.index(t) for t in texts], dtype=torch.long),
                        }
                    )
                out.append(b)
            return out

        return make

    def stages(self, train: Encoded) -> list[Stage]:
        c = self.config
        common = dict(
            weight_decay=c.train.weight_decay,
            batch_size=c.train.batch_size,
            optimizer="adamw",
            schedule="cosine",
            grad_clip=c.grad_clip,
        )
        head = ["cos.", "linear."]
        text = ["text.proj."] + (["text.top."] if c.text_layers is not None else [])
        stages = []
        if c.image_epochs > 0:
            stages.append(Stage("image", epochs=c.image_epochs, lr=c.train.lr, trainable=["image."] + head, **common))
        if c.joint_epochs > 0:
            stages.append(
                Stage("joint", epochs=c.joint_epochs, lr=c.joint_lr, trainable=["image."] + text + head, **common)
            )
        return stages

    def prepare(self, train: Encoded, val: Encoded | None) -> Feed:
        """The head (or the current one, fine-tuning), class sentences, and mixed class + pair batches."""
        c, ds = self.config, train.dataset
        self._started = time.perf_counter()
        if c.head == "text" and not ds.multilabel:  # split heads may leave a class without images unpredicted
            y = ds.labels()
            absent = [ds.classnames[k] for k in range(ds.num_classes) if not np.any(y == k)]
            if absent:
                raise DataError(f"{ds.name}: no training images for class(es) {', '.join(absent)}")
        pairs = self._pair_set(train, val)
        self._n_pairs, self._n_train = 0 if pairs is None else len(pairs), len(train)
        self.descriptions = self._descriptions_for(ds.classnames, ds.name) if c.descriptions != "none" else {}
        if self._continue:
            self._net.head = "text"  # new classes have no parametric weights: the text encoder classifies
        else:
            self.trained_classes = list(ds.classnames)
            self.init_head({"trained_classes": len(ds.classnames) if c.head != "text" else 0})
        net = self._net
        net.sentences = self.sentences_for(ds.classnames, self.descriptions)
        metric = None
        if val is not None and len(val):
            yv = torch.as_tensor(val.dataset.labels())

            def metric(head: nn.Module) -> dict[str, float]:
                model = cast(ICARNet, head)  # train_head scores the head it trains: this ICARNet
                v = model.image(val.features.tensor("image"), val.features.tensor("pooled"))
                w = model.text(model.sentences) if model.head == "text" else None
                return {"score": float((model.class_logits(v, w).argmax(-1) == yv).float().mean())}

        return Feed(batches=self._batches(train, pairs), metric=metric)

    def finish(self, val: Encoded | None, result: TrainResult) -> None:
        c, net = self.config, self._net
        net.head = c.head
        net.eval()
        self._update_class_weights()
        self.fit_info.update(
            {
                "trained_classes": self.trained_classes,
                "finetuned": self._continue,
                "descriptions": self.descriptions,
                "n_train": self._n_train,
                "n_pairs": self._n_pairs,
                "pairs": self.config.pairs if self._pairs is None else "given",
                "text_layers_trained": c.text_layers,
                "tau": float(1.0 / net.cos.scale.detach()),
                "kept_start": val is not None and len(val) > 0 and all(s.best_epoch == 0 for s in result.stages),
                "best": {s.name: {"epoch": s.best_epoch, "val_accuracy": s.best_metric} for s in result.stages},
                "losses": [
                    {k: v for k, v in r.items() if k in ("stage", "epoch") or k.startswith("train_loss")}
                    for r in result.history
                ],
                "fit_seconds": round(time.perf_counter() - self._started, 2),
            }
        )
        self._pairs = None

    # ---- inference ------------------------------------------------------------------------
    def image_embeddings(self, data: Encoded) -> torch.Tensor:
        """[N, D] trained image embeddings (for retrieval or custom scoring)."""
        return self._net.image(data.features.tensor("image"), data.features.tensor("pooled"))

    def _outputs(self, enc: Encoded) -> dict[str, Any]:
        self._net.eval()
        with torch.no_grad():
            v = self.image_embeddings(enc)  # [N, D]
            if self._uses_parametric_head():
                return {"logits": self._net.class_logits(v)}
            if self.class_weights is None or self.class_weights.shape[0] != len(self.classnames):
                self._update_class_weights()
            return {"logits": self._net.cos(v, self.class_weights)}  # [N, C]
