"""CUDA C++ backend: launchers for the compiled module ``ppu_fast._cuda`` (the fallback behind Triton).

Three layers, as in the Triton backend: the kernels live in ``csrc/cuda/kernels.cu`` (bound in
``csrc/cuda/bindings.cpp``); this module holds the launchers (``_launch_step``,
``_launch_materialize``: validate, plan the grid, pass pointers) and :class:`CudaBackend`, the
registry's ``"cuda"`` backend.

The compiled module does not link libtorch: the launchers hand it ``tensor.data_ptr()``, sizes,
element strides, the device index and ``torch.cuda.current_stream().cuda_stream``; it launches
asynchronously on that stream, and any CUDA error comes back as a ``RuntimeError`` naming the error
(e.g. ``cudaErrorInsufficientDriver``). Temporaries (float32 ``alpha``, the float64 workspace) are
torch tensors allocated on the same stream, so the caching allocator keeps them valid until the
kernels that use them have run.

Kernels (details and byte counts in ``kernels.cu``):

* ``k <= 32``: one row per thread, held in registers, read once;
* ``k > 32``: tiles of 16 rows per block, a warp per row for a single-pass online max/sum, then a
  thread per column re-reads the tile (from L2 for moderate k) to add q into the block's row of the
  workspace.

Determinism: every block writes its partial sums to its own row of a ``grid x width`` float64
workspace (grid = min(blocks needed, the kernel's resident blocks per SM, at most 8, x SM count):
a persistent grid with no partial second wave), and a second kernel sums the rows in block order. No float atomics, so two runs on one device give bit-identical results.

Hessian: ``hessian="diag"`` is accumulated in the kernel for every k. ``hessian=True`` is
accumulated in the kernel for ``k <= 32`` (per-block float64 sums of ``inv_c q_a (delta_ab - q_b)``
over 256-row tiles of q in shared memory); for larger k the launcher materialises float32 row
chunks of Q (``torch_ref.chunk_rows`` rows) with the materialize kernel and forms
``diag(sum inv_c q) - (Q * inv_c)^T Q`` with a float32 torch GEMM per chunk, accumulating the
chunks in float64 (a second pass over the matrix and an O(N k^2) GEMM; the GEMM follows torch's
float32 matmul precision setting, exact float32 unless the caller enabled TF32).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import List, Optional, Tuple

import torch

from .base import Backend, Hessian, StepOut, check_step_args, hessian_by_chunks

# Element type codes of ppu_fast._cuda (csrc/cuda/ppu_cuda.h).
_IN_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_NO_HESSIAN, _DIAG_HESSIAN, _FULL_HESSIAN = 0, 1, 2


@functools.lru_cache(maxsize=None)
def _load_module() -> Tuple[Optional[ModuleType], str]:
    """(ppu_fast._cuda, "") or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("ppu_fast._cuda"), ""
    except Exception as exc:  # ImportError, or a loader error such as a missing symbol
        return None, f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def _runtime_problem() -> str:
    """Why the module's CUDA runtime cannot use a GPU here ("" when it can). Asked once."""
    mod, _ = _load_module()
    if mod is None:
        return ""
    try:
        count = mod.device_count()
    except RuntimeError as exc:  # e.g. cudaErrorInsufficientDriver: driver older than the runtime
        return f"ppu_fast._cuda cannot use the GPU ({mod.version_info()}): {exc}"
    if count < 1:
        return f"ppu_fast._cuda sees no CUDA device ({mod.version_info()})"
    return ""


def _module() -> ModuleType:
    mod, why = _load_module()
    if mod is None:
        raise RuntimeError(f"cuda backend: ppu_fast._cuda not built ({why})")
    return mod


def _launch_step(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                 mode: int) -> torch.Tensor:
    """Run the step kernels on ``log_p`` (N x k, CUDA, any strides); returns the float64 vector
    ``[colsum (k) | wlogz (1) | Hessian diagonal (k, mode 1) or k x k row-major (mode 2)]``.

    ``inv_c`` (N,) float32 and ``alpha32`` (k,) float32 must be contiguous on ``log_p``'s device.
    """
    mod = _module()
    n, k = log_p.shape
    dev = log_p.device
    grid, width = mod.plan_step(n, k, mode, _IN_CODES[log_p.dtype], dev.index)
    workspace = torch.empty((grid, width), dtype=torch.float64, device=dev)
    out = torch.empty(width, dtype=torch.float64, device=dev)
    mod.step(log_p.data_ptr(), _IN_CODES[log_p.dtype], n, k, log_p.stride(0), log_p.stride(1),
             inv_c.data_ptr(), alpha32.data_ptr(), mode, workspace.data_ptr(), grid, width,
             out.data_ptr(), dev.index, torch.cuda.current_stream(dev).cuda_stream)
    return out


