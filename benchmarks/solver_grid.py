"""Newton's passes over a grid of refine problems: how many, and whether each converged.

    python benchmarks/solver_grid.py [--backend torch] [--out benchmarks/results]

96 scenarios: synthetic classifiers (standard-normal logits, true class + margin) of sizes
20,000 x {5, 10, 40, 100} and 5,000 x 1,000 with margins 1 to 30, lam in {0.01, 1, 100}, class
unlearning (class 0) and selective unlearning (1 % of the rows at random), "retain" and "original"
marginals, tol 1e-6, max_iter 100. Counts, not timings: the numbers do not depend on the machine
(only on the backend's float32 rounding). Writes ``solver-grid-<backend>-<stamp>.md`` / ``.json``.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ppu_fast  # noqa: E402

PROBLEMS = [(20000, 10, 6), (20000, 10, 30), (20000, 5, 3), (20000, 40, 2), (20000, 40, 30),
            (20000, 100, 1), (20000, 100, 6), (5000, 1000, 6)]


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--backend", default="torch", choices=["cpu", "torch", "triton", "cuda"])
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    args = ap.parse_args()
    # The GPU backends take GPU tensors (triton CPU tensors only under TRITON_INTERPRET=1): the
    # same problems, moved there (they were always built on the CPU, so those choices failed).
    gpu = args.backend == "cuda" or (args.backend == "triton"
                                     and os.environ.get("TRITON_INTERPRET") != "1")
    if gpu and not torch.cuda.is_available():
        ap.error(f"--backend {args.backend}: no CUDA device here (triton runs on the CPU only "
                 f"with TRITON_INTERPRET=1)")
    dev = "cuda" if gpu else "cpu"
    rows = []
    for (n, k, margin) in PROBLEMS:
        y, p = common.confident_classifier(n, k, margin=margin, seed=1)
        sel = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.01
        y, p, sel = y.to(dev), p.to(dev), sel.to(dev)
        for marg, lam, scen in itertools.product(["retain", "original"], [0.01, 1.0, 100.0],
                                                 ["class", "selective"]):
            forget = (y == 0) if scen == "class" else sel
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ppu_fast.ConvergenceWarning)
                _, info = ppu_fast.refine(p, forget, lam=lam, marginals=marg,
                                          backend=args.backend, return_info=True)
            rows.append({"n": n, "k": k, "margin": margin, "marginals": marg, "lam": lam,
                         "scenario": scen, "passes": info.iterations,
                         "converged": info.converged, "residual": info.residual})
            print(f"{n}x{k} margin {margin:>2} {marg:8s} lam {lam:6} {scen:9s} "
                  f"{info.iterations:3d}{'' if info.converged else ' NOT CONVERGED'}", flush=True)
    total = sum(r["passes"] for r in rows)
    bad = sum(not r["converged"] for r in rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = common.free_stem(out, f"solver-grid-{args.backend}")
    meta = common.metadata("cpu")
    common.write_json(out / f"{stem}.json", meta, rows, {"backend": args.backend,
                                                         "total_passes": total,
                                                         "not_converged": bad})
    lines = [f"# Newton's passes over the scenario grid ({args.backend} backend)", "",
             f"- date (UTC): {meta['date_utc']}; commit: `{meta['git_commit']}`",
             *common.machine_lines(meta),
             f"- command: `python benchmarks/solver_grid.py {' '.join(sys.argv[1:])}`",
             f"- total passes (dual evaluations) {total}; not converged at 100: {bad}", "",
             "| problem | marginals | lam | forget | passes |", "|---|---|--:|---|--:|"]
    lines += [f"| {r['n']} x {r['k']}, margin {r['margin']} | {r['marginals']} | {r['lam']:g} | "
              f"{r['scenario']} | {r['passes']}{'' if r['converged'] else ' (not converged)'} |"
              for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"total passes {total}, not converged {bad}; wrote {out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
