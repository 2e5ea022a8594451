"""Triton backend: fused ``prepare`` / ``step`` / ``materialize`` kernels for CUDA tensors (the
primary GPU backend).

Three layers in one module, as in Triton's ``02-fused-softmax`` tutorial:

1. ``@triton.jit`` kernels. Single read (whole rows in one register tile): ``_prep_tile_kernel``,
   ``_step_tile_kernel``, ``_q_tile_kernel``. Wide rows (two reads): ``_prep_stats_kernel`` +
   ``_prep_cols_kernel``, ``_row_stats_kernel`` + ``_colsum_kernel`` / ``_q_cols_kernel``;
2. launchers (``_launch_prepare``, ``_launch_step``, ``_launch_materialize``) that pick tiles from
   k (no autotuning), size the grid from the device and the compiled kernel's occupancy, and
   reduce the per-program workspaces in a fixed order on the device;
3. :class:`TritonBackend`, the registry's ``"triton"`` backend (``name = "triton"``).

Maths (``ppu_fast.backends.base`` is the contract): ``x_ik = log_p_ik - alpha_k * inv_c_i``
(float32), ``q_i = softmax(x_i)``, ``log Z_i = max_k x_ik + log sum_k exp(x_ik - max)``; column
sums, ``sum_i log Z_i / inv_c_i`` and the Hessian pieces accumulate in float64 (float32 within a
tile).  ``-inf`` entries give exact zeros; masked lanes and all ``-inf`` blocks never form
``(-inf) - (-inf)``.

**Kernel families**, chosen by ``BLOCK_K = next_pow2(k)``:

* single read (``BLOCK_K <= max_single_block_k``, default 4096, so k = 1000 is covered): a
  persistent program holds ``[BLOCK_ROWS x BLOCK_K]`` tiles of whole rows in registers, so every
  element is read from memory once per call.  The tile loop is ``tl.range(num_stages=NUM_STAGES)``
  (the next tile is fetched by cp.async while this one is reduced).  From BLOCK_K = 512 on, a
  program has BLOCK_K / 512 warps and 2 rows (1 for prepare): k = 1000 -> 2 x 1024 with 2 warps.
  Triton lays such rows out with every warp along the columns, so row reductions cross the warps
  through shared memory and per-row scalars are computed by every thread; with few warps per
  program the step loop costs 0.73 warp-instructions per element under ptxas for sm_90 (1.39
  with the former 8 rows x 8 warps: an issue bound near 70 % of copy bandwidth), see
  ``_single_tile`` and docs/triton_notes.md.
* wide rows (larger k, e.g. 32,000; a row does not fit in one program's registers): pass 1 runs
  over k-blocks per row tile (online max / sum, validation) and writes a few float32 per row; pass
  2, on a (column block x row group) grid, re-reads the rows and does the column work.  The input
  is read twice (no L2 reuse at these sizes).

**Bytes moved** (E = N*k elements; sizes in bytes of x, log_p, out):

* ``prepare``, single read: reads E*|x| + N (forget mask) [+ 4N inv_c with a first evaluation],
  writes E*|out|; nothing else N x k.  Wide rows: reads E*|x| twice, writes E*|out| + 8-12 N.
* ``step``, single read: reads E*|log_p| + 4N, writes only a P x (2k + 1 [+ HK^2]) float64
  workspace (P = resident programs).  Wide rows: reads E*|log_p| twice + 8-12 N per column
  block, writes 8-12 N.  With ``hessian=True`` above ``hessian_kernel_max_k``, W reads and
  materialises only the sampled rows (about max(4096, 2 N / k) of them).
* ``materialize``: reads E*|log_p| (twice for wide rows), writes E*|out|.

**prepare** validates every row (the first offending row is the minimum of ``row * 8 + kind`` over
per-program int64 minima), writes log P^ (``fill`` on forget rows), sums the normalised rows over
the retained / forgotten rows in float64 (the column maximum in "log_p" mode) and, with ``inv_c``
and a float32 buffer (or "log_p" mode), the solver's first evaluation at alpha = 0: from the
normalised rows ("probs" / "logits"; the forget rows' ``softmax(fill)`` terms are added on the
host in float64 from the kernel's sums over them, so the kernel does no per-element selects for
them) or from the values as stored ("log_p": rounded to the buffer's dtype in the kernel).  The
partial results are reduced on the device (one packed row of sums per program), copied to the
host once and unpacked into ``base.unpack_prepare``'s float64 layout there.

**The Hessian** (see ``base``): the diagonal ``d_j = sum_i inv_c_i q_ij (1 - q_ij)`` is computed
in every kernel that produces it with ``1 - q`` of the row maximum taken from the row's other
entries (``(sum of the smaller entries + (count of maxima - 1) * max) / sum``; the row maximum is
where ``x == max``, i.e. ``exp(x - max) == 1``), never as ``1 - q`` in float32, which is 0 on a
one-hot row.  ``hessian=True`` returns ``assemble_hessian(d, W)`` with ``W`` over the row sample
of ``base.hessian_stride``: for ``k <= hessian_kernel_max_k`` (32) accumulated in the step /
prepare kernel as a ``tl.dot`` (float32, ``input_precision="ieee"``: no TF32) of the sampled rows
only (tiles without a sampled 16-row block skip the dot); for larger k (or wide rows) by
``base.sampled_gram_by_chunks`` over the materialize kernel (only the sampled rows are read).

**Determinism**: no atomics.  The grid is persistent (P = resident programs, from the device's
SM count and the compiled kernel's registers and shared memory, fixed for a given input type):
program ``p`` handles row tiles ``p, p + P, ...``, sums each tile in float32, adds that into
float64 per-program accumulators and writes them to a ``P x k`` float64 workspace (row groups
likewise in the wide kernels); the launcher reduces the workspace over the program axis with
``torch.sum`` / ``min`` / ``max`` (a fixed order).  The single-read step and materialize kernels
write one packed row per program ([colsum | sum log Z / inv_c | d | W]), so a pass's sums are
one reduction and one copy.  Two runs on the same device are bit-identical.

**Host synchronisation**: ``step`` and ``materialize`` never synchronise (the sampled rows come
from ``base.hessian_sample_rows``, arange arithmetic with the count known on the host);
``prepare`` copies its packed result to the host once.

Serving: CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1`` was set before this module (and
Triton) were imported, which is how CI tests the kernels.  Tiles, warps and stages: see
``_single_tile`` and ``docs/triton_notes.md`` (offline ptxas analysis for sm_90).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

try:  # the registry imports this module lazily and turns an ImportError into a reason
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"triton not installed ({exc})") from exc

from .base import (FLOAT32_DTYPES, FLOAT64_GPU_REASON, HESS_BLOCK, MODE_CODE, ROW_SUM_TOL,
                   Backend, BoundGram, DeviceStepStage, Hessian, HostStep, PrepareOut, StepOut,
                   accurate_diag, assemble_hessian, check_hessian_mode, check_prepare_args,
                   check_step_args, hessian_stride, packed_size, sampled_gram_by_chunks,
                   softmax64, unpack_prepare)

# Decided once, at import: triton.jit wraps kernels for the interpreter only if the variable was
# set before the kernels below were decorated.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _quiet_interpreter(fn):
    """Run ``fn`` with numpy's floating-point warnings off under the interpreter, which evaluates
    the kernels in numpy: log(0) = -inf and exp(-inf) = 0 are meant (zero probabilities), and
    their RuntimeWarnings would fail a caller's ``-W error``; so would numpy's "All-NaN slice"
    warning (``warnings.warn``, not errstate) from a max over a row of NaN, which prepare reports
    as the row's fault. Compiled kernels are untouched."""
    if not INTERPRET:
        return fn

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(*args, **kwargs)

    return quiet


OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# HESS constexpr values.
_H_NONE, _H_DIAG, _H_FULL = 0, 1, 2

# prepare's fault keys are row * 8 + kind; this marks "no fault".
_KEY_NONE = tl.constexpr(1 << 62)
_HB = tl.constexpr(HESS_BLOCK)


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
def _top_stats(x, m, e):
    """Per row of a tile: the row maximum's entries (x == m), their count and the sum of e over
    the other entries.  With e = exp(x - m) (e == 1 at the maximum) or e = x (probabilities,
    m = max), ``1 - q`` of a maximal entry is ``(sum_other + (count - 1) * e_max) / sum``: no
    cancellation, unlike ``1 - q`` in float32 (0 on a one-hot row)."""
    top = x == m[:, None]
    cnt = tl.sum(top.to(tl.float32), axis=1)
    snt = tl.sum(tl.where(top, 0.0, e), axis=1)
    return top, cnt, snt


@triton.jit
def _online(m_run, s_run, c_run, x, TOP: tl.constexpr):
    """One k-block of an online softmax over rows: running max m, sum s (rescaled to m).  With
    TOP, s is the sum over the entries below the running maximum and c the count of entries equal
    to it (the total is s + c), which ``_top_stats`` gives for a whole row."""
    m_new = tl.maximum(m_run, tl.max(x, axis=1))
    # Everything so far -inf (a -inf block, or padding): shift by 0, never compute
    # (-inf) - (-inf) = NaN; exp(-inf - 0) = 0 keeps the sums exact.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m_run - m_safe)
    e = tl.exp(x - m_safe[:, None])
    if TOP:
        up = m_new > m_run                       # the old maxima become ordinary entries
        s_run = s_run * scale + tl.where(up, c_run * scale, 0.0)
        c_run = tl.where(up, 0.0, c_run)
        top = x == m_safe[:, None]
        c_run += tl.sum(top.to(tl.float32), axis=1)
        s_run += tl.sum(tl.where(top, 0.0, e), axis=1)
    else:
        s_run = s_run * scale + tl.sum(e, axis=1)
    return m_new, s_run, c_run


@triton.jit
def _max_track(m_run, s_run, c_run, x):
    """``_online`` for probabilities (x >= 0, masked lanes 0; m starts at 0): the running row
    maximum m, the count c of entries equal to it and the plain sum s of the others."""
    m_new = tl.maximum(m_run, tl.max(x, axis=1))
    up = m_new > m_run
    s_run = s_run + tl.where(up, c_run * m_run, 0.0)
    c_run = tl.where(up, 0.0, c_run)
    top = x == m_new[:, None]
    c_run += tl.sum(top.to(tl.float32), axis=1)
    s_run += tl.sum(tl.where(top, 0.0, x), axis=1)
    return m_new, s_run, c_run


