"""CUDA C++ backend: launchers for the compiled module ``ppu_fast._cuda`` (the fallback behind Triton).

Three layers, as in the Triton backend: the kernels live in ``csrc/cuda/kernels.cu`` (step,
materialize) and ``csrc/cuda/prepare.cu`` (prepare), bound in ``csrc/cuda/bindings.cpp``; this
module holds the launchers (``_launch_step``, ``_launch_materialize``, ``_launch_prepare``:
validate, plan, pass pointers) and :class:`CudaBackend`, the registry's ``"cuda"`` backend. The
contract (semantics, the Hessian, the packed prepare result) is ``ppu_fast/backends/base.py``.

The compiled module does not link libtorch: the launchers hand it ``tensor.data_ptr()``, sizes,
element strides, the device index and ``torch.cuda.current_stream().cuda_stream``; it launches
asynchronously on that stream, and any CUDA error comes back as a ``RuntimeError`` naming the error
(e.g. ``cudaErrorInsufficientDriver``). Temporaries (float32 ``alpha``, the float64 workspace) are
torch tensors allocated on the same stream, so the caching allocator keeps them valid until the
kernels that use them have run.

Kernel families (details, byte counts and register use in the .cu files, the analysis in
``docs/cuda_notes.md``):

* ``k <= 32``: one row per thread, held in registers, read once; column sums by a shuffle
  reduce-scatter per warp of 32 rows;
* ``32 < k <= 1024``: one row per warp (a pair of warps for k > 512), held in registers, read
  once; per-lane float32 column sums over 16 rows, staged through shared memory into float64
  registers, the workspace written once per block;
* ``k > 1024``: a row-statistics kernel (a warp per row, streamed) and a column kernel (a block per
  1024-column slab and row group): two reads of the matrix, the second from L2 when it fits.

``prepare`` is one fused pass over the input: one row per thread for ``k <= 32``; 16-row tiles
(a warp per row for validation and the row statistics, then a thread per column re-reading the
tile from L1/L2 to write log P^ and accumulate) for larger k. Its per-block partials are reduced
on the device into ``base.unpack_prepare``'s packed layout and copied to the host once.

Determinism: every block writes its partial sums to its own row of a float64 workspace (grids
are persistent and sized from the kernel's occupancy on the device, or fixed by the problem
size), and a second kernel sums the rows in block order. No float atomics, so two runs on one
device give bit-identical results.

Hessian (``base``'s contract): ``hessian="diag"`` is accumulated in the kernels for every k, with
``1 - q`` of a row's maximum from the row's other entries. ``hessian=True`` is
``assemble_hessian(d, W)``: the kernels give the diagonal d over all rows; the sampled weights W
(the 16-row blocks b with ``b % hessian_stride(N, k) == 0``) are accumulated in the kernel for
``k <= 32`` and formed by :func:`base.sampled_gram_by_chunks` (the materialize kernel on gathered
rows, then a float32 GEMM accumulated in float64) for larger k.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import List, Optional, Tuple

import numpy as np
import torch

from .base import (FLOAT64_GPU_REASON, MODE_CODE, ROW_SUM_TOL, Backend, BoundGram,
                   DeviceStepStage, Hessian, HostStep, PrepareOut, StepOut, accurate_diag,
                   assemble_hessian, check_hessian_mode, check_prepare_args, check_step_args,
                   hessian_stride, packed_size, sampled_gram_by_chunks, softmax64,
                   unpack_prepare)

# Element type codes of ppu_fast._cuda (csrc/cuda/ppu_cuda.h).
_IN_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_PREP_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
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


def _stream(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).cuda_stream


def _launch_step(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                 mode: int, q: Optional[torch.Tensor] = None,
                 stride: Optional[int] = None) -> torch.Tensor:
    """Run the step kernels on ``log_p`` (N x k, CUDA, any strides); returns the float64 vector
    ``[colsum (k) | wlogz (1) | d (k, modes 1 and 2) | W (k x k row-major, mode 2)]``.

    ``inv_c`` (N,) float32 and ``alpha32`` (k,) float32 must be contiguous on ``log_p``'s device.
    ``q``: also write Q there (N x k, any strides, may be ``log_p``; mode 0, k <= ROW_K), in the
    same pass (``step_write``); the column sums are then of the float32 values before any
    rounding to a 16-bit ``q`` (of the values written for a float32 ``q``).
    ``stride``: the W sample's block stride m (mode 2; default :func:`base.hessian_stride`, 1 for
    ``hessian="exact"``).
    """
    mod = _module()
    n, k = log_p.shape
    dev = log_p.device
    code = _IN_CODES[log_p.dtype]
    _, width, size = mod.plan_step(n, k, mode, code, dev.index, q is not None)
    workspace = torch.empty(max(size, 2), dtype=torch.float64, device=dev)
    out = torch.empty(width, dtype=torch.float64, device=dev)
    if q is not None:
        mod.step_write(log_p.data_ptr(), code, n, k, log_p.stride(0), log_p.stride(1),
                       inv_c.data_ptr(), alpha32.data_ptr(), workspace.data_ptr(),
                       workspace.numel(), out.data_ptr(), q.data_ptr(), _OUT_CODES[q.dtype],
                       q.stride(0), q.stride(1), dev.index, _stream(dev))
        return out
    m = (hessian_stride(n, k) if stride is None else stride) if mode == _FULL_HESSIAN else 1
    mod.step(log_p.data_ptr(), code, n, k, log_p.stride(0), log_p.stride(1), inv_c.data_ptr(),
             alpha32.data_ptr(), mode, m, workspace.data_ptr(), workspace.numel(), out.data_ptr(),
             dev.index, _stream(dev))
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
                    _stream(dev))


def _sampled_gram(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                  stride: Optional[int] = None) -> torch.Tensor:
    """W over the Hessian's row sample for k > 32, or over every row (``stride`` 1,
    ``hessian="exact"``) for any k (:func:`base.sampled_gram_by_chunks` with the materialize
    kernel)."""
    return sampled_gram_by_chunks(lambda lp, ic, q: _launch_materialize(lp, ic, alpha32, q),
                                  log_p, inv_c, stride)


def _fill_first(fill: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[fill (k) | softmax(fill) (k) | its q (1 - q) terms (k) | logsumexp(fill)] float32 on
    ``device``: fill and what a forget row written with it contributes to the first evaluation,
    worked out on the host in float64 (1 - q of the row's maximum from its other entries, as
    ``torch_ref.stats_from_q``) and sent in one copy. On the device this took about 15 small
    torch ops, each a launch; ``refine`` passes fill from the CPU (a device fill is read back
    first, one synchronisation)."""
    f = fill.detach().to("cpu", torch.float32).numpy()
    q, lz = softmax64(f)
    host = np.concatenate([f, q, accurate_diag(q), [lz]]).astype(np.float32)
    return torch.from_numpy(host).to(device)


