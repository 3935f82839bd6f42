"""CMA-CLIP (Liu et al. 2021): sequence-wise + modality-wise attention over image and text, multi-task.

    image -> backbone top -> [I_cls, I_patches] ┐
                                                ├-> transformer over [I_cls, I_1..P, T_cls, T_1..L]
    text  -> backbone top -> [T_cls, T_tokens]  ┘      -> I'_cls, T'_cls
    per task k: lambda_k = softmax(w_k.I', w_k.T')[0];  c_k = lambda_k I' + (1 - lambda_k) T';  MLP_k(c_k)
    loss = sum_k CE_k

Trained in the paper's three stages with the shared trainer: the backbone frozen; end-to-end with
the backbone's top unfrozen (a `backbone.split`: the frozen trunk's activations are cached once,
so every stage costs only the top + fusion, and the top is the head's own copy of those layers);
tuning of the modality attentions and heads with everything else frozen. The default sequence
transformer is CPU-sized (1 layer, width 256, 4 heads, vs the paper's 12 x 512 x 8; chosen on
validation, docs/cma-clip.md): the data it targets here is hundreds to thousands of pairs on 2
cores, where a 12-layer transformer trained from scratch over-fits and takes minutes per epoch;
width/layers/heads are options for larger data.

Tasks: the head answers every task column it learned, the main one first (`task_classes`: the
main task under "label", then the other columns by name); `outputs()` gives "logits" (main task),
"task_logits" (the others) and "modality_weights" [N, K] (the image weight lambda of each task).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import BackboneSplit
from ..context import RunContext
from ..data.items import Dataset, Item
from ..errors import ConfigError, DataError
from ..features.trunk import TrunkSet, compute_trunk, trunk_features
from ..metrics import score
from ..modules.fusions.keyless_attention import KeylessAttention
from ..modules.fusions.sequence_attention import SequenceEncoder
from ..modules.phrases import normalize_token
from ..training import Stage
from .base import (
    MAIN,
    SINGLE,
    TASKS,
    TEXT,
    Encoded,
    Feed,
    Method,
    TrainConfig,
    TrainOptions,
    _concat_outputs,
    dataset_of,
)
from .registry import register_method
from .tags import Tags

IMAGE = 0
EMBED_KEYS = ("img_emb", "img_tok", "txt_emb", "txt_tok", "tmask")
TRUNK_KEYS = ("image", "has_image", "text", "text_mask", "has_text")
STOPWORDS = {
    "the",
    "and",
    "for",
    "with",
    "from",
    "that",
    "this",
    "are",
    "was",
    "its",
    "his",
    "her",
    "their",
    "has",
    "have",
    "into",
    "onto",
    "over",
    "under",
    "one",
    "two",
    "some",
    "which",
    "also",
    "can",
    "not",
    "but",
}


@dataclass(frozen=True)
class CMAClipConfig(TrainOptions):
    """CMA-CLIP's options: the sequence transformer, the modality-wise attention and training."""

    tasks: list[str] | None = None  # task columns to learn (None = every task of the data, else its main label)
    width: int = 256  # sequence transformer width (paper: 512)
    layers: int = 1  # sequence transformer layers (paper: 12)
    heads: int = 4  # attention heads (paper: 8)
    ffn_mult: int = 2  # feed-forward width = ffn_mult * width
    dropout: float = 0.1  # dropout in the transformer and the heads
    zero_init: bool = True  # transformer residual branches start at 0 (starts as the identity over the backbone tokens)
    head_hidden: int = 256  # hidden width of each task's MLP head
    max_text_tokens: int = 32  # text tokens kept per item (longer texts are truncated, keeping the end token)
    modality_attention: bool = True  # False = fixed average of the modalities (ablation "w/o MA")
    sequence_attention: bool = True  # False = backbone embeddings straight into the modality attention ("w/o SA")
    image_blocks: int = (
        1  # last image-encoder blocks the top holds (plus the image head/projection); see backbone.split
    )
    text_layers: int = 1  # last text-encoder layers the top holds (plus the text head); trained in stage 2
    frozen_epochs: int = 15  # stage 1 "frozen": the backbone top frozen, the CMA modules and heads train
    e2e_epochs: int = 3  # stage 2 "end2end": backbone top + CMA modules (0 skips it)
    tune_epochs: int = 10  # stage 3 "tuning": modality attentions + heads only (0 skips it)
    # learning rate of stages 1 and 3 1e-3 (paper: 1e-5 at batch 1024 on millions of pairs), Adam weight
    # decay 1e-4 (paper), batch 32
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=1e-4, batch_size=32))
    e2e_lr: float = 1e-4  # learning rate of stage 2, for every trainable part
    optimizer: str = "adam"  # adam (paper) | adamw
    modality_noise: float = 0.0  # augmentation: share of training rows whose text or image is swapped with another's

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"cma-clip: optimizer must be adam or adamw, got {self.optimizer!r}")
        if not 0.0 <= self.modality_noise < 1.0:
            raise ConfigError(f"cma-clip: modality_noise must be in [0, 1), got {self.modality_noise}")
        if min(self.width, self.layers, self.heads, self.head_hidden, self.max_text_tokens) < 1:
            raise ConfigError("cma-clip: width, layers, heads, head_hidden and max_text_tokens must be >= 1")
        for key in ("image_blocks", "text_layers"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"cma-clip: {key} must be an integer >= 0, got {getattr(self, key)!r}")