@triton.jit
def _to_store(v, dtype: tl.constexpr, RNE: tl.constexpr):
    """float32 v in a buffer's dtype.  RNE (interpreter with a bfloat16 buffer only): round to
    nearest even by hand, because the interpreter's float32 -> bfloat16 cast truncates; compiled
    kernels round to nearest even themselves."""
    if RNE:
        b = v.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        v = b.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _sampled(t, hess_m, BLOCK_ROWS: tl.constexpr):
    """Whether row tile t holds a 16-row block b of the Hessian's sample (b % hess_m == 0)."""
    b0 = t * (BLOCK_ROWS // _HB)
    return (b0 + hess_m - 1) // hess_m * hess_m < b0 + BLOCK_ROWS // _HB


@triton.jit(do_not_specialize=["nprog"])
def _step_tile_kernel(lp_ptr, ic_ptr, a_ptr, ws_ptr, n, k_q, s_n, s_k, s_c, hess_m, num_tiles,
                      nprog,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HESS: tl.constexpr,
                      HK: tl.constexpr, IDX64: tl.constexpr, SN: tl.constexpr,
                      KM: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Single-read step: whole rows (BLOCK_K >= k) in a [BLOCK_ROWS x BLOCK_K] register tile.

    Program pid handles row tiles pid, pid + nprog, ...  HESS: 0 none, 1 the diagonal d, 2 also
    W = sum ic q q^T over the sampled rows (HK == BLOCK_K; tl.dot, float32 "ieee").
    Program pid writes its float64 partial sums into row pid of the workspace ws (nprog x
    _step_width(k, HESS, HK)): [colsum (k) | wlogz | d (k), HESS >= 1 | W (HK x HK), HESS 2], so
    that one reduction over the programs gives the pass's packed result.
    Bytes moved: reads N*k*elem_size (log_p, once) + 4N (inv_c) + 4k per program (alpha); writes
    only the workspace (nprog = a few programs per SM), nothing N x k.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    acc_c = tl.zeros([BLOCK_K], tl.float64)        # sum_i q_ik
    acc_z = tl.zeros([BLOCK_ROWS], tl.float64)     # sum_i log Z_i / inv_c_i
    acc_d = tl.zeros([BLOCK_K], tl.float64)        # sum_i ic q (1 - q), 1 - q accurate
    acc_w = tl.zeros([HK, HK], tl.float64)         # sum_{i in S} ic q q^T (HESS 2), else 1 x 1
    for t in tl.range(pid, num_tiles, nprog, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k, s_n, s_k, s_c,
                                        IDX64, SN)
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)   # padding rows: avoid (-inf) - (-inf) = NaN
        e = tl.exp(x - m[:, None])                  # exact 0 at -inf entries and padding
        if HESS != 0:
            top, cnt, snt = _top_stats(x, m, e)
            s = snt + cnt
        else:
            s = tl.sum(e, axis=1)
        s = tl.where(row_ok, s, 1.0)                # padding rows: q = 0 / 1 = 0
        q = e / s[:, None]
        acc_c += tl.sum(q, axis=0).to(tl.float64)
        logz = m + tl.log(s)
        acc_z += tl.where(row_ok, logz.to(tl.float64) / ic.to(tl.float64), 0.0)
        if HESS != 0:
            r = tl.where(top, ((snt + (cnt - 1.0)) / s)[:, None], 1.0 - q)
            qw = q * ic[:, None]
            acc_d += tl.sum(qw * r, axis=0).to(tl.float64)
            if HESS == 2:
                if _sampled(t, hess_m, BLOCK_ROWS):
                    samp = ((rows // _HB) % hess_m) == 0
                    qs = tl.where(samp[:, None], qw, 0.0)
                    # float32 products summed over the tile, no TF32 ("ieee"), then into float64.
                    acc_w += tl.dot(tl.trans(qs), q, input_precision="ieee").to(tl.float64)
    col_ok = cols < k
    width = k + 1
    if HESS != 0:
        width += k
    if HESS == 2:
        width += HK * HK
    row = ws_ptr + pid.to(tl.int64) * width
    tl.store(row + cols, acc_c, mask=col_ok)
    tl.store(row + k, tl.sum(acc_z, axis=0))
    if HESS != 0:
        tl.store(row + k + 1 + cols, acc_d, mask=col_ok)
    if HESS == 2:
        hr = tl.arange(0, HK)
        tl.store(row + 2 * k + 1 + hr[:, None] * HK + hr[None, :], acc_w)


@triton.jit(do_not_specialize=["nprog"])
def _row_stats_kernel(lp_ptr, ic_ptr, a_ptr, m_ptr, s_ptr, r_ptr, ws_z_ptr,
                      n, k_q, s_n, s_k, s_c, num_tiles, nprog,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, TOP: tl.constexpr,
                      IDX64: tl.constexpr, SN: tl.constexpr, KM: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
    """Wide rows, pass 1: online softmax over k-blocks (running max and sum) per row.

    Writes the row's shift m and sum s (float32, so that q = exp(x - m) / s), with TOP also
    r = 1 - q of the row maximum (accurate, see ``_top_stats``), and, per program, the float64
    sum of log Z_i / inv_c_i.  Bytes moved: reads N*k*elem_size + 4N, writes 8N (12N with TOP)
    + 8 nprog.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    pid = tl.program_id(0)
    acc_z = tl.zeros([BLOCK_ROWS], tl.float64)
    for t in range(pid, num_tiles, nprog):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        m_run = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        s_run = tl.zeros([BLOCK_ROWS], tl.float32)
        c_run = tl.zeros([BLOCK_ROWS], tl.float32)
        for k0 in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
            cols = k0 + tl.arange(0, BLOCK_K)
            x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k,
                                            s_n, s_k, s_c, IDX64, SN)
            m_run, s_run, c_run = _online(m_run, s_run, c_run, x, TOP)
        row_ok = rows < n
        ri = rows.to(tl.int64) if IDX64 else rows
        ic = tl.load(ic_ptr + ri * s_c, mask=row_ok, other=1.0)
        m = tl.where(m_run == float("-inf"), 0.0, m_run)
        if TOP:
            s = tl.where(row_ok, s_run + c_run, 1.0)
            tl.store(r_ptr + rows, (s_run + (c_run - 1.0)) / s, mask=row_ok)
        else:
            s = tl.where(row_ok, s_run, 1.0)
        tl.store(m_ptr + rows, m, mask=row_ok)
        tl.store(s_ptr + rows, s, mask=row_ok)
        logz = m + tl.log(s)
        acc_z += tl.where(row_ok, logz.to(tl.float64) / ic.to(tl.float64), 0.0)
    tl.store(ws_z_ptr + pid, tl.sum(acc_z, axis=0))


@triton.jit(do_not_specialize=["ngroups"])
def _colsum_kernel(lp_ptr, ic_ptr, a_ptr, m_ptr, s_ptr, r_ptr, ws_c_ptr, ws_d_ptr,
                   n, k_q, s_n, s_k, s_c, num_tiles, ngroups,
                   BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HESS: tl.constexpr,
                   IDX64: tl.constexpr, SN: tl.constexpr, KM: tl.constexpr,
                   NUM_STAGES: tl.constexpr):
    """Wide rows, pass 2: program (cb, g) sums q over row tiles g, g + ngroups, ... of column
    block cb, in float32 per tile and float64 across tiles, and writes row g of the workspaces.
    HESS 1: also the diagonal, with 1 - q of the row maximum (x == m) from pass 1's r.

    Bytes moved: reads N*k*elem_size (the second read of log_p) + 12N (16N with HESS) per column
    block, writes ngroups x k float64 (x2 with the diagonal Hessian).
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    cb = tl.program_id(0)
    g = tl.program_id(1)
    cols = cb * BLOCK_K + tl.arange(0, BLOCK_K)
    acc_c = tl.zeros([BLOCK_K], tl.float64)
    acc_d = tl.zeros([BLOCK_K], tl.float64)
    for t in tl.range(g, num_tiles, ngroups, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k, s_n, s_k, s_c,
                                        IDX64, SN)
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        s = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
        q = tl.exp(x - m[:, None]) / s[:, None]
        acc_c += tl.sum(q, axis=0).to(tl.float64)
        if HESS == 1:
            rt = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
            r = tl.where(x == m[:, None], rt[:, None], 1.0 - q)
            acc_d += tl.sum(q * ic[:, None] * r, axis=0).to(tl.float64)
    col_ok = cols < k
    tl.store(ws_c_ptr + g * k + cols, acc_c, mask=col_ok)
    if HESS == 1:
        tl.store(ws_d_ptr + g * k + cols, acc_d, mask=col_ok)


@triton.jit(do_not_specialize=["nprog"])
def _q_tile_kernel(lp_ptr, ic_ptr, a_ptr, out_ptr, ws_ptr, n, k_q, s_n, s_k, s_c,
                   o_n, o_k, num_tiles, nprog, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                   IDX64: tl.constexpr, SN: tl.constexpr, ON: tl.constexpr,
                   KM: tl.constexpr, NUM_STAGES: tl.constexpr, STATS: tl.constexpr):
    """Single-read materialize: Q into out (its dtype, any strides). Rows are normalised by
    their float64 sum (one rounding per stored element): the float32 tree sum left rows of Q
    several ulps from summing to 1, this leaves them within 1 (base.ROW_SUM_ULPS allows 2).
    STATS: also the step's sums of the rows written (materialize_sums), per program into row pid
    of the float64 workspace ws (nprog x (k + 1)): [sum_i q_ik (k) | sum_i log Z_i / inv_c_i].

    Bytes moved: reads N*k*elem_size + 4N, writes N*k*out_elem_size.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    acc_c = tl.zeros([BLOCK_K], tl.float64)
    acc_z = tl.zeros([BLOCK_ROWS], tl.float64)
    for t in tl.range(pid, num_tiles, nprog, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        x, ic, row_ok, col_ok = _load_x(lp_ptr, ic_ptr, a_ptr, rows, cols, n, k, s_n, s_k, s_c,
                                        IDX64, SN)
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m[:, None]).to(tl.float64)
        s = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
        q = e * (1.0 / s)[:, None]
        ri = rows.to(tl.int64) if IDX64 else rows
        ci = cols.to(tl.int64) if IDX64 else cols
        optrs = out_ptr + (ri * o_n * ON)[:, None] + ci[None, :] * o_k
        tl.store(optrs, q.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if STATS:
            acc_c += tl.sum(q, axis=0)
            acc_z += tl.where(row_ok, (m.to(tl.float64) + tl.log(s)) / ic.to(tl.float64), 0.0)
    if STATS:
        row = ws_ptr + pid.to(tl.int64) * (k + 1)
        tl.store(row + cols, acc_c, mask=cols < k)
        tl.store(row + k, tl.sum(acc_z, axis=0))


@triton.jit(do_not_specialize=["ngroups"])
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


# -- prepare ----------------------------------------------------------------------------------
# MODE: 0 "probs", 1 "logits", 2 "log_p" (base.MODE_CODE).  Faults (base.ERR_*): 1 non-finite,
# 2 negative, 3 row sum off by more than tol, 4 all -inf; a row reports the first that applies.

@triton.jit
def _is_nan(x):
    """NaN entries of x, tested in float32: the interpreter's bfloat16 ``x != x`` is never true
    (a float64 value beyond float32's range turns inf, not NaN, so nothing else is flagged)."""
    xf = x.to(tl.float32)
    return xf != xf


@triton.jit
def _row_faults(xr, msk, tol, MODE: tl.constexpr):
    """(fault kind (int32, 0 none), float64 row sum ("probs"; else 0)) of the rows of a whole-row
    tile xr in the input's dtype (masked lanes: 0 for "probs", -inf otherwise)."""
    if MODE == 0:
        bad = tl.max((_is_nan(xr) | (tl.abs(xr) == float("inf"))).to(tl.int32), axis=1)
        neg = tl.max((xr < 0).to(tl.int32), axis=1)
        rs = tl.sum(xr.to(tl.float64), axis=1)
        kind = tl.where(bad > 0, 1, tl.where(neg > 0, 2, tl.where(tl.abs(rs - 1.0) > tol, 3, 0)))
    elif MODE == 1:
        bad = tl.max(((_is_nan(xr) | (tl.abs(xr) == float("inf"))) & msk).to(tl.int32), axis=1)
        rs = tl.zeros([xr.shape[0]], tl.float64)
        kind = tl.where(bad > 0, 1, 0)
    else:
        bad = tl.max((_is_nan(xr) | (xr == float("inf"))).to(tl.int32), axis=1)
        fin = tl.max((xr > float("-inf")).to(tl.int32), axis=1)
        rs = tl.zeros([xr.shape[0]], tl.float64)
        kind = tl.where(bad > 0, 1, tl.where(fin > 0, 0, 4))
    return kind, rs


@triton.jit
def _prep_row_width(k, MODE: tl.constexpr, HAS_FG: tl.constexpr, FIRST: tl.constexpr,
                    HESS: tl.constexpr, HK: tl.constexpr, FS: tl.constexpr):
    """:func:`_prep_width` inside the kernel (k a runtime int)."""
    w = k * 0
    if MODE != 2:
        w += k
        if HAS_FG:
            w += k
    if FIRST:
        if MODE == 2:
            w += k + 1
        if HESS != 0:
            w += k
        if HESS == 2:
            w += HK * HK
        if FS:
            w += 4
    return w


@triton.jit(do_not_specialize=["nprog"])
def _prep_tile_kernel(x_ptr, fg_ptr, fill_ptr, out_ptr, ic_ptr, ws_key_ptr, ws_a_ptr, ws_ptr,
                      n, k_q, s_n, s_k, s_f, s_c, o_n, o_k, tol_hi, tol_lo, hess_m,
                      num_tiles, nprog,
                      MODE: tl.constexpr, HAS_FG: tl.constexpr, HAS_FILL: tl.constexpr,
                      HAS_OUT: tl.constexpr, FIRST: tl.constexpr, HESS: tl.constexpr,
                      HK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                      IDX64: tl.constexpr, SN: tl.constexpr, ON: tl.constexpr,
                      KM: tl.constexpr, RNE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Single-read prepare: validate, write log P^, sum the rows, and (FIRST) the evaluation at
    alpha = 0, for whole rows (BLOCK_K >= k) in a [BLOCK_ROWS x BLOCK_K] register tile.

    Per program: the minimum fault key (row * 8 + kind) into ws_key, the column maximum ("log_p"
    mode) into ws_a, and one row of float64 sums into ws (:func:`_prep_width` long), in this
    order as far as the mode has them: A (retained rows' sums; not "log_p"), B (forgotten rows'
    sums), with FIRST: C, Z (colsum and sum log Z / ic, "log_p"), D (the Hessian's diagonal), W
    (HESS 2: sampled ic q q^T, HK x HK), F (forget rows with a fill: their count, sum 1 / ic,
    sum ic, and sum ic over those in the Hessian's sample).  "probs" / "logits" take Q from the
    normalised rows and leave the forget rows' softmax(fill) terms to the launcher (their rows
    get weight 0 here; F is what the launcher needs for them).  Bytes moved: reads N*k*|x| + N
    (forget) [+ 4N (inv_c)], writes N*k*|out| and the nprog-row workspaces.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < k
    ci = cols.to(tl.int64) if IDX64 else cols
    tol = tl.cast(tol_hi, tl.float64) + tl.cast(tol_lo, tl.float64)  # float64 tol, to 2**-48
    if HAS_FILL:
        fl = tl.load(fill_ptr + cols, mask=col_ok, other=float("-inf"))
    key = tl.full([BLOCK_ROWS], _KEY_NONE, tl.int64)
    if MODE == 2:
        acc_a = tl.full([BLOCK_K], float("-inf"), tl.float32)   # column maximum
    else:
        acc_a = tl.zeros([BLOCK_K], tl.float64)                  # retained rows' sums
    acc_b = tl.zeros([BLOCK_K], tl.float64)                      # forgotten rows' sums
    acc_c = tl.zeros([BLOCK_K], tl.float64)
    acc_z = tl.zeros([BLOCK_ROWS], tl.float64)
    acc_d = tl.zeros([BLOCK_K], tl.float64)
    acc_w = tl.zeros([HK, HK], tl.float64)
    FS: tl.constexpr = FIRST and HAS_FILL and MODE != 2
    acc_fn = tl.zeros([BLOCK_ROWS], tl.float64)  # F: forget rows' count,
    acc_fc = tl.zeros([BLOCK_ROWS], tl.float64)  # sum of 1 / ic,
    acc_fi = tl.zeros([BLOCK_ROWS], tl.float64)  # sum of ic,
    acc_fs = tl.zeros([BLOCK_ROWS], tl.float64)  # sum of ic over the sampled ones (HESS 2)
    for t in tl.range(pid, num_tiles, nprog, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n
        ri = rows.to(tl.int64) if IDX64 else rows
        msk = row_ok[:, None] & col_ok[None, :]
        xptrs = x_ptr + (ri * s_n * SN)[:, None] + ci[None, :] * s_k
        if MODE == 0:
            xr = tl.load(xptrs, mask=msk, other=0.0)
        else:
            xr = tl.load(xptrs, mask=msk, other=float("-inf"))
        kind, rs = _row_faults(xr, msk, tol, MODE)
        kind = tl.where(row_ok, kind, 0)
        key = tl.minimum(key, tl.where(kind > 0, rows.to(tl.int64) * 8 + kind, _KEY_NONE))
        xf = xr.to(tl.float32)
        if MODE == 0:
            s = tl.where(row_ok, rs.to(tl.float32), 1.0)
            lp = tl.log(xf) - tl.log(s)[:, None]
            pn = xf / s[:, None]
        elif MODE == 1:
            m = tl.max(xf, axis=1)
            m = tl.where(m == float("-inf"), 0.0, m)
            e = tl.exp(xf - m[:, None])
            if FIRST and HESS != 0:
                top, cnt, snt = _top_stats(xf, m, e)
                s = snt + cnt
            else:
                s = tl.sum(e, axis=1)
            s = tl.where(row_ok, s, 1.0)
            lp = (xf - m[:, None]) - tl.log(s)[:, None]
            pn = e / s[:, None]
        else:
            lp = xf
        if HAS_FG:
            fgr = tl.load(fg_ptr + ri * s_f, mask=row_ok, other=0) != 0
        if HAS_FILL:
            lp = tl.where(fgr[:, None], fl[None, :], lp)
        if HAS_OUT:
            st = _to_store(lp, out_ptr.dtype.element_ty, RNE)
            tl.store(out_ptr + (ri * o_n * ON)[:, None] + ci[None, :] * o_k, st, mask=msk)
        if MODE == 2:
            acc_a = tl.maximum(acc_a, tl.max(lp, axis=0))
        elif HAS_FG:
            acc_a += tl.sum(tl.where(fgr[:, None], 0.0, pn), axis=0).to(tl.float64)
            acc_b += tl.sum(tl.where(fgr[:, None], pn, 0.0), axis=0).to(tl.float64)
        else:
            acc_a += tl.sum(pn, axis=0).to(tl.float64)
        if FIRST:
            ic = tl.load(ic_ptr + ri * s_c, mask=row_ok, other=1.0)
            if MODE == 2:
                # The values as stored (rounded to the buffer's dtype), fill rows included.
                if HAS_OUT:
                    v = st.to(tl.float32)
                else:
                    v = lp
                mv = tl.max(v, axis=1)
                mv = tl.where(mv == float("-inf"), 0.0, mv)
                e = tl.exp(v - mv[:, None])
                if HESS != 0:
                    top, cnt, snt = _top_stats(v, mv, e)
                    s = snt + cnt
                else:
                    s = tl.sum(e, axis=1)
                s = tl.where(row_ok, s, 1.0)
                q = e / s[:, None]
                acc_c += tl.sum(q, axis=0).to(tl.float64)
                lz = mv + tl.log(s)
                acc_z += tl.where(row_ok, lz.to(tl.float64) / ic.to(tl.float64), 0.0)
                w = tl.where(row_ok, ic, 0.0)
                if HESS != 0:
                    rest = snt + (cnt - 1.0)
            else:
                q = pn
                w = tl.where(row_ok, ic, 0.0)
                if HAS_FILL:
                    w = tl.where(fgr, 0.0, w)   # softmax(fill) rows: added by the launcher
                    fw = tl.where(fgr & row_ok, 1.0, 0.0).to(tl.float64)
                    icd = ic.to(tl.float64)
                    acc_fn += fw
                    acc_fc += fw / icd
                    acc_fi += fw * icd
                if HESS != 0:
                    if MODE == 0:
                        xm = tl.max(xf, axis=1)
                        top, cnt, snt = _top_stats(xf, xm, xf)
                        rest = snt + (cnt - 1.0) * xm
                    else:
                        rest = snt + (cnt - 1.0)
            if HESS != 0:
                r = tl.where(top, (rest / s)[:, None], 1.0 - q)
                qw = q * w[:, None]
                acc_d += tl.sum(qw * r, axis=0).to(tl.float64)
                if HESS == 2:
                    if _sampled(t, hess_m, BLOCK_ROWS):
                        samp = ((rows // _HB) % hess_m) == 0
                        qs = tl.where(samp[:, None], qw, 0.0)
                        acc_w += tl.dot(tl.trans(qs), q, input_precision="ieee").to(tl.float64)
                        if FS:
                            acc_fs += tl.where(samp & fgr & row_ok, icd, 0.0)
    tl.store(ws_key_ptr + pid, tl.min(key, axis=0))
    # The packed row: offsets as _prep_width lays them out.
    o = k * 0
    row = ws_ptr + pid.to(tl.int64) * _prep_row_width(k, MODE, HAS_FG, FIRST, HESS, HK, FS)
    if MODE == 2:
        tl.store(ws_a_ptr + pid * k + cols, acc_a.to(tl.float64), mask=col_ok)
    else:
        tl.store(row + cols, acc_a.to(tl.float64), mask=col_ok)
        o += k
        if HAS_FG:
            tl.store(row + o + cols, acc_b, mask=col_ok)
            o += k
    if FIRST:
        if MODE == 2:
            tl.store(row + o + cols, acc_c, mask=col_ok)
            tl.store(row + o + k, tl.sum(acc_z, axis=0))
            o += k + 1
        if HESS != 0:
            tl.store(row + o + cols, acc_d, mask=col_ok)
            o += k
        if HESS == 2:
            hr = tl.arange(0, HK)
            tl.store(row + o + hr[:, None] * HK + hr[None, :], acc_w)
            o += HK * HK
        if FS:
            tl.store(row + o, tl.sum(acc_fn, axis=0))
            tl.store(row + o + 1, tl.sum(acc_fc, axis=0))
            tl.store(row + o + 2, tl.sum(acc_fi, axis=0))
            tl.store(row + o + 3, tl.sum(acc_fs, axis=0))


@triton.jit(do_not_specialize=["nprog"])
def _prep_stats_kernel(x_ptr, fg_ptr, fill_ptr, out_ptr, ic_ptr, m_ptr, s_ptr, r_ptr,
                       ws_key_ptr, ws_z_ptr,
                       n, k_q, s_n, s_k, s_f, s_c, tol_hi, tol_lo, num_tiles, nprog,
                       MODE: tl.constexpr, HAS_FILL: tl.constexpr, HAS_OUT: tl.constexpr,
                       FIRST: tl.constexpr, TOP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_K: tl.constexpr, IDX64: tl.constexpr, SN: tl.constexpr,
                       KM: tl.constexpr, RNE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Wide-row prepare, pass 1: per row tile, over k-blocks: the faults (minimum key per
    program) and the row statistics pass 2 needs, written per row (float32):
    "probs": s = the row sum (float64, rounded), with TOP m = the row maximum and r = 1 - q of it;
    "logits" (and "log_p" with FIRST, over the values as stored): m, s of an online softmax, r
    with TOP; "log_p" with FIRST also sums log Z / inv_c per program.
    Bytes moved: reads N*k*|x| (+ N, 4N), writes 4-12N + 16 nprog.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    pid = tl.program_id(0)
    tol = tl.cast(tol_hi, tl.float64) + tl.cast(tol_lo, tl.float64)
    key = tl.full([BLOCK_ROWS], _KEY_NONE, tl.int64)
    acc_z = tl.zeros([BLOCK_ROWS], tl.float64)
    for t in range(pid, num_tiles, nprog):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n
        ri = rows.to(tl.int64) if IDX64 else rows
        bad = tl.zeros([BLOCK_ROWS], tl.int32)
        neg = tl.zeros([BLOCK_ROWS], tl.int32)
        fin = tl.zeros([BLOCK_ROWS], tl.int32)
        rs = tl.zeros([BLOCK_ROWS], tl.float64)
        if MODE == 0:
            m_run = tl.zeros([BLOCK_ROWS], tl.float32)
        else:
            m_run = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        s_run = tl.zeros([BLOCK_ROWS], tl.float32)
        c_run = tl.zeros([BLOCK_ROWS], tl.float32)
        if HAS_FILL:
            fgr = tl.load(fg_ptr + ri * s_f, mask=row_ok, other=0) != 0
        for k0 in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < k
            ci = cols.to(tl.int64) if IDX64 else cols
            msk = row_ok[:, None] & col_ok[None, :]
            xptrs = x_ptr + (ri * s_n * SN)[:, None] + ci[None, :] * s_k
            if MODE == 0:
                xr = tl.load(xptrs, mask=msk, other=0.0)
                bad = tl.maximum(bad, tl.max((_is_nan(xr) | (tl.abs(xr) == float("inf")))
                                             .to(tl.int32), axis=1))
                neg = tl.maximum(neg, tl.max((xr < 0).to(tl.int32), axis=1))
                rs += tl.sum(xr.to(tl.float64), axis=1)
                if TOP:
                    m_run, s_run, c_run = _max_track(m_run, s_run, c_run, xr.to(tl.float32))
            elif MODE == 1:
                xr = tl.load(xptrs, mask=msk, other=float("-inf"))
                bad = tl.maximum(bad, tl.max(((_is_nan(xr) | (tl.abs(xr) == float("inf"))) & msk)
                                             .to(tl.int32), axis=1))
                m_run, s_run, c_run = _online(m_run, s_run, c_run, xr.to(tl.float32), TOP)
            else:
                xr = tl.load(xptrs, mask=msk, other=float("-inf"))
                bad = tl.maximum(bad, tl.max((_is_nan(xr) | (xr == float("inf"))).to(tl.int32),
                                             axis=1))
                fin = tl.maximum(fin, tl.max((xr > float("-inf")).to(tl.int32), axis=1))
                if FIRST:
                    v = xr.to(tl.float32)
                    if HAS_FILL:
                        fl = tl.load(fill_ptr + cols, mask=col_ok, other=float("-inf"))
                        v = tl.where(fgr[:, None], fl[None, :], v)
                    if HAS_OUT:
                        v = _to_store(v, out_ptr.dtype.element_ty, RNE).to(tl.float32)
                    m_run, s_run, c_run = _online(m_run, s_run, c_run, v, TOP)
        if MODE == 0:
            kind = tl.where(bad > 0, 1, tl.where(neg > 0, 2,
                                                 tl.where(tl.abs(rs - 1.0) > tol, 3, 0)))
        elif MODE == 1:
            kind = tl.where(bad > 0, 1, 0)
        else:
            kind = tl.where(bad > 0, 1, tl.where(fin > 0, 0, 4))
        kind = tl.where(row_ok, kind, 0)
        key = tl.minimum(key, tl.where(kind > 0, rows.to(tl.int64) * 8 + kind, _KEY_NONE))
        if MODE == 0:
            s = tl.where(row_ok, rs.to(tl.float32), 1.0)
            tl.store(s_ptr + rows, s, mask=row_ok)
            if TOP:
                tl.store(m_ptr + rows, m_run, mask=row_ok)
                tl.store(r_ptr + rows, (s_run + (c_run - 1.0) * m_run) / s, mask=row_ok)
        elif MODE == 1 or FIRST:
            m = tl.where(m_run == float("-inf"), 0.0, m_run)
            if TOP:
                s = tl.where(row_ok, s_run + c_run, 1.0)
                tl.store(r_ptr + rows, (s_run + (c_run - 1.0)) / s, mask=row_ok)
            else:
                s = tl.where(row_ok, s_run, 1.0)
            tl.store(m_ptr + rows, m, mask=row_ok)
            tl.store(s_ptr + rows, s, mask=row_ok)
            if MODE == 2:
                ic = tl.load(ic_ptr + ri * s_c, mask=row_ok, other=1.0)
                lz = m + tl.log(s)
                acc_z += tl.where(row_ok, lz.to(tl.float64) / ic.to(tl.float64), 0.0)
    tl.store(ws_key_ptr + pid, tl.min(key, axis=0))
    tl.store(ws_z_ptr + pid, tl.sum(acc_z, axis=0))


@triton.jit(do_not_specialize=["ngroups"])
def _prep_cols_kernel(x_ptr, fg_ptr, fill_ptr, out_ptr, ic_ptr, m_ptr, s_ptr, r_ptr,
                      ws_a_ptr, ws_b_ptr, ws_c_ptr, ws_d_ptr,
                      n, k_q, s_n, s_k, s_f, s_c, o_n, o_k, num_tiles, ngroups,
                      MODE: tl.constexpr, HAS_FG: tl.constexpr, HAS_FILL: tl.constexpr,
                      HAS_OUT: tl.constexpr, FIRST: tl.constexpr, HESS: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, IDX64: tl.constexpr,
                      SN: tl.constexpr, ON: tl.constexpr, KM: tl.constexpr, RNE: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
    """Wide-row prepare, pass 2 (after ``_prep_stats_kernel``): program (cb, g) writes log P^ for
    column block cb of row tiles g, g + ngroups, ... and sums A, B (or the column maximum) and,
    with FIRST, C ("log_p") and D (HESS 1) there; rows of the (ngroups x k) workspaces.
    Bytes moved: reads N*k*|x| (the second read) + 4-12N per column block, writes N*k*|out|.
    """
    k = k_q * KM  # KM (constexpr) divides k: column masks then cover whole vectors
    cb = tl.program_id(0)
    g = tl.program_id(1)
    cols = cb * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < k
    ci = cols.to(tl.int64) if IDX64 else cols
    if HAS_FILL:
        fl = tl.load(fill_ptr + cols, mask=col_ok, other=float("-inf"))
    if MODE == 2:
        acc_a = tl.full([BLOCK_K], float("-inf"), tl.float32)
    else:
        acc_a = tl.zeros([BLOCK_K], tl.float64)
    acc_b = tl.zeros([BLOCK_K], tl.float64)
    acc_c = tl.zeros([BLOCK_K], tl.float64)
    acc_d = tl.zeros([BLOCK_K], tl.float64)
    for t in tl.range(g, num_tiles, ngroups, num_stages=NUM_STAGES):
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n
        ri = rows.to(tl.int64) if IDX64 else rows
        msk = row_ok[:, None] & col_ok[None, :]
        xptrs = x_ptr + (ri * s_n * SN)[:, None] + ci[None, :] * s_k
        if MODE == 0:
            xr = tl.load(xptrs, mask=msk, other=0.0)
        else:
            xr = tl.load(xptrs, mask=msk, other=float("-inf"))
        xf = xr.to(tl.float32)
        if MODE == 0:
            s = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
            lp = tl.log(xf) - tl.log(s)[:, None]
            pn = xf / s[:, None]
        elif MODE == 1:
            m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
            s = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
            lp = (xf - m[:, None]) - tl.log(s)[:, None]
            pn = tl.exp(xf - m[:, None]) / s[:, None]
        else:
            lp = xf
        if HAS_FG:
            fgr = tl.load(fg_ptr + ri * s_f, mask=row_ok, other=0) != 0
        if HAS_FILL:
            lp = tl.where(fgr[:, None], fl[None, :], lp)
        if HAS_OUT:
            st = _to_store(lp, out_ptr.dtype.element_ty, RNE)
            tl.store(out_ptr + (ri * o_n * ON)[:, None] + ci[None, :] * o_k, st, mask=msk)
        if MODE == 2:
            acc_a = tl.maximum(acc_a, tl.max(lp, axis=0))
        elif HAS_FG:
            acc_a += tl.sum(tl.where(fgr[:, None], 0.0, pn), axis=0).to(tl.float64)
            acc_b += tl.sum(tl.where(fgr[:, None], pn, 0.0), axis=0).to(tl.float64)
        else:
            acc_a += tl.sum(pn, axis=0).to(tl.float64)
        if FIRST:
            ic = tl.load(ic_ptr + ri * s_c, mask=row_ok, other=1.0)
            if MODE == 2:
                if HAS_OUT:
                    v = st.to(tl.float32)
                else:
                    v = lp
                m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
                s = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
                q = tl.exp(v - m[:, None]) / s[:, None]
                acc_c += tl.sum(q, axis=0).to(tl.float64)
                w = tl.where(row_ok, ic, 0.0)
                top = v == m[:, None]
            else:
                q = pn
                w = tl.where(row_ok, ic, 0.0)
                if HAS_FILL:
                    w = tl.where(fgr, 0.0, w)
                if HESS != 0:
                    if MODE == 0:
                        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
                    top = xf == m[:, None]
            if HESS != 0:
                rt = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
                r = tl.where(top, rt[:, None], 1.0 - q)
                acc_d += tl.sum(q * w[:, None] * r, axis=0).to(tl.float64)
    tl.store(ws_a_ptr + g * k + cols, acc_a.to(tl.float64), mask=col_ok)
    if HAS_FG:
        if MODE != 2:
            tl.store(ws_b_ptr + g * k + cols, acc_b, mask=col_ok)
    if FIRST:
        if MODE == 2:
            tl.store(ws_c_ptr + g * k + cols, acc_c, mask=col_ok)
        if HESS != 0:
            tl.store(ws_d_ptr + g * k + cols, acc_d, mask=col_ok)


# --------------------------------------------------------------------------------------------
# Layer 2: launchers
# --------------------------------------------------------------------------------------------

# Software-pipelining depth of the main loops (prefetch of the next tile / k-block).
NUM_STAGES = 2
# Upper bound on resident programs per SM (keeps the nprog x k workspaces small).
MAX_PROGRAMS_PER_SM = 8
# The interpreter runs programs one after another: few programs, same code paths.
INTERPRET_PROGRAMS = 4
INTERPRET_GROUPS = 2
# Placeholder program count while sizing the grid. The kernels do not specialise on their program
# count (do_not_specialize), so the probe compiles the code the launch runs whatever p turns out
# to be: Triton specialises an int argument equal to 1 or divisible by 16, and p = 132 SMs x 8
# (1,056) had compiled a second variant of each kernel, seconds at the first call of each mode.
_PROBE = 3


class _Tile(NamedTuple):
    block_rows: int
    block_k: int
    num_warps: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _single_tile(k: int, full_hessian: bool = False, rows: int = 2) -> _Tile:
    """Tile of the single-read kernels (whole rows: BLOCK_K = next_pow2(k)); no autotuning.

    * k <= 256: ~2048-element tiles with 4 warps (k = 10 -> 128 rows x 16).
    * BLOCK_K >= 512: ``rows`` rows (2 for step / materialize, 1 for prepare, whose variants
      carry more per-row state) with BLOCK_K / 512 warps (k = 1000 -> 2 x 1024, 2 warps; 4096 ->
      8 warps): 16-32 values per thread.  Triton lays a long row out with all warps along the
      columns, so every row reduction crosses the program's warps through shared memory (two
      barriers) and every per-row scalar is computed by every thread; few warps per program and
      many programs per SM keep both small.  ptxas for sm_90 (docs/triton_notes.md): the k = 1000
      float32 step loop runs 0.73 warp-instructions per element (was 1.39 with the former 8 rows
      x 8 warps, an issue bound near 70 % of copy bandwidth), 115 registers, no spills.
    * In-kernel W: ~1024-element tiles (>= 16 rows and columns for tl.dot), 4 warps, so that the
      dot and its float64 accumulator fit in registers.

    The interpreter, whose cost is per operation, not per element, uses ~32K-element tiles (same
    code, fewer iterations).
    """
    bk = _next_pow2(k)
    if full_hessian:
        bk = max(bk, 16)
        # 8 warps at k = 32: with 4, prepare's logits variant (most per-row state) used local
        # memory under ptxas for sm_90.
        return _Tile(max(16, 1024 // bk), bk, 8 if bk >= 32 else 4)
    if INTERPRET:
        return _Tile(max(1, min(256, 32768 // bk)), bk, 4)
    if bk <= 256:
        return _Tile(min(256, max(16, 2048 // bk)), bk, 4)
    return _Tile(rows, bk, bk // 512)


# The widest column block a tile may have: bk / 512 warps is 32, 1,024 threads.
MAX_BLOCK_K = 16384


def _online_tiles(online_block_k: int) -> Tuple[_Tile, _Tile]:
    """Tiles of the wide-row kernels: (pass 1, row statistics: 2 rows x online_block_k with
    online_block_k / 512 warps, as the single-read tiles: 0.72 warp-instructions per element for
    the step's pass 1 under ptxas for sm_90, against 1.39 with the former 4 rows x 8 warps; pass 2,
    column blocks: 8 rows x online_block_k / 4, 4 warps).  Small row counts keep the per-row
    running max and sum cheap in registers (16 rows x 512 spilled).  The interpreter, whose cost is
    per operation, uses 64-row tiles (same code, fewer iterations).
    """
    rows_stats, rows_cols = (64, 64) if INTERPRET else (2, 8)
    return (_Tile(rows_stats, online_block_k, max(1, online_block_k // 512)),
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
                      online_block_k: int, idx64: bool, top: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                 torch.Tensor]:
    """Wide rows, pass 1 -> (m (N,) f32, s (N,) f32, r (N,) f32 with ``top`` else None,
    wlogz () f64)."""
    n, k = log_p.shape
    tile = _online_tiles(online_block_k)[0]
    num_tiles = triton.cdiv(n, tile.block_rows)
    f32 = dict(dtype=torch.float32, device=log_p.device)
    m, s = torch.empty(n, **f32), torch.empty(n, **f32)
    r = torch.empty(n, **f32) if top else m  # never written without TOP
    snq, sn = _split_stride(log_p.stride(0), log_p.element_size())
    kq, km = _split_stride(k, log_p.element_size())
    consts = dict(BLOCK_ROWS=tile.block_rows, BLOCK_K=tile.block_k, TOP=top, IDX64=idx64, SN=sn,
                  KM=km, NUM_STAGES=NUM_STAGES)
    dummy = torch.empty(1, dtype=torch.float64, device=log_p.device)  # float64, as ws_z
    args = [log_p, inv_c, alpha32, m, s, r, dummy, n, kq, snq, log_p.stride(1),
            inv_c.stride(0), num_tiles, _PROBE]
    p = min(num_tiles, _capacity(_row_stats_kernel, tuple(args), consts, tile.num_warps,
                                 log_p.device))
    ws_z = torch.empty(p, dtype=torch.float64, device=log_p.device)
    args[6], args[-1] = ws_z, p
    _row_stats_kernel[(p,)](*args, num_warps=tile.num_warps, **consts)
    return m, s, (r if top else None), ws_z.sum()


def _plan_single_step(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                      hess: int, stride: Optional[int] = None,
                      alloc: Optional[Callable[[str, tuple], torch.Tensor]] = None
                      ) -> Tuple[torch.Tensor, Callable[[], None], int]:
    """The single-read step kernel planned on these tensors (log_p N x k, N, k >= 1, next_pow2(k)
    within the single-read kernels; alpha32 (k,) float32 contiguous, read at each launch):
    ``(ws, launch, hk)``, the float64 workspace (p, :func:`_step_width`) that receives the
    partial sums of the kernel's p programs (one row each, packed as :func:`_step_sums` reads
    them), a function that runs the kernel into it, and W's row length in those rows (_H_FULL;
    else 0). ``stride``: W's sample stride (_H_FULL; default
    :func:`hessian_stride`). ``alloc(name, shape)``: where the workspace comes from (default a
    new tensor; a bound step shares them between its modes)."""
    n, k = log_p.shape
    dev = log_p.device
    f64 = dict(dtype=torch.float64, device=dev)
    dummy = torch.empty(1, **f64)
    full = hess == _H_FULL
    snq, sn = _split_stride(log_p.stride(0), log_p.element_size())
    kq, km = _split_stride(k, log_p.element_size())
    tile = _single_tile(k, full)
    br, bk = tile.block_rows, tile.block_k
    num_tiles = triton.cdiv(n, br)
    hk = bk if full else 1
    consts = dict(BLOCK_ROWS=br, BLOCK_K=bk, HESS=hess, HK=hk,
                  IDX64=_needs_idx64(num_tiles * br, bk, log_p.stride(), inv_c.stride()),
                  SN=sn, KM=km, NUM_STAGES=NUM_STAGES)
    args = [log_p, inv_c, alpha32, dummy, n, kq, snq, log_p.stride(1), inv_c.stride(0),
            (hessian_stride(n, k) if stride is None else stride) if full else _PROBE,
            num_tiles, _PROBE]
    p = min(num_tiles, _capacity(_step_tile_kernel, tuple(args), consts, tile.num_warps, dev))
    alloc = alloc or (lambda name, shape: torch.empty(shape, **f64))
    ws = alloc("ws", (p, _step_width(k, hess, hk)))
    args[3] = ws
    args[-1] = p

    def launch() -> None:
        _step_tile_kernel[(p,)](*args, num_warps=tile.num_warps, **consts)
    return ws, launch, hk if full else 0


def _step_width(k: int, hess: int, hk: int) -> int:
    """Length of a step's packed sums: [colsum (k) | wlogz | d (k), with a Hessian | W (hk x hk,
    row-major; its leading k x k block is W), _H_FULL]."""
    return k + 1 + (k if hess else 0) + (hk * hk if hess == _H_FULL else 0)


def _step_sums(packed: torch.Tensor, k: int, hess: int, hk: int
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                          Optional[torch.Tensor]]:
    """(colsum (k,), wlogz (), d (k,) or None, W (k x k) or None): views of ``packed``."""
    return (packed[:k], packed[k], packed[k + 1:2 * k + 1] if hess else None,
            packed[2 * k + 1:].view(hk, hk)[:k, :k] if hess == _H_FULL else None)


def _launch_step(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                 hess: int, max_single_block_k: int, online_block_k: int,
                 stride: Optional[int] = None,
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                            Optional[torch.Tensor]]:
    """Run the step kernel(s) on log_p (N x k, N, k >= 1); alpha32 (k,) float32 contiguous.

    Returns (colsum (k,), wlogz (), d, w), all float64: d the Hessian's diagonal (k,) for
    _H_DIAG / _H_FULL (else None), w = sum_{i in S} ic q_i q_i^T (k x k) for _H_FULL (else None;
    single-read kernel only; ``stride`` the sample's block stride, default
    :func:`hessian_stride`, 1 for ``hessian="exact"``). The partial sums of the programs are
    reduced here in a fixed order (torch.sum over the program axis): deterministic, no atomics,
    no host synchronisation.
    """
    n, k = log_p.shape
    full = hess == _H_FULL
    if _next_pow2(k) <= max_single_block_k:
        ws, launch, hk = _plan_single_step(log_p, inv_c, alpha32, hess, stride)
        launch()
        return _step_sums(ws.sum(dim=0), k, hess, hk)
    dev = log_p.device
    f64 = dict(dtype=torch.float64, device=dev)
    dummy = torch.empty(1, **f64)
    snq, sn = _split_stride(log_p.stride(0), log_p.element_size())
    kq, km = _split_stride(k, log_p.element_size())
    if full:
        raise AssertionError("in-kernel W needs the single-read kernel")
    # Wide rows: pass 1 (row stats), pass 2 (column blocks x row groups).
    tile = _online_tiles(online_block_k)[1]
    br, bk = tile.block_rows, tile.block_k
    num_tiles = triton.cdiv(n, br)
    idx64 = _needs_idx64(triton.cdiv(n, 64) * 64, triton.cdiv(k, online_block_k) * online_block_k,
                         log_p.stride(), inv_c.stride())
    m, s, r, wlogz = _launch_row_stats(log_p, inv_c, alpha32, online_block_k, idx64,
                                       top=bool(hess))
    n_cb = triton.cdiv(k, bk)
    consts = dict(BLOCK_ROWS=br, BLOCK_K=bk, HESS=hess, IDX64=idx64, SN=sn, KM=km,
                  NUM_STAGES=NUM_STAGES)
    args = [log_p, inv_c, alpha32, m, s, r if r is not None else m, dummy, dummy, n, kq, snq,
            log_p.stride(1), inv_c.stride(0), num_tiles, _PROBE]
    g = _ngroups(_capacity(_colsum_kernel, tuple(args), consts, tile.num_warps, dev), n_cb,
                 num_tiles, dev)
    ws_c = torch.zeros(g, k, **f64)
    ws_d = torch.zeros(g, k, **f64) if hess else dummy
    args[6:8] = [ws_c, ws_d]
    args[-1] = g
    _colsum_kernel[(n_cb, g)](*args, num_warps=tile.num_warps, **consts)
    return ws_c.sum(dim=0), wlogz, ws_d.sum(dim=0) if hess else None, None


def _launch_materialize(log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor,
                        out: torch.Tensor, max_single_block_k: int, online_block_k: int,
                        stats: bool = False):
    """Write Q (N x k) into out (any strides, dtype in OUT_DTYPES); N, k >= 1. With ``stats``
    (single-read kernel only: rows of at most max_single_block_k), also return the step's
    (colsum (k,), wlogz ()) float64 of the rows written, from the same pass."""
    n, k = log_p.shape
    dev = log_p.device
    if INTERPRET and out.dtype == torch.bfloat16:
        # Triton 3.8's interpreter casts float32 -> bfloat16 by truncation (it ignores the
        # rounding mode); compiled kernels round to nearest even.  Let torch do that cast here.
        buf = torch.empty(out.shape, dtype=torch.float32, device=dev)
        res = _launch_materialize(log_p, inv_c, alpha32, buf, max_single_block_k, online_block_k,
                                  stats)
        out.copy_(buf)
        return res
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
        consts["STATS"] = stats
        dummy = torch.empty(1, dtype=torch.float64, device=dev)
        args = [log_p, inv_c, alpha32, out, dummy, n, kq, *strides, num_tiles, _PROBE]
        p = min(num_tiles, _capacity(_q_tile_kernel, tuple(args), consts, tile.num_warps, dev))
        if stats:
            args[4] = torch.empty(p, k + 1, dtype=torch.float64, device=dev)
        args[-1] = p
        _q_tile_kernel[(p,)](*args, num_warps=tile.num_warps, **consts)
        if not stats:
            return None
        # A fixed-order sum over the programs: deterministic, no atomics. colsum and wlogz are
        # adjacent views of one tensor, which host_step copies to the host at once.
        sums = args[4].sum(dim=0)
        return sums[:k], sums[k]
    if stats:
        raise AssertionError("materialize with sums needs the single-read kernel")
    tile = _online_tiles(online_block_k)[1]
    num_tiles = triton.cdiv(n, tile.block_rows)
    idx64 = _needs_idx64(triton.cdiv(n, 64) * 64, triton.cdiv(k, online_block_k) * online_block_k,
                         log_p.stride(), out.stride(), inv_c.stride())
    m, s, _, _ = _launch_row_stats(log_p, inv_c, alpha32, online_block_k, idx64)
    n_cb = triton.cdiv(k, tile.block_k)
    consts = dict(BLOCK_ROWS=tile.block_rows, BLOCK_K=tile.block_k, IDX64=idx64, SN=sn, ON=on,
                  KM=km, NUM_STAGES=NUM_STAGES)
    args = [log_p, inv_c, alpha32, m, s, out, n, kq, *strides, num_tiles, _PROBE]
    g = _ngroups(_capacity(_q_cols_kernel, tuple(args), consts, tile.num_warps, dev), n_cb,
                 num_tiles, dev)
    args[-1] = g
    _q_cols_kernel[(n_cb, g)](*args, num_warps=tile.num_warps, **consts)


def _split_tol(tol: float) -> Tuple[float, float]:
    """A float64 tolerance as two float32 (hi + lo) that the kernel adds in float64: Triton
    passes Python floats as float32, which would move the row-sum threshold by up to 2**-24."""
    hi = float(np.float32(tol))  # numpy: round to nearest, as torch, without its dispatch
    lo = float(np.float32(tol - hi))
    return hi, lo


def _launch_prepare(x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                    fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                    inv_c: Optional[torch.Tensor], hessian: Hessian, tol: float,
                    max_single_block_k: int, online_block_k: int, hessian_kernel_max_k: int,
                    materialize_rows) -> PrepareOut:
    """Run prepare's kernel(s) (N, k >= 1), combine the workspaces on the device, pack them in
    ``base.unpack_prepare``'s layout and copy that to the host once."""
    n, k = x.shape
    dev = x.device
    f64 = dict(dtype=torch.float64, device=dev)
    code = MODE_CODE[mode]
    first = inv_c is not None and (mode == "log_p" or out.dtype == torch.float32)
    h_mode = hessian if first else False
    has_fg = forget is not None
    has_fill = has_fg and fill is not None
    fill_terms = first and code != 2 and has_fill
    single = _next_pow2(k) <= max_single_block_k
    w_in_kernel = h_mode is True and single and k <= hessian_kernel_max_k
    hess = _H_FULL if w_in_kernel else (_H_DIAG if h_mode else _H_NONE)
    rne = INTERPRET and out is not None and out.dtype == torch.bfloat16
    hm = hessian_stride(n, k)

    dummy = torch.empty(1, **f64)
    # The probes' stand-in for the int64 error keys: Triton compiles a variant per pointer type,
    # and a float64 one made every prepare compile twice, the probe's never launched.
    key_dummy = torch.empty(1, dtype=torch.int64, device=dev)
    fg = forget.view(torch.uint8) if has_fg else torch.zeros(1, dtype=torch.uint8, device=dev)
    # The kernels read fill[j] at fill_ptr + j: a strided fill (a column, a [::2] view) is copied;
    # a CPU fill is sent to the device, and its host values serve the fill terms below.
    fl = (fill.to(dev).contiguous() if has_fill
          else torch.zeros(1, dtype=torch.float32, device=dev))
    fill_host = fill if has_fill and fill.device.type == "cpu" else None
    ob = out if out is not None else torch.empty(1, dtype=x.dtype, device=dev)
    ic = inv_c if first else torch.ones(1, dtype=torch.float32, device=dev)
    s_f = forget.stride(0) if has_fg else 0
    s_c = inv_c.stride(0) if first else 0
    o_n, o_k = out.stride() if out is not None else (0, 0)
    snq, sn = _split_stride(x.stride(0), x.element_size())
    onq, on = _split_stride(o_n, ob.element_size()) if out is not None else (0, 1)
    kq, km = _split_stride(k, min(x.element_size(), ob.element_size()))
    tol_hi, tol_lo = _split_tol(tol)
    flags = dict(MODE=code, HAS_FILL=has_fill, HAS_OUT=out is not None, FIRST=first)
    strides = [x.stride(), (s_f, s_f), (s_c, s_c)] + ([out.stride()] if out is not None else [])

    if single:
        tile = _single_tile(k, hess == _H_FULL, rows=1)
        br, bk = tile.block_rows, tile.block_k
        num_tiles = triton.cdiv(n, br)
        hk = bk if hess == _H_FULL else 1
        consts = dict(flags, HAS_FG=has_fg, HESS=hess, HK=hk, BLOCK_ROWS=br, BLOCK_K=bk,
                      IDX64=_needs_idx64(num_tiles * br, bk, *strides), SN=sn, ON=on, KM=km,
                      RNE=rne, NUM_STAGES=NUM_STAGES)
        args = [x, fg, fl, ob, ic, key_dummy, dummy, dummy,
                n, kq, snq, x.stride(1), s_f, s_c, onq, o_k, tol_hi, tol_lo,
                hm if hess == _H_FULL else _PROBE, num_tiles, _PROBE]
        p = min(num_tiles, _capacity(_prep_tile_kernel, tuple(args), consts, tile.num_warps, dev))
        ws_key = torch.empty(p, dtype=torch.int64, device=dev)
        ws_a = torch.empty(p, k, **f64) if code == 2 else dummy
        width = _prep_width(k, code, has_fg, first, hess, hk, fill_terms)
        ws = torch.empty(p, max(width, 1), **f64)
        args[5:8] = [ws_key, ws_a, ws]
        args[-1] = p
        _prep_tile_kernel[(p,)](*args, num_warps=tile.num_warps, **consts)
        # The programs' rows reduced in one op (the column maximum apart, "log_p"), in the
        # order the host reads them below.
        parts = [ws_key.min().reshape(1).to(torch.float64)]
        if code == 2:
            parts.append(ws_a.amax(dim=0))
        if width:
            parts.append(ws.sum(dim=0))
        w_hk = hk if hess == _H_FULL else 0
    else:
        t1, t2 = _online_tiles(online_block_k)
        top = bool(h_mode)
        need_rows = code != 2 or first
        idx64 = _needs_idx64(triton.cdiv(n, 64) * 64,
                             triton.cdiv(k, online_block_k) * online_block_k, *strides)
        f32 = dict(dtype=torch.float32, device=dev)
        m_r = torch.empty(n, **f32) if need_rows else torch.empty(1, **f32)
        s_r = torch.empty(n, **f32) if need_rows else m_r
        r_r = torch.empty(n, **f32) if top else m_r
        num_tiles = triton.cdiv(n, t1.block_rows)
        consts = dict(flags, TOP=top, BLOCK_ROWS=t1.block_rows, BLOCK_K=t1.block_k, IDX64=idx64,
                      SN=sn, KM=km, RNE=rne, NUM_STAGES=NUM_STAGES)
        args = [x, fg, fl, ob, ic, m_r, s_r, r_r, key_dummy, dummy,
                n, kq, snq, x.stride(1), s_f, s_c, tol_hi, tol_lo, num_tiles, _PROBE]
        p = min(num_tiles, _capacity(_prep_stats_kernel, tuple(args), consts, t1.num_warps, dev))
        ws_key = torch.empty(p, dtype=torch.int64, device=dev)
        ws_z = torch.empty(p, **f64)
        args[8:10] = [ws_key, ws_z]
        args[-1] = p
        _prep_stats_kernel[(p,)](*args, num_warps=t1.num_warps, **consts)

        num_tiles = triton.cdiv(n, t2.block_rows)
        n_cb = triton.cdiv(k, t2.block_k)
        consts = dict(flags, HAS_FG=has_fg, HESS=_H_DIAG if h_mode else _H_NONE,
                      BLOCK_ROWS=t2.block_rows, BLOCK_K=t2.block_k, IDX64=idx64, SN=sn, ON=on,
                      KM=km, RNE=rne, NUM_STAGES=NUM_STAGES)
        args = [x, fg, fl, ob, ic, m_r, s_r, r_r, dummy, dummy, dummy, dummy,
                n, kq, snq, x.stride(1), s_f, s_c, onq, o_k, num_tiles, _PROBE]
        g = _ngroups(_capacity(_prep_cols_kernel, tuple(args), consts, t2.num_warps, dev), n_cb,
                     num_tiles, dev)
        ws_a = torch.zeros(g, k, **f64)
        ws_b = torch.zeros(g, k, **f64) if has_fg and code != 2 else dummy
        ws_c = torch.zeros(g, k, **f64) if first and code == 2 else dummy
        ws_d = torch.zeros(g, k, **f64) if h_mode else dummy
        args[8:12] = [ws_a, ws_b, ws_c, ws_d]
        args[-1] = g
        _prep_cols_kernel[(n_cb, g)](*args, num_warps=t2.num_warps, **consts)
        # The same layout as the single-read kernel's row: [key | A | B | C Z | D | W | F].
        parts = [ws_key.min().reshape(1).to(torch.float64)]
        if code == 2:
            parts.append(ws_a.amax(dim=0))
        else:
            parts.append(ws_a.sum(dim=0))
            if has_fg:
                parts.append(ws_b.sum(dim=0))
        if first:
            if code == 2:
                parts += [ws_c.sum(dim=0), ws_z.sum().reshape(1)]
            if h_mode:
                parts.append(ws_d.sum(dim=0))
        w_hk = 0

    # -- combine: the workspaces' reductions on the device (a fixed order), ONE copy to the host,
    # and the k-sized rest in numpy. Each torch op on a GPU is a launch of a few microseconds
    # of host time: the former combine (the forget rows' softmax(fill) terms by torch ops, the
    # error key decoded on the device) took about 55 of them, more than the kernels' time at
    # 50,000 x 10; the single-read kernel's packed row leaves about 6.
    # The error key (row * 8 + kind, or 2**62: none) is exact in float64 below 2**53.
    w_by_chunks = h_mode is True and not w_hk
    if fill_terms and not single:
        # The wide kernels' F (the forget rows' count, sum 1 / ic, sum ic) by torch ops; their W
        # is by chunks, which sees the fill rows as stored, so no sampled sum.
        parts += _forget_sums(forget, inv_c)
    if w_by_chunks:
        # Above hessian_kernel_max_k (or wide rows): the materialize kernel at alpha = 0 over
        # the sampled rows as stored (log P^, fill rows included).
        parts.append(sampled_gram_by_chunks(materialize_rows, out if out is not None else x,
                                            inv_c).reshape(-1))
    if fill_terms and fill_host is None:
        parts.append(fill.double())  # a device fill comes back with the sums
    buf = torch.cat(parts).cpu().numpy()  # the one device-to-host copy
    # Read back: [key | A | B | C Z | D | W (kernel's, w_hk x w_hk) | F | W (by chunks) | fill].
    key = int(buf[0])
    kind, row = (0, 0) if key >= _KEY_NONE.value else (key % 8, key // 8)
    o = 1
    a = buf[o:o + k]
    o += k
    b = np.zeros(k)
    if code != 2 and has_fg:
        b = buf[o:o + k]
        o += k
    packed = [np.array([kind, row], dtype=np.float64), a, b]
    if first:
        if code == 2:
            colsum, wlogz = buf[o:o + k], buf[o + k]
            o += k + 1
        else:
            colsum, wlogz = a, 0.0
        d = w = None
        if h_mode:
            d = buf[o:o + k]
            o += k
        if w_hk:
            w = buf[o:o + w_hk * w_hk].reshape(w_hk, w_hk)[:k, :k].reshape(-1)
            o += w_hk * w_hk
        if fill_terms:
            # The forget rows hold softmax(fill) (log Z = logsumexp(fill)); the kernel gave them
            # weight 0: their terms are added here, in float64, from F.
            count, sum_c, sum_ic = buf[o:o + 3]
            sampled_ic = buf[o + 3] if single else 0.0
            o += 4 if single else 3
        if w_by_chunks:
            w = buf[o:o + k * k]
            o += k * k
        if fill_terms:
            if fill_host is None:
                qf, lzf = softmax64(buf[o:o + k])
                o += k
            else:
                qf, lzf = softmax64(fill_host.numpy())
            colsum = colsum + count * qf
            wlogz = lzf * sum_c
            if h_mode:
                d = d + sum_ic * accurate_diag(qf)
            if w_hk:
                w = w + sampled_ic * np.outer(qf, qf).reshape(-1)
        packed += [colsum, np.array([wlogz])]
        if h_mode:
            packed.append(d)
        if h_mode is True:
            packed.append(w)
    assert o == buf.size, f"prepare: unpacked {o} of {buf.size} values"
    flat = torch.from_numpy(np.concatenate(packed))
    assert flat.numel() == packed_size(k, first, h_mode)
    return unpack_prepare(flat, k, mode, first, h_mode)


def _prep_width(k: int, code: int, has_fg: bool, first: bool, hess: int, hk: int,
                fill_terms: bool) -> int:
    """Length of the single-read prepare kernel's row of float64 sums: [A (k), not "log_p" |
    B (k), with forget rows | C (k), Z (1), "log_p" with the first evaluation | D (k), with a
    Hessian | W (hk x hk), _H_FULL | F (4), with fill terms] (``_prep_row_width`` in the
    kernel)."""
    w = 0
    if code != 2:
        w += k + (k if has_fg else 0)
    if first:
        w += (k + 1 if code == 2 else 0) + (k if hess else 0)
        w += (hk * hk if hess == _H_FULL else 0) + (4 if fill_terms else 0)
    return w


def _forget_sums(forget: torch.Tensor, inv_c: torch.Tensor) -> List[torch.Tensor]:
    """Float64 sums on the device over the forget rows, for the wide prepare's one copy: (3,)
    their count, sum of c = 1 / inv_c and sum of inv_c (the single-read kernel sums them)."""
    fgd = forget.to(torch.float64)
    icd = inv_c.to(torch.float64)
    return [torch.stack([fgd, fgd / icd, fgd * icd]).sum(dim=1)]


# --------------------------------------------------------------------------------------------
# Layer 3: the backend
# --------------------------------------------------------------------------------------------

class TritonBackend(Backend):
    """Fused Triton kernels (see the module docstring); ``name = "triton"``.

    ``max_single_block_k``: largest ``next_pow2(k)`` handled by the single-read kernels (above it,
    the two-pass wide-row kernels, whose row-stats k-blocks are ``online_block_k`` wide and whose
    column blocks are ``online_block_k // 4`` wide); ``hessian_kernel_max_k``: largest k whose
    sampled Hessian weights W are accumulated in the kernel (above it, the materialize kernel on
    the sampled rows and a float32 GEMM, ``base.sampled_gram_by_chunks``).  Tests lower these to
    exercise every path on small inputs.
    """

    name = "triton"

    def __init__(self, max_single_block_k: int = 4096, online_block_k: int = 1024,
                 hessian_kernel_max_k: int = 32) -> None:
        for name, v in (("max_single_block_k", max_single_block_k),
                        ("online_block_k", online_block_k)):
            if not isinstance(v, int) or v < 16 or v & (v - 1) or v > MAX_BLOCK_K:
                # A block of bk columns runs on bk / 512 warps: above MAX_BLOCK_K that is more
                # than the 1,024 threads a GPU gives one program, and every launch would fail.
                raise ValueError(f"{name}: expected a power of two from 16 to {MAX_BLOCK_K}, "
                                 f"got {v!r}")
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
        if log_p.dtype == torch.float64:
            why.append(FLOAT64_GPU_REASON)
        elif log_p.dtype not in FLOAT32_DTYPES:
            why.append(f"log_p dtype {log_p.dtype} not supported; expected one of "
                       f"{[str(d) for d in FLOAT32_DTYPES]}")
        return why

    def _require(self, t: torch.Tensor) -> None:
        why = self.available_reasons() + self.not_supported_reasons(t)
        if why:
            raise RuntimeError("triton backend cannot run on this input: " + "; ".join(why))

    # -- prepare ----------------------------------------------------------------------------------
    @_quiet_interpreter
    def prepare(self, x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                inv_c: Optional[torch.Tensor] = None, hessian: Hessian = False,
                tol: float = ROW_SUM_TOL) -> PrepareOut:
        """One fused pass over ``x`` (N x k): validate, write log P^ into ``out``, sum the rows
        and, with ``inv_c``, the first evaluation; see :mod:`ppu_fast.backends.base`."""
        check_prepare_args(x, mode, forget, fill, out, inv_c, hessian)
        # x may be float64 (an input dtype, not a solver dtype): judge the buffer's device/dtype.
        self._require(out if out is not None else x)
        if x.device.type != (out if out is not None else x).device.type:  # pragma: no cover
            raise ValueError("x and out must be on the same device")
        n, k = x.shape
        if k == 0:
            raise ValueError("x: expected k >= 1 columns, got 0")
        first = inv_c is not None and (mode == "log_p" or out.dtype == torch.float32)
        if n == 0:
            buf = torch.zeros(packed_size(k, first, hessian if first else False),
                              dtype=torch.float64)
            if mode == "log_p":
                buf[2:2 + k] = float("-inf")
            return unpack_prepare(buf, k, mode, first, hessian if first else False)
        with _on_device(x.device):
            return _launch_prepare(
                x, mode, forget, fill, out, inv_c, hessian, tol, self.max_single_block_k,
                self.online_block_k, self.hessian_kernel_max_k,
                lambda lp, ic, q: _launch_materialize(
                    lp, ic, torch.zeros(k, dtype=torch.float32, device=lp.device), q,
                    self.max_single_block_k, self.online_block_k))

    # -- step -------------------------------------------------------------------------------------
    @_quiet_interpreter
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
            h0 = (torch.zeros(k, k, **f64) if hessian in (True, "exact")
                  else torch.zeros(k, **f64) if hessian == "diag" else None)
            return torch.zeros(k, **f64), torch.zeros((), **f64), h0
        alpha32 = alpha.float().contiguous()
        with _on_device(log_p.device):
            if hessian in (True, "exact") and _next_pow2(k) <= self.max_single_block_k \
                    and k <= self.hessian_kernel_max_k:
                colsum, wlogz, d, w = self._step(log_p, inv_c, alpha32, _H_FULL,
                                                 1 if hessian == "exact" else None)
                return colsum, wlogz, assemble_hessian(d, w)
            w = None
            if hessian in (True, "exact"):
                w = self._sampled_gram(log_p, inv_c, alpha32, 1 if hessian == "exact" else None)
            colsum, wlogz, d, _ = self._step(log_p, inv_c, alpha32,
                                             _H_DIAG if hessian else _H_NONE)
            if w is not None:
                return colsum, wlogz, assemble_hessian(d, w)
            return colsum, wlogz, d

    def _step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha32: torch.Tensor, hess: int,
              stride: Optional[int] = None):
        return _launch_step(log_p, inv_c, alpha32, hess, self.max_single_block_k,
                            self.online_block_k, stride)

    def _sampled_gram(self, log_p: torch.Tensor, inv_c: torch.Tensor,
                      alpha32: torch.Tensor, stride: Optional[int] = None) -> torch.Tensor:
        """W = sum_{i in S} ic_i q_i q_i^T (k x k f64); see :func:`sampled_gram_by_chunks`."""
        return sampled_gram_by_chunks(
            lambda lp, ic, q: _launch_materialize(lp, ic, alpha32, q, self.max_single_block_k,
                                                  self.online_block_k),
            log_p, inv_c, stride)

    def bind_step(self, log_p: torch.Tensor, inv_c: torch.Tensor) -> HostStep:
        """``step`` on this ``log_p`` (N x k) / ``inv_c`` (N,), checked and planned once (see
        ``Backend.bind_step``): each Hessian mode's single-read kernel is planned on first use
        (grid, workspace, a packed result), and a pass stages alpha through a pinned buffer
        (:class:`base.DeviceStepStage`), launches the kernel, reduces the programs' packed rows
        into the packed result (the same fixed-order torch.sum as ``step``) and copies it to the
        host once, where H is assembled. A dense Hessian whose W the kernel does not accumulate
        (k > hessian_kernel_max_k) takes the diagonal's kernel and W from the sampled rows,
        gathered once (:class:`base.BoundGram`), into the same packed result. Rows wider than
        the single-read kernels take ``step``."""
        generic, own = self._bind_checked(log_p, inv_c, _STEP)
        n, k = log_p.shape
        if not own or _next_pow2(k) > self.max_single_block_k:
            return generic
        dev = log_p.device
        in_kernel_w = k <= self.hessian_kernel_max_k
        stage = DeviceStepStage(k, dev)
        plans = {}  # (HESS, exact, gram) -> (workspace, launch, packed, its sums, W, W's row)
        grams: dict = {}  # exact -> BoundGram
        pool: dict = {}  # the modes' workspaces, shared where their shapes agree

        def alloc(name: str, shape: tuple) -> torch.Tensor:
            if (name, shape) not in pool:
                pool[name, shape] = torch.empty(shape, dtype=torch.float64, device=dev)
            return pool[name, shape]

        def materialize_rows(lp: torch.Tensor, ic: torch.Tensor, q: torch.Tensor) -> None:
            _launch_materialize(lp, ic, stage.alpha, q, self.max_single_block_k,
                                self.online_block_k)

        @_quiet_interpreter
        def run(alpha, hessian: Hessian):
            check_hessian_mode(hessian)
            full = hessian in (True, "exact")
            exact = hessian == "exact"
            gram = full and not in_kernel_w
            hess = _H_FULL if full and not gram else _H_DIAG if hessian else _H_NONE
            with _on_device(dev):
                stage.put_alpha(alpha)
                key = (hess, exact, gram)
                if key not in plans:
                    ws, launch, hk = _plan_single_step(log_p, inv_c, stage.alpha, hess,
                                                       1 if exact else None, alloc)
                    hk = k if gram else hk
                    packed = torch.empty(ws.shape[1] + (k * k if gram else 0),
                                         dtype=torch.float64, device=dev)
                    # The sums' and W's places in the packed result, as views made once.
                    sums = packed[:ws.shape[1]] if gram else packed
                    w = packed[ws.shape[1]:].view(k, k) if gram else None
                    plans[key] = (ws, launch, packed, sums, w, hk)
                ws, launch, packed, sums, w, hk = plans[key]
                launch()
                # The programs' packed rows reduced in one op (step's fixed-order torch.sum).
                torch.sum(ws, dim=0, out=sums)
                if gram:
                    if exact not in grams:
                        grams[exact] = BoundGram(log_p, inv_c, 1 if exact else hessian_stride(n, k))
                    grams[exact].into(materialize_rows, w)
                return stage.fetch(packed, hessian, hk)
        return run

    # -- materialize ------------------------------------------------------------------------------
    def _check_materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                           out: torch.Tensor) -> Tuple[int, int]:
        """Validate materialize's arguments; returns (N, k)."""
        check_step_args(log_p, inv_c, alpha, out=out)
        if out.dtype not in OUT_DTYPES:
            raise TypeError(f"out: dtype {out.dtype} not supported; expected one of "
                            f"{[str(d) for d in OUT_DTYPES]}")
        self._require(log_p)
        n, k = log_p.shape
        if k == 0:
            raise ValueError("log_p: expected k >= 1 columns, got 0")
        return n, k

    @_quiet_interpreter
    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Write Q(alpha) (N x k) into ``out`` (float32/16/bf16/64, any strides); returns out."""
        n, k = self._check_materialize(log_p, inv_c, alpha, out)
        if n == 0:
            return out
        with _on_device(log_p.device):
            _launch_materialize(log_p, inv_c, alpha.float().contiguous(), out,
                                self.max_single_block_k, self.online_block_k)
        return out

    fused_materialize = True

    @_quiet_interpreter
    def materialize_sums(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                         out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``materialize`` into ``out`` (may be ``log_p``) and ``step``'s (colsum (k,), wlogz ())
        float64 at the same alpha: one pass for rows of at most ``max_single_block_k``; wider
        rows take a step, then materialize (no pass saved, the same results)."""
        n, k = self._check_materialize(log_p, inv_c, alpha, out)
        if n == 0 or _next_pow2(k) > self.max_single_block_k:
            return self.step_then_materialize(log_p, inv_c, alpha, out)
        with _on_device(log_p.device):
            return _launch_materialize(log_p, inv_c, alpha.float().contiguous(), out,
                                       self.max_single_block_k, self.online_block_k, stats=True)


# The class's own step, for bind_step to tell a replaced one (a subclass, a test's patch).
_STEP = TritonBackend.step


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
