"""Export a fitted model to one ONNX graph: preprocessed pixels -> class probabilities.

A method on the contract predicts with `head(features)` over the backbone's image features
(methods/base.py), so its whole inference is one fixed graph: the backbone's image trunk (the
batch-norm-folded `inference_trunk()` where the backbone has one, as features/runtime.py runs
it), its image head (pooling, the projection into the joint space, spatial tokens if the method
reads them), the method's head, and the calibrated softmax or sigmoid that `predict_proba`
applies. A model with an "unknown" rule (trust/openset.py) also outputs its chosen open-set score
per image; the sidecar holds the threshold below which the answer is "unknown". It is traced once
in torch and written with a JSON sidecar (classes, preprocessing, calibration, decision and
"unknown" rules), after checking the graph in ONNX Runtime against `predict_proba` and
`open_set_scores` on images (to 1e-4, relative for the open-set score).

    graph: pixels [n, 3, H, W] float32 (the backbone's `preprocess`) -> probs [n, C] float32
                                                                        (open_set [n] float32)

The sidecar also records what the graph was made from (the model folder's config.json, the
backbone's weight files), its own SHA-256 and the numpy pixel recipe, so onnx_predict.py can use an
export beside a model without torch, and `export_beside` re-makes it when it is damaged or stale.
`--precision int8` adds `model-int8.onnx`: the same graph with its convolutions quantised
(features/runtime.py `quantize_int8`), sidecar `model-int8.onnx.json`.

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
from .pixels import recipe_pixels
from .trust.openset import score_tensors
from .utils import atomic_path, cached_file_fingerprint, read_json, sha256_file, write_json

EXPORT_VERSION = 2  # the sidecar's format (2: source, graph_sha256, pixels)
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
    """pixels [N, 3, H, W] -> probabilities [N, C] (and the open-set score [N]): backbone image
    features, the head, the calibrated scores."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        bb, head = method.backbone, method.head
        assert head is not None, "export_problem refuses a method without a head"
        self.backbone, self.head, self.calibration = bb, head, method.calibration()
        self.trust = method.trust
        self.keys = feature_keys(method.feature_needs())
        trunk = trunk_of(bb).inference_trunk() if has_trunk(bb) else None
        # Module.to takes memory_format (torch's docs), its overloads in the stubs do not
        self.trunk = trunk.to(memory_format=torch.contiguous_format) if trunk is not None else None  # type: ignore[call-overload]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """pixels [N, 3, H, W] -> [N, C] probabilities, as `Method.predict_proba` gives them (and,
        with an "unknown" rule, [N] its open-set score, as `Method.open_set_scores`)."""
        spatial = "spatial" in self.keys
        bb = self.backbone
        f = (
            trunk_of(bb).image_head(self.trunk(pixels), spatial=spatial)
            if self.trunk is not None
            else bb.encode_image(pixels)
        )
        feats = {"image": f.embeds, "pooled": f.pooled, "spatial": f.tokens}  # [N, D], [N, F], [N, P, D]
        z = self.head({k: feats[k] for k in self.keys})["logits"]  # [N, C]
        probs = self.calibration.scores(z)
        rule = self.trust.open_set
        if not rule.enabled:
            return probs
        mine = feats[self.trust.feature] if self.trust.feature else None  # [N, D] the class means' feature
        return probs, score_tensors(z, self.calibration, mine, self.trust.stats)[rule.score]  # [N]


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


def pixel_recipe_checked(method: Method, items: list[Item], pixels: torch.Tensor) -> dict | None:
    """The backbone's numpy pixel recipe when it gives `pixels` (its `preprocess`) to 1e-6, else None."""
    recipe = method.backbone.pixel_recipe()
    if recipe is None:
        return None
    size = method.backbone.image_size
    again = np.stack([recipe_pixels(decode(it, size=size), recipe) for it in items])  # [n, 3, H, W]
    return recipe if np.abs(again - pixels.numpy()).max() <= 1e-6 else None


