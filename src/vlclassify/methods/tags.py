"""Capabilities a method declares (as scikit-learn's estimator tags): read by the CLI, the
service, export, plots and `vlclassify.testing.check_method`, never discovered by reflection."""

from __future__ import annotations

from dataclasses import dataclass

# the kinds of data a method takes (`Method.kinds`): here, torch-free, so the workflow's predict
# helpers (and the ONNX predict path through them) read them without importing the methods
SINGLE, MULTI, TEXT, TASKS = "single-label", "multi-label", "paired-text", "multi-task"
KINDS = (SINGLE, MULTI, TEXT, TASKS)
ACTIVATIONS = ("auto", "softmax", "sigmoid")
FIGURES = ("tsne", "alignment")


@dataclass(frozen=True)
class Tags:
    """What a method can do beyond fit / predict."""

    update: bool = False  # adds classes and examples to a fitted model without refitting
    explain: bool = False  # an attention map of where it looked (`vlclassify explain`)
    onnx: bool = False  # its head exports to ONNX (`vlclassify export`)
    stream: bool = False  # trains on batches read from the feature store (`--stream`)
    names_only: bool = False  # fits from class names alone, no training image needed
    activation: str = "auto"  # scores: softmax | sigmoid | auto (sigmoid for multi-label data, else softmax)
    calibrated: bool = False  # its own fit calibrates its scores on validation: fit keeps T = 1 and says so
    # extra `eval --plots` figures: "tsne" (its `embeddings(data)`), "alignment" (its `alignment(data)`)
    figures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        unknown = set(self.figures) - set(FIGURES)
        if unknown:
            raise ValueError(f"figures must be among {', '.join(FIGURES)}, got {', '.join(sorted(unknown))}")
