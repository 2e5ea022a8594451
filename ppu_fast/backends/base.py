"""The backend contract (docs/design.md §4) shared by every backend.

A backend implements three operations over an N x k matrix. ``log_p`` is the solver's buffer of
log-probabilities (float32, float16, bfloat16 or float64), ``inv_c`` (N,) the inverse row weights
(float32; float64 with a float64 buffer: :func:`compute_dtype`) and ``alpha`` (k,) float64 the dual
variables; ``q_ik = softmax_k(log_p_ik - alpha_k * inv_c_i)``.

**Precision.** A float32, float16 or bfloat16 buffer is evaluated in float32 (every backend); a
float64 buffer in float64 throughout -- the shift, exp, the row sums, Q and the Hessian's pieces --
by the cpu and torch backends (the triton and cuda backends refuse it in
``not_supported_reasons``). Sums over rows accumulate in float64 either way.

* ``prepare(x, mode, forget, fill, out, inv_c=None, hessian=False, tol=ROW_SUM_TOL)`` ->
  :class:`PrepareOut`: ONE pass over the user's input ``x`` (N x k; float32, float16, bfloat16 or
  float64; any non-negative strides) that
    - validates every row (``mode`` "probs": finite, >= 0, summing to 1 within ``tol``; "logits":
      finite; "log_p": no NaN, no +inf and at least one finite entry) and reports the first
      offending row and its kind (``ERR_*``) instead of raising, so that the caller words the error;
    - writes log P^ into ``out`` (N x k, a solver dtype), computed in ``compute_dtype(out.dtype)``:
      ``log p_ij - log sum_j p_ij`` ("probs"), ``log_softmax`` ("logits") or ``x`` itself
      ("log_p"); in "probs" / "logits" mode ("log_p" mode takes neither), rows flagged in
      ``forget`` (N,) bool get ``fill`` (k,) float32 instead when it is given (otherwise they are
      written like the others and the caller overwrites them; ``fill``
      may be on x's device or on the CPU: ``refine`` passes it from the CPU, so that a GPU
      backend derives what it needs of it on the host without reading it back). ``out``
      may be None in "log_p" mode (validate only; x is then the buffer), and may be ``x`` itself
      (``refine(out=probs)``): every backend reads a row (or tile) of x completely before writing
      any of it;
    - sums the normalised input rows (p / sum p, or softmax) in float64 over the retained and over
      the forgotten rows ("probs" / "logits"), or finds the classes with a finite entry ("log_p");
    - when ``inv_c`` is given (the caller guarantees that the rows written are final), also returns
      the solver's first evaluation, ``step(out, inv_c, 0, hessian)``, so Newton's first pass
      costs nothing more. At alpha = 0, Q is P^ row-normalised: "probs" / "logits" take it from
      the normalised input rows (``log Z_i = 0``) and, on forget rows, ``softmax(fill)`` (``log Z``
      = logsumexp(fill)) -- the stored float32 / float64 rows represent exactly these to rounding,
      so no exp is recomputed; a float16 / bfloat16 ``out`` rounds too coarsely for that and gets
      no first evaluation. "log_p" mode evaluates the values as stored.
  Everything comes back on the CPU after one device-to-host copy.
* ``step(log_p, inv_c, alpha, hessian=False)`` -> ``(colsum, wlogz, H)``
    - ``colsum`` (k,) float64: column sums of Q(alpha),
    - ``wlogz`` 0-dim float64: ``sum_i c_i log Z_i(alpha)``,
    - ``H``: ``None`` (``hessian=False``), the k x k Newton Hessian (``hessian=True``, see below),
      the exact diagonal (k,) of ``sum_i inv_c_i (diag(q_i) - q_i q_i^T)`` (``hessian="diag"``)
      or the k x k Hessian with every row in the sample (m = 1: the exact ``-hess g``;
      ``hessian="exact"``, asked for by the solver near a float64 convergence and when a sampled
      Hessian stalls).
* ``materialize(log_p, inv_c, alpha, out)`` -> ``out``: writes Q(alpha) (N x k) into ``out``.
  ``out`` may be ``log_p`` itself (``refine`` keeps log P^ in its result buffer and turns it into
  Q in place), so every backend reads a row completely before writing any of it. Each row is
  normalised by a sum accurate to well below float32 rounding, so the rows of a float32 Q sum to
  1 within 2 float32 ulps (``ROW_SUM_ULPS``) -- except on the two-pass wide-row GPU kernels (cuda
  for k > 1,024, triton above its ``max_single_block_k``), whose online sums are float32.

Results of ``step`` / ``materialize`` live on ``log_p``'s device. No backend writes anything
N x k during ``step``.

**The Hessian.** ``-hess g = sum_i inv_c_i (diag(q_i) - q_i q_i^T)`` is, row by row, the Laplacian
of the complete graph with edge weights ``q_ij q_il``: its diagonal is ``q_ij (1 - q_ij)`` and
``1 - q_ij`` must come from the other entries of the row (``sum_{l != j} q_il``), never from
``1 - q_ij`` in float32, which is 0 for a confident row (the cancellation that stalled Newton on
one-hot rows). Every backend computes

    d_j  = sum_i inv_c_i q_ij (1 - q_ij)        over all rows, with 1 - q accurate   ("diag")
    W_jl = sum_{i in S} inv_c_i q_ij q_il       j != l, over a row sample S

and ``hessian=True`` returns :func:`assemble_hessian` (d, W): the Laplacian of W, rescaled on both
sides so that its diagonal is exactly d. It is positive semi-definite by construction (a congruence
of a Laplacian with non-negative weights), has the exact diagonal, and takes its off-diagonal
structure from S: the 16-row blocks ``b`` with ``b % m == 0``, ``m = hessian_stride(N, k)``. For
N*k small m is 1 and H is the exact Hessian; for large problems the sample keeps the O(N k^2) part to
a fraction of a step (Newton with an inexact Hessian keeps an exact gradient; measured: the same
number of passes as the exact Hessian on the paper-like scenarios, see docs/solver.md). Newton's
direction solves with ``solver.balanced_laplacian`` of this H, whose rows sum to 0 (docs/solver.md,
"What Newton solves with").
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from ..caller_state import Overlapping

Hessian = Union[bool, str]
StepOut = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]

# Buffers evaluated in float32, by every backend.
FLOAT32_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The solver dtypes: float64 is evaluated in float64, by the cpu and torch backends only.
SUPPORTED_DTYPES = FLOAT32_DTYPES + (torch.float64,)
INPUT_DTYPES = SUPPORTED_DTYPES
# Rows of a float32 Q sum to 1 within this many float32 ulps of 1 (2^-23 each).
ROW_SUM_ULPS = 2
# Why the GPU kernels (float32 arithmetic) refuse a float64 buffer; "auto" then picks torch.
FLOAT64_GPU_REASON = ("log_p dtype torch.float64: this backend's kernels compute in float32; "
                      "float64 is solved in float64 by the torch backend (any device) and the "
                      "cpu backend")
HESSIAN_MODES = (False, True, "diag")
# step only, float64 buffers only: the dense Hessian from every row.
STEP_HESSIAN_MODES = HESSIAN_MODES + ("exact",)
PREPARE_MODES = ("probs", "logits", "log_p")
MODE_CODE = {"probs": 0, "logits": 1, "log_p": 2}

# Validation: probabilities must sum to 1 within this (or two ulps of a half dtype, whose rounding
# alone moves a row sum by more).
ROW_SUM_TOL = 1e-3

# The first offending row's kind, as prepare reports it (0: none). A row with several faults
# reports the first of: non-finite, negative, off the simplex (all -inf for "log_p").
ERR_NONE, ERR_NONFINITE, ERR_NEGATIVE, ERR_ROWSUM, ERR_ALL_NEG_INF = 0, 1, 2, 3, 4

# Rows per chunk are chosen so one chunk holds about this many elements (16 MB of float32):
# large enough to amortise kernel launches, small enough to keep temporaries bounded.
CHUNK_ELEMS = 1 << 22

# The Hessian's row sample: 16-row blocks (the widest SIMD width of the CPU kernels; a block never
# straddles a CPU range), every m-th block. The sample holds at least HESS_MIN_ROWS rows (all rows
# below that) and about HESS_ROWS_PER_ELEM * N / k rows, so its O(|S| k^2) work is a few FMAs per
# element of the matrix, against a step's ~20 instructions per element.
HESS_BLOCK = 16
HESS_MIN_ROWS = 2048
HESS_ROWS_PER_ELEM = 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic of ``step`` / ``materialize`` on a buffer of ``dtype``, and the dtype of
    ``inv_c`` with it: float64 for float64, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(n: int, k: int, chunk_elems: int = CHUNK_ELEMS) -> int:
    """Rows per chunk for an n x k matrix."""
    return max(1, min(n, chunk_elems // max(k, 1)))


def hessian_stride(n: int, k: int) -> int:
    """m: the Hessian's off-diagonal part uses the 16-row blocks b with b % m == 0 (``step`` with
    ``hessian="exact"`` uses every row, m = 1)."""
    want = max(HESS_MIN_ROWS, -(-HESS_ROWS_PER_ELEM * n // max(k, 1)))
    return max(1, n // want)


def hessian_sample_rows(n: int, m: int, start: int = 0, stop: Optional[int] = None,
                        device=None) -> torch.Tensor:
    """Indices (relative to ``start``) of the sampled rows in [start, stop): int64 (R,), ascending.

    arange arithmetic with the count known on the host, so it never waits for a device (a
    ``nonzero`` would)."""
    stop = n if stop is None else stop
    b_lo = -(-(start // HESS_BLOCK) // m) * m  # first sampled block not before start's block
    nb = max(0, -(-(-(-stop // HESS_BLOCK) - b_lo) // m))  # sampled blocks that begin < stop
    if nb == 0 or stop <= start:
        return torch.zeros(0, dtype=torch.int64, device=device)
    blocks = torch.arange(nb, device=device) * m + b_lo
    rows = (blocks[:, None] * HESS_BLOCK + torch.arange(HESS_BLOCK, device=device)).reshape(-1)
    last = (b_lo + (nb - 1) * m) * HESS_BLOCK
    lo_cut = max(0, start - b_lo * HESS_BLOCK)
    hi_cut = nb * HESS_BLOCK - max(0, last + HESS_BLOCK - stop)
    return rows[lo_cut:hi_cut] - start


def assemble_hessian(diag: torch.Tensor, offdiag: torch.Tensor) -> torch.Tensor:
    """Newton's Hessian (k x k float64) from the exact diagonal ``d`` (k,) and the sampled weights
    ``W`` (k x k; only its strict upper triangle is read): ``S L S`` with ``L`` the Laplacian of
    ``W`` and ``S = diag(sqrt(d / diag(L)))``; a class that no sampled row reaches (diag(L) = 0)
    keeps ``d_j`` on the diagonal alone. Positive semi-definite by construction. Computed in numpy
    for CPU tensors (torch's small CPU ops would wake its thread pool), in torch on a device."""
    if diag.device.type == "cpu":
        h = _assemble_np(diag.numpy().astype(np.float64, copy=False),
                         offdiag.numpy().astype(np.float64, copy=False))
        return torch.from_numpy(h)
    d = diag.to(torch.float64)
    w = torch.triu(offdiag.to(torch.float64), diagonal=1)
    w = w + w.T
    lap_diag = w.sum(dim=1)
    reached = lap_diag > 0
    s = torch.where(reached, torch.sqrt(d.clamp_min(0) / torch.where(reached, lap_diag, 1.0)), 0.0)
    h = -(s[:, None] * w * s[None, :])
    h.diagonal().copy_(d.clamp_min(0))
    return h


_UPPER: dict = {}  # k -> the strict upper triangle's mask (k x k bool)


def _assemble_np(d: np.ndarray, offdiag: np.ndarray) -> np.ndarray:
    # In place on one new array, with a cached mask for np.triu (whose generic code alone took a
    # third of the time): about 2/3 of the time of the plain form, bit for bit the same. A GPU
    # route assembles H on the host every pass. (A select, not a product with a 0 / 1 mask:
    # the lower triangle is never read, and may hold anything, NaN included.)
    k = d.shape[0]
    upper = _UPPER.get(k)
    if upper is None:
        upper = _UPPER[k] = np.triu(np.ones((k, k), dtype=bool), 1)
    w = np.where(upper, offdiag, 0.0)
    w += w.T
    lap_diag = w.sum(axis=1)
    dp = np.maximum(d, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(dp / lap_diag)
    s[~(lap_diag > 0)] = 0.0  # a class no sampled row reaches keeps d alone
    w *= s[:, None]
    w *= -s
    w.flat[::k + 1] = dp  # s_j^2 L_jj = d_j where the sample reaches class j
    return w


# A step's results on the host: (colsum (k,) float64, wlogz, H (k x k or k) float64 or None).
HostStepOut = Tuple[np.ndarray, float, Optional[np.ndarray]]
HostStep = Callable[[np.ndarray, Hessian], HostStepOut]


def host_step(colsum: torch.Tensor, wlogz: torch.Tensor,
              h: Optional[torch.Tensor] = None) -> HostStepOut:
    """A pass's (colsum (k,), wlogz (), H or None) as host numpy arrays and a float: one
    device-to-host copy for results on a GPU instead of a synchronising read per quantity."""
    if colsum.device.type != "cpu":
        k = colsum.shape[0]
        if h is None and _adjacent(colsum, wlogz):
            # wlogz follows colsum in one tensor (a backend's packed sums): copy that span.
            flat = colsum.as_strided((k + 1,), (1,)).cpu()
        else:
            parts = [colsum, wlogz.reshape(1)] + ([] if h is None else [h.reshape(-1)])
            flat = torch.cat(parts).cpu()
        colsum, wlogz, h = flat[:k], flat[k], (None if h is None else flat[k + 1:].reshape(h.shape))
    return colsum.numpy(), float(wlogz), (None if h is None else h.numpy())


_CPU = torch.device("cpu")


def softmax64(f: np.ndarray) -> Tuple[np.ndarray, float]:
    """(softmax(f), logsumexp(f)) in float64 of a fill vector (k,) on the host; NaN where f has
    no finite maximum (all -inf, or a +inf entry), as the kernels' own evaluation gives, without
    numpy's warning (a caller's -W error would fail on it)."""
    f = np.asarray(f, dtype=np.float64)
    mx = float(f.max())
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        e = np.exp(f - mx)
        s = float(e.sum())
        return e / s, mx + math.log(s)


def accurate_diag(q: np.ndarray) -> np.ndarray:
    """q (1 - q) (k,) float64 of one distribution q, 1 - q of its maximum from the other entries
    (``torch_ref.stats_from_q``'s rule: 1 - q rounds to 0 on a one-hot row)."""
    qmax = q.max()
    top = q == qmax
    rest = np.where(top, 0.0, q).sum() + (np.count_nonzero(top) - 1.0) * qmax
    return q * np.where(top, rest, 1.0 - q)


def _adjacent(colsum: torch.Tensor, wlogz: torch.Tensor) -> bool:
    """Whether ``wlogz`` () is the element after contiguous ``colsum`` (k,) in one storage."""
    return (colsum.is_contiguous() and wlogz.dim() == 0 and colsum.dtype == wlogz.dtype
            and wlogz.untyped_storage().data_ptr() == colsum.untyped_storage().data_ptr()
            and wlogz.storage_offset() == colsum.storage_offset() + colsum.shape[0])


class DeviceStepStage:
    """The host side of a GPU backend's bound step (``bind_step``): alpha goes to the device
    through a pinned float32 buffer, and the pass's packed float64 result comes back through a
    pinned one in a single copy, after which the Hessian is assembled in numpy. The generic
    path spent a pageable copy, a float32 conversion on the device, a dozen small torch ops for
    the Hessian's assembly and a concatenation per pass, each a launch, when a 50,000 x 10 step
    on a GPU is a few microseconds of kernel time.

    The buffers are reused pass after pass: safe because every pass ends by waiting for its
    result (``fetch``), so the previous pass's copies have completed. A pass that stopped between
    staging and fetching (a launch error, an interrupt) may have left its alpha copy in flight:
    the next ``put_alpha`` then waits for the device before it rewrites the pinned buffer. On a
    CPU "device" (the CUDA emulation, the Triton interpreter) the buffers are plain CPU
    tensors."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        self.pinned = device.type == "cuda"
        self.alpha_host = torch.empty(k, dtype=torch.float32, pin_memory=self.pinned)
        self.alpha_np = self.alpha_host.numpy()
        self.alpha = torch.empty(k, dtype=torch.float32, device=device)
        self._host: dict = {}  # pinned result buffers by length
        self._staged = False  # an alpha copy queued whose pass has not fetched its result

    def put_alpha(self, alpha: np.ndarray) -> torch.Tensor:
        """``alpha`` (k,) float64 rounded to float32 (as ``alpha.to(torch.float32)``) and queued
        for the device; returns the device tensor the kernels read."""
        check_host_alpha(alpha, self.k)
        if self._staged and self.pinned:
            torch.cuda.synchronize(self.alpha.device)
        with np.errstate(over="ignore"):  # beyond float32 is +-inf, as torch's conversion
            self.alpha_np[:] = alpha
        self.alpha.copy_(self.alpha_host, non_blocking=self.pinned)
        self._staged = True
        return self.alpha

    def fetch(self, packed: torch.Tensor, hessian: Hessian,
              w_cols: Optional[int] = None) -> HostStepOut:
        """Wait for ``packed`` ([colsum (k) | wlogz | d (k) | W (w_cols x w_cols row-major, default
        k x k; its leading k x k block's strict upper triangle read)], float64 on the device, as
        long as ``hessian`` needs) and return the pass's host results, H assembled as
        :func:`assemble_hessian` does on the CPU."""
        width = packed.numel()
        if width not in self._host:
            self._host[width] = torch.empty(width, dtype=torch.float64, pin_memory=self.pinned)
        host = self._host[width]
        host.copy_(packed)  # synchronous: waits for the pass
        self._staged = False
        v = host.numpy()
        k = self.k
        colsum, wlogz = v[:k].copy(), float(v[k])
        if hessian is False:
            return colsum, wlogz, None
        d = v[k + 1:2 * k + 1]
        if hessian == "diag":
            return colsum, wlogz, d.copy()
        wc = k if w_cols is None else w_cols
        w = v[2 * k + 1:2 * k + 1 + wc * wc].reshape(wc, wc)[:k, :k]
        return colsum, wlogz, _assemble_np(d, w)


class PrepareOut(NamedTuple):
    """What ``prepare`` returns (everything on the CPU).

    error: ``(kind, row)`` of the first offending row (``ERR_*`` kind) or None.
    retain_sums, forget_sums: (k,) float64 column sums of the normalised input rows over the
        retained / forgotten rows ("probs" / "logits" modes; None for "log_p").
    support: (k,) bool, whether a class has a finite entry in some row ("log_p" mode; else None).
    first: the step at alpha = 0, ``(colsum, wlogz, H)`` with the Hessian asked for, when
        ``inv_c`` was given and ``out`` (or, without ``out``, x) is float32 or the mode is
        "log_p" (else None).
    """

    error: Optional[Tuple[int, int]]
    retain_sums: Optional[torch.Tensor]
    forget_sums: Optional[torch.Tensor]
    support: Optional[torch.Tensor]
    first: Optional[StepOut]


class Backend:
    """Base class: a named backend that can say why it cannot serve a call."""

    name: str = "base"
    # Whether materialize_sums is implemented (one pass that writes Q and sums it).
    fused_materialize: bool = False

    def not_supported_reasons(self, log_p: torch.Tensor) -> List[str]:
        """Reasons this backend cannot run on ``log_p`` (empty list: it can)."""
        raise NotImplementedError

    def available_reasons(self) -> List[str]:
        """Reasons this backend cannot run at all on this machine (empty: it can run somewhere)."""
        return []

    def prepare(self, x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                inv_c: Optional[torch.Tensor] = None, hessian: Hessian = False,
                tol: float = ROW_SUM_TOL) -> PrepareOut:
        raise NotImplementedError

    def step(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
             hessian: Hessian = False) -> StepOut:
        raise NotImplementedError

    def materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def materialize_sums(self, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                         out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Optional (``fused_materialize``): ``materialize`` and the ``(colsum (k,), wlogz)`` of
        ``step`` at the same alpha, in one pass; ``out`` may be ``log_p`` itself (each row is
        read before it is written). The solver's last Newton pass (``solver.FinalPass``)."""
        raise NotImplementedError

    def bind_step(self, log_p: torch.Tensor, inv_c: torch.Tensor) -> HostStep:
        """``step`` on a fixed ``log_p`` (N x k) and ``inv_c`` (N,), as a solver evaluates it
        pass after pass: a function of the host alpha (k,) float64 (numpy, the kernels' gauge)
        and the Hessian mode that returns the pass's (colsum (k,), wlogz, H or None) on the host
        as float64 numpy and a float (one device-to-host copy). A backend may check ``log_p`` and
        ``inv_c`` once here instead of on every pass (the cpu backend does: at 50,000 x 10 the
        per-pass checks and conversions were a tenth of a step)."""
        on_cpu = log_p.device.type == "cpu"

        def run(alpha: np.ndarray, hessian: Hessian) -> HostStepOut:
            a = torch.from_numpy(alpha)
            return host_step(*self.step(log_p, inv_c, a if on_cpu else a.to(log_p.device),
                                        hessian))
        return run

    def _bind_checked(self, log_p: torch.Tensor, inv_c: torch.Tensor,
                      own_step: Callable) -> Tuple[HostStep, bool]:
        """For a backend's own ``bind_step``: (the base class's bound ``step``, whether the
        backend's own route may serve): it may when the class's ``step`` is still ``own_step``
        (a subclass's or a test's replacement must see every pass), ``log_p`` and ``inv_c`` pass
        ``check_step_args`` and ``_require`` (checked here, once per solve) and N, k > 0."""
        generic = Backend.bind_step(self, log_p, inv_c)
        if type(self).step is not own_step:
            return generic, False
        n, k = log_p.shape
        check_step_args(log_p, inv_c, torch.zeros(k, dtype=torch.float64, device=log_p.device))
        self._require(log_p)
        return generic, n > 0 and k > 0

    def step_then_materialize(self, log_p: torch.Tensor, inv_c: torch.Tensor,
                              alpha: torch.Tensor, out: torch.Tensor
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``materialize_sums``'s results in two passes (a step, then materialize): for the
        shapes a backend's fused kernel does not serve. No pass saved, the same results."""
        colsum, wlogz, _ = self.step(log_p, inv_c, alpha, False)
        self.materialize(log_p, inv_c, alpha, out)
        return colsum, wlogz


def _check_matrix(t, name: str, dtypes) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (N x k), got {type(t).__name__} with "
                         f"shape {getattr(t, 'shape', None)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected one of "
                        f"{[str(d) for d in dtypes]}")


def check_hessian_mode(hessian) -> None:
    """A pass's ``hessian`` argument: one of ``STEP_HESSIAN_MODES`` (a bool or a name: 0 and 1
    equal False and True, but the backends tell the modes apart with ``is``)."""
    if not isinstance(hessian, (bool, str)) or hessian not in STEP_HESSIAN_MODES:
        raise ValueError(f"hessian: expected one of {STEP_HESSIAN_MODES}, got {hessian!r}")


def check_host_alpha(alpha: np.ndarray, k: int) -> None:
    """A bound pass's host alpha: shape (k,). (Its copy into the pass's buffer would broadcast a
    scalar silently.)"""
    if alpha.shape != (k,):
        raise ValueError(f"alpha: expected shape ({k},), got {alpha.shape}")


def check_step_args(log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                    hessian: Hessian = False, out: Optional[torch.Tensor] = None) -> None:
    """Validate the arguments of ``step`` / ``materialize``; raise with a clear message."""
    _check_matrix(log_p, "log_p", SUPPORTED_DTYPES)
    n, k = log_p.shape
    want = compute_dtype(log_p.dtype)
    if inv_c.shape != (n,) or inv_c.dtype != want:
        raise ValueError(f"inv_c: expected a {str(want).split('.')[-1]} tensor of shape ({n},) "
                         f"for a {str(log_p.dtype).split('.')[-1]} log_p, got {inv_c.dtype} "
                         f"{tuple(inv_c.shape)}")
    if alpha.shape != (k,) or alpha.dtype != torch.float64:
        raise ValueError(f"alpha: expected a float64 tensor of shape ({k},), got {alpha.dtype} "
                         f"{tuple(alpha.shape)}")
    for name, t in (("inv_c", inv_c), ("alpha", alpha)):
        if t.device != log_p.device:
            raise ValueError(f"{name}: on {t.device}, expected log_p's device {log_p.device}")
    check_hessian_mode(hessian)
    if out is not None:
        if out.shape != log_p.shape or out.device != log_p.device:
            raise ValueError(f"out: expected shape {tuple(log_p.shape)} on {log_p.device}, got "
                             f"{tuple(out.shape)} on {out.device}")
        if not out.is_floating_point():
            raise TypeError(f"out: expected a floating-point tensor, got {out.dtype}")


def check_prepare_args(x: torch.Tensor, mode: str, forget: Optional[torch.Tensor],
                       fill: Optional[torch.Tensor], out: Optional[torch.Tensor],
                       inv_c: Optional[torch.Tensor], hessian: Hessian) -> None:
    """Validate the arguments of ``prepare``; raise with a clear message."""
    _check_matrix(x, "x", INPUT_DTYPES)
    if mode not in PREPARE_MODES:
        raise ValueError(f"mode: expected one of {PREPARE_MODES}, got {mode!r}")
    n, k = x.shape
    dev = x.device
    if any(s < 0 for s in x.stride()):
        raise ValueError("x: negative strides are not supported")
    if forget is not None and (forget.shape != (n,) or forget.dtype != torch.bool
                               or forget.device != dev):
        raise ValueError(f"forget: expected a bool tensor ({n},) on {dev}, got {forget.dtype} "
                         f"{tuple(forget.shape)} on {forget.device}")
    if mode == "log_p" and (forget is not None or fill is not None):
        # The backends' log_p passes write x as it is (the cpu kernel has no fill there): a forget
        # set would be ignored by one backend and filled by another.
        raise ValueError("forget, fill: only for mode 'probs' or 'logits'; mode 'log_p' writes x "
                         "as it is (expected forget=None and fill=None)")
    if fill is not None and (fill.shape != (k,) or fill.dtype != torch.float32
                             or fill.device not in (dev, _CPU)):
        where = "the CPU" if dev == _CPU else f"{dev} or the CPU"
        raise ValueError(f"fill: expected a float32 tensor ({k},) on {where}, got {fill.dtype} "
                         f"{tuple(fill.shape)} on {fill.device}")
    if out is None:
        if mode != "log_p":
            raise ValueError("out: required unless mode is 'log_p'")
    else:
        if out.shape != (n, k) or out.device != dev:
            raise ValueError(f"out: expected shape {(n, k)} on {dev}, got {tuple(out.shape)} on "
                             f"{out.device}")
        if out.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"out: dtype {out.dtype} is not a solver dtype "
                            f"{[str(d) for d in SUPPORTED_DTYPES]}")
        if any(s < 0 for s in out.stride()):
            raise ValueError("out: negative strides are not supported")
    if inv_c is not None:
        want = compute_dtype((x if out is None else out).dtype)
        if inv_c.shape != (n,) or inv_c.dtype != want or inv_c.device != dev:
            raise ValueError(f"inv_c: expected a {str(want).split('.')[-1]} tensor ({n},) on "
                             f"{dev} for this buffer, got {inv_c.dtype} {tuple(inv_c.shape)} on "
                             f"{inv_c.device}")
        if forget is not None and fill is None and mode != "log_p":
            raise ValueError("inv_c: the first evaluation needs final rows; pass fill for the "
                             "forget rows, or no inv_c")
    if hessian not in HESSIAN_MODES:
        raise ValueError(f"hessian: expected one of {HESSIAN_MODES}, got {hessian!r}")


def unpack_prepare(buf: torch.Tensor, k: int, mode: str, first: bool, hessian: Hessian,
                   assembled: bool = False) -> PrepareOut:
    """Split prepare's packed float64 result (on the CPU) into a :class:`PrepareOut`.

    Layout: ``[kind, row, A (k), B (k), colsum (k), wlogz, d (k) if hessian, W (k*k) if
    hessian is True]``; A, B are the retain / forget sums ("probs", "logits") or, in "log_p" mode,
    A is the column maximum (-inf: no finite entry) and B unused. ``assembled``: the last k*k
    already hold Newton's Hessian ``assemble_hessian(d, W)`` (the cpu backend's kernels form it).
    """
    b = buf.numpy()
    kind, row = int(b[0]), int(b[1])
    a, bb = b[2:2 + k], b[2 + k:2 + 2 * k]
    o = 2 + 2 * k
    error = (kind, row) if kind != ERR_NONE else None
    if mode == "log_p":
        retain, forget_s, support = None, None, torch.from_numpy(a > -np.inf)
    else:
        retain, forget_s, support = torch.from_numpy(a.copy()), torch.from_numpy(bb.copy()), None
    step = None
    if first:
        colsum, wlogz = torch.from_numpy(b[o:o + k].copy()), torch.tensor(float(b[o + k]),
                                                                           dtype=torch.float64)
        o += k + 1
        h = None
        if hessian == "diag":
            h = torch.from_numpy(b[o:o + k].copy())
        elif hessian is True:
            w = b[o + k:o + k + k * k].reshape(k, k)
            h = torch.from_numpy(w if assembled else _assemble_np(b[o:o + k], w))
        step = (colsum, wlogz, h)
    return PrepareOut(error, retain, forget_s, support, step)


def packed_size(k: int, first: bool, hessian: Hessian) -> int:
    """Doubles in prepare's packed result (see :func:`unpack_prepare`)."""
    size = 2 + 2 * k
    if first:
        size += k + 1 + (k if hessian else 0) + (k * k if hessian is True else 0)
    return size


def sampled_gram_by_chunks(materialize_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                      None],
                           log_p: torch.Tensor, inv_c: torch.Tensor,
                           stride: Optional[int] = None) -> torch.Tensor:
    """``W = sum_{i in S} inv_c_i q_i q_i^T`` (k x k float64) over the Hessian's row sample S
    (``stride`` m, default :func:`hessian_stride`; 1: every row, ``hessian="exact"``), for
    backends whose kernels do not accumulate it: the sampled rows are gathered a chunk at a time,
    Q is materialised for them by ``materialize_rows(log_p_rows, inv_c_rows, out_rows)`` into a
    float32 buffer, and a float32 GEMM (no TF32: the precision is forced for the call) forms the
    chunk's product, accumulated in float64. Only W's off-diagonal entries are used (sums of
    non-negative products: no cancellation). Temporaries: one chunk of rows.
    """
    n, k = log_p.shape
    m = hessian_stride(n, k) if stride is None else stride
    # Every row (m = 1): contiguous slices, no index of N rows and no gathered copy of them.
    idx = hessian_sample_rows(n, m, device=log_p.device) if m > 1 else None
    total = n if idx is None else idx.numel()
    rows = chunk_rows(total, k)
    buf = torch.empty((rows, k), dtype=torch.float32, device=log_p.device)
    buf_w = torch.empty_like(buf)
    w = torch.zeros((k, k), dtype=torch.float64, device=log_p.device)
    with ieee_matmul():
        for start in range(0, total, rows):
            if idx is None:
                lp, ic = log_p[start:start + rows], inv_c[start:start + rows]
            else:
                sel = idx[start:start + rows]
                lp, ic = log_p.index_select(0, sel), inv_c.index_select(0, sel)
            r = lp.shape[0]
            ic = ic.contiguous()
            _add_gram(materialize_rows, lp, ic, ic[:, None], buf[:r], buf_w[:r], buf_w[:r].T, w)
    return w


def _add_gram(materialize_rows, lp: torch.Tensor, ic: torch.Tensor, ic_col: torch.Tensor,
              q: torch.Tensor, qw: torch.Tensor, qw_t: torch.Tensor, w: torch.Tensor) -> None:
    """w (k x k float64) += sum over the rows of lp (R x k) of ic q q^T: Q materialised into
    ``q`` (R x k float32), ic Q into ``qw`` (``qw_t`` its transpose, ``ic_col`` = ic[:, None]),
    their float32 product (the caller holds :data:`ieee_matmul`: no TF32) added in float64."""
    materialize_rows(lp, ic, q)
    torch.mul(q, ic_col, out=qw)
    w += torch.mm(qw_t, q).double()


class BoundGram:
    """``W`` of :func:`sampled_gram_by_chunks` for a bound step's dense passes (GPU backends,
    k above what their kernels accumulate): the sampled rows of ``log_p`` (N x k) / ``inv_c``
    (N,) (block ``stride``; 1: every row, nothing copied) are gathered once per solve, and
    :meth:`into` adds them chunk by chunk, the same rows, chunks and order as
    ``sampled_gram_by_chunks``, so W is the same to the last bit. A pass then dispatches a few
    ops (materialize, a product, the GEMM, the sum) where ``step``'s route rebuilt the sample's
    index, gathered the rows again and assembled H with a dozen device ops. Memory: the sample,
    about 2 N / k rows (``hessian_stride``), at most ``chunk_rows`` more of float32 Q."""

    def __init__(self, log_p: torch.Tensor, inv_c: torch.Tensor, stride: int) -> None:
        n, k = log_p.shape
        if stride > 1:
            idx = hessian_sample_rows(n, stride, device=log_p.device)
            self.lp, self.ic = log_p.index_select(0, idx), inv_c.index_select(0, idx)
        else:
            self.lp, self.ic = log_p, inv_c.contiguous()
        total = self.lp.shape[0]
        rows = chunk_rows(total, k)
        f32 = dict(dtype=torch.float32, device=log_p.device)
        q = torch.empty((min(rows, max(total, 1)), k), **f32)
        qw = torch.empty_like(q)
        # Each chunk's arguments of _add_gram, views made once, so that a pass dispatches only
        # the ops that compute.
        self.chunks = []
        for start in range(0, total, rows):
            r = min(rows, total - start)
            ic = self.ic[start:start + r]
            self.chunks.append((self.lp[start:start + r], ic, ic[:, None], q[:r], qw[:r],
                                qw[:r].T))

    def into(self, materialize_rows, w: torch.Tensor) -> None:
        """Write W (k x k float64; ``w`` may be a view of a packed result) with
        ``materialize_rows(log_p_rows, inv_c_rows, out_rows)`` at the pass's alpha."""
        w.zero_()
        with ieee_matmul():
            for chunk in self.chunks:
                _add_gram(materialize_rows, *chunk, w)


# torch >= 2.9 sets the precision of float32 matmuls per backend (``fp32_precision``).
_PER_BACKEND_PRECISION = all(
    hasattr(getattr(torch.backends, name, None), "matmul")
    and hasattr(getattr(torch.backends, name).matmul, "fp32_precision")
    for name in ("cuda", "mkldnn"))


def _ieee_apply() -> tuple:
    """Set full float32 matmul precision (:data:`ieee_matmul`); returns the caller's settings."""
    if _PER_BACKEND_PRECISION:
        b = torch.backends
        try:
            legacy = torch.get_float32_matmul_precision()
        except RuntimeError:  # a mix of the two settings
            legacy = "highest"
        prev = (legacy, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision)
    else:
        prev = (torch.get_float32_matmul_precision(),)
    torch.set_float32_matmul_precision("highest")
    return prev


def _ieee_restore(prev: tuple) -> None:
    torch.set_float32_matmul_precision(prev[0])
    if _PER_BACKEND_PRECISION:
        b = torch.backends
        b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = prev[1:]


# ``with ieee_matmul():`` float32 matmuls in full float32 precision (no TF32, no bf16) for the
# duration of the block; the caller's settings are put back as they were when the last of
# overlapping blocks (other threads' refines) leaves.
#
# torch (2.9+) keeps two records of it, the global "matmul precision" and a per-backend
# ``fp32_precision`` (CUDA's, oneDNN's), and raises where they disagree: its global getter once
# a caller set TF32 the newer way (``torch.backends.fp32_precision = "tf32"``: a refine at
# 33 <= k <= 128 failed there), cuBLAS's TF32 check inside a float32 GPU matmul once only the
# per-backend one says "ieee" after a caller's ``torch.set_float32_matmul_precision("high")``
# or ``allow_tf32 = True``. So both are set (the global setter sets the per-backend ones to
# agree), and both put back: the global one first (it overwrites the others), then CUDA's and
# oneDNN's as they were. A global value torch refuses to read (the two settings mixed) is put
# back as "highest": its default, and its only possible value under CUDA TF32 set the newer
# way.
ieee_matmul = Overlapping(_ieee_apply, _ieee_restore)
