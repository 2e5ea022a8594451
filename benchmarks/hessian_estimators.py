"""How accurate Newton's sampled Hessian is, against two alternatives, and what that does to the
passes: a float64 study of the estimator, not of any backend's speed.

    python benchmarks/hessian_estimators.py [--sizes 50000x100 50000x40 200000x100]
                                            [--top-strides 4 2 1] [--out benchmarks/results]

The Hessian's off-diagonal weights ``W_jl = sum_i inv_c_i q_ij q_il`` come, in every backend,
from a row sample S (the 16-row blocks b with b % m == 0, ``m = hessian_stride(N, k)``; ~2 rows
per class entry). The estimators compared, each assembled as the backends do (exact diagonal,
the Laplacian of W rescaled to it) and solved with the solver's own ``_newton_direction`` on
its log-form right-hand side (``_log_residual``):

- ``sampled``: W from S alone (the contract's);
- ``top/s``: each row's pairs with its top class c_i (its largest q) summed over the rows of the
  blocks b % s == 0 (s = 1: every row), the other pairs from S; both scaled to all rows. For
  any choice of c_i the two parts add up to W; with c_i the top class, the first part holds most
  of a confident row's off-diagonal mass and costs O(k) a row (one row of a k x k accumulator)
  instead of O(k^2);
- ``exact``: every row.

Problem: run.py's (a confident classifier, logit margin 6, the first max(1, k // 10) classes
forgotten and replaced by uniform rows, lam 1, "retain" targets), solved in float64 with full
Newton steps from alpha = 0 (no line search: the refines these mirror take full steps here).
Per estimator: W's relative error at alpha = 0 (Frobenius, off-diagonal), the residual after each
pass, the passes after prepare's evaluation to reach tol 1e-6, and whether refine's write
prediction (``res * (res / res_prev) <= tol``) would have let the last pass write Q.
Writes hessian-estimators-<stamp>.json / .md to ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

from ppu_fast import solver  # noqa: E402
from ppu_fast.backends.base import hessian_sample_rows, hessian_stride  # noqa: E402

TOL = 1e-6
MAX_PASSES = 6


def _w_top(q: torch.Tensor, rows: Optional[torch.Tensor], sample: torch.Tensor) -> np.ndarray:
    """W (k x k, off-diagonal) of the ``top`` estimator: top-class pairs over ``rows`` (None:
    every row), the rest over ``sample``; each part scaled to all N rows."""
    n, k = q.shape
    top = q.argmax(dim=1)
    u = q * q.gather(1, top[:, None])
    if rows is not None:
        top, u = top[rows], u[rows]
    a = torch.zeros(k, k, dtype=torch.float64).index_add_(0, top, u).numpy()
    a *= n / top.numel()
    np.fill_diagonal(a, 0.0)
    rest = q[sample].clone()
    rest.scatter_(1, q[sample].argmax(dim=1, keepdim=True), 0.0)
    w = a + a.T + (rest.T @ rest).numpy() * (n / sample.numel())
    np.fill_diagonal(w, 0.0)
    return w


def _w(q: torch.Tensor, kind: str, sample: torch.Tensor) -> np.ndarray:
    n = q.shape[0]
    if kind == "exact":
        w = (q.T @ q).numpy()
    elif kind == "sampled":
        qs = q[sample]
        w = (qs.T @ qs).numpy() * (n / sample.numel())
    else:
        s = int(kind.split("/")[1])
        rows = None if s == 1 else hessian_sample_rows(n, s)
        return _w_top(q, rows, sample)
    np.fill_diagonal(w, 0.0)
    return w


def _hessian(q: torch.Tensor, w: np.ndarray) -> np.ndarray:
    """The assembled Hessian: exact diagonal, off-diagonal -W (the solver balances it)."""
    d = (q * (1.0 - q)).sum(dim=0).numpy()
    h = -w.copy()
    np.fill_diagonal(h, d)
    return h


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.size_arg,
                    default=["50000x100", "50000x40", "200000x100"],
                    help="N x k problems, e.g. 50000x100")
    ap.add_argument("--top-strides", nargs="+", type=common.positive_int, default=[4, 2, 1],
                    help="s of the top/s estimators (1: every row)")
    ap.add_argument("--out", type=common.out_dir,
                    default=str(common.RESULTS), help="results folder")
    args = ap.parse_args()
    meta = common.metadata("cpu")
    meta["command"] = "python benchmarks/hessian_estimators.py " + " ".join(sys.argv[1:])
    kinds = ["sampled"] + [f"top/{s}" for s in args.top_strides] + ["exact"]
    rows: List[dict] = []
    table: List[List[str]] = []
    for size in args.sizes:
        n, k = (int(v) for v in size.split("x"))
        y, p = common.confident_classifier(n, k, dtype=torch.float64)
        forget = y < max(1, k // 10)
        m_t = p[~forget].sum(dim=0) / (~forget).sum() * n
        p[forget] = 1.0 / k
        log_p = torch.log(p)
        del p
        m = m_t.numpy()
        stride = hessian_stride(n, k)
        sample = hessian_sample_rows(n, stride)
        q0 = torch.softmax(log_p, dim=1)
        w_exact = _w(q0, "exact", sample)
        for kind in kinds:
            alpha = np.zeros(k)
            hist: List[float] = []
            rel = None
            for _ in range(MAX_PASSES + 1):
                q = torch.softmax(log_p - torch.from_numpy(alpha)[None, :], dim=1)
                grad = q.sum(dim=0).numpy() - m
                hist.append(float(np.abs(grad).sum()) / n)
                if hist[-1] <= TOL or len(hist) > MAX_PASSES:
                    break
                w = _w(q, kind, sample)
                if rel is None:
                    rel = float(np.linalg.norm(w - w_exact) / np.linalg.norm(w_exact))
                alpha = alpha + solver._newton_direction(_hessian(q, w),
                                                         solver._log_residual(grad, m))
            passes = len(hist) - 1 if hist[-1] <= TOL else None
            fused = (passes is not None and passes >= 2
                     and hist[-2] * (hist[-2] / hist[-3]) <= TOL)
            row = {"n": n, "k": k, "hessian_stride": stride, "sample_rows": int(sample.numel()),
                   "estimator": kind, "w_rel_error": rel, "history": hist, "passes": passes,
                   "last_pass_writes_q": fused}
            rows.append(row)
            table.append([f"{n:,} x {k:,}", f"{stride} ({sample.numel():,} rows)", kind,
                          f"{rel:.3g}", str(passes) if passes is not None else "no",
                          "yes" if fused else "no", " ".join(f"{h:.2e}" for h in hist)])
            print(" | ".join(table[-1]), flush=True)
    stem = common.write_record(
        Path(args.out), "hessian-estimators", meta, rows,
        "Newton's Hessian: the row sample against top-class sums (float64 study)",
        f"run.py's problem (margin 6, the first max(1, k // 10) classes forgotten, uniform pseudo "
        f"rows, lam 1, retain targets) in float64, full Newton steps on the log form from "
        f"alpha = 0, tol {TOL:g}; W rel. error at alpha = 0 against every row; passes after "
        f"prepare's evaluation; 'writes Q' = refine's write prediction would fire on the last pass",
        ["N x k", "stride m (sample)", "estimator", "W rel. error", "passes", "writes Q",
         "residual per pass"], table)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
