"""The shared multi-stage trainer: learning, best-checkpoint selection, freezing, resume, logs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vlclassify.errors import ConfigError
from vlclassify.training import Stage, Trainer, shard_rows


class Blobs(torch.utils.data.Dataset):
    """Two Gaussian blobs in 4-d: a linearly separable toy problem."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 4, generator=g) + (self.y[:, None] * 2 - 1) * 1.5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(8, 2)

    def forward(self, batch):
        logits = self.head(self.body(batch["x"]))
        loss = nn.functional.cross_entropy(logits, batch["y"])
        return {"loss": loss, "loss_ce": loss, "logits": logits}


def accuracy_of(data):
    def metric(model):
        logits = model({"x": data.x, "y": data.y})["logits"]
        return {"acc": float((logits.argmax(-1) == data.y).float().mean())}

    return metric


def stages():
    return [
        Stage("warmup", epochs=3, lr=0.05, trainable=["head."], batch_size=16),
        Stage("all", epochs=3, lr=0.02, batch_size=16, schedule="linear", warmup_steps=2),
    ]


def test_trains_logs_and_freezes(tmp_path):
    train, val = Blobs(64, 0), Blobs(32, 1)
    model = Tiny()
    body0 = {k: v.clone() for k, v in model.body.state_dict().items()}
    seen = []

    def check_frozen(rec):
        if rec["stage"] == "warmup":  # body frozen in stage 1: params and BatchNorm stats unchanged
            seen.append(all(torch.equal(body0[k], v) for k, v in model.body.state_dict().items()))

    res = Trainer(
        model,
        train,
        val,
        stages()[:1],
        metric=accuracy_of(val),
        monitor="acc",
        out_dir=tmp_path,
        progress=False,
        callbacks=[check_frozen],
    ).fit()
    assert seen == [True, True, True]
    assert res.stages[0].best_metric >= 0.9
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert {"train_loss", "train_loss_ce", "val_acc", "lr", "step", "best"} <= set(lines[0])
    assert lines[-1]["step"] == 3 * 4  # 64 rows / batch 16 = 4 steps per epoch
    assert (tmp_path / "last.json").is_file()


def test_best_checkpoint_restored_between_stages(tmp_path):
    train, val = Blobs(64, 0), Blobs(32, 1)
    # each stage's starting weights are scored first (round 0); stage 1 peaks at epoch 2, stage 2 at its last
    scores = iter([0.0, 0.5, 0.9, 0.6, 0.05, 0.1, 0.2, 0.3])
    snapshots = {}
    model = Tiny()

    def metric(m):
        return {"score": next(scores)}

    def snap(rec):
        snapshots[(rec["stage"], rec["epoch"])] = {k: v.clone() for k, v in model.state_dict().items()}

    res = Trainer(
        model, train, val, stages(), metric=metric, monitor="score", out_dir=tmp_path, progress=False, callbacks=[snap]
    ).fit()
    assert res.stages[0].best_epoch == 2 and res.stages[1].best_epoch == 3
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["best"] for x in log] == [True, True, False, True, True, True]
    # the model after stage 1 best (epoch 2) differs from epoch 3; stage 2 must start from epoch 2
    pointer = json.loads((tmp_path / "last.json").read_text())
    assert pointer["best"]["warmup"].endswith("warmup-s8")  # 4 steps an epoch
    e2, e3 = snapshots[("warmup", 2)], snapshots[("warmup", 3)]
    assert not torch.equal(e2["head.weight"], e3["head.weight"])
    # final weights = best of the last stage
    assert all(torch.equal(v, snapshots[("all", 3)][k]) for k, v in model.state_dict().items())


