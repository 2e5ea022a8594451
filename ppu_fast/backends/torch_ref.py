"""The pure-PyTorch reference backend: the single reference that tests and benchmarks import.

It works over row chunks so that its temporaries stay a small multiple of one chunk
(``CHUNK_ELEMS`` elements), never several N x k matrices: a 1,000,000 x 100 float32 refine needs
far less than its own size again. Per-chunk results stay on the device (the first offending row
of ``prepare`` included) and come back to the host once per call. A float64 buffer is computed in
float64 (``base.compute_dtype``), on any device: it is the backend that serves float64 on GPUs.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .base import (CHUNK_ELEMS, ERR_ALL_NEG_INF, ERR_NEGATIVE, ERR_NONFINITE, ERR_ROWSUM,
                   ROW_SUM_TOL, Backend, Hessian, PrepareOut, StepOut, assemble_hessian,
                   check_prepare_args, check_step_args, chunk_rows, compute_dtype,
                   hessian_sample_rows, hessian_stride, ieee_matmul, packed_size,
                   unpack_prepare)

__all__ = ["TorchBackend", "chunk_rows", "shifted_logits", "step_chunk", "stats_from_q",
           "gram_chunk", "gram_from_q", "q_chunk",
           "reference_step", "reference_materialize", "reference_prepare"]


def shifted_logits(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_ik = log_p_ik - alpha_k * inv_c_i in ``compute_dtype``.  (rows x k)"""
    return (log_p.to(compute_dtype)
            - inv_c.to(compute_dtype)[:, None] * alpha.to(compute_dtype)[None, :])


def step_chunk(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
               diag: bool = False, compute_dtype: torch.dtype = torch.float32,
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One chunk of ``step``: rows (r x k) -> colsum (k,) f64, sum_i c_i log Z_i f64 and, with
    ``diag``, the Hessian's diagonal (k,) f64 (see :func:`stats_from_q`).

    Kept free of Python control flow over data so that ``torch.compile`` can fuse it; the
    benchmarks compile exactly this function.
    """
    x = shifted_logits(log_p, inv_c, alpha, compute_dtype)
    m = x.amax(dim=1, keepdim=True)
    e = torch.exp(x - m)
    s = e.sum(dim=1, keepdim=True)
    return stats_from_q(e / s, (m + torch.log(s)).squeeze(1), inv_c.to(compute_dtype), diag)


def stats_from_q(q: torch.Tensor, log_z: torch.Tensor, inv_c: torch.Tensor, diag: bool = False,
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """colsum (k,) f64, ``sum_i log Z_i / inv_c_i`` f64 and, with ``diag``, the Hessian's diagonal
    ``sum_i inv_c_i q_ij (1 - q_ij)`` (k,) f64 from rows ``q`` (r x k) and their ``log_z`` (r,).

    ``1 - q_ij`` is taken from the row's other entries: for the row maximum (the entries equal to
    max_j q_ij) it is the sum of the smaller entries plus (count of maxima - 1) times the maximum,
    which keeps a one-hot row's ``1 - q`` of 1e-13 instead of rounding it to 0; every other entry
    has ``q <= 1/2`` and ``1 - q`` loses nothing.
    """
    colsum = q.sum(dim=0, dtype=torch.float64)
    wlogz = (log_z.double() / inv_c.double()).sum()
    d = None
    if diag:
        qmax = q.amax(dim=1, keepdim=True)
        top = q == qmax
        rest = (torch.where(top, 0.0, q).sum(dim=1, keepdim=True)
                + (top.sum(dim=1, keepdim=True).to(q.dtype) - 1.0) * qmax)
        r = torch.where(top, rest, 1.0 - q)
        d = (q * r * inv_c[:, None]).sum(dim=0, dtype=torch.float64)
    return colsum, wlogz, d


def gram_chunk(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
               compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sum_i inv_c_i q_i q_i^T`` (k x k f64) over the given rows."""
    return gram_from_q(q_chunk(log_p, inv_c, alpha, compute_dtype), inv_c.to(compute_dtype))


def gram_from_q(q: torch.Tensor, inv_c: torch.Tensor) -> torch.Tensor:
    """``sum_i inv_c_i q_i q_i^T`` (k x k f64): a float32 GEMM (TF32 off), accumulated in f64."""
    qw = q * inv_c[:, None]
    with ieee_matmul():
        return (qw.T @ q).double()