class CMAClipModel(nn.Module):
    """The head: the backbone's top (a BackboneSplit, its own layer copies) + sequence attention +
    per-task keyless attention + MLP heads.

    forward(batch) with batch = {image [B, ...] trunk activations, has_image [B], text [B, L, H],
    text_mask [B, L], has_text [B]} (or the top's outputs under EMBED_KEYS instead of image / text /
    text_mask), plus optional labels [B, K] (-1 = unlabelled) ->
    {"logits": [B, C_0], "task_logits": {task: [B, C_k]}, "modality_weights": [B, K], "loss", "loss_<task>"}.
    """

    def __init__(self, top: BackboneSplit, cfg: CMAClipConfig, tasks: dict[str, int], n_patches: int) -> None:
        super().__init__()
        self.top = top
        self.cfg = cfg
        self.task_names = list(tasks)
        D, W = top.backbone.embed_dim, cfg.width
        if cfg.sequence_attention:
            if W % cfg.heads:
                raise ConfigError(f"cma-clip: width {W} is not divisible by heads {cfg.heads}")
            self.in_proj = nn.Linear(D, W)  # shared: image and text live in one joint space
            self.type_embed = nn.Parameter(torch.randn(4, W) * 0.02)  # image CLS, image patch, text CLS, text token
            self.patch_pos = nn.Parameter(torch.randn(n_patches, W) * 0.02)  # patches carry no position otherwise
            self.encoder = SequenceEncoder(W, cfg.heads, cfg.layers, cfg.ffn_mult, cfg.dropout, cfg.zero_init)
            out_dim = W
        else:
            self.in_norm = nn.LayerNorm(D)
            out_dim = D
        self.ma = nn.ModuleList(KeylessAttention(out_dim, fixed=not cfg.modality_attention) for _ in tasks)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(out_dim, cfg.head_hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.head_hidden, c)
            )
            for c in tasks.values()
        )

    # ---- pieces ----------------------------------------------------------------------------
    def embed(self, batch: dict) -> dict:
        """Backbone top: global embeddings and token features of both modalities."""
        img = self.top.image_top(batch["image"].float())  # embeds [B, D], tokens [B, P, D]
        txt = self.top.text_top(batch["text"].float(), batch["text_mask"])  # embeds [B, D], tokens [B, L, D]
        return {
            "img_emb": img.embeds,
            "img_tok": img.tokens,
            "txt_emb": txt.embeds,
            "txt_tok": txt.tokens,
            "tmask": txt.mask,
        }

    def fuse(self, e: dict, has_image: torch.Tensor, has_text: torch.Tensor, attention: bool = False):
        """-> (I' [B, W], T' [B, W], attention maps or None)."""
        if not self.cfg.sequence_attention:
            return self.in_norm(e["img_emb"]), self.in_norm(e["txt_emb"]), None
        B, P = e["img_tok"].shape[:2]
        t = self.type_embed
        seq = torch.cat(
            [
                self.in_proj(e["img_emb"]).unsqueeze(1) + t[0],
                self.in_proj(e["img_tok"]) + t[1] + self.patch_pos[:P],
                self.in_proj(e["txt_emb"]).unsqueeze(1) + t[2],
                self.in_proj(e["txt_tok"]) + t[3],
            ],
            1,
        )  # [B, 1 + P + 1 + L, W]
        no_img, no_txt = ~has_image.bool(), ~has_text.bool()
        pad = torch.cat(
            [no_img[:, None], no_img[:, None].expand(B, P), no_txt[:, None], ~(e["tmask"].bool()) | no_txt[:, None]], 1
        )  # [B, S] True = ignore
        out, maps = self.encoder(seq, pad)
        return out[:, 0], out[:, 1 + P], (maps if attention else None)

    def forward(self, batch: dict, attention: bool = False) -> dict:
        """batch -> main-task logits, per-task logits and the modality weights (and attention maps when asked)."""
        has_image, has_text = batch["has_image"].bool(), batch["has_text"].bool()
        e = {k: batch[k] for k in EMBED_KEYS} if "img_emb" in batch else self.embed(batch)
        if self.training and self.cfg.modality_noise > 0:
            e = self._modality_noise(e)
        i_cls, t_cls, maps = self.fuse(e, has_image, has_text, attention)
        x = torch.stack([i_cls, t_cls], 1)  # [B, 2, W]
        present = torch.stack([has_image, has_text], 1)  # [B, 2]
        logits, lambdas = [], []
        for ma, head in zip(self.ma, self.heads):
            c, w = ma(x, present)  # [B, W], [B, 2]
            logits.append(head(c))
            lambdas.append(w[:, IMAGE])
        out: dict[str, Any] = {
            "logits": logits[0],
            "task_logits": dict(zip(self.task_names[1:], logits[1:])),
            "modality_weights": torch.stack(lambdas, 1),
        }
        if maps is not None:
            out["attention"] = maps
            out["n_patches"] = e["img_tok"].shape[1]
        if "labels" in batch:
            y = batch["labels"].long()  # [B, K]
            total = torch.zeros((), device=y.device)
            for k, (name, z) in enumerate(zip(self.task_names, logits)):
                valid = y[:, k] >= 0
                lk = F.cross_entropy(z[valid], y[valid, k]) if bool(valid.any()) else z.sum() * 0.0
                out[f"loss_{name}"] = lk
                total = total + lk
            out["loss"] = total
        return out

    def _modality_noise(self, e: dict) -> dict:
        """Swap the text (or the image) of a random share of rows with the next row's: the labels stay,
        so the modality attention learns to down-weight a modality that does not match."""
        B = e["img_emb"].shape[0]
        if B < 2:
            return e
        u = torch.rand(B)
        swap_txt = u < self.cfg.modality_noise / 2
        swap_img = (u >= self.cfg.modality_noise / 2) & (u < self.cfg.modality_noise)
        roll = torch.roll(torch.arange(B), 1)
        e = dict(e)
        for keys, m in ((("txt_emb", "txt_tok", "tmask"), swap_txt), (("img_emb", "img_tok"), swap_img)):
            if bool(m.any()):
                for k in keys:
                    v = e[k].clone()
                    v[m] = e[k][roll][m]
                    e[k] = v
        return e