def export_onnx(
    method: Method,
    out: str | Path,
    check_images: Sequence[str | np.ndarray] | None = None,
    model_dir: str | Path | None = None,
) -> ExportResult:
    """Write `out` (the graph) and `out` + ".json" (the sidecar), after checking the graph in ONNX
    Runtime against `method.predict_proba` on `check_images` (files or uint8 arrays; default:
    generated ones). Nothing is written if the check fails. `model_dir`: the folder `method` was
    loaded from, whose config.json the sidecar fingerprints (a refit makes the export stale)."""
    problem = export_problem(method)
    if problem:
        raise ConfigError(problem)
    method._check_fitted()
    out = Path(out)
    bb = method.backbone
    graph = ProbabilityGraph(method).eval()
    size = bb.image_size
    items = check_items(check_images)
    pixels = torch.stack([bb.preprocess(decode(it, size=size)) for it in items])  # [n, 3, H, W]
    check = Dataset(items=items, classnames=method.classnames, name="export-check")
    expected = method.predict_proba(check)
    rule, cal = method.trust.open_set, method.calibration()
    names = ["probs", "open_set"] if rule.enabled else ["probs"]
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
                output_names=names,
                dynamic_axes={"pixels": {0: "n"}, **{k: {0: "n"} for k in names}},
                opset_version=OPSET,
            )
        outputs = _session(tmp).run(None, {"pixels": pixels.numpy().astype(np.float32)})
        diff = float(np.abs(outputs[0] - expected).max())
        if rule.enabled:  # relative: Mahalanobis distances are in the hundreds
            want = method.open_set_scores(check)[rule.score]
            diff = max(diff, float(np.max(np.abs(outputs[1] - want) / np.maximum(1.0, np.abs(want)))))
        if not diff <= TOLERANCE:
            raise ConfigError(
                f"{method.name}: the exported graph differs from predict_proba by {diff:.2e} (> {TOLERANCE:g}) "
                f"on {len(items)} image(s); nothing written"
            )
        decision = method.decision()
        config = Path(model_dir) / "config.json" if model_dir is not None else None
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
                    "probs": {"shape": ["n", len(method.classnames)], "dtype": "float32", "scores": cal.activation},
                    **(
                        {
                            "open_set": {
                                "shape": ["n"],
                                "dtype": "float32",
                                "score": rule.score,
                                "unknown_below": rule.threshold,
                            }
                        }
                        if rule.enabled
                        else {}
                    ),
                },
                "classes": method.classnames,
                "multilabel": method.multilabel,
                "preprocessing": {
                    **bb.preprocess_config(),
                    "image_size": size,
                    "input": "8-bit RGB; transparency pasted onto white (vlclassify.data.decoder.to_rgb)",
                },
                "decision": {"rule": decision.describe(), **decision.to_dict()},
                "calibration": {"rule": cal.describe(), **cal.to_dict()},
                "unknown": {"rule": rule.describe(), **rule.to_dict(), "applies": not method.multilabel},
                "backbone": {"name": bb.name, "weights": bb.weights_fingerprint()},
                "check": {"images": len(items), "max_abs_diff": diff, "tolerance": TOLERANCE},
                "precision": "fp32",
                "graph_sha256": sha256_file(tmp),
                "pixels": pixel_recipe_checked(method, items, pixels),
                "source": {
                    "config_sha256": sha256_file(config) if config is not None else None,
                    "backbone_files": {f: cached_file_fingerprint(f) for f in bb.weight_files()},
                },
            },
        )
    return ExportResult(out, sidecar, f"pixels [n, 3, {size}, {size}]", len(items), diff)


def onnx_problem(method: Method) -> str | None:
    """Why `method` cannot predict through an export without torch (one line), or None."""
    problem = export_problem(method)
    if problem is None and method.backbone.pixel_recipe() is None:
        problem = f"backbone {method.backbone.name}'s preprocessing is not a numpy recipe (pixels.py)"
    return problem


def export_beside(method: Method, model_dir: str | Path, precision: str = "fp32") -> Path:
    """The export onnx_predict.py answers from, beside the folder `method` was loaded from: made
    (or made again: missing, stale, damaged) only when `export_problem_here` says so; `int8` also
    quantises it (model-int8.onnx). -> the graph of `precision`. Check `onnx_problem` first."""
    from .features.runtime import calibration_pixels, quantize_int8
    from .onnx_predict import export_problem_here, graph_path, sidecar_path

    model_dir = Path(model_dir)
    fp32 = graph_path(model_dir)
    if export_problem_here(model_dir) is not None:
        export_onnx(method, fp32, model_dir=model_dir)
    if precision == "fp32":
        return fp32
    int8 = graph_path(model_dir, precision)
    if export_problem_here(model_dir, precision) is not None:
        side = read_json(sidecar_path(fp32))
        with atomic_path(int8) as tmp:
            quant = quantize_int8(fp32, tmp, calibration_pixels(method.backbone))
            bb = method.backbone
            pixels = torch.stack([bb.preprocess(decode(it, size=bb.image_size)) for it in check_items(None)]).numpy()
            diff = float(
                np.abs(
                    _session(tmp).run(None, {"pixels": pixels})[0] - _session(fp32).run(None, {"pixels": pixels})[0]
                ).max()
            )
            side.update(
                graph=int8.name,
                precision="int8",
                graph_sha256=sha256_file(tmp),
                quantization=quant,
                check={"images": len(pixels), "max_abs_diff_vs_fp32": diff},
            )
            write_json(sidecar_path(int8), side)
    return int8
