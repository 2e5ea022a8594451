"""Fuzz ``ppu_fast.refine`` against an independent float64 oracle: random calls, each checked from
the definition (docs/design.md §1-2), on the cpu backend and the torch reference.

    python benchmarks/fuzz_refine.py [--cases 260] [--seed 12345] [--backends cpu torch]
                                     [--only 3 17] [--out benchmarks/results]

Each case draws a call (``make_case``): N from 1 to 5,000, k from 2 to 100 (31 / 32 / 33 around
the CPU kernels' two loop shapes), float32 / float64 / float16 / bfloat16, numpy or torch,
contiguous, transposed or strided layouts, probabilities (some with zero entries) or logits (some
offset by up to 1e4), logit margins up to 60; the forget rows as a bool mask, a list, indices
(negative, shuffled), none or all; every ``pseudo`` (names, a matrix, None), lam 1e-6 to 100 or
per-row weights, every ``marginals`` form, newton / sinkhorn / gradient, tol 1e-6 (1e-11 for some
float64), ``out=`` none, a fresh buffer or the input. The oracle builds log P^, c and M itself
(``build_problem``) and solves the dual in float64 with the exact Hessian (``dual_solve_robust``).

Checks: the result's kind, dtype, shape and ``out=`` identity; the inputs, pseudo and forget
arguments unchanged; Q finite, >= 0, rows summing to 1 within the dtype; a converged refine's
residual of Q against the oracle's M within tol (plus the storage rounding), and Q within a
per-dtype tolerance of the oracle's Q* (or of the first-order error its residual predicts);
``info.converged`` agreeing with a ConvergenceWarning; an ambiguous 0/1 index vector refused.

Outcomes per (case, backend): ``ok``; ``nonconv`` (not converged, said so: warning and info);
``raised-infeasible-ok`` / ``raised-ambiguous-ok`` (a documented refusal the oracle confirms);
``bad`` (a check failed), ``exception`` (an error the oracle does not justify),
``oracle-fail``, ``harness-error``. Every case is reproducible from (seed, index): ``--only``.
Writes fuzz-refine-<stamp>.json (every case that was not ok, with what failed) / .md.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

# The tests' float64 oracle (a plain module, no test dependencies).
sys.path.insert(0, str(common.REPO / "tests"))
from oracle import oracle_newton, softmax_rows  # noqa: E402

import ppu_fast  # noqa: E402
from ppu_fast import ConvergenceWarning  # noqa: E402

GOOD = ("ok", "raised-infeasible-ok", "raised-ambiguous-ok")


# ----------------------------------------------------------------------------------------------
# The float64 oracle: tests/oracle.py's Newton, and coordinate ascent where it stops short
# ----------------------------------------------------------------------------------------------


def logsumexp_rows(x):
    """log sum_j exp(x_ij) per row, -inf entries allowed."""
    m = np.max(x, axis=1)
    mm = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return mm + np.log(np.exp(x - mm[:, None]).sum(1))


def coord_ascent(lp, c, M, a0=None, sweeps=200, tol=1e-10):
    """Exact block-coordinate maximisation of the concave dual: for each class j solve
    colsum_j(a_j) = M_j (monotone) by bisection in log space. Robust, slow."""
    n, k = lp.shape
    w = c.min() / c
    a = np.zeros(k) if a0 is None else np.asarray(a0, float) / c.min()
    for sw in range(sweeps):
        for j in range(k):
            x = lp - w[:, None] * a[None, :]
            x[:, j] = -np.inf
            s = logsumexp_rows(x)                  # log of the rest of each row
            lpj = lp[:, j]

            def colsum(aj):
                t = lpj - w * aj - s
                with np.errstate(over="ignore"):
                    return np.sum(np.where(t > 0, 1.0 / (1.0 + np.exp(-t)), np.exp(t) / (1.0 + np.exp(t))))
            target = M[j]
            if target <= 0:
                target = 1e-300
            lo, hi = a[j] - 1.0, a[j] + 1.0
            while colsum(lo) < target and lo > -1e6:
                lo = a[j] - 2 * (a[j] - lo)
            while colsum(hi) > target and hi < 1e6:
                hi = a[j] + 2 * (hi - a[j])
            for _ in range(100):
                mid = 0.5 * (lo + hi)
                if colsum(mid) > target:
                    lo = mid
                else:
                    hi = mid
                if hi - lo < 1e-13 * max(1.0, abs(mid)):
                    break
            a[j] = 0.5 * (lo + hi)
        a -= a.mean()
        q = softmax_rows(lp - w[:, None] * a[None, :])[0]
        if np.abs(q.sum(0) - M).sum() / n <= tol:
            break
    return a * c.min()


def dual_solve_robust(lp, c, M, tol=1e-12, a0=None):
    """Newton (tests/oracle.py's ``oracle_newton``); where it stops short, coordinate ascent from its answer and
    Newton again (saturated problems where the pure Newton step crawls)."""
    a, q, r = oracle_newton(lp, c, M, tol=tol, max_iter=300, alpha0=a0)
    if r <= tol * 100:
        return a, q, r
    n, k = lp.shape
    sweeps = 300 if n * k <= 20000 else 40
    a1 = coord_ascent(lp, c, M, a0=a, sweeps=sweeps)
    a2, q2, r2 = oracle_newton(lp, c, M, tol=tol, max_iter=300, alpha0=a1)
    return (a2, q2, r2) if not r2 >= r else (a, q, r)


# ----------------------------------------------------------------------------------------------
# The problem from the definition (docs/design.md §1-2), in float64
# ----------------------------------------------------------------------------------------------


def as64(x):
    """Any array / tensor as a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x).astype(np.float64)


