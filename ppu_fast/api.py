"""Public entry points: ``refine`` (probabilities in, refined targets out), ``solve`` and ``targets``
(the low-level pair for front ends that build their own P^ and weights).

A ``refine`` reads the input once (the backend's ``prepare``: validation, log P^, the column sums
behind the targets and the solver's first evaluation), reads the solver's buffer once per further
solver pass, and overwrites that buffer with Q once: nothing else touches the N x k data.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import problem as pb
from .backends import check_backend_name, get_backend
from .backends.cpu import empty_buffer
from .caller_state import caller_stacklevel
from .problem import ArrayLike, ForgetSpec, MarginalsSpec, PseudoSpec, WeightsSpec
from .solver import (FinalPass, RefineInfo, check_options, check_tol_floor, gauge_for_kernels,
                     float64_backend, float64_retry_applies, hessian_mode, solve_again_in_float64,
                     solve_dual)
from .torch_defaults import cpu_default_device



@cpu_default_device
def refine(probs: Optional[ArrayLike] = None, forget_mask: Optional[ForgetSpec] = None, *,
           logits: Optional[ArrayLike] = None, lam: float = 1.0, pseudo: PseudoSpec = "uniform",
           marginals: MarginalsSpec = "retain", method: str = "newton", tol: float = 1e-6,
           max_iter: Optional[int] = None, backend: str = "auto",
           generator: Optional[torch.Generator] = None, return_info: bool = False,
           step_size: Optional[float] = None, out: Optional[ArrayLike] = None,
           weights: WeightsSpec = None,
           process_group: Optional["torch.distributed.ProcessGroup"] = None,
           ) -> Union[ArrayLike, Tuple[ArrayLike, RefineInfo]]:
    """Refine a model's training-set probabilities into PPU targets.

    Replaces the forget rows of P by pseudo-probabilities (P^), then solves
    ``min_Q sum_i c_i KL(q_i || p^_i)`` with row sums 1 and column sums M (c_i = 1 on forget
    rows, ``lam`` on retain rows, or ``weights``).

    Args:
        probs: probabilities (N x k), rows on the simplex; or pass ``logits`` instead.
        forget_mask: the rows to forget: a bool mask (N,) (tensor, array or list of bools) or
            integer row indices (negative ones count from the end); an integer 0/1 vector of
            length N is refused as ambiguous.
        logits: raw model outputs (N x k); log-softmax is taken inside.
        lam: weight of the retain rows, in [1e-30, 1e30] (forget rows weigh 1).
        pseudo: what replaces the forget rows: "uniform"; "random" (softmax of standard-normal
            draws: the paper says softmax of "randomly generated numbers", the standard normal
            is ppu_fast's choice); "random-simplex" (uniform(0, 1) draws divided by their sum, as
            the official PPU code; not uniform on the simplex); "prior" (the mean of the retain
            rows' probabilities: with ``marginals="retain"`` P^ already meets the targets, so
            Q = P^ and the refine changes nothing); probabilities (N_forget x k), row j for
            the j-th index of ``forget_mask`` (for a bool mask: the forget rows in order); or None:
            the input's forget rows already hold their pseudo-probabilities (the input is P^).
        marginals: the class totals M: "retain" (the retain rows' mix scaled to N), "original"
            (the input's totals; with ``pseudo=None`` these are P^'s totals), "pseudo" (P^'s own
            totals, the official PPU code's target) or class totals (k,) summing to N.
        weights: (N,) each row's KL weight c_i > 0 (tensor, array or list), replacing the
            1 / ``lam`` rule (e.g. the official notebook's 1 / entropy); not together with a
            ``lam`` other than 1. Each in [1e-250, 1e250], max / min at most 1e30.
        method: "newton" | "sinkhorn" | "gradient" (``step_size`` sets the gradient's eta).
            A float32 / 16-bit Newton solve of at most 2^22 entries that does not reach ``tol``
            is solved again in float64 from the same log P^ (``info.message`` says so).
        tol: stop when ``||colsum(Q) - M||_1 / N <= tol``.
        max_iter: most dual evaluations (passes over the matrix; default per method) of one
            solve: the float64 retry above has a budget of its own (``info.iterations`` counts
            both, so up to twice this).
        backend: "auto" or a backend name (see ``python -m ppu_fast.info``).
        generator: a CPU torch.Generator for ``pseudo="random"`` / ``"random-simplex"`` (also
            for GPU inputs: the pseudo rows are drawn on the CPU).
        return_info: also return a :class:`RefineInfo` (``info.timings`` breaks the call down).
        out: where to write Q (N x k, the input's dtype, device and kind: tensor or array), as
            torch's ``out=``: reusing a buffer saves allocating N x k memory (on a CPU a new
            result comes from ppu_fast's host cache, see :func:`ppu_fast.empty_host_cache`,
            else from pages the kernel must zero on their first touch, about one solver pass;
            a float16 / bfloat16 input still solves in a float32 buffer of its own, see
            Returns). It may be the input itself, which is then overwritten with Q (and, when
            a row of a float32 / float64 input fails validation, left partly overwritten: the
            one pass validates and writes).
        process_group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``): each
            rank passes its own rows (``probs`` / ``logits`` N_rank x k, ``forget_mask`` and
            ``weights`` over those rows, ``pseudo`` tensors for its forget rows) and gets its own
            rows of Q; every global quantity is all-reduced once per solver pass and every rank
            ends with the same ``info.alpha`` (docs/scaling.md). A rank may hold zero rows.

    Returns:
        Q (N x k) with the dtype and device of the input (numpy in, numpy out), or (Q, info);
        Q is ``out`` when it is given. A float16 / bfloat16 input is solved from log P^ held in
        float32 (an N x k float32 buffer beside the 16-bit result, freed on return: on a CPU
        into the host cache, see :func:`ppu_fast.empty_host_cache`) and only Q is rounded to
        its dtype (``info.output_residual``).
    """
    t0 = time.perf_counter()
    if (probs is None) == (logits is None):
        raise ValueError("probs, logits: pass exactly one of them (got "
                         f"{'both' if probs is not None else 'neither'})")
    name = "probs" if probs is not None else "logits"
    mode = name
    if process_group is not None:
        from .sharded import refine_sharded
        return refine_sharded(probs if probs is not None else logits, name, forget_mask,
                              process_group, out=out, weights=weights, return_info=return_info,
                              lam=lam, pseudo=pseudo, marginals=marginals, method=method,
                              tol=tol, max_iter=max_iter, backend=backend, generator=generator,
                              step_size=step_size)
    x, from_numpy = pb.to_tensor(probs if probs is not None else logits, name)
    n, k = pb.check_matrix(x, name)
    lam = pb.check_lam_weights(lam, weights is not None)
    method, tol, max_iter, step_size = check_options(method, tol, max_iter, step_size)
    sdt = pb.buffer_dtype(x.dtype)
    check_tol_floor(tol, sdt)
    c_user = None
    if weights is not None:
        c_user = pb.check_weights(weights, n).numpy()
    mask, pseudo = pb.forget_and_pseudo(forget_mask, n, pseudo)
    n_forget = int(np.count_nonzero(mask))
    kind, pseudo_t = pb.pseudo_log(pseudo, n_forget, k, generator, sdt)
    pb.check_marginals_arg(marginals, n, k)

    dev = x.device
    outarg = out
    user_out = pb.check_out(out, x, from_numpy)
    mask_dev = torch.from_numpy(mask).to(dev) if n_forget else None
    out, result = pb.refine_buffers(x, user_out)  # result: out itself but for a 16-bit input
    # Weights c = lam (retain), 1 (forget), scaled so the largest 1 / c is 1: the dual variable
    # then moves the most movable rows by O(1) for any lam (with 1 / lam itself, lam = 1e-40
    # overflowed float32). alpha_caller = alpha_solver * c_min.
    if c_user is not None:
        inv_c_np, c_min = pb.scaled_inv_weights(c_user, sdt)
        weight_sums = pb.weight_sums(inv_c_np)
    else:
        c_min = min(lam, 1.0)
        levels = np.array([c_min / lam, c_min], dtype=pb.inv_c_dtype(sdt))
        inv_c_np = pb.two_levels(mask, levels)
        weight_sums = pb.weight_sums_of_levels(levels, (n - n_forget, n_forget))
    inv_c = torch.from_numpy(inv_c_np).to(dev)
    be = get_backend(backend, out)
    # From the CPU: a GPU backend derives the forget rows' terms from it on the host.
    fill = pseudo_t if kind == "vector" and n_forget else None
    # With the forget rows known now, prepare's pass also gives the solver's first evaluation.
    final_rows = (n_forget == 0 or fill is not None or kind == "given") and k > 1
    hmode = hessian_mode(method, k) if k > 1 else False
    tol_rows = pb.row_sum_tol(x.dtype)
    t1 = time.perf_counter()
    # Rows the caller already replaced (pseudo=None) are read like the others: prepare then sums
    # every row as retained, and the forget rows' share is split off below from a gather of them.
    given = kind == "given" and n_forget > 0
    in_place = pb._overlaps(out, x)
    # Their sums are gathered before prepare, which overwrites the input when out= is the input.
    forget_given, retain_given = (pb.given_row_sums(x, mask_dev, mode) if given else (None, None))
    fill_buffer = functools.partial(be.prepare, x, mode, None if given else mask_dev, fill, out)
    prep = fill_buffer(inv_c if final_rows else None, hmode, tol_rows)
    pb.raise_row_error(prep.error, x, mode, name, tol_rows, overwritten=in_place)
    t2 = time.perf_counter()
    if k == 1:
        info = RefineInfo(iterations=0, converged=True, residual=0.0, history=[0.0],
                          dual_value=0.0, alpha=torch.zeros(1, dtype=torch.float64),
                          method=method, backend=be.name, seconds=time.perf_counter() - t0,
                          message="k == 1: the only distribution is [1]")
        q = torch.ones_like(x) if user_out is None else user_out.fill_(1.0)
        q = (outarg if outarg is not None else q.numpy()) if from_numpy else q
        return (q, info) if return_info else q
    colsum_retain, colsum_forget = prep.retain_sums, prep.forget_sums
    if given:
        colsum_forget = forget_given
        colsum_retain = (retain_given if retain_given is not None
                         else pb.retained_share(colsum_retain, colsum_forget))
    n_retain = n - n_forget
    pseudo_t, pseudo_colsum = pb.pseudo_totals(kind, pseudo_t, colsum_retain, colsum_forget,
                                               n_retain, n_forget, k, sdt)
    pseudo_rows = None
    if not final_rows:
        rows = pseudo_t.to(dev, out.dtype)
        pseudo_rows = rows.expand(n_forget, k) if rows.dim() == 1 else rows
        out[mask_dev] = pseudo_rows
    # With no retain rows, "retain" marginals fall back to P^'s own totals (then Q = P^).
    m = pb.target_marginals(marginals, colsum_retain, colsum_forget, n, k, pseudo_colsum)
    # A class has support in P^ when a retained row or a pseudo row gives it probability.
    pb.check_feasible((colsum_retain.numpy() > 0) | (pseudo_colsum.numpy() > 0), m)
    t3 = time.perf_counter()
    final = None
    if be.fused_materialize and not in_place:
        # The input is intact, so log P^ can be rebuilt if the last pass was mispredicted (a
        # pass that wrote Q elsewhere left it as it was).
        def restore() -> None:
            if result is not out:
                return
            fill_buffer(None, False, tol_rows)
            if pseudo_rows is not None:
                out[mask_dev] = pseudo_rows

        final = FinalPass(lambda a: be.materialize_sums(out, inv_c, a.to(dev), result), restore)
    retry = float64_retry_applies(method, out)
    info = solve_dual(be, out, inv_c, m, method=method, tol=tol, max_iter=max_iter,
                      step_size=step_size, first=prep.first, weight_sums=weight_sums,
                      capacity=lambda: pb.check_capacity(out, m, tol=tol), final=final,
                      warn=not retry, hand_over=retry)
    wide = None  # (log P^, 1 / c) in float64, once a float64 solve followed the float32 one
    if retry and not info.converged:
        # out still holds log P^ (no pass wrote Q: a written last pass converged).
        wide = (out.double(), inv_c.double())
        be = float64_backend(be, wide[0])
        info = solve_again_in_float64(be, *wide, m, info, tol=tol, max_iter=max_iter)
    t4 = time.perf_counter()
    if not info.materialized:
        alpha = torch.from_numpy(gauge_for_kernels(info.alpha.numpy())).to(dev)
        if wide is None:
            be.materialize(out, inv_c, alpha, result)
        else:
            # Q of the float64 solve is computed in float64 too: its float32 evaluation at the
            # same alpha missed the solver's residual by up to 6 %.
            be.materialize(*wide, alpha, wide[0])
            result.copy_(wide[0])
    _to_caller_scale(info, c_min)
    q = pb.result_tensor(result, user_out, x)
    if q.dtype in (torch.float16, torch.bfloat16):
        info.output_residual = _residual(q, m)
        info.message = (info.message + "; " if info.message else "") + (
            f"Q rounded to {q.dtype} has residual {info.output_residual:.3g} "
            f"(info.output_residual)")
    if from_numpy:
        q = outarg if outarg is not None else q.cpu().numpy()
    elif dev.type == "cuda":
        # The timings include the last pass: a separate materialize is still queued here.
        torch.cuda.synchronize(dev)
    t5 = time.perf_counter()
    info.timings = {"setup": t1 - t0, "prepare": t2 - t1, "targets": t3 - t2, "solve": t4 - t3,
                    "materialize": t5 - t4}
    info.seconds = t5 - t0
    return (q, info) if return_info else q


def check_refine_options(*, lam: object, marginals: object, method: object, tol: object,
                         backend: object) -> None:
    """:func:`refine`'s checks of these options that need no data (class totals given as a
    tensor are checked against the data later)."""
    pb.check_lam(lam)
    if isinstance(marginals, str):
        pb.check_marginals_arg(marginals, 0, 0)
    check_options(method, tol, None, None)
    check_backend_name(backend)


def _to_caller_scale(info: RefineInfo, c_min: float) -> None:
    """The solver ran on weights c / c_min: its alpha and dual value times c_min are the
    caller's (Q depends on alpha_j / c_i only)."""
    if c_min != 1.0:
        info.alpha = info.alpha * c_min
        info.dual_value = info.dual_value * c_min


def _residual(q: torch.Tensor, m: torch.Tensor) -> float:
    """``||colsum(Q) - M||_1 / N`` of a stored Q, summed in float64."""
    return float((pb.column_sums64(q).cpu() - m.double()).abs().sum()) / q.shape[0]


def _validated_log_p(log_p: ArrayLike, backend: str, inv_c: Optional[torch.Tensor] = None,
                     hessian=False):
    """(log_p in a solver dtype, came_from_numpy, the caller's dtype, backend, prepare's result):
    one ``prepare`` pass validates the rows (no NaN, no +inf, a finite entry per row) and, with
    ``inv_c``, gives the solver's first evaluation."""
    lp, from_numpy = pb.to_tensor(log_p, "log_p")
    pb.check_matrix(lp, "log_p")
    dtype = pb.solver_dtype(lp.dtype)
    out = None if lp.dtype == dtype else empty_buffer(lp.shape, dtype, lp.device)
    buf = lp if out is None else out
    be = get_backend(backend, buf)
    if inv_c is not None:
        inv_c = inv_c.to(lp.device)
    prep = be.prepare(lp, "log_p", None, None, out, inv_c, hessian)
    pb.raise_row_error(prep.error, lp, "log_p", "log_p", 0.0)
    return buf, from_numpy, lp.dtype, be, prep


@cpu_default_device
def solve(log_p: ArrayLike, weights: Union[ArrayLike, Sequence[float]],
          marginals: Union[ArrayLike, Sequence[float]], *, method: str = "newton",
          tol: float = 1e-6, max_iter: Optional[int] = None, backend: str = "auto",
          step_size: Optional[float] = None,
          process_group: Optional["torch.distributed.ProcessGroup"] = None,
          ) -> Tuple[ArrayLike, RefineInfo]:
    """Solve the dual for a caller-built problem.

    Args:
        log_p: log P^ (N x k); rows need not be normalised (a per-row shift changes nothing
            in exact arithmetic; in float32 keep rows within ~100 of normalised: a shift of
            1,000 costs the solve about 1e-5 of residual); -inf marks zero probabilities.
        weights: c (N,), > 0 (tensor, array or list): the weight of each row's KL term; each
            in [1e-250, 1e250], max / min at most 1e30.
        marginals: M (k,), >= 0, summing to N (tensor, array or list).
        method, tol, max_iter, backend, step_size: as for :func:`refine`.
        process_group: a ``torch.distributed`` process group: each rank passes its own rows of
            ``log_p`` and ``weights`` and the same global ``marginals`` (summing to the total N
            over the ranks); every rank gets the same alpha (docs/scaling.md).

    Returns:
        (alpha (k,) float64 on log_p's device, or a numpy array for numpy log_p; info), with
        ``info.alpha`` the same as a CPU tensor. ``targets(log_p, weights, alpha)`` gives Q.
    """
    t0 = time.perf_counter()
    if process_group is not None:
        from .sharded import solve_sharded
        return solve_sharded(log_p, weights, marginals, process_group, method=method, tol=tol,
                             max_iter=max_iter, backend=backend, step_size=step_size)
    n, k = pb.check_matrix(pb.to_tensor(log_p, "log_p")[0], "log_p")
    method, tol, max_iter, step_size = check_options(method, tol, max_iter, step_size)
    sdt = pb.solver_dtype(pb.to_tensor(log_p, "log_p")[0].dtype)
    check_tol_floor(tol, sdt)
    c = pb.check_weights(weights, n)
    m = pb.check_marginals(marginals, n, k)
    inv_c_np, c_min = pb.scaled_inv_weights(c.numpy(), sdt)
    inv_c = torch.from_numpy(inv_c_np)
    lp, from_numpy, _, be, prep = _validated_log_p(log_p, backend, inv_c, hessian_mode(method, k))
    pb.check_feasible(prep.support, m)
    retry = float64_retry_applies(method, lp)
    info = solve_dual(be, lp, inv_c.to(lp.device), m, method=method, tol=tol,
                      max_iter=max_iter, step_size=step_size, first=prep.first,
                      weight_sums=pb.weight_sums(inv_c_np),
                      capacity=lambda: pb.check_capacity(lp, m, "marginals", tol=tol),
                      warn=not retry)
    if retry and not info.converged:
        lp64 = lp.double()
        info = solve_again_in_float64(float64_backend(be, lp64), lp64,
                                      inv_c.to(lp.device).double(), m, info, tol=tol,
                                      max_iter=max_iter)
        if info.solve_dtype == torch.float64:
            # targets() evaluates a float32 log_p in float32, where this alpha is not the
            # solution (a Q 1e-5 to 1e-1 off the targets, where the float64 one met tol).
            hint = ("alpha was solved in float64 (info.solve_dtype): pass log_p in float64 to "
                    "targets() for its Q; a float32 evaluation misses the targets")
            info.message += "; " + hint
            if info.converged:
                warnings.warn(f"ppu_fast.solve: {hint}", UserWarning,
                              stacklevel=caller_stacklevel())
    _to_caller_scale(info, c_min)
    info.seconds = time.perf_counter() - t0
    alpha = info.alpha.clone().numpy() if from_numpy else info.alpha.to(lp.device)
    return alpha, info


@cpu_default_device
def targets(log_p: ArrayLike, weights: Union[ArrayLike, Sequence[float]],
            alpha: Union[ArrayLike, Sequence[float]], *, backend: str = "auto") -> ArrayLike:
    """Q(alpha) (N x k): ``q_ik = softmax_k(log_p_ik - alpha_k / c_i)``, in log_p's dtype (float64
    computed in float64, the others in float32) and device; numpy in, numpy out.

    Args:
        log_p: log P^ (N x k), as for :func:`solve`.
        weights: c (N,) > 0 (tensor, array or list), as for :func:`solve`.
        alpha: the dual variables (k,), finite (tensor, array or list), e.g. from :func:`solve`;
            for a log_p evaluated in float32 (float32 or 16-bit), within float32's range after
            the median is taken off and it is divided by min(c).
        backend: as for :func:`refine`.

    For an alpha that ``solve`` found in float64 from a float32 log_p (``info.solve_dtype``;
    ``solve`` warns), pass log_p in float64: this alpha is not the float32 problem's solution.
    ``targets(log_p, c, info.alpha)`` reproduces ``refine``'s Q to rounding, except at extreme
    weight ratios: alpha is returned in the caller's scale, where rows of small ``c`` see
    ``alpha / c``, so one float64 rounding of alpha moves their logits by about 1e-16 / min(c)
    (Q differs by ~5e-6 at ``lam=1e-12``, both within the solver's tol).
    """
    n, k = pb.check_matrix(pb.to_tensor(log_p, "log_p")[0], "log_p")
    c = pb.check_weights(weights, n)
    a = pb.real_vector(alpha, "alpha")
    if a.shape != (k,):
        raise ValueError(f"alpha: shape {tuple(a.shape)}; expected ({k},)")
    a = a.double()
    if not bool(torch.isfinite(a).all()):
        j = int(torch.nonzero(~torch.isfinite(a))[0, 0])
        raise ValueError(f"alpha: entry {j} is {float(a[j])}; expected finite dual variables")
    lp, from_numpy, orig_dtype, be, _ = _validated_log_p(log_p, backend)
    inv_c_np, c_min = pb.scaled_inv_weights(c.numpy(), lp.dtype)
    # The kernels see alpha / c_min against 1 / c scaled to a largest value of 1 (as solve does).
    with np.errstate(invalid="ignore"):  # inf - inf: refused below, not warned about
        a_k = gauge_for_kernels((a / c_min).numpy())
    # The kernels take alpha / c_min in their compute dtype (float32 for a float32 or 16-bit
    # log_p): past its range it turns into +-inf, and inf - inf made every entry of Q NaN
    # without a word (in float64 too, once the division overflows).
    wide = lp.dtype == torch.float64
    limit = float(np.finfo(np.float64).max) if wide else float(torch.finfo(torch.float32).max)
    if not float(np.abs(a_k).max()) <= limit:
        spread = float(np.abs(gauge_for_kernels(a.numpy())).max())
        raise ValueError(f"alpha: its entries differ from their median by up to {spread:.3g}, "
                         f"which divided by min(weights) = {c_min:.3g} is beyond "
                         f"{'float64' if wide else 'float32'}'s range, in which a "
                         f"{str(orig_dtype).split('.')[-1]} log_p is evaluated; expected "
                         f"|alpha_j - median(alpha)| / min(c) <= {limit:.3g}"
                         + ("" if wide else ", or a float64 log_p"))
    a = torch.from_numpy(a_k).to(device=lp.device)
    inv_c = torch.from_numpy(inv_c_np).to(lp.device)
    out = empty_buffer(lp.shape, lp.dtype, lp.device)
    be.materialize(lp, inv_c, a, out)
    q = out.to(orig_dtype)
    return q.cpu().numpy() if from_numpy else q
