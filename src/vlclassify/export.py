"""Export a fitted model to one ONNX graph: preprocessed pixels -> class probabilities.

A method on the contract predicts with `head(features)` over the backbone's image features
(methods/base.py), so its whole inference is one fixed graph: the backbone's image trunk (the
batch-norm-folded `inference_trunk()` where the backbone has one, as features/runtime.py runs
it), its image head (pooling, the projection into the joint space, spatial tokens if the method
reads them), the method's head, and the softmax or sigmoid that `predict_proba` applies. It is
traced once in torch and written with a JSON sidecar (classes, preprocessing, decision rule),
after checking the graph in ONNX Runtime against `predict_proba` on images (to 1e-4).

    graph: pixels [n, 3, H, W] float32 (the backbone's `preprocess`) -> probs [n, C] float32

Methods whose inference is something else (CMA-CLIP, DiCLS and iCAR run parts of the backbone
with their own weights), and configurations that read the paired text's embedding, are refused
in one line: their graphs would need the text encoder and tokenizer as inputs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.decoder import decode
from .data.items import Dataset, Item
from .errors import ConfigError
from .features.runtime import has_trunk, trunk_of
from .methods.base import Method, feature_keys, methods_tagged
from .utils import atomic_path, write_json

EXPORT_VERSION = 1  # the sidecar's format
OPSET = 17
TOLERANCE = 1e-4  # largest |graph - predict_proba| accepted


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how well the graph matched `predict_proba`."""

    graph: Path  # the .onnx file
    sidecar: Path  # its JSON description
    inputs: str  # e.g. "pixels [n, 3, 224, 224]"
    checked: int  # images the graph was checked on
    max_diff: float  # largest |graph - predict_proba| over them


class ProbabilityGraph(nn.Module):
    """pixels [N, 3, H, W] -> probabilities [N, C]: backbone image features, the head, the scores."""

    def __init__(self, method: Method, activation: str) -> None:
        super().__init__()
        bb, head = method.backbone, method.head
        assert head is not None, "export_problem refuses a method without a head"
        self.backbone, self.head, self.activation = bb, head, activation
        self.keys = feature_keys(method.feature_needs())
        trunk = trunk_of(bb).inference_trunk() if has_trunk(bb) else None
        # Module.to takes memory_format (torch's docs), its overloads in the stubs do not
        self.trunk = trunk.to(memory_format=torch.contiguous_format) if trunk is not None else None  # type: ignore[call-overload]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] -> [N, C] probabilities, as `Method.predict_proba` gives them."""
        spatial = "spatial" in self.keys
        bb = self.backbone
        f = (
            trunk_of(bb).image_head(self.trunk(pixels), spatial=spatial)
            if self.trunk is not None
            else bb.encode_image(pixels)
        )
        feats = {"image": f.embeds, "pooled": f.pooled, "spatial": f.tokens}  # [N, D], [N, F], [N, P, D]
        z = self.head({k: feats[k] for k in self.keys})["logits"]  # [N, C]
        return torch.sigmoid(z) if self.activation == "sigmoid" else torch.softmax(z, -1)


def export_problem(method: Method) -> str | None:
    """Why `method` cannot be exported (one line), or None."""
    if not type(method).tags.onnx or not isinstance(method.head, nn.Module):
        return (
            f"{method.name} cannot be exported to ONNX: its inference is not one head over the backbone's image "
            f"features (exportable: {', '.join(methods_tagged('onnx'))})"
        )
    if "text" in method.feature_needs():
        return (
            f"{method.name} as configured reads the paired text's embedding, which the ONNX export does not "
            "take as an input; export an image-only configuration"
        )
    return None