def trunk_batches(t: TrunkSet, batch_size: int = 64, emb: dict[str, torch.Tensor] | None = None):
    """Row batches of a TrunkSet; `emb` (the top's outputs for every row) replaces the activations."""
    for s in range(0, len(t), batch_size):
        sl = slice(s, s + batch_size)
        b = {"has_image": t.has_image[sl], "has_text": t.has_text[sl]}
        b.update({k: v[sl] for k, v in emb.items()} if emb is not None else {k: getattr(t, k)[sl] for k in TRUNK_KEYS})
        yield b


class _Feeder:
    """Training batches for the trainer: `(stage, epoch, seed) -> [batch]`.

    In stages where the backbone top is frozen its outputs are computed once per stage — with the
    weights that stage starts from — and batches (and validation) carry them instead of trunk
    activations, so a step costs only the fusion and the heads."""

    def __init__(self, method: CMAClip, trunk: TrunkSet, labels: torch.Tensor, frozen_top: set[str]) -> None:
        self.m, self.t, self.y, self.frozen_top = method, trunk, labels, frozen_top
        self.stage: str | None = None
        self.cache: dict[int, dict[str, torch.Tensor]] = {}  # id(trunk set) -> the top's outputs

    def enter(self, stage: str) -> None:
        """Stage.setup: a (re)started stage recomputes the frozen top's outputs on first use."""
        self.stage = stage
        self.cache.clear()

    def embeddings(self, trunk: TrunkSet) -> dict[str, torch.Tensor] | None:
        """The top's outputs of every row of `trunk` if the current stage freezes the top, else None."""
        if self.stage not in self.frozen_top:
            return None
        if id(trunk) not in self.cache:
            self.cache[id(trunk)] = self.m._embed_all(trunk)
        return self.cache[id(trunk)]

    def __call__(self, stage: Stage, epoch: int, seed: int) -> list[dict]:
        rows = {"has_image": self.t.has_image, "has_text": self.t.has_text, "labels": self.y}
        emb = self.embeddings(self.t)
        rows.update(emb if emb is not None else {k: getattr(self.t, k) for k in ("image", "text", "text_mask")})
        order = torch.randperm(len(self.t), generator=torch.Generator().manual_seed(seed))
        bs = stage.batch_size
        return [{k: v[order[s : s + bs]] for k, v in rows.items()} for s in range(0, len(order), bs)]


