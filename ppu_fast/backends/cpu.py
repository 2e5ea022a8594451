"""The ``cpu`` backend: launcher for the compiled C++ kernels in ``ppu_fast._C``.

Three layers: the kernels (csrc/cpu/kernel.h: one fused pass per row block for ``prepare``,
``step`` and ``materialize`` on float32 / float16 / bfloat16 buffers, in float32;
csrc/cpu/kernel_f64.h: the same three on a float64 buffer, in float64, a row at a time with AVX2
or plain C++), their binding (csrc/cpu/bindings.cpp: run-time AVX-512 /
AVX2 / generic dispatch, fixed row ranges, fixed-order reduction of per-range partials; the thread
pool in csrc/cpu/pool.cpp) and this launcher, which validates the tensors and passes data
pointers, sizes and strides. ``ppu_fast._C`` does not link libtorch.

Bytes moved: ``prepare`` reads N*k*sizeof(x) + N (the forget mask) and writes N*k*sizeof(out);
``step`` reads N*k*sizeof(log_p) + 4N and writes nothing N x k; ``materialize`` also writes
N*k*sizeof(out). The exps: ``step`` and ``materialize`` N*k each; ``prepare`` N*k logs ("probs")
or exps ("logits") and none for its first evaluation, which it takes from the normalised rows.

The Hessian (see ``ppu_fast.backends.base``): the exact diagonal in the same pass (about 10 % of
a step), and for ``hessian=True`` the sampled weights W: k(k-1)/2 per-lane FMAs per sampled block
of rows for k < 32, a register-tiled rank-16 update per sampled 16-row block above; with the
sample sizes of ``base.hessian_stride`` this stays a fraction of a step (``benchmarks/run.py``
reports it). No GEMM, no materialised rows, no torch call, so results do not depend on the
thread count.

Threads: each call uses at most ``num_threads`` (default ``torch.get_num_threads()``) and at
least ``_C.MIN_WORK`` elements per thread, so small problems stay on the calling thread; the pool
never waits for a helper that has not started (see csrc/cpu/pool.cpp), so a loaded machine does
not make more threads slower than one.
"""

from __future__ import annotations

import math
import os
import threading
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .base import (MODE_CODE, ROW_SUM_TOL, Backend, Hessian, HostStep, HostStepOut, PrepareOut,
                   StepOut, check_hessian_mode, check_host_alpha, check_prepare_args,
                   check_step_args, hessian_stride, packed_size, unpack_prepare)

# The version of the interface between this launcher and the compiled module (bindings.cpp).
_C_INTERFACE = 5

try:  # a missing build is a reason, never an import error (docs/design.md §4)
    from .. import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[str] = None
    _built = getattr(_C, "INTERFACE", 1)  # modules built before the attribute existed: 1
    if _built != _C_INTERFACE:
        # Built from other sources than this Python code (e.g. pulled without rebuilding): its
        # prepare would pack W where this code reads the assembled Hessian.
        _IMPORT_ERROR = (f"ppu_fast._C was built from other sources (interface "
                         f"{_built}, this code needs {_C_INTERFACE}); "
                         f"rebuild it: pip install -e . (or python setup.py build_ext --inplace)")
        _C = None
except Exception as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _IMPORT_ERROR = f"ppu_fast._C is not built or failed to load ({type(exc).__name__}: {exc})"

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_X_CODE = _DTYPE_CODE
_HMODE = {False: 0, True: 1, "diag": 2, "exact": 1}  # "exact": the full Hessian, stride 1


ISA_NAMES = ("auto", "avx512", "avx2", "generic")

# CPU buffers at least this large come from the host cache (csrc/cpu/host_cache.cpp); smaller
# ones from torch's allocator, where a 2 MiB-granular mapping would waste more than it saves.
# (1 MiB, not 2: a 50,000 x 10 float32 result is 1.9 MiB.)
HOST_CACHE_MIN_BYTES = 1 << 20
HOST_CACHE_ENV = "PPU_FAST_HOST_CACHE_MB"
# Limits above this mean "no limit" (the C++ side holds them in a size_t).
_LIMIT_MAX = (1 << 63) - 1
_host_limit_read = False
_host_limit_lock = threading.Lock()


