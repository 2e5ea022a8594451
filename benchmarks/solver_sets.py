"""Newton's pass counts on the problem sets docs/solver.md measures solver changes with.

    python benchmarks/solver_sets.py [--sets weights288 rare120 saturated200 cost528]
                                     [--backend cpu] [--out benchmarks/results]

Counts, not timings (they depend only on the backend's rounding). The sets, each a family where
a past solver change stalled or failed somewhere (docs/solver.md says which):

- ``weights288``: 20,000 x 10, 20,000 x 40 and 50,000 x 100 confident classifiers (``run.py``'s,
  logit margins 8 and 30), lam 1e-2 / 1e-3 / 1e-4 / 1e-5 / 1e-6 / 1e-8, class unlearning (class 0)
  and a random 1 %, float32 and float64, two seeds: the "288-refine set" of "What Newton solves
  with".
- ``rare120``: k = 40 / 100 / 128 / 129 / 200 (20,000 rows; 10,000 at k = 200), the first k // 5
  classes 100x rarer, logit margins 15 / 20, a random half forgotten, lam 1e-3 / 1e-4, three
  seeds, "retain" and "original" targets.
- ``saturated200``: 200 draws of the saturated family (n <= 20, k up to 100, logits up to 60,
  targets far from the rows' totals; float64, tol 1e-9), the draws of
  ``tests/solver_problems.py::saturated_family`` (seeds 0-199; tests/test_solver.py runs 30).
- ``cost528``: run.py's classifier at 11 sizes and margins (4,000 x 10 to 50,000 x 100, and
  5,000 x 1,000), lam 1e-4 / 0.01 / 1 / 100, class 0, the first k // 10 classes or a random 1 %
  forgotten, both targets and dtypes; besides the passes it counts the refines that wrote Q
  in their last pass and the write predictions that failed (each costs a pass and a restore of
  log P^): ``cost`` = passes + separate materialize passes + failed predictions.

Writes ``solver-sets-<backend>-<stamp>.json`` / ``.md`` (one row per set: refines, passes, not
converged; cost528's cost) to ``--out``.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

# The families' generators are the tests' own (a plain module, no test dependencies).
sys.path.insert(0, str(common.REPO / "tests"))
from solver_problems import probe_classifier, saturated_family  # noqa: E402

import ppu_fast  # noqa: E402
from ppu_fast import solver  # noqa: E402

SETS = ("weights288", "rare120", "saturated200", "cost528")


def _cases(name: str) -> Iterator[Tuple[tuple, dict]]:
    """(probs, forget) and refine's keyword arguments of each refine of set ``name``."""
    if name == "weights288":
        for (n, k), margin, lam, kind, dt, seed in itertools.product(
                [(20000, 10), (20000, 40), (50000, 100)], [8.0, 30.0],
                [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8], ["class", "selective"],
                [torch.float32, torch.float64], [0, 1]):
            y, p = common.confident_classifier(n, k, seed=seed, margin=margin, dtype=dt)
            f = (y == 0 if kind == "class" else
                 torch.rand(n, generator=torch.Generator().manual_seed(seed + 7)) < 0.01)
            yield (p, f), {"lam": lam}
    elif name == "rare120":
        for k, lam, margin, seed, marg in itertools.product(
                [40, 100, 128, 129, 200], [1e-3, 1e-4], [15.0, 20.0], [0, 1, 2],
                ["retain", "original"]):
            n = 20000 if k <= 129 else 10000
            y, p = probe_classifier(n, k, margin, 300 + seed, rare=(k // 5, 100))
            f = torch.rand(n, generator=torch.Generator().manual_seed(31 + seed)) < 0.5
            yield (p, f), {"lam": lam, "marginals": marg}
    elif name == "saturated200":
        for seed in range(200):
            p, f, pseudo, m, _ = saturated_family(seed)
            yield (p, f), {"pseudo": pseudo, "marginals": m, "tol": 1e-9}
    elif name == "cost528":
        sizes = [(20000, 10, 6), (20000, 10, 30), (20000, 5, 3), (20000, 40, 2), (20000, 40, 30),
                 (20000, 100, 1), (20000, 100, 6), (5000, 1000, 6), (50000, 10, 6),
                 (50000, 100, 6), (4000, 10, 6)]
        for n, k, margin in sizes:
            y, p = common.confident_classifier(n, k, margin=margin, seed=1)
            sel = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.01
            for marg, lam, kind, dt in itertools.product(
                    ["retain", "original"], [1e-4, 0.01, 1.0, 100.0],
                    ["class", "selective", "class10"], [torch.float32, torch.float64]):
                f = (y == 0 if kind == "class" else sel if kind == "selective"
                     else y < max(1, k // 10))
                yield (p.to(dt), f), {"lam": lam, "marginals": marg}
    else:
        raise ValueError(f"set {name!r}: expected one of {', '.join(SETS)}")


def run_set(name: str, backend: str) -> Dict[str, object]:
    """Refine every problem of set ``name``; returns its counts."""
    failed = [0]
    write = solver._write_final

    def counted(*a, **kw):  # (written, trial): a failed prediction did not write Q
        out = write(*a, **kw)
        failed[0] += not out[0]
        return out

    solver._write_final = counted
    try:
        refines = passes = unconverged = materialized = 0
        for (p, f), kw in tqdm(_cases(name), desc=name, leave=False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ppu_fast.ConvergenceWarning)
                _, info = ppu_fast.refine(p, f, backend=backend, return_info=True, **kw)
            refines += 1
            passes += info.iterations
            unconverged += not info.converged
            materialized += info.materialized
    finally:
        solver._write_final = write
    return {"set": name, "refines": refines, "passes": passes, "not_converged": unconverged,
            "materialized": materialized, "failed_predictions": failed[0],
            "cost": passes + (refines - materialized) + failed[0]}


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS),
                    help="which sets to run (default: all)")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "torch"],
                    help="the backend that refines (default cpu)")
    ap.add_argument("--out", type=common.out_dir,
                    default=str(common.RESULTS), help="where the record goes")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows: List[Dict[str, object]] = []
    for name in args.sets:
        rows.append(run_set(name, args.backend))
        r = rows[-1]
        print(f"{name}: {r['refines']} refines, {r['passes']} passes, "
              f"{r['not_converged']} not converged, cost {r['cost']}", flush=True)
    meta = common.metadata("cpu")
    meta["command"] = f"python benchmarks/solver_sets.py {' '.join(sys.argv[1:])}".strip()
    stem = common.write_record(
        Path(args.out), f"solver-sets-{args.backend}", meta, rows,
        f"Newton's passes on docs/solver.md's problem sets ({args.backend} backend)",
        "passes = info.iterations (prepare's evaluation included), summed; cost = passes + a "
        "separate materialize pass per refine whose last pass did not write Q + failed write "
        "predictions",
        ["set", "refines", "passes", "not converged", "wrote Q in the last pass",
         "failed predictions", "cost"],
        [[str(r["set"]), str(r["refines"]), f"{r['passes']:,}", str(r["not_converged"]),
          str(r["materialized"]), str(r["failed_predictions"]), f"{r['cost']:,}"]
         for r in rows])
    print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
