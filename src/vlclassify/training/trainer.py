"""The one training loop: every method that optimises parameters trains here.

    stages = [Stage("warmup", epochs=5, lr=1e-3, trainable=["fusion.", "heads."]),
              Stage("finetune", steps=2000, eval_every=250, lr=1e-5, warmup_steps=50)]
    result = Trainer(model, train, val, stages, metric=accuracy, monitor="acc", out_dir="runs/x").fit()

Why it exists: every paper here trains in stages (freeze, unfreeze, re-freeze), picks the best
checkpoint on validation, and must survive being killed. The model is any nn.Module whose forward
takes a batch and returns a dict with a scalar "loss" (other 0-d "loss_*" entries are logged).

- Length: a stage runs `epochs` passes over the data, or exactly `steps` optimizer steps (CMM's
  16,000); validation and checkpoints happen every `eval_every` steps (default: every epoch, or
  once at the end of a step-sized stage). Each such span is a *round*.
- Schedule: sized in optimizer steps and stepped once per step (the public DiCLS code sized it in
  epochs and stepped per batch): `warmup_steps` of linear warm-up, then constant / cosine /
  linear decay to `min_lr`.
- Keep-best: a round is kept when it scores at least as well as the best so far, so ties go to
  the later round (training/selection.py's rule, whose default here is the last round: what a
  stage without validation ends on); the stage's starting weights (round 0) are kept only when
  no round matches them. `keep="last"` ends on the last round.
- Seeds: the batch order of every epoch comes from an explicit generator, and each round trains
  under `utils.seeded(...)` (dropout draws), so a run is reproducible and resumable and the
  caller's global RNG is left as it was.
- Threads: `utils.torch_threads` (the package's one thread policy) around the whole fit.
- Checkpoints: safetensors (tensors) plus JSON (everything else), written atomically at the end
  of every round; `last.json` is the single pointer to the current one, so a crash at any moment
  leaves a consistent state, and a re-run resumes bit-identically.
- Processes: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
  and every global batch of `batch_size` rows is split across the ranks (map-style data: a
  DistributedSampler with batch_size / world rows per rank), so one and N processes take the
  same optimizer steps on the same global batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..utils import atomic_path, json_fingerprint, seeded, torch_threads, write_json
from .selection import TIE_TOLERANCE

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

Trainable = Sequence[str] | Callable[[str], bool] | None
SCHEDULES = ("constant", "cosine", "linear")
Collate = Callable[[list[Any]], Any]  # a DataLoader's collate_fn: rows -> one batch


class MapStyleData(Protocol):
    """A map-style dataset (torch's `Dataset`, a list, ...): rows that `collate` batches."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


@dataclass
class Stage:
    """One training stage: which parameters move, for how long, how fast."""

    name: str  # unique within a run; used in logs and checkpoint names
    epochs: int = 1  # passes over the training data (ignored when `steps` is set)
    steps: int | None = None  # optimizer steps of the stage; overrides `epochs`
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # where the cosine / linear decay ends
    trainable: Trainable = None  # None = all params; list of name prefixes; or predicate(name) -> bool
    weight_decay: float = 1e-4  # Adam(W) weight decay
    batch_size: int = 32  # global batch (rows per optimizer step, split across processes under torchrun)
    # adamw (decoupled decay) | adam (L2 added to the gradient, as torch.optim.Adam) | sgd (full-batch
    # solvers whose step sizes come from the data, e.g. LP++'s Lipschitz bounds)
    optimizer: str = "adamw"
    momentum: float = 0.0  # sgd's heavy-ball momentum (LP++: 0.9)
    eps: float = 1e-8  # Adam(W) epsilon (Tip-Adapter-F: 1e-4)
    schedule: str = "cosine"  # constant | cosine | linear
    warmup_steps: int = 0  # optimizer steps of linear LR warm-up at the start of the stage
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    eval_every: int | None = None  # steps between validations + checkpoints (None: every epoch; end of a steps stage)
    keep: str = "best"  # best | last: the weights that end the stage (and start the next one)
    eval_frozen: bool = True  # put fully frozen sub-modules in eval mode (BatchNorm stats/dropout stay fixed)
    bn_eval: bool = False  # keep every BatchNorm in eval mode (fixed running stats), e.g. small-batch fine-tuning
    setup: Callable[[nn.Module], None] | None = None  # called on the bare model when the stage (re)starts
    train: Data | None = None  # per-stage training data, overriding the trainer's (e.g. cached features vs images)
    val: Data | None = None  # per-stage validation data, overriding the trainer's
    collate: Collate | None = None  # per-stage collate, overriding the trainer's

    def fingerprint(self) -> dict[str, Any]:
        """The settings that must not change between a killed run and its resumption."""
        t = self.trainable
        trainable = None if t is None else (list(t) if not callable(t) else getattr(t, "__qualname__", "callable"))
        keys = (
            "name",
            "epochs",
            "steps",
            "lr",
            "min_lr",
            "weight_decay",
            "batch_size",
            "optimizer",
            "momentum",
            "eps",
            "schedule",
            "warmup_steps",
            "eval_every",
            "keep",
            "bn_eval",
        )
        return {**{k: getattr(self, k) for k in keys}, "trainable": trainable}

    def is_trainable(self, name: str) -> bool:
        """Whether this stage trains the parameter called `name` (see `trainable`)."""
        t = self.trainable
        if t is None:
            return True
        if callable(t):
            return bool(t(name))
        if isinstance(t, str):
            raise ConfigError(f"stage {self.name!r}: trainable must be a list of prefixes, not the string {t!r}")
        return any(name.startswith(p) for p in t)

    def check(self) -> None:
        """Refuse impossible settings by name before any training starts."""
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0 or (self.steps is not None and self.steps < 0):
            raise ConfigError(f"stage {self.name!r}: epochs >= 0, steps >= 0, batch_size >= 1 and lr >= 0 required")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"stage {self.name!r}: optimizer must be adam, adamw or sgd, got {self.optimizer!r}")
        if self.keep not in ("best", "last"):
            raise ConfigError(f"stage {self.name!r}: keep must be best or last, got {self.keep!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown LR schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0 or (self.eval_every is not None and self.eval_every < 1):
            raise ConfigError(f"stage {self.name!r}: warmup_steps >= 0 and eval_every >= 1 required")

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of a stage of `total` steps."""
        w = self.warmup_steps
        if w > 0 and step < w:
            return self.lr * (step + 1) / w
        if self.schedule == "constant":
            return self.lr
        t = min(1.0, (step - w) / max(1, total - w))
        f = 0.5 * (1.0 + math.cos(math.pi * t)) if self.schedule == "cosine" else 1.0 - t
        return self.min_lr + (self.lr - self.min_lr) * f


BatchFn = Callable[[Stage, int, int], Iterable[Any]]  # (stage, epoch, seed) -> that epoch's global batches
Data = MapStyleData | BatchFn  # what a Trainer (or a Stage) trains or validates on


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`; leave everything else alone."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def shard_rows(batch: Any, rank: int, world: int) -> Any:
    """This rank's share of a global batch: rows rank, rank + world, ... of every tensor (or list)
    whose length is the batch's row count (the first tensor's), other values unchanged. A batch
    object with its own `shard(rank, world)` method decides for itself."""
    if hasattr(batch, "shard"):
        return batch.shard(rank, world)
    if world == 1:
        return batch
    if not isinstance(batch, Mapping):
        raise ConfigError("trainer: under torchrun, batches must be dicts of row-aligned tensors (or have .shard())")
    rows = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    if rows is None:
        return batch
    if rows < world:
        raise ConfigError(f"trainer: a batch of {rows} row(s) cannot be shared by {world} processes")
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows:
            out[k] = v[rank::world]
        elif isinstance(v, list) and len(v) == rows:
            out[k] = v[rank::world]
        else:
            out[k] = v
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _dist() -> tuple[int, int, bool]:
    """(rank, world size, distributed?) — initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


