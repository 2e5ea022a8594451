"""float64 against float32, and the cpu kernels against the torch reference, on the CPU.

    python benchmarks/float64.py [--sizes 200000x100 1000000x10 20000x1000] [--threads 1 2]

Per size, thread count, dtype (float32 / float64) and backend (cpu / torch): the median time of
one ``step`` (no Hessian, and with the Hessian Newton asks for), ``materialize`` into a buffer of
the input's dtype and ``prepare`` of probabilities with the first evaluation, and one ``refine``
(class forgetting, "retain" marginals) to tol 1e-6 (float32) or 1e-11 (float64) with its passes.
Synthetic inputs (benchmarks/common.py). The machine's load is recorded with the results: CPU
timings on a shared machine move by 2x. Writes ``float64-<stamp>.md`` / ``.json``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ppu_fast  # noqa: E402
from ppu_fast.backends.base import compute_dtype, hessian_stride  # noqa: E402
from ppu_fast.backends.cpu import CpuBackend  # noqa: E402
from ppu_fast.backends.torch_ref import TorchBackend  # noqa: E402
from ppu_fast.solver import hessian_mode  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float64: 1e-11}


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.size_arg, default=["200000x100", "1000000x10", "20000x1000"])
    ap.add_argument("--threads", nargs="+", type=common.positive_int, default=[1, 2])
    ap.add_argument("--budget", type=common.nonneg_float, default=1.0, help="seconds of repeats per case")
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        n, k = (int(v) for v in size.split("x"))
        hess = hessian_mode("newton", k)
        y, p32 = common.confident_classifier(n, k, seed=1)
        forget = y == 0
        for threads in args.threads:
            torch.set_num_threads(threads)
            for dtype in (torch.float32, torch.float64):
                p = p32.to(dtype)
                p = p / p.sum(1, keepdim=True)
                log_p = torch.log(p)
                inv_c = torch.ones(n, dtype=compute_dtype(dtype))
                alpha = torch.randn(k, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64)
                buf = torch.empty_like(p)
                for name, be in (("cpu", CpuBackend(num_threads=threads)),
                                 ("torch", TorchBackend())):
                    t = {
                        "step": lambda i: be.step(log_p, inv_c, alpha),
                        "step+H": lambda i: be.step(log_p, inv_c, alpha, hess),
                        "materialize": lambda i: be.materialize(log_p, inv_c, alpha, buf),
                        "prepare": lambda i: be.prepare(p, "probs", None, None, buf, inv_c,
                                                        hess),
                    }
                    row = {"n": n, "k": k, "threads": threads, "dtype": str(dtype).split(".")[-1],
                           "backend": name, "hessian": hess, "hstride": hessian_stride(n, k)}
                    for op, fn in t.items():
                        row[op + "_ms"] = common.time_call(fn, "cpu", budget_s=args.budget,
                                                           max_case_s=20)["median_ms"]
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ppu_fast.ConvergenceWarning)
                        res = common.time_call(
                            lambda i: ppu_fast.refine(p, forget, backend=name, tol=TOL[dtype],
                                                      return_info=True), "cpu",
                            budget_s=args.budget, min_reps=1, max_case_s=30)
                        _, info = ppu_fast.refine(p, forget, backend=name, tol=TOL[dtype],
                                                  return_info=True)
                    row.update({"refine_ms": res["median_ms"], "refine_tol": TOL[dtype],
                                "passes": info.iterations, "converged": info.converged,
                                "residual": info.residual, "load1": os.getloadavg()[0]})
                    rows.append(row)
                    print(" ".join(f"{key}={common.fmt(v) if isinstance(v, float) else v}"
                                   for key, v in row.items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = common.free_stem(out, "float64")
    meta = common.metadata("cpu")
    common.write_json(out / f"{stem}.json", meta, rows)
    table = common.markdown_table(
        ["size", "threads", "dtype", "backend", "step ms", "step+H ms", "materialize ms",
         "prepare ms", "refine ms (passes, tol)", "load"],
        [[f"{r['n']:,} x {r['k']}", str(r["threads"]), r["dtype"], r["backend"],
          common.fmt(r["step_ms"]), common.fmt(r["step+H_ms"]), common.fmt(r["materialize_ms"]),
          common.fmt(r["prepare_ms"]),
          f"{common.fmt(r['refine_ms'])} ({r['passes']}, {r['refine_tol']:g}"
          f"{'' if r['converged'] else ', not converged'})", f"{r['load1']:.1f}"]
         for r in rows])
    lines = ["# float64 and float32 on the CPU: the cpu kernels and the torch reference", "",
             f"- date (UTC): {meta['date_utc']}; commit: `{meta['git_commit']}`; CPU: "
             f"{meta['machine']['cpu_model']} ({meta['machine']['cpu_cores']} cores)",
             f"- command: `python benchmarks/float64.py {' '.join(sys.argv[1:])}`",
             "- median ms per call; step+H: with the Hessian Newton asks for (dense for k <= 128,"
             " else the diagonal); prepare: probabilities with the first evaluation; refine: "
             "class forgetting, \"retain\" marginals; load: the 1-minute load average after the "
             "row", "", table]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