def _launch_materialize(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                        out: torch.Tensor) -> None:
    """Write Q (N x k) into ``out`` (N x k, float32/16/bf16/64, any strides, same device)."""
    mod = _module()
    n, k = log_p.shape
    if n == 0 or k == 0:
        return
    dev = log_p.device
    grid = mod.plan_materialize(n, k, _IN_CODES[log_p.dtype], dev.index)
    mod.materialize(log_p.data_ptr(), _IN_CODES[log_p.dtype], n, k, log_p.stride(0),
                    log_p.stride(1), inv_c.data_ptr(), alpha32.data_ptr(), out.data_ptr(),
                    _OUT_CODES[out.dtype], out.stride(0), out.stride(1), grid, dev.index,
                    torch.cuda.current_stream(dev).cuda_stream)


class CudaBackend(Backend):
    """CUDA C++ kernels through ``ppu_fast._cuda``; serves CUDA tensors only."""

    name = "cuda"

    def available_reasons(self) -> List[str]:
        """Why this backend cannot run on this machine (empty: it can)."""
        reasons = []
        mod, why = _load_module()
        if mod is None:
            reasons.append(f"ppu_fast._cuda not built ({why})")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device (torch.cuda.is_available() is False)")
        elif mod is not None and _runtime_problem():
            reasons.append(_runtime_problem())
        return reasons

    def not_supported_reasons(self, log_p: torch.Tensor) -> List[str]:
        """Why this backend cannot serve ``log_p`` (empty: it can)."""
        reasons = []
        if log_p.device.type != "cuda":
            reasons.append(f"log_p is on {log_p.device}; the cuda backend serves CUDA tensors only")
        if log_p.dtype not in _IN_CODES:
            reasons.append(f"log_p dtype {log_p.dtype} is not supported (float32, float16, "
                           f"bfloat16)")
        return reasons

    def _require(self, log_p: torch.Tensor) -> None:
        why = self.not_supported_reasons(log_p)
        if not why:
            why = self.available_reasons()
        if why:
            raise RuntimeError(f"cuda backend cannot run on this input ({log_p.dtype}, "
                               f"{tuple(log_p.shape)}, {log_p.device}): " + "; ".join(why))

    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        """One pass over ``log_p`` (N x k) -> (colsum (k,) f64, wlogz () f64, H).

        H is None, the k x k float64 Hessian ``sum_i inv_c_i (diag(q_i) - q_i q_i^T)``
        (``hessian=True``) or its diagonal (k,) (``hessian="diag"``); see
        :mod:`ppu_fast.backends.base`. The returned tensors are views of one float64 buffer.
        """
        check_step_args(log_p, inv_c, alpha, hessian)
        self._require(log_p)
        n, k = log_p.shape
        if k == 0:
            raise ValueError("log_p: expected at least one column (k >= 1), got shape "
                             f"{tuple(log_p.shape)}")
        inv_c = inv_c.contiguous()
        alpha32 = alpha.to(torch.float32).contiguous()  # the reference shifts in float32 too
        full_in_kernel = hessian is True and k <= _module().SMALL_K
        mode = (_FULL_HESSIAN if full_in_kernel
                else _DIAG_HESSIAN if hessian == "diag" else _NO_HESSIAN)
        out = _launch_step(log_p, inv_c, alpha32, mode)
        colsum, wlogz = out[:k], out[k]
        h: Optional[torch.Tensor] = None
        if mode == _FULL_HESSIAN:
            h = out[k + 1:].view(k, k)
        elif mode == _DIAG_HESSIAN:
            h = out[k + 1:]
        elif hessian is True:
            h = self._hessian_by_chunks(log_p, inv_c, alpha32)
        return colsum, wlogz, h

    def _hessian_by_chunks(self, log_p: torch.Tensor, inv_c: torch.Tensor,
                           alpha32: torch.Tensor) -> torch.Tensor:
        """Full k x k Hessian for k > 32 (see :func:`hessian_by_chunks`)."""
        return hessian_by_chunks(lambda lp, ic, q: _launch_materialize(lp, ic, alpha32, q),
                                 log_p, inv_c)

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Write Q(alpha) (N x k) into ``out`` (same shape and device; float32, float16, bfloat16
        or float64; any strides) and return ``out``."""
        check_step_args(log_p, inv_c, alpha, out=out)
        self._require(log_p)
        if out.dtype not in _OUT_CODES:
            raise TypeError(f"out: dtype {out.dtype} is not supported by the cuda backend; "
                            f"expected one of {[str(d) for d in _OUT_CODES]}")
        _launch_materialize(log_p, inv_c.contiguous(), alpha.to(torch.float32).contiguous(), out)
        return out