@dataclass
class StageResult:
    """What one stage of a fit kept: its chosen round and that round's validation value."""

    name: str
    best_metric: float | None  # validation value of the kept weights (None without validation)
    best_epoch: int  # round (epoch, or eval_every span) of the kept weights; 0 = the stage's start
    best_step: int  # optimizer step of the kept weights
    rounds: int  # rounds run


@dataclass
class TrainResult:
    """What `Trainer.fit` returns: per stage what it kept, and the whole log."""

    stages: list[StageResult]
    history: list[dict[str, Any]]  # one record per round, as in log.jsonl
    monitor: str  # the validation key that chose the kept checkpoints


class Trainer:
    """Run `stages` in order; each starts from the previous stage's kept (best or last) weights.

    train / val: a map-style dataset (`__len__` + `__getitem__`, batched here with `collate`) or a
    callable `(stage, epoch, seed) -> iterable of global batches` (its `len()` sizes an epoch).
    metric: `metric(model) -> {name: value}` evaluated on the bare model in eval mode under no_grad;
    `monitor` names the value that picks the kept round (`mode` max or min). Without `metric` the
    trainer computes the mean validation "loss" and monitors it with mode "min". Without
    validation data a stage keeps its last round.
    out_dir: where checkpoints and `log.jsonl` go; None keeps the best weights in memory only
    (no resume). A run with an existing `last.json` resumes from it when `resume` is True.
    threads: torch intra-op threads during fit (utils.torch_threads: 0 = auto from `work`, a rough
    multiply-add count per step; None = leave as is).
    find_unused_parameters: DDP's search for parameters a step did not use (on by default: heads
    skip some, e.g. the key bias that attention's softmax cancels; the search is cheap for them).
    """

    def __init__(
        self,
        model: nn.Module,
        train: Data | None,
        val: Data | None = None,
        stages: Sequence[Stage] = (),
        *,
        collate: Collate | None = None,
        metric: Callable[[nn.Module], Mapping[str, float]] | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = True,
        resume: bool = True,
        num_workers: int = 0,
        find_unused_parameters: bool = True,
        callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
        threads: int | None = None,
        work: int | None = None,
    ) -> None:
        if not stages:
            raise ConfigError("trainer: give at least one Stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"trainer: stage names must be unique, got {names}")
        for s in stages:
            s.check()
        self.model, self.train, self.val, self.stages = model, train, val, list(stages)
        self.collate, self.metric = collate, metric
        monitor = monitor or ("loss" if metric is None else None)
        if monitor is None:
            raise ConfigError("trainer: with a metric callback, say which of its values to monitor (monitor=...)")
        self.monitor: str = monitor
        self.mode = mode or ("min" if metric is None else "max")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"trainer: mode must be min or max, got {self.mode!r}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed, self.progress, self.resume = seed, progress, resume
        self.num_workers = num_workers
        self.find_unused_parameters, self.callbacks = find_unused_parameters, list(callbacks)
        self.threads, self.work = threads, work
        self.rank, self.world, self.distributed = _dist()
        if device is None:
            cuda = torch.cuda.is_available() and self.distributed
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device)
        names_all = [n for n, _ in self.model.named_parameters()]
        for s in self.stages:
            if s.trainable is not None and not any(s.is_trainable(n) for n in names_all):
                raise ConfigError(f"stage {s.name!r}: no parameter matches trainable={s.trainable!r}")
        # parameters frozen in every stage never change: checkpoints leave them out
        self._saved = {n for n in names_all if any(s.is_trainable(n) for s in self.stages)}
        self.history: list[dict[str, Any]] = []
        self._mem: dict[str, dict[str, torch.Tensor]] = {}  # stage -> kept weights (no out_dir)

    # ---- helpers -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes checkpoints and logs."""
        return self.rank == 0

    def _seed(self, stage_idx: int, kind: int, index: int) -> int:
        """Data order of epoch `index` (kind 0) or the RNG of round `index` (kind 1)."""
        return (self.seed * 1_000_003 + stage_idx * 10_007 + kind * 7_919 + index) % (2**31 - 1)

    def _run_fingerprint(self) -> str:
        return json_fingerprint(
            {
                "stages": [s.fingerprint() for s in self.stages],
                "seed": self.seed,
                "monitor": self.monitor,
                "mode": self.mode,
            }
        )

    def _at_least_as_good(self, value: float | None, best: float | None) -> bool:
        """Ties go to the later round: the one selection rule (training/selection.py) with the
        no-validation choice, the last round, as the default."""
        if value is None or not math.isfinite(value):
            return best is None
        if best is None or not math.isfinite(best):
            return True
        return value >= best - TIE_TOLERANCE if self.mode == "max" else value <= best + TIE_TOLERANCE

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        sd = unwrap(self.model).state_dict()
        params = {n for n, _ in unwrap(self.model).named_parameters()}
        return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items() if k not in params or k in self._saved}

    def _load_model_tensors(self, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        missing, unexpected = unwrap(self.model).load_state_dict(dict(tensors), strict=False)
        params = dict(unwrap(self.model).named_parameters())
        missing = [k for k in missing if k in self._saved or k not in params]
        if missing or unexpected:
            raise ConfigError(
                f"{where}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )

    def _loader(
        self, data: Data | None, stage: Stage, stage_idx: int, epoch: int, shuffle: bool, collate: Collate | None
    ) -> list[Any] | DataLoader[Any] | _Shares:
        """The (global) batches of one epoch, this rank's share of each."""
        seed = self._seed(stage_idx, 0, epoch)
        if callable(data) and not hasattr(data, "__getitem__"):
            return _Shares(data(stage, epoch, seed), self.rank, self.world)
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise ConfigError(
                "trainer: data must be a map-style dataset (__len__ + __getitem__) or a callable(stage, epoch, seed)"
            )
        from torch.utils.data import DataLoader, Dataset, DistributedSampler

        rows = cast(Dataset[Any], data)  # torch types it as a Dataset; it only reads __len__ and __getitem__
        g = torch.Generator().manual_seed(seed)
        sampler: DistributedSampler[Any] | None = None
        if self.distributed:
            if stage.batch_size % self.world:
                raise ConfigError(
                    f"stage {stage.name!r}: batch_size {stage.batch_size} is not divisible by {self.world} processes"
                )
            sampler = DistributedSampler(rows, num_replicas=self.world, rank=self.rank, shuffle=shuffle, seed=seed)
            sampler.set_epoch(epoch)
        return DataLoader(
            rows,
            batch_size=stage.batch_size // self.world,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            generator=g,
            drop_last=False,
        )

    def _batches(
        self, data: Data | None, stage: Stage, si: int, collate: Collate | None, spe: int, start: int
    ) -> Iterator[Any]:
        """Training batches from optimizer step `start` on, epoch after epoch."""
        epoch, skip = divmod(start, spe)
        while True:
            for i, batch in enumerate(self._loader(data, stage, si, epoch, True, collate)):
                if i >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0

    def _set_trainable(self, stage: Stage) -> list[tuple[str, nn.Parameter]]:
        model = unwrap(self.model)
        params = []
        for n, p in model.named_parameters():
            p.requires_grad_(stage.is_trainable(n))
            if p.requires_grad:
                params.append((n, p))
        return params

    def _train_mode(self, stage: Stage) -> None:
        model = unwrap(self.model)
        model.train()
        for _, m in model.named_modules():
            ps = list(m.parameters())
            if stage.eval_frozen and m is not model and ps and not any(p.requires_grad for p in ps):
                m.eval()
            if stage.bn_eval and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def _optimizer(self, stage: Stage, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        if stage.optimizer == "sgd":
            return torch.optim.SGD(
                [p for _, p in params], lr=stage.lr, weight_decay=stage.weight_decay, momentum=stage.momentum
            )
        cls = torch.optim.AdamW if stage.optimizer == "adamw" else torch.optim.Adam
        kw: dict[str, Any] = dict(lr=stage.lr, weight_decay=stage.weight_decay, eps=stage.eps)
        try:  # one fused kernel per step: CMM's 16,000 tiny steps spend most of their time here otherwise
            return cls([p for _, p in params], fused=True, **kw)
        except (RuntimeError, TypeError):
            return cls([p for _, p in params], **kw)

    # ---- checkpoints ---------------------------------------------------------------------
    def _save_checkpoint(self, tag: str, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> str:
        """Write ckpt/<tag>/{model,optimizer}.safetensors + state.json as one atomic directory."""
        assert self.out_dir is not None
        rel = f"ckpt/{tag}"
        with atomic_path(self.out_dir / rel, is_dir=True) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            save_file(self._model_tensors(), str(tmp / "model.safetensors"))
            if optimizer is not None:
                tensors, meta = _flatten_optimizer(optimizer.state_dict())
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                state = {**state, "optimizer": meta}
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        return rel

    def _write_pointer(self, pointer: dict[str, Any]) -> None:
        assert self.out_dir is not None
        write_json(self.out_dir / "last.json", pointer)
        keep = {pointer["last"], *pointer["best"].values()}
        ck = self.out_dir / "ckpt"
        for d in ck.iterdir() if ck.is_dir() else ():
            if d.is_dir() and not d.name.startswith(".") and f"ckpt/{d.name}" not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def _read_checkpoint(self, rel: str, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        assert self.out_dir is not None
        d = self.out_dir / rel
        if not (d / "model.safetensors").is_file():
            raise ConfigError(f"{d}: checkpoint missing (was the run directory edited?)")
        state: dict[str, Any] = json.loads((d / "state.json").read_text())
        self._load_model_tensors(load_file(str(d / "model.safetensors"), device=str(self.device)), str(d))
        if optimizer is not None and (d / "optimizer.safetensors").is_file():
            sd = _unflatten_optimizer(
                load_file(str(d / "optimizer.safetensors"), device=str(self.device)), state["optimizer"]
            )
            optimizer.load_state_dict(sd)
        return state

    def _keep(self, stage: str, pointer: dict[str, Any], rel: str | None) -> None:
        """Remember the current weights as the ones this stage keeps."""
        if self.out_dir is not None and rel is not None:
            pointer["best"][stage] = rel
        else:
            self._mem[stage] = self._model_tensors()

    def _restore_kept(self, stage: str, pointer: dict[str, Any]) -> None:
        if self.out_dir is not None and stage in pointer["best"]:
            self._read_checkpoint(pointer["best"][stage], None)
        elif stage in self._mem:
            self._load_model_tensors(self._mem[stage], f"stage {stage}")

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- validation ----------------------------------------------------------------------
    def _validate(self, val: Data | None, stage: Stage, stage_idx: int, collate: Collate | None) -> dict[str, float]:
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        with torch.no_grad():
            if self.metric is not None:
                out = {k: float(v) for k, v in dict(self.metric(model)).items()}
                if self.monitor not in out:
                    raise ConfigError(f"trainer: metric returned {sorted(out)}, no {self.monitor!r} to monitor")
            elif val is not None:
                total, n = 0.0, 0
                for batch in self._loader(val, stage, stage_idx, 0, False, collate):
                    loss = model(to_device(batch, self.device))["loss"]
                    total, n = total + float(loss), n + 1
                out = {"loss": total / max(1, n)}
        model.train(was_training)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run every stage (resuming a killed run from `out_dir`) and end on the last stage's kept weights."""
        # stages flip requires_grad; the caller's flags (e.g. a frozen backbone) come back afterwards
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        try:
            with torch_threads(self.threads, self.work) if self.threads is not None else _nothing():
                return self._fit()
        finally:
            for p in self.model.parameters():
                p.requires_grad_(flags.get(id(p), True))

    def _fit(self) -> TrainResult:
        fp = self._run_fingerprint()
        pointer: dict[str, Any] = {
            "run": fp,
            "stage": 0,
            "step": 0,
            "last": None,
            "best": {},
            "best_metric": {},
            "best_round": {},
            "best_step": {},
            "rounds": {},
        }
        resumed = False
        if self.out_dir is not None and self.resume and (self.out_dir / "last.json").is_file():
            old = json.loads((self.out_dir / "last.json").read_text())
            if old.get("run") != fp:
                raise ConfigError(
                    f"{self.out_dir}: holds a run with different stages/seed; use a new out_dir or resume=False"
                )
            pointer, resumed = old, True
        elif self.out_dir is not None and self.is_main and (self.out_dir / "log.jsonl").exists():
            (self.out_dir / "log.jsonl").unlink()
        if resumed and self.out_dir is not None and (self.out_dir / "log.jsonl").is_file():
            lines = (self.out_dir / "log.jsonl").read_text().splitlines()
            self.history = [json.loads(line) for line in lines if line.strip()]
        for si, stage in enumerate(self.stages):
            if si >= pointer["stage"]:
                self._run_stage(si, stage, pointer, resumed and si == pointer["stage"])
        # end on the final stage's kept weights (read on rank 0, then copied to every rank)
        self.model = unwrap(self.model)
        if self.is_main:
            self._restore_kept(self.stages[-1].name, pointer)
        self._sync_from_main()
        self.model.eval()
        results = [
            StageResult(
                s.name,
                pointer["best_metric"].get(s.name),
                pointer["best_round"].get(s.name, 0),
                pointer["best_step"].get(s.name, 0),
                pointer["rounds"].get(s.name, 0),
            )
            for s in self.stages
        ]
        return TrainResult(results, self.history, self.monitor)

    def _sync_from_main(self) -> None:
        """Copy rank 0's weights and buffers to every rank (no shared filesystem needed)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for v in unwrap(self.model).state_dict().values():
            dist.broadcast(v.data, src=0)

    def _steps_per_epoch(self, stage: Stage, si: int, train: Data | None, collate: Collate | None) -> int:
        try:
            return max(1, len(self._loader(train, stage, si, 0, True, collate)))
        except TypeError:
            raise ConfigError(f"stage {stage.name!r}: the training batches have no len()") from None

    def _run_stage(self, si: int, stage: Stage, pointer: dict[str, Any], resuming: bool) -> None:
        train = stage.train if stage.train is not None else self.train
        val = stage.val if stage.val is not None else self.val
        collate = stage.collate if stage.collate is not None else self.collate
        self.model = unwrap(self.model)
        if stage.setup is not None:
            stage.setup(self.model)
        params = self._set_trainable(stage)
        optimizer = self._optimizer(stage, params)
        spe = self._steps_per_epoch(stage, si, train, collate)
        total = stage.steps if stage.steps is not None else spe * stage.epochs
        every = stage.eval_every or (spe if stage.steps is None else max(1, total))
        step = 0
        if resuming and pointer["step"] > 0 and pointer["last"] is not None:
            step = self._read_checkpoint(pointer["last"], optimizer)["step"]
        elif si > 0 and self.is_main:  # other ranks receive these weights when DDP wraps the model
            self._restore_kept(self.stages[si - 1].name, pointer)
        model: nn.Module = self.model
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=self.find_unused_parameters
            )
        self.model = model
        has_val = val is not None or self.metric is not None
        if step == 0 and (total == 0 or (has_val and stage.keep == "best")):
            # the stage's starting weights compete too: a stage that only hurts keeps them
            self._round_end(si, stage, val, collate, optimizer, pointer, 0, 0, {}, None, has_val, total)
        batches = self._batches(train, stage, si, collate, spe, step)
        bar = tqdm(
            total=total, initial=step, desc=stage.name, leave=False, disable=not (self.progress and self.is_main)
        )
        while step < total:
            rnd = step // every
            end = min(total, (rnd + 1) * every)
            t0, n = time.time(), 0
            sums: dict[str, float] = {}
            with seeded(self._seed(si, 1, rnd)):
                self._train_mode(stage)
                while step < end:
                    lr = stage.lr_at(step, total)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    out = model(to_device(next(batches), self.device))
                    loss = out["loss"]
                    if not torch.isfinite(loss):
                        raise ConfigError(
                            f"stage {stage.name!r} step {step}: loss is {float(loss.detach())}; lower the lr"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if stage.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_([p for _, p in params], stage.grad_clip)
                    optimizer.step()
                    step, n = step + 1, n + 1
                    for k, v in out.items():
                        if k.startswith("loss") and isinstance(v, torch.Tensor) and v.dim() == 0:
                            sums[k] = sums.get(k, 0.0) + float(v.detach())
                    bar.update(1)
            logs = {f"train_{k}": v / max(1, n) for k, v in sums.items()}
            if self.distributed:
                logs = _mean_over_ranks(logs)
            self._round_end(si, stage, val, collate, optimizer, pointer, rnd + 1, step, logs, t0, has_val, total)
        bar.close()
        # the next stage starts fresh from this one's kept weights
        pointer.update({"stage": si + 1, "step": 0})
        if self.out_dir is not None and self.is_main:
            self._write_pointer(pointer)
        if self.distributed:
            pointer.update(self._broadcast(pointer))

    def _round_end(
        self,
        si: int,
        stage: Stage,
        val: Data | None,
        collate: Collate | None,
        optimizer: torch.optim.Optimizer,
        pointer: dict[str, Any],
        rnd: int,
        step: int,
        logs: dict[str, float],
        t0: float | None,
        has_val: bool,
        total: int,
    ) -> None:
        """Validate, keep the round if it is the best (or the last), checkpoint, log."""
        vals = self._validate(val, stage, si, collate) if (has_val and self.is_main) else {}
        vals = self._broadcast(vals)
        value = vals.get(self.monitor) if has_val else None
        best = pointer["best_metric"].get(stage.name)
        if stage.keep == "last" or not has_val:
            keep = step == total
        else:
            keep = stage.name not in pointer["best_round"] or self._at_least_as_good(value, best)
        if keep:
            pointer["best_metric"][stage.name] = value
            pointer["best_round"][stage.name] = rnd
            pointer["best_step"][stage.name] = step
        pointer["rounds"][stage.name] = rnd
        record = {
            "stage": stage.name,
            "epoch": rnd,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            **logs,
            **{f"val_{k}": v for k, v in vals.items()},
            "best": keep,
            "time_s": round(time.time() - t0, 3) if t0 else 0.0,
        }
        if self.is_main:
            rel = None
            if self.out_dir is not None:
                state = {
                    "stage": si,
                    "stage_name": stage.name,
                    "epoch": rnd,
                    "step": step,
                    "seed": self.seed,
                    "best_metric": pointer["best_metric"].get(stage.name),
                    "monitor": self.monitor,
                }
                rel = self._save_checkpoint(f"{si}-{stage.name}-s{step}", optimizer, state)
                pointer.update({"stage": si, "step": step, "last": rel})
            if keep:
                self._keep(stage.name, pointer, rel)
            if self.out_dir is not None:
                self._write_pointer(pointer)
            if rnd > 0:
                self._log(record)
        elif rnd > 0:
            self.history.append(record)
        if self.distributed:
            pointer.update(self._broadcast(pointer))
        if rnd > 0:
            for cb in self.callbacks:
                cb(record)


class _Shares:
    """An epoch's global batches, each cut to this rank's share as it is reached (not all at once:
    a lazy batch, e.g. features.stream.RowBatch, is read only then)."""

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return (shard_rows(b, self.rank, self.world) for b in self.batches)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _mean_over_ranks(logs: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(logs)
    t = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [dict(g.items()) for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def stage_from_dict(d: Mapping[str, Any]) -> Stage:
    """Build a Stage from a JSON/CLI mapping, rejecting unknown keys by name."""
    fields = {f.name for f in dataclasses.fields(Stage)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"stage: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    return Stage(**d)
