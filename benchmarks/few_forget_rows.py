"""How far a handful of forget rows lie from the exact solution when the solve stops at ``tol``:
``tol`` bounds ``||colsum(Q) - M||_1 / N``, an average over all N rows, so a few forget rows among
many can keep most of the residual between them.

    python benchmarks/few_forget_rows.py [--n 20000] [--forget 5] [--ks 10 100]
                                         [--margins 6 20] [--lams 1 0.01]
                                         [--tols 1e-6 1e-7 1e-10] [--dtypes float32 float64]
                                         [--out benchmarks/results]

For each k, logit margin (true-class logit + margin over standard-normal logits) and lam, a
refine forgetting ``--forget`` random rows of ``--n`` (pseudo "uniform", marginals "retain", the
cpu backend) in each dtype at each ``--tols`` (those at or above the dtype's floor), against the
float64 refine of the same probabilities to tol 1e-12: the largest abs difference of Q on the
forget rows and on the retain rows. Writes few-forget-rows-<stamp>.json / .md to ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

import ppu_fast  # noqa: E402
from ppu_fast.solver import TOL_FLOOR  # noqa: E402


def probabilities(n: int, k: int, margin: float, seed: int = 0) -> torch.Tensor:
    """float64 softmax of standard-normal logits with the true class raised by ``margin``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64)
    z[torch.arange(n), torch.randint(0, k, (n,), generator=g)] += margin
    return torch.softmax(z, 1)


def main() -> None:
    ap = common.parser(__doc__)
    # Checked here: a bad value failed inside the solver after the cases before it had run.
    ap.add_argument("--n", type=common.positive_int, default=20_000)
    ap.add_argument("--forget", type=common.positive_int, default=5)
    ap.add_argument("--ks", nargs="+", type=common.num_classes, default=[10, 100])
    ap.add_argument("--margins", nargs="+", type=common.finite_float, default=[6.0, 20.0])
    ap.add_argument("--lams", nargs="+", type=common.positive_float, default=[1.0, 0.01])
    ap.add_argument("--tols", nargs="+", type=common.positive_float, default=[1e-6, 1e-7, 1e-10])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                    choices=["float32", "float64"])
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    args = ap.parse_args()
    if not 0 < args.forget < args.n:
        ap.error("argument --forget: expected 0 < forget < n")
    if not any(t >= TOL_FLOOR[getattr(torch, d)] for t in args.tols for d in args.dtypes):
        ap.error(f"argument --tols: every tol is below the floor of every dtype "
                 f"({', '.join(f'{d} {TOL_FLOOR[getattr(torch, d)]:g}' for d in args.dtypes)})")
    meta = common.metadata("cpu")
    meta["command"] = "python benchmarks/few_forget_rows.py " + " ".join(sys.argv[1:])
    rows, table = [], []
    for k in args.ks:
        for margin in args.margins:
            p = probabilities(args.n, k, margin)
            rows_forgotten = torch.randperm(args.n, generator=torch.Generator().manual_seed(1))
            mask = torch.zeros(args.n, dtype=torch.bool)
            mask[rows_forgotten[:args.forget]] = True
            for lam in args.lams:
                exact = ppu_fast.refine(p, mask, lam=lam, tol=1e-12, backend="cpu")
                for dtype, tol in ((d, t) for d in args.dtypes for t in args.tols):
                    if tol < TOL_FLOOR[getattr(torch, dtype)]:
                        continue
                    q, info = ppu_fast.refine(p.to(getattr(torch, dtype)), mask, lam=lam,
                                              tol=tol, backend="cpu", return_info=True)
                    d = (q.double() - exact).abs()
                    row = {"n": args.n, "forget": args.forget, "k": k, "margin": margin,
                           "lam": lam, "dtype": dtype, "tol": tol, "passes": info.iterations,
                           "converged": info.converged, "residual": info.residual,
                           "max_abs_forget": float(d[mask].max()),
                           "max_abs_retain": float(d[~mask].max())}
                    rows.append(row)
                    table.append([str(k), f"{margin:g}", f"{lam:g}", dtype, f"{tol:g}",
                                  str(info.iterations), f"{info.residual:.2g}",
                                  f"{row['max_abs_forget']:.2g}",
                                  f"{row['max_abs_retain']:.2g}"])
                    print(" | ".join(table[-1]), flush=True)
    stem = common.write_record(
        Path(args.out), "few-forget-rows", meta, rows,
        f"{args.forget} forget rows of {args.n:,}: Q against the exact solution",
        "refine (cpu backend, pseudo uniform, marginals retain) in dtype at tol against the "
        "float64 refine of the same probabilities at tol 1e-12; max abs difference of Q on the "
        "forget rows and on the retain rows",
        ["k", "margin", "lam", "dtype", "tol", "passes", "residual", "forget rows",
         "retain rows"], table)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
