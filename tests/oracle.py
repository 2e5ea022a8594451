"""An independent float64 oracle for every backend operation, the torch reference included.

Written in numpy from the formulas of docs/design.md §1 and the backend contract
(ppu_fast/backends/base.py), sharing no code with the backends: the reference is judged against
this, never against itself. ``1 - q_ij`` is formed as the exclusive sum of the row's other entries
(prefix + suffix sums), which is exact to float64 rounding even for one-hot rows whose
``1 - q`` is 1e-26.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ppu_fast.backends.base import HESS_BLOCK, hessian_stride


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, float)


def softmax_rows(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(q, log Z) of each row of x (float64); -inf entries give exact zeros."""
    m = np.max(x, axis=1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    return e / s, (m + np.log(s))[:, 0]


def one_minus(q: np.ndarray) -> np.ndarray:
    """sum_{l != j} q_il for every entry, by exclusive prefix + suffix sums (no cancellation)."""
    zero = np.zeros((q.shape[0], 1))
    pre = np.concatenate([zero, np.cumsum(q, axis=1)[:, :-1]], axis=1)  # sum_{l < j}
    suf = np.concatenate([np.cumsum(q[:, ::-1], axis=1)[:, ::-1][:, 1:], zero], axis=1)  # l > j
    return pre + suf


def sampled_rows(n: int, k: int) -> np.ndarray:
    """Rows of the Hessian's off-diagonal sample: 16-row blocks b with b % m == 0."""
    m = hessian_stride(n, k)
    return np.nonzero((np.arange(n) // HESS_BLOCK) % m == 0)[0]


def newton_hessian(d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The contract's assembled Hessian from the exact diagonal d and sampled weights W: the
    Laplacian L of W's off-diagonal part, scaled S L S with S = sqrt(d / diag L)."""
    k = d.shape[0]
    w = w.copy()
    np.fill_diagonal(w, 0.0)
    w = np.triu(w) + np.triu(w).T
    lap = -w
    ld = w.sum(axis=1)
    lap[np.diag_indices(k)] = ld
    ok = ld > 0
    s = np.zeros(k)
    s[ok] = np.sqrt(d[ok] / ld[ok])
    h = s[:, None] * lap * s[None, :]
    h[np.diag_indices(k)] = d  # s_j^2 L_jj = d_j where the sample reaches class j; d_j alone else
    return h


def stats(q: np.ndarray, log_z: np.ndarray, inv_c: np.ndarray, hessian, n_total: Optional[int] = None,
          rows: Optional[np.ndarray] = None):
    """(colsum, wlogz, H) of rows q with weights inv_c; H as the contract defines for ``hessian``.
    ``rows``: the global indices of q's rows (for the Hessian sample); default 0..r-1."""
    colsum = q.sum(axis=0)
    wlogz = float((log_z / inv_c).sum())
    if hessian is False:
        return colsum, wlogz, None
    d = (inv_c[:, None] * q * one_minus(q)).sum(axis=0)
    if hessian == "diag":
        return colsum, wlogz, d
    n = q.shape[0] if n_total is None else n_total
    rows = np.arange(q.shape[0]) if rows is None else rows
    keep = (np.ones(q.shape[0], dtype=bool) if hessian == "exact"
            else np.isin(rows, sampled_rows(n, q.shape[1])))
    qs, ws = q[keep], inv_c[keep]
    w = (qs * ws[:, None]).T @ qs
    return colsum, wlogz, newton_hessian(d, w)


def oracle_q(log_p, inv_c, alpha) -> np.ndarray:
    """Q(alpha) in float64 (N x k)."""
    x = _np(log_p) - _np(inv_c)[:, None] * _np(alpha)[None, :]
    return softmax_rows(x)[0]


def oracle_step(log_p, inv_c, alpha, hessian=False):
    """``step`` in float64: (colsum (k,), wlogz, H or None) as numpy."""
    lp, ic = _np(log_p), _np(inv_c)
    q, lz = softmax_rows(lp - ic[:, None] * _np(alpha)[None, :])
    return stats(q, lz, ic, hessian)


def wlogz_scale(log_p, inv_c, alpha) -> float:
    """sum_i |log Z_i| / inv_c_i: the scale of wlogz's rounding (its terms may cancel)."""
    lp, ic = _np(log_p), _np(inv_c)
    _, lz = softmax_rows(lp - ic[:, None] * _np(alpha)[None, :])
    return float((np.abs(lz) / ic).sum())


def row_faults(x: np.ndarray, mode: str, tol: float) -> np.ndarray:
    """Fault kind per row (0 none, 1 non-finite, 2 negative, 3 off the simplex, 4 all -inf)."""
    kinds = np.zeros(x.shape[0], dtype=int)
    with np.errstate(invalid="ignore"):
        if mode == "log_p":
            kinds[np.all(~(x > -np.inf), axis=1)] = 4
            kinds[np.any(np.isnan(x) | (x == np.inf), axis=1)] = 1
            return kinds
        if mode == "probs":
            kinds[np.abs(x.sum(axis=1) - 1.0) > tol] = 3
            kinds[np.any(x < 0, axis=1)] = 2
        kinds[~np.all(np.isfinite(x), axis=1)] = 1
    return kinds


def oracle_prepare(x, mode: str, forget=None, fill=None, inv_c=None, hessian=False,
                   tol: float = 1e-3, stored_dtype=None):
    """What ``prepare`` must return, in float64: dict with error (kind, row) or None, log_p (the
    rows to write, N x k), retain_sums / forget_sums (probs, logits) or support (log_p) and
    first (colsum, wlogz, H) when inv_c is given. ``stored_dtype``: the solver buffer's dtype,
    whose rounded values "log_p" mode evaluates (the contract: the values as stored)."""
    xv = _np(x)
    n, k = xv.shape
    kinds = row_faults(xv, mode, tol)
    bad = np.nonzero(kinds)[0]
    out = {"error": (int(kinds[bad[0]]), int(bad[0])) if bad.size else None}
    f = np.zeros(n, bool) if forget is None else _np(forget).astype(bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "probs":
            pn = xv / xv.sum(axis=1, keepdims=True)
            lp = np.log(pn)
        elif mode == "logits":
            pn, lz = softmax_rows(xv)
            lp = xv - lz[:, None]
        else:
            pn, lp = None, xv.copy()
    if fill is not None:
        lp[f] = _np(fill)[None, :]
    out["log_p"] = lp
    if mode == "log_p":
        out["support"] = np.any(xv > -np.inf, axis=0)
    else:
        out["retain_sums"] = pn[~f].sum(axis=0)
        out["forget_sums"] = pn[f].sum(axis=0)
    if inv_c is not None and out["error"] is None:
        ic = _np(inv_c)
        if mode == "log_p":
            stored = lp if stored_dtype is None else _np(torch.from_numpy(lp).to(stored_dtype))
            q, lz = softmax_rows(stored)
        else:
            q, lz = pn.copy(), np.zeros(n)
            if fill is not None and f.any():
                qf, lzf = softmax_rows(_np(fill)[None, :])
                q[f] = qf[0]
                lz[f] = lzf[0]
        out["first"] = stats(q, lz, ic, hessian)
        out["wlogz_scale"] = float((np.abs(lz) / ic).sum())
    return out


def hessian_error(h, ref: np.ndarray, floor: float) -> float:
    """The Hessian's error as Newton feels it: max |(H - H*)_jl| / sqrt(D_j D_l) with D the
    oracle's diagonal (at least ``floor``); a diagonal (k,) is compared entry by entry."""
    hv = _np(h)
    if ref.ndim == 1:
        return float(np.max(np.abs(hv - ref) / np.maximum(ref, floor)))
    dd = np.sqrt(np.maximum(np.diag(ref), floor))
    return float(np.max(np.abs(hv - ref) / dd[:, None] / dd[None, :]))


def oracle_solve(log_p, c, m, tol: float = 1e-10, max_iter: int = 500, alpha0=None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha (k,), Q (N x k)) of the refinement problem, solved in float64 from the formulas:
    ``q_ik = softmax_k(log_p_ik - alpha_k / c_i)``, damped Newton with the exact Hessian on the
    dual, on the weights c / min(c) (only their ratios matter; the alpha returned is the caller's,
    for c). ``alpha0``: the caller's alpha to start from (zero by default): the pure Newton step
    crawls from zero on some saturated problems, yet converges quadratically from near the optimum,
    so another solver's answer can seed it without the oracle trusting that answer. Raises
    AssertionError if ``||colsum - M||_1 / N`` does not reach ``tol``."""
    a, q, res = oracle_newton(log_p, c, m, tol, max_iter, alpha0)
    assert res <= tol, f"oracle_solve: residual {res:.3g} > {tol:.3g} after {max_iter} steps"
    return a, q


def oracle_newton(log_p, c, m, tol: float = 1e-10, max_iter: int = 500, alpha0=None
                  ) -> Tuple[np.ndarray, np.ndarray, float]:
    """:func:`oracle_solve`'s Newton without its assertion: (alpha, Q, residual) of the first
    iterate within ``tol``, or else of the one with the smallest residual (a caller that judges
    hard problems, e.g. benchmarks/fuzz_refine.py, decides what a short stop means)."""
    lp = _np(log_p)
    c = _np(c)
    m = _np(m)
    n, k = lp.shape
    c_min = float(c.min())
    ic = c_min / c
    cs = c / c_min

    def evaluate(a):
        q, log_z = softmax_rows(lp - ic[:, None] * a[None, :])
        return q, -(cs * log_z).sum() - a @ m

    a = np.zeros(k) if alpha0 is None else _np(alpha0).astype(np.float64) / c_min
    q, g = evaluate(a)
    best = None
    for _ in range(max_iter):
        grad = q.sum(0) - m
        res = np.abs(grad).sum() / n
        if best is None or res < best[2]:
            best = (a, q, res)
        if res <= tol:
            return a * c_min, q, res
        wq = ic[:, None] * q
        h = np.diag(wq.sum(0)) - wq.T @ q
        tr = max(np.trace(h), 1e-300)
        h += np.full((k, k), tr / k)  # the gauge direction
        try:
            # A tiny ridge: classes whose column is (nearly) empty at lam 1e-6 and logit margins
            # of 60 left lstsq's direction short of what three hostile calls of
            # benchmarks/fuzz_refine.py needed.
            d = np.linalg.solve(h + 1e-14 * tr * np.eye(k), grad)
        except np.linalg.LinAlgError:
            d = np.linalg.lstsq(h, grad, rcond=None)[0]
        d -= d.mean()
        t, slope = 1.0, grad @ d
        while True:
            q_n, g_n = evaluate(a + t * d)
            r_n = np.abs(q_n.sum(0) - m).sum() / n
            # Near the optimum g's float64 rounding hides the gain: a smaller residual counts too.
            if np.isfinite(g_n) and (g_n >= g + 1e-4 * t * slope or r_n < res * (1 - 1e-3)):
                break
            if t < 1e-14:
                break
            t *= 0.5
        if not np.isfinite(g_n) or (t < 1e-14 and not (g_n >= g or r_n < res)):
            break  # no usable step
        a, q, g = a + t * d, q_n, g_n
    res = np.abs(q.sum(0) - m).sum() / n
    if best is not None and not res <= best[2]:
        a, q, res = best
    return a * c_min, q, res


def oracle_refine(p, mask, lam: float = 1.0, marginals="retain", pseudo="uniform", alpha0=None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha, Q) of ``refine``'s problem built in float64 from its definition on the values
    refine reads (rows normalised; a zero of a half input is log 0 = -inf): forget rows replaced
    by the uniform distribution (``pseudo="uniform"``; anything else keeps the input's rows, as
    ``pseudo=None`` does), weights 1 on forget rows and ``lam`` on the others, and M the retain
    rows' totals scaled to N ("retain"), the input's totals ("original") or the totals given."""
    pd = _np(p)
    pd = pd / pd.sum(1, keepdims=True)
    msk = np.asarray(_np(mask), bool)
    n, k = pd.shape
    with np.errstate(divide="ignore"):
        lp = np.log(pd)
    if pseudo == "uniform":
        lp[msk] = -np.log(k)
    c = np.where(msk, 1.0, lam)
    if isinstance(marginals, str) and marginals == "retain":
        m = pd[~msk].sum(0) * n / (~msk).sum()
    elif isinstance(marginals, str) and marginals == "original":
        m = pd.sum(0)
    else:
        m = np.asarray(marginals, float)
    return oracle_solve(lp, c, m, alpha0=alpha0)