def check_items(images: Sequence[str | np.ndarray] | None) -> list[Item]:
    """Items to check the graph on: the given files or arrays, else four generated images."""
    if images:
        return [Item(image=im, key=im if isinstance(im, str) else f"array-{i}") for i, im in enumerate(images)]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:160, 0:200]
    out = []
    for i in range(4):
        base = np.stack([(xx * (i + 1)) % 256, (yy * (i + 2)) % 256, ((xx + yy) * 3) % 256], -1)
        noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)  # [160, 200, 3]
        out.append(Item(image=noisy, key=f"generated-{i}"))
    return out


def _logaddexp(g, a, b):
    """ONNX for aten::logaddexp (CMM's fusion), which the TorchScript exporter lacks: m + log(e^(a-m) + e^(b-m))."""
    m = g.op("Max", a, b)
    return g.op("Add", m, g.op("Log", g.op("Add", g.op("Exp", g.op("Sub", a, m)), g.op("Exp", g.op("Sub", b, m)))))


@contextlib.contextmanager
def _symbolics() -> Iterator[None]:
    torch.onnx.register_custom_op_symbolic("aten::logaddexp", _logaddexp, OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::logaddexp", OPSET)


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # the exporter's loops make ORT warn about subgraph names; only errors matter
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_onnx(
    method: Method, out: str | Path, check_images: Sequence[str | np.ndarray] | None = None
) -> ExportResult:
    """Write `out` (the graph) and `out` + ".json" (the sidecar), after checking the graph in ONNX
    Runtime against `method.predict_proba` on `check_images` (files or uint8 arrays; default:
    generated ones). Nothing is written if the check fails."""
    problem = export_problem(method)
    if problem:
        raise ConfigError(problem)
    method._check_fitted()
    out = Path(out)
    bb = method.backbone
    activation = method.activation
    graph = ProbabilityGraph(method, activation).eval()
    size = bb.image_size
    items = check_items(check_images)
    pixels = torch.stack([bb.preprocess(decode(it, size=size)) for it in items])  # [n, 3, H, W]
    expected = method.predict_proba(Dataset(items=items, classnames=method.classnames, name="export-check"))
    sidecar = out.with_name(out.name + ".json")
    with atomic_path(out) as tmp:
        with torch.no_grad(), warnings.catch_warnings(), _symbolics():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns about traced shape checks
            torch.onnx.export(
                graph,
                (torch.zeros(2, 3, size, size),),
                str(tmp),
                dynamo=False,
                input_names=["pixels"],
                output_names=["probs"],
                dynamic_axes={"pixels": {0: "n"}, "probs": {0: "n"}},
                opset_version=OPSET,
            )
        got = _session(tmp).run(None, {"pixels": pixels.numpy().astype(np.float32)})[0]
        diff = float(np.abs(got - expected).max())
        if not diff <= TOLERANCE:
            raise ConfigError(
                f"{method.name}: the exported graph differs from predict_proba by {diff:.2e} (> {TOLERANCE:g}) "
                f"on {len(items)} image(s); nothing written"
            )
        rule = method.decision()
        write_json(
            sidecar,
            {
                "format": "vlclassify-onnx",
                "version": EXPORT_VERSION,
                "graph": out.name,
                "opset": OPSET,
                "method": method.name,
                "inputs": {"pixels": {"shape": ["n", 3, size, size], "dtype": "float32", "layout": "NCHW, RGB"}},
                "outputs": {
                    "probs": {"shape": ["n", len(method.classnames)], "dtype": "float32", "scores": activation}
                },
                "classes": method.classnames,
                "multilabel": method.multilabel,
                "preprocessing": {
                    **bb.preprocess_config(),
                    "image_size": size,
                    "input": "8-bit RGB; transparency pasted onto white (vlclassify.data.decoder.to_rgb)",
                },
                "decision": {"rule": rule.describe(), **rule.to_dict()},
                "backbone": {"name": bb.name, "weights": bb.weights_fingerprint()},
                "check": {"images": len(items), "max_abs_diff": diff, "tolerance": TOLERANCE},
            },
        )
    return ExportResult(out, sidecar, f"pixels [n, 3, {size}, {size}]", len(items), diff)