def test_stage_starts_from_previous_best(tmp_path):
    """Stage 2 with lr 0 leaves the weights where it started: they must equal stage 1's best epoch."""
    train, val = Blobs(64, 0), Blobs(32, 1)
    scores = iter([0.0, 0.5, 0.9, 0.6, 0.0, 0.0])
    snapshots = {}
    model = Tiny()

    def snap(rec):
        snapshots[(rec["stage"], rec["epoch"])] = {k: v.clone() for k, v in model.state_dict().items()}

    st = [
        Stage("a", epochs=3, lr=0.05, batch_size=16),
        Stage("b", epochs=1, lr=0.0, weight_decay=0.0, batch_size=16, trainable=["head."]),
    ]
    Trainer(
        model,
        train,
        val,
        st,
        metric=lambda m: {"s": next(scores)},
        monitor="s",
        out_dir=tmp_path,
        progress=False,
        callbacks=[snap],
    ).fit()
    best_a = snapshots[("a", 2)]
    assert all(torch.equal(v, best_a[k]) for k, v in model.state_dict().items() if k.startswith("head."))
    assert not torch.equal(best_a["head.weight"], snapshots[("a", 3)]["head.weight"])


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    train, val = Blobs(64, 0), Blobs(32, 1)
    ref = Tiny()
    Trainer(
        ref, train, val, stages(), metric=accuracy_of(val), monitor="acc", out_dir=tmp_path / "ref", progress=False
    ).fit()

    class Killed(Exception):
        pass

    def kill(rec):
        if rec["stage"] == "all" and rec["epoch"] == 1:
            raise Killed

    first = Tiny()
    with pytest.raises(Killed):
        Trainer(
            first,
            train,
            val,
            stages(),
            metric=accuracy_of(val),
            monitor="acc",
            out_dir=tmp_path / "run",
            progress=False,
            callbacks=[kill],
        ).fit()
    pointer = json.loads((tmp_path / "run" / "last.json").read_text())
    assert pointer["stage"] == 1 and pointer["step"] == 4  # killed after the first epoch of stage 2
    again = Tiny()  # a fresh process: fresh weights, state comes from disk
    res = Trainer(
        again, train, val, stages(), metric=accuracy_of(val), monitor="acc", out_dir=tmp_path / "run", progress=False
    ).fit()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert [(h["stage"], h["epoch"]) for h in res.history] == [
        ("warmup", 1),
        ("warmup", 2),
        ("warmup", 3),
        ("all", 1),
        ("all", 2),
        ("all", 3),
    ]
    # changing the stages makes resuming refuse instead of silently mixing runs
    with pytest.raises(ConfigError, match="different stages"):
        Trainer(Tiny(), train, val, [Stage("warmup", epochs=9)], out_dir=tmp_path / "run", progress=False).fit()


def test_no_out_dir_uses_val_loss_and_keeps_best_in_memory():
    train, val = Blobs(64, 0), Blobs(32, 1)
    model = Tiny()
    res = Trainer(model, train, val, [Stage("s", epochs=4, lr=0.05, batch_size=32)], progress=False).fit()
    assert res.monitor == "loss"
    best = min(h["val_loss"] for h in res.history)
    assert res.stages[0].best_metric == pytest.approx(best)
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_schedule_is_per_step_and_sized_in_steps():
    total = 10
    cos = Stage("c", lr=1.0, min_lr=0.1)
    f = [cos.lr_at(s, total) for s in range(total)]
    assert f[0] == 1.0 and all(a > b for a, b in zip(f, f[1:])) and f[-1] > 0.1
    assert [Stage("l", lr=1.0, schedule="linear", warmup_steps=2).lr_at(s, 4) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
    with pytest.raises(ConfigError, match="unknown LR schedule"):
        Stage("s", schedule="step").check()


def test_lr_reaches_end_of_schedule(tmp_path):
    """The last epoch's LR is near 0 for a linear schedule: stepped per batch, sized in batches."""
    model = Tiny()
    res = Trainer(
        model, Blobs(64), None, [Stage("s", epochs=3, lr=0.1, batch_size=16, schedule="linear")], progress=False
    ).fit()
    assert res.history[-1]["lr"] == pytest.approx(0.1 * (1 - 11 / 12))


def test_bad_config_errors():
    with pytest.raises(ConfigError, match="no parameter matches"):
        Trainer(Tiny(), Blobs(), None, [Stage("s", trainable=["nope."])], progress=False)
    with pytest.raises(ConfigError, match="unique"):
        Trainer(Tiny(), Blobs(), None, [Stage("s"), Stage("s")], progress=False)
    with pytest.raises(ConfigError, match="monitor"):
        Trainer(Tiny(), Blobs(), None, [Stage("s")], metric=lambda m: {"a": 1.0}, progress=False)


def test_custom_batch_callable():
    data = Blobs(32)

    def batches(stage, epoch, seed):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(data), generator=g)
        return [{"x": data.x[perm[i : i + 8]], "y": data.y[perm[i : i + 8]]} for i in range(0, len(data), 8)]

    res = Trainer(Tiny(), batches, None, [Stage("s", epochs=2, lr=0.05)], progress=False).fit()
    assert res.history[-1]["step"] == 8


