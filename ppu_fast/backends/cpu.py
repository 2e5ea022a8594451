"""The ``cpu`` backend: launcher for the compiled C++/OpenMP kernels in ``ppu_fast._C``.

Three layers (DESIGN.md §4): the kernel (csrc/cpu/kernel.h, one fused pass per row block), its
binding (csrc/cpu/bindings.cpp: run-time AVX-512 / AVX2 / generic dispatch, fixed-order
reduction of per-range partials) and this launcher, which validates the tensors and passes data
pointers, sizes and strides. ``ppu_fast._C`` does not link libtorch.

Bytes moved by one ``step``: N*k*sizeof(log_p) + 4*N read, nothing N x k written; about
N*k exps. ``materialize`` also writes N*k*sizeof(out).

The full Hessian (``hessian=True``) is accumulated inside the kernel for k < ``_C.LANES_MAX_K``
(32): k(k+1)/2 per-lane FMAs per block of rows, no extra memory traffic. For larger k the launcher
writes Q for a chunk of rows into a float32 buffer (in the same pass that produces the column
sums) and forms ``sum_i inv_c_i q_i q_i^T`` with a float32 GEMM per chunk (as the reference
does), adding the chunks' products in float64. Measured on the 2-core development CPU (50,000 x
10 float32, median of 200 calls, kernel on 1 thread, other jobs running): in-kernel 0.59 ms for
the whole step with H vs 79 ms through the GEMM route (torch's k x N by N x k GEMM alone: 1.6 ms
on one thread, 40+ ms on two threads of the busy machine). At k = 100 the GEMM costs ~40 ms per step on one thread,
against ~2.5 ms for a step without H: Newton should ask for the full H only for k < 32 and use
"diag" above (which the kernel accumulates at about 10 % extra cost).
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

from .base import Backend, Hessian, StepOut, check_step_args

try:  # a missing build is a reason, never an import error (DESIGN.md §2)
    from .. import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _IMPORT_ERROR = f"ppu_fast._C is not built or failed to load ({type(exc).__name__}: {exc})"

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_HMODE = {False: 0, True: 1, "diag": 2}
# Rows of Q held at once when the Hessian goes through a GEMM (about 16 MB of float32).
GEMM_CHUNK_ELEMS = 1 << 22


def _isa_from_env() -> str:
    return os.environ.get("PPU_FAST_CPU_ISA", "auto") or "auto"


class CpuBackend(Backend):
    """Fused C++ kernels for CPU tensors (float32 / float16 / bfloat16, any strides).

    ``isa`` picks the kernel: "auto" (the best this CPU runs; the environment variable
    ``PPU_FAST_CPU_ISA`` overrides), "avx512", "avx2" or "generic". ``gemm_hessian_min_k``: from
    this k up the full Hessian is formed by a GEMM on chunks of Q (it must be <= 32, the largest
    k the kernel accumulates it for). ``num_threads``: None follows ``torch.get_num_threads()``.
    Results do not depend on the thread count (fixed row ranges, partials added in order).
    """

    name = "cpu"

    def __init__(self, isa: Optional[str] = None, gemm_hessian_min_k: Optional[int] = None,
                 num_threads: Optional[int] = None) -> None:
        self.isa = isa or _isa_from_env()
        lanes_max = int(_C.LANES_MAX_K) if _C is not None else 32
        self.gemm_hessian_min_k = lanes_max if gemm_hessian_min_k is None else gemm_hessian_min_k
        if not 1 <= self.gemm_hessian_min_k <= lanes_max:
            raise ValueError(f"gemm_hessian_min_k: expected 1..{lanes_max}, "
                             f"got {self.gemm_hessian_min_k}")
        self.num_threads = num_threads
        if _C is not None and self.isa != "auto" and self.isa not in _C.supported_isas():
            raise ValueError(f"isa: {self.isa!r} is not supported here; this CPU/build runs "
                             f"{_C.supported_isas()}")

    # -- capability -----------------------------------------------------------------------------
    def available_reasons(self) -> List[str]:
        return [_IMPORT_ERROR] if _IMPORT_ERROR else []

    def not_supported_reasons(self, log_p: torch.Tensor) -> List[str]:
        why = []
        if log_p.device.type != "cpu":
            why.append(f"log_p is on {log_p.device}; the cpu backend serves CPU tensors only")
        if log_p.dtype not in _DTYPE_CODE:
            why.append(f"log_p dtype {log_p.dtype} is not float32/float16/bfloat16")
        if log_p.dim() != 2:
            why.append(f"log_p must be 2-D (N x k), got {log_p.dim()}-D")
        return why

    def describe(self) -> str:
        """The kernel this backend runs, e.g. 'cpu (avx512, 2 threads)'."""
        isa = _C.best_isa() if (_C is not None and self.isa == "auto") else self.isa
        return f"cpu ({isa}, {self._threads()} threads)"

    # -- helpers ----------------------------------------------------------------------------------
    def _threads(self) -> int:
        return max(1, int(self.num_threads or torch.get_num_threads()))

    def _check(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
               hessian: Hessian, out: Optional[torch.Tensor] = None) -> None:
        if _C is None:
            raise RuntimeError(f"backend 'cpu' is unavailable: {_IMPORT_ERROR}")
        check_step_args(log_p, inv_c, alpha, hessian, out)
        if log_p.device.type != "cpu":
            raise ValueError(f"log_p: on {log_p.device}; the cpu backend takes CPU tensors")
        if out is not None and out.dtype not in _DTYPE_CODE:
            raise TypeError(f"out: dtype {out.dtype} is not float32/float16/bfloat16")
        if log_p.shape[1] == 0:
            raise ValueError("log_p: expected at least one column (k >= 1)")
        for name, t in (("log_p", log_p), ("out", out)):
            if t is not None and any(s < 0 for s in t.stride()):
                raise ValueError(f"{name}: negative strides are not supported")

    # -- the contract -----------------------------------------------------------------------------
    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        """One fused pass over ``log_p`` (N x k): (colsum (k,) f64, wlogz () f64, H or None).

        ``H`` is k x k (``hessian=True``) or its diagonal (k,) (``hessian="diag"``), float64.
        """
        self._check(log_p, inv_c, alpha, hessian)
        n, k = log_p.shape
        inv_c = inv_c.contiguous()
        alpha = alpha.contiguous()
        colsum = torch.empty(k, dtype=torch.float64)
        wlogz = torch.empty((), dtype=torch.float64)
        if hessian is True and k >= self.gemm_hessian_min_k:
            return self._step_gemm_hessian(log_p, inv_c, alpha, colsum, wlogz)
        h = None
        if hessian is True:
            h = torch.empty(k, k, dtype=torch.float64)
        elif hessian == "diag":
            h = torch.empty(k, dtype=torch.float64)
        sr, sc = log_p.stride()
        _C.step(log_p.data_ptr(), _DTYPE_CODE[log_p.dtype], n, k, sr, sc, inv_c.data_ptr(),
                alpha.data_ptr(), colsum.data_ptr(), wlogz.data_ptr(), _HMODE[hessian],
                h.data_ptr() if h is not None else 0, 0, 0, 0, 0, self._threads(), self.isa)
        return colsum, wlogz, h

    def _step_gemm_hessian(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                           colsum: torch.Tensor, wlogz: torch.Tensor) -> StepOut:
        """hessian=True for large k: Q per chunk (same pass as the sums), then Q^T diag(inv_c) Q."""
        n, k = log_p.shape
        rows = max(1, min(n, GEMM_CHUNK_ELEMS // k))
        h = torch.zeros(k, k, dtype=torch.float64)
        colsum.zero_()
        wlogz.zero_()
        c_part = torch.empty(k, dtype=torch.float64)
        w_part = torch.empty((), dtype=torch.float64)
        qbuf = torch.empty(rows, k, dtype=torch.float32)
        sr, sc = log_p.stride()
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            lp = log_p[start:stop]
            q = qbuf[: stop - start]
            _C.step(lp.data_ptr(), _DTYPE_CODE[log_p.dtype], stop - start, k, sr, sc,
                    inv_c[start:stop].data_ptr(), alpha.data_ptr(), c_part.data_ptr(),
                    w_part.data_ptr(), 0, 0, q.data_ptr(), 0, k, 1, self._threads(), self.isa)
            colsum += c_part
            wlogz += w_part
            qw = q * inv_c[start:stop, None]
            h -= (qw.T @ q).double()
            h.diagonal().add_(qw.sum(dim=0, dtype=torch.float64))
        return colsum, wlogz, h

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Write Q(alpha) (N x k) into ``out`` (float32/16/bf16, any strides); returns ``out``."""
        self._check(log_p, inv_c, alpha, False, out)
        n, k = log_p.shape
        inv_c = inv_c.contiguous()
        alpha = alpha.contiguous()
        sr, sc = log_p.stride()
        osr, osc = out.stride()
        _C.materialize(log_p.data_ptr(), _DTYPE_CODE[log_p.dtype], n, k, sr, sc,
                       inv_c.data_ptr(), alpha.data_ptr(), out.data_ptr(), _DTYPE_CODE[out.dtype],
                       osr, osc, self._threads(), self.isa)
        return out
