"""The backend contract (DESIGN.md §2) shared by every backend.

A backend implements two operations over an N x k matrix of log-probabilities ``log_p``
(float32, float16 or bfloat16) with per-row inverse weights ``inv_c`` (N,) float32 and the dual
variables ``alpha`` (k,) float64:

* ``step(log_p, inv_c, alpha, hessian=False)`` -> ``(colsum, wlogz, H)``
    - ``colsum`` (k,) float64: column sums of Q(alpha),
    - ``wlogz`` 0-dim float64: ``sum_i c_i log Z_i(alpha)``,
    - ``H``: ``None`` (``hessian=False``), the k x k float64 matrix
      ``sum_i inv_c_i (diag(q_i) - q_i q_i^T)`` (``hessian=True``), or its diagonal (k,)
      (``hessian="diag"``).
* ``materialize(log_p, inv_c, alpha, out)`` -> ``out``: writes Q(alpha) (N x k) into ``out``.
  ``out`` may be ``log_p`` itself (``refine`` keeps log P^ in its result buffer and turns it into
  Q in place), so every backend reads a row completely before writing any of it.

where ``q_ik = softmax_k(log_p_ik - alpha_k * inv_c_i)``. Arithmetic is float32, column sums
accumulate in float64. All returned tensors live on ``log_p``'s device. No backend writes anything
N x k during ``step``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch

Hessian = Union[bool, str]
StepOut = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HESSIAN_MODES = (False, True, "diag")


class Backend:
    """Base class: a named backend that can say why it cannot serve a call."""

    name: str = "base"

    def not_supported_reasons(self, log_p: torch.Tensor) -> List[str]:
        """Reasons this backend cannot run on ``log_p`` (empty list: it can)."""
        raise NotImplementedError

    def available_reasons(self) -> List[str]:
        """Reasons this backend cannot run at all on this machine (empty: it can run somewhere)."""
        return []

    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        raise NotImplementedError

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def check_step_args(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    hessian: Hessian = False, out: Optional[torch.Tensor] = None) -> None:
    """Validate the arguments of ``step`` / ``materialize``; raise with a clear message."""
    if not isinstance(log_p, torch.Tensor) or log_p.dim() != 2:
        raise ValueError(f"log_p: expected a 2-D tensor (N x k), got "
                         f"{type(log_p).__name__} with shape {getattr(log_p, 'shape', None)}")
    if log_p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"log_p: dtype {log_p.dtype} is not supported; expected one of "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}")
    n, k = log_p.shape
    if inv_c.shape != (n,) or inv_c.dtype != torch.float32:
        raise ValueError(f"inv_c: expected a float32 tensor of shape ({n},), got {inv_c.dtype} "
                         f"{tuple(inv_c.shape)}")
    if alpha.shape != (k,) or alpha.dtype != torch.float64:
        raise ValueError(f"alpha: expected a float64 tensor of shape ({k},), got {alpha.dtype} "
                         f"{tuple(alpha.shape)}")
    for name, t in (("inv_c", inv_c), ("alpha", alpha)):
        if t.device != log_p.device:
            raise ValueError(f"{name}: on {t.device}, expected log_p's device {log_p.device}")
    if hessian not in HESSIAN_MODES:
        raise ValueError(f"hessian: expected one of {HESSIAN_MODES}, got {hessian!r}")
    if out is not None:
        if out.shape != log_p.shape or out.device != log_p.device:
            raise ValueError(f"out: expected shape {tuple(log_p.shape)} on {log_p.device}, got "
                             f"{tuple(out.shape)} on {out.device}")
        if not out.is_floating_point():
            raise TypeError(f"out: expected a floating-point tensor, got {out.dtype}")


def hessian_by_chunks(materialize_chunk: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                  None],
                      log_p: torch.Tensor, inv_c: torch.Tensor) -> torch.Tensor:
    """The dense Hessian ``sum_i inv_c_i (diag(q_i) - q_i q_i^T)`` (k x k float64) for large k.

    Where a kernel cannot hold k x k accumulators, Q is materialised one row chunk at a time by
    ``materialize_chunk(log_p_rows, inv_c_rows, out_rows)`` into a float32 buffer and multiplied
    by a float32 GEMM (exact float32 unless the caller enabled TF32), accumulated in float64.
    Temporaries: one chunk of ``chunk_rows(N, k)`` rows.
    """
    from .torch_ref import chunk_rows  # torch_ref imports this module

    n, k = log_p.shape
    rows = chunk_rows(n, k)
    buf = torch.empty((rows, k), dtype=torch.float32, device=log_p.device)
    weighted = torch.zeros(k, dtype=torch.float64, device=log_p.device)
    outer = torch.zeros((k, k), dtype=torch.float64, device=log_p.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        q = buf[: stop - start]
        materialize_chunk(log_p[start:stop], inv_c[start:stop], q)
        qw = q * inv_c[start:stop, None]
        weighted += qw.sum(dim=0, dtype=torch.float64)
        outer += (qw.T @ q).double()
    return torch.diag(weighted) - outer
