"""Streamed training (features/stream.py): batches read from the feature store through the Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_contract import FAST, write_manifest
from vlclassify.context import RunContext
from vlclassify.data import load_data
from vlclassify.errors import ConfigError
from vlclassify.features.stream import RowBatch
from vlclassify.methods import create_method


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(str(write_manifest(tmp_path_factory.mktemp("stream"), "single")))


def make(name, toy, cache, stream: bool):
    """A method and the run context of a (streamed) fit that uses the test's cache."""
    return create_method(name, toy, **FAST.get(name, {})), RunContext(cache=cache, progress=False, stream=stream)


def test_a_streamed_fit_equals_the_in_memory_fit(toy, cache, data):
    """Same rows in the same batches: the same trained head."""
    name = "cmm"
    (ref, plain), (got, streamed) = make(name, toy, cache, stream=False), make(name, toy, cache, stream=True)
    ref.fit(data["train"], data["val"], ctx=plain)
    got.fit(data["train"], data["val"], ctx=streamed)
    for k, v in ref.head.state_dict().items():
        torch.testing.assert_close(got.head.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    np.testing.assert_allclose(
        got.predict_proba(data["test"], ctx=plain), ref.predict_proba(data["test"], ctx=plain), atol=1e-6
    )


def test_streamed_training_rows_stay_in_the_store(toy, cache, data):
    m, streamed = make("cmm", toy, cache, stream=True)
    enc = m.encode(data["train"], training=True, ctx=streamed)
    with pytest.raises(ConfigError, match="cannot train streamed"):
        enc.features.tensor("image")  # no whole tensor is built
    batches = m.feature_batches(enc)(type("S", (), {"batch_size": 5})(), 0, 7)
    assert all(isinstance(b, RowBatch) for b in batches) and sum(map(len, batches)) == len(enc.rows)
    assert len(enc.rows) == len(m.training_views()) * len(data["train"]) == 24  # orig + flip
    # a batch read equals the in-memory rows, in the in-memory batches' order
    mem, plain = make("cmm", toy, cache, stream=False)
    ref = mem.feature_batches(mem.encode(data["train"], training=True, ctx=plain))(
        type("S", (), {"batch_size": 5})(), 0, 7
    )
    for b, r in zip(batches, ref):
        got = b.shard(0, 1)
        assert set(got) == set(r)
        for k in r:
            torch.testing.assert_close(got[k], r[k], rtol=0, atol=0)
    halves = [batches[0].shard(i, 2)["targets"] for i in range(2)]  # each rank reads only its rows
    torch.testing.assert_close(torch.stack([halves[0][:2], halves[1][:2]], 1).flatten(), ref[0]["targets"][:4])


def test_a_method_that_reads_whole_tensors_says_it_cannot_stream(toy, cache, data):
    with pytest.raises(ConfigError, match="tip-adapter-f.*cannot train streamed"):
        m, streamed = make("tip-adapter-f", toy, cache, stream=True)
        m.fit(data["train"], data["val"], ctx=streamed)


def test_a_streamed_fit_under_torchrun_matches_one_in_memory_process(tmp_path):
    """2 processes reading their own rows of each global batch from the store, against one process
    training on in-memory tensors: the tolerance of test_contract's torchrun test."""
    script = Path(__file__).with_name("ddp_fit.py")
    manifest = write_manifest(tmp_path / "data", "single")
    env = {**os.environ, "VLCLASSIFY_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    opts = json.dumps({"cmm": FAST["cmm"]})
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(script), str(manifest), opts, str(one)], check=True, env=env, timeout=600)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(manifest), opts, str(two), "stream"]
    subprocess.run(cmd, check=True, env=env, timeout=600)
    a, b = json.loads(one.read_text())["cmm"], json.loads(two.read_text())["cmm"]
    assert (a["world"], b["world"]) == (1, 2)
    assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1e-9
    assert np.abs(np.array(a["probs"]) - np.array(b["probs"])).max() < 0.02


def test_cli_fit_under_torchrun_saves_once_from_rank_0(tmp_path):
    """`torchrun -m vlclassify fit`: every rank trains; one model folder, one report."""
    manifest = write_manifest(tmp_path / "data", "single")
    env = {**os.environ, "VLCLASSIFY_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "model"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vlclassify", "fit", "-m", "cmm"]
    cmd += ["-d", str(manifest), "-b", "toy", "--opt", "steps=40", "--stream", "-o", str(out)]
    r = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("saved to") == 1 and r.stdout.count("decision (label)") == 1, r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "fit.json", "model.safetensors", "split.json"]
