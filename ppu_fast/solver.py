"""The dual solver: Newton, Sinkhorn and gradient ascent on the k-dimensional concave dual.

Backend-agnostic: every pass over the N x k matrix goes through the backend's ``step`` (as
``backend.bind_step`` binds it for the solve, or the final pass that writes Q); everything here
is k-dimensional algebra in float64 (docs/design.md §1). The dual is

    g(alpha) = - sum_i c_i log Z_i(alpha) - alpha . M,   grad g = colsum(Q(alpha)) - M.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from .backends.base import Backend, StepOut, compute_dtype, hessian_stride, host_step
from .backends.cpu import _C
from .caller_state import Overlapping, caller_stacklevel
from .problem import as_float, as_int

METHODS = ("newton", "sinkhorn", "gradient")
DEFAULT_MAX_ITER = {"newton": 100, "sinkhorn": 10_000, "gradient": 100_000}
# Above this k, Newton uses the diagonal of the Hessian: even sampled, the dense part costs
# O(|S| k^2), and at k = 1000 the diagonal needs the same passes or one more (measured with the
# reference on the paper-like scenarios). Below it the dense Hessian matters: with the diagonal
# alone, k = 10 class unlearning with "original" marginals took 17-100 passes instead of 6-11.
DENSE_HESSIAN_MAX_K = 128
# Up to this k (the cpu kernel's MAX_FULL_K) a diagonal Newton that stalls (STALL_RATIO) or whose
# line search fails goes on with the dense, sampled Hessian: on confident models (logit margin
# 15-20) with "original" marginals the diagonal converged only linearly, ~2 % a pass, and ran
# out of passes at k = 129 to 1000 (float64 too) where k = 128 took 10.
DENSE_ESCALATION_MAX_K = 1024
ARMIJO_C1 = 1e-4
# The line search gives up below this step, or, when the trust radius below has made its first
# trial t0 small, not before BELOW_FLOOR_HALVINGS halvings of t0. Why the exception: on
# saturated rows (logit scale 20, or a row whose target mass is 0.95 on one class of 50) the
# Hessian is nearly singular, the Newton direction ~1e12-1e17 logits long and the capped t0
# ~1e-11-1e-16: with the floor alone no step was tried, and Newton stopped after one pass, "line
# search failed", on feasible problems that sinkhorn solves (a quarter or half of t0 is accepted
# there, on g's Armijo test, and the cap then grows). Below the floor a step must gain g: a
# residual that merely does not rise (the test for g's rounding noise, _accepted) is no evidence
# when (1 - c1 t) rounds to 1, and a floor relative to t0 alone let a stalled solve (lam 1e-20,
# 1,500 x 10) take such steps of 4e-13 for 100 passes where it used to stop after 4.
MIN_STEP = 1e-10
BELOW_FLOOR_HALVINGS = 10
# A line search starts from a step that changes no row's logits (alpha_j / c_i) by more than this.
# On a confident model the curvature at alpha = 0 is ~1e-13 and the full Newton step ~1e11 logits,
# a region where float32 log Z is noise; backtracking from there wastes a pass per halving.
# (A tighter cap, 20, slowed lam = 0.01 problems 4x: it binds on classes the heavy rows ignore.)
MAX_LOGIT_STEP = 100.0
# The cap is a trust radius, in the same logit units. It grows 8x after a capped step taken whole
# that did not raise the residual. After a step that raised it, it shrinks to CAP_SHRINK_ON_RISE
# times that step's largest logit move; after a step the line search had to shorten, to
# CAP_AFTER_BACKTRACK times it; never below CAP_FLOOR (confident rows' walls are margins of
# several logits away; without the floor, shortened steps shrank the cap pass after pass to a
# failed line search at 20,000 x 10, margin 8, lam 1e-6, float32). Why: on confident models with
# rare classes at small lam (20,000 x 128 / 129, 25 classes 100x rarer, margin 20, a random half
# forgotten, lam 1e-3) the rare classes' alphas must run ~1e4, which grew the cap to 800-6,400,
# and the same steps moved the common classes' alphas 50-100 logits apart where their confident
# retain rows flip at ~20: g rose as predicted (the rare classes carry it), the residual 1.7x
# (under RES_GROWTH_MAX, then 2x), 30-55 common classes lost all their retain rows and Newton
# wandered there on steps of 1/32 (at the solution the common alphas span 16 logits): 8 of 16 draws
# unconverged after 100 passes (float64 too). Measured with the line search's interpolation
# (cpu): those 16 draws 1,260 passes / 8 unconverged -> 539 / 0; the 288-refine set of
# docs/solver.md 3,030 -> 2,663 (0 unconverged either way); benchmarks/solver_grid.py 418 -> 405.
CAP_SHRINK_ON_RISE = 0.25
CAP_AFTER_BACKTRACK = 2.0
CAP_FLOOR = 2.0
# Residual ratio per unit step that marks the exponential tail (e^-1 = 0.37 in the middle).
TAIL_RHO = (0.25, 0.6)
# Relative rounding noise of the dual value, by the dtype the kernels evaluate in (float16 /
# bfloat16 buffers are evaluated in float32): float32 log Z summed in float64, about eps32 per
# term; float64 throughout, a few eps64 per term plus the float64 sums over each range's rows.
G_NOISE_REL = {torch.float32: 1e-7, torch.float64: 1e-15}
# The smallest tol accepted, by the same dtype: the residual ||colsum - M||_1 / N a solve can be
# trusted to reach, with a margin above the worst one measured (docs/solver.md, "Precision
# floors"; benchmarks/precision_floor.py). A smaller tol is refused up front: it would only burn
# max_iter passes.
TOL_FLOOR = {torch.float32: 1e-7, torch.float64: 1e-13}
# Below this residual a float64 Newton solve asks for the exact Hessian (every row in the
# sample, hessian="exact"). The sampled one breaks H 1 = 0 by its per-class rescaling; down to
# 1e-6 that costs no passes, but past it Newton wandered between 1e-8 and 4e-7 for 100 passes on
# class unlearning at margin 30, lam = 0.01 (20,000 x 40), where the exact one took 11 passes
# to 1e-13. It costs about k / 64 of a pass more on the CPU (k <= DENSE_HESSIAN_MAX_K).
EXACT_HESSIAN_BELOW = 1e-6
# ... and at any residual (float32 too) once the sample stalls Newton: two full steps in a row
# whose residual stays above this share of the one before them, or a failed line search. With a
# class target of exactly 0 (feasible: no row is one-hot on it) the class's remaining mass sits on
# the few rows the sample misses, and the sampled Hessian sent Newton wandering between 1e-5 and
# 1e-3 for 100 passes (float64) or into a failed line search (float32) at 8,000 x 12, where the
# exact one converges in about 10. Damped steps count only below STALL_DAMPED_BELOW: far from the
# optimum they are the line search's work, not the sample's fault (counted there, the rule fired
# in 20 of 120 scenarios, at passes 2-8); near it Newton should take full steps, and a float32
# solve (20,000 x 40, margin 30, lam 0.01, class) took damped ones between 2e-7 and 7e-7 for 100
# passes. Never where the sample holds every row already.
STALL_RATIO = 0.5
# A float32 solve out of passes whose residual fell by less than half over this many passes, near
# the float32 floor, says so in its message (the float64 hint of _solve_loop). A refine's float32
# solve that a float64 one follows (FLOAT64_RETRY_MAX_ELEMENTS) hands over as soon as it stalls so
# below STALL_DAMPED_BELOW, instead of at max_iter: the float32-stall family of
# tests/test_precision.py (30 seeds) 2,315 -> 2,096 passes on cpu, 2,386 -> 2,110 on torch; 17 x
# 100 lam 1e-2 / 1e-4 / 1e-6 "retain" refines (36) 4,289 -> 4,004 and 4,399 -> 4,063, as many
# converged; the solver sets unchanged. A level of 1e-3 cost weights288 16 passes (float32 solves
# that would have got through on their own), 1e-5 (the floor's own 100 x) saved less.
STALL_WINDOW = 10
STALL_DAMPED_BELOW = 1e-4
# Float32 Newton stalls on some tiny problems with more classes than confident rows, where the
# same problem widened to float64 converges: 64 x 100, logit margin 30, lam 10, pseudo "prior",
# "original" marginals, a third of the rows forgotten failed for 21 of 30 seeds on the cpu
# backend (23 on torch), and for none in float64 (at most 27 passes). Newton's step is accurate
# there (the float64 oracle's residual, H within 7e-7), but 52 classes hold almost no mass and
# the direction spans ~2e5 logits: every trial saturates. Up to this many entries (a 32 MiB
# float64 copy) refine and solve try such a solve again in float64 (solve_again_in_float64).
FLOAT64_RETRY_MAX_ELEMENTS = 1 << 22
MAX_EXTRAPOLATION = 64.0
# A dual iterate that shifts some row's logits by more than this has left every log-probability
# behind (float32 ones reach -104 at most, float64 ones -745): the marginals are infeasible or
# nearly so.
DIVERGED_LOGIT = 1e4
# A Newton trial may raise the residual by at most this factor (unless it reaches tol), however
# much g gains. Where the dual must carry a class far (small lam, rare classes, confident models)
# Armijo alone accepted steps that flipped whole groups of retain rows (residual 2e-2 -> 0.5 ->
# 1.6) and Newton wandered there for 100 passes. Measured (cpu; 288 refines of the set in
# docs/solver.md and benchmarks/solver_grid.py's 96): no cap 4,031 passes, 7 not converged,
# grid 416; 1.5x 3,041 / 0 / 417; 2x 3,030 / 0 / 418; 4x 2,970 / 0 / 417; 30x 3,480 / 4.
# 2x also converged the probe's k = 40 imbalanced models at lam 1e-3 (4 of 4, 13-31 passes;
# 4x: 2 of 4). Since the trust radius (CAP_*), 1.5x: on the rare-class models at lam 1e-4
# (margin 20, k = 128 to 1,000) 2x let through steps that raised the residual 1.5-1.9x by moving
# the common classes' alphas past their retain rows' walls, each undone over the next passes,
# until the passes ran out (the family of docs/solver.md 116 -> 120 of 120 converged, 3,988 ->
# 3,678 passes; 108 further draws at k = 128 to 1,000: 89 -> 107 of 108); the 288-refine set
# 2,663 -> 2,664, the solver grid 405 -> 410 (a 1.66x rise at 20,000 x 10, lam 100, that helped is
# now refused), all converged either way.
RES_GROWTH_MAX = 1.5
# The last pass writes Q when res * (res / res_prev) <= s * tol (_solve_loop), s the entry of
# this tuple for the predictions that failed so far: none once they are used up (each failure
# costs a prepare, which rebuilds log P^; the line search reuses its pass). On the four sets of
# benchmarks/solver_sets.py (weights288 / rare120 / saturated200 / cost528, cost = passes +
# separate materialize + failed predictions): (1,) 2,927 / 3,648 / 4,382 / 2,850; (1.5,) 2,929 /
# 3,689 / 4,376 / 2,853 (rare120 lost: an early miss gave up the fused pass for the whole solve);
# (1.25, 1) 2,918 / 3,649 / 4,378 / 2,830 (docs/solver.md, "The last Newton pass writes Q").
FINAL_PREDICT_SLACKS = (1.25, 1.0)
# Newton's equation for a class total is log s_j = log M_j while s_j is within this many
# e-folds of M_j, linear beyond (_log_residual). Measured (cpu; solver grid, the 288-refine set
# of docs/solver.md): plain Newton 410 / 2,839 passes; spans 1 / 2 / 3 / 5 / unlimited 385 / 375 /
# 380 / 381 / 394 and 2,757 / 2,745 / 2,745 / 2,744 / 5,118 (13 not converged), all others
# converged; span 2 with plain Newton where the cap would cut the step (_solve_loop) 375 / 2,758.
LOG_NEWTON_SPAN = 2.0
# ... and only where the rows' weights differ by at most this factor (lam in [1e-2, 1e2] for
# refine's two levels). With equal weights a class's total in rows that hold little of it scales
# like exp(-alpha_j / c), which the log models; with weights far apart each row moves at its own
# rate, exp(-alpha_j / c_i). There the log form saved 3 % of the passes (the 288-refine set,
# lam 1e-3 to 1e-8: 2,598 -> 2,526) but changed hard paths for the worse: at lam 1e-6 a
# 200 x 100 problem of tests/test_hostile_calls.py (89 passes) no longer converged in 100, and
# lam_range.py lost a cell (20,000 x 10, margin 8, float32, lam 1e-10: 17 passes -> line search
# failed).
LOG_FORM_WEIGHT_RATIO = 100.0
# balanced_laplacian's sweeps toward the exact diagonal. Measured (cpu backend, 288 refines:
# 20,000 x 10 / 20,000 x 40 / 50,000 x 100, logit margins 8 and 30, lam 1e-2 to 1e-8, class and
# selective, both dtypes, two seeds; and the 96 of benchmarks/solver_grid.py): 0 sweeps (the
# Laplacian of h's off-diagonal entries alone) 4,431 passes, 11 not converged, grid 424; 1-5
# sweeps 3,755-4,204, 8-11, grid 416-425; 10 sweeps 4,388, 16, grid 418; the former solve with h
# itself 7,436 passes, 50 not converged. The misses are all class unlearning at margin 30 and
# lam <= 1e-4, where every variant's counts scatter from seed to seed: 1-5 sweeps are alike within
# that scatter, and 3 took the fewest passes on the grid (416; 2 sweeps 425). An exact Hessian
# needs no sweep (its ratios are within float32 rounding of 1).
BALANCE_ITERS = 3
BALANCE_TOL = 1e-4


_BLAS = None


def _blas_apply():
    global _BLAS
    try:
        if _BLAS is None:
            from threadpoolctl import ThreadpoolController
            _BLAS = ThreadpoolController()
        limit = _BLAS.limit(limits=1, user_api="blas")
    except Exception:  # threadpoolctl missing or a BLAS it cannot drive: leave BLAS as it is
        return None
    limit.__enter__()
    return limit


def _blas_restore(limit) -> None:
    if limit is not None:
        limit.__exit__(None, None, None)


# ``with _one_blas_thread():`` numpy's BLAS on one thread for a k x k solve in numpy. OpenBLAS
# threads even a 100 x 100 solve and its worker then busy-waits on another core for a while,
# which halved the speed of the C++ kernels' next pass (a 50,000 x 100 refine: 45 ms against
# 26 ms). The caller's setting is restored when the last of overlapping solves (other threads')
# returns.
_one_blas_thread = Overlapping(_blas_apply, _blas_restore)


def hessian_mode(method: str, k: int) -> Union[bool, str]:
    """The Hessian ``method`` asks of every pass: True (dense), "diag" or False (none)."""
    if method != "newton":
        return False
    return True if k <= DENSE_HESSIAN_MAX_K else "diag"


def check_tol_floor(tol: float, dtype: torch.dtype) -> None:
    """Refuse a ``tol`` below the precision floor of the dtype the kernels evaluate a buffer of
    ``dtype`` in (``TOL_FLOOR``), before any pass over the data."""
    cdt = compute_dtype(dtype)
    floor = TOL_FLOOR[cdt]
    if tol < floor:
        name = str(dtype).split(".")[-1]
        how = ("pass float64 input to solve in float64 (floor "
               f"{TOL_FLOOR[torch.float64]:g}), or a larger tol" if cdt == torch.float32
               else "a larger tol")
        raise ValueError(f"tol: {tol:g} is below the precision floor {floor:g} of a {name} "
                         f"solve (evaluated in {str(cdt).split('.')[-1]}): the residual "
                         f"||colsum(Q) - M||_1 / N cannot be trusted below it; expected tol >= "
                         f"{floor:g} ({how})")


def check_options(method: Any, tol: Any, max_iter: Any,
                  step_size: Any) -> Tuple[str, float, int, Optional[float]]:
    """The solver options validated (numpy and 0-d torch scalars accepted): (method, tol,
    max_iter with its default filled in, step_size)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; expected one of {list(METHODS)}")
    tol = as_float(tol, "tol")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol: expected a finite number > 0, got {tol!r}")
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER[method]
    max_iter = as_int(max_iter, "max_iter")
    if max_iter < 1:
        raise ValueError(f"max_iter: expected an integer >= 1, got {max_iter!r}")
    if step_size is not None:
        if method != "gradient":
            raise ValueError(f"step_size: only method='gradient' takes a step size (newton and "
                             f"sinkhorn choose their own); got step_size={step_size!r} with "
                             f"method={method!r}")
        step_size = as_float(step_size, "step_size")
        if not (step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size: expected a finite number > 0, got {step_size!r}")
    return method, tol, max_iter, step_size


class ConvergenceWarning(UserWarning):
    """The solver stopped at ``max_iter`` (or stagnated) before reaching ``tol``."""


@dataclass
class RefineInfo:
    """What a solve did.

    iterations: evaluations of the dual (each is a pass over the N x k matrix; the first one is
        taken from ``prepare``'s pass when the caller had it, see ``steps``).
    steps: the solver's own passes: steps (through ``backend.bind_step``), and the last pass when
        it wrote Q (``materialized``) (``iterations`` less the evaluation ``prepare`` provided).
    converged: whether ``residual <= tol``.
    residual: the final ``||colsum(Q) - M||_1 / N``.
    history: the residual after each evaluation, first entry at the starting alpha.
    dual_value: the dual objective g(alpha) at the returned alpha.
    alpha: the dual variables (k,) float64 on the CPU, gauge-fixed to sum zero.
    method, backend: what ran; seconds: wall time of the call that returned this info.
    timings: seconds per phase of that call (``refine``: "prepare", "solve", "materialize", ...);
        durations only, so that they can be summed or plotted together.
    output_residual: ``||colsum(Q) - M||_1 / N`` of the Q that ``refine`` returned, measured in
        float64 when Q is float16 / bfloat16 (rounding Q to those dtypes adds ~1e-4 to the
        solver's ``residual``); None for float32 / float64 results, whose rounding is below the
        solver's precision floor (``TOL_FLOOR``).
    materialized: whether the last pass wrote Q(alpha) over the solver's buffer (see
        :class:`FinalPass`); ``residual`` is then that of the Q written.
    chunk_rows: rows per chunk of a streamed refine (``refine_file``); None for the calls that
        hold the matrix in memory.
    solve_dtype: the dtype the solver evaluated Q in to reach ``alpha`` and ``residual``
        (float32 for float32 and 16-bit log P^; float64 for float64, and after a float32 solve
        that was solved again in float64); None where no solve ran (k = 1).
    """

    iterations: int
    converged: bool
    residual: float
    history: List[float] = field(default_factory=list)
    dual_value: float = float("nan")
    alpha: Optional[torch.Tensor] = None
    method: str = "newton"
    backend: str = "torch"
    seconds: float = 0.0
    message: str = ""
    steps: int = 0
    timings: Dict[str, float] = field(default_factory=dict)
    output_residual: Optional[float] = None
    materialized: bool = False
    chunk_rows: Optional[int] = None
    solve_dtype: Optional[torch.dtype] = None


class FinalPass(NamedTuple):
    """Lets Newton's last pass be the one that writes Q (``refine`` passes it; optional).

    Near the optimum the next iterate is known to converge before it is evaluated (the residual
    falls faster than linearly, pass after pass), and a pass that only certifies it, followed by
    one that writes Q, is one pass too many. ``write(alpha)`` writes Q(alpha) (alpha (k,) float64,
    the kernels' gauge) over the solver's buffer and returns ``(colsum (k,), wlogz)`` of the rows
    it wrote, in the same pass; ``restore()`` puts log P^ back in the buffer, for the rare
    prediction that fails (the line search then takes that pass as its first trial).
    """

    write: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
    restore: Callable[[], None]


class _Evaluator:
    """Wraps the backend's bound step: counts passes, computes g and the residual for one alpha
    (numpy)."""

    def __init__(self, backend: Backend, log_p: torch.Tensor, inv_c: torch.Tensor,
                 marginals: np.ndarray, hessian, max_passes: int, c_sum: float) -> None:
        self.backend, self.log_p, self.inv_c, self.m = backend, log_p, inv_c, marginals
        self.run = backend.bind_step(log_p, inv_c)
        self.hessian, self.max_passes = hessian, max_passes
        self.n = log_p.shape[0]
        self.passes = 0  # evaluations, the one taken from prepare included
        self.steps = 0
        self.history: List[float] = []
        self.g_noise = 0.0
        self.noise_rel = G_NOISE_REL[compute_dtype(log_p.dtype)]
        self.log_k_sum_c = math.log(max(log_p.shape[1], 2)) * c_sum

    def __call__(self, alpha: np.ndarray, hessian=None):
        # The kernels form log_p - alpha_j * inv_c_i in float32 (or float64): evaluate in the
        # gauge where most alphas are near 0 (their median), so that their differences, which
        # alone matter, survive rounding when a few are huge (1e9 at lam = 1e-8 while the rest
        # differ by O(1)).
        alpha = gauge_for_kernels(alpha)
        out = self.run(alpha, self.hessian if hessian is None else hessian)
        self.steps += 1
        return self.record(alpha, *out)

    def record(self, alpha: np.ndarray, colsum: np.ndarray, wlogz: float,
               h: Optional[np.ndarray]):
        """Turn a pass's host (colsum, wlogz, H) into (grad, g, H, residual)."""
        self.passes += 1
        grad, am, amax, ares = _pass_terms(colsum, self.m, alpha)
        g = -wlogz - am
        # g sums N rounded terms c_i log Z_i, log Z_i = max_j x_ij + log s_i, each about as large
        # as |alpha_j| / c_i + log k (rows of log P^ are normalised): changes of g below the
        # dtype's relative noise times the sum of their magnitudes are noise.
        self.g_noise = self.noise_rel * (abs(wlogz) + abs(am) + self.n * amax
                                         + self.log_k_sum_c)
        res = ares / self.n
        self.history.append(res)
        return grad, g, h, res


def _pass_terms_numpy(colsum: np.ndarray, m: np.ndarray, alpha: np.ndarray
                      ) -> Tuple[np.ndarray, float, float, float]:
    """(grad = colsum - m, alpha . m, max |alpha|, sum |grad|) of k-vectors: what a pass
    records (``ppu_fast._C.pass_terms`` computes the same, summing in index order)."""
    grad = colsum - m
    return grad, float(alpha @ m), float(np.abs(alpha).max()), float(np.abs(grad).sum())


def _pass_terms(colsum: np.ndarray, m: np.ndarray, alpha: np.ndarray
                ) -> Tuple[np.ndarray, float, float, float]:
    """:func:`_pass_terms_numpy`, in C++ where ``_C`` is built: numpy's four k-vector calls
    cost ~12 us a pass, a tenth of a 50,000 x 10 pass."""
    if _C is not None:
        return _C.pass_terms(colsum, m, alpha)
    return _pass_terms_numpy(colsum, m, alpha)


def gauge_for_kernels(alpha: np.ndarray) -> np.ndarray:
    """``alpha`` shifted by its median (Q is unchanged by a common shift): the representative
    the kernels see, in which the float32 shift alpha_j * inv_c_i keeps the differences between
    the bulk of the alphas even when a few are very large."""
    k = alpha.shape[0]
    if k == 0:
        return alpha.copy()
    # np.median's generic machinery costs ~10 us per call; a sort ~1 us up to k ~ 100, a
    # partition less above.
    part = np.sort(alpha) if k <= 128 else np.partition(alpha, ((k - 1) // 2, k // 2))
    return alpha - 0.5 * (part[(k - 1) // 2] + part[k // 2])


def _centred(alpha: np.ndarray) -> np.ndarray:
    """alpha minus its mean (sum / k: ndarray.mean's wrapper costs twice as much)."""
    return alpha - alpha.sum() / alpha.shape[0]


def balanced_laplacian(h: np.ndarray) -> np.ndarray:
    """The matrix Newton solves with for a dense Hessian ``h`` (k x k, symmetric: its diagonal
    and strict lower triangle are read) as the backends assemble it (exact diagonal d,
    off-diagonal entries -w, w >= 0): the Laplacian of the weights ``t_i w_il t_l``, with t
    rescaled (at most ``BALANCE_ITERS`` sweeps of ``t_i *= sqrt(d_i / (t_i (w t)_i))``, fewer
    once every ratio is within ``BALANCE_TOL`` of 1) so that its diagonal, their row sums, moves
    toward d. Its rows sum to 0 to float64 rounding whatever the sweeps reach; its diagonal is d
    within ``BALANCE_TOL`` when they converge (an exact Hessian: at once). A class with
    d_i <= 0 is not rescaled; one with no weight at all keeps d_i alone on its diagonal (the
    backends' H has d_i = 0 there). (csrc/cpu/newton.cpp computes the same.)

    Why: ``h``'s diagonal matches its off-diagonal sums only to a row sample's error, or to
    float32 rounding (~1e-6) with every row, and where Newton's direction has a huge component
    along 1 (a class whose alpha must run far: class unlearning at small lam) that mismatch
    times it swamped the other classes' components (docs/solver.md, "What Newton solves with")."""
    k = h.shape[0]
    d = np.diagonal(h).copy()
    low = -np.tril(h, -1)
    w = np.where((low > 0) | np.isnan(low), low, 0.0)  # NaN kept: the direction is then rejected
    w = w + w.T
    weighted = ~(w.sum(axis=1) <= 0)
    swept = weighted & (d > 0)
    t = np.ones(k)
    for _ in range(BALANCE_ITERS):
        ratio = np.where(swept, d / np.where(swept, t * (w @ t), 1.0), 1.0)
        if k == 0 or not np.max(np.abs(ratio - 1.0)) >= BALANCE_TOL:
            break
        t = t * np.sqrt(ratio)
    wt = np.tril(t[:, None] * w * t[None, :], -1)
    wt = wt + wt.T  # exactly symmetric, as the C++ one
    lap = -wt
    np.fill_diagonal(lap, np.where(weighted, wt.sum(axis=1), d))
    return lap


def _newton_direction(h: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Solve H d = grad on the subspace sum(d) = 0, H = :func:`balanced_laplacian` of a dense
    ``h`` (PSD with null vector 1), or ``h`` itself when it is a diagonal (k,)."""
    if h.ndim == 1:  # diagonal Hessian
        d = grad / np.maximum(h, 1e-12 * max(float(h.max()), 1e-300))
        return d - d.mean()
    if _C is not None:
        # The same system by Cholesky in C++ (csrc/cpu/newton.cpp): numpy's wrappers cost more
        # than a 50,000 x 10 pass; None (not positive definite) falls through to numpy's LU.
        d = _C.newton_direction(h, grad, BALANCE_ITERS, BALANCE_TOL)
        if d is not None:
            return d
    with _one_blas_thread():
        return _dense_direction_numpy(balanced_laplacian(h), grad)


def _log_residual(grad: np.ndarray, m: np.ndarray) -> np.ndarray:
    """:func:`_log_residual_numpy`, in C++ where ``_C`` is built (``_C.log_residual``, the same
    arithmetic): numpy's dozen k-vector calls cost ~20 us a pass, against ~1 us."""
    if _C is not None:
        return _C.log_residual(grad, m, LOG_NEWTON_SPAN)
    return _log_residual_numpy(grad, m)


def _log_residual_numpy(grad: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The right-hand side r of Newton's step ``H d = r`` on the optimality equations written as
    ``F(s_j) = F(M_j)``, s = colsum(Q) = grad + M, with F = log near M_j (within a factor
    e^LOG_NEWTON_SPAN) and its tangent lines beyond: r_j = F(s_j) / F'(s_j), which is
    ``s_j log(s_j / M_j)`` there, and ``grad_j`` where s_j or M_j is not positive.

    The plain Newton step (r = grad = s - M) models each class total as linear in alpha; a
    total whose rows hold little of the class moves like exp(-alpha_j / c), and the logarithm
    models that (on the benchmark's class unlearning, 50,000 x 10 at logit margin 6, the first
    step takes the residual from 1.8e-2 to 1.2e-4 instead of 4.4e-3). Both are Newton on
    equations with the same solution, and agree to first order near it: the quadratic rate is
    kept. The span keeps the log's model where it was measured to help: with no limit, a class
    whose total must fall by 1e10 (the forgotten class at logit margin 30, "retain" targets)
    was moved 24 logits at once into a region where the next steps stalled, and small-lam
    problems took up to 3x the passes (docs/solver.md, "The Newton equation")."""
    s = grad + m
    out = grad.copy()
    ok = (s > 0.0) & (m > 0.0)
    so, mo = s[ok], m[ok]
    # log1p of the relative gap keeps its digits when s is within rounding of M.
    with np.errstate(over="ignore"):  # a huge ratio is past the span: its value is not used
        lr = np.log1p(grad[ok] / mo)
    span = LOG_NEWTON_SPAN
    out[ok] = np.where(lr > span, so - mo * math.exp(span) * (1.0 - span),
                       np.where(lr < -span, so - mo * math.exp(-span) * (1.0 + span), so * lr))
    return out


def _dense_direction_numpy(h: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """:func:`_newton_direction` for a dense H in numpy (pivoted LU, least squares if singular):
    where ``ppu_fast._C`` is not built or its Cholesky finds H not positive definite."""
    k = h.shape[0]
    scale = max(float(np.diagonal(h).mean()), 1e-300)
    # The rank-one term fixes the gauge; the tiny ridge handles classes whose column is empty.
    a = h + scale / k + 1e-12 * scale * np.eye(k)
    try:
        d = np.linalg.solve(a, grad)
    except np.linalg.LinAlgError:
        d = np.linalg.lstsq(a, grad, rcond=None)[0]
    return d - d.mean()


def _line_search(ev: _Evaluator, alpha, d, grad, g, res, t0: float = 1.0, hessian=None,
                 tol: float = 0.0, growth: float = math.inf, interpolate: bool = False,
                 known: Optional[Tuple[np.ndarray, float, float, float]] = None):
    """Armijo backtracking on g. Near the optimum g's float rounding hides real progress: a gain
    in g only counts when it exceeds g's rounding noise, and a step that leaves g unchanged
    within that noise is accepted when it decreases the residual sufficiently; a step that
    reaches ``tol`` is accepted whatever g says, one that multiplies the residual by more than
    ``growth`` never (:func:`_accepted`). A refused step is halved; with ``interpolate`` the
    first refused one (t0) is replaced by the maximiser of the quadratic through g, the slope
    and that trial, kept within [1/4, 1/2] of it (where a full step lost g by 10x its predicted
    gain, halving took four more passes to reach 1/32). Only the first: interpolating every
    refusal skipped octaves, and at 1,500 x 10, margin 30, lam 1e-10 (float32) the one step
    g accepted (8.5e-9 of a 1.5e9-logit direction) lay between two trials, and the line search
    failed (benchmarks/lam_range.py). Returns the new state, or None when no step is accepted
    within the pass budget. ``known``: (grad, g, res, g_noise) of the trial t0, evaluated
    without H (a failed last-pass prediction): accepted, it returns H = None (the caller keeps
    its previous H for one direction)."""
    slope = float(grad @ d)
    t = t0
    noise = ev.g_noise
    t_min = min(MIN_STEP, t0 / 2.0 ** BELOW_FLOOR_HALVINGS)
    while t >= t_min and (known is not None or ev.passes < ev.max_passes):
        a_new = alpha + t * d
        if known is not None:
            (grad_n, g_n, res_n, ev.g_noise), h_n, known = known, None, None
        else:
            grad_n, g_n, h_n, res_n = ev(a_new, hessian)
        if _accepted(g_n, res_n, g, res, t, slope, max(noise, ev.g_noise), tol, growth):
            return a_new, grad_n, g_n, h_n, res_n, t
        shortfall = slope * t - (g_n - g)
        if (interpolate and t == t0 and 0 < slope < math.inf and math.isfinite(g_n)
                and shortfall > 0):
            t = min(max(slope * t * t / (2.0 * shortfall), 0.25 * t), 0.5 * t)
        else:
            t *= 0.5
    return None


def _accepted(g_n: float, res_n: float, g: float, res: float, t: float, slope: float,
              noise: float, tol: float = 0.0, growth: float = math.inf) -> bool:
    """The line search's test of a trial step t: a residual within ``tol`` (the solve is done:
    Q(alpha) is the exact projection onto its own column sums, whatever g's rounding says);
    else Armijo on g, or, where g's rounding noise hides the gain, a sufficient decrease of the
    residual for a step t of at least MIN_STEP (below it any decrease passes). (g's noise
    estimate can fall short when many rows are identical, as uniform pseudo rows are: their
    float32 log Z round alike, and at lam 1e-6 a converged trial of a 1,500 x 10 refine lost 31.4
    against an estimate of 30.6 and was refused, 100 passes.)
    A trial that multiplies the residual by more than ``growth`` is refused (RES_GROWTH_MAX)."""
    if not math.isfinite(g_n):
        return False
    if res_n <= tol:
        return True
    return res_n <= growth * res and (
        g_n >= g + max(ARMIJO_C1 * t * slope, noise)
        or (g_n >= g - noise and t >= MIN_STEP and res_n <= (1.0 - ARMIJO_C1 * t) * res))


def _write_final(ev: "_Evaluator", final: FinalPass, alpha: np.ndarray, d: np.ndarray, t0: float,
                 tol: float):
    """Newton's predicted last step, written as Q. Returns ``(written, (grad, g, res, g_noise))``
    of Q(alpha + t0 d): ``written`` when it has converged (the buffer then holds Q), else log P^
    is restored and the trial is the line search's first (its pass is not taken again)."""
    a_k = gauge_for_kernels(alpha + t0 * d)
    noise = ev.g_noise
    colsum, wlogz, _ = host_step(*final.write(torch.from_numpy(a_k)))
    ev.steps += 1
    grad_n, g_n, _, res_n = ev.record(a_k, colsum, wlogz, None)
    written = res_n <= tol and math.isfinite(g_n)
    if not written:
        final.restore()
        noise, ev.g_noise = ev.g_noise, noise  # the line search sets it as its own pass would
    return written, (grad_n, g_n, res_n, noise)


def solve_dual(backend: Backend, log_p: torch.Tensor, inv_c: torch.Tensor,
               marginals: torch.Tensor, *, method: str = "newton", tol: float = 1e-6,
               max_iter: Optional[int] = None, step_size: Optional[float] = None,
               alpha0: Optional[torch.Tensor] = None, first: Optional[StepOut] = None,
               weight_sums: Optional[tuple] = None,
               capacity: Optional[Callable[[], None]] = None,
               final: Optional[FinalPass] = None, warn: bool = True,
               hand_over: bool = False) -> RefineInfo:
    """Maximise the dual for ``log_p`` (N x k), ``inv_c`` (N,) and ``marginals`` M (k,).

    ``first``: the step at alpha = 0 with the Hessian ``hessian_mode(method, k)`` asks for, on the
    CPU, as ``prepare`` returns it; it replaces the solver's first pass (alpha0 must be None).
    ``weight_sums``: (sum inv_c, max inv_c, sum 1 / inv_c, min inv_c) when the caller knows them
    (else they are reduced from ``inv_c``).
    ``capacity``: called (at most once) when the iterates diverge or ``tol`` is not reached; it
    raises when the marginals are infeasible (``problem.check_capacity``).
    ``final``: Newton may end on a pass that writes Q (:class:`FinalPass`); ``info.materialized``
    says whether it did.
    Returns a :class:`RefineInfo` whose ``alpha`` (k,) float64 (on the CPU) defines Q(alpha):
    the last iterate, or the one with the smallest residual when ``tol`` was not reached.
    Warns with :class:`ConvergenceWarning` when ``tol`` is not reached (unless ``warn`` is
    False: the caller says it, see :func:`solve_again_in_float64`).
    ``hand_over``: a float32 Newton solve that stalls below residual ``STALL_DAMPED_BELOW``
    (:func:`_float32_stall`) stops there instead of at ``max_iter``, for the caller's float64
    solve (:func:`solve_again_in_float64`) to finish.
    """
    method, tol, max_iter, step_size = check_options(method, tol, max_iter, step_size)
    check_tol_floor(tol, log_p.dtype)
    t_start = time.perf_counter()
    n, k = log_p.shape
    m = marginals.to(device="cpu", dtype=torch.float64).numpy()
    alpha = (np.zeros(k) if alpha0 is None
             else alpha0.to(device="cpu", dtype=torch.float64).numpy().copy())
    hessian = hessian_mode(method, k)
    if weight_sums is None:
        icd = inv_c.double()
        weight_sums = (float(icd.sum()), float(icd.max()) if n else 1.0,
                       float((1.0 / icd).sum()), float(icd.min()) if n else 1.0)
    inv_c_sum, inv_c_max, c_sum, inv_c_min = weight_sums
    ev = _Evaluator(backend, log_p, inv_c, m, hessian, max_iter, c_sum)
    c_bar = m_safe = eta = None
    if method == "sinkhorn":
        # Harmonic mean of the weights: exact IPF when all weights are equal.
        c_bar = n / inv_c_sum
        m_safe = np.maximum(m, 1e-300)
    elif method == "gradient":
        # lambda_max(diag(q) - q q^T) <= 1/2 (Gershgorin), so g is L-smooth with
        # L = sum_i inv_c_i / 2 and eta = 1/L ascends monotonically.
        eta = step_size if step_size is not None else 2.0 / inv_c_sum
    exact_below = (EXACT_HESSIAN_BELOW if hessian is True
                   and compute_dtype(log_p.dtype) == torch.float64 else 0.0)
    sampled = hessian is True and hessian_stride(n, k) > 1
    # (1 + 1e-6): the weights as stored, rounded (lam = 0.01 gives 100.0000002 in float32)
    log_form = inv_c_max <= LOG_FORM_WEIGHT_RATIO * (1.0 + 1e-6) * inv_c_min
    info = _solve_loop(backend, ev, method, m, alpha, first, alpha0, tol, max_iter, inv_c_max,
                       c_bar, m_safe, eta, t_start, capacity, exact_below, final, sampled,
                       log_form, hand_over)
    if warn and not info.converged:
        _warn_not_converged(info, tol)
    return info


def _float32_stall(history: List[float], below: float) -> bool:
    """Whether a float32 solve's residuals ``history`` stalled below ``below``: in the last
    ``STALL_WINDOW`` passes the smallest residual, at most ``below``, is not under half the
    smallest before them. A float32 evaluation's rounding can be what stops Newton there (tiny
    N, alphas far apart): a 2 x 33 refine sat at 3.7e-6 for 60 passes where float64 took 22. (The
    best so far, not the window's first: such residuals bounce, 1.8e-6 to 4.8e-6 for 60 passes
    at 17 x 100.)"""
    if len(history) <= STALL_WINDOW:
        return False
    low = min(history[-STALL_WINDOW:])
    return low <= below and low > 0.5 * min(history[:-STALL_WINDOW])


def _may_escalate_diag(ev: _Evaluator) -> bool:
    """Whether a diagonal Newton may go on with the dense Hessian (``DENSE_ESCALATION_MAX_K``)."""
    return ev.hessian == "diag" and ev.log_p.shape[1] <= DENSE_ESCALATION_MAX_K


def _escalate_diag(ev: _Evaluator) -> Tuple[bool, float]:
    """Switch ``ev`` from the diagonal to the dense Hessian; (sampled, exact_below) for it.
    exact_below is 0 (unlike a dense start in float64): at these k an exact pass costs ~k / 64
    passes, and a float64 precision-floor run spent minutes in them at k = 1,000; the stall rule
    still takes the exact Hessian when the sample stalls."""
    n, k = ev.log_p.shape
    ev.hessian = True
    return hessian_stride(n, k) > 1, 0.0


def _solve_loop(backend: Backend, ev: _Evaluator, method: str, m: np.ndarray, alpha: np.ndarray,
                first: Optional[StepOut], alpha0, tol: float, max_iter: int, inv_c_max: float,
                c_bar, m_safe, eta, t_start: float,
                capacity: Optional[Callable[[], None]] = None,
                exact_below: float = 0.0, final: Optional[FinalPass] = None,
                sampled: bool = False, log_form: bool = False,
                hand_over: bool = False) -> RefineInfo:
    """The iterations of :func:`solve_dual`; Newton's passes ask for the exact Hessian once the
    residual is below ``exact_below``, or, when the Hessian is ``sampled`` (a strict subset of
    the rows), once it stalls (``STALL_RATIO``); a diagonal Newton goes on with the dense
    Hessian once it stalls (``DENSE_ESCALATION_MAX_K``). ``log_form``: Newton's equations for
    the class totals in log form near their targets (:func:`_log_residual`). ``hand_over``: stop
    a float32 Newton solve that stalls (see :func:`solve_dual`)."""
    if first is not None and alpha0 is None:
        grad, g, h, res = ev.record(alpha, *host_step(*first))
    else:
        grad, g, h, res = ev(alpha)
    message = ""
    t_next, rho_prev = 1.0, 0.0
    cap = MAX_LOGIT_STEP
    best = (res, alpha, g)
    res_prev = math.inf
    materialized = False
    # A float32 Newton solve: one that float32 rounding can stall (hand_over, the max_iter hint).
    f32_newton = method == "newton" and compute_dtype(ev.log_p.dtype) == torch.float32
    hand_over = hand_over and f32_newton
    misses = 0  # failed write predictions
    recent = [(res, False)]  # (residual, taken as a full step) of the accepted iterates
    while res > tol and ev.passes < max_iter:
        if (capacity is not None
                and float(alpha.max() - alpha.min()) * inv_c_max > DIVERGED_LOGIT):
            capacity()  # raises on infeasible marginals
            capacity = None
        if method == "newton":
            d = _newton_direction(h, _log_residual(grad, m)) if log_form else None
            spread = float(d.max() - d.min()) * inv_c_max if log_form else math.inf
            if not (log_form and float(grad @ d) > 0.0 and t_next * spread <= cap):
                # Not an ascent direction of g, or a step the logit cap would cut: where even
                # the log's model reaches that far (saturated rows) plain Newton's is used.
                d = _newton_direction(h, grad)
                spread = float(d.max() - d.min()) * inv_c_max
            t0 = min(t_next, cap / spread) if spread > 0 else t_next
            trial = None
            # Near the optimum the residual shrinks faster than linearly, so after a step taken
            # whole res * (res / res_prev) bounds the next one: when that is below tol, write Q
            # with this pass (a prediction that failed says the model holds less well here:
            # the next one asks for more, and none follows the last slack).
            if (final is not None and misses < len(FINAL_PREDICT_SLACKS) and t0 == t_next
                    and res_prev < math.inf
                    and res * (res / res_prev) <= FINAL_PREDICT_SLACKS[misses] * tol
                    and ev.passes < max_iter):
                written, trial = _write_final(ev, final, alpha, d, t0, tol)
                if written:
                    alpha, (grad, g, res, _) = _centred(alpha + t0 * d), trial
                    materialized = True
                    break
                misses += 1
            res_prev = res
            out = _line_search(ev, alpha, d, grad, g, res, t0, tol=tol, growth=RES_GROWTH_MAX,
                               interpolate=True, known=trial)
            # A capped step taken whole says the cap, not the model, limited it: when the rows
            # that must move are heavy (inv_c << max inv_c, e.g. forget rows at lam = 1e-8) the
            # solution lies ~1 / inv_c away, and a fixed cap would need a million passes. Unless
            # it raised the residual: then the model did not hold that far (confident rows
            # flipped between classes), and the cap shrinks around the move taken, as it does
            # after a shortened step (CAP_SHRINK_ON_RISE).
            if out is not None and spread > 0:
                moved = out[5] * spread
                if out[4] > res:
                    cap = min(cap, max(CAP_SHRINK_ON_RISE * moved, CAP_FLOOR))
                elif out[5] < t0:
                    cap = min(cap, max(CAP_AFTER_BACKTRACK * moved, CAP_FLOOR))
                elif t0 < t_next:
                    cap *= 8.0
            if out is not None and out[5] >= t0 >= 1.0:
                # Full (or longer) steps that gain the same factor pass after pass are the
                # exponential tail (a forget row's mass on a class decaying like exp(-alpha)
                # towards ~0), where a step t gains e^t: double the next step. Anything else
                # (a damped step, quadratic convergence) returns to t = 1.
                rho = (out[4] / res) ** (1.0 / out[5]) if res > 0 else 0.0
                tail = (TAIL_RHO[0] <= rho <= TAIL_RHO[1] and rho_prev > 0
                        and abs(math.log(rho / rho_prev)) < math.log(1.5))
                t_next = min(2.0 * out[5], MAX_EXTRAPOLATION) if tail else 1.0
                rho_prev = rho
            else:
                t_next, rho_prev = 1.0, 0.0
            if out is None or out[5] < t0:
                res_prev = math.inf  # a damped step says nothing of the rate
        elif method == "sinkhorn":
            colsum = np.maximum(grad + m, 1e-300)
            d = c_bar * (np.log(colsum) - np.log(m_safe))
            d = np.where(m > 0, d, np.where(colsum > 1e-300, 50.0 * c_bar, 0.0))
            d = d - d.mean()
            out = _line_search(ev, alpha, d, grad, g, res, tol=tol)
        else:
            a_new = alpha + eta * grad
            grad_n, g_n, h_n, res_n = ev(a_new)
            out = (a_new, grad_n, g_n, h_n, res_n, 1.0)
        stale_diag = method == "newton" and h is not None and h.ndim == 1 and ev.hessian is True
        if out is None and ev.passes < max_iter and (
                (sampled and ev.hessian is True) or _may_escalate_diag(ev) or stale_diag):
            # The sampled (or diagonal) Hessian may be what failed: evaluate the exact (or the
            # dense) one here and go on. (stale_diag: the direction that failed came from the
            # diagonal of the pass before a stall's escalation; try the dense one first.)
            if ev.hessian == "diag":
                sampled, exact_below = _escalate_diag(ev)
                recent = recent[-1:]
            elif not stale_diag:
                ev.hessian = "exact"
            grad, g, h, res = ev(alpha)
            t_next, rho_prev, res_prev = 1.0, 0.0, math.inf
            continue
        if out is None:
            if ev.passes < max_iter:
                cdt = compute_dtype(ev.log_p.dtype)
                why = (f"tol near the {str(cdt).split('.')[-1]} precision floor "
                       f"{TOL_FLOOR[cdt]:g}?" if res <= 100 * TOL_FLOOR[cdt] else
                       f"far above the {str(cdt).split('.')[-1]} precision floor: extreme row "
                       f"weights (lam), or marginals that P^ can barely meet?")
                message = ("line search failed: no step improves the dual or the residual "
                           f"({why})")
            break
        alpha, grad, g, h_new, res, t_taken = out
        h = h if h_new is None else h_new
        recent.append((res, t_taken >= 1.0))
        stalled = (len(recent) > 2 and res > STALL_RATIO * recent[-3][0]
                   and (res < STALL_DAMPED_BELOW or (recent[-1][1] and recent[-2][1])))
        if stalled and _may_escalate_diag(ev):
            sampled, exact_below = _escalate_diag(ev)
            recent = recent[-1:]  # the dense Hessian's own stall count starts here
            t_next, rho_prev, res_prev = 1.0, 0.0, math.inf  # the diagonal's rate says nothing
        elif (res <= exact_below or (sampled and stalled)) and ev.hessian is True:
            ev.hessian = "exact"
        alpha = _centred(alpha)
        if res < best[0]:
            best = (res, alpha, g)
        # The passes counted include rejected line-search trials: a solve whose few accepted,
        # damped steps still lowered the residual slowly can hand over too (see docs/solver.md).
        if hand_over and res > tol and _float32_stall(ev.history, STALL_DAMPED_BELOW):
            message = (f"residual not halved in {STALL_WINDOW} passes below "
                       f"{STALL_DAMPED_BELOW:g}, where float32 rounding can stall Newton")
            break
    converged = res <= tol
    if not converged:
        if capacity is not None:
            capacity()
        if not message:
            message = f"reached max_iter={max_iter} passes"
            if f32_newton and _float32_stall(ev.history, 100 * TOL_FLOOR[torch.float32]):
                message += (f" (stalled for {STALL_WINDOW} passes near the float32 precision "
                            f"floor; a float64 input is solved in float64)")
        if best[0] < res:
            # Never hand back an iterate worse than one already seen.
            res, alpha, g = best
            message += f"; returning the iterate with the smallest residual ({res:.3g})"
    return RefineInfo(iterations=ev.passes, converged=converged, residual=res,
                      history=ev.history, dual_value=g, alpha=torch.from_numpy(alpha),
                      method=method, backend=backend.name,
                      seconds=time.perf_counter() - t_start, message=message, steps=ev.steps,
                      materialized=materialized, solve_dtype=compute_dtype(ev.log_p.dtype))


def _warn_not_converged(info: RefineInfo, tol: float) -> None:
    warnings.warn(f"ppu_fast: {info.method} did not converge: {info.message}; residual "
                  f"{info.residual:.3g} > tol {tol:.3g} after {info.iterations} passes (see "
                  f"info.converged)", ConvergenceWarning, stacklevel=caller_stacklevel())


def float64_retry_applies(method: str, log_p: torch.Tensor) -> bool:
    """Whether :func:`solve_again_in_float64` may follow a Newton solve of ``log_p`` (N x k)
    that does not converge: a float32 evaluation (float32 or 16-bit input) of at most
    ``FLOAT64_RETRY_MAX_ELEMENTS`` entries. The caller then solves with ``warn=False``."""
    return (method == "newton" and compute_dtype(log_p.dtype) == torch.float32
            and 0 < log_p.numel() <= FLOAT64_RETRY_MAX_ELEMENTS)


def float64_backend(backend: Backend, log_p64: torch.Tensor) -> Backend:
    """``backend`` where it solves the float64 ``log_p64`` (cpu, torch), else the torch reference
    on the same device (the GPU kernels compute in float32)."""
    if not backend.not_supported_reasons(log_p64):
        return backend
    from .backends import load
    return load("torch")[0]  # type: ignore[return-value]


def solve_again_in_float64(backend: Backend, log_p64: torch.Tensor, inv_c64: torch.Tensor,
                           marginals: torch.Tensor, first: RefineInfo, *, tol: float,
                           max_iter: Optional[int]) -> RefineInfo:
    """Newton on ``log_p64`` (N x k) and ``inv_c64`` (N,), the float32 problem of ``first``
    (a solve that did not converge, see :func:`float64_retry_applies`) widened to float64 (in
    the same solver scale of the weights), on ``backend`` (one that solves float64, see
    :func:`float64_backend`), from ``first``'s alpha when its residual is below the one it
    started from (else from alpha = 0). The info returned counts both solves' passes and
    histories, and keeps the better iterate: the float64 one unless it ends above ``first``'s.
    Warns with :class:`ConvergenceWarning` when ``tol`` is still not reached. Not for a sharded
    solve, whose ranks must all take the same path."""
    t_start = time.perf_counter()
    # From the float32 solve's best iterate when it got anywhere (its residual below the one
    # at alpha = 0): a solve that stopped near tol, or only at max_iter, had found the basin, and
    # starting over spent the float64 solve's first passes finding it again (the float32-stall
    # family of tests/test_precision.py: 2,665 -> 2,315 passes over 30 seeds on cpu; the solver
    # sets' rare120 3,789 -> 3,704, the other sets, which never retry, unchanged).
    warm = first.alpha is not None and bool(first.history) and first.residual < first.history[0]
    again = solve_dual(backend, log_p64, inv_c64, marginals, method="newton", tol=tol,
                       max_iter=max_iter, warn=False, alpha0=first.alpha if warm else None)
    head = (f"float32 Newton stopped after {first.iterations} passes at residual "
            f"{first.residual:.3g} ({first.message}); solved again in float64 from the same "
            f"log P^ and weights" + ("" if backend.name == first.backend else
                                     f" by the {backend.name} backend"))
    if again.converged:
        tail = f": converged in {again.iterations} passes"
    elif again.residual <= first.residual:
        tail = f": {again.message}"
    else:
        tail = (f": {again.message}; returning the float32 iterate, whose residual "
                f"{first.residual:.3g} is the smaller")
        again.alpha, again.residual, again.dual_value, again.solve_dtype = (
            first.alpha, first.residual, first.dual_value, first.solve_dtype)
    again.message = head + tail
    again.iterations += first.iterations
    again.steps += first.steps
    again.history = first.history + again.history
    again.seconds = first.seconds + time.perf_counter() - t_start
    if not again.converged:
        _warn_not_converged(again, tol)
    return again
