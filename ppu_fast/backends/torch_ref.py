"""The pure-PyTorch reference backend: the single reference that tests and benchmarks import.

It works over row chunks so that its temporaries stay a small multiple of one chunk
(``CHUNK_ELEMS`` elements), never several N x k matrices: a 1,000,000 x 100 float32 refine needs
far less than its own size again.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .base import Backend, Hessian, StepOut, check_step_args

# Rows per chunk are chosen so one chunk holds about this many elements (16 MB of float32):
# large enough to amortise kernel launches, small enough to keep temporaries bounded.
CHUNK_ELEMS = 1 << 22


def chunk_rows(n: int, k: int, chunk_elems: int = CHUNK_ELEMS) -> int:
    """Rows per chunk for an n x k matrix."""
    return max(1, min(n, chunk_elems // max(k, 1)))


def shifted_logits(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_ik = log_p_ik - alpha_k * inv_c_i in ``compute_dtype``.  (rows x k)"""
    return (log_p.to(compute_dtype)
            - inv_c.to(compute_dtype)[:, None] * alpha.to(compute_dtype)[None, :])


def step_chunk(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
               hessian: Hessian = False, compute_dtype: torch.dtype = torch.float32,
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One chunk of ``step``: rows (r x k) -> colsum (k,) f64, sum_i c_i log Z_i f64, H or None.

    Kept free of Python control flow over data so that ``torch.compile`` can fuse it; the
    benchmarks compile exactly this function. ``compute_dtype=torch.float64`` gives the
    high-precision oracle that tests measure every backend's error against.
    """
    inv_c = inv_c.to(compute_dtype)
    x = shifted_logits(log_p, inv_c, alpha, compute_dtype)
    m = x.amax(dim=1, keepdim=True)
    e = torch.exp(x - m)
    s = e.sum(dim=1, keepdim=True)
    q = e / s
    colsum = q.sum(dim=0, dtype=torch.float64)
    log_z = (m + torch.log(s)).squeeze(1)
    wlogz = (log_z.double() / inv_c.double()).sum()
    h = None
    if hessian is True:
        qw = q * inv_c[:, None]
        h = torch.diag(qw.sum(dim=0, dtype=torch.float64)) - (qw.T @ q).double()
    elif hessian == "diag":
        h = (q * inv_c[:, None] * (1.0 - q)).sum(dim=0, dtype=torch.float64)
    return colsum, wlogz, h


def q_chunk(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
            compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q for one chunk of rows in ``compute_dtype`` (r x k)."""
    return torch.softmax(shifted_logits(log_p, inv_c, alpha, compute_dtype), dim=1)


class TorchBackend(Backend):
    """Pure-PyTorch reference, chunked over rows; runs on any device torch supports."""

    name = "torch"

    def __init__(self, chunk_elems: int = CHUNK_ELEMS) -> None:
        self.chunk_elems = chunk_elems

    def not_supported_reasons(self, log_p: torch.Tensor) -> List[str]:
        return []

    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        """One pass over ``log_p`` (N x k). See :mod:`ppu_fast.backends.base` for the contract."""
        check_step_args(log_p, inv_c, alpha, hessian)
        n, k = log_p.shape
        alpha32 = alpha.float()
        colsum = torch.zeros(k, dtype=torch.float64, device=log_p.device)
        wlogz = torch.zeros((), dtype=torch.float64, device=log_p.device)
        h = None
        if hessian is True:
            h = torch.zeros(k, k, dtype=torch.float64, device=log_p.device)
        elif hessian == "diag":
            h = torch.zeros(k, dtype=torch.float64, device=log_p.device)
        rows = chunk_rows(n, k, self.chunk_elems)
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            c, w, hc = step_chunk(log_p[sl], inv_c[sl], alpha32, hessian)
            colsum += c
            wlogz += w
            if h is not None:
                h += hc
        return colsum, wlogz, h

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Write Q(alpha) (N x k) into ``out`` (any float dtype, same shape and device)."""
        check_step_args(log_p, inv_c, alpha, out=out)
        n, k = log_p.shape
        alpha32 = alpha.float()
        rows = chunk_rows(n, k, self.chunk_elems)
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            out[sl] = q_chunk(log_p[sl], inv_c[sl], alpha32)
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


def oracle_step(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                hessian: Hessian = False) -> StepOut:
    """``step`` computed entirely in float64 in one piece: the accuracy oracle for tests."""
    return step_chunk(log_p, inv_c, alpha, hessian, compute_dtype=torch.float64)


def oracle_q(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Q computed in float64 (N x k): the accuracy oracle for ``materialize``."""
    return q_chunk(log_p, inv_c, alpha, compute_dtype=torch.float64)
