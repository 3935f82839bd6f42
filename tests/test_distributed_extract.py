"""`torchrun --nproc_per_node 2 -m vlclassify extract`: the same features as one process, bit for bit,
and a run SIGKILLed mid-way continues from its committed shards and loses nothing.

Real torchrun subprocesses (gloo, --standalone) on tiny data with the toy backbone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlclassify.backbones import create_backbone
from vlclassify.data import load_data
from vlclassify.data.webdataset import write_webdataset
from vlclassify.features import FeatureCache, extract_features
from vlclassify.features.distributed import DistEnv, dist_env, plan_inputs

N_IMAGES, PER_TAR, SHARD_ROWS = 960, 80, 16


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((rng.random((160, 160, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tar_spec(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    samples = (
        {"__key__": f"{i:06d}", "jpg": _jpeg(rng), "json": json.dumps({"label": "ab"[i % 2]}).encode()}
        | {"txt": f"thing {i % 7}".encode()}
        for i in range(N_IMAGES)
    )
    paths = write_webdataset(samples, d, per_shard=PER_TAR)
    return f"{d}/shard-{{00000..{len(paths) - 1:05d}}}.tar"


def _torchrun(args: list[str], cache: Path, shard_rows: int = SHARD_ROWS) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "vlclassify", "extract", *args, "-b", "toy", "--cache-dir", str(cache)]
    return cmd + ["--shard-rows", str(shard_rows), "--batch-size", "8"]


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (torchrun starts its workers in their own sessions)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _committed_rows(cache: Path) -> int:
    """Image rows whose shard manifest (the commit point) is on disk."""
    n = 0
    for space in (cache / "store").glob("*/space.json"):
        if json.loads(space.read_text())["key"]["kind"] == "image":
            n += sum(len(json.loads(m.read_text())["keys"]) for m in space.parent.glob("*.json") if m != space)
    return n


def _image_rows(cache: Path) -> int:
    store = FeatureCache(cache).store
    return sum(s["rows"] for s in store.spaces() if s["kind"] == "image")


def _features(spec: str, cache: Path):
    return extract_features(create_backbone("toy"), load_data(spec)["all"], cache=FeatureCache(cache), progress=False)


def test_killed_run_resumes_and_two_processes_match_one(tar_spec, tmp_path, encoder_calls):
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        _torchrun(["-d", tar_spec], cache),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    killed_alive = False
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if _committed_rows(cache) >= 8 * SHARD_ROWS:
            victims = [proc.pid, *_descendants(proc.pid)]
            killed_alive = proc.poll() is None and len(victims) >= 3  # torchrun and its two workers
            for pid in victims:  # as a machine dying: no process gets to clean up
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert killed_alive, f"the run ended before it could be killed:\n{out[-2000:]}"
    committed = _committed_rows(cache)
    assert 8 * SHARD_ROWS <= committed < N_IMAGES

    r = subprocess.run(_torchrun(["-d", tar_spec], cache), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    done = re.search(r"(\d+) extracted", r.stdout)
    assert done and int(done.group(1)) == N_IMAGES - committed  # only what the killed run had not committed
    assert _image_rows(cache) == N_IMAGES

    two = _features(tar_spec, cache)  # every row from the store: no extraction here
    assert encoder_calls == []
    one = extract_features(
        create_backbone("toy"), load_data(tar_spec)["all"], cache=FeatureCache(tmp_path / "one"), progress=False
    )
    assert torch.equal(two.image, one.image) and torch.equal(two.pooled, one.pooled)  # bit for bit
    assert torch.equal(two.text, one.text)


def test_items_of_a_manifest_are_split_across_ranks(tmp_path, color_folder, encoder_calls):
    rows = ["image,label"] + [f"{p},{p.parent.name}" for p in sorted(color_folder.rglob("*.png"))]
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    args = ["-d", str(tmp_path / "x.csv"), "--spatial"]
    r = subprocess.run(_torchrun(args, cache, shard_rows=4), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "18 extracted" in r.stdout and "by 2 processes" in r.stdout
    writers = {m.name.split("-")[0] for m in (cache / "store").glob("*/r*.json")}
    assert writers == {"r0000of0002", "r0001of0002"}  # both ranks wrote shards
    ds = load_data(str(tmp_path / "x.csv"))["all"]
    two = extract_features(create_backbone("toy"), ds, spatial=True, cache=FeatureCache(cache), progress=False)
    assert encoder_calls == []
    one = extract_features(create_backbone("toy"), ds, spatial=True, cache=FeatureCache(enabled=False), progress=False)
    assert torch.equal(two.image, one.image) and torch.equal(two.spatial, one.spatial)


def test_ranks_take_every_nth_input(tar_spec):
    env = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert dist_env(env) == DistEnv(1, 3, 0, 1) and dist_env({}) == DistEnv()
    inputs, sizes = plan_inputs(tar_spec, None, SHARD_ROWS, DistEnv(1, 3))
    assert sizes == {"tars": 12}
    assert [Path(sig.split("|")[0]).name for sig, _ in inputs] == [f"shard-{i:05d}.tar" for i in (1, 4, 7, 10)]


def test_device_selection_one_gpu_per_local_rank():
    from vlclassify.errors import ConfigError
    from vlclassify.features.runtime import resolve_device, resolve_precision, resolve_runtime

    def dev(spec, local_rank=None, gpus=0):
        return str(resolve_device(spec, local_rank, cuda_available=lambda: gpus > 0, device_count=lambda: gpus))

    assert dev("auto") == "cpu" and dev("cpu", gpus=2) == "cpu"
    assert dev("auto", gpus=1) == "cuda:0" and dev("cuda", gpus=4) == "cuda:0"
    assert [dev("auto", r, gpus=2) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]  # torchrun LOCAL_RANK
    assert dev("cuda:1", 0, gpus=2) == "cuda:1"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        dev("cuda")
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\)"):
        dev("cuda:2", gpus=2)
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda"):
        dev("tpu")
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_precision(gpu, "auto", bf16_supported=lambda: True) == "bf16"
    assert resolve_precision(gpu, "auto", bf16_supported=lambda: False) == "fp16"
    assert resolve_precision(cpu) == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision(cpu, "fp8")
    effnet_like = type("B", (), {"name": "b", "image_trunk": id, "image_head": id, "inference_trunk": id})()
    assert resolve_runtime(effnet_like, "auto", gpu) == "torch"  # ONNX Runtime is the CPU path
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_runtime(effnet_like, "onnx", gpu)


def test_reduced_precision_rows_are_kept_apart(toy, color_folder, cache, encoder_calls):
    """The autocast path (here bf16 on CPU: the code a GPU runs) stores under its own runtime name;
    runtime "auto" also accepts fp32 rows (more exact), an explicit runtime only its own."""
    from vlclassify.data import image_folder

    ds = image_folder(color_folder)["all"]
    kw = dict(cache=cache, progress=False, device="cpu")
    fp32 = extract_features(toy, ds, **kw)
    bf16 = extract_features(toy, ds, runtime="torch", precision="bf16", **kw)
    assert [name for name, _ in encoder_calls] == ["torch", "torch-cpu-bf16"]
    assert not torch.equal(fp32.image, bf16.image) and torch.allclose(fp32.image, bf16.image, atol=0.1)
    assert torch.equal(extract_features(toy, ds, runtime="torch", precision="bf16", **kw).image, bf16.image)
    assert torch.equal(extract_features(toy, ds, **kw).image, fp32.image)
    assert len(encoder_calls) == 2
    assert sorted(s["key"]["runtime"] for s in cache.store.spaces()) == ["torch", "torch-cpu-bf16"]


def test_cli_device_cuda_without_a_gpu_is_a_one_line_error(color_folder, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "vlclassify", "extract", "-d", str(color_folder), "-b", "toy", "--device", "cuda"]
        + ["--cache-dir", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: device 'cuda': CUDA is not available")
