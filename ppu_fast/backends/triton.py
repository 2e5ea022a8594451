"""Triton backend: fused ``step`` / ``materialize`` kernels for CUDA tensors (primary GPU backend).

Three layers in one module, as in Triton's ``02-fused-softmax`` tutorial:

1. ``@triton.jit`` kernels: ``_step_tile_kernel`` / ``_q_tile_kernel`` (single read) and
   ``_row_stats_kernel``, ``_colsum_kernel`` / ``_q_cols_kernel`` (wide rows);
2. launchers (``_launch_step``, ``_launch_materialize``) that pick tiles from k (no autotuning) and
   size the grid from the device and the compiled kernel's occupancy;
3. :class:`TritonBackend`, the registry's ``"triton"`` backend (``name = "triton"``).

Maths (``ppu_fast.backends.base``): ``x_ik = log_p_ik - alpha_k * inv_c_i`` (float32),
``q_i = softmax(x_i)``, ``log Z_i = max_k x_ik + log sum_k exp(x_ik - max)``; column sums, the
weighted ``sum_i log Z_i / inv_c_i`` and the Hessian pieces accumulate in float64.  ``-inf`` entries
give exact zeros; masked lanes and all ``-inf`` blocks never form ``(-inf) - (-inf)``.

Two kernel families, chosen by ``BLOCK_K = next_pow2(k)``:

* **single read** (``BLOCK_K <= max_single_block_k``, default 4096, so k = 1000 is covered): a
  persistent program holds ``[BLOCK_ROWS x BLOCK_K]`` tiles of whole rows in registers, so each
  element of ``log_p`` is read from memory exactly once per ``step`` (the one-pass contract); the
  tile loop is software-pipelined (``NUM_STAGES``: the next tile's load is in flight while the
  current one is reduced).
* **wide rows** (larger k, e.g. 32,000; a row does not fit in one program's registers): pass 1,
  ``_row_stats_kernel``, runs an online softmax over k-blocks (running max and sum) and writes each
  row's shift and sum (8 bytes a row) and the log Z sums; pass 2, ``_colsum_kernel``, on a
  (column block x row group) grid, recomputes q and sums it per column block.  ``log_p`` is read
  twice (no L2 reuse at these sizes), nothing N x k is written.  A single fused two-loop kernel
  would also read twice and would in addition read-modify-write a program x k float64 workspace
  for every row tile, and its per-row state spilled registers under ptxas for sm_90.

Determinism: no atomics.  The grid is persistent (P = resident programs, from the device's SM
count and the compiled kernel's registers and shared memory, fixed for a given input type): program
``p`` handles row tiles ``p, p + P, p + 2P, ...``, sums each tile in float32, adds that into float64
per-program accumulators and writes them to a ``P x k`` float64 workspace (row groups likewise in
pass 2); the launcher reduces the workspace over the program axis with ``torch.sum`` (a fixed
order).  Two runs on the same device give bit-identical results.

Hessian (``hessian=True``): for ``k <= hessian_kernel_max_k`` (default 32) the kernel
accumulates ``sum_i inv_c_i q_i q_i^T`` per tile as a ``[BLOCK_K x BLOCK_K]`` ``tl.dot`` in float32
with ``input_precision="ieee"`` (no TF32), added into float64.  For larger k the launcher
materialises row chunks of Q (float32, ``torch_ref.chunk_rows`` rows at a time) with the
materialize kernel and forms ``(Q * inv_c)^T Q`` with a float32 torch GEMM, accumulating chunks in
float64: a second pass over the matrix plus chunk-sized temporaries, and an O(N k^2) GEMM that
dwarfs both.  ``hessian="diag"`` is always in-kernel.

Serving: CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1`` was set before this module (and
Triton) were imported, which is how CI tests the kernels.
"""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

try:  # the registry imports this module lazily and turns an ImportError into a reason
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"triton not installed ({exc})") from exc

from .base import (SUPPORTED_DTYPES, Backend, Hessian, StepOut, check_step_args,
                   hessian_by_chunks)