@register_method
class CMAClip(Method):
    """CMA-CLIP: image+text transformer, per-task modality attention, 3-stage training, multi-task."""

    name = "cma-clip"
    tags = Tags(explain=True)
    Config = CMAClipConfig
    kinds = frozenset({SINGLE, TEXT, TASKS})
    needs = frozenset({"trunk"})
    selects = "the epoch kept in each stage"
    needs_every_class = False  # each task needs >= 2 classes; a class without training rows is never predicted

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        self._feeder: _Feeder | None = None  # the training batches of the fit in progress
        self._trunk_split: BackboneSplit | None = None
        self._pool: tuple[TrunkSet, dict[str, int]] | None = None

    # ---- data --------------------------------------------------------------------------------
    def _select_tasks(self, ds: Dataset) -> list[str]:
        if self.config.tasks:
            for t in self.config.tasks:
                if t not in ds.tasks:
                    raise DataError(f"{ds.name}: no task column {t!r} (tasks: {', '.join(ds.tasks) or 'none'})")
            tasks = list(self.config.tasks)
        elif ds.tasks:
            tasks = list(ds.tasks)
        else:
            tasks = [MAIN]
        # the task whose classes are the dataset's main classes comes first
        main = [t for t in tasks if t != MAIN and ds.tasks.get(t) == ds.classnames]
        return main[:1] + [t for t in tasks if t not in main[:1]]

    def _classes_of(self, ds: Dataset, task: str) -> list[str]:
        return list(ds.classnames) if task == MAIN else list(ds.tasks[task])

    def _labels(self, ds: Dataset, check: bool = True) -> torch.Tensor:
        """[N, K] model-index labels (-1 = none); errors name the column and row of a mismatch."""
        cols = []
        for t, classes in zip(self.task_columns, self.task_classes.values()):
            if t == MAIN:
                y, names = ds.labels(), list(ds.classnames)
            else:
                if t not in ds.tasks:
                    raise DataError(
                        f"{ds.name}: the model was trained with task column {t!r}, which the data lacks "
                        f"(data tasks: {', '.join(ds.tasks) or 'none'})"
                    )
                y, names = ds.task_labels(t), list(ds.tasks[t])
            known = {c: i for i, c in enumerate(classes)}
            remap = np.array([known.get(c, -2) for c in names] + [-1], dtype=np.int64)
            mapped = remap[y]  # y == -1 picks the trailing -1
            bad = np.nonzero(mapped == -2)[0]
            if check and len(bad):
                r = int(bad[0])
                raise DataError(
                    f"{ds.name} row {r} ({ds.items[r].key}): task column {t!r} has label "
                    f"{names[y[r]]!r}, unknown to the model ({len(classes)} classes)"
                )
            cols.append(torch.from_numpy(np.where(mapped == -2, -1, mapped)))
        return torch.stack(cols, 1)

    def _split(self) -> BackboneSplit:
        """The cut the trunk activations are taken at (its top is not trained: the head has its own)."""
        if self._trunk_split is None:
            self._trunk_split = self.backbone.split(self.config.image_blocks, self.config.text_layers)
        return self._trunk_split

    def provide_trunk(self, ds: Dataset, trunk: TrunkSet) -> None:
        """Reuse trunk activations computed for a pool (e.g. all folds of a benchmark): any dataset
        whose items all come from `ds` is then served by indexing instead of recomputing."""
        self._pool = (trunk, {it.key: i for i, it in enumerate(ds.items)})

    @property
    def _model(self) -> CMAClipModel:
        """The head as its class (built by init_head or load_tensors)."""
        assert isinstance(self.head, CMAClipModel), "cma-clip: no model yet (fit or load one first)"
        return self.head

    def trunk(self, ds: Dataset) -> TrunkSet:
        """The cached trunk activations of `ds` (taken from a provided pool when it covers the items)."""
        pool = self._pool
        if pool is not None and all(it.key in pool[1] for it in ds.items):
            t = pool[0].index([pool[1][it.key] for it in ds.items])
        else:
            t = trunk_features(
                self._split(),
                ds,
                self.config.max_text_tokens,
                cache=self.feature_cache,
                progress=self.ctx.progress,
                write=self.ctx.cache_write,
            )
        both = ~(t.has_image | t.has_text)
        if bool(both.any()):
            r = int(both.nonzero()[0, 0])
            raise DataError(f"{ds.name} row {r} ({ds.items[r].key}): neither an image nor a text")
        self._note_missing(ds, t)
        return t

    def _encode(self, data: Dataset | Encoded, training: bool) -> Encoded:
        """Trunk activations (features/trunk.py) instead of extracted features."""
        if isinstance(data, Encoded) and isinstance(data.features, TrunkSet):
            return data
        ds = dataset_of(data)
        return Encoded(ds, self.trunk(ds))

    def _note_missing(self, ds: Dataset, t: TrunkSet) -> None:
        ni, nt = int((~t.has_image).sum()), int((~t.has_text).sum())
        if ni or nt:
            msg = []
            if ni:
                msg.append(f"{ni} row(s) without an image: their text carries them")
            if nt:
                msg.append(f"{nt} row(s) with an empty text: their image carries them")
            self.notes.append(f"{ds.name}: " + "; ".join(msg))
            if self.ctx.progress:
                print(f"note: {self.notes[-1]}", file=sys.stderr)

    # ---- model ---------------------------------------------------------------------------------
    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        top = self.backbone.split(self.config.image_blocks, self.config.text_layers)
        return CMAClipModel(top, self.config, dict(spec["tasks"]), spec["n_patches"])

    def stages(self, train: Encoded) -> list[Stage]:
        c = self.config
        cma = ["ma.", "heads."] + (
            ["in_proj.", "type_embed", "patch_pos", "encoder."] if c.sequence_attention else ["in_norm."]
        )
        common = dict(weight_decay=c.train.weight_decay, batch_size=c.train.batch_size, optimizer=c.optimizer)
        stages = [Stage("frozen", epochs=c.frozen_epochs, lr=c.train.lr, trainable=cma, **common)]
        if c.e2e_epochs > 0:
            # BatchNorm statistics stay fixed: batches of 32 would replace ImageNet's running stats
            stages.append(
                Stage("end2end", epochs=c.e2e_epochs, lr=c.e2e_lr, trainable=cma + ["top."], bn_eval=True, **common)
            )
        if c.tune_epochs > 0:
            stages.append(Stage("tuning", epochs=c.tune_epochs, lr=c.train.lr, trainable=["ma.", "heads."], **common))
        for st in stages:  # a (re)started stage recomputes the frozen top's outputs on first use
            st.setup = lambda _model, name=st.name: cast(_Feeder, self._feeder).enter(name)
        return stages

    def prepare(self, train: Encoded, val: Encoded | None) -> Feed:
        """The tasks of the data, the model, and batches that carry the frozen top's outputs."""
        ds = train.dataset
        self.task_columns = self._select_tasks(ds)
        classes = {t: self._classes_of(ds, t) for t in self.task_columns}
        for t, cs in classes.items():
            if len(cs) < 2:
                raise DataError(f"{ds.name}: task {t!r} needs at least 2 classes, got {len(cs)}")
        self.classnames = classes[self.task_columns[0]]
        self.task_classes = {MAIN: self.classnames, **{t: classes[t] for t in self.task_columns[1:]}}
        with torch.no_grad():  # the patch count sizes the patch positions: what the backbone's top gives
            blank = torch.zeros(1, 3, self.backbone.image_size, self.backbone.image_size)
            n_patches = int(self.backbone.encode_image(blank).tokens.shape[1])
        spec = {
            "num_classes": len(self.classnames),
            "tasks": {t: len(cs) for t, cs in self.task_classes.items()},
            "n_patches": n_patches,
        }
        head = cast(CMAClipModel, self.init_head(spec))
        frozen_top = {
            st.name for st in self.stages(train) if isinstance(st.trainable, Sequence) and "top." not in st.trainable
        }
        feeder = self._feeder = _Feeder(self, _trunk_set(train), self._labels(ds), frozen_top)
        metric = None
        if val is not None:
            yva = self._labels(val.dataset)

            def metric(model: nn.Module) -> dict[str, float]:
                out = self._run(model, _trunk_set(val), emb=feeder.embeddings(_trunk_set(val)))
                logits = dict(zip(self.task_columns, [out["logits"], *out["task_logits"].values()]))
                targets = {t: yva[:, k].numpy() for k, t in enumerate(self.task_columns)}
                s = score(TASKS, targets, {t: z.numpy() for t, z in logits.items()})
                return {"score": s["accuracy"], **s}

        self.fit_info.update(
            {
                "tasks": self.task_columns,
                "notes": list(self.notes),
                "trainable_backbone": sorted({n.split(".")[0] for n, _ in head.top.named_parameters()}),
                "n_train": len(ds),
                "n_val": len(val) if val is not None else 0,
            }
        )
        return Feed(batches=feeder, metric=metric)

    @torch.no_grad()
    def _embed_all(self, t: TrunkSet) -> dict[str, torch.Tensor]:
        """Backbone-top outputs of every row (eval mode), for stages where the top is frozen."""
        model = self._model
        was = model.training
        model.eval()
        parts = [model.embed(b) for b in trunk_batches(t)]
        model.train(was)
        return {k: torch.cat([p[k] for p in parts]) for k in EMBED_KEYS}

    @torch.no_grad()
    def _run(self, head: nn.Module, t: TrunkSet, emb: dict | None = None, attention: bool = False) -> dict:
        """The head over every row of `t` in eval mode: concatenated outputs (`attention`: the maps too,
        for one batch)."""
        was = head.training
        head.eval()
        parts = [head(b, attention=attention) for b in trunk_batches(t, emb=emb)]
        head.train(was)
        return parts[0] if attention else _concat_outputs(parts)

    # ---- prediction ---------------------------------------------------------------------------
    def _outputs(self, enc: Encoded) -> dict[str, Any]:
        return self._run(self._model, _trunk_set(enc))

    def task_report(self, ds: Dataset) -> dict[str, dict]:
        """Per task column: n, accuracy, recall at 90% precision (metrics.ranking) and the mean image
        weight lambda; data that lacks a task column or has a label the model does not know is an error."""
        from ..metrics.ranking import recall_at_precision

        self._check_fitted()
        y = self._labels(ds).numpy()
        self.notes = []
        enc = self.encode(ds)
        out = self._outputs(enc)
        probs = [self._scores(out["logits"]), *(self._scores(z, t) for t, z in out["task_logits"].items())]
        lam = out["modality_weights"].numpy()
        rep = {}
        for k, (t, p) in enumerate(zip(self.task_columns, probs)):
            keep = y[:, k] >= 0
            rap = recall_at_precision(y[:, k], p, 0.9)
            rep[t] = {
                "n": int(keep.sum()),
                "accuracy": float((p[keep].argmax(-1) == y[keep, k]).mean()),
                "recall@90P": rap["recall"],
                "threshold@90P": rap["threshold"],
                "lambda": float(lam[:, k].mean()),
                "missing_image": int((~_trunk_set(enc).has_image).sum()),
                "missing_text": int((~_trunk_set(enc).has_text).sum()),
            }
        return rep

    # ---- explain ----------------------------------------------------------------------------------
    def explain(
        self, item: Item | str, target: str | None = None, *, ctx: RunContext | None = None, layer: int = -1
    ) -> np.ndarray:
        """[h, w] attention of a text token (`target`, default: the content word that looks at the
        image most) over the image patches: the paper's Figure 2, from the sequence attention's
        query/key products in `layer`, averaged over heads and renormalised over the patches."""
        self._check_fitted()
        if not self.config.sequence_attention:
            raise ConfigError("cma-clip: trained without sequence attention; nothing to explain")
        if isinstance(item, str):
            item = Item(image=item, key=item)
        text = (item.text or "").strip()
        if item.image is None or not text:
            raise DataError(
                f"{item.key or 'item'}: cma-clip explains a text token over the image: "
                "give both an image and its text (CLI: --text)"
            )
        t = compute_trunk(self._split(), [item], self.config.max_text_tokens, progress=False)
        out = self._run(self._model, t, attention=True)
        P = out["n_patches"]
        att = out["attention"][layer][0].mean(0)  # [S, S] averaged over heads
        tokens = self.backbone.token_strings([text], self.config.max_text_tokens)[0]
        words = [normalize_token(s) for s in tokens]
        first_tok = 1 + P + 1
        raw = att[first_tok : first_tok + len(tokens), 1 : 1 + P]  # [L, P]: text token -> image patches
        rows = raw / raw.sum(-1, keepdim=True).clamp_min(1e-12)
        if target is None:
            cand = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 2 and w not in STOPWORDS]
            cand = cand or [i for i, w in enumerate(words) if w] or [0]
            i = max(cand, key=lambda j: float(raw[j].sum()))
        else:
            want = normalize_token(target)
            matches = [i for i, w in enumerate(words) if w and w == want]
            if not matches:
                raise DataError(f"explain: token {target!r} is not in the text's tokens {tokens}")
            i = matches[0]
        self.explained_token = words[i] or tokens[i]
        g = int(math.isqrt(P))
        if g * g != P:
            raise ConfigError(f"cma-clip: {P} image patches do not form a square grid")
        return rows[i].reshape(g, g).numpy()


def _trunk_set(enc: Encoded) -> TrunkSet:
    """The trunk activations CMA-CLIP's `encode` puts where other methods have a FeatureSet."""
    assert isinstance(enc.features, TrunkSet), "cma-clip: data encoded by another method"
    return enc.features
