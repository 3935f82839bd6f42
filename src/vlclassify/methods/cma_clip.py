"""CMA-CLIP (Liu et al. 2021): sequence-wise + modality-wise attention over image and text, multi-task.

    image -> backbone top -> [I_cls, I_patches] ┐
                                                ├-> transformer over [I_cls, I_1..P, T_cls, T_1..L]
    text  -> backbone top -> [T_cls, T_tokens]  ┘      -> I'_cls, T'_cls
    per task k: lambda_k = softmax(w_k.I', w_k.T')[0];  c_k = lambda_k I' + (1 - lambda_k) T';  MLP_k(c_k)
    loss = sum_k CE_k

Trained in the paper's three stages with the shared trainer (vlclassify.training): warm-up with the
backbone frozen; end-to-end with the backbone's top blocks unfrozen (a `Split`: the frozen trunk's
activations are cached once, so every stage costs only the top + fusion); tuning of the modality
attentions and heads with everything else frozen. The default sequence transformer is CPU-sized
(1 layer, width 256, 4 heads, vs the paper's 12 x 512 x 8; chosen on validation, docs/cma-clip.md):
the data it targets here is hundreds
to thousands of pairs on 2 cores, where a 12-layer transformer trained from scratch over-fits and
takes minutes per epoch; width/layers/heads are options for larger data.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.partial import Split, make_split
from ..data.items import Dataset, Item
from ..errors import ConfigError, DataError
from ..features.trunk import TrunkSet, compute_trunk, trunk_features
from ..modules.fusions.keyless_attention import KeylessAttention
from ..modules.fusions.sequence_attention import SequenceEncoder
from ..training import Stage, Trainer
from .base import Encoded, Method, as_dataset
from .registry import register_method

IMAGE, TEXT = 0, 1
EMBED_KEYS = ("img_emb", "img_tok", "txt_emb", "txt_tok", "tmask")
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


@dataclass
class CMAClipConfig:
    tasks: list[str] | None = None  # task columns to learn (None = every task of the data, else its main label)
    width: int = 256  # sequence transformer width (paper: 512)
    layers: int = 1  # sequence transformer layers (paper: 12)
    heads: int = 4  # attention heads (paper: 8)
    ffn_mult: int = 2  # feed-forward width = ffn_mult * width
    dropout: float = 0.1  # dropout in the transformer and the heads
    zero_init: bool = True  # transformer residual branches start at 0 (starts as the identity over the backbone tokens)
    head_hidden: int = 256  # hidden width of each task's MLP head
    max_text_tokens: int = 32  # text tokens kept per item (longer texts are truncated)
    modality_attention: bool = True  # False = fixed average of the modalities (ablation "w/o MA")
    sequence_attention: bool = True  # False = backbone embeddings straight into the modality attention ("w/o SA")
    image_blocks: int = 1  # backbone image blocks unfrozen in stage 2 (effnet-minilm; plus its head/projection)
    text_layers: int = 1  # backbone text layers unfrozen in stage 2 (MiniLM)
    warmup_epochs: int = 15  # stage 1: backbone frozen
    e2e_epochs: int = 3  # stage 2: backbone top + CMA modules (0 skips it)
    tune_epochs: int = 10  # stage 3: modality attentions + heads only (0 skips it)
    lr: float = 1e-3  # learning rate of stages 1 and 3 (paper: 1e-5 at batch 1024 on millions of pairs)
    e2e_lr: float = 1e-4  # learning rate of stage 2, for every trainable part
    weight_decay: float = 1e-4  # Adam weight decay (paper: 1e-4)
    optimizer: str = "adam"  # adam (paper) | adamw
    batch_size: int = 32  # training batch size
    modality_noise: float = (
        0.0  # training augmentation: share of rows whose text or image is swapped with another row's
    )
    seed: int = 0  # initialisation, data order and augmentation
    threads: int | None = (
        1  # torch threads while training (1: fastest for this small model on shared CPUs; None = torch's default)
    )
    run_dir: str | None = None  # checkpoints + log.jsonl of the three stages (None = a temporary folder)


class CMAClipModel(nn.Module):
    """The network: backbone top (through a Split) + sequence attention + per-task keyless attention + heads.

    forward(batch) with batch = {image [B, ...] trunk activations, has_image [B], text [B, L, H],
    text_mask [B, L], has_text [B], labels [B, K] (optional, -1 = unlabelled)} ->
    {"loss", "loss_<task>", "logits": [[B, C_k]], "lambda": [B, K]}.
    """

    def __init__(
        self,
        backbone: nn.Module,
        split: Split,
        cfg: CMAClipConfig,
        task_sizes: Sequence[int],
        task_names: Sequence[str],
        n_patches: int,
        n_text: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.split = split
        self.cfg = cfg
        self.task_names = list(task_names)
        D, W = backbone.embed_dim, cfg.width
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
        self.ma = nn.ModuleList(KeylessAttention(out_dim, fixed=not cfg.modality_attention) for _ in task_sizes)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(out_dim, cfg.head_hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.head_hidden, c)
            )
            for c in task_sizes
        )
        self.n_patches = n_patches

    # ---- pieces ----------------------------------------------------------------------------
    def embed(self, batch: dict) -> dict:
        """Backbone top: global embeddings and token features of both modalities."""
        img_emb, img_tok = self.split.image_top(batch["image"].float())  # [B, D], [B, P, D]
        txt_emb, txt_tok = self.split.text_top(batch["text"].float(), batch["text_mask"])  # [B, D], [B, L, D]
        tmask = self.split.text_mask(batch["text_mask"])  # [B, L]
        return {"img_emb": img_emb, "img_tok": img_tok, "txt_emb": txt_emb, "txt_tok": txt_tok, "tmask": tmask}

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
        out: dict[str, Any] = {"logits": logits, "lambda": torch.stack(lambdas, 1)}
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


class _Feeder:
    """Training batches for the trainer: `(stage, epoch, seed) -> [batch]`.

    In stages where the backbone top is frozen (warm-up, tuning) its outputs are computed once per
    stage — with the weights that stage starts from — and batches carry them instead of trunk
    activations, so a step costs only the fusion and the heads."""

    def __init__(
        self, method: CMAClip, trunk: TrunkSet, labels: torch.Tensor, batch_size: int, frozen_top: set[str]
    ) -> None:
        self.m, self.t, self.y, self.bs, self.frozen_top = method, trunk, labels, batch_size, frozen_top
        self._stage, self._emb = None, None

    def __call__(self, stage, epoch: int, seed: int) -> list[dict]:
        rows = {"has_image": self.t.has_image, "has_text": self.t.has_text, "labels": self.y}
        if stage.name in self.frozen_top:
            if self._stage != stage.name:
                self._stage, self._emb = stage.name, self.m._embed_all(self.t)
            rows.update(self._emb)
        else:
            rows.update({"image": self.t.image, "text": self.t.text, "text_mask": self.t.text_mask})
        order = torch.randperm(len(self.t), generator=torch.Generator().manual_seed(seed))
        return [{k: v[order[s : s + self.bs]] for k, v in rows.items()} for s in range(0, len(order), self.bs)]


def trunk_batches(t: TrunkSet, batch_size: int = 64):
    for s in range(0, len(t), batch_size):
        sl = slice(s, s + batch_size)
        yield {
            "image": t.image[sl],
            "has_image": t.has_image[sl],
            "text": t.text[sl],
            "text_mask": t.text_mask[sl],
            "has_text": t.has_text[sl],
        }


@register_method
class CMAClip(Method):
    """CMA-CLIP: image+text transformer, per-task modality attention, 3-stage training, multi-task."""

    name = "cma-clip"
    Config = CMAClipConfig
    needs_spatial = True

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        c = self.config
        if c.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"cma-clip: optimizer must be adam or adamw, got {c.optimizer!r}")
        if not 0.0 <= c.modality_noise < 1.0:
            raise ConfigError(f"cma-clip: modality_noise must be in [0, 1), got {c.modality_noise}")
        if min(c.width, c.layers, c.heads, c.head_hidden, c.max_text_tokens) < 1:
            raise ConfigError("cma-clip: width, layers, heads, head_hidden and max_text_tokens must be >= 1")
        self.split = make_split(backbone, c.image_blocks, c.text_layers)
        self.tasks: list[str] = []  # task names; the first is the main task (predict_proba)
        self.task_classes: dict[str, list[str]] = {}
        self.model: CMAClipModel | None = None
        self.shapes: dict[str, int] = {}
        self.notes: list[str] = []  # what the last fit/predict said about missing images or texts

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
            tasks = ["label"]
        # the task whose classes are the dataset's main classes comes first
        main = [t for t in tasks if t != "label" and ds.tasks.get(t) == ds.classnames]
        return main[:1] + [t for t in tasks if t not in main[:1]]

    def _classes_of(self, ds: Dataset, task: str) -> list[str]:
        return list(ds.classnames) if task == "label" else list(ds.tasks[task])

    def _labels(self, ds: Dataset, check: bool = True) -> torch.Tensor:
        """[N, K] model-index labels (-1 = none); errors name the column and row of a mismatch."""
        cols = []
        for t in self.tasks:
            if t == "label":
                if ds.multilabel:
                    raise DataError(f"{ds.name}: cma-clip is single-label per task; the data is multi-label")
                y, names = ds.labels(), list(ds.classnames)
            else:
                if t not in ds.tasks:
                    raise DataError(
                        f"{ds.name}: the model was trained with task column {t!r}, which the data lacks "
                        f"(data tasks: {', '.join(ds.tasks) or 'none'})"
                    )
                y, names = ds.task_labels(t), list(ds.tasks[t])
            known = {c: i for i, c in enumerate(self.task_classes[t])}
            remap = np.array([known.get(c, -2) for c in names] + [-1], dtype=np.int64)
            mapped = remap[y]  # y == -1 picks the trailing -1
            bad = np.nonzero(mapped == -2)[0]
            if check and len(bad):
                r = int(bad[0])
                raise DataError(
                    f"{ds.name} row {r} ({ds.items[r].key}): task column {t!r} has label "
                    f"{names[y[r]]!r}, unknown to the model ({len(self.task_classes[t])} classes)"
                )
            cols.append(torch.from_numpy(np.where(mapped == -2, -1, mapped)))
        return torch.stack(cols, 1)

    def provide_trunk(self, ds: Dataset, trunk: TrunkSet) -> None:
        """Reuse trunk activations computed for a pool (e.g. all folds of a benchmark): any dataset
        whose items all come from `ds` is then served by indexing instead of recomputing."""
        self._pool = (trunk, {it.key: i for i, it in enumerate(ds.items)})

    def trunk(self, ds: Dataset) -> TrunkSet:
        pool = getattr(self, "_pool", None)
        if pool is not None and all(it.key in pool[1] for it in ds.items):
            t = pool[0].index([pool[1][it.key] for it in ds.items])
        else:
            t = trunk_features(self.split, ds, self.config.max_text_tokens, cache=self.cache, progress=self.progress)
        both = ~(t.has_image | t.has_text)
        if bool(both.any()):
            r = int(both.nonzero()[0, 0])
            raise DataError(f"{ds.name} row {r} ({ds.items[r].key}): neither an image nor a text")
        self._note_missing(ds, t)
        return t

    def _note_missing(self, ds: Dataset, t: TrunkSet) -> None:
        ni, nt = int((~t.has_image).sum()), int((~t.has_text).sum())
        if ni or nt:
            msg = []
            if ni:
                msg.append(f"{ni} row(s) without an image: their text carries them")
            if nt:
                msg.append(f"{nt} row(s) with an empty text: their image carries them")
            self.notes.append(f"{ds.name}: " + "; ".join(msg))
            if self.progress:
                print(f"note: {self.notes[-1]}", file=sys.stderr)

    # ---- model ---------------------------------------------------------------------------------
    def _build(self, n_patches: int, n_text: int) -> None:
        torch.manual_seed(self.config.seed)
        self.shapes = {"n_patches": n_patches, "n_text": n_text}
        self.model = CMAClipModel(
            self.backbone,
            self.split,
            self.config,
            [len(self.task_classes[t]) for t in self.tasks],
            self.tasks,
            n_patches,
            n_text,
        )

    def _n_patches(self, t: TrunkSet) -> int:
        with torch.no_grad():
            return int(self.split.image_top(t.image[:1].float())[1].shape[1])

    def _stages(self) -> list[Stage]:
        c = self.config
        cma = ["ma.", "heads."] + (
            ["in_proj.", "type_embed", "patch_pos", "encoder."] if c.sequence_attention else ["in_norm."]
        )
        top = ["backbone." + p for p in self.split.top_prefixes()]
        common = dict(weight_decay=c.weight_decay, batch_size=c.batch_size, optimizer=c.optimizer)
        stages = [Stage("warmup", epochs=c.warmup_epochs, lr=c.lr, trainable=cma, **common)]
        if c.e2e_epochs > 0:
            # BatchNorm statistics stay fixed: batches of 32 would replace ImageNet's running stats
            stages.append(
                Stage("end2end", epochs=c.e2e_epochs, lr=c.e2e_lr, trainable=cma + top, bn_eval=True, **common)
            )
        if c.tune_epochs > 0:
            stages.append(Stage("tuning", epochs=c.tune_epochs, lr=c.lr, trainable=["ma.", "heads."], **common))
        return stages

    def fit(self, train: Dataset | Encoded, val: Dataset | Encoded | None = None) -> CMAClip:
        tr = train.dataset if isinstance(train, Encoded) else train
        va = val.dataset if isinstance(val, Encoded) else val
        self.notes = []
        if self.config.e2e_epochs > 0 and self.split.top_prefixes():
            # stage 2 changes the backbone's top in place: train a private copy, never the caller's
            self.backbone = copy.deepcopy(self.backbone)
            self.split = make_split(self.backbone, self.config.image_blocks, self.config.text_layers)
        self.tasks = self._select_tasks(tr)
        self.task_classes = {t: self._classes_of(tr, t) for t in self.tasks}
        for t in self.tasks:
            if len(self.task_classes[t]) < 2:
                raise DataError(f"{tr.name}: task {t!r} needs at least 2 classes, got {len(self.task_classes[t])}")
        self.classnames = list(self.task_classes[self.tasks[0]])
        ytr = self._labels(tr)
        ttr = self.trunk(tr)
        tva = self.trunk(va) if va is not None and len(va) else None
        yva = self._labels(va) if tva is not None else None
        self._build(self._n_patches(ttr), ttr.text.shape[1])
        stages = self._stages()
        frozen_top = {st.name for st in stages if not any(p.startswith("backbone.") for p in st.trainable)}
        current = {"stage": None, "emb": None}

        def enter(stage_name):
            def setup(model):
                current.update(stage=stage_name, emb=None)

            return setup

        for st in stages:
            st.setup = enter(st.name)
        metric = None
        if tva is not None:

            def metric(model):
                emb = None
                if current["stage"] in frozen_top:
                    if current["emb"] is None:
                        current["emb"] = self._embed_all(tva)
                    emb = current["emb"]
                out = self._forward_all(tva, emb=emb)
                accs = {
                    f"acc_{t}": float((z.argmax(-1)[yva[:, k] >= 0] == yva[yva[:, k] >= 0, k]).float().mean())
                    for k, (t, z) in enumerate(zip(self.tasks, out["logits"]))
                    if bool((yva[:, k] >= 0).any())
                }
                return {"mean_acc": float(np.mean(list(accs.values()))), **accs}

        run_dir = self.config.run_dir
        tmp = None
        if run_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="cma-clip-")
            run_dir = tmp.name
        try:
            feeder = _Feeder(self, ttr, ytr, self.config.batch_size, frozen_top)
            result = Trainer(
                self.model,
                feeder,
                None,
                stages,
                metric=metric,
                monitor="mean_acc" if metric else None,
                mode="max" if metric else None,
                out_dir=run_dir,
                seed=self.config.seed,
                progress=self.progress,
                num_threads=self.config.threads,
            ).fit()
        finally:
            if tmp is not None:
                tmp.cleanup()
        self.model = result_model = self.model
        result_model.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.fit_info = {
            "tasks": self.tasks,
            "stages": [vars(s) for s in result.stages],
            "monitor": result.monitor,
            "history": result.history,
            "notes": self.notes,
            "trainable_backbone": self.split.top_prefixes(),
            "n_train": len(tr),
            "n_val": len(va) if va else 0,
        }
        return self

    @torch.no_grad()
    def _embed_all(self, t: TrunkSet) -> dict[str, torch.Tensor]:
        """Backbone-top outputs of every row (eval mode), for stages where the top is frozen."""
        was = self.model.training
        self.model.eval()
        parts = [self.model.embed(b) for b in trunk_batches(t)]
        self.model.train(was)
        out = {}
        for k in EMBED_KEYS:
            xs = [p[k] for p in parts]
            L = max(x.shape[1] for x in xs) if xs[0].dim() > 1 else 0
            if k in ("txt_tok", "tmask") and any(x.shape[1] != L for x in xs):
                xs = [
                    F.pad(x, (0, 0, 0, L - x.shape[1])) if x.dim() == 3 else F.pad(x, (0, L - x.shape[1])) for x in xs
                ]
            out[k] = torch.cat(xs)
        return out

    @torch.no_grad()
    def _forward_all(self, t: TrunkSet, attention: bool = False, emb: dict | None = None) -> dict:
        self.model.eval()
        logits, lambdas = [[] for _ in self.tasks], []
        for i, b in enumerate(trunk_batches(t)):
            if emb is not None:
                b = {
                    **{k: v[i * 64 : (i + 1) * 64] for k, v in emb.items()},
                    "has_image": b["has_image"],
                    "has_text": b["has_text"],
                }
            out = self.model(b)
            for k, z in enumerate(out["logits"]):
                logits[k].append(z)
            lambdas.append(out["lambda"])
        return {"logits": [torch.cat(z) for z in logits], "lambda": torch.cat(lambdas)}

    # ---- prediction ---------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.model is None:
            raise ConfigError("method 'cma-clip' is not fitted; call fit() or load a saved model")

    def _as_dataset(self, data) -> Dataset:
        if isinstance(data, Encoded):
            return data.dataset
        return as_dataset(data, self.classnames)

    def check_tasks(self, ds: Dataset) -> None:
        """Data with task columns must carry the model's tasks with known labels (errors name the column)."""
        if ds.tasks or any(t == "label" for t in self.tasks):
            if any(it.label is not None or it.tasks for it in ds.items):
                self._labels(ds)

    def predict_tasks(self, data, trunk: TrunkSet | None = None) -> dict[str, Any]:
        """{"probs": {task: [N, C_k]}, "lambda": {task: [N]} (image weight), "has_image", "has_text"}."""
        self._check_fitted()
        if trunk is None:
            ds = self._as_dataset(data)
            self.notes = []
            trunk = self.trunk(ds)
        out = self._forward_all(trunk)
        return {
            "probs": {t: torch.softmax(z, -1).numpy() for t, z in zip(self.tasks, out["logits"])},
            "lambda": {t: out["lambda"][:, k].numpy() for k, t in enumerate(self.tasks)},
            "has_image": trunk.has_image.numpy(),
            "has_text": trunk.has_text.numpy(),
        }

    def logits(self, data) -> torch.Tensor:
        self._check_fitted()
        ds = self._as_dataset(data)
        self.notes = []
        return self._forward_all(self.trunk(ds))["logits"][0]

    def task_report(self, ds: Dataset) -> dict[str, dict]:
        """Per task: n, accuracy, recall at 90% precision (metrics.ranking) and the mean image weight λ."""
        from ..metrics.ranking import recall_at_precision

        y = self._labels(ds).numpy()
        out = self.predict_tasks(ds)
        rep = {}
        for k, t in enumerate(self.tasks):
            keep = y[:, k] >= 0
            p = out["probs"][t]
            rap = recall_at_precision(y[:, k], p, 0.9)
            rep[t] = {
                "n": int(keep.sum()),
                "accuracy": float((p[keep].argmax(-1) == y[keep, k]).mean()),
                "recall@90P": rap["recall"],
                "threshold@90P": rap["threshold"],
                "lambda": float(out["lambda"][t].mean()),
                "missing_image": int((~out["has_image"]).sum()),
                "missing_text": int((~out["has_text"]).sum()),
            }
        return rep

    def labels_of(self, ds: Dataset) -> torch.Tensor:
        """[N, K] labels of `ds` in the model's class indices (-1 = none)."""
        return self._labels(ds)

    # ---- explain ----------------------------------------------------------------------------------
    def explain(self, item: Item | str, target: str | None = None, layer: int = -1) -> np.ndarray:
        """[h, w] attention of a text token (`target`, default: the token whose attention is most
        concentrated) over the image patches: the paper's Figure 2, from the sequence attention's
        query/key products in `layer`, averaged over heads and renormalised over the patches."""
        self._check_fitted()
        if not self.config.sequence_attention:
            raise ConfigError("cma-clip: trained without sequence attention; nothing to explain")
        if isinstance(item, str):
            item = Item(image=item, key=item)
        if item.image is None or not (item.text or "").strip():
            raise DataError(
                f"{item.key or 'item'}: cma-clip explains a text token over the image: "
                "give both an image and its text (CLI: --text)"
            )
        t = compute_trunk(self.split, [item], self.config.max_text_tokens, progress=False)
        self.model.eval()
        with torch.no_grad():
            out = self.model({k: v for k, v in next(trunk_batches(t)).items()}, attention=True)
        P = out["n_patches"]
        att = out["attention"][layer][0].mean(0)  # [S, S] averaged over heads
        tokens = self.text_tokens(item.text)
        first_tok = 1 + P + 1
        raw = att[first_tok : first_tok + len(tokens), 1 : 1 + P]  # [L, P]: text token -> image patches
        rows = raw / raw.sum(-1, keepdim=True).clamp_min(1e-12)
        if target is None:  # the content word that looks at the image most
            cand = [i for i, s in enumerate(tokens) if s.isalpha() and len(s) > 2 and s.lower() not in STOPWORDS]
            cand = cand or [i for i, s in enumerate(tokens) if s not in ("[CLS]", "[SEP]", "[PAD]", "")] or [0]
            i = max(cand, key=lambda j: float(raw[j].sum()))
        else:
            want = target.lower()
            matches = [i for i, s in enumerate(tokens) if s.lower().lstrip("#") == want.lstrip("#")]
            if not matches:
                raise DataError(f"explain: token {target!r} is not in the text's tokens {tokens}")
            i = matches[0]
        self.explained_token = tokens[i]
        g = int(math.isqrt(P))
        if g * g != P:
            raise ConfigError(f"cma-clip: {P} image patches do not form a square grid")
        return rows[i].reshape(g, g).numpy()

    def text_tokens(self, text: str) -> list[str]:
        """The token strings the model sees for `text` (after truncation)."""
        batch = self.split.tokenize([text], self.config.max_text_tokens)
        ids = batch["input_ids"][0].tolist()
        tok = getattr(self.backbone, "tokenizer", None)
        if tok is not None:
            return tok.convert_ids_to_tokens(ids)
        words = text.lower().replace(".", " ").split()
        return (words + [""] * len(ids))[: len(ids)]

    # ---- persistence -----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        top = tuple("backbone." + p for p in self.split.top_prefixes())
        sd = self.model.state_dict()
        out = {k: v for k, v in sd.items() if not k.startswith("backbone.") or k.startswith(top)}
        out["_meta.n_patches"] = torch.tensor(self.shapes["n_patches"])
        out["_meta.n_text"] = torch.tensor(self.shapes["n_text"])
        return out

    def extra_config(self) -> dict:
        return {"tasks": {t: self.task_classes[t] for t in self.tasks}}

    def load_extra_config(self, cfg: dict) -> None:
        tasks = cfg.get("tasks") or cfg.get("fit_info", {}).get("task_classes")
        if not tasks:
            raise ConfigError("cma-clip: saved model has no task list (config.json 'tasks')")
        self.tasks = list(tasks)
        self.task_classes = {t: list(c) for t, c in tasks.items()}

    def load_tensors(self, tensors) -> None:
        if not self.tasks:
            raise ConfigError("cma-clip: saved model has no task list (config.json 'tasks')")
        tensors = dict(tensors)
        n_p = int(tensors.pop("_meta.n_patches"))
        n_t = int(tensors.pop("_meta.n_text"))
        self._build(n_p, n_t)
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ConfigError(
                f"cma-clip: saved tensors do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.model.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
