"""Median wall time of ``ppu_fast.refine`` (Newton, class unlearning, lam 1) per backend and size.

    python benchmarks/refine_wall.py [--sizes 50000x10 1000000x100] [--reps 15]

Prints one Markdown row per (size, backend): median ms, passes, residual. The input is the
synthetic confident classifier of the benchmarks (true-class logit + 6), forgetting class 5
(class 0 where k <= 5).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts this checkout's ppu_fast first on sys.path)

import ppu_fast  # noqa: E402
from ppu_fast.__main__ import synthetic_probs  # noqa: E402
from ppu_fast.backends import reasons  # noqa: E402


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.size_arg, default=["50000x10", "1000000x100"])
    ap.add_argument("--reps", type=common.positive_int, default=15)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| size | backend | median ms | passes | residual |\n|---|---|--:|--:|--:|")
    for size in args.sizes:
        n, k = map(int, size.split("x"))
        y, p = synthetic_probs(n, k)
        mask = y == (5 if k > 5 else 0)  # k <= 5 has no class 5: forget class 0 there
        for backend in ("cpu", "torch"):
            if reasons(backend, p):
                continue
            ppu_fast.refine(p, mask, backend=backend)  # warm-up
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                _, info = ppu_fast.refine(p, mask, backend=backend, return_info=True)
                times.append(time.perf_counter() - t)
            print(f"| {n:,} x {k:,} | {backend} | {statistics.median(times) * 1e3:.1f} | "
                  f"{info.iterations} | {info.residual:.1e} |", flush=True)


if __name__ == "__main__":
    main()
