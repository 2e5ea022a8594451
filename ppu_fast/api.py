"""Public entry points: ``refine`` (probabilities in, refined targets out), ``solve`` and ``targets``
(the low-level pair for front ends that build their own P^ and weights)."""

from __future__ import annotations

import time
from typing import Optional, Tuple, Union

import numpy as np
import torch

from . import problem as pb
from .backends import get_backend
from .solver import RefineInfo, solve_dual

ArrayLike = Union[torch.Tensor, np.ndarray]


def _fill_log_p(out: torch.Tensor, x: torch.Tensor, is_probs: bool) -> None:
    """out <- log P (or log_softmax(logits)), computed in float32 chunk by chunk."""
    n, k = x.shape
    for sl in pb.row_chunks(n, k):
        c = x[sl].float()
        out[sl] = torch.log(c) if is_probs else torch.log_softmax(c, dim=1)


def refine(probs: Optional[ArrayLike] = None, forget_mask=None, *,
           logits: Optional[ArrayLike] = None, lam: float = 1.0, pseudo="uniform",
           marginals="retain", method: str = "newton", tol: float = 1e-6,
           max_iter: Optional[int] = None, backend: str = "auto",
           generator: Optional[torch.Generator] = None, return_info: bool = False,
           step_size: Optional[float] = None):
    """Refine a model's training-set probabilities into PPU targets.

    Replaces the forget rows of P by pseudo-probabilities (P^), then solves
    ``min_Q sum_i c_i KL(q_i || p^_i)`` with row sums 1 and column sums M (c_i = 1 on forget
    rows, ``lam`` on retain rows).

    Args:
        probs: probabilities (N x k), rows on the simplex; or pass ``logits`` instead.
        forget_mask: bool (N,) or integer row indices of the rows to forget.
        logits: raw model outputs (N x k); log-softmax is taken inside.
        lam: weight of the retain rows, > 0 (forget rows weigh 1).
        pseudo: "uniform" | "random" | "prior" | probabilities (N_forget x k).
        marginals: "retain" | "original" | class totals (k,) summing to N.
        method: "newton" | "sinkhorn" | "gradient" (``step_size`` sets the gradient's eta).
        tol: stop when ``||colsum(Q) - M||_1 / N <= tol``.
        max_iter: most passes over the matrix (default per method).
        backend: "auto" or a backend name (see ``python -m ppu_fast.info``).
        generator: torch.Generator for ``pseudo="random"``.
        return_info: also return a :class:`RefineInfo`.

    Returns:
        Q (N x k) with the dtype and device of the input (numpy in, numpy out), or (Q, info).
    """
    t0 = time.perf_counter()
    if (probs is None) == (logits is None):
        raise ValueError("probs, logits: pass exactly one of them (got "
                         f"{'both' if probs is not None else 'neither'})")
    name = "probs" if probs is not None else "logits"
    x, from_numpy = pb.to_tensor(probs if probs is not None else logits, name)
    n, k = pb.check_matrix(x, name)
    if not isinstance(lam, (int, float)) or not lam > 0 or not np.isfinite(lam):
        raise ValueError(f"lam: expected a finite number > 0, got {lam!r}")
    mask = pb.forget_rows(forget_mask, n)
    mask_dev = mask.to(x.device)
    n_forget = int(mask.sum())
    colsum_retain, colsum_forget = pb.scan_rows(x, probs is not None, mask_dev, name)
    prior = None
    if isinstance(pseudo, str) and pseudo == "prior":
        # The retain rows' mean distribution; with none retained, the uninformative prior.
        prior = (colsum_retain / (n - n_forget) if n_forget < n
                 else torch.full((k,), 1.0 / k, dtype=torch.float64))
    pseudo_t = pb.pseudo_probs(pseudo, n_forget, k, prior, generator)
    if k == 1:
        info = RefineInfo(iterations=0, converged=True, residual=0.0, history=[0.0],
                          dual_value=0.0, alpha=torch.zeros(1, dtype=torch.float64),
                          method=method, backend="none", seconds=time.perf_counter() - t0,
                          message="k == 1: the only distribution is [1]")
        q = torch.ones_like(x)
        q = q.numpy() if from_numpy else q
        return (q, info) if return_info else q

    pseudo_colsum = pseudo_t.double().sum(dim=0)
    # With no retain rows, "retain" marginals fall back to P^'s own totals (then Q = P^).
    m = pb.target_marginals(marginals, colsum_retain, colsum_forget, n, k, pseudo_colsum)
    # A class has support in P^ when a retained row or a pseudo row gives it probability.
    pb.check_feasible((colsum_retain > 0) | (pseudo_colsum > 0), m)

    # The output buffer holds log P^ while solving and is overwritten by Q in place at the end,
    # so a refine needs no N x k temporary besides its result.
    out = torch.empty(x.shape, dtype=pb.solver_dtype(x.dtype), device=x.device)
    _fill_log_p(out, x, probs is not None)
    if n_forget:
        out[mask_dev] = torch.log(pseudo_t).to(device=x.device, dtype=out.dtype)
    inv_c = torch.where(mask_dev, torch.tensor(1.0, device=x.device),
                        torch.tensor(1.0 / float(lam), device=x.device)).float()
    be = get_backend(backend, out)
    info = solve_dual(be, out, inv_c, m, method=method, tol=tol, max_iter=max_iter,
                      step_size=step_size)
    be.materialize(out, inv_c, info.alpha.to(out.device), out)
    q = out if out.dtype == x.dtype else out.to(x.dtype)
    info.seconds = time.perf_counter() - t0
    if from_numpy:
        q = q.cpu().numpy()
    return (q, info) if return_info else q