def q_chunk(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
            compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q for one chunk of rows in ``compute_dtype`` (r x k).

    The row sums of exp(x - max) are taken in float64: torch's float32 softmax left rows of a
    float32 Q up to 6 ulps from summing to 1 at k = 1000, this leaves them within 1."""
    _, e, s = _exp_rows(shifted_logits(log_p, inv_c, alpha, compute_dtype))
    return e * s.reciprocal().to(compute_dtype)


def _exp_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - row max, e = exp of it, the row sums of e (r x 1) in float64) of x (r x k): a
    softmax's pieces, with its normaliser kept to float64 accuracy (Q, the normalised logits)."""
    sh = x - x.amax(dim=1, keepdim=True)
    e = torch.exp(sh)
    return sh, e, e.sum(dim=1, keepdim=True, dtype=torch.float64)


def _row_faults(x: torch.Tensor, mode: str, tol: float) -> torch.Tensor:
    """The fault kind (int64, 0 = none) of each row of x (r x k) for ``mode``."""
    if mode == "log_p":
        bad = torch.isnan(x).any(dim=1) | (x == float("inf")).any(dim=1)
        empty = ~(x > float("-inf")).any(dim=1)
        return torch.where(bad, ERR_NONFINITE, torch.where(empty, ERR_ALL_NEG_INF, 0))
    nonfinite = ~torch.isfinite(x).all(dim=1)
    if mode == "logits":
        return torch.where(nonfinite, ERR_NONFINITE, 0)
    negative = (x < 0).any(dim=1)
    off = (x.double().sum(dim=1) - 1.0).abs() > tol
    return torch.where(nonfinite, ERR_NONFINITE,
                       torch.where(negative, ERR_NEGATIVE, torch.where(off, ERR_ROWSUM, 0)))


def _log_rows(x: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log P^ rows in ``dtype``, the normalised rows (p / sum p or softmax) or None)."""
    if mode == "probs":
        s = x.double().sum(dim=1, keepdim=True).to(dtype)
        xf = x.to(dtype)
        return torch.log(xf) - torch.log(s), xf / s
    if mode == "logits":
        # The normalised rows as e / s, s summed in float64: exp(log_softmax) carries the
        # rounding of each row's log-sum-exp into every entry (rows summing to 1 +- 7e-6 at
        # k = 20,000, the class totals "original" refines aimed at off by as much).
        sh, e, s = _exp_rows(x.to(dtype))
        return sh - torch.log(s).to(dtype), e * s.reciprocal().to(dtype)
    return x.to(dtype), None


class TorchBackend(Backend):
    """Pure-PyTorch reference, chunked over rows; runs on any device torch supports."""

    name = "torch"

    def __init__(self, chunk_elems: int = CHUNK_ELEMS) -> None:
        self.chunk_elems = chunk_elems

    def not_supported_reasons(self, log_p: torch.Tensor) -> List[str]:
        return []

    # -- prepare ----------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                inv_c: Optional[torch.Tensor] = None, hessian: Hessian = False,
                tol: float = ROW_SUM_TOL) -> PrepareOut:
        """Validate x, write log P^ into out, sum the rows; see :mod:`ppu_fast.backends.base`."""
        check_prepare_args(x, mode, forget, fill, out, inv_c, hessian)
        n, k = x.shape
        dev = x.device
        fill = fill.to(dev) if fill is not None else None  # may come from the CPU
        f64 = dict(dtype=torch.float64, device=dev)
        cdt = compute_dtype((x if out is None else out).dtype)
        # The first evaluation: at alpha = 0, Q is the normalised input (pn) and log Z is 0 (or,
        # on forget rows, softmax(fill) and logsumexp(fill)); "log_p" mode evaluates the stored
        # values themselves. Half buffers round log P^ too coarsely for pn to stand in for them.
        first = inv_c is not None and (mode == "log_p" or out.dtype in (torch.float32,
                                                                        torch.float64))
        if first and fill is not None:
            q_fill = torch.softmax(fill.to(cdt), dim=0)
            lz_fill = torch.logsumexp(fill.to(cdt), dim=0)
        # First fault as row * 8 + kind: the minimum over chunks is the first offending row.
        key = torch.full((), 8 * n, dtype=torch.int64, device=dev)
        a = torch.full((k,), float("-inf"), **f64) if mode == "log_p" else torch.zeros(k, **f64)
        b = torch.zeros(k, **f64)
        colsum, wlogz = torch.zeros(k, **f64), torch.zeros((), **f64)
        d = torch.zeros(k, **f64)
        # k x k only where the dense Hessian is asked for (k <= DENSE_HESSIAN_MAX_K): at
        # k = 100,000 it was 80 GB that nothing read.
        w = torch.zeros(k, k, **f64) if first and hessian is True else None
        m = hessian_stride(n, k)
        zero = torch.zeros(k, **f64)
        rows = chunk_rows(n, k, self.chunk_elems)
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            xc = x[sl]
            kinds = _row_faults(xc, mode, tol)
            idx = torch.arange(sl.start, sl.stop, device=dev)
            key = torch.minimum(key, torch.where(kinds > 0, idx * 8 + kinds, 8 * n).min())
            lp, pn = _log_rows(xc, mode, cdt)
            fc = forget[sl] if forget is not None else None
            if fc is not None and fill is not None:
                lp = torch.where(fc[:, None], fill.to(cdt)[None, :], lp)
            if mode == "log_p":
                a = torch.maximum(a, lp.amax(dim=0).double())
            else:
                pd = pn.double()
                if fc is None:
                    a += pd.sum(dim=0)
                else:
                    a += torch.where(fc[:, None], 0.0, pd).sum(dim=0)
                    b += torch.where(fc[:, None], pd, 0.0).sum(dim=0)
            if out is not None:
                out[sl] = lp
                stored = out[sl]
            else:
                stored = xc
            if first:
                if mode == "log_p":
                    q = q_chunk(stored, inv_c[sl], zero, cdt)
                    x0 = stored.to(cdt)
                    mx = x0.amax(dim=1)
                    lz = mx + torch.log(torch.exp(x0 - mx[:, None]).sum(dim=1))
                else:
                    q, lz = pn, torch.zeros(pn.shape[0], dtype=cdt, device=dev)
                    if fc is not None:
                        q = torch.where(fc[:, None], q_fill[None, :], q)
                        lz = torch.where(fc, lz_fill, lz)
                c, z, dd = stats_from_q(q, lz, inv_c[sl], diag=bool(hessian))
                colsum += c
                wlogz += z
                if hessian:
                    d += dd
                if hessian is True:
                    sel = hessian_sample_rows(n, m, sl.start, sl.stop, device=dev)
                    w += gram_from_q(q.index_select(0, sel), inv_c[sl].index_select(0, sel))
        key_f = torch.stack([torch.remainder(key, 8), torch.div(key, 8, rounding_mode="floor")])
        parts = [torch.where(key >= 8 * n, 0, key_f).double(), a, b]
        if first:
            parts += [colsum, wlogz.reshape(1)]
            if hessian:
                parts.append(d)
            if hessian is True:
                parts.append(w.reshape(-1))
        buf = torch.cat(parts).cpu()  # the one device-to-host copy
        assert buf.numel() == packed_size(k, first, hessian)
        return unpack_prepare(buf, k, mode, first, hessian)

    # -- step ---------------------------------------------------------------------------------------
    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        """One pass over ``log_p`` (N x k). See :mod:`ppu_fast.backends.base` for the contract."""
        check_step_args(log_p, inv_c, alpha, hessian)
        n, k = log_p.shape
        cdt = compute_dtype(log_p.dtype)
        alpha_c = alpha.to(cdt)  # float32 like the kernels (float64 for a float64 buffer)
        colsum = torch.zeros(k, dtype=torch.float64, device=log_p.device)
        wlogz = torch.zeros((), dtype=torch.float64, device=log_p.device)
        d = torch.zeros(k, dtype=torch.float64, device=log_p.device) if hessian else None
        rows = chunk_rows(n, k, self.chunk_elems)
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            c, w, dc = step_chunk(log_p[sl], inv_c[sl], alpha_c, bool(hessian), cdt)
            colsum += c
            wlogz += w
            if d is not None:
                d += dc
        if hessian in (True, "exact"):
            w = self.sampled_gram(log_p, inv_c, alpha_c, 1 if hessian == "exact" else None)
            return colsum, wlogz, assemble_hessian(d, w)
        return colsum, wlogz, d

    def sampled_gram(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha_c: torch.Tensor,
                     m: Optional[int] = None) -> torch.Tensor:
        """``sum_{i in S} inv_c_i q_i q_i^T`` over the Hessian's row sample S (k x k f64; the
        blocks b % m == 0, ``m`` by default ``hessian_stride``), computed in ``alpha_c``'s
        dtype."""
        n, k = log_p.shape
        m = hessian_stride(n, k) if m is None else m
        idx = hessian_sample_rows(n, m, device=log_p.device)
        w = torch.zeros(k, k, dtype=torch.float64, device=log_p.device)
        rows = chunk_rows(idx.numel(), k, self.chunk_elems)
        for start in range(0, idx.numel(), rows):
            sel = idx[start:start + rows]
            w += gram_chunk(log_p.index_select(0, sel), inv_c.index_select(0, sel), alpha_c,
                            alpha_c.dtype)
        return w

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Write Q(alpha) (N x k) into ``out`` (any float dtype, same shape and device)."""
        check_step_args(log_p, inv_c, alpha, out=out)
        n, k = log_p.shape
        cdt = compute_dtype(log_p.dtype)
        alpha_c = alpha.to(cdt)
        rows = chunk_rows(n, k, self.chunk_elems)
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            out[sl] = q_chunk(log_p[sl], inv_c[sl], alpha_c, cdt)
        return out


def reference_step(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                   hessian: Hessian = False) -> StepOut:
    """Module-level shortcut to the reference ``step`` (what tests compare kernels with)."""
    return TorchBackend().step(log_p, inv_c, alpha, hessian)


def reference_materialize(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Module-level shortcut to the reference ``materialize``; allocates float32 ``out`` if None."""
    if out is None:
        out = torch.empty(log_p.shape, dtype=torch.float32, device=log_p.device)
    return TorchBackend().materialize(log_p, inv_c, alpha, out)


def reference_prepare(x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                      fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                      inv_c: Optional[torch.Tensor] = None, hessian: Hessian = False,
                      tol: float = ROW_SUM_TOL) -> PrepareOut:
    """Module-level shortcut to the reference ``prepare``."""
    return TorchBackend().prepare(x, mode, forget, fill, out, inv_c, hessian, tol)
