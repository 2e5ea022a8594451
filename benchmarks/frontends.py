"""ppu_fast as another front end's solver: agreement and speed against the official PPU solver's
algorithm and POT's Sinkhorn, on the official code's conventions.

    python benchmarks/frontends.py [--sizes 50000x10 10000x100] [--out benchmarks/results]

Problem (the official front end's, zzhao71/AdaProb ``refine_prediction.py``): P^ = the model's
probabilities with the forget rows replaced by uniform draws normalised (``pseudo="random-simplex"``),
the target its own column totals with the forgotten class's total halved and the other half spread
over the other classes (the variant left commented in that file; with P^'s own totals unchanged the
exact answer is Q = P^), weights 1 (the shipped script) or 1 / entropy of the row of P^ (the
official notebooks). The model: standard-normal logits times 3, class 0 forgotten (10 %).

Anchors, each timed end to end on the same float64 P^:
- "official, 10 iterations": the official solver's algorithm (alternate an exact row normalisation
  with one scalar Newton root solve per column, scipy.optimize.newton, tol 1e-5, 30 steps, as that
  file calls it), written here from its description, run for the 10 iterations it ships with;
- "official, converged": the same until its residual stops improving (at most 2,000 iterations);
- "POT sinkhorn" (weights 1 only: equal weights make the problem entropic OT with kernel P^):
  ``ot.sinkhorn(ones, M, -log P^, reg=1, stopThr=1e-9)``.
ppu_fast: ``refine(P^, mask, pseudo=None, weights=w, marginals=M, tol=1e-7)`` on float32 input,
the call a front end makes. Reported: each anchor's residual ||colsum - M||_1 / N, its time, and
max |Q_anchor - Q_ppu_fast|. Writes ``frontends-<stamp>.md`` / ``.json`` (benchmarks/common.py).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import optimize  # here, not in the timed solver: its import took ~250 ms of the first row

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ppu_fast  # noqa: E402


def make_problem(n: int, k: int, weighted: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, 1)
    mask = logits.argmax(1) == 0
    u = torch.rand(int(mask.sum()), k, generator=g, dtype=torch.float64)
    p_hat = p.clone()
    p_hat[mask] = u / u.sum(1, keepdim=True)
    m = p_hat.sum(0)
    moved = m[0] * 0.5
    m[0] -= moved
    m[1:] += moved / (k - 1)
    w = (1.0 / -(p_hat * torch.log(p_hat)).sum(1)) if weighted else torch.ones(n, dtype=torch.float64)
    return p_hat.numpy(), mask.numpy(), m.numpy(), w.numpy()


def official_algorithm(a: np.ndarray, m: np.ndarray, w: np.ndarray, iters: int,
                       until_converged: bool = False):
    """The official solver's scheme: q_ik = a_ik x_i y_ik with y_ik = exp(-nu_k / w_i); x from the
    row sums, then each nu_k by a scalar Newton solve of sum_i a_ik x_i exp(-nu_k / w_i) = m_k."""
    n, k = a.shape
    nu = np.zeros(k)
    y = np.exp(-nu[None, :] / w[:, None])
    best, stall, done = np.inf, 0, 0
    for it in range(iters):
        x = 1.0 / (a * y).sum(1)
        for j in range(k):
            aj = a[:, j] * x

            def f(v, aj=aj, mj=m[j]):
                return float((aj * np.exp(-v / w)).sum()) - mj

            def fp(v, aj=aj):
                return float(-(aj * np.exp(-v / w) / w).sum())

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the shipped tol/maxiter stop it early
                nu[j] = optimize.newton(f, nu[j], fprime=fp, maxiter=30, tol=1e-5, disp=False)
        y = np.exp(-nu[None, :] / w[:, None])
        done = it + 1
        if until_converged:
            q = a * y / (a * y).sum(1, keepdims=True)
            res = np.abs(q.sum(0) - m).sum() / n
            if res < best * (1 - 1e-3):
                best, stall = res, 0
            else:
                stall += 1
                if stall >= 20:
                    break
    q = a * y / (a * y).sum(1, keepdims=True)
    return q, done


def timed(fn, reps: int, warmup: int = 0):
    """(the last result, the median ms of ``reps`` calls after ``warmup`` untimed ones)."""
    ts, out = [], None
    for _ in range(warmup):
        fn()
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts) * 1e3


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.size_arg, default=["50000x10", "10000x100"])
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    ap.add_argument("--reps", type=common.positive_int, default=5)
    args = ap.parse_args()
    if any(s.endswith("x1") for s in args.sizes):
        ap.error("argument --sizes: expected k >= 2 classes (with one class there is nothing "
                 "to refine)")
    torch.set_num_threads(2)
    reps_a = min(3, args.reps)  # the anchors take up to a second a call
    rows = []
    for size in args.sizes:
        n, k = (int(v) for v in size.split("x"))
        for weighted in (False, True):
            a, mask, m, w = make_problem(n, k, weighted)
            res = lambda q: float(np.abs(q.sum(0) - m).sum()) / n  # noqa: E731
            p32 = torch.from_numpy(a).float()
            (q_ppu, info), t_ppu = timed(lambda: ppu_fast.refine(
                p32, mask, pseudo=None, weights=w, marginals=m, tol=1e-7, return_info=True),
                args.reps, warmup=1)
            q_ppu = q_ppu.double().numpy()
            wname = "1 / entropy" if weighted else "1"
            rows.append(dict(size=size, weights=wname, impl="ppu_fast refine", ms=t_ppu,
                             iterations=info.iterations, residual=res(q_ppu), max_diff=0.0))
            (q_off, it), t_off = timed(lambda: official_algorithm(a, m, w, 10), reps_a)
            rows.append(dict(size=size, weights=wname, impl="official, 10 iterations", ms=t_off,
                             iterations=it, residual=res(q_off),
                             max_diff=float(np.abs(q_off - q_ppu).max())))
            (q_conv, it), t_conv = timed(lambda: official_algorithm(a, m, w, 2000, True), reps_a)
            rows.append(dict(size=size, weights=wname, impl="official, converged", ms=t_conv,
                             iterations=it, residual=res(q_conv),
                             max_diff=float(np.abs(q_conv - q_ppu).max())))
            if not weighted:
                try:
                    import ot
                except ImportError:
                    ot = None
                if ot is not None:
                    cost = -np.log(a)

                    def pot():
                        return ot.sinkhorn(np.ones(n), m, cost, reg=1.0, stopThr=1e-9,
                                           numItermax=100000)
                    q_pot, t_pot = timed(pot, reps_a)
                    rows.append(dict(size=size, weights=wname, impl="POT sinkhorn (stopThr 1e-9)",
                                     ms=t_pot, iterations=None, residual=res(q_pot),
                                     max_diff=float(np.abs(q_pot - q_ppu).max())))
            for r in rows[-4:] if not weighted else rows[-3:]:
                print(f"{r['size']:>10} w={r['weights']:12s} {r['impl']:28s} {r['ms']:10.1f} ms "
                      f"res {r['residual']:.2e} max|dQ| {r['max_diff']:.2e}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = common.free_stem(out, "frontends")
    meta = common.metadata("cpu")
    common.write_json(out / f"{stem}.json", meta, rows, {"sizes": args.sizes})
    lines = ["# ppu_fast against the official PPU solver's algorithm and POT", "",
             f"- date (UTC): {meta['date_utc']}; commit: `{meta['git_commit']}`",
             f"- CPU: {meta['machine']['cpu_model']}, {meta['machine']['cpu_cores']} cores, torch "
             f"threads 2; numpy {meta['versions']['numpy']}, POT {meta['versions']['POT']}",
             f"- command: `python benchmarks/frontends.py {' '.join(sys.argv[1:])}`",
             f"- median ms: ppu_fast's refine over {args.reps} calls after one untimed; the "
             f"official algorithm and POT over {reps_a} calls each", "",
             "| size | weights | solver | median ms | iterations | residual | max abs Q diff to ppu_fast | x ppu_fast time |",
             "|---|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["weights"] == r["weights"]
                    and b["impl"] == "ppu_fast refine")
        lines.append(f"| {r['size']} | {r['weights']} | {r['impl']} | {r['ms']:.1f} | "
                     f"{r['iterations'] if r['iterations'] is not None else ''} | "
                     f"{r['residual']:.1e} | {r['max_diff']:.1e} | {r['ms'] / base['ms']:.1f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
