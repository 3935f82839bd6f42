"""L2-regularised logistic regression by full-batch L-BFGS in torch: the linear probe's solver.

It minimises scikit-learn's `LogisticRegression(C)` objective — the mean loss plus
0.5 / (C * N) * ||W||^2, the bias unpenalised (sklearn's sum-of-losses form divided by N) — to the
same tolerance (max |gradient| <= tol, here of the preconditioned variables), so validation picks
the same C. Multinomial
softmax over the classes present (two classes: one binary logistic, as sklearn fits it), or
one-vs-rest sigmoids for multi-label targets. Along a C path each fit starts from the previous
solution, L-BFGS runs on exactly preconditioned variables (centred features in the scaled eigenbasis
of their covariance, `_Preconditioner`: the same minimiser in fewer iterations), and the whole
problem is float32 matrix products, on the GPU when there is one (docs/results/linear-probe-solver.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import torch_threads

ABSENT_BIAS = -1e4  # bias of a class with no training example: never predicted
Solution = tuple[torch.Tensor, torch.Tensor]  # (W [K, F], b [K])


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Preconditioner:
    """An exact change of variables that makes L-BFGS converge in far fewer iterations.

    With the bias unpenalised, centring the features changes nothing but the bias; W = (V * d) U^T
    with U the eigenvectors of the (sub-sampled) feature covariance S and d = (a S + 1 / (C N))^-1/2
    scales each direction by an approximate inverse square root of the objective's curvature there
    (`a` stands in for the softmax's). The minimiser, mapped back, is the same W: only the path to
    it is shorter. Costs one covariance of at most `rows` rows and an F x F eigendecomposition.

    With fewer rows than features (few-shot: 10 x 1280) the basis is the centred rows' own span, from
    a thin SVD: the solution lies there (the loss only sees that span, and the penalty pulls the
    rest to 0), and the F x F eigendecomposition was most of a 1-shot fit."""

    CURVATURE = 0.1  # typical softmax/sigmoid curvature p(1 - p) near a fitted optimum
    ROWS = 8192  # rows the covariance is estimated from: enough for a preconditioner

    def __init__(self, x: torch.Tensor) -> None:
        self.mu = x.mean(0)  # [F]
        sub = x[torch.linspace(0, len(x) - 1, min(len(x), self.ROWS), device=x.device).long()] - self.mu
        if len(sub) == len(x) and len(x) < x.shape[1]:  # every row, fewer than the features
            _, sv, vh = torch.linalg.svd(sub.double(), full_matrices=False)  # vh [N, F]
            evals, basis = sv.pow(2) / len(sub), vh.T
        else:
            evals, basis = torch.linalg.eigh((sub.T @ sub / len(sub)).double())  # [F], [F, F]
        self.S: torch.Tensor = evals.clamp_min(0).float()  # [R] covariance eigenvalues
        self.U: torch.Tensor = (
            basis.float()
        )  # [F, R] their eigenvectors (columns): R = F, or N for fewer rows than features

    def scale(self, C: float, n: int) -> torch.Tensor:
        """d [R]: the per-direction scale of the variables at this C and row count."""
        return (self.CURVATURE * self.S + 1.0 / (C * n)).rsqrt()  # [R]


def _lbfgs(
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    w: torch.Tensor,
    b: torch.Tensor,
    C: float,
    pre: _Preconditioner,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean(loss_fn(x @ w.T + b)) + 0.5 / (C N) ||w||^2 from (w, b); returns (w, b)."""
    n = x.shape[0]
    d = pre.scale(C, n)  # [F]
    v = ((w @ pre.U) / d).requires_grad_()  # [K, F] in the scaled eigenbasis
    c = (b + w @ pre.mu).requires_grad_()  # [K] bias of the centred features
    reg = 0.5 / (C * n)
    chunk = 10  # iterations between checks of sklearn's stopping rule; L-BFGS keeps its history across them
    opt = torch.optim.LBFGS(
        [v, c],
        lr=1.0,
        max_iter=chunk,
        max_eval=chunk * 3,
        tolerance_grad=0.0,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        vd = v * d
        W = vd @ pre.U.T  # [K, F]
        loss = loss_fn(torch.addmm(c - W @ pre.mu, x, W.T)) + reg * vd.pow(2).sum()
        loss.backward()
        return loss

    last = None
    for _ in range(0, max_iter, chunk):
        start = float(opt.step(closure).detach())  # the loss where this chunk started
        assert v.grad is not None and c.grad is not None  # the closure's backward set them
        with torch.no_grad():  # the gradient in the original (W, b): dW = (dV / d) U^T + db mu^T, db = dc
            g_w = (v.grad / d) @ pre.U.T + torch.outer(c.grad, pre.mu)
            if max(float(g_w.abs().max()), float(c.grad.abs().max())) <= tol or start == last:
                break  # converged as sklearn defines it, or no progress left at float32 precision
        last = start
    with torch.no_grad():
        W = (v * d) @ pre.U.T
        return W, c - W @ pre.mu


def fit_logistic(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    C: float,
    multilabel: bool = False,
    num_classes: int | None = None,
    init: Solution | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one C. x [N, F]; y [N] class indices (or [N, K] 0/1 with `multilabel`).

    Returns float32 CPU (W [K, F], b [K]) such that `x @ W.T + b` are softmax logits (sigmoid
    logits with `multilabel`). K is `num_classes` (default: max label + 1, or y's width); a class
    absent from training gets W = 0 and b = -1e4. `init` (a previous (W, b), e.g. the fit at the
    previous C) warm-starts the solver."""
    dev = _device(device)
    xt = _as_x(x, dev)
    with torch_threads(0, work=xt.numel() * (num_classes or 2)):
        return _fit(xt, y, C, multilabel, num_classes, init, max_iter, tol, dev, _Preconditioner(xt))[:2]


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
    xt = _as_x(x, dev)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    init = None
    with torch_threads(0, work=xt.numel() * (num_classes or 2)):
        pre = _Preconditioner(xt)
        for i in sorted(range(len(Cs)), key=lambda j: Cs[j]):
            w, b, init = _fit(xt, y, Cs[i], multilabel, num_classes, init, max_iter, tol, dev, pre)
            out[i] = (w, b)
    return [out[i] for i in range(len(Cs))]


def _as_x(x: torch.Tensor | np.ndarray, dev: torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x).to(dev).float()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"fit_logistic: x must be [N > 0, F], got {tuple(x.shape)}")
    return x


def _fit(
    x: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    C: float,
    multilabel: bool,
    num_classes: int | None,
    init: Solution | None,
    max_iter: int,
    tol: float,
    dev: torch.device,
    pre: _Preconditioner,
) -> tuple[torch.Tensor, torch.Tensor, Solution | None]:
    """Returns (W, b) for the caller and the raw solution (on the device) to warm-start the next C."""
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    y = torch.as_tensor(np.asarray(y) if isinstance(y, np.ndarray) else y).to(dev)
    n, f = x.shape
    if multilabel:
        yf = y.float()  # [N, K] 0/1
        k = num_classes or yf.shape[1]
        w0, b0 = init if init is not None else (torch.zeros(k, f, device=dev), torch.zeros(k, device=dev))
        pos = yf.mean(0)
        const = (pos == 0) | (pos == 1)  # a label always on or always off: a constant predictor, as sklearn's OvR
        w, b = _lbfgs(
            x,
            lambda z: F.binary_cross_entropy_with_logits(z, yf, reduction="sum") / n,
            w0.to(dev),
            b0.to(dev),
            C,
            pre,
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
        loss = lambda z: F.binary_cross_entropy_with_logits(z[:, 0], t, reduction="sum") / n  # noqa: E731
        w, b = _lbfgs(x, loss, w0.to(dev), b0.to(dev), C, pre, max_iter, tol)
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
    loss = lambda z: F.cross_entropy(z, t, reduction="sum") / n  # noqa: E731
    w, b = _lbfgs(x, loss, w0.to(dev), b0.to(dev), C, pre, max_iter, tol)
    W[present.cpu()] = w.cpu()
    B[present.cpu()] = b.cpu()
    return W, B, (w, b)