# Decided once, at import: triton.jit wraps kernels for the interpreter only if the variable was
# set before the kernels below were decorated.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# HESS constexpr values.
_H_NONE, _H_DIAG, _H_FULL = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Layer 1: kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k, s_n, s_k, s_c, IDX64: tl.constexpr,
            SN: tl.constexpr):
    """x = log_p - inv_c * alpha for a [R x C] tile (float32); -inf outside the matrix.

    Offsets are int32 unless IDX64 (set by the launcher when some offset may reach 2**31): int32
    offsets save registers.  The row stride is s_n * SN elements with SN a power of two chosen by
    the launcher (16 bytes' worth when the stride allows): the compiler then knows every row
    starts 16-byte aligned; with k a multiple of the constexpr KM (see the kernels) the column
    mask is constant over whole vectors, and loads become 16-byte vectors (k = 1000 float32:
    1000 = 4 x 250).
    """
    row_ok = rows < n
    col_ok = cols < k
    ri = rows.to(tl.int64) if IDX64 else rows
    ci = cols.to(tl.int64) if IDX64 else cols
    ic = tl.load(ic_ptr + ri * s_c, mask=row_ok, other=1.0)
    a = tl.load(a_ptr + cols, mask=col_ok, other=0.0)
    ptrs = lp_ptr + (ri * s_n * SN)[:, None] + ci[None, :] * s_k
    lp = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
    x = lp.to(tl.float32) - ic[:, None] * a[None, :]
    return x, ic, row_ok, col_ok


@triton.jit
def _step_tile_kernel(lp_ptr, ic_ptr, a_ptr, ws_c_ptr, ws_z_ptr, ws_h_ptr, ws_hh_ptr,
                      n, k_q, s_n, s_k, s_c, num_tiles, nprog,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HESS: tl.constexpr,
                      HK: tl.constexpr, IDX64: tl.constexpr, SN: tl.constexpr,
                      KM: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Single-read step: whole rows (BLOCK_K >= k) in a [BLOCK_ROWS x BLOCK_K] register tile.

    Program pid handles row tiles pid, pid + nprog, ...; the loop is software-pipelined
    (NUM_STAGES) so the next tile's load is in flight while this one is reduced.
    Bytes moved: reads N*k*elem_size (log_p, once) + 4N (inv_c) + 4k per program (alpha); writes
    only the nprog x k float64 workspaces (nprog = a few programs per SM), nothing N x k.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    acc_c = tl.zeros([BLOCK_K], tl.float64)        # sum_i q_ik
    acc_z = tl.zeros([BLOCK_ROWS], tl.float64)     # sum_i log Z_i / inv_c_i
    acc_h = tl.zeros([BLOCK_K], tl.float64)        # diag: sum ic q (1-q); full: sum ic q
    acc_hh = tl.zeros([HK, HK], tl.float64)        # full: sum ic q q^T (HK == BLOCK_K), else 1x1
    for t in tl.range(pid, num_tiles, nprog, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k, s_n, s_k, s_c,
                                        IDX64, SN)
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)   # padding rows: avoid (-inf) - (-inf) = NaN
        e = tl.exp(x - m[:, None])                  # exact 0 at -inf entries and padding
        s = tl.sum(e, axis=1)
        s = tl.where(row_ok, s, 1.0)                # padding rows: q = 0 / 1 = 0
        q = e / s[:, None]
        acc_c += tl.sum(q, axis=0).to(tl.float64)
        logz = m + tl.log(s)
        acc_z += tl.where(row_ok, logz.to(tl.float64) / ic.to(tl.float64), 0.0)
        if HESS == 1:
            acc_h += tl.sum(q * ic[:, None] * (1.0 - q), axis=0).to(tl.float64)
        if HESS == 2:
            qw = q * ic[:, None]
            acc_h += tl.sum(qw, axis=0).to(tl.float64)
            # float32 products summed over the tile, no TF32 ("ieee"), then into float64.
            acc_hh += tl.dot(tl.trans(qw), q, input_precision="ieee").to(tl.float64)
    col_ok = cols < k
    tl.store(ws_c_ptr + pid * k + cols, acc_c, mask=col_ok)
    tl.store(ws_z_ptr + pid, tl.sum(acc_z, axis=0))
    if HESS != 0:
        tl.store(ws_h_ptr + pid * k + cols, acc_h, mask=col_ok)
    if HESS == 2:
        hr = tl.arange(0, HK)
        tl.store(ws_hh_ptr + pid * HK * HK + hr[:, None] * HK + hr[None, :], acc_hh)


