"""Building the refinement problem: P^ (as log-probabilities), the row weights and the targets M.

Every check here raises a ValueError / TypeError naming the argument, what was wrong (with the
first offending row or class) and what is expected. Nothing passed in is modified. Large inputs
are scanned in row chunks so that validation needs no N x k temporaries.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from .backends.base import SUPPORTED_DTYPES
from .backends.torch_ref import chunk_rows

PSEUDO_NAMES = ("uniform", "random", "prior")
MARGINAL_NAMES = ("retain", "original")
ROW_SUM_TOL = 1e-3
MARGINAL_RTOL = 1e-6

ArrayLike = Union[torch.Tensor, np.ndarray]


def to_tensor(x, name: str) -> Tuple[torch.Tensor, bool]:
    """(tensor, came_from_numpy). Numpy arrays are wrapped without copying."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), True
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def row_chunks(n: int, k: int) -> Iterator[slice]:
    rows = chunk_rows(n, k)
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def _first_row(bad_rows: torch.Tensor, offset: int) -> int:
    return offset + int(torch.nonzero(bad_rows)[0, 0])


def check_matrix(x: torch.Tensor, name: str) -> Tuple[int, int]:
    """Shape and dtype checks shared by probs, logits and log_p; returns (N, k)."""
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D array (N x k), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    n, k = x.shape
    if n == 0:
        raise ValueError(f"{name}: N == 0 rows; expected at least one row")
    if k == 0:
        raise ValueError(f"{name}: k == 0 classes; expected at least one column")
    return n, k


