"""Image encoders for feature extraction: a tuned torch path, or ONNX Runtime when it is installed.

Backbones that split `encode_image` into `image_trunk` (the convolutional network, where the time
goes) and `image_head` (pooling + joint-space projection), and offer `inference_trunk()`, get a
faster trunk here: with torch, a copy with batch norms folded into the convolutions, channels-last,
under inference mode; with ONNX Runtime, that trunk exported once to `<cache>/backbones/onnx/`
(keyed by the weights fingerprint, written atomically). The head always runs in torch, so spatial
tokens come from the same pass. Other backbones run their own `encode_image`.

`precision="int8"` (CPU, ONNX Runtime) runs that trunk with its convolutions quantised to INT8
(`quantize_int8`: static, per-channel weights, activations calibrated on the fixed offline photos
the effnet-minilm bridge is fitted on, none of them in a benchmark), cached beside the fp32 export
by the same weights key and checked by SHA-256 the same way. Its features are their own space in
the store (encoder name "onnx-cpu-int8"): never mixed with fp32 rows.

On a GPU (`device`, see `resolve_device`) the torch path runs a device copy of the backbone under
fp16/bf16 autocast (`precision`); ONNX Runtime is the CPU path. The encoder's `name` (runtime,
device type, precision) is part of the feature store's key: features made another way are other rows.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone, ImageFeatures
from ..errors import ConfigError
from ..utils import atomic_path, default_cache_dir, json_fingerprint, sha256_file

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_EXPORT_VERSION = 1  # bump when the exported graph changes
INT8_VERSION = 1  # bump when the quantisation recipe or its calibration set changes
CALIBRATION_CROPS = 4  # every 4th bridge crop of each calibration photo (35 photos: 139 images)
_SESSIONS: dict[str, Any] = {}  # "path:sha256:threads" -> InferenceSession, reused across calls in a process


def cpu_count() -> int:
    """Cores this process may use; under torchrun, shared by the node's `LOCAL_WORLD_SIZE` processes."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_device(
    spec: str = "auto",
    local_rank: int | None = None,
    cuda_available: Callable[[], bool] = torch.cuda.is_available,
    device_count: Callable[[], int] = torch.cuda.device_count,
) -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:i` -> a device. `auto` is CUDA when present, else CPU. With no
    index, a process of a distributed run (`local_rank`, torchrun's LOCAL_RANK) gets GPU
    `local_rank % device_count`: one process per GPU. The CUDA probes are injectable for tests."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec not in ("auto", "cuda") and not spec.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:<index>, got {spec!r}")
    if not cuda_available():
        if spec == "auto":
            return torch.device("cpu")
        raise ConfigError(f"device {spec!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    n = device_count()
    if spec.startswith("cuda:"):
        idx = spec.partition(":")[2]
        if not idx.isdigit() or int(idx) >= n:
            raise ConfigError(f"device {spec!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", int(idx))
    return torch.device("cuda", (local_rank or 0) % max(1, n))


def resolve_precision(
    device: torch.device, precision: str = "auto", bf16_supported: Callable[[], bool] | None = None
) -> str:
    """`auto` is bf16 on a GPU that has it (else fp16) and fp32 on CPU; `fp32|fp16|bf16|int8` as asked
    (int8: the ONNX Runtime trunk, on the CPU only)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise ConfigError(
            f"precision 'int8' runs the ONNX Runtime trunk on the CPU; with device {device} use fp16 or bf16"
        )
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if (bf16_supported or torch.cuda.is_bf16_supported)() else "fp16"


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported (the ONNX runtime is optional)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class TrunkBackbone(Protocol):
    """The optional image-trunk API of a backbone (see the module doc; effnet-minilm has it)."""

    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] -> the convolutional feature map [N, C, h, w]."""
        ...

    def image_head(self, fmap: torch.Tensor, spatial: bool = True) -> ImageFeatures:
        """Feature map -> ImageFeatures (tokens [N, 0, D] when `spatial` is False)."""
        ...

    def inference_trunk(self) -> nn.Module:
        """A copy of the trunk for inference only (batch norms folded), pixels -> feature map."""
        ...


def has_trunk(backbone: Backbone) -> bool:
    """True when the backbone separates its image trunk from its head (see the module doc)."""
    return all(callable(getattr(backbone, a, None)) for a in ("image_trunk", "image_head", "inference_trunk"))


def trunk_of(backbone: Backbone) -> TrunkBackbone:
    """`backbone` as a TrunkBackbone, for backbones `has_trunk` accepted."""
    return cast(TrunkBackbone, backbone)


def resolve_runtime(backbone: Backbone, runtime: str = "auto", device: torch.device | None = None) -> str:
    """The runtime `make_encoder` will use: "onnx" or "torch" (without building anything).
    ONNX Runtime is the CPU path: on a GPU, "auto" is torch."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if device is not None and device.type != "cpu":
        if runtime == "onnx":
            raise ConfigError(f"runtime='onnx' runs on the CPU; with device {device} use runtime 'torch' or 'auto'")
        return "torch"
    if runtime == "onnx":
        if not has_trunk(backbone):
            raise ConfigError(f"runtime='onnx': backbone {backbone.name!r} has no separable image trunk; use 'torch'")
        if not onnxruntime_available():
            raise ConfigError("runtime='onnx' needs onnxruntime (pip install onnxruntime); or use runtime='torch'")
        return "onnx"
    if runtime == "auto" and has_trunk(backbone) and onnxruntime_available():
        return "onnx"
    return "torch"


def encoder_name(runtime: str, device: torch.device, precision: str) -> str:
    """The store key's `runtime`: "torch"/"onnx" for fp32 on CPU, else e.g. "torch-cuda-bf16"."""
    if device.type == "cpu" and precision == "fp32":
        return runtime
    return f"{runtime}-{device.type}-{precision}"


class TorchEncoder:
    """Eager torch: the folded channels-last trunk when the backbone has one, else `encode_image`.

    Off the CPU, or at reduced precision, it runs a copy of the backbone on `device` under
    autocast (the caller's backbone stays where it is); outputs come back as float32 on the CPU."""

    def __init__(self, backbone: Backbone, device: torch.device | None = None, precision: str = "fp32") -> None:
        self.device = device or torch.device("cpu")
        self.precision = precision
        self.name = encoder_name("torch", self.device, precision)
        if self.device.type != "cpu":
            backbone = copy.deepcopy(backbone).to(self.device).eval()
        self.backbone = backbone
        self.trunk = trunk_of(backbone).inference_trunk() if has_trunk(backbone) else None

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, spatial: bool = True) -> ImageFeatures:
        """pixels [N, 3, H, W] -> ImageFeatures (tokens [N, 0, D] when the head can skip them)."""
        x = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        dtype = _AUTOCAST.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if self.trunk is None:
                out = self.backbone.encode_image(x)
            else:
                out = trunk_of(self.backbone).image_head(self.trunk(x), spatial=spatial)
        if self.device.type == "cpu" and dtype is None:
            return out
        return ImageFeatures(
            embeds=out.embeds.float().cpu(),
            tokens=out.tokens.float().cpu(),
            pooled=out.pooled.float().cpu(),
            grid=out.grid,
        )


class OnnxEncoder:
    """The trunk in ONNX Runtime (its own thread pool, no spinning: the cores are shared), head in torch;
    `precision` fp32, or int8 (the quantised trunk, see the module doc)."""

    def __init__(
        self,
        backbone: Backbone,
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self.backbone = backbone
        self.name = encoder_name("onnx", torch.device("cpu"), precision)
        self.path = onnx_trunk_path(backbone, cache_dir, precision)
        digest = verified_trunk(backbone, self.path, precision=precision)
        self.session = _session(self.path, digest, threads or cpu_count())
        if self.session is None:  # a file ONNX Runtime cannot load: export again once
            digest = verified_trunk(backbone, self.path, force=True, precision=precision)
            self.session = _session(self.path, digest, threads or cpu_count(), raise_errors=True)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, spatial: bool = True) -> ImageFeatures:
        x = pixels.float().contiguous().numpy()  # [N, 3, H, W] float32, NCHW
        fmap = torch.from_numpy(self.session.run(None, {"pixels": x})[0])  # [N, C, h, w]
        return trunk_of(self.backbone).image_head(fmap, spatial=spatial)


def onnx_trunk_path(backbone: Backbone, cache_dir: str | Path | None = None, precision: str = "fp32") -> Path:
    """Where the exported ONNX trunk of these weights lives in the cache (one file per weights,
    image size and precision)."""
    key = json_fingerprint(
        {
            "name": backbone.name,
            "weights": backbone.weights_fingerprint(),
            "image_size": backbone.image_size,
            "v": ONNX_EXPORT_VERSION,
        }
    )
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    int8 = f"-int8v{INT8_VERSION}" if precision == "int8" else ""
    return root / "backbones" / "onnx" / f"{backbone.name}-trunk-{key}{int8}.onnx"


def verified_trunk(backbone: Backbone, path: Path, force: bool = False, precision: str = "fp32") -> str:
    """The SHA-256 of the exported trunk at `path`, exporting it again when it is missing, or when
    its bytes no longer match the digest recorded beside it at export (a damaged file loads and
    runs, with wrong features: flipped weight bytes moved scores by 0.04 without a word). An int8
    trunk is quantised from the (verified) fp32 one."""
    record = path.with_name(path.name + ".sha256")
    if not force and path.exists():
        digest = sha256_file(path)
        if record.is_file() and record.read_text().strip() == digest:
            return digest
        log.warning("%s: does not match the SHA-256 recorded at export; exporting again", path)
    if precision == "int8":
        fp32 = onnx_trunk_path(backbone, path.parents[2])  # the same cache root: <root>/backbones/onnx/
        verified_trunk(backbone, fp32)
        with atomic_path(path) as tmp:
            quantize_int8(fp32, tmp, calibration_pixels(backbone))
    else:
        export_onnx_trunk(backbone, path)
    digest = sha256_file(path)
    with atomic_path(record) as tmp:
        tmp.write_text(digest + "\n")
    return digest


def export_onnx_trunk(backbone: Backbone, path: Path) -> Path:
    """Export `inference_trunk()` (dynamic batch, fixed image size) to `path`, atomically."""
    import warnings

    log.info("exporting the %s image trunk to ONNX (once per weights): %s", backbone.name, path)
    # Module.to takes memory_format (torch's docs), its overloads in the stubs do not
    trunk = trunk_of(backbone).inference_trunk().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    example = torch.zeros(2, 3, backbone.image_size, backbone.image_size)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is chatty about deprecations
        torch.onnx.export(
            trunk,
            (example,),
            str(tmp),
            dynamo=False,
            input_names=["pixels"],
            output_names=["fmap"],
            dynamic_axes={"pixels": {0: "n"}, "fmap": {0: "n"}},
            opset_version=17,
        )
    return path


def calibration_pixels(backbone: Backbone) -> np.ndarray:
    """[n, 3, H, W] preprocessed calibration images for `quantize_int8`: every CALIBRATION_CROPS-th
    crop (`bridge_crops`) of the bridge photos (`bridge_photos`: installed offline, in no benchmark)."""
    from ..backbones.effnet_minilm import bridge_crops, bridge_photos
    from ..data.decoder import decode

    crops = [c for f in bridge_photos() for c in bridge_crops(decode(str(f)))[::CALIBRATION_CROPS]]
    return torch.stack([backbone.preprocess(c) for c in crops]).numpy()


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray) -> dict[str, Any]:
    """Write `src` with its dense convolutions quantised to INT8 to `dst` (QDQ; per-channel int8
    weights, uint8 activations whose ranges come from `calibration` [n, 3, H, W]); -> the recipe,
    for a sidecar. The first convolution (it reads the pixels) and the depthwise ones stay fp32:
    quantising them too dropped the pooled features' cosine to fp32's from 0.99 to 0.88 and the
    ImageNet top-1 agreement from 92% to 62% on 48 Tux Paint photos, for little speed (the dense
    1x1 convolutions hold most of the arithmetic). Heads (any MatMul/Gemm) stay fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    convs = [n for n in onnx.load(str(src)).graph.node if n.op_type == "Conv"]
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs}
    dense = [n.name for n in convs[1:] if groups[n.name] == 1]
    quiet = logging.getLogger()  # the quantiser logs advice through the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            nodes_to_quantize=dense,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        quiet.setLevel(level)
    return {
        "format": "QDQ",
        "quantised": f"{len(dense)} of {len(convs)} convolutions (dense, not the first)",
        "weights": "int8 per channel",
        "activations": "uint8, MinMax",
        "calibration_images": len(calibration),
        "v": INT8_VERSION,
    }


def _session(path: Path, digest: str, threads: int, raise_errors: bool = False):
    import onnxruntime as ort

    k = f"{path}:{digest}:{threads}"  # the digest: a re-exported file never meets a session of the old bytes
    if k in _SESSIONS:
        return _SESSIONS[k]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure means "re-export"
        if raise_errors:
            raise ConfigError(f"{path}: ONNX Runtime cannot load the exported trunk ({e})") from None
        log.warning("%s: cannot load (%s); exporting again", path, e)
        return None
    _SESSIONS[k] = sess
    return sess


def make_encoder(
    backbone: Backbone,
    runtime: str = "auto",
    cache_dir: str | Path | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
):
    """An image encoder `(pixels, spatial) -> ImageFeatures` for `runtime`; it has a `.name`.

    "auto" uses ONNX Runtime when importable and the backbone has a trunk (CPU, fp32), and falls
    back to torch (with a warning) if the export fails; an explicit "onnx" raises instead.
    """
    device = device or torch.device("cpu")
    chosen = resolve_runtime(backbone, runtime, device)
    if precision == "int8":
        if chosen != "onnx":
            raise ConfigError(
                f"precision 'int8' runs the ONNX Runtime trunk on the CPU; backbone {backbone.name!r} with runtime "
                f"{runtime!r} on {device} has none (use runtime 'onnx' or 'auto' with onnxruntime installed)"
            )
        return OnnxEncoder(backbone, cache_dir, precision="int8")
    if chosen == "onnx" and precision != "fp32":
        if runtime == "onnx":
            raise ConfigError(f"runtime='onnx' runs in fp32; precision {precision!r} needs runtime 'torch'")
        chosen = "torch"
    if chosen == "onnx":
        try:
            return OnnxEncoder(backbone, cache_dir)
        except Exception as e:  # noqa: BLE001 - exporter/runtime failures vary by version
            if runtime == "onnx":
                raise
            log.warning("ONNX Runtime path unavailable (%s: %s); using torch", type(e).__name__, e)
    return TorchEncoder(backbone, device, precision)
