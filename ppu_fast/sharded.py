"""Refine over rows held in pieces: row chunks streamed from a file, and row shards on the
processes of a ``torch.distributed`` group (docs/scaling.md).

The dual has k variables, so a solver pass only needs sums over rows: the column sums of Q, the
weighted log Z and the Hessian's pieces. :class:`ShardedBackend` computes them chunk by chunk
with an ordinary backend (cpu, cuda, triton, torch), adds the chunks' partial sums in float64 in
row order, and all-reduces them across the group once per pass; :func:`solver.solve_dual` runs
on every rank with the same reduced numbers, so every rank ends with the same alpha. The rows'
storage is a :class:`RowStore` (:class:`MemoryStore` here, ``stream.FileStore`` for ``.npy``
files).

The Newton Hessian keeps the single-process definition exactly: its diagonal is summed over every
row, its off-diagonal part over the 16-row blocks ``b`` with ``b % hessian_stride(N, k) == 0`` of
the *global* row numbering (the rows a chunk holds of that sample are gathered and their
``inv_c q q^T`` summed here), so the solver takes the same path for any chunking or sharding.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from . import problem as pb
from .backends import get_backend
from .backends.cpu import empty_buffer
from .backends.base import (Backend, StepOut, assemble_hessian, compute_dtype,
                            hessian_sample_rows, hessian_stride)
from .comm import Comm, collective_checks, global_rows
from .solver import (RefineInfo, _one_blas_thread, check_options, check_tol_floor,
                     gauge_for_kernels, hessian_mode, solve_dual)


class RowStore:
    """Where a sharded solve's local rows live (the interface :class:`ShardedBackend` and
    :func:`refine_rows` use): ``shape`` (local N, k), ``dtype`` (the solver buffer's),
    ``device`` (where the kernels run) and three ways of visiting the rows chunk by chunk, in
    row order, each chunk a ``(start, stop, ...)`` of local row numbers."""

    shape: Tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def input_chunks(self) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(start, stop, x rows, buffer rows to write log P^ into); written back after each."""
        raise NotImplementedError

    def buffer_chunks(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """(start, stop, buffer rows) to read."""
        raise NotImplementedError

    def update_chunks(self, want: Optional[Callable[[int, int], bool]] = None
                      ) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """(start, stop, buffer rows) to modify in place (written back after each); only the
        chunks for which ``want(start, stop)`` is true."""
        raise NotImplementedError

    def result_chunks(self, want: Optional[Callable[[int, int], bool]] = None
                      ) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(start, stop, buffer rows, rows to write Q into), as :meth:`update_chunks`: Q
        replaces log P^ in the buffer, unless the store keeps Q apart (a 16-bit result of a
        float32 buffer)."""
        for s, e, b in self.update_chunks(want):
            yield s, e, b, b


class MemoryStore(RowStore):
    """Rows in memory: the input ``x`` and the solver's buffer ``buf`` (N x k tensors on one
    device, ``buf`` may be ``x``), visited as views of ``chunk_rows`` rows (default: all);
    ``result``: where Q goes when not into ``buf``."""

    def __init__(self, x: torch.Tensor, buf: torch.Tensor, chunk_rows: Optional[int] = None,
                 result: Optional[torch.Tensor] = None) -> None:
        self.x, self.buf, self.result = x, buf, result
        self.shape = tuple(buf.shape)
        self.dtype, self.device = buf.dtype, buf.device
        self.chunk_rows = max(1, chunk_rows or self.shape[0] or 1)

    def _ranges(self):
        n = self.shape[0]
        for s in range(0, n, self.chunk_rows):
            yield s, min(n, s + self.chunk_rows)

    def input_chunks(self):
        for s, e in self._ranges():
            yield s, e, self.x[s:e], self.buf[s:e]

    def buffer_chunks(self):
        for s, e in self._ranges():
            yield s, e, self.buf[s:e]

    def update_chunks(self, want=None):
        for s, e in self._ranges():
            if want is None or want(s, e):
                yield s, e, self.buf[s:e]

    def result_chunks(self, want=None):
        if self.result is None:
            yield from super().result_chunks(want)
            return
        for s, e in self._ranges():
            if want is None or want(s, e):
                yield s, e, self.buf[s:e], self.result[s:e]


def sampled_gram(be: Backend, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                 first_row: int, n: int, k: int) -> Optional[torch.Tensor]:
    """``W = sum inv_c_i q_i q_i^T`` (k x k float64, on log_p's device) over the rows of this
    chunk (global rows ``first_row ..``) that belong to the Hessian's row sample of the whole
    N-row problem (``base.hessian_sample_rows``); None when it holds none. Q is materialised by
    ``be`` for those rows only, in the compute dtype, and multiplied in float64."""
    idx = hessian_sample_rows(n, hessian_stride(n, k), first_row, first_row + log_p.shape[0],
                              device=log_p.device)
    if idx.numel() == 0:
        return None
    lp = log_p.index_select(0, idx)
    ic = inv_c.index_select(0, idx).contiguous()
    q = torch.empty(lp.shape, dtype=compute_dtype(log_p.dtype), device=log_p.device)
    be.materialize(lp, ic, alpha, q)
    if q.device.type == "cpu":
        # numpy's BLAS on one thread: a torch GEMM here left torch's worker threads spinning,
        # and the C++ kernel's next pass took 1.3x as long (threaded OpenBLAS does the same).
        # In the compute dtype, as the kernels accumulate their own sampled products.
        qn = q.numpy()
        with _one_blas_thread():
            w = (qn * ic.numpy().astype(qn.dtype)[:, None]).T @ qn
        return torch.from_numpy(w.astype(np.float64))
    qd = q.double()
    return (qd * ic.double()[:, None]).T @ qd


class Rows:
    """What the solver reads of its matrix when the rows are sharded: the global shape, the
    buffer's dtype and the device the kernels run on (``solve_dual`` passes it to ``step``)."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (n, k)
        self.dtype, self.device = dtype, device


class ShardedBackend(Backend):
    """The backend contract's ``step`` over a :class:`RowStore` and a process group: the inner
    backend's step per chunk, the partial sums added in float64 in row order, then one
    all-reduce per pass. ``materialize`` is per chunk and needs no communication (see
    :func:`materialize_store`)."""

    def __init__(self, inner: Backend, store: RowStore, inv_c: torch.Tensor, comm: Comm,
                 offset: int, n: int, k: int,
                 progress: Optional[Callable[[Iterator], Iterator]] = None) -> None:
        self.inner, self.store, self.inv_c, self.comm = inner, store, inv_c, comm
        self.offset, self.n, self.k = offset, n, k
        self.name = inner.name
        self.progress = progress or (lambda it: it)
        self.reduce_seconds = 0.0

    def not_supported_reasons(self, log_p) -> List[str]:
        return self.inner.not_supported_reasons(log_p)

    def step(self, log_p, inv_c, alpha: torch.Tensor, hessian=False) -> StepOut:
        """``(colsum, wlogz, H)`` over every row of every rank (``log_p`` and ``inv_c`` are the
        solver's :class:`Rows` stand-ins and are not read)."""
        k, dev = self.k, self.store.device
        alpha = alpha.to(dev)
        inner_h = "diag" if hessian is True else hessian
        acc = Accumulator(k, hessian, dev)
        for s, e, lp in self.progress(self.store.buffer_chunks()):
            ic = self.inv_c[s:e]
            c, z, h = self.inner.step(lp, ic, alpha, inner_h)
            w = (sampled_gram(self.inner, lp, ic, alpha, self.offset + s, self.n, k)
                 if hessian is True else None)
            acc.add(c, z, h, w)
        return acc.reduce(self.comm, self)

    def materialize(self, log_p, inv_c, alpha, out):
        raise NotImplementedError("a sharded solve materialises per chunk (materialize_store)")


class Accumulator:
    """Float64 partial sums of ``step`` results, added in the order given (on ``device``), packed
    as ``[colsum (k), wlogz, d (k) | H (k*k)..., W (k*k)]`` for one all-reduce."""

    def __init__(self, k: int, hessian, device: torch.device) -> None:
        self.k, self.hessian = k, hessian
        hk = {False: 0, None: 0, "diag": k, "exact": k * k}.get(hessian, k + k * k)
        self.buf = torch.zeros(k + 1 + hk, dtype=torch.float64, device=device)

    def add(self, colsum, wlogz, h, w=None) -> None:
        k, b = self.k, self.buf
        b[:k] += colsum.to(b.device)
        b[k] += wlogz.to(b.device)
        if self.hessian in (False, None):
            return
        if self.hessian == "exact":
            b[k + 1:] += h.to(b.device).reshape(-1)
            return
        b[k + 1:2 * k + 1] += h.to(b.device)
        if self.hessian is True and w is not None:
            b[2 * k + 1:] += w.to(b.device).reshape(-1)

    def reduce(self, comm: Comm, timer=None) -> StepOut:
        """All-reduce over ``comm`` and unpack (on the CPU): ``(colsum, wlogz, H)``."""
        t = time.perf_counter()
        flat = comm.sum(self.buf) if comm.group is not None else self.buf.cpu()
        if timer is not None and comm.group is not None:
            timer.reduce_seconds += time.perf_counter() - t
        k = self.k
        colsum, wlogz = flat[:k].clone(), flat[k].clone()
        h = None
        if self.hessian == "diag":
            h = flat[k + 1:].clone()
        elif self.hessian == "exact":
            h = flat[k + 1:].reshape(k, k).clone()
        elif self.hessian is True:
            h = assemble_hessian(flat[k + 1:2 * k + 1].clone(), flat[2 * k + 1:].reshape(k, k))
        return colsum, wlogz, h


def refine_rows(store: RowStore, mask: np.ndarray, *, mode: str, name: str, in_dtype: torch.dtype,
                lam: float = 1.0, weights: Optional[np.ndarray] = None, pseudo="uniform",
                marginals="retain", method: str = "newton", tol: float = 1e-6,
                max_iter: Optional[int] = None, backend: str = "auto",
                generator: Optional[torch.Generator] = None, step_size: Optional[float] = None,
                comm: Optional[Comm] = None, where: str = "",
                progress: Optional[Callable[[Iterator, str], Iterator]] = None,
                first_row: int = 0) -> Tuple[RefineInfo, torch.Tensor]:
    """``refine`` over a :class:`RowStore`: the store's buffer ends holding Q. Returns (info, M).
    With ``mode="log_p"`` it is ``solve``: the store holds log P^ (validated, not changed),
    ``marginals`` must be class totals and the buffer is not materialised.

    ``mask`` (local N,) bool: this rank's forget rows; ``weights`` (local N,) float64 or None;
    ``in_dtype``: the input's dtype (row-sum tolerance); ``where``: what an error names after the
    argument (the file, the rank), e.g. " on rank 1"; ``first_row``: the store's first row in
    what the caller numbers (a file range's start), added to reported rows.
    Every option has :func:`ppu_fast.refine`'s meaning; with a ``comm`` over several processes
    every global quantity is all-reduced, and every rank returns the same alpha.
    """
    t0 = time.perf_counter()
    comm = comm or Comm(None)
    bar = progress or (lambda it, desc: it)
    n_local, k = store.shape
    n, offset = global_rows(comm, n_local, k, name)
    if n == 0:
        raise ValueError(f"{name}: N == 0 rows on every rank; expected at least one row"
                         if comm.group is not None else
                         f"{name}{where}: N == 0 rows; expected at least one row")

    sdt, dev = store.dtype, store.device
    rounded = in_dtype in (torch.float16, torch.bfloat16) and mode != "log_p"

    def checks():
        # Every argument check of this rank, in one collective: a bad argument on one rank
        # raises on every rank instead of leaving the others waiting in the next collective.
        lam_ = pb.check_lam_weights(lam, weights is not None)
        opts = check_options(method, tol, max_iter, step_size)
        check_tol_floor(opts[1], sdt)
        pb.check_marginals_arg(marginals, n, k)
        be_ = get_backend(backend, torch.empty((1, k), dtype=sdt, device=dev), shape=(n, k))
        pseudo_ = pb.pseudo_log(pseudo, int(np.count_nonzero(mask)), k, generator, sdt)
        return lam_, opts, be_, pseudo_

    def agreed(result) -> dict:
        # What every rank must pass alike: it sets the one problem all ranks solve together
        # (and which collectives run). "_rounded" is gathered so that all ranks know whether
        # any rank's Q is rounded to 16 bits.
        lam_, opts, _, _ = result
        return {"weights": "given" if weights is not None else None,
                "lam": lam_, "method": opts[0], "tol": opts[1], "max_iter": opts[2],
                "step_size": opts[3],
                "pseudo": (pseudo if pseudo is None or isinstance(pseudo, str)
                           else "rows given as an array"),
                "marginals": (marginals if isinstance(marginals, str) else
                              tuple(np.asarray(torch.as_tensor(marginals).detach().cpu(),
                                               dtype=np.float64).ravel().tolist())),
                "_rounded": rounded, "_f64": compute_dtype(sdt) == torch.float64,
                "_first": sdt in (torch.float32, torch.float64)}

    (lam, (method, tol, max_iter, step_size), be, (kind, pseudo_t)), every = collective_checks(
        comm, checks, agreed)
    any_rounded = any(d["_rounded"] for d in every)
    # Ranks may hold different dtypes, but the solver's dtype-dependent choices (the dual's
    # rounding noise, the exact Hessian below 1e-6, whether prepare gives the first evaluation)
    # decide how many collectives run: every rank makes them for the coarsest rank's dtype. (Made
    # per rank, a float32 and a float64 rank once stopped a pass apart and waited on each other.)
    solver_dt = torch.float64 if all(d["_f64"] for d in every) else torch.float32
    inv_c_np, c_min, weight_sums, n_forget = _scaled_weights(comm, mask, weights, lam, sdt,
                                                             solver_dt)
    inv_c = torch.from_numpy(inv_c_np).to(dev)
    mask_dev = torch.from_numpy(mask).to(dev)
    fill = pseudo_t if kind == "vector" else None  # from the CPU, as refine's (base.prepare)
    # Every rank takes the same branch: decided from global counts only.
    final_rows = (n_forget == 0 or kind in ("vector", "given")) and k > 1
    hmode = hessian_mode(method, k) if k > 1 else False
    # prepare's first evaluation exists for float32 / float64 buffers (base.PrepareOut): used
    # only where every rank's buffer gives it, so every rank, the empty ones too, agrees on
    # whether it is reduced.
    first = final_rows and (mode == "log_p" or all(d["_first"] for d in every))
    tol_rows = pb.row_sum_tol(in_dtype)
    t1 = time.perf_counter()

    setup = _Setup(store, be, mode, name, mask, mask_dev, inv_c, kind, pseudo_t, fill,
                   final_rows, first, hmode, tol_rows, where, first_row, offset, n)
    retain, forget, rows_sum, support, first_acc, message, wrote = _input_pass(setup, bar)
    _raise_input_error(comm, message, wrote)
    solve_only = mode == "log_p"
    if k == 1 and not solve_only:
        for s, e, _, res in store.result_chunks():
            res.fill_(1.0)
        info = RefineInfo(iterations=0, converged=True, residual=0.0, history=[0.0],
                          dual_value=0.0, alpha=torch.zeros(1, dtype=torch.float64),
                          method=method, backend=be.name, seconds=time.perf_counter() - t0,
                          message="k == 1: the only distribution is [1]")
        return info, torch.tensor([float(n)], dtype=torch.float64)
    packed = comm.sum(torch.cat([retain.cpu(), forget.cpu(), rows_sum]))
    colsum_retain, colsum_forget, rows_colsum = packed[:k], packed[k:2 * k], packed[2 * k:]
    first = first_acc.reduce(comm) if first_acc is not None else None
    t2 = time.perf_counter()
    if solve_only:
        m = pb.check_marginals(marginals, n, k)
        pb.check_feasible(comm.max(support) > 0, m)
        pseudo_colsum = None
    else:
        pseudo_t, pseudo_colsum = pb.pseudo_totals(kind, pseudo_t, colsum_retain, colsum_forget,
                                                   n - n_forget, n_forget, k, solver_dt,
                                                   rows_colsum if kind == "rows" else None)
    if kind == "prior" and n_forget:
        prior = pseudo_t.to(dev, sdt)
        for s, e, buf in bar(store.update_chunks(lambda s, e: bool(mask[s:e].any())), "prior"):
            buf[mask_dev[s:e]] = prior
    if not solve_only:
        m = pb.target_marginals(marginals, colsum_retain, colsum_forget, n, k, pseudo_colsum)
        pb.check_feasible((colsum_retain > 0) | (pseudo_colsum > 0), m)
    t3 = time.perf_counter()
    sharded = ShardedBackend(be, store, inv_c, comm, offset, n, k,
                             progress=lambda it: bar(it, "solve"))

    def capacity() -> None:
        cap = torch.zeros(2 * k, dtype=torch.float64)
        for s, e, buf in store.buffer_chunks():
            a, b = pb.capacity_counts(buf)
            cap += torch.cat([a, b])
        cap = comm.sum(cap)
        pb.raise_if_over_capacity(cap[:k], cap[k:], m, n)

    info = solve_dual(sharded, Rows(n, k, solver_dt, dev), inv_c, m, method=method, tol=tol,
                      max_iter=max_iter, step_size=step_size, first=first,
                      weight_sums=weight_sums, capacity=capacity)
    t4 = time.perf_counter()
    alpha = torch.from_numpy(gauge_for_kernels(info.alpha.numpy())).to(dev)
    colsum_q = torch.zeros(k, dtype=torch.float64, device=dev)
    for s, e, buf, res in bar(store.result_chunks(lambda s, e: not solve_only), "materialize"):
        be.materialize(buf, inv_c[s:e], alpha, res)
        if any_rounded:  # every rank adds its rows of Q, rounded or not, to the one residual
            colsum_q += pb.column_sums64(res)
    if any_rounded:
        info.output_residual = float((comm.sum(colsum_q) - m).abs().sum()) / n
        what = (f"Q rounded to {in_dtype}" if rounded else
                "Q as the ranks return it (rounded to 16 bits on some)")
        info.message = (info.message + "; " if info.message else "") + (
            f"{what} has residual {info.output_residual:.3g} (info.output_residual)")
    if c_min != 1.0:
        info.alpha = info.alpha * c_min
        info.dual_value = info.dual_value * c_min
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)  # the timings include the materialize passes still queued
    t5 = time.perf_counter()
    info.timings = {"setup": t1 - t0, "prepare": t2 - t1, "targets": t3 - t2, "solve": t4 - t3,
                    "materialize": t5 - t4}
    if comm.group is not None:
        info.timings["allreduce"] = sharded.reduce_seconds
    info.seconds = t5 - t0
    return info, m


def _scaled_weights(comm: Comm, mask: np.ndarray, weights: Optional[np.ndarray], lam: float,
                    dtype: torch.dtype, solver_dtype: Optional[torch.dtype] = None):
    """(inv_c (local N,) numpy, c_min, (sum inv_c, max inv_c, sum 1 / inv_c, min inv_c), global
    forget count): the weights scaled so that the largest 1 / c over every rank is 1, as
    ``refine`` scales them. ``dtype``: this rank's buffer's; ``solver_dtype``: the one every
    rank's solver decides for (max and min inv_c are rounded to it, so that all ranks hold the
    same values)."""
    if weights is not None:
        lo_hi = comm.max(torch.tensor([-float(weights.min()) if weights.size else -np.inf,
                                       float(weights.max()) if weights.size else 0.0],
                                      dtype=torch.float64))
        c_min, c_max = -float(lo_hi[0]), float(lo_hi[1])
        if c_max / c_min > pb.WEIGHT_RATIO_MAX * (1 + 1e-6):
            raise ValueError(f"weights: max / min = {c_max / c_min:.3g} over all ranks; expected "
                             f"at most {pb.WEIGHT_RATIO_MAX:g}")
        inv_c = (c_min / weights).astype(pb.inv_c_dtype(dtype))
    else:
        c_min = min(lam, 1.0)
        inv_c = np.full(mask.size, c_min / lam, dtype=pb.inv_c_dtype(dtype))
        inv_c[mask] = c_min
    ic64 = inv_c.astype(np.float64)
    sums = comm.sum(torch.tensor([ic64.sum(), (1.0 / ic64).sum(), float(np.count_nonzero(mask)),
                                  float(mask.size)], dtype=torch.float64))
    n_forget, n_rows = int(round(float(sums[2]))), int(round(float(sums[3])))
    # The largest 1 / c over every rank follows from the global counts, with no collective of its
    # own: with weights it is c_min / c_min = 1 exactly, else the retain or forget value, rounded
    # to the dtype inv_c is stored in, as the rows hold it.
    # The smallest follows the same way (rounding is monotonic: the smallest stored c_min / c_i
    # is c_min / c_max rounded), in the dtype every rank's solver shares: the solver's choices
    # depend on it, and ranks holding float32 and float64 buffers must make the same ones.
    if weights is not None:
        ic_max = 1.0 if n_rows else 0.0
        ic_min = float(pb.inv_c_dtype(solver_dtype or dtype)(c_min / c_max)) if n_rows else 1.0
    else:
        ic_dt = pb.inv_c_dtype(solver_dtype or dtype)
        levels = ([float(ic_dt(c_min / lam))] if n_rows > n_forget else []) + (
            [float(ic_dt(c_min))] if n_forget else [])
        ic_max = max(levels, default=0.0)
        ic_min = min(levels, default=1.0)
    return inv_c, c_min, (float(sums[0]), ic_max, float(sums[1]), ic_min), n_forget


class _Setup(NamedTuple):
    """What the input pass of :func:`refine_rows` reads (fixed for the refine)."""

    store: RowStore
    be: Backend
    mode: str
    name: str
    mask: np.ndarray
    mask_dev: torch.Tensor
    inv_c: torch.Tensor
    kind: str
    pseudo_t: Optional[torch.Tensor]
    fill: Optional[torch.Tensor]
    final_rows: bool
    first: bool
    hmode: object
    tol_rows: float
    where: str
    first_row: int
    offset: int
    n: int


def _input_pass(su: _Setup, bar):
    """One pass over the input chunks: validate, write log P^ (and the pseudo rows given as
    rows), sum the retained / forgotten rows and, when the rows are final, the solver's first
    evaluation. Returns (retain sums, forget sums, the pseudo rows' sums, class support ("log_p"
    mode), the first evaluation's Accumulator or None, the first error's message or None);
    the sums are this rank's."""
    k, dev = su.store.shape[1], su.store.device
    solve_only, given = su.mode == "log_p", su.kind == "given"
    inner_h = "diag" if su.hmode is True else su.hmode
    retain = torch.zeros(k, dtype=torch.float64, device=dev)
    forget = torch.zeros(k, dtype=torch.float64, device=dev)
    rows_sum = torch.zeros(k, dtype=torch.float64)
    first_acc = Accumulator(k, su.hmode, dev) if su.first else None
    message = None
    fi = 0  # forget rows of this rank seen so far (indexes pseudo_t's rows)
    wrote = False  # whether the pass wrote over this rank's input (out= the input)
    support = torch.zeros(k, dtype=torch.float64)
    with _one_blas_thread():  # sampled_gram's products, as in the solver's passes
        for s, e, xc, oc in bar(su.store.input_chunks(), "prepare"):
            if solve_only and oc.data_ptr() == xc.data_ptr():
                oc = None  # the input is the buffer: validate only
            mc = su.mask_dev[s:e]
            nf = int(np.count_nonzero(su.mask[s:e]))
            use_mask = nf > 0 and not given
            ic = su.inv_c[s:e] if su.final_rows else None
            in_place = oc is not None and pb._overlaps(oc, xc)
            wrote = wrote or in_place
            # Gathered before prepare, which overwrites the chunk when the buffer is the input.
            f_given, r_given = (pb.given_row_sums(xc, mc, su.mode) if given and nf
                                else (None, None))
            prep = su.be.prepare(xc, su.mode, mc if use_mask else None,
                                 su.fill if use_mask else None, oc, ic,
                                 inner_h if su.final_rows else False, su.tol_rows)
            if prep.error is not None:
                try:
                    pb.raise_row_error(prep.error, xc, su.mode,
                                       su.name + su.where, su.tol_rows,
                                       row_offset=su.first_row + s, overwritten=in_place)
                except ValueError as exc:
                    message = str(exc)
                break
            if solve_only:
                support = torch.maximum(support, prep.support.double())
                r = f = torch.zeros(k, dtype=torch.float64, device=dev)
                oc = xc if oc is None else oc
            else:
                r, f = prep.retain_sums.to(dev), prep.forget_sums.to(dev)
            if f_given is not None:
                f = f_given.to(dev)
                r = r_given.to(dev) if r_given is not None else pb.retained_share(r, f)
            retain += r
            forget += f
            if su.kind == "rows" and nf:
                rows = su.pseudo_t[fi:fi + nf]
                oc[mc] = rows.to(dev, oc.dtype)
                rows_sum += torch.softmax(rows.double(), dim=1).sum(dim=0)
            fi += nf
            if su.first:
                if prep.first is None:
                    raise RuntimeError(f"backend {su.be.name}: prepare gave no first "
                                       f"evaluation for a {su.store.dtype} buffer")
                c, z, h = prep.first
                zero = torch.zeros(k, dtype=torch.float64, device=dev)
                w = (sampled_gram(su.be, oc, ic, zero, su.offset + s, su.n, k)
                     if su.hmode is True else None)
                first_acc.add(c, z, h, w)
    return retain, forget, rows_sum, support, first_acc, message, wrote


def _raise_input_error(comm: Comm, message: Optional[str], wrote: bool) -> None:
    """The input pass's error, raised as a ValueError on every rank when any rank has one (the
    lowest failing rank's message, which names its rank; a collective, so no rank waits for a
    peer that raised), adding the other ranks whose input the pass overwrote (their ``out=`` is
    their input): by the time any rank learns of the error, those wrote log P^ over theirs."""
    every = comm.gather((message, bool(wrote)))
    failed = [r for r, (m, _) in enumerate(every) if m is not None]
    if not failed:
        return
    lost = [r for r, (m, w) in enumerate(every) if w and r != failed[0]]
    extra = ""
    if lost:
        ranks = ", ".join(str(r) for r in lost)
        extra = (f"; out= is the input on rank{'s' if len(lost) > 1 else ''} {ranks} too: "
                 f"the pass has overwritten {'their' if len(lost) > 1 else 'its'} rows with "
                 f"log P^ (up to a bad row of {'their' if len(lost) > 1 else 'its'} own)")
    raise ValueError(every[failed[0]][0] + extra)


def refine_sharded(x_arg: Any, name: str, forget_mask: Any, group: Any, *, out: Any = None,
                   weights: Any = None, return_info: bool = False, **options: Any) -> Any:
    """``refine(..., process_group=group)`` on this rank's rows ``x_arg`` (see ``api.refine``):
    the rows of Q for this rank, with the dtype, device and kind of its input."""
    comm = Comm(group)

    def checks():
        x, from_numpy = pb.to_tensor(x_arg, name)
        n_local, _ = pb.check_matrix(x, name, allow_empty=True)
        mask, pseudo = pb.forget_and_pseudo(forget_mask, n_local, options.get("pseudo"))
        if pseudo is not None:
            options["pseudo"] = pseudo
        c = None
        if weights is not None:
            c = pb.check_weights(weights, n_local).numpy()
        user_out = pb.check_out(out, x, from_numpy)
        return x, from_numpy, mask, c, user_out

    x, from_numpy, mask, c, user_out = collective_checks(comm, checks)
    buf, result = pb.refine_buffers(x, user_out)
    store = MemoryStore(x, buf, result=None if result is buf else result)
    info, _ = refine_rows(store, mask, mode=name, name=name, in_dtype=x.dtype, weights=c,
                          comm=comm, where=comm.where(), **options)
    q = pb.result_tensor(result, user_out, x)
    if from_numpy:
        q = out if out is not None else q.cpu().numpy()
    return (q, info) if return_info else q


def solve_sharded(log_p: Any, weights: Any, marginals: Any, group: Any,
                  **options: Any) -> Tuple[torch.Tensor, RefineInfo]:
    """``solve(..., process_group=group)`` on this rank's rows of log P^ and its weights
    (``marginals``: the global class totals, the same on every rank): (alpha, info), alpha the
    same on every rank."""
    comm = Comm(group)

    def checks():
        lp, from_numpy = pb.to_tensor(log_p, "log_p")
        n_local, _ = pb.check_matrix(lp, "log_p", allow_empty=True)
        c = pb.check_weights(weights, n_local).numpy()
        return lp, from_numpy, c

    lp, from_numpy, c = collective_checks(comm, checks)
    sdt = pb.solver_dtype(lp.dtype)
    buf = lp if lp.dtype == sdt else empty_buffer(lp.shape, sdt, lp.device)
    store = MemoryStore(lp, buf)
    info, _ = refine_rows(store, np.zeros(lp.shape[0], dtype=bool), mode="log_p", name="log_p",
                          in_dtype=lp.dtype, weights=c, pseudo=None, marginals=marginals,
                          comm=comm, where=comm.where(), **options)
    alpha = info.alpha.clone().numpy() if from_numpy else info.alpha.to(lp.device)
    return alpha, info