def _launch_prepare(x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                    fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                    inv_c: Optional[torch.Tensor], hess: int, tol: float,
                    result: torch.Tensor) -> int:
    """Run the prepare kernels; the packed result (see ``base.unpack_prepare``, without W for
    k > 32) lands in ``result[:width]`` on the device. Returns width."""
    mod = _module()
    n, k = x.shape
    dev = x.device
    code = _PREP_CODES[x.dtype]
    mcode = MODE_CODE[mode]
    first = inv_c is not None
    _, width, size = mod.plan_prepare(n, k, mcode, code, first, hess, dev.index)
    workspace = torch.empty(max(size, 2), dtype=torch.float64, device=dev)
    # Temporaries stay referenced until the launch is queued; the caching allocator's stream
    # order keeps their memory valid until the kernels have run.
    keep = []
    forget_ptr = fill_ptr = ffirst_ptr = 0
    if forget is not None:
        f8 = forget.contiguous().view(torch.uint8)
        keep.append(f8)
        forget_ptr = f8.data_ptr()
        if fill is not None:
            if first and mode != "log_p":
                ff = _fill_first(fill, dev)
                keep.append(ff)
                fill_ptr = ff.data_ptr()
                ffirst_ptr = fill_ptr + 4 * k
            else:
                fill32 = fill.to(dev).contiguous()
                keep.append(fill32)
                fill_ptr = fill32.data_ptr()
    inv_ptr = 0
    if first:
        inv_c = inv_c.contiguous()
        keep.append(inv_c)
        inv_ptr = inv_c.data_ptr()
    out_ptr, out_code, out_row, out_col = 0, 0, 0, 0
    if out is not None:
        out_ptr, out_code = out.data_ptr(), _IN_CODES[out.dtype]
        out_row, out_col = out.stride(0), out.stride(1)
    m = hessian_stride(n, k) if hess == _FULL_HESSIAN else 1
    mod.prepare(x.data_ptr(), code, n, k, x.stride(0), x.stride(1), mcode, forget_ptr, fill_ptr,
                ffirst_ptr, out_ptr, out_code, out_row, out_col, inv_ptr, hess, m, float(tol),
                workspace.data_ptr(), workspace.numel(), result.data_ptr(), dev.index,
                _stream(dev))
    return width


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
        if log_p.dtype == torch.float64:
            reasons.append(FLOAT64_GPU_REASON)
        elif log_p.dtype not in _IN_CODES:
            reasons.append(f"log_p dtype {log_p.dtype} is not supported (float32, float16, "
                           f"bfloat16)")
        return reasons

    def _require(self, t: torch.Tensor) -> None:
        """Raise with every reason this backend cannot run on the solver buffer ``t``."""
        why = self.not_supported_reasons(t)
        if not why:
            why = self.available_reasons()
        if why:
            raise RuntimeError(f"cuda backend cannot run on this input ({t.dtype}, "
                               f"{tuple(t.shape)}, {t.device}): " + "; ".join(why))

    # -- prepare ----------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                inv_c: Optional[torch.Tensor] = None, hessian: Hessian = False,
                tol: float = ROW_SUM_TOL) -> PrepareOut:
        """Validate x, write log P^ into out, sum the rows and (with inv_c) give the first
        evaluation, in one pass over x; see :mod:`ppu_fast.backends.base`. One device-to-host
        copy of the packed result."""
        check_prepare_args(x, mode, forget, fill, out, inv_c, hessian)
        # x may be float64 with a float32 buffer: the buffer (out, else x) decides.
        self._require(out if out is not None else x)
        n, k = x.shape
        if n == 0 or k == 0:  # nothing to launch: the reference's answer, on the same device
            from .torch_ref import TorchBackend
            return TorchBackend().prepare(x, mode, forget, fill, out, inv_c, hessian, tol)
        first = inv_c is not None and (mode == "log_p" or out.dtype == torch.float32)
        hess = 0
        if first and hessian is not False:
            hess = _FULL_HESSIAN if (hessian is True and k <= _module().SMALL_K) else _DIAG_HESSIAN
        result = torch.empty(packed_size(k, first, hessian), dtype=torch.float64, device=x.device)
        width = _launch_prepare(x, mode, forget, fill, out, inv_c if first else None, hess, tol,
                                result)
        if first and hessian is True and hess != _FULL_HESSIAN:
            # k > 32: W from the stored rows at alpha = 0 (softmax of the stored log P^ is the
            # normalised input, or softmax(fill), to rounding), on the device before the copy.
            stored = out if out is not None else x
            alpha0 = torch.zeros(k, dtype=torch.float32, device=x.device)
            w = _sampled_gram(stored, inv_c.contiguous(), alpha0)
            result[width:].copy_(w.reshape(-1))
        elif width != result.numel():
            raise AssertionError(f"prepare: packed width {width} != {result.numel()}")
        return unpack_prepare(result.cpu(), k, mode, first, hessian)  # the one device-to-host copy

    # -- step / materialize -----------------------------------------------------------------------
    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        """One pass over ``log_p`` (N x k) -> (colsum (k,) f64, wlogz () f64, H).

        H is None, the contract's Newton Hessian ``assemble_hessian(d, W)`` (``hessian=True``)
        or the exact diagonal d (k,) (``hessian="diag"``); see :mod:`ppu_fast.backends.base`.
        colsum, wlogz and the diagonal are views of one float64 buffer.
        """
        check_step_args(log_p, inv_c, alpha, hessian)
        self._require(log_p)
        n, k = log_p.shape
        if k == 0:
            raise ValueError("log_p: expected at least one column (k >= 1), got shape "
                             f"{tuple(log_p.shape)}")
        inv_c = inv_c.contiguous()
        alpha32 = alpha.to(torch.float32).contiguous()  # the reference shifts in float32 too
        exact = hessian == "exact"
        w_in_kernel = hessian in (True, "exact") and k <= _module().SMALL_K
        mode = (_FULL_HESSIAN if w_in_kernel
                else _DIAG_HESSIAN if hessian is not False else _NO_HESSIAN)
        out = _launch_step(log_p, inv_c, alpha32, mode, stride=1 if exact else None)
        colsum, wlogz = out[:k], out[k]
        if hessian is False:
            return colsum, wlogz, None
        d = out[k + 1:2 * k + 1]
        if hessian == "diag":
            return colsum, wlogz, d
        w = (out[2 * k + 1:].view(k, k) if w_in_kernel
             else _sampled_gram(log_p, inv_c, alpha32, 1 if exact else None))
        return colsum, wlogz, assemble_hessian(d, w)

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Write Q(alpha) (N x k) into ``out`` (same shape and device; float32, float16, bfloat16
        or float64; any strides) and return ``out``."""
        self._check_materialize(log_p, inv_c, alpha, out)
        _launch_materialize(log_p, inv_c.contiguous(), alpha.to(torch.float32).contiguous(), out)
        return out

    def _check_materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                           out: torch.Tensor) -> None:
        """The arguments of materialize / materialize_sums, with out's dtype one we write."""
        check_step_args(log_p, inv_c, alpha, out=out)
        self._require(log_p)
        if out.dtype not in _OUT_CODES:
            raise TypeError(f"out: dtype {out.dtype} is not supported by the cuda backend; "
                            f"expected one of {[str(d) for d in _OUT_CODES]}")

    def bind_step(self, log_p: torch.Tensor, inv_c: torch.Tensor) -> HostStep:
        """``step`` on this ``log_p`` (N x k) / ``inv_c`` (N,), checked and planned once (see
        ``Backend.bind_step``): a pass stages alpha through a pinned buffer
        (:class:`base.DeviceStepStage`), launches the step kernels into a workspace and a result
        allocated here, and copies the packed result [colsum | wlogz | d | W] to the host in one
        copy, where H is assembled. The same kernels and launch arguments as ``step``, so the same
        results (H to the rounding of its assembly's sums). A dense Hessian for k > SMALL_K takes
        the diagonal's kernels and W from the sampled rows, gathered once
        (:class:`base.BoundGram`), into the same packed result."""
        generic, own = self._bind_checked(log_p, inv_c, _STEP)
        if not own:
            return generic
        n, k = log_p.shape
        dev = log_p.device
        mod = _module()
        inv_c = inv_c.contiguous()
        code = _IN_CODES[log_p.dtype]
        in_kernel_w = k <= mod.SMALL_K
        stride = hessian_stride(n, k)
        stage = DeviceStepStage(k, dev)
        # Per mode (planned on first use): the packed result and the workspace length it needs;
        # one workspace for all, grown to the largest (the passes run one after another).
        plans: dict = {}
        grams: dict = {}  # exact -> BoundGram
        ws = [torch.empty(2, dtype=torch.float64, device=dev)]

        def run(alpha, hessian: Hessian):
            check_hessian_mode(hessian)
            full = hessian in (True, "exact")
            exact = hessian == "exact"
            gram = full and not in_kernel_w
            a32 = stage.put_alpha(alpha)
            mode = (_FULL_HESSIAN if full and not gram else _DIAG_HESSIAN if hessian
                    else _NO_HESSIAN)
            if (mode, gram) not in plans:
                _, width, size = mod.plan_step(n, k, mode, code, dev.index, False)
                packed = torch.empty(width + (k * k if gram else 0), dtype=torch.float64,
                                     device=dev)
                plans[mode, gram] = (packed, packed[width:].view(k, k) if gram else None, size)
            packed, w, size = plans[mode, gram]
            if ws[0].numel() < size:
                ws[0] = torch.empty(size, dtype=torch.float64, device=dev)
            m = (1 if exact else stride) if mode == _FULL_HESSIAN else 1  # as _launch_step
            mod.step(log_p.data_ptr(), code, n, k, log_p.stride(0), log_p.stride(1),
                     inv_c.data_ptr(), a32.data_ptr(), mode, m, ws[0].data_ptr(), ws[0].numel(),
                     packed.data_ptr(), dev.index, _stream(dev))
            if gram:
                if exact not in grams:
                    grams[exact] = BoundGram(log_p, inv_c, 1 if exact else stride)
                grams[exact].into(lambda lp, ic, q: _launch_materialize(lp, ic, a32, q), w)
            return stage.fetch(packed, hessian)
        return run

    fused_materialize = True

    def materialize_sums(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                         out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``materialize`` into ``out`` (may be ``log_p``) and ``step``'s (colsum (k,), wlogz ())
        float64 at the same alpha: one pass (``step_write``) for k <= ROW_K, whose Q is
        materialize's (to the last bit up to k = 512; a pair of warps per row above that adds
        the row's float64 sum in another order); wider rows take a step, then materialize (no
        pass saved, the same results)."""
        self._check_materialize(log_p, inv_c, alpha, out)
        n, k = log_p.shape
        if n == 0 or k > _module().ROW_K:
            return self.step_then_materialize(log_p, inv_c, alpha, out)
        res = _launch_step(log_p, inv_c.contiguous(), alpha.to(torch.float32).contiguous(),
                           _NO_HESSIAN, q=out)
        return res[:k], res[k]


# The class's own step, for bind_step to tell a replaced one (a subclass, a test's patch).
_STEP = CudaBackend.step