def scan_rows(x: torch.Tensor, is_probs: bool, forget: Optional[torch.Tensor] = None,
              name: str = "probs") -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate probabilities (or logits) and sum their normalised rows, in one chunked pass.

    Probabilities must be finite, non-negative, with rows summing to 1 within ROW_SUM_TOL
    (within 2 ulps of 1 for half dtypes, whose rounding alone moves a row sum by more than 1e-3);
    logits must be finite. Returns the column sums (k,) float64 on the CPU of the rows of
    softmax(logits) or of P normalised to sum exactly 1, over the retained rows and over the
    ``forget`` rows (a bool mask (N,) on x's device; None means no forget rows).
    """
    n, k = x.shape
    tol = max(ROW_SUM_TOL, 2 * torch.finfo(x.dtype).eps)
    sums = torch.zeros(k, 2, dtype=torch.float64, device=x.device)
    for sl in row_chunks(n, k):
        c = x[sl].double()
        rs = c.sum(dim=1)
        bad = ~torch.isfinite(rs)  # a NaN or +-Inf anywhere in the row
        if bad.any():
            i = _first_row(bad, sl.start)
            kind = "probabilities" if is_probs else "logits"
            raise ValueError(f"{name}: row {i} contains NaN or Inf; expected finite {kind}")
        if is_probs:
            # A global min is several times cheaper than a per-row one; rows only on failure.
            if bool(c.min() < 0):
                i = _first_row(c.amin(dim=1) < 0, sl.start)
                raise ValueError(f"{name}: row {i} has a negative entry "
                                 f"({float(x[i].min()):.3g}); expected probabilities >= 0")
            bad = (rs - 1).abs() > tol
            if bad.any():
                i = _first_row(bad, sl.start)
                raise ValueError(f"{name}: row {i} sums to {float(rs[i - sl.start]):.6g}; expected "
                                 f"rows on the simplex (sum 1 within {tol:.3g})")
            # Normalising keeps sum(M) == N exactly although rows only sum to 1 within tol.
            w = 1.0 / rs
        else:
            c = torch.softmax(c, dim=1)
            w = torch.ones_like(rs)
        f = (forget[sl] if forget is not None
             else torch.zeros(c.shape[0], dtype=torch.bool, device=x.device))
        weights = torch.stack([torch.where(f, 0.0, w), torch.where(f, w, 0.0)], dim=1)
        sums += (weights.T @ c).T  # (2 x r) @ (r x k): BLAS's fast orientation here
    sums = sums.cpu()
    return sums[:, 0].contiguous(), sums[:, 1].contiguous()


def check_log_p(log_p: torch.Tensor, name: str = "log_p") -> None:
    """Log-probabilities (rows need not be normalised): no NaN, no +inf, a finite entry per row."""
    n, k = log_p.shape
    for sl in row_chunks(n, k):
        c = log_p[sl]
        bad = torch.isnan(c).any(dim=1) | (c == float("inf")).any(dim=1)
        if bad.any():
            i = _first_row(bad, sl.start)
            raise ValueError(f"{name}: row {i} contains NaN or +Inf; expected log-probabilities "
                             f"(finite or -inf)")
        bad = ~torch.isfinite(c).any(dim=1)
        if bad.any():
            i = _first_row(bad, sl.start)
            raise ValueError(f"{name}: row {i} is entirely -inf (all probabilities zero); "
                             f"expected at least one finite entry per row")


def forget_rows(forget_mask, n: int) -> torch.Tensor:
    """A bool mask (N,) from a bool mask or integer row indices (tensor, array or sequence)."""
    if forget_mask is None:
        raise ValueError("forget_mask: required; pass a bool mask (N,) or row indices "
                         "(an empty index tensor forgets nothing)")
    if isinstance(forget_mask, np.ndarray):
        forget_mask = torch.from_numpy(forget_mask)
    elif not isinstance(forget_mask, torch.Tensor):
        forget_mask = torch.as_tensor(list(forget_mask), dtype=torch.long)
    fm = forget_mask.detach().cpu()
    if fm.dim() != 1:
        raise ValueError(f"forget_mask: expected 1-D (a bool mask (N,) or row indices), got shape "
                         f"{tuple(fm.shape)}")
    if fm.dtype == torch.bool:
        if fm.numel() != n:
            raise ValueError(f"forget_mask: bool mask has length {fm.numel()}; expected N = {n}")
        return fm.clone()
    if fm.is_floating_point() or fm.is_complex():
        raise TypeError(f"forget_mask: expected bool or integer dtype, got {fm.dtype}")
    fm = fm.long()
    if fm.numel() and (int(fm.min()) < -n or int(fm.max()) >= n):
        bad = fm[(fm < -n) | (fm >= n)][0]
        raise ValueError(f"forget_mask: row index {int(bad)} is out of range; expected indices in "
                         f"[0, {n})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[fm] = True
    return mask


def pseudo_probs(pseudo, n_forget: int, k: int, prior: torch.Tensor,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pseudo-probabilities for the forget rows, float32 (N_forget x k), on the CPU."""
    if isinstance(pseudo, str):
        if pseudo == "uniform":
            return torch.full((n_forget, k), 1.0 / k)
        if pseudo == "random":
            z = torch.randn(n_forget, k, generator=generator)
            return torch.softmax(z, dim=1)
        if pseudo == "prior":
            return prior.float().expand(n_forget, k)
        raise ValueError(f"pseudo: unknown name {pseudo!r}; expected one of {list(PSEUDO_NAMES)} "
                         f"or a tensor (N_forget x k) of probabilities")
    t, _ = to_tensor(pseudo, "pseudo")
    if t.shape != (n_forget, k):
        raise ValueError(f"pseudo: shape {tuple(t.shape)}; expected (N_forget, k) = "
                         f"({n_forget}, {k})")
    if not t.is_floating_point():
        raise TypeError(f"pseudo: expected a floating-point dtype, got {t.dtype}")
    if n_forget:
        scan_rows(t, True, name="pseudo")
    return t.detach().cpu().float()


def target_marginals(marginals, colsum_retain: torch.Tensor, colsum_forget: torch.Tensor,
                     n: int, k: int, p_hat_colsum: torch.Tensor) -> torch.Tensor:
    """The class totals M (k,) float64 on the CPU, summing to N (DESIGN.md §1).

    ``colsum_retain`` / ``colsum_forget``: column sums of P over the retain / forget rows;
    ``p_hat_colsum``: column sums of P^, the fallback for "retain" when nothing is retained.
    """
    if isinstance(marginals, str):
        if marginals == "original":
            return colsum_retain + colsum_forget
        if marginals == "retain":
            n_retain = float(colsum_retain.sum())
            if n_retain < 0.5:
                # Nothing is retained: the retain mix is undefined; keep P^'s own totals.
                return p_hat_colsum
            return colsum_retain * (n / n_retain)
        raise ValueError(f"marginals: unknown name {marginals!r}; expected one of "
                         f"{list(MARGINAL_NAMES)} or a tensor (k,) summing to N")
    return check_marginals(marginals, n, k)


def check_marginals(marginals, n: int, k: int) -> torch.Tensor:
    """Validate user marginals: (k,), finite, >= 0, summing to N (relative tolerance 1e-6)."""
    t, _ = to_tensor(marginals, "marginals")
    t = t.detach().cpu()
    if t.shape != (k,):
        raise ValueError(f"marginals: shape {tuple(t.shape)}; expected ({k},), one total per class")
    t = t.double()
    if not torch.isfinite(t).all():
        i = int(torch.nonzero(~torch.isfinite(t))[0, 0])
        raise ValueError(f"marginals: class {i} is NaN or Inf; expected finite class totals")
    if (t < 0).any():
        i = int(torch.nonzero(t < 0)[0, 0])
        raise ValueError(f"marginals: class {i} is negative ({float(t[i]):.6g}); expected >= 0")
    s = float(t.sum())
    if abs(s - n) > MARGINAL_RTOL * n:
        raise ValueError(f"marginals: sum to {s:.10g}; expected N = {n} (relative tolerance "
                         f"{MARGINAL_RTOL})")
    return t


def support_of(log_p: torch.Tensor) -> torch.Tensor:
    """Which classes (k,) bool have a non-zero probability in some row of ``log_p``."""
    n, k = log_p.shape
    support = torch.zeros(k, dtype=torch.bool, device=log_p.device)
    for sl in row_chunks(n, k):
        support |= (log_p[sl] > float("-inf")).any(dim=0)
    return support.cpu()


def check_feasible(support: torch.Tensor, m: torch.Tensor, name: str = "marginals") -> None:
    """A class with M_k > 0 needs at least one row of P^ with non-zero probability on it."""
    bad = (~support) & (m > 0)
    if bad.any():
        j = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{name}: infeasible: class {j} has target total {float(m[j]):.6g} > 0 "
                         f"but every row of P^ gives it probability 0; expected M_k == 0 for such "
                         f"a class, or pseudo-probabilities that give it mass")


def check_weights(weights, n: int) -> torch.Tensor:
    """Row weights c (N,), positive and finite -> float64 on the CPU."""
    t, _ = to_tensor(weights, "weights")
    t = t.detach()
    if t.shape != (n,):
        raise ValueError(f"weights: shape {tuple(t.shape)}; expected ({n},), one weight per row")
    t = t.double()
    bad = ~torch.isfinite(t) | (t <= 0)
    if bad.any():
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"weights: row {i} has weight {float(t[i]):.6g}; expected finite "
                         f"weights > 0")
    return t


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the backends run on for an input of ``dtype`` (float64 computes in float32)."""
    return dtype if dtype in SUPPORTED_DTYPES else torch.float32
