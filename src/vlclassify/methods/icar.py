"""iCAR (paper 004): the text encoder as the classifier, trained on classification data and
image-text pairs with one contrastive loss.

- Cosine classifier (Eq. 3): L2-normalised image features and class weights, temperature tau
  (0.05, optionally learnable). `head=linear` is the linear classifier it replaces (Eq. 1) and
  `head=cosine` a parametric cosine classifier: both are the paper's "split heads" ablation, where
  classification has its own weights and only the image-text pairs train the text encoder.
- Text encoder as meta classifier (Eq. 4-5, `head=text`, the default): the class weights are
  f_t(T_i), the text embeddings of the class sentences T_i = prompt + name + description,
  recomputed from text at every step. The text tower trains with the image side (the top
  `text_layers` MiniLM layers + a residual projection; see modules/text_tower.py).
- Unified contrastive loss (Eq. 6): each batch mixes classification images (text set = all
  class sentences) and image-text pairs (text set = the batch's captions); `pair_fraction` of
  the batch are pairs (paper: 0.5).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.descriptions import class_sentence, resolve_descriptions
from ..data.items import Dataset
from ..errors import ConfigError, DataError
from ..modules.heads import CosineClassifier, LinearClassifier
from ..modules.losses.contrastive import info_nce
from ..modules.text_tower import TrainableTextTower
from ..training import Stage, Trainer
from .base import Encoded, Method, check_finite
from .registry import register_method

HEADS = ("text", "cosine", "linear")
IMAGE_INPUTS = ("embed", "pooled", "both")


@dataclass
class ICARConfig:
    head: str = (
        "text"  # text: class weights = f_t(class sentence) (iCAR) | cosine | linear: parametric split heads (ablation)
    )
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
    text_layers: int = 1  # top text-encoder layers trained (MiniLM has 6); 0 = frozen text encoder
    text_proj: bool = True  # residual D x D projection on the text embedding (zero-initialised)
    image_input: str = (
        "both"  # embed: residual map of the joint-space embedding | pooled: map of pooled visual features | both
    )
    batch_size: int = 64  # images per step (classification + pairs)
    warmup_epochs: int = 3  # stage 1: image projection (and parametric head) only, at lr
    epochs: int = 3  # stage 2: image projection + text tower (+ head) jointly, at joint_lr
    lr: float = 1e-3  # AdamW peak learning rate of stage 1 (cosine schedule)
    joint_lr: float = 1e-4  # AdamW peak learning rate of stage 2 (gentle: it moves pretrained text layers)
    weight_decay: float = 0.01  # AdamW weight decay (pulls the zero-initialised residuals back towards the backbone)
    min_steps_per_epoch: int = 10  # an "epoch" of a tiny (few-shot) set still takes this many steps
    grad_clip: float = 5.0  # max gradient norm (paper: 5)
    keep_start: bool = True  # keep the model as it was before training unless training beats it on validation
    seed: int = 0  # batch sampling seed
    threads: int = 1  # torch threads while training (small ops: 1 avoids thread-pool contention); 0 = leave as is


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
            return self.pooled_map(F.normalize(pooled.float(), dim=-1))
        v = e + self.embed_map(e)
        if self.pooled_map is not None:
            v = v + self.pooled_map(F.normalize(pooled.float(), dim=-1))
        return v


class ICARNet(nn.Module):
    """The trainable part: image side, text tower and (for split heads) a parametric classifier."""

    def __init__(self, backbone, cfg: ICARConfig, num_classes: int) -> None:
        super().__init__()
        self.image = ImageSide(backbone.embed_dim, backbone.pooled_dim, cfg.image_input)
        self.text = TrainableTextTower(backbone, cfg.text_layers, cfg.text_proj)
        # tau lives in the cosine classifier; for head=text its weights come from the text tower.
        n_param = num_classes if cfg.head == "cosine" else 0
        self.cos = CosineClassifier(backbone.embed_dim, n_param, tau=cfg.tau, learnable_tau=cfg.learn_tau)
        self.linear = LinearClassifier(backbone.embed_dim, num_classes) if cfg.head == "linear" else None
        self.head = cfg.head
        self.sentences: list[str] = []  # the training classes' sentences T_i

    def class_logits(self, v: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """v [N, D] -> [N, C] with the parametric head, or cosine against class_weights [C, D]."""
        if class_weights is not None:
            return self.cos(v, class_weights)
        if self.head == "linear":
            return self.linear(v)
        return self.cos(v)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Eq. 6 on a mixed batch; split heads use cross-entropy on their own head for the images."""
        per_image = []
        out: dict[str, torch.Tensor] = {}
        if batch["cls_embeds"].shape[0]:
            v = self.image(batch["cls_embeds"], batch["cls_pooled"])  # [Nc, D]
            if self.head == "text":
                w = self.text(self.sentences)  # [C, D] class weights from text, on the fly
                lc = info_nce(v, w, batch["cls_y"], self.cos.scale, reduction="none")  # [Nc]
            else:
                lc = F.cross_entropy(self.class_logits(v), batch["cls_y"], reduction="none")  # [Nc]
            per_image.append(lc)
            out["loss_cls"] = lc.mean()
        if batch["pair_embeds"].shape[0] and len(batch["captions"]) >= 2:
            v = self.image(batch["pair_embeds"], batch["pair_pooled"])  # [Np, D]
            t = self.text(batch["captions"])  # [U, D] the batch's distinct captions
            lp = info_nce(v, t, batch["pair_idx"], self.cos.scale, reduction="none")  # [Np]
            per_image.append(lp)
            out["loss_pair"] = lp.mean()
        out["loss"] = torch.cat(per_image).mean()
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
    Config = ICARConfig

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        c = self.config
        if c.head not in HEADS:
            raise ConfigError(f"icar: head must be one of {', '.join(HEADS)}, got {c.head!r}")
        if c.image_input not in IMAGE_INPUTS:
            raise ConfigError(f"icar: image_input must be one of {', '.join(IMAGE_INPUTS)}, got {c.image_input!r}")
        if not 0.0 <= c.pair_fraction < 1.0:
            raise ConfigError(f"icar: pair_fraction must be in [0, 1), got {c.pair_fraction}")
        if c.tau <= 0:
            raise ConfigError(f"icar: tau must be > 0, got {c.tau}")
        for key in ("sentence", "sentence_no_desc"):
            if "{name}" not in getattr(c, key):
                raise ConfigError(f"icar: {key} must contain '{{name}}', got {getattr(c, key)!r}")
        if "{description}" not in c.sentence:
            raise ConfigError(f"icar: sentence must contain '{{description}}', got {c.sentence!r}")
        self.net: ICARNet | None = None
        self.trained_classes: list[str] = []  # the classes the parametric head (if any) knows
        self.descriptions: dict[str, str] = {}  # class -> description for the current classes
        self.class_weights: torch.Tensor | None = None  # [C, D] text class weights of the current classes
        self._pairs: Dataset | Encoded | None = None
        self._continue = False  # finetune(): train the current net instead of a fresh one

    def requires_all_classes(self) -> bool:
        return self.config.head == "text"  # a text classifier can still score a class with no images

    # ---- classes ------------------------------------------------------------------------
    def _descriptions_for(self, names: Sequence[str], dataset: str = "") -> dict[str, str]:
        return resolve_descriptions(
            names, self.config.descriptions, dataset=dataset, wordnet_dir=self.config.wordnet_dir or None
        )

    def sentences_for(self, names: Sequence[str], descriptions: dict[str, str]) -> list[str]:
        c = self.config
        return [class_sentence(n, descriptions.get(n), c.sentence, c.sentence_no_desc) for n in names]

    def set_classes(self, classnames: Sequence[str], descriptions: dict[str, str] | None = None) -> ICAR:
        """Score these classes from now on (open vocabulary): their weights come from the text tower.

        descriptions: class -> description; classes missing from it are looked up with the
        `descriptions` source (built-in / WordNet / file), then fall back to the name alone.
        """
        names = [str(n) for n in classnames]
        if len(names) < 2:
            raise ConfigError(f"icar: need at least 2 classes to choose between, got {names}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"icar: duplicate class name(s) {', '.join(dup)}")
        if self.net is None:
            self.net = ICARNet(self.backbone, self.config, 0)  # untrained: the backbone's zero-shot classifier
            self.net.eval()
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
        self.descriptions = {n: (given.get(n) or found.get(n)) for n in names if given.get(n) or found.get(n)}
        self.classnames = names
        self._update_class_weights()
        return self

    @torch.no_grad()
    def _update_class_weights(self) -> None:
        self.net.eval()
        self.class_weights = self.net.text(self.sentences_for(self.classnames, self.descriptions)).detach()  # [C, D]

    def _uses_parametric_head(self) -> bool:
        return self.config.head != "text" and self.classnames == self.trained_classes

    # ---- training -----------------------------------------------------------------------
    def fit(self, train, val=None, pairs: Dataset | Encoded | None = None) -> ICAR:
        """Train on `train` (classification) mixed with image-text `pairs` (default: the `pairs` option)."""
        self._pairs = pairs
        try:
            return super().fit(train, val)
        finally:
            self._pairs = None

    def finetune(self, train, val=None, pairs: Dataset | Encoded | None = None) -> ICAR:
        """Continue training this model on `train`, whose classes may be new: the (trained) text
        encoder is the initial classifier, so a few labelled images improve on zero-shot."""
        if self.net is None:
            raise ConfigError("icar: finetune needs a trained (or loaded) model; use fit() to train from the backbone")
        self._continue = True
        try:
            return self.fit(train, val, pairs)
        finally:
            self._continue = False

    def clone(self) -> ICAR:
        """An independent copy of the trained state (same backbone; the frozen-text cache is shared)."""
        other = type(self)(self.backbone, self.cache, **dataclasses.asdict(self.config))
        other.progress = self.progress
        other.classnames, other.trained_classes = list(self.classnames), list(self.trained_classes)
        other.descriptions, other.fit_info = dict(self.descriptions), dict(self.fit_info)
        if self.net is not None:
            n = len(self.trained_classes) if self.config.head != "text" else 0
            other.net = ICARNet(self.backbone, self.config, n)
            other.net.load_state_dict({k: v.clone() for k, v in self.net.state_dict().items()})
            other.net.sentences = list(self.net.sentences)
            other.net.text._cache = self.net.text._cache
            other.net.eval()
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
        check_finite(enc.features.image, f"{enc.dataset.name} (pairs) image features")
        return enc

    def _batches(self, train: Encoded, pairs: Encoded | None):
        """A callable (stage, epoch, seed) -> list of mixed batches, for the shared trainer."""
        c = self.config
        n_pair = int(round(c.batch_size * c.pair_fraction)) if pairs is not None else 0
        n_pair = max(2, n_pair) if pairs is not None else 0
        n_cls = max(1, c.batch_size - n_pair)
        x_e, x_p = train.features.image, train.features.pooled  # [N, D], [N, F]
        y = torch.as_tensor(train.dataset.labels())  # [N]
        labelled = torch.nonzero(y >= 0).flatten()
        if pairs is not None:
            p_e, p_p = pairs.features.image, pairs.features.pooled
            caps = [t.strip() for t in pairs.dataset.texts()]
        steps = max(math.ceil(len(labelled) / n_cls), c.min_steps_per_epoch)
        empty_e, empty_p = x_e[:0], x_p[:0]

        def make(stage, epoch, seed) -> list[dict[str, Any]]:
            g = torch.Generator().manual_seed(int(seed) + c.seed)
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
                b = {
                    "cls_embeds": x_e[idx],
                    "cls_pooled": x_p[idx],
                    "cls_y": y[idx],
                    "pair_embeds": empty_e,
                    "pair_pooled": empty_p,
                    "pair_idx": y[:0],
                    "captions": [],
                }
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

    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        threads = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            self._train(train, val)
        finally:
            torch.set_num_threads(threads)

    def _train(self, train: Encoded, val: Encoded | None) -> None:
        c = self.config
        ds = train.dataset
        torch.manual_seed(c.seed)  # TODO(port): seeded()
        t0 = time.perf_counter()
        pairs = self._pair_set(train, val)
        self.descriptions = self._descriptions_for(ds.classnames, ds.name) if c.descriptions != "none" else {}
        if self._continue:
            self.net.head = "text"  # new classes have no parametric weights: the text encoder classifies
        else:
            self.trained_classes = list(ds.classnames)
            self.net = ICARNet(self.backbone, c, len(ds.classnames))
        self.net.sentences = self.sentences_for(ds.classnames, self.descriptions)
        metric = None
        if val is not None and len(val):
            yv = torch.as_tensor(val.dataset.labels())

            def metric(model: ICARNet) -> dict[str, float]:
                v = model.image(val.features.image, val.features.pooled)
                w = model.text(model.sentences) if model.head == "text" else None
                return {"accuracy": float((model.class_logits(v, w).argmax(-1) == yv).float().mean())}

        common = dict(
            weight_decay=c.weight_decay,
            batch_size=c.batch_size,
            optimizer="adamw",
            schedule="cosine",
            grad_clip=c.grad_clip,
        )
        head_prefix = ["cos.", "linear."]
        stages = []
        if c.warmup_epochs > 0:
            stages.append(Stage("image", epochs=c.warmup_epochs, lr=c.lr, trainable=["image."] + head_prefix, **common))
        if c.epochs > 0:
            trainable = ["image.", "text."] + head_prefix
            stages.append(Stage("joint", epochs=c.epochs, lr=c.joint_lr, trainable=trainable, **common))
        if not stages:
            raise ConfigError("icar: warmup_epochs and epochs are both 0: nothing to train")
        batches = self._batches(train, pairs)
        start_acc, start_state = None, None
        if metric is not None and c.keep_start:
            self.net.eval()
            with torch.no_grad():
                start_acc = metric(self.net)["accuracy"]  # the model before training: zero-shot (or the finetune start)
            start_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        result = Trainer(
            self.net,
            batches,
            None,
            stages,
            metric=metric,
            monitor="accuracy" if metric else None,
            mode="max" if metric else None,
            seed=c.seed,
            progress=self.progress,
        ).fit()
        trained_acc = result.stages[-1].best_metric
        kept_start = start_acc is not None and trained_acc is not None and start_acc > trained_acc
        if kept_start:
            self.net.load_state_dict(start_state)
        self.net.head = c.head
        self.net.eval()
        self.classnames = list(ds.classnames)
        self._update_class_weights()
        self.fit_info = {
            "trained_classes": self.trained_classes,
            "finetuned": self._continue,
            "descriptions": self.descriptions,
            "n_train": len(train),
            "n_pairs": 0 if pairs is None else len(pairs),
            "pairs": self.config.pairs if self._pairs is None else "given",
            "text_tower": self.net.text.kind,
            "text_layers_trained": self.net.text.train_layers,
            "tau": float(1.0 / self.net.cos.scale.detach()),
            "start_val_accuracy": start_acc,
            "kept_start": kept_start,
            "best": {s.name: {"epoch": s.best_epoch, "val_accuracy": s.best_metric} for s in result.stages},
            "history": [
                {
                    k: v
                    for k, v in r.items()
                    if k in ("stage", "epoch", "train_loss", "train_loss_cls", "train_loss_pair", "val_accuracy")
                }
                for r in result.history
            ],
            "fit_seconds": round(time.perf_counter() - t0, 2),
        }

    # ---- inference ------------------------------------------------------------------------
    def image_embeddings(self, data: Encoded) -> torch.Tensor:
        """[N, D] trained image embeddings (for retrieval or custom scoring)."""
        return self.net.image(data.features.image, data.features.pooled)

    def _logits(self, data: Encoded) -> torch.Tensor:
        self.net.eval()
        v = self.image_embeddings(data)  # [N, D]
        if self._uses_parametric_head():
            return self.net.class_logits(v)
        if self.class_weights is None or self.class_weights.shape[0] != len(self.classnames):
            self._update_class_weights()
        return self.net.cos(v, self.class_weights)  # [N, C]

    def text_logits(self, data: Encoded, texts: Sequence[str]) -> torch.Tensor:
        """[N, T] image-to-text scores against arbitrary texts (captions, queries)."""
        with torch.no_grad():
            self.net.eval()
            return self.net.cos(self.image_embeddings(data), self.net.text(list(texts)))

    # ---- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        self.fit_info = {**self.fit_info, "trained_classes": self.trained_classes, "descriptions": self.descriptions}
        return super().save_pretrained(directory)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise ConfigError("icar: nothing to save; fit or set_classes first")
        sd = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        sd["class_weights"] = self.class_weights
        return sd

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.trained_classes = list(self.fit_info.get("trained_classes", self.classnames))
        self.descriptions = dict(self.fit_info.get("descriptions", {}))
        n = len(self.trained_classes) if self.config.head != "text" else 0
        self.net = ICARNet(self.backbone, self.config, n)
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"icar: saved weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "was it saved with another backbone or text_layers?"
            )
        self.net.sentences = self.sentences_for(self.trained_classes, self.descriptions)
        self.net.eval()
        self.class_weights = tensors.get("class_weights")