def _prepare_log_p(log_p: ArrayLike) -> Tuple[torch.Tensor, bool, torch.dtype]:
    """(log_p in a dtype the backends take, came_from_numpy, the caller's dtype)."""
    lp, from_numpy = pb.to_tensor(log_p, "log_p")
    pb.check_matrix(lp, "log_p")
    pb.check_log_p(lp)
    return lp.to(pb.solver_dtype(lp.dtype)), from_numpy, lp.dtype


def solve(log_p: ArrayLike, weights: ArrayLike, marginals: ArrayLike, *, method: str = "newton",
          tol: float = 1e-6, max_iter: Optional[int] = None, backend: str = "auto",
          step_size: Optional[float] = None) -> Tuple[torch.Tensor, RefineInfo]:
    """Solve the dual for a caller-built problem.

    Args:
        log_p: log P^ (N x k); rows need not be normalised (a per-row shift changes nothing);
            -inf marks zero probabilities.
        weights: c (N,), > 0: the weight of each row's KL term.
        marginals: M (k,), >= 0, summing to N.

    Returns:
        (alpha (k,) float64 on log_p's device, info); ``info.alpha`` is the same on the CPU. ``targets(log_p, weights, alpha)`` gives Q.
    """
    lp, _, _ = _prepare_log_p(log_p)
    n, k = lp.shape
    c = pb.check_weights(weights, n)
    m = pb.check_marginals(marginals, n, k)
    pb.check_feasible(pb.support_of(lp), m)
    inv_c = (1.0 / c).float().to(lp.device)
    be = get_backend(backend, lp)
    info = solve_dual(be, lp, inv_c, m, method=method, tol=tol, max_iter=max_iter,
                      step_size=step_size)
    return info.alpha.to(lp.device), info


def targets(log_p: ArrayLike, weights: ArrayLike, alpha: ArrayLike, *,
            backend: str = "auto") -> ArrayLike:
    """Q(alpha) (N x k): ``q_ik = softmax_k(log_p_ik - alpha_k / c_i)``, in log_p's dtype (float32
    for float64 input is computed, then cast back) and device; numpy in, numpy out."""
    lp, from_numpy, orig_dtype = _prepare_log_p(log_p)
    n, k = lp.shape
    c = pb.check_weights(weights, n)
    a, _ = pb.to_tensor(alpha, "alpha")
    if a.shape != (k,):
        raise ValueError(f"alpha: shape {tuple(a.shape)}; expected ({k},)")
    a = a.detach().to(device=lp.device, dtype=torch.float64)
    inv_c = (1.0 / c).float().to(lp.device)
    be = get_backend(backend, lp)
    out = torch.empty(lp.shape, dtype=lp.dtype, device=lp.device)
    be.materialize(lp, inv_c, a, out)
    q = out.to(orig_dtype)
    return q.cpu().numpy() if from_numpy else q