def test_steps_stage_rounds_keep_last_and_resume(tmp_path):
    """A stage sized in optimizer steps validates every eval_every steps; keep=last ends on the
    last round even when an earlier one scored better; a kill mid-stage resumes bit-identically."""
    train, val = Blobs(64, 0), Blobs(32, 1)
    st = [Stage("s", steps=10, eval_every=4, lr=0.05, batch_size=16, keep="last")]
    ref = Tiny()
    res = Trainer(
        ref, train, val, st, metric=accuracy_of(val), monitor="acc", out_dir=tmp_path / "ref", progress=False
    ).fit()
    assert [h["step"] for h in res.history] == [4, 8, 10]
    assert res.stages[0].best_step == 10 and res.stages[0].best_epoch == 3

    class Killed(Exception):
        pass

    def kill(rec):
        if rec["step"] == 8:
            raise Killed

    with pytest.raises(Killed):
        Trainer(
            Tiny(),
            train,
            val,
            st,
            metric=accuracy_of(val),
            monitor="acc",
            out_dir=tmp_path / "run",
            progress=False,
            callbacks=[kill],
        ).fit()
    again = Tiny()
    Trainer(
        again, train, val, st, metric=accuracy_of(val), monitor="acc", out_dir=tmp_path / "run", progress=False
    ).fit()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_a_stage_that_only_hurts_keeps_its_starting_weights():
    train, val = Blobs(64, 0), Blobs(32, 1)
    model = Tiny()
    Trainer(
        model,
        train,
        val,
        [Stage("a", epochs=3, lr=0.05, batch_size=16)],
        metric=accuracy_of(val),
        monitor="acc",
        progress=False,
    ).fit()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    # a huge learning rate on the head only ruins it: stage b's round 0 (= stage a's weights) is kept
    res = Trainer(
        model,
        train,
        val,
        [Stage("b", epochs=2, lr=50.0, batch_size=16, trainable=["head."])],
        metric=lambda m: {"acc": accuracy_of(val)(m)["acc"] - 1e-3 * float(m.head.weight.abs().sum())},
        monitor="acc",
        progress=False,
    ).fit()
    assert res.stages[0].best_epoch == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in good.items())


def test_training_leaves_the_global_rng_alone():
    model, data = Tiny(), Blobs(32)  # (the test model seeds its own initialisation)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Trainer(model, data, None, [Stage("s", epochs=1, lr=0.05, batch_size=16)], progress=False).fit()
    assert torch.equal(torch.rand(3), expected)


def test_shard_rows_splits_a_global_batch():
    b = {"x": torch.arange(10).view(5, 2), "y": torch.arange(5), "texts": list("abcde"), "w": torch.ones(3)}
    parts = [shard_rows(b, r, 2) for r in range(2)]
    assert parts[0]["y"].tolist() == [0, 2, 4] and parts[1]["y"].tolist() == [1, 3]
    assert parts[1]["texts"] == ["b", "d"] and torch.equal(parts[1]["w"], b["w"])
    assert shard_rows(b, 0, 1) is b
    with pytest.raises(ConfigError, match="cannot be shared"):
        shard_rows({"y": torch.arange(1)}, 0, 2)


def test_ties_go_to_the_later_round_and_the_start_loses_ties():
    train, val = Blobs(64, 0), Blobs(32, 1)
    res = Trainer(
        Tiny(),
        train,
        val,
        [Stage("s", epochs=3, lr=0.05, batch_size=16)],
        metric=lambda m: {"acc": 0.5},
        monitor="acc",
        progress=False,
    ).fit()
    assert res.stages[0].best_epoch == 3  # every round ties with the start: the last one is kept