def build_problem(xv, mode, mask, idx_order, pseudo, marginals, lam, weights, seed):
    """(log P^ (N x k) f64, c (N,), M (k,)) from the definition."""
    n, k = xv.shape
    with np.errstate(divide="ignore"):
        if mode == "probs":
            P = xv / xv.sum(1, keepdims=True)
            lp = np.log(P)
        else:
            P, lz = softmax_rows(xv)
            lp = xv - lz[:, None]
    nf = int(mask.sum())
    retain = ~mask
    nr = n - nf
    lph = lp.copy()
    if nf:
        if isinstance(pseudo, str):
            if pseudo == "uniform":
                lph[mask] = -np.log(k)
            elif pseudo == "random":
                g = torch.Generator().manual_seed(seed)
                z = torch.randn(nf, k, generator=g, dtype=torch.float32)
                lph[mask] = torch.log_softmax(z, dim=1).double().numpy()
            elif pseudo == "random-simplex":
                g = torch.Generator().manual_seed(seed)
                u = torch.rand(nf, k, generator=g, dtype=torch.float64)
                lph[mask] = torch.log(u / u.sum(1, keepdim=True)).float().double().numpy()
            elif pseudo == "prior":
                prior = P[retain].sum(0) / nr if nr else np.full(k, 1.0 / k)
                with np.errstate(divide="ignore"):
                    lph[mask] = np.log(prior)[None, :]
            else:
                raise AssertionError(pseudo)
        elif pseudo is None:
            pass
        else:  # explicit rows, pseudo[j] for index idx_order[j] (or row order for a mask)
            pm = as64(pseudo)
            pm = pm / pm.sum(1, keepdims=True)
            with np.errstate(divide="ignore"):
                lpm = np.log(pm)
            rows = idx_order if idx_order is not None else np.flatnonzero(mask)
            lph[rows] = lpm
    Ph = softmax_rows(lph)[0]
    if weights is not None:
        c = as64(weights)
    else:
        c = np.where(mask, 1.0, lam)
    if isinstance(marginals, str):
        if marginals == "original":
            M = P.sum(0)
        elif marginals == "pseudo":
            M = Ph.sum(0)
        elif marginals == "retain":
            M = Ph.sum(0) if nr == 0 else P[retain].sum(0) * n / nr
    else:
        M = as64(marginals)
        M = M * n / M.sum()
    return lph, c, M


# ----------------------------------------------------------------------------------------------
# Random calls
# ----------------------------------------------------------------------------------------------