@triton.jit
def _row_stats_kernel(lp_ptr, ic_ptr, a_ptr, m_ptr, s_ptr, ws_z_ptr,
                      n, k_q, s_n, s_k, s_c, num_tiles, nprog,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, IDX64: tl.constexpr,
                      SN: tl.constexpr, KM: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Wide rows, pass 1: online softmax over k-blocks (running max and sum) per row.

    Writes the row's shift m and sum s (float32, so that q = exp(x - m) / s) and, per program, the
    float64 sum of log Z_i / inv_c_i.  Bytes moved: reads N*k*elem_size + 4N, writes 8N + 8 nprog.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    pid = tl.program_id(0)
    acc_z = tl.zeros([BLOCK_ROWS], tl.float64)
    for t in range(pid, num_tiles, nprog):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        m_run = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        s_run = tl.zeros([BLOCK_ROWS], tl.float32)
        for k0 in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
            cols = k0 + tl.arange(0, BLOCK_K)
            x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k,
                                            s_n, s_k, s_c, IDX64, SN)
            m_new = tl.maximum(m_run, tl.max(x, axis=1))
            # Everything so far -inf (a -inf block, or padding): shift by 0, never compute
            # (-inf) - (-inf) = NaN; exp(-inf - 0) = 0 keeps s_run exact.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
            m_run = m_new
        row_ok = rows < n
        ri = rows.to(tl.int64) if IDX64 else rows
        ic = tl.load(ic_ptr + ri * s_c, mask=row_ok, other=1.0)
        m = tl.where(m_run == float("-inf"), 0.0, m_run)
        s = tl.where(row_ok, s_run, 1.0)
        tl.store(m_ptr + rows, m, mask=row_ok)
        tl.store(s_ptr + rows, s, mask=row_ok)
        logz = m + tl.log(s)
        acc_z += tl.where(row_ok, logz.to(tl.float64) / ic.to(tl.float64), 0.0)
    tl.store(ws_z_ptr + pid, tl.sum(acc_z, axis=0))


