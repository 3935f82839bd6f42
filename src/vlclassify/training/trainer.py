"""A small multi-stage trainer shared by the trainable methods (CMA-CLIP, DiCLS, iCAR).

    stages = [Stage("warmup", epochs=5, lr=1e-3, trainable=["fusion.", "heads."]),
              Stage("finetune", epochs=2, lr=1e-5)]
    result = Trainer(model, train_ds, val_ds, stages, collate=collate, metric=accuracy,
                     out_dir="runs/x").fit()

Why it exists: every paper here trains in stages (freeze, unfreeze, re-freeze), picks the best
epoch on validation, and must survive being killed. The model is any nn.Module whose forward
takes a collated batch and returns a dict with a scalar "loss" (other 0-d "loss_*" entries are
logged). The LR schedule is sized in optimizer steps and stepped once per step (the public
DiCLS code sized it in epochs and stepped per batch). Checkpoints are safetensors (tensors)
plus JSON (everything else), written atomically; `last.json` is the single pointer that says
which checkpoint is current, so a crash at any moment leaves a consistent state to resume from.
Under `torchrun` (WORLD_SIZE > 1) it wraps the model in DistributedDataParallel and shards the
data with a DistributedSampler; launched as a plain process it runs single-process unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..utils import atomic_path, json_fingerprint, seed_everything, write_json

Trainable = Sequence[str] | Callable[[str], bool] | None


@dataclass
class Stage:
    """One training stage: which parameters move, for how long, how fast."""

    name: str  # unique within a run; used in logs and checkpoint names
    epochs: int = 1  # passes over the training data
    lr: float = 1e-3  # peak learning rate
    trainable: Any = None  # None = all params; list of name prefixes; or predicate(name) -> bool
    weight_decay: float = 1e-4  # Adam(W) weight decay
    batch_size: int = 32  # per process (global batch = batch_size * world size)
    optimizer: str = "adamw"  # adamw (decoupled decay) | adam (L2 added to the gradient, as torch.optim.Adam)
    schedule: str = "cosine"  # constant | cosine | linear (decay to 0 over the stage's steps)
    warmup: float = 0.0  # fraction of the stage's steps with a linear LR warm-up
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    start_from: str = "best"  # best | last: weights the stage starts from (of the previous stage)
    eval_frozen: bool = True  # put fully frozen sub-modules in eval mode (BatchNorm stats/dropout stay fixed)
    bn_eval: bool = False  # keep every BatchNorm in eval mode (fixed running stats), e.g. small-batch fine-tuning
    setup: Callable[[nn.Module], None] | None = None  # called on the bare model when the stage (re)starts
    train: Any = None  # per-stage training data, overriding the trainer's (e.g. cached features vs images)
    val: Any = None  # per-stage validation data, overriding the trainer's
    collate: Callable | None = None  # per-stage collate, overriding the trainer's

    def fingerprint(self) -> dict:
        """The settings that must not change between a killed run and its resumption."""
        t = self.trainable
        trainable = None if t is None else (list(t) if not callable(t) else getattr(t, "__qualname__", "callable"))
        return {
            "name": self.name,
            "epochs": self.epochs,
            "lr": self.lr,
            "trainable": trainable,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "warmup": self.warmup,
            "start_from": self.start_from,
            "bn_eval": self.bn_eval,
        }

    def is_trainable(self, name: str) -> bool:
        t = self.trainable
        if t is None:
            return True
        if callable(t):
            return bool(t(name))
        if isinstance(t, str):
            raise ConfigError(f"stage {self.name!r}: trainable must be a list of prefixes, not the string {t!r}")
        return any(name.startswith(p) for p in t)


def lr_factor(schedule: str, step: int, total: int, warmup_steps: int) -> float:
    """Multiplier of the peak LR before optimizer step `step` (0-based) of a stage of `total` steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - t
    raise ConfigError(f"unknown LR schedule {schedule!r}; known: constant, cosine, linear")


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


def unwrap(model: nn.Module) -> nn.Module:
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
    name: str
    best_metric: float | None
    best_epoch: int
    epochs_run: int


@dataclass
class TrainResult:
    stages: list[StageResult]
    history: list[dict]  # one record per epoch, as in log.jsonl
    monitor: str  # the validation key that chose the best checkpoints