NS = [1, 2, 3, 17, 100, 1000, 5000]
KS = [2, 3, 10, 31, 32, 33, 100]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAMS = [1e-6, 1e-2, 1.0, 100.0]
PSEUDOS = ["uniform", "random", "random-simplex", "prior", "matrix", None]
MARGS = ["retain", "original", "pseudo", "vector"]
TORCH2NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def make_case(rng: np.random.Generator):
    """One random call: the input (sizes, dtype, kind, layout, logit margins, zero entries), the
    forget spec, pseudo, lam or weights, marginals, method, tol and out=; ``desc`` names them."""
    cs = {}
    n = int(rng.choice(NS, p=[.06, .08, .08, .22, .26, .2, .1]))
    k = int(rng.choice(KS))
    if n * k > 200_000 and rng.random() < 0.5:
        n = 1000
    dtype = DTYPES[int(rng.choice(4, p=[.4, .3, .15, .15]))]
    kind = "numpy" if (dtype != torch.bfloat16 and rng.random() < 0.5) else "torch"
    mode = "probs" if rng.random() < 0.6 else "logits"
    margin = float(rng.choice([0.0, 3.0, 8.0, 30.0, 60.0], p=[.2, .3, .2, .15, .15]))
    scale = float(rng.choice([1.0, 3.0, 20.0]))
    labels = rng.integers(0, k, n)
    z = rng.standard_normal((n, k)) * scale
    z[np.arange(n), labels] += margin
    zeros = mode == "probs" and rng.random() < 0.25
    if mode == "probs":
        p = softmax_rows(z)[0]
        if zeros:
            zm = rng.random((n, k)) < 0.3
            zm[np.arange(n), labels] = False
            p[zm] = 0.0
            p /= p.sum(1, keepdims=True)
        data = p
    else:
        off = float(rng.choice([0.0, 50.0, 1e3, 1e4], p=[.55, .2, .15, .1]))
        data = z + off * rng.choice([-1, 1])
    cs.update(n=n, k=k, dtype=str(dtype).split(".")[-1], kind=kind, mode=mode, margin=margin,
              scale=scale, zeros=zeros)
    # layout
    layout = str(rng.choice(["contig", "transposed", "colslice", "rowstride"]))
    cs["layout"] = layout
    t = torch.from_numpy(data).to(dtype)  # round once to the input dtype
    if layout == "transposed":
        t = t.t().contiguous().t()
    elif layout == "colslice":
        big = torch.zeros(n, k + 3, dtype=dtype)
        big[:, 1:k + 1] = t
        t = big[:, 1:k + 1]
    elif layout == "rowstride":
        big = torch.zeros(2 * n, k, dtype=dtype)
        big[::2] = t
        t = big[::2]
    if kind == "numpy":
        if layout == "contig":
            x = t.numpy()
        else:  # rebuild the same layout in numpy
            if layout == "transposed":
                x = np.ascontiguousarray(t.numpy().T).T
            elif layout == "colslice":
                big = np.zeros((n, k + 3), dtype=TORCH2NP[dtype])
                big[:, 1:k + 1] = t.numpy()
                x = big[:, 1:k + 1]
            else:
                big = np.zeros((2 * n, k), dtype=TORCH2NP[dtype])
                big[::2] = t.numpy()
                x = big[::2]
    else:
        x = t
    # forget spec
    fk = str(rng.choice(["bool", "bool_list", "idx", "idx_neg", "idx_shuffled", "empty", "all"],
                        p=[.25, .05, .2, .1, .15, .1, .15]))
    frac = float(rng.choice([0.01, 0.1, 0.5, 0.9]))
    nf = max(1, int(round(frac * n)))
    if fk in ("empty",):
        nf = 0
    if fk == "all":
        nf = n
    rows = np.sort(rng.choice(n, size=nf, replace=False)) if nf else np.zeros(0, np.int64)
    if fk == "idx_shuffled":
        rows = rng.permutation(rows)
    mask = np.zeros(n, bool)
    mask[rows] = True
    idx_order = None
    if fk in ("bool", "all"):
        fspec = torch.from_numpy(mask) if rng.random() < 0.5 else mask.copy()
    elif fk == "bool_list":
        fspec = [bool(b) for b in mask]
    elif fk == "empty":
        fspec = [] if rng.random() < 0.5 else np.zeros(n, bool)
    else:
        ind = rows.astype(np.int64)
        if fk == "idx_neg":
            neg = rng.random(nf) < 0.5
            ind = np.where(neg, ind - n, ind)
        idx_order = rows.astype(np.int64)
        r = rng.random()
        fspec = torch.from_numpy(ind.copy()) if r < 0.4 else (ind.copy() if r < 0.8
                                                              else [int(v) for v in ind])
    cs["forget"] = fk
    cs["nf"] = nf
    # pseudo
    ps = PSEUDOS[int(rng.integers(len(PSEUDOS)))]
    gen_seed = int(rng.integers(1 << 30))
    pseudo = ps
    if ps == "matrix":
        pz = rng.standard_normal((nf, k)) * 2
        pm = softmax_rows(pz)[0]
        if rng.random() < 0.3:
            pm[:, 0] = 0.0
            pm[:, 0] = 0 if k > 1 else 1
            pm /= pm.sum(1, keepdims=True)
        pd = dtype if rng.random() < 0.5 else torch.float32
        pt = torch.from_numpy(pm).to(pd)
        pseudo = pt.numpy() if (kind == "numpy" and pd in TORCH2NP and rng.random() < 0.5) else pt
    cs["pseudo"] = ps
    # weights / lam
    weights = None
    lam = 1.0
    if rng.random() < 0.15:
        weights = np.exp(rng.uniform(-3, 3, n))
        if rng.random() < 0.5:
            weights = torch.from_numpy(weights)
        cs["weights"] = True
    else:
        lam = float(rng.choice(LAMS))
    cs["lam"] = lam
    # marginals
    mg = MARGS[int(rng.integers(len(MARGS)))]
    cs["marginals"] = mg
    # method, tol, backend-independent options
    method = str(rng.choice(["newton", "sinkhorn", "gradient"], p=[.85, .1, .05]))
    tol = 1e-6
    if dtype == torch.float64 and rng.random() < 0.5:
        tol = 1e-11
    cs.update(method=method, tol=tol)
    outk = str(rng.choice(["none", "fresh", "input"], p=[.6, .2, .2]))
    cs["out"] = outk
    return dict(x=x, mode=mode, fspec=fspec, mask=mask, idx_order=idx_order, pseudo=pseudo,
                mg=mg, lam=lam, weights=weights, gen_seed=gen_seed, method=method, tol=tol,
                outk=outk, dtype=dtype, kind=kind, desc=cs, rng_seed=int(rng.integers(1 << 30)))