def empty_buffer(shape: Tuple[int, ...], dtype: torch.dtype,
                 device: Union[torch.device, str]) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)`` for a solver buffer (e.g. N x k).

    On the CPU (Linux), a buffer of at least ``HOST_CACHE_MIN_BYTES`` comes from ppu_fast's host
    cache: a 2 MiB-aligned mapping advised to transparent huge pages, which goes back to the
    cache (not to the operating system) once the last tensor on it is freed, so that the next
    buffer of a close size reuses pages the process already holds. Why: the kernel zeroes every
    fresh page on its first touch, and with glibc's heap whether a refine in a loop paid that
    depended on the heap's history (50,000 x 100: 13.5 or 9.6 ms in two processes) and above
    32 MiB it always did (1,000,000 x 100: 158 ms against 143 from the cache; docs/solver.md).
    :func:`empty_host_cache` releases the cache; its limit is ``PPU_FAST_HOST_CACHE_MB`` (default:
    the smaller of 4 GiB and an eighth of the memory) or :func:`set_host_cache_limit`. The
    tensor's storage is not resizable. Elsewhere (not Linux, no ``_C``, other devices, small
    buffers) this is plain ``torch.empty``.
    """
    device = torch.device(device)
    dims = tuple(int(d) for d in shape)
    nbytes = math.prod(dims) * dtype.itemsize
    if device.type != "cpu" or nbytes < HOST_CACHE_MIN_BYTES or not _host_cache():
        return torch.empty(shape, dtype=dtype, device=device)
    _read_host_limit()
    try:
        block = _C.HostBuffer(nbytes)
    except MemoryError:
        raise MemoryError(f"cannot allocate a {dims} {dtype} buffer "
                          f"({nbytes:,} bytes) on the CPU (the host cache was released first)"
                          ) from None
    # frombuffer keeps a reference to the HostBuffer in the storage: the block returns to the
    # cache only when the last view of it is freed.
    raw = torch.frombuffer(block, dtype=torch.uint8)
    return raw.view(dtype).view(dims)


def _host_cache() -> bool:
    """Whether this build and platform have the host cache (``_C`` built, Linux)."""
    return _C is not None and _C.host_cache_available()


def check_host_cache_env() -> None:
    """Raise the ValueError for a bad ``PPU_FAST_HOST_CACHE_MB`` now (it is otherwise read at the
    first cached buffer), and apply it."""
    if _host_cache():
        _read_host_limit()


def _read_host_limit() -> None:
    """Apply ``PPU_FAST_HOST_CACHE_MB`` once (at the first cached buffer)."""
    global _host_limit_read
    if _host_limit_read:
        return
    # Under the lock set_host_cache_limit takes: a limit it sets while another thread reads the
    # variable must not be overwritten by the variable.
    with _host_limit_lock:
        if _host_limit_read:
            return
        raw = os.environ.get(HOST_CACHE_ENV, "").strip()
        if raw:
            try:
                mb = float(raw)
            except ValueError:
                mb = math.nan
            if not mb >= 0:
                raise ValueError(f"{HOST_CACHE_ENV}: expected a number of MiB >= 0 (0 keeps no "
                                 f"freed buffer, inf no limit), got {raw!r}")
            _C.host_set_limit(_LIMIT_MAX if mb * (1 << 20) >= _LIMIT_MAX
                              else int(mb * (1 << 20)))
        _host_limit_read = True


def empty_host_cache() -> None:
    """Release the freed CPU buffers that ppu_fast's host cache keeps (memory of tensors still in
    use is not affected), as ``torch.cuda.empty_cache`` does for CUDA memory; CPU memory only.
    A no-op where there is no cache."""
    if _host_cache():
        _C.host_empty_cache()


def set_host_cache_limit(nbytes: int) -> None:
    """The most bytes of freed CPU buffers the host cache keeps (0: none; every buffer of 1 MiB or
    more is then a fresh mapping); cached blocks beyond it are released now, oldest first.
    Overrides ``PPU_FAST_HOST_CACHE_MB``. Values above 2**63 - 1 mean no limit."""
    global _host_limit_read
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"nbytes: expected an integer number of bytes, got "
                        f"{type(nbytes).__name__} {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes: expected a number of bytes >= 0, got {nbytes}")
    if _host_cache():
        with _host_limit_lock:
            _C.host_set_limit(min(int(nbytes), _LIMIT_MAX))
            _host_limit_read = True


def host_cache_stats() -> dict:
    """The CPU host cache's counters: ``cached_bytes`` and ``cached_blocks`` (freed buffers
    kept), ``limit_bytes``, ``hits`` (buffers served from the cache) and ``misses`` (fresh
    mappings); all 0 where there is no cache."""
    if not _host_cache():
        return {"cached_bytes": 0, "cached_blocks": 0, "limit_bytes": 0, "hits": 0,
                "misses": 0}
    _read_host_limit()
    return dict(_C.host_cache_stats())


def _isa_from_env() -> str:
    return os.environ.get("PPU_FAST_CPU_ISA", "auto") or "auto"


def check_isa(isa: str, where: str = "isa") -> None:
    """Raise a ValueError when ``isa`` is not a kernel name, or one this CPU / build cannot run."""
    if isa not in ISA_NAMES:
        raise ValueError(f"{where}: unknown CPU kernel {isa!r}; expected one of {list(ISA_NAMES)}")
    if _C is not None and isa != "auto" and isa not in _C.supported_isas():
        raise ValueError(f"{where}: {isa!r} is not supported here; this CPU/build runs "
                         f"{_C.supported_isas()}")


class CpuBackend(Backend):
    """Fused C++ kernels for CPU tensors (float32 / float16 / bfloat16 computed in float32,
    float64 in float64; any non-negative strides).

    ``isa`` picks the kernel: "auto" (the best this CPU runs; the environment variable
    ``PPU_FAST_CPU_ISA`` overrides), "avx512", "avx2" or "generic". ``num_threads``: None follows
    ``torch.get_num_threads()``. Results do not depend on the thread count (fixed row ranges,
    partials added in order).
    """

    name = "cpu"

    def __init__(self, isa: Optional[str] = None, num_threads: Optional[int] = None) -> None:
        self.isa = isa or _isa_from_env()
        self.num_threads = num_threads
        check_isa(self.isa, "isa" if isa else "PPU_FAST_CPU_ISA")

    # -- capability -----------------------------------------------------------------------------
    def available_reasons(self) -> List[str]:
        return [_IMPORT_ERROR] if _IMPORT_ERROR else []

    def not_supported_reasons(self, log_p: torch.Tensor) -> List[str]:
        why = []
        if log_p.device.type != "cpu":
            why.append(f"log_p is on {log_p.device}; the cpu backend serves CPU tensors only")
        if log_p.dtype not in _DTYPE_CODE:
            why.append(f"log_p dtype {log_p.dtype} is not float32/float16/bfloat16/float64")
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

    def _require(self) -> None:
        if _C is None:
            raise RuntimeError(f"backend 'cpu' is unavailable: {_IMPORT_ERROR}")

    def _check(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
               hessian: Hessian, out: Optional[torch.Tensor] = None) -> None:
        self._require()
        check_step_args(log_p, inv_c, alpha, hessian, out)
        if log_p.device.type != "cpu":
            raise ValueError(f"log_p: on {log_p.device}; the cpu backend takes CPU tensors")
        if out is not None and out.dtype not in _DTYPE_CODE:
            raise TypeError(f"out: dtype {out.dtype} is not float32/float16/bfloat16/float64")
        if out is not None and out.dtype == torch.float64 and log_p.dtype != torch.float64:
            # The float32 kernels write float32 / 16-bit rows only.
            raise TypeError(f"out: float64 Q from a {log_p.dtype} log_p is not supported; "
                            f"expected float32, float16 or bfloat16")
        if log_p.shape[1] == 0:
            raise ValueError("log_p: expected at least one column (k >= 1)")
        for name, t in (("log_p", log_p), ("out", out)):
            if t is not None and any(s < 0 for s in t.stride()):
                raise ValueError(f"{name}: negative strides are not supported")

    # -- the contract -----------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                inv_c: Optional[torch.Tensor] = None, hessian: Hessian = False,
                tol: float = ROW_SUM_TOL) -> PrepareOut:
        """Validate x, write log P^ into out, sum the rows (one pass); see ``base``."""
        self._require()
        check_prepare_args(x, mode, forget, fill, out, inv_c, hessian)
        if x.device.type != "cpu":
            raise ValueError(f"x: on {x.device}; the cpu backend takes CPU tensors")
        n, k = x.shape
        if n == 0:
            # An empty tensor's data pointer is 0, which the binding reads as "not given" (out,
            # inv_c); nothing to read or write: the reference's zero sums and first evaluation.
            from .torch_ref import reference_prepare
            return reference_prepare(x, mode, forget, fill, out, inv_c, hessian, tol)
        buf = out if out is not None else x
        # The first evaluation from the normalised rows stands for a float32 / float64 buffer only.
        first = inv_c is not None and (mode == "log_p"
                                       or buf.dtype in (torch.float32, torch.float64))
        inv_c = inv_c.contiguous() if first else None
        fmask = forget.contiguous().view(torch.uint8) if forget is not None else None
        fill = fill.contiguous() if fill is not None else None
        # The C++ code writes through this pointer: a CPU buffer whatever torch's default device.
        packed = torch.empty(packed_size(k, first, hessian), dtype=torch.float64, device="cpu")
        sr, sc = x.stride()
        osr, osc = out.stride() if out is not None else (0, 0)
        _C.prepare(x.data_ptr(), _X_CODE[x.dtype], n, k, sr, sc, MODE_CODE[mode],
                   fmask.data_ptr() if fmask is not None else 0,
                   fill.data_ptr() if fill is not None else 0,
                   out.data_ptr() if out is not None else 0,
                   _DTYPE_CODE[out.dtype] if out is not None else 0, osr, osc,
                   inv_c.data_ptr() if first else 0, _HMODE[hessian] if first else 0,
                   hessian_stride(n, k), float(tol), packed.data_ptr(), packed.numel(),
                   self._threads(), self.isa)
        return unpack_prepare(packed, k, mode, first, hessian if first else False,
                              assembled=True)

    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        """One fused pass over ``log_p`` (N x k): (colsum (k,) f64, wlogz () f64, H or None).

        ``H`` is the k x k Newton Hessian (``hessian=True``) or the exact diagonal (k,)
        (``hessian="diag"``), float64; see ``ppu_fast.backends.base``.
        """
        self._check(log_p, inv_c, alpha, hessian)
        return self._step(log_p, inv_c, alpha, hessian)

    def bind_step(self, log_p: torch.Tensor, inv_c: torch.Tensor) -> HostStep:
        """``step`` on this ``log_p`` / ``inv_c``, checked once (see ``Backend.bind_step``):
        each call copies alpha into a bound buffer and runs the kernel with the arguments worked
        out here; colsum and H are fresh arrays (the solver keeps an H across passes)."""
        if type(self).step is not _STEP:
            # A subclass's (or a test's) own step: the solver's passes must go through it.
            return super().bind_step(log_p, inv_c)
        n, k = log_p.shape
        # alpha, colsum and wlogz side by side: one pointer lookup (each costs about 1 us).
        buf = np.empty(2 * k + 1)
        alpha_buf, colsum, wlogz = buf[:k], buf[k:2 * k], buf[2 * k:]
        self._check(log_p, inv_c, torch.from_numpy(alpha_buf), False)
        inv_c = inv_c.contiguous()
        at = buf.ctypes.data
        fixed = (log_p.data_ptr(), _DTYPE_CODE[log_p.dtype], n, k, *log_p.stride(),
                 inv_c.data_ptr(), at, at + 8 * k, at + 16 * k)
        stride, threads, isa = hessian_stride(n, k), self._threads(), self.isa

        def run(alpha: np.ndarray, hessian: Hessian) -> HostStepOut:
            check_hessian_mode(hessian)
            check_host_alpha(alpha, k)
            alpha_buf[:] = alpha
            held = (log_p, inv_c)  # referenced here, so the pointers in fixed stay valid
            h = (np.empty((k, k) if hessian in (True, "exact") else k) if hessian else None)
            _C.step(*fixed, _HMODE[hessian], 1 if hessian == "exact" else stride,
                    h.ctypes.data if h is not None else 0, 0, 0, 0, 0, threads, isa)
            del held
            return colsum.copy(), float(wlogz[0]), h
        return run

    fused_materialize = True

    def materialize_sums(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                         out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``materialize`` into ``out`` and ``step``'s (colsum (k,) f64, wlogz () f64) at the same
        alpha, in one pass (the kernels' step with an output); ``out`` may be ``log_p``."""
        self._check(log_p, inv_c, alpha, False, out)
        colsum, wlogz, _ = self._step(log_p, inv_c, alpha, False, out)
        return colsum, wlogz

    def _step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
              hessian: Hessian, out: Optional[torch.Tensor] = None) -> StepOut:
        """The kernels' step on checked arguments; with ``out``, Q is written there too."""
        n, k = log_p.shape
        inv_c = inv_c.contiguous()
        alpha = alpha.contiguous()
        # numpy buffers: cheaper to allocate than torch's, wrapped without copies.
        colsum, wlogz = np.empty(k), np.empty(())
        h = np.empty((k, k) if hessian in (True, "exact") else k) if hessian else None
        sr, sc = log_p.stride()
        osr, osc = out.stride() if out is not None else (0, 0)
        _C.step(log_p.data_ptr(), _DTYPE_CODE[log_p.dtype], n, k, sr, sc, inv_c.data_ptr(),
                alpha.data_ptr(), colsum.ctypes.data, wlogz.ctypes.data, _HMODE[hessian],
                1 if hessian == "exact" else hessian_stride(n, k),
                h.ctypes.data if h is not None else 0,
                out.data_ptr() if out is not None else 0,
                _DTYPE_CODE[out.dtype] if out is not None else 0, osr, osc,
                self._threads(), self.isa)
        return (torch.from_numpy(colsum), torch.from_numpy(wlogz),
                None if h is None else torch.from_numpy(h))

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Write Q(alpha) (N x k) into ``out`` (float32/16/bf16, or also float64 for a float64
        ``log_p``; any strides); returns ``out``."""
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


# The class's own step, for bind_step to tell a replaced one (a subclass, a test's patch).
_STEP = CpuBackend.step
