"""The precision floor of each solver dtype: the smallest residual ||colsum(Q) - M||_1 / N that
Newton reaches, over a grid of refine problems, from float32 and float64 input.

    python benchmarks/precision_floor.py [--backends cpu torch] [--max-iter 100]

Each problem runs with ``solver.TOL_FLOOR`` lifted for the run and tol 1e-30, so the solver goes
on until its line search finds no step that improves the dual or the residual (or max_iter);
a problem's floor is the smallest residual in ``info.history``. The grid is
benchmarks/solver_grid.py's (synthetic classifiers 20,000 x {5, 10, 40, 100} and 5,000 x 1,000,
margins 1 to 30, lam 0.01 / 1 / 100, class and 1 % selective forgetting, "retain" and "original"
marginals) plus 200,000 x 10 and a 5,000 x 1,000 low-margin model; ``--quick`` keeps lam = 1.
``solver.TOL_FLOOR`` should sit above the worst floor of its dtype. Writes
``precision-floor-<stamp>.md`` / ``.json``.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ppu_fast  # noqa: E402
from ppu_fast import solver  # noqa: E402
from solver_grid import PROBLEMS  # noqa: E402

EXTRA = [(200000, 10, 6), (5000, 1000, 1)]


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                    choices=["float32", "float64"])
    ap.add_argument("--max-iter", type=common.positive_int, default=100)
    ap.add_argument("--quick", action="store_true", help="lam = 1 only")
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    args = ap.parse_args()
    lams = [1.0] if args.quick else [0.01, 1.0, 100.0]
    floors = dict(solver.TOL_FLOOR)
    solver.TOL_FLOOR.update({d: 0.0 for d in floors})
    rows = []
    try:
        for (n, k, margin) in PROBLEMS + EXTRA:
            y, p32 = common.confident_classifier(n, k, margin=margin, seed=1)
            sel = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.01
            for dname, backend in itertools.product(args.dtypes, args.backends):
                p = p32.to(getattr(torch, dname))
                p = p / p.sum(1, keepdim=True)
                for marg, lam, scen in itertools.product(["retain", "original"], lams,
                                                         ["class", "selective"]):
                    forget = (y == 0) if scen == "class" else sel
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ppu_fast.ConvergenceWarning)
                        _, info = ppu_fast.refine(p, forget, lam=lam, marginals=marg,
                                                  backend=backend, tol=1e-30,
                                                  max_iter=args.max_iter, return_info=True)
                    best = min(info.history)
                    rows.append({"n": n, "k": k, "margin": margin, "dtype": dname,
                                 "backend": backend, "marginals": marg, "lam": lam,
                                 "scenario": scen, "floor": best, "passes": info.iterations,
                                 "stop": "line search" if "line search" in info.message
                                 else "max_iter"})
                    print(f"{n}x{k} m{margin} {dname} {backend} {marg} lam {lam:g} {scen}: "
                          f"{best:.3g} ({info.iterations} passes)", flush=True)
    finally:
        solver.TOL_FLOOR.update(floors)
    worst = {}
    for r in rows:
        key = (r["dtype"], r["backend"], "k = 1000" if r["k"] >= 1000 else "k <= 100")
        worst[key] = max(worst.get(key, 0.0), r["floor"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = common.free_stem(out, "precision-floor")
    meta = common.metadata("cpu")
    common.write_json(out / f"{stem}.json", meta, rows,
                      {"worst": {" ".join(k): v for k, v in worst.items()},
                       "tol_floor": {str(k): v for k, v in floors.items()}})
    lines = ["# The precision floor of the residual ||colsum(Q) - M||_1 / N, by dtype", "",
             f"- date (UTC): {meta['date_utc']}; commit: `{meta['git_commit']}`",
             f"- command: `python benchmarks/precision_floor.py {' '.join(sys.argv[1:])}`",
             "- solver.TOL_FLOOR: " + ", ".join(f"{str(k).split('.')[-1]} {v:g}"
                                                 for k, v in floors.items()), "",
             "Worst floor (the largest of the problems' smallest residuals; a problem that "
             "stopped at --max-iter, not at the line search, counts with the residual it had "
             "reached: see its row below):", "",
             common.markdown_table(["dtype", "backend", "k", "worst floor"],
                                   [[d, b, kk, f"{v:.3g}"] for (d, b, kk), v in
                                    sorted(worst.items())]), "",
             common.markdown_table(
                 ["problem", "dtype", "backend", "marginals", "lam", "forget", "floor",
                  "passes (stop)"],
                 [[f"{r['n']:,} x {r['k']}, margin {r['margin']}", r["dtype"], r["backend"],
                   r["marginals"], f"{r['lam']:g}", r["scenario"], f"{r['floor']:.3g}",
                   f"{r['passes']} ({r['stop']})"] for r in rows])]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
