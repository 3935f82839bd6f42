"""L2-regularised logistic regression by full-batch L-BFGS in torch: the linear probe's solver.

It minimises scikit-learn's `LogisticRegression(C)` objective — the mean loss plus
0.5 / (C * N) * ||W||^2, the bias unpenalised (sklearn's sum-of-losses form divided by N) — with
the same stopping rule (max |gradient| <= tol), so validation picks the same C. Multinomial
softmax over the classes present (two classes: one binary logistic, as sklearn fits it), or
one-vs-rest sigmoids for multi-label targets. Along a C path each fit starts from the previous
solution, and the whole problem runs as float32 matrix products on the GPU when there is one:
that is where the speed-up over sklearn's float64 per-C fits comes from (docs/results/linear-probe-solver.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

ABSENT_BIAS = -1e4  # bias of a class with no training example: never predicted


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _lbfgs(
    x: torch.Tensor,
    loss_fn,
    w: torch.Tensor,
    b: torch.Tensor,
    C: float,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise mean(loss_fn(x @ w.T + b)) + 0.5 / (C N) ||w||^2 from (w, b); returns (w, b, iterations)."""
    n = x.shape[0]
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    reg = 0.5 / (C * n)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.25),
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(torch.addmm(b, x, w.T)) + reg * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), int(opt.state[w].get("n_iter", 0))


def fit_logistic(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    C: float,
    multilabel: bool = False,
    num_classes: int | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one C. x [N, F]; y [N] class indices (or [N, K] 0/1 with `multilabel`).

    Returns float32 CPU (W [K, F], b [K]) such that `x @ W.T + b` are softmax logits (sigmoid
    logits with `multilabel`). K is `num_classes` (default: max label + 1, or y's width); a class
    absent from training gets W = 0 and b = -1e4. `init` (a previous (W, b), e.g. the fit at the
    previous C) warm-starts the solver."""
    return _fit(x, y, C, multilabel, num_classes, init, max_iter, tol, device)[:2]


def fit_logistic_path(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    Cs: Sequence[float],
    multilabel: bool = False,
    num_classes: int | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`fit_logistic` for every C in `Cs` (returned in the order given), solved from the smallest C
    up, each fit warm-started from the previous one's solution."""
    dev = _device(device)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x, device=dev).float()
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    init = None
    for i in sorted(range(len(Cs)), key=lambda j: Cs[j]):
        w, b, init = _fit(xt, y, Cs[i], multilabel, num_classes, init, max_iter, tol, dev)
        out[i] = (w, b)
    return [out[i] for i in range(len(Cs))]


def _fit(x, y, C, multilabel, num_classes, init, max_iter, tol, device):
    """Returns (W, b) for the caller and the raw solution (on the device) to warm-start the next C."""
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    dev = _device(device)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x).to(dev).float()
    y = torch.as_tensor(np.asarray(y) if isinstance(y, np.ndarray) else y).to(dev)
    n, f = x.shape
    if n == 0:
        raise ValueError("fit_logistic: no training rows")
    if multilabel:
        y = y.float()
        k = num_classes or y.shape[1]
        w0, b0 = init if init is not None else (torch.zeros(k, f, device=dev), torch.zeros(k, device=dev))
        pos = y.mean(0)
        const = (pos == 0) | (pos == 1)  # a label always on or always off: a constant predictor, as sklearn's OvR
        w, b, _ = _lbfgs(
            x,
            lambda z: F.binary_cross_entropy_with_logits(z, y, reduction="sum") / n,
            w0.to(dev),
            b0.to(dev),
            C,
            max_iter,
            tol,
        )
        w[const] = 0
        b[const] = torch.where(pos[const] > 0, -ABSENT_BIAS, ABSENT_BIAS)
        return w.cpu(), b.cpu(), (w, b)
    y = y.long()
    k = num_classes or int(y.max()) + 1
    present = torch.unique(y)
    W = torch.zeros(k, f)
    B = torch.full((k,), ABSENT_BIAS)
    if len(present) == 1:
        B[present] = 0.0
        return W, B, init
    if len(present) == 2:  # sklearn's binary model: one logistic, shared as +-half logits for the softmax
        t = (y == present[1]).float()
        if init is not None and init[0].shape[0] == 1:
            w0, b0 = init
        else:
            w0, b0 = torch.zeros(1, f, device=dev), torch.zeros(1, device=dev)
        w, b, _ = _lbfgs(
            x,
            lambda z: F.binary_cross_entropy_with_logits(z[:, 0], t, reduction="sum") / n,
            w0.to(dev),
            b0.to(dev),
            C,
            max_iter,
            tol,
        )
        W[present] = torch.cat([-w, w]).cpu() / 2
        B[present] = torch.cat([-b, b]).cpu() / 2
        return W, B, (w, b)
    remap = torch.full((k,), -1, dtype=torch.long, device=dev)
    remap[present] = torch.arange(len(present), device=dev)
    t = remap[y]
    if init is not None and init[0].shape[0] == len(present):
        w0, b0 = init
    else:
        w0, b0 = torch.zeros(len(present), f, device=dev), torch.zeros(len(present), device=dev)
    w, b, _ = _lbfgs(x, lambda z: F.cross_entropy(z, t, reduction="sum") / n, w0.to(dev), b0.to(dev), C, max_iter, tol)
    W[present.cpu()] = w.cpu()
    B[present.cpu()] = b.cpu()
    return W, B, (w, b)