def make_vector_marginals(lph, rng):
    """Feasible class totals: column sums of a random row-stochastic matrix on P^'s support,
    biased away from P^ (so the solve has something to do)."""
    n, k = lph.shape
    sup = np.isfinite(lph)
    r = np.where(sup, np.exp(rng.standard_normal(lph.shape)), 0.0)
    r /= r.sum(1, keepdims=True)
    Ph = softmax_rows(lph)[0]
    Q = 0.7 * Ph + 0.3 * r
    return Q.sum(0)


# ----------------------------------------------------------------------------------------------
# One call, judged
# ----------------------------------------------------------------------------------------------

TOLQ = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def snapshot(x):
    """A copy of an array / tensor argument, to check it was not modified."""
    return x.copy() if isinstance(x, np.ndarray) else x.clone()


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    return bool(torch.equal(a, b))


def run_case(case, backend):
    """Call refine on ``case`` with ``backend`` and judge the result: (outcome, problems, stats);
    see the module docstring for the outcomes and checks."""
    x = case["x"]
    dtype = case["dtype"]
    n, k = x.shape
    rng = np.random.default_rng(case["rng_seed"])
    xv = as64(x)
    mg = case["mg"]
    # build the oracle problem first (needs P^ for vector marginals)
    lph, c, M = build_problem(xv, case["mode"], case["mask"], case["idx_order"], case["pseudo"],
                              "pseudo" if mg == "vector" else mg, case["lam"], case["weights"],
                              case["gen_seed"])
    marg_arg = mg
    if mg == "vector":
        Mv = make_vector_marginals(lph, rng)
        marg_arg = Mv if rng.random() < 0.5 else torch.from_numpy(Mv)
        if rng.random() < 0.3:
            marg_arg = [float(v) for v in Mv]
        M = Mv * n / Mv.sum()
    # arguments
    x_in = x
    out = None
    if case["outk"] == "fresh":
        out = (np.empty_like(x) if isinstance(x, np.ndarray) else torch.empty_like(x))
    x_before = snapshot(x)
    if case["outk"] == "input":
        x_in = snapshot(x)  # a private copy we overwrite (same layout not needed)
        out = x_in
    pseudo_before = snapshot(case["pseudo"]) if isinstance(case["pseudo"], (np.ndarray, torch.Tensor)) else None
    fspec = case["fspec"]
    fspec_before = snapshot(fspec) if isinstance(fspec, (np.ndarray, torch.Tensor)) else None
    kw = dict(lam=case["lam"], pseudo=case["pseudo"], marginals=marg_arg, method=case["method"],
              tol=case["tol"], backend=backend, return_info=True, out=out,
              weights=case["weights"])
    if isinstance(case["pseudo"], str) and case["pseudo"] in ("random", "random-simplex"):
        kw["generator"] = torch.Generator().manual_seed(case["gen_seed"])
    if case["mode"] == "probs":
        args = (x_in, fspec)
    else:
        args = (None, fspec)
        kw["logits"] = x_in
    problems = []
    # documented refusal: integer indices holding only 0/1 with length N or repeats are ambiguous
    iv = None
    if not isinstance(fspec, list) or (fspec and not isinstance(fspec[0], bool)):
        arr = np.asarray(fspec.numpy() if isinstance(fspec, torch.Tensor) else fspec)
        if arr.dtype.kind in "iu":
            iv = arr
    ambiguous = (iv is not None and iv.size and iv.min() >= 0 and iv.max() <= 1
                 and (iv.size == n or iv.size > np.unique(iv).size))
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        try:
            q, info = ppu_fast.refine(*args, **kw)
        except Exception as exc:  # noqa
            msg = f"{type(exc).__name__}: {exc}"
            if ambiguous and isinstance(exc, ValueError) and "ambiguous" in msg:
                return "raised-ambiguous-ok", [], {}
            # oracle: is it really infeasible / unsolvable?
            a_o, q_o, r_o = dual_solve_robust(lph, c, M, tol=1e-9)
            if "infeasib" in msg and r_o > 1e-6:
                return "raised-infeasible-ok", [], {}
            return "exception", [f"raised {msg[:300]} (oracle residual {r_o:.2e})"], {}
    if ambiguous:
        problems.append("ambiguous 0/1 index vector accepted")
    cw = [w for w in wl if issubclass(w.category, ConvergenceWarning)]
    other_w = [str(w.message)[:120] for w in wl if not issubclass(w.category, ConvergenceWarning)]
    if other_w:
        problems.append(f"unexpected warnings {other_w}")
    # kind / dtype / identity
    if case["kind"] == "numpy":
        if not isinstance(q, np.ndarray):
            problems.append(f"numpy in, {type(q).__name__} out")
    else:
        if not isinstance(q, torch.Tensor):
            problems.append(f"torch in, {type(q).__name__} out")
        elif q.device.type != "cpu":
            problems.append(f"device {q.device}")
    qdt = q.dtype if isinstance(q, torch.Tensor) else q.dtype
    exp_dt = dtype if isinstance(q, torch.Tensor) else TORCH2NP.get(dtype)
    if qdt != exp_dt:
        problems.append(f"dtype {qdt}, expected {exp_dt}")
    if q.shape != (n, k):
        problems.append(f"shape {q.shape}")
    if out is not None and q is not out:
        problems.append("out= given but result is not out")
    # input unchanged
    if case["outk"] != "input" and not same(x, x_before):
        problems.append("INPUT MODIFIED in place")
    if pseudo_before is not None and not same(case["pseudo"], pseudo_before):
        problems.append("pseudo argument modified")
    if fspec_before is not None and not same(fspec, fspec_before):
        problems.append("forget_mask argument modified")
    Q = as64(q)
    if not np.all(np.isfinite(Q)):
        problems.append(f"non-finite Q ({int((~np.isfinite(Q)).sum())} entries)")
        return "bad", problems, {}
    if Q.min() < 0:
        problems.append(f"negative Q {Q.min()}")
    rs = np.abs(Q.sum(1) - 1).max()
    eps = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.float16: 9.8e-4,
           torch.bfloat16: 7.8e-3}[dtype]
    if rs > max(8, k / 2) * eps:
        problems.append(f"row sums off by {rs:.3g}")
    res_q = np.abs(Q.sum(0) - M).sum() / n   # residual of the returned Q vs the oracle's M
    conv = bool(info.converged)
    if not conv and not cw:
        problems.append("not converged but no ConvergenceWarning")
    if conv and cw:
        problems.append("converged but ConvergenceWarning")
    res_allow = case["tol"] * 1.01 + (0 if dtype in (torch.float32, torch.float64) else k * eps * 0.6)
    if dtype == torch.float32:
        res_allow += 5e-7  # float32 storage of Q
    if conv and res_q > max(res_allow, 3 * case["tol"]):
        problems.append(f"converged but residual of Q vs oracle M = {res_q:.3g} (info {info.residual:.3g})")
    # materialization check: Q vs softmax(lph - alpha / c)
    alpha = info.alpha.double().numpy()
    Qa = softmax_rows(lph - (1.0 / c)[:, None] * alpha[None, :])[0]
    mat_err = np.abs(Qa - Q).max()
    # oracle optimum
    _, Q_o, r_o = dual_solve_robust(lph, c, M, tol=1e-12)
    warm = False
    if not r_o <= 1e-10:
        # Seeded with refine's alpha, which the oracle then checks rather than trusts.
        _, Q_o2, r_o2 = dual_solve_robust(lph, c, M, tol=1e-12, a0=alpha)
        if r_o2 < r_o or (np.isnan(r_o) and not np.isnan(r_o2)):
            Q_o, r_o, warm = Q_o2, r_o2, True
    dq = np.abs(Q - Q_o).max()
    # first-order prediction of |Q - Q*| from the library's residual: d = H^+ (colsum - M)
    w = 1.0 / c
    wq = w[:, None] * Q_o
    H = np.diag(wq.sum(0)) - wq.T @ Q_o
    try:
        d = np.linalg.lstsq(H, Q.sum(0) - M, rcond=1e-13)[0]
    except np.linalg.LinAlgError:
        d = np.full(k, np.nan)
    dQp = Q_o * w[:, None] * (d[None, :] - (Q_o @ d)[:, None])
    pred = np.abs(dQp).max()
    stats = dict(pred=pred, dq=dq, res_q=res_q, r_o=r_o, mat=mat_err, conv=conv, iters=info.iterations,
                 warm=warm, info_res=info.residual)
    if not r_o <= 1e-8:
        problems.append(f"oracle did not converge (res {r_o:.2e}); lib conv={conv} res={res_q:.2e}")
        return "oracle-fail", problems, stats
    tq = TOLQ[dtype]
    if conv and dq > max(tq, 5 * pred):
        # judge relative to residual: allow dq up to ~ (1e3 * res) for ill-conditioned cases
        problems.append(f"|Q-Q*|max={dq:.3g} > {tq:g} (pred from residual {pred:.2e}, lib res {res_q:.2e}, info.res "
                        f"{info.residual:.2e}, mat_err {mat_err:.2e}, iters {info.iterations})")
    if not conv:
        problems.append(f"[info] not converged: res {info.residual:.2e} msg={info.message[:150]!r}"
                        f" dq={dq:.2e}")
    return ("bad" if any(not p.startswith("[info]") for p in problems) else
            ("nonconv" if not conv else "ok")), problems, stats


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--cases", type=common.positive_int, default=260, help="cases to draw")
    ap.add_argument("--seed", type=common.nonneg_int, default=12345,
                    help="case i is drawn from (seed, i)")
    ap.add_argument("--start", type=common.nonneg_int, default=0, help="first case index")
    ap.add_argument("--only", type=common.nonneg_int, nargs="+", default=None,
                    help="run these indices only")
    # The cases are CPU tensors: cuda cannot take them, triton only in its interpreter (a bogus
    # name was counted as an exception in every case, and the record written).
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch"],
                    choices=["cpu", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET")
                                                == "1" else []),
                    help="backends to call")
    ap.add_argument("--threads", type=common.positive_int, default=2, help="torch threads")
    ap.add_argument("--out", type=common.out_dir,
                    default=str(common.RESULTS), help="results folder")
    args = ap.parse_args()
    if len(set(args.backends)) != len(args.backends):
        ap.error(f"--backends: {args.backends} repeats a backend (its counts would add up)")
    picked = [i for i in range(args.start, args.cases)
              if args.only is None or i in set(args.only)]
    if not picked:
        ap.error(f"no case to run: --start {args.start}, --cases {args.cases}"
                 + (f", --only {args.only}" if args.only is not None else "")
                 + " select none (case indices run from --start to --cases - 1)")
    torch.set_num_threads(args.threads)
    meta = common.metadata("cpu")
    meta["command"] = "python benchmarks/fuzz_refine.py " + " ".join(sys.argv[1:])
    outcomes = {b: Counter() for b in args.backends}
    worst = defaultdict(float)
    flagged = []
    only = set(args.only) if args.only is not None else None
    for i in tqdm(range(args.start, args.cases), desc="cases", file=sys.stderr):
        case = make_case(np.random.default_rng([args.seed, i]))
        if only is not None and i not in only:
            continue
        for backend in args.backends:
            try:
                status, problems, st = run_case(case, backend)
            except Exception:  # the harness itself failed: report, go on
                status, problems, st = "harness-error", [traceback.format_exc()[-800:]], {}
            outcomes[backend][status] += 1
            if st:
                dt = str(case["dtype"]).split(".")[-1]
                # Over converged calls: a refine that stopped short (at lam 1e-6, with alpha / c
                # ~1e6 rounded in float32) returns its best iterate, judged by the checks above.
                if st["conv"]:
                    worst[(dt, "|Q - Q*| max")] = max(worst[(dt, "|Q - Q*| max")], st["dq"])
                    worst[(dt, "|Q - Q(alpha)| max")] = max(worst[(dt, "|Q - Q(alpha)| max")],
                                                            st["mat"])
            if status not in GOOD:
                flagged.append({"case": i, "backend": backend, "outcome": status,
                                "call": {kk: (v if isinstance(v, (int, float, str, bool))
                                              or v is None else str(v))
                                         for kk, v in case["desc"].items()},
                                "problems": problems})
                tqdm.write(f"case {i} [{backend}] {status}: {case['desc']}", file=sys.stderr)
                for p in problems:
                    tqdm.write(f"    {p}", file=sys.stderr)
    names = ["ok", "nonconv", "raised-infeasible-ok", "raised-ambiguous-ok", "bad", "exception",
             "oracle-fail", "harness-error"]
    table = [[b] + [str(outcomes[b][nm]) for nm in names] for b in args.backends]
    rows = [{"backend": b, **{nm: outcomes[b][nm] for nm in names}} for b in args.backends]
    rows.append({"worst": {f"{a} {b}": v for (a, b), v in sorted(worst.items())},
                 "flagged": flagged})
    setting = (f"cases {args.start}..{args.cases - 1} of seed {args.seed}; worst over converged "
               f"calls: " + "; ".join(f"{a} {b} {v:.3g}" for (a, b), v in sorted(worst.items())))
    stem = common.write_record(Path(args.out), "fuzz-refine", meta, rows,
                               "refine against a float64 oracle: random calls (fuzz)", setting,
                               ["backend"] + names, table)
    print(common.markdown_table(["backend"] + names, table))
    print(f"wrote {stem}.json/.md ({len(flagged)} calls not ok, listed in the .json)")


if __name__ == "__main__":
    main()
