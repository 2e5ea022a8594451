"""What a ``refine`` spends outside its kernels: the host's Python and numpy work (argument
checks, the forget mask and weights, targets, the solver's bookkeeping between passes), which
the kernels' speed cannot remove and which dominates small problems.

    python benchmarks/host_overhead.py [--sizes 256x10 2048x10 50000x10 50000x100]
                                       [--threads 2] [--reps 300] [--out benchmarks/results]

For each size, ``ppu_fast.refine`` of the synthetic problem of ``run.py`` (a confident
classifier, logit margin 6, the first max(1, k // 10) classes forgotten, lam 1, Newton to tol
1e-6) on the cpu backend, ``--reps`` timed calls after warm-up. The compiled module
``ppu_fast._C``'s kernel entry points (prepare, step, materialize, the Newton direction) are
wrapped by a timer, so each call splits into the time inside them ("kernels") and the rest
("host" = wall - kernels, the median of the per-call differences; taking a result buffer from
the host cache, or mapping a new one, counts as host). "host / pass" divides the
host time by the solver's passes (``info.iterations``, prepare's first evaluation included).
CPU only: on a GPU the host's work overlaps the device's and this split does not apply (there
``run.py``'s refine / step ratio shows the same cost). Writes host-overhead-<stamp>.json / .md
to ``--out``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

import ppu_fast  # noqa: E402
from ppu_fast import _C  # noqa: E402

KERNELS = ("prepare", "step", "materialize", "newton_direction")


def timed_module(inside: list):
    """Wrap ``ppu_fast._C``'s kernel entry points so each adds its seconds to ``inside[0]``;
    returns a function that restores them."""
    saved = {name: getattr(_C, name) for name in KERNELS}

    def wrap(fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                inside[0] += time.perf_counter() - t
        return timed

    for name, fn in saved.items():
        setattr(_C, name, wrap(fn))

    def restore() -> None:
        for name, fn in saved.items():
            setattr(_C, name, fn)
    return restore


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.size_arg,
                    default=["256x10", "2048x10", "50000x10", "50000x100"],
                    help="N x k problems, e.g. 50000x10")
    ap.add_argument("--threads", type=common.positive_int, default=2,
                    help="torch (and so cpu backend) threads")
    ap.add_argument("--reps", type=common.positive_int, default=300,
                    help="timed refine calls per size, after 20 untimed ones")
    ap.add_argument("--out", type=common.out_dir,
                    default=str(common.RESULTS), help="results folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = common.metadata("cpu")
    meta["command"] = "python benchmarks/host_overhead.py " + " ".join(sys.argv[1:])
    inside = [0.0]
    restore = timed_module(inside)
    rows, table = [], []
    try:
        for size in args.sizes:
            n, k = (int(v) for v in size.split("x"))
            y, p = common.confident_classifier(n, k)
            forget = y < max(1, k // 10)

            def call():
                return ppu_fast.refine(p, forget, lam=1.0, tol=1e-6, method="newton",
                                       backend="cpu", return_info=True)
            for _ in range(20):
                call()
            s = defaultdict(list)
            for _ in range(args.reps):
                inside[0] = 0.0
                t = time.perf_counter()
                q, info = call()
                wall = time.perf_counter() - t
                del q
                s["wall"].append(wall)
                s["kernels"].append(inside[0])
                s["host"].append(wall - inside[0])
            med = {key: statistics.median(v) * 1e3 for key, v in s.items()}
            row = {"n": n, "k": k, "threads": args.threads, "reps": args.reps,
                   "passes": info.iterations, "steps": info.steps,
                   "refine_ms": med["wall"], "kernels_ms": med["kernels"],
                   "host_ms": med["host"], "host_per_pass_ms": med["host"] / info.iterations,
                   "host_share": med["host"] / med["wall"]}
            rows.append(row)
            table.append([f"{n:,} x {k:,}", str(info.iterations), common.fmt(med["wall"]),
                          common.fmt(med["kernels"]), common.fmt(med["host"]),
                          f"{100 * row['host_share']:.0f} %",
                          common.fmt(1e3 * row["host_per_pass_ms"])])
            print(" | ".join(table[-1]), flush=True)
    finally:
        restore()
    stem = common.write_record(
        Path(args.out), "host-overhead", meta, rows,
        "refine's time outside its kernels (cpu backend)",
        f"ppu_fast.refine, cpu backend, {args.threads} threads, Newton tol 1e-6, lam 1, the "
        f"first max(1, k // 10) classes forgotten; medians of {args.reps} calls; kernels = "
        f"time inside ppu_fast._C's kernel entry points, host = wall - kernels",
        ["N x k", "passes", "refine ms", "kernels ms", "host ms", "host share",
         "host us / pass"], table)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
