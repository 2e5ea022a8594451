"""float16 / bfloat16 refines beside the float32 refine of the same numbers: median wall time of
``ppu_fast.refine`` per backend, dtype and size, and how far the 16-bit Q lies from the float32
answer (against the rounding of that answer to the dtype, the least any 16-bit Q can miss by).

    python benchmarks/half_precision.py [--sizes 50000x100 1000000x100] [--reps 7]
                                        [--backends cpu torch] [--out benchmarks/results]

The input is the benchmarks' confident classifier (true-class logit + 6) and the demanding
setting that showed the 16-bit log P^ problem: lam 1e-4, a random half forgotten, pseudo
"prior", marginals "original". Writes half-precision-<stamp>.json / .md to ``--out``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

import ppu_fast  # noqa: E402

OPTIONS = dict(lam=1e-4, pseudo="prior", marginals="original")


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.size_arg,
                    default=["50000x100", "1000000x100"])
    ap.add_argument("--reps", type=common.positive_int, default=7)
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch"],
                    choices=["cpu", "torch", "triton", "cuda"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False (no CUDA device)")
    meta = common.metadata(args.device)
    meta["command"] = "python benchmarks/half_precision.py " + " ".join(sys.argv[1:])
    rows, table = [], []
    for size in args.sizes:
        n, k = (int(v) for v in size.split("x"))
        _, p32 = common.confident_classifier(n, k, args.device)
        forget = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5
        forget = forget.to(args.device)
        for backend in args.backends:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = p32.to(dtype)
                xd = x.double()
                # The float32 refine of the 16-bit numbers (rows renormalised in float64).
                want = ppu_fast.refine((xd / xd.sum(1, keepdim=True)).float(), forget, tol=1e-7,
                                       backend=backend, **OPTIONS)
                del xd
                times, info = [], None
                for _ in range(args.reps + 1):  # the first call warms up
                    t = time.perf_counter()
                    q, info = ppu_fast.refine(x, forget, backend=backend, return_info=True,
                                              **OPTIONS)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                err = float((q.float() - want).abs().max())
                rounding = float((want.to(dtype).float() - want).abs().max())
                del q
                row = {"size": size, "backend": backend, "dtype": str(dtype).split(".")[-1],
                       "median_ms": 1e3 * statistics.median(times[1:]),
                       "passes": info.iterations, "converged": info.converged,
                       "max_abs_from_float32": err, "rounding_of_float32": rounding,
                       "timings_ms": {kk: 1e3 * v for kk, v in info.timings.items()}}
                rows.append(row)
                table.append([size, backend, row["dtype"], common.fmt(row["median_ms"]),
                              str(info.iterations), common.fmt(err, 2), common.fmt(rounding, 2)])
                print(" | ".join(table[-1]), flush=True)
    stem = common.write_record(
        Path(args.out), "half-precision", meta, rows,
        f"16-bit refines beside float32 ({args.device})",
        "setting: lam 1e-4, a random half forgotten, pseudo prior, marginals original; "
        "abs(Q - Q32) = max abs difference from the float32 refine of the same numbers; "
        "rounding = the same for that answer rounded to the dtype",
        ["size", "backend", "dtype", "median ms", "passes", "max abs(Q - Q32)", "rounding"],
        table)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