@triton.jit
def _colsum_kernel(lp_ptr, ic_ptr, a_ptr, m_ptr, s_ptr, ws_c_ptr, ws_h_ptr,
                   n, k_q, s_n, s_k, s_c, num_tiles, ngroups,
                   BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HESS: tl.constexpr,
                   IDX64: tl.constexpr, SN: tl.constexpr, KM: tl.constexpr,
                   NUM_STAGES: tl.constexpr):
    """Wide rows, pass 2: program (cb, g) sums q over row tiles g, g + ngroups, ... of column
    block cb, in float32 per tile and float64 across tiles, and writes row g of the workspaces.

    Bytes moved: reads N*k*elem_size (the second read of log_p) + 12N per column block, writes
    ngroups x k float64 (x2 with the diagonal Hessian).
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    cb = tl.program_id(0)
    g = tl.program_id(1)
    cols = cb * BLOCK_K + tl.arange(0, BLOCK_K)
    acc_c = tl.zeros([BLOCK_K], tl.float64)
    acc_h = tl.zeros([BLOCK_K], tl.float64)
    for t in tl.range(g, num_tiles, ngroups, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k, s_n, s_k, s_c,
                                        IDX64, SN)
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        s = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
        q = tl.exp(x - m[:, None]) / s[:, None]
        acc_c += tl.sum(q, axis=0).to(tl.float64)
        if HESS == 1:
            acc_h += tl.sum(q * ic[:, None] * (1.0 - q), axis=0).to(tl.float64)
    col_ok = cols < k
    tl.store(ws_c_ptr + g * k + cols, acc_c, mask=col_ok)
    if HESS == 1:
        tl.store(ws_h_ptr + g * k + cols, acc_h, mask=col_ok)


@triton.jit
def _q_tile_kernel(lp_ptr, ic_ptr, a_ptr, out_ptr, n, k_q, s_n, s_k, s_c, o_n, o_k,
                   num_tiles, nprog, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                   IDX64: tl.constexpr, SN: tl.constexpr, ON: tl.constexpr,
                   KM: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Single-read materialize: Q into out (its dtype, any strides).

    Bytes moved: reads N*k*elem_size + 4N, writes N*k*out_elem_size.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    for t in tl.range(pid, num_tiles, nprog, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k, s_n, s_k, s_c,
                                        IDX64, SN)
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m[:, None])
        s = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
        q = e / s[:, None]
        ri = rows.to(tl.int64) if IDX64 else rows
        ci = cols.to(tl.int64) if IDX64 else cols
        optrs = out_ptr + (ri * o_n * ON)[:, None] + ci[None, :] * o_k
        tl.store(optrs, q.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _q_cols_kernel(lp_ptr, ic_ptr, a_ptr, m_ptr, s_ptr, out_ptr, n, k_q, s_n, s_k, s_c, o_n, o_k,
                   num_tiles, ngroups, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                   IDX64: tl.constexpr, SN: tl.constexpr, ON: tl.constexpr,
                   KM: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Wide rows, materialize pass 2 (after _row_stats_kernel): q for column block cb.

    Bytes moved: reads N*k*elem_size + 8N per column block, writes N*k*out_elem_size.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    cb = tl.program_id(0)
    g = tl.program_id(1)
    cols = cb * BLOCK_K + tl.arange(0, BLOCK_K)
    for t in tl.range(g, num_tiles, ngroups, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k, s_n, s_k, s_c,
                                        IDX64, SN)
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        s = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
        q = tl.exp(x - m[:, None]) / s[:, None]
        ri = rows.to(tl.int64) if IDX64 else rows
        ci = cols.to(tl.int64) if IDX64 else cols
        optrs = out_ptr + (ri * o_n * ON)[:, None] + ci[None, :] * o_k
        tl.store(optrs, q.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Layer 2: launchers
# --------------------------------------------------------------------------------------------

# Software-pipelining depth of the main loops (cp.async prefetch of the next tile / k-block).
NUM_STAGES = 2
# Upper bound on resident programs per SM (keeps the nprog x k workspaces small).
MAX_PROGRAMS_PER_SM = 8
# The interpreter runs programs one after another: few programs, same code paths.
INTERPRET_PROGRAMS = 4
INTERPRET_GROUPS = 2
# Placeholder program count while sizing the grid: any value but 1 (Triton specialises int
# arguments equal to 1), so the probe compiles the same code as the launch.
_PROBE = 3


class _Tile(NamedTuple):
    block_rows: int
    block_k: int
    num_warps: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _single_tile(k: int, full_hessian: bool = False) -> _Tile:
    """Tile of the single-read kernels (whole rows: BLOCK_K = next_pow2(k)); no autotuning.

    ~2048-element tiles with 4 warps for k <= 256 (k = 10 -> 128 rows x 16), ~8192 elements with
    8 warps above (k = 1000 -> 8 rows x 1024, 4096 -> 2 x 4096): 16-32 float32 values per thread.
    In-kernel full Hessian: ~1024-element tiles (>= 16 rows and columns for tl.dot), so that the
    dot and its float64 accumulator fit in registers.  Checked with ptxas for sm_90 (Triton 3.8):
    no spills at NUM_STAGES = 2; 128 registers for float32 k = 1000 (2 programs of 8 warps per SM).
    """
    bk = _next_pow2(k)
    if full_hessian:
        bk = max(bk, 16)
        return _Tile(max(16, 1024 // bk), bk, 4)
    if bk <= 256:
        return _Tile(min(256, max(16, 2048 // bk)), bk, 4)
    return _Tile(max(1, 8192 // bk), bk, 8)


def _online_tiles(online_block_k: int) -> Tuple[_Tile, _Tile]:
    """Tiles of the wide-row kernels: (row stats: 4 rows x online_block_k, 8 warps;
    column blocks: 8 rows x online_block_k / 4, 4 warps).  Small row counts keep the per-row
    running max and sum cheap in registers (16 rows x 512 spilled under ptxas for sm_90).  The
    interpreter, whose cost is per loop iteration, uses 64-row tiles (same code, fewer iterations).
    """
    rows_stats, rows_cols = (64, 64) if INTERPRET else (4, 8)
    return (_Tile(rows_stats, online_block_k, 8 if online_block_k >= 1024 else 4),
            _Tile(rows_cols, max(16, online_block_k // 4), 4))


def _split_stride(stride: int, elem_size: int) -> Tuple[int, int]:
    """(stride // mult, mult) with mult the largest power of two <= 16 bytes of elements dividing
    stride (a row stride, or k); kernels multiply back by the constexpr mult, which tells the
    compiler about alignment (Triton itself only knows "divisible by 16" or not)."""
    mult = max(1, 16 // elem_size)
    while mult > 1 and stride % mult:
        mult //= 2
    return stride // mult, mult


def _needs_idx64(rows_padded: int, cols_padded: int, *strides: Tuple[int, ...]) -> bool:
    """True if some (row, col) offset of the padded tile grid may reach 2**31 elements."""
    return any(rows_padded * abs(st[0]) + cols_padded * abs(st[-1]) >= 2 ** 31 - 1
               for st in strides)


_CAPACITY: Dict[tuple, int] = {}


def _capacity(kernel, args: tuple, consts: dict, num_warps: int, device: torch.device) -> int:
    """Programs that can be resident at once: SMs x programs per SM (GPU), or a few (interpreter).

    Programs per SM come from the compiled kernel's registers and shared memory, as in Triton's
    fused-softmax tutorial.  They depend only on the compiled variant, so an input of a given
    type, shape and layout always gets the same grid and the same summation order.
    """
    if device.type != "cuda" or INTERPRET:
        return INTERPRET_PROGRAMS
    spec = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                 else (a == 1, a % 16 == 0) for a in args)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (getattr(kernel, "__name__", None) or id(kernel), spec, tuple(sorted(consts.items())),
           num_warps, idx)
    if key not in _CAPACITY:
        props = torch.cuda.get_device_properties(idx)
        per_sm = max(1, min(MAX_PROGRAMS_PER_SM, 2048 // (32 * num_warps)))
        try:
            ck = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **consts)
            ck._init_handles()
            per_sm = min(per_sm, max(1, props.regs_per_multiprocessor
                                     // (max(1, ck.n_regs) * 32 * num_warps)))
            if ck.metadata.shared:
                per_sm = min(per_sm, max(1, props.shared_memory_per_multiprocessor
                                         // ck.metadata.shared))
        except Exception:  # warmup/metadata API drift across Triton versions: warps alone
            per_sm = min(per_sm, max(1, 16 // num_warps))
        _CAPACITY[key] = per_sm * props.multi_processor_count
    return _CAPACITY[key]


def _ngroups(capacity: int, n_col_blocks: int, num_tiles: int, device: torch.device) -> int:
    """Row groups of the 2-D (column block x row group) grids."""
    if device.type != "cuda" or INTERPRET:
        return max(1, min(num_tiles, INTERPRET_GROUPS))
    return max(1, min(num_tiles, triton.cdiv(capacity, n_col_blocks)))


def _launch_row_stats(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                      online_block_k: int, idx64: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wide rows, pass 1 -> (m (N,) f32, s (N,) f32, wlogz () f64)."""
    n, k = log_p.shape
    tile = _online_tiles(online_block_k)[0]
    num_tiles = triton.cdiv(n, tile.block_rows)
    m = torch.empty(n, dtype=torch.float32, device=log_p.device)
    s = torch.empty(n, dtype=torch.float32, device=log_p.device)
    snq, sn = _split_stride(log_p.stride(0), log_p.element_size())
    kq, km = _split_stride(k, log_p.element_size())
    consts = dict(BLOCK_ROWS=tile.block_rows, BLOCK_K=tile.block_k, IDX64=idx64, SN=sn, KM=km,
                  NUM_STAGES=NUM_STAGES)
    dummy = torch.empty(1, dtype=torch.float64, device=log_p.device)  # float64, as ws_z
    args = [log_p, inv_c, alpha32, m, s, dummy, n, kq, snq, log_p.stride(1),
            inv_c.stride(0), num_tiles, _PROBE]
    p = min(num_tiles, _capacity(_row_stats_kernel, tuple(args), consts, tile.num_warps,
                                 log_p.device))
    ws_z = torch.empty(p, dtype=torch.float64, device=log_p.device)
    args[5], args[-1] = ws_z, p
    _row_stats_kernel[(p,)](*args, num_warps=tile.num_warps, **consts)
    return m, s, ws_z.sum()


def _launch_step(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                 hess: int, max_single_block_k: int, online_block_k: int,
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                            Optional[torch.Tensor]]:
    """Run the step kernel(s) on log_p (N x k, N, k >= 1); alpha32 (k,) float32 contiguous.

    Returns (colsum (k,), wlogz (), h, hh), all float64: h is the diag-Hessian for _H_DIAG or
    sum_i ic q_i for _H_FULL (else None), hh = sum_i ic q_i q_i^T (k x k) for _H_FULL (else None).
    The partial sums of the programs are reduced here in a fixed order (torch.sum over the
    program axis): deterministic, no atomics.
    """
    n, k = log_p.shape
    dev = log_p.device
    f64 = dict(dtype=torch.float64, device=dev)
    dummy = torch.empty(1, **f64)
    full = hess == _H_FULL
    snq, sn = _split_stride(log_p.stride(0), log_p.element_size())
    kq, km = _split_stride(k, log_p.element_size())
    if _next_pow2(k) <= max_single_block_k:
        tile = _single_tile(k, full)
        br, bk = tile.block_rows, tile.block_k
        num_tiles = triton.cdiv(n, br)
        hk = bk if full else 1
        consts = dict(BLOCK_ROWS=br, BLOCK_K=bk, HESS=hess, HK=hk,
                      IDX64=_needs_idx64(num_tiles * br, bk, log_p.stride(), inv_c.stride()),
                      SN=sn, KM=km, NUM_STAGES=NUM_STAGES)
        args = [log_p, inv_c, alpha32, dummy, dummy, dummy, dummy, n, kq, snq,
                log_p.stride(1), inv_c.stride(0), num_tiles, _PROBE]
        p = min(num_tiles, _capacity(_step_tile_kernel, tuple(args), consts, tile.num_warps, dev))
        ws_c, ws_z = torch.empty(p, k, **f64), torch.empty(p, **f64)
        ws_h = torch.empty(p, k, **f64) if hess else dummy
        ws_hh = torch.empty(p, hk, hk, **f64) if full else dummy
        args[3:7] = [ws_c, ws_z, ws_h, ws_hh]
        args[-1] = p
        _step_tile_kernel[(p,)](*args, num_warps=tile.num_warps, **consts)
        return (ws_c.sum(dim=0), ws_z.sum(), ws_h.sum(dim=0) if hess else None,
                ws_hh.sum(dim=0)[:k, :k] if full else None)
    if full:
        raise AssertionError("in-kernel full Hessian needs the single-read kernel")
    # Wide rows: pass 1 (row stats), pass 2 (column blocks x row groups).
    tile = _online_tiles(online_block_k)[1]
    br, bk = tile.block_rows, tile.block_k
    num_tiles = triton.cdiv(n, br)
    idx64 = _needs_idx64(triton.cdiv(n, 64) * 64, triton.cdiv(k, online_block_k) * online_block_k,
                         log_p.stride(), inv_c.stride())
    m, s, wlogz = _launch_row_stats(log_p, inv_c, alpha32, online_block_k, idx64)
    n_cb = triton.cdiv(k, bk)
    consts = dict(BLOCK_ROWS=br, BLOCK_K=bk, HESS=hess, IDX64=idx64, SN=sn, KM=km,
                  NUM_STAGES=NUM_STAGES)
    args = [log_p, inv_c, alpha32, m, s, dummy, dummy, n, kq, snq, log_p.stride(1),
            inv_c.stride(0), num_tiles, _PROBE]
    g = _ngroups(_capacity(_colsum_kernel, tuple(args), consts, tile.num_warps, dev), n_cb,
                 num_tiles, dev)
    ws_c = torch.zeros(g, k, **f64)
    ws_h = torch.zeros(g, k, **f64) if hess else dummy
    args[5:7] = [ws_c, ws_h]
    args[-1] = g
    _colsum_kernel[(n_cb, g)](*args, num_warps=tile.num_warps, **consts)
    return ws_c.sum(dim=0), wlogz, ws_h.sum(dim=0) if hess else None, None


def _launch_materialize(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                        out: torch.Tensor, max_single_block_k: int, online_block_k: int) -> None:
    """Write Q (N x k) into out (any strides, dtype in OUT_DTYPES); N, k >= 1."""
    n, k = log_p.shape
    dev = log_p.device
    if INTERPRET and out.dtype == torch.bfloat16:
        # Triton 3.8's interpreter casts float32 -> bfloat16 by truncation (it ignores the
        # rounding mode); compiled kernels round to nearest even.  Let torch do that cast here.
        buf = torch.empty(out.shape, dtype=torch.float32, device=dev)
        _launch_materialize(log_p, inv_c, alpha32, buf, max_single_block_k, online_block_k)
        out.copy_(buf)
        return
    snq, sn = _split_stride(log_p.stride(0), log_p.element_size())
    onq, on = _split_stride(out.stride(0), out.element_size())
    kq, km = _split_stride(k, log_p.element_size())
    strides = [snq, log_p.stride(1), inv_c.stride(0), onq, out.stride(1)]
    if _next_pow2(k) <= max_single_block_k:
        tile = _single_tile(k)
        num_tiles = triton.cdiv(n, tile.block_rows)
        consts = dict(BLOCK_ROWS=tile.block_rows, BLOCK_K=tile.block_k,
                      IDX64=_needs_idx64(num_tiles * tile.block_rows, tile.block_k,
                                         log_p.stride(), out.stride(), inv_c.stride()),
                      SN=sn, ON=on, KM=km, NUM_STAGES=NUM_STAGES)
        args = [log_p, inv_c, alpha32, out, n, kq, *strides, num_tiles, _PROBE]
        p = min(num_tiles, _capacity(_q_tile_kernel, tuple(args), consts, tile.num_warps, dev))
        args[-1] = p
        _q_tile_kernel[(p,)](*args, num_warps=tile.num_warps, **consts)
        return
    tile = _online_tiles(online_block_k)[1]
    num_tiles = triton.cdiv(n, tile.block_rows)
    idx64 = _needs_idx64(triton.cdiv(n, 64) * 64, triton.cdiv(k, online_block_k) * online_block_k,
                         log_p.stride(), out.stride(), inv_c.stride())
    m, s, _ = _launch_row_stats(log_p, inv_c, alpha32, online_block_k, idx64)
    n_cb = triton.cdiv(k, tile.block_k)
    consts = dict(BLOCK_ROWS=tile.block_rows, BLOCK_K=tile.block_k, IDX64=idx64, SN=sn, ON=on,
                  KM=km, NUM_STAGES=NUM_STAGES)
    args = [log_p, inv_c, alpha32, m, s, out, n, kq, *strides, num_tiles, _PROBE]
    g = _ngroups(_capacity(_q_cols_kernel, tuple(args), consts, tile.num_warps, dev), n_cb,
                 num_tiles, dev)
    args[-1] = g
    _q_cols_kernel[(n_cb, g)](*args, num_warps=tile.num_warps, **consts)


# --------------------------------------------------------------------------------------------
# Layer 3: the backend
# --------------------------------------------------------------------------------------------

class TritonBackend(Backend):
    """Fused Triton kernels (see the module docstring); ``name = "triton"``.

    ``max_single_block_k``: largest ``next_pow2(k)`` handled by the single-read kernels (above it,
    the two-pass wide-row kernels, whose row-stats k-blocks are ``online_block_k`` wide and whose
    column blocks are ``online_block_k // 4`` wide); ``hessian_kernel_max_k``: largest k whose full
    Hessian is accumulated in the kernel (above it, materialised chunks and a torch GEMM).  Tests
    lower these to exercise every path on small inputs.
    """

    name = "triton"

    def __init__(self, max_single_block_k: int = 4096, online_block_k: int = 1024,
                 hessian_kernel_max_k: int = 32) -> None:
        for name, v in (("max_single_block_k", max_single_block_k),
                        ("online_block_k", online_block_k)):
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {v!r}")
        if hessian_kernel_max_k < 0:
            raise ValueError(f"hessian_kernel_max_k: expected >= 0, got {hessian_kernel_max_k}")
        self.max_single_block_k = max_single_block_k
        self.online_block_k = online_block_k
        self.hessian_kernel_max_k = hessian_kernel_max_k

    def available_reasons(self) -> List[str]:
        if torch.cuda.is_available() or INTERPRET:
            return []
        return ["no CUDA device and TRITON_INTERPRET is not 1"]

    def not_supported_reasons(self, log_p: torch.Tensor) -> List[str]:
        why = []
        dev = log_p.device.type
        if dev == "cpu" and not INTERPRET:
            why.append("log_p is a CPU tensor and TRITON_INTERPRET is not 1 (Triton runs CPU "
                       "tensors only in its interpreter)")
        elif dev not in ("cpu", "cuda"):
            why.append(f"log_p is on {log_p.device}; triton serves CUDA tensors")
        if log_p.dtype not in SUPPORTED_DTYPES:
            why.append(f"log_p dtype {log_p.dtype} not supported; expected one of "
                       f"{[str(d) for d in SUPPORTED_DTYPES]}")
        return why

    def _require(self, log_p: torch.Tensor) -> None:
        why = self.available_reasons() + self.not_supported_reasons(log_p)
        if why:
            raise RuntimeError("triton backend cannot run on this input: " + "; ".join(why))

    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        """One fused pass over ``log_p`` (N x k) -> (colsum (k,), wlogz (), H). See ``base``."""
        check_step_args(log_p, inv_c, alpha, hessian)
        self._require(log_p)
        n, k = log_p.shape
        if k == 0:
            raise ValueError("log_p: expected k >= 1 columns, got 0")
        f64 = dict(dtype=torch.float64, device=log_p.device)
        if n == 0:
            h0 = (torch.zeros(k, k, **f64) if hessian is True
                  else torch.zeros(k, **f64) if hessian == "diag" else None)
            return torch.zeros(k, **f64), torch.zeros((), **f64), h0
        alpha32 = alpha.float().contiguous()
        with _on_device(log_p.device):
            if hessian == "diag":
                colsum, wlogz, h, _ = self._step(log_p, inv_c, alpha32, _H_DIAG)
                return colsum, wlogz, h
            if hessian is True and _next_pow2(k) <= self.max_single_block_k \
                    and k <= self.hessian_kernel_max_k:
                colsum, wlogz, wsum, hh = self._step(log_p, inv_c, alpha32, _H_FULL)
                return colsum, wlogz, torch.diag(wsum) - hh
            colsum, wlogz, _, _ = self._step(log_p, inv_c, alpha32, _H_NONE)
            if hessian is True:
                return colsum, wlogz, self._hessian_by_chunks(log_p, inv_c, alpha32)
            return colsum, wlogz, None

    def _step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor, hess: int):
        return _launch_step(log_p, inv_c, alpha32, hess, self.max_single_block_k,
                            self.online_block_k)

    def _hessian_by_chunks(self, log_p: torch.Tensor, inv_c: torch.Tensor,
                           alpha32: torch.Tensor) -> torch.Tensor:
        """H = sum_i ic_i (diag(q_i) - q_i q_i^T) (k x k f64); see :func:`hessian_by_chunks`."""
        return hessian_by_chunks(
            lambda lp, ic, q: _launch_materialize(lp, ic, alpha32, q, self.max_single_block_k,
                                                  self.online_block_k),
            log_p, inv_c)

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Write Q(alpha) (N x k) into ``out`` (float32/16/bf16/64, any strides); returns out."""
        check_step_args(log_p, inv_c, alpha, out=out)
        if out.dtype not in OUT_DTYPES:
            raise TypeError(f"out: dtype {out.dtype} not supported; expected one of "
                            f"{[str(d) for d in OUT_DTYPES]}")
        self._require(log_p)
        n, k = log_p.shape
        if k == 0:
            raise ValueError("log_p: expected k >= 1 columns, got 0")
        if n == 0:
            return out
        with _on_device(log_p.device):
            _launch_materialize(log_p, inv_c, alpha.float().contiguous(), out,
                                self.max_single_block_k, self.online_block_k)
        return out


class _on_device:
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""

    def __init__(self, device: torch.device) -> None:
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