class Trainer:
    """Run `stages` in order; each starts from the previous stage's best (or last) weights.

    train / val: a map-style dataset (`__len__` + `__getitem__`, batched here with `collate`) or a
    callable `(stage, epoch, seed) -> iterable of batches` for custom batching (its `len()` is used
    to size the schedule if it has one, else `steps_per_epoch` must be given).
    metric: `metric(model) -> {name: value}` evaluated on the bare model in eval mode under no_grad;
    `monitor` names the value that picks the best epoch (`mode` max or min). Without `metric` the
    trainer computes the mean validation "loss" and monitors it with mode "min". Without
    validation data the last epoch of a stage counts as its best.
    out_dir: where checkpoints and `log.jsonl` go; None keeps the best weights in memory only
    (no resume). A run with an existing `last.json` resumes from it when `resume` is True.
    num_threads: torch intra-op threads during fit (1 is often fastest for small models on busy CPUs).
    """

    def __init__(
        self,
        model: nn.Module,
        train: Any,
        val: Any = None,
        stages: Sequence[Stage] = (),
        *,
        collate: Callable | None = None,
        metric: Callable[[nn.Module], Mapping[str, float]] | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        out_dir: str | os.PathLike | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = True,
        resume: bool = True,
        num_workers: int = 0,
        steps_per_epoch: int | None = None,
        find_unused_parameters: bool = False,
        callbacks: Sequence[Callable[[dict], None]] = (),
        num_threads: int | None = None,
    ) -> None:
        if not stages:
            raise ConfigError("trainer: give at least one Stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"trainer: stage names must be unique, got {names}")
        for s in stages:
            if s.epochs < 0 or s.batch_size < 1 or s.lr < 0:
                raise ConfigError(f"stage {s.name!r}: epochs >= 0, batch_size >= 1 and lr >= 0 required")
            if s.optimizer not in ("adam", "adamw"):
                raise ConfigError(f"stage {s.name!r}: optimizer must be adam or adamw, got {s.optimizer!r}")
            if s.start_from not in ("best", "last"):
                raise ConfigError(f"stage {s.name!r}: start_from must be best or last, got {s.start_from!r}")
            lr_factor(s.schedule, 0, 1, 0)
        self.model, self.train, self.val, self.stages = model, train, val, list(stages)
        self.collate, self.metric = collate, metric
        self.monitor = monitor or ("loss" if metric is None else None)
        if self.monitor is None:
            raise ConfigError("trainer: with a metric callback, say which of its values to monitor (monitor=...)")
        self.mode = mode or ("min" if metric is None else "max")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"trainer: mode must be min or max, got {self.mode!r}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed, self.progress, self.resume = seed, progress, resume
        self.num_workers, self.steps_per_epoch = num_workers, steps_per_epoch
        self.find_unused_parameters, self.callbacks = find_unused_parameters, list(callbacks)
        self.num_threads = num_threads
        self.rank, self.world, self.distributed = _dist()
        if device is None:
            device = (
                f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                if torch.cuda.is_available() and self.distributed
                else "cpu"
            )
        self.device = torch.device(device)
        self.model.to(self.device)
        names_all = [n for n, _ in self.model.named_parameters()]
        for s in self.stages:
            if s.trainable is not None and not any(s.is_trainable(n) for n in names_all):
                raise ConfigError(f"stage {s.name!r}: no parameter matches trainable={s.trainable!r}")
        # parameters frozen in every stage never change: checkpoints leave them out
        self._saved = {n for n in names_all if any(s.is_trainable(n) for s in self.stages)}
        self.history: list[dict] = []
        self._mem_best: dict[str, dict[str, torch.Tensor]] = {}

    # ---- helpers -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _epoch_seed(self, stage_idx: int, epoch: int) -> int:
        return (self.seed * 1_000_003 + stage_idx * 10_007 + epoch) % (2**31 - 1)

    def _run_fingerprint(self) -> str:
        return json_fingerprint(
            {
                "stages": [s.fingerprint() for s in self.stages],
                "seed": self.seed,
                "world": self.world,
                "monitor": self.monitor,
                "mode": self.mode,
            }
        )

    def _better(self, value: float, best: float | None) -> bool:
        if best is None or not math.isfinite(best):
            return math.isfinite(value) or best is None
        return value > best if self.mode == "max" else value < best

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        sd = unwrap(self.model).state_dict()
        params = {n for n, _ in unwrap(self.model).named_parameters()}
        return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items() if k not in params or k in self._saved}

    def _load_model_tensors(self, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        missing, unexpected = unwrap(self.model).load_state_dict(dict(tensors), strict=False)
        missing = [k for k in missing if k in self._saved or k not in dict(unwrap(self.model).named_parameters())]
        if missing or unexpected:
            raise ConfigError(
                f"{where}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )

    def _loader(self, data: Any, stage: Stage, stage_idx: int, epoch: int, shuffle: bool, collate: Callable | None):
        seed = self._epoch_seed(stage_idx, epoch)
        if callable(data) and not hasattr(data, "__getitem__"):
            batches = data(stage, epoch, seed)
            if self.distributed:  # every rank builds the same list (same seed): take every world-th batch
                batches = list(batches)
                n = len(batches) // self.world * self.world
                if n == 0:
                    raise ConfigError(
                        f"stage {stage.name!r}: {len(batches)} batch(es) cannot be shared by {self.world} processes"
                    )
                batches = batches[self.rank : n : self.world]
            return batches
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise ConfigError(
                "trainer: data must be a map-style dataset (__len__ + __getitem__) or a callable(stage, epoch, seed)"
            )
        from torch.utils.data import DataLoader, DistributedSampler

        g = torch.Generator().manual_seed(seed)
        sampler = None
        if self.distributed:
            sampler = DistributedSampler(data, num_replicas=self.world, rank=self.rank, shuffle=shuffle, seed=seed)
            sampler.set_epoch(epoch)
        return DataLoader(
            data,
            batch_size=stage.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            generator=g,
            drop_last=False,
        )

    def _steps_per_epoch(self, stage: Stage, stage_idx: int, train: Any, collate: Callable | None) -> int:
        loader = self._loader(train, stage, stage_idx, 0, True, collate)
        try:
            return max(1, len(loader))
        except TypeError:
            if self.steps_per_epoch is None:
                raise ConfigError("trainer: the training batches have no len(); pass steps_per_epoch") from None
            return self.steps_per_epoch

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
        cls = torch.optim.AdamW if stage.optimizer == "adamw" else torch.optim.Adam
        return cls([p for _, p in params], lr=stage.lr, weight_decay=stage.weight_decay)

    # ---- checkpoints ---------------------------------------------------------------------
    def _save_checkpoint(self, tag: str, optimizer: torch.optim.Optimizer | None, state: dict) -> str:
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

    def _write_pointer(self, pointer: dict) -> None:
        assert self.out_dir is not None
        write_json(self.out_dir / "last.json", pointer)
        keep = {pointer["last"], *pointer["best"].values()}
        ck = self.out_dir / "ckpt"
        for d in ck.iterdir() if ck.is_dir() else ():
            if d.is_dir() and not d.name.startswith(".") and f"ckpt/{d.name}" not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def _read_checkpoint(self, rel: str, optimizer: torch.optim.Optimizer | None) -> dict:
        assert self.out_dir is not None
        d = self.out_dir / rel
        if not (d / "model.safetensors").is_file():
            raise ConfigError(f"{d}: checkpoint missing (was the run directory edited?)")
        state = json.loads((d / "state.json").read_text())
        self._load_model_tensors(load_file(str(d / "model.safetensors"), device=str(self.device)), str(d))
        if optimizer is not None and (d / "optimizer.safetensors").is_file():
            sd = _unflatten_optimizer(
                load_file(str(d / "optimizer.safetensors"), device=str(self.device)), state["optimizer"]
            )
            optimizer.load_state_dict(sd)
        return state

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- validation ----------------------------------------------------------------------
    def _validate(self, val: Any, stage: Stage, stage_idx: int, collate: Callable | None) -> dict[str, float]:
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
        threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        # stages flip requires_grad; the caller's flags (e.g. a frozen backbone) come back afterwards
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads)
            for p in self.model.parameters():
                p.requires_grad_(flags.get(id(p), True))

    def _fit(self) -> TrainResult:
        fp = self._run_fingerprint()
        pointer = {
            "run": fp,
            "stage": 0,
            "epoch": 0,
            "step": 0,
            "last": None,
            "best": {},
            "best_metric": {},
            "best_epoch": {},
            "done": False,
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
            self.history = [
                json.loads(line) for line in (self.out_dir / "log.jsonl").read_text().splitlines() if line.strip()
            ]
        results: list[StageResult] = []
        for si, stage in enumerate(self.stages):
            if si < pointer["stage"]:
                results.append(
                    StageResult(
                        stage.name,
                        pointer["best_metric"].get(stage.name),
                        pointer["best_epoch"].get(stage.name, -1),
                        stage.epochs,
                    )
                )
                continue
            self._run_stage(si, stage, pointer, resumed and si == pointer["stage"])
            results.append(
                StageResult(
                    stage.name,
                    pointer["best_metric"].get(stage.name),
                    pointer["best_epoch"].get(stage.name, -1),
                    stage.epochs,
                )
            )
        # end on the final stage's best weights (read on rank 0, then copied to every rank)
        self.model = unwrap(self.model)
        if self.is_main:
            self._restore_best(self.stages[-1].name, pointer)
        self._sync_from_main()
        self.model.eval()
        return TrainResult(results, self.history, self.monitor)

    def _sync_from_main(self) -> None:
        """Copy rank 0's weights and buffers to every rank (no shared filesystem needed)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for v in unwrap(self.model).state_dict().values():
            dist.broadcast(v.data, src=0)

    def _restore_best(self, stage_name: str, pointer: dict) -> None:
        if self.out_dir is not None and stage_name in pointer["best"]:
            self._read_checkpoint(pointer["best"][stage_name], None)
        elif stage_name in self._mem_best:
            self._load_model_tensors(self._mem_best[stage_name], f"stage {stage_name}")

    def _run_stage(self, si: int, stage: Stage, pointer: dict, resuming: bool) -> None:
        train = stage.train if stage.train is not None else self.train
        val = stage.val if stage.val is not None else self.val
        collate = stage.collate if stage.collate is not None else self.collate
        self.model = unwrap(self.model)
        if stage.setup is not None:
            stage.setup(self.model)
        params = self._set_trainable(stage)
        optimizer = self._optimizer(stage, params)
        start_epoch, step = 0, 0
        if resuming and pointer["epoch"] > 0 and pointer["last"] is not None:
            st = self._read_checkpoint(pointer["last"], optimizer)
            start_epoch, step = st["epoch"], st["step"]
        elif si > 0 and self.is_main:  # other ranks receive these weights when DDP wraps the model
            prev = self.stages[si - 1].name
            if stage.start_from == "best":
                self._restore_best(prev, pointer)
            elif self.out_dir is not None and pointer["last"] is not None:
                self._read_checkpoint(pointer["last"], None)
        model: nn.Module = self.model
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=self.find_unused_parameters
            )
        self.model = model
        spe = self._steps_per_epoch(stage, si, train, collate)
        total = spe * stage.epochs
        warm = int(round(stage.warmup * total))
        best = pointer["best_metric"].get(stage.name)
        for epoch in range(start_epoch, stage.epochs):
            seed = self._epoch_seed(si, epoch)
            seed_everything(seed)
            self._train_mode(stage)
            t0, sums, n = time.time(), {}, 0
            batches = self._loader(train, stage, si, epoch, True, collate)
            bar = tqdm(
                batches,
                desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
                leave=False,
                disable=not (self.progress and self.is_main),
                total=_len_or_none(batches),
            )
            for batch in bar:
                for g in optimizer.param_groups:
                    g["lr"] = stage.lr * lr_factor(stage.schedule, step, total, warm)
                out = model(to_device(batch, self.device))
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"stage {stage.name!r} epoch {epoch + 1} step {step}: "
                        f"loss is {float(loss.detach())}; lower the lr"
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
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            bar.close()
            train_logs = {f"train_{k}": v / max(1, n) for k, v in sums.items()}
            if self.distributed:
                train_logs = _mean_over_ranks(train_logs)
            has_val = val is not None or self.metric is not None
            vals = self._validate(val, stage, si, collate) if (has_val and self.is_main) else {}
            vals = self._broadcast(vals)
            value = vals.get(self.monitor) if has_val else None
            improved = (not has_val) or self._better(value, best)
            if improved:
                best = value
                pointer["best_metric"][stage.name] = value
                pointer["best_epoch"][stage.name] = epoch + 1
            record = {
                "stage": stage.name,
                "epoch": epoch + 1,
                "step": step,
                "lr": optimizer.param_groups[0]["lr"],
                **train_logs,
                **{f"val_{k}": v for k, v in vals.items()},
                "best": improved,
                "seed": seed,
                "time_s": round(time.time() - t0, 3),
            }
            if self.is_main:
                state = {
                    "stage": si,
                    "stage_name": stage.name,
                    "epoch": epoch + 1,
                    "step": step,
                    "seed": self.seed,
                    "epoch_seed": seed,
                    "best_metric": best,
                    "monitor": self.monitor,
                }
                if self.out_dir is not None:
                    tag = f"{si}-{stage.name}-e{epoch + 1}"
                    rel = self._save_checkpoint(tag, optimizer, state)
                    pointer.update({"stage": si, "epoch": epoch + 1, "step": step, "last": rel})
                    if improved:
                        pointer["best"][stage.name] = rel
                    self._write_pointer(pointer)
                elif improved:
                    self._mem_best[stage.name] = self._model_tensors()
                self._log(record)
            else:
                self.history.append(record)
            if self.distributed:
                pointer.update(self._broadcast(pointer))
            for cb in self.callbacks:
                cb(record)
        if stage.epochs == 0 and self.is_main:
            self._mem_best[stage.name] = self._model_tensors()
            if self.out_dir is not None:
                rel = self._save_checkpoint(f"{si}-{stage.name}-e0", None, {"stage": si, "epoch": 0, "step": 0})
                pointer["best"][stage.name] = rel
                pointer.update({"last": rel})
        # the next stage starts fresh from this one's best
        pointer.update({"stage": si + 1, "epoch": 0, "step": 0})
        if self.out_dir is not None and self.is_main:
            self._write_pointer(pointer)
        if self.distributed:
            pointer.update(self._broadcast(pointer))


def _len_or_none(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def _mean_over_ranks(logs: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(logs)
    t = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
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
