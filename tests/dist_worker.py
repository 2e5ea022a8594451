"""One rank of the torch.distributed tests in test_scaling.py (run as a script by them; the
environment carries MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE, as torchrun sets them).

    python dist_worker.py SCENARIO OUTDIR

Each rank initialises a Gloo group, runs the scenario's refines on its own rows and saves what
it got to OUTDIR/rank{RANK}.npz; errors a scenario expects are saved as their messages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def problem():
    """The shared test problem: probabilities (2,500 x 8, float64) and a forget mask."""
    g = torch.Generator().manual_seed(11)
    p = torch.softmax(torch.randn(2500, 8, generator=g, dtype=torch.float64) * 3, 1).numpy()
    mask = np.zeros(len(p), dtype=bool)
    mask[np.random.default_rng(12).permutation(len(p))[:250]] = True
    return p, mask


def weights(mask):
    """Row weights for the weights= scenario (three values, the largest ratio 100)."""
    return np.where(mask, 1.0, 0.3) * (1.0 + 49.5 * (np.arange(len(mask)) % 3 == 0))


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return str(exc)
    except Exception as exc:  # any other type is named
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def mixed_problem(seed: int):
    """A small problem (3,000 x 6, float64) for the mixed-dtype runs; rank 0 holds rows
    [0, 1300)."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((3000, 6)) * 3
    p = np.exp(x - x.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), r.random(3000) < 0.1


def main(scenario: str, outdir: str) -> None:
    import torch.distributed as dist

    import ppu_fast

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.group.WORLD
    p, mask = problem()
    res = {}

    def run(tag, splits, m=mask, **kw):
        dtype = kw.pop("dtype", np.float64)
        s, e = splits[rank], splits[rank + 1]
        q, info = ppu_fast.refine(p[s:e].astype(dtype), m[s:e], return_info=True,
                                  process_group=group, **kw)
        res[f"{tag}_alpha"], res[f"{tag}_q"] = info.alpha.numpy(), q
        res[f"{tag}_iters"] = np.array(info.iterations)

    if scenario == "two":
        splits = [0, 1234, len(p)]
        run("uniform", splits)
        run("prior", splits, pseudo="prior", lam=0.5)
        run("f32", splits, dtype=np.float32)
        # float64 to tol 1e-11: below EXACT_HESSIAN_BELOW the k x k exact Hessian is all-reduced.
        run("tight", splits, tol=1e-11)
        s, e = splits[rank], splits[rank + 1]
        q, info = ppu_fast.refine(torch.from_numpy(p[s:e]).to(torch.bfloat16),
                                  torch.from_numpy(mask[s:e]), return_info=True,
                                  process_group=group)
        res["bf16_alpha"], res["bf16_q"] = info.alpha.numpy(), q.float().numpy()
        s, e = splits[rank], splits[rank + 1]
        w = weights(mask)
        q, info = ppu_fast.refine(p[s:e], mask[s:e], weights=w[s:e], return_info=True,
                                  process_group=group)
        res["weights_alpha"], res["weights_q"] = info.alpha.numpy(), q
        c = np.where(mask, 1.0, 0.5)
        alpha, _ = ppu_fast.solve(np.log(p[s:e]), c[s:e], p.sum(0), process_group=group)
        res["solve_alpha"] = alpha
        path = Path(outdir) / "p.npy"
        if rank == 0:
            np.save(path, p)
        dist.barrier()
        out = Path(outdir) / f"q{rank}.npy"
        info = ppu_fast.refine_file(path, mask[s:e], out, rows=(s, e), chunk_rows=100,
                                    process_group=group)
        res["file_q"] = np.load(out)
        res["file_chunk_rows"] = np.array(info.chunk_rows)
        res["file_phases"] = np.array(list(info.timings))
        res["file_seconds"] = np.array(list(info.timings.values()), dtype=np.float64)
        bad = p[s:e].copy()
        if rank == 1:
            bad[17, 3] = np.nan
        res["nan_error"] = _error(lambda: ppu_fast.refine(bad, mask[s:e], process_group=group))
        short = mask[s:e - 1] if rank == 0 else mask[s:e]
        res["mask_error"] = _error(lambda: ppu_fast.refine(p[s:e], short, process_group=group))
        # Rank 1 passes its rows' labels (0..2, repeated) where its forget mask belongs.
        labels = np.arange(e - s) % 3 if rank == 1 else mask[s:e]
        res["labels_error"] = _error(lambda: ppu_fast.refine(p[s:e], labels, process_group=group))
    elif scenario == "three":
        run("empty", [0, 0, 1500, len(p)])
        run("empty16", [0, 0, 1500, len(p)], dtype=np.float16)
        m2 = np.zeros(len(p), dtype=bool)
        m2[2100:2300] = True
        run("onerank", [0, 700, 2000, len(p)], m=m2, marginals="original")
    elif scenario == "disagree":
        # Options that differ between the ranks, and an argument bad on one rank only: each call
        # must raise on both ranks (a hang or a mismatched collective fails the test).
        s, e = (0, 1234) if rank == 0 else (1234, len(p))
        x, m = p[s:e], mask[s:e]
        pick = (lambda a, b: a if rank == 0 else b)
        for tag, kw in (("lam", dict(lam=pick(1.0, 0.5))),
                        ("method", dict(method=pick("newton", "sinkhorn"))),
                        ("tol", dict(tol=pick(1e-6, 1e-9))),
                        ("max_iter", dict(max_iter=pick(None, 1))),
                        ("marginals", dict(marginals=pick("retain", "original"))),
                        ("pseudo", dict(pseudo=pick("uniform", "prior"))),
                        ("weights", dict(weights=pick(None, np.ones(e - s)))),
                        ("bad_method", dict(method=pick("newton", "bogus")))):
            res[f"{tag}_error"] = _error(lambda: ppu_fast.refine(x, m, process_group=group, **kw))
        res["solve_error"] = _error(lambda: ppu_fast.solve(
            np.log(x), np.ones(e - s), pick(p.sum(0), p.sum(0) * 0.5 + len(p) / 16),
            process_group=group))
        # float16 on one rank, float64 on the other: one problem, then the caller's own
        # collective still pairs with its partner.
        q, info = ppu_fast.refine(pick(x, x.astype(np.float16)), m, process_group=group,
                                  return_info=True)
        res["mixed_alpha"], res["mixed_q"] = info.alpha.numpy(), np.asarray(q, dtype=np.float64)
        res["mixed_residual"] = np.array(info.output_residual)
        res["mixed_message"] = np.array(info.message)
        t = torch.full((3,), 1000.0 * (rank + 1), dtype=torch.float64)
        dist.all_reduce(t, group=group)
        res["after"] = t.numpy()
        path = Path(outdir) / "p.npy"
        if rank == 0:
            np.save(path, p)
        dist.barrier()
        res["budget_error"] = _error(lambda: ppu_fast.refine_file(
            path, m, Path(outdir) / f"q{rank}.npy", rows=(s, e), process_group=group,
            memory_budget=pick("1GiB", "abc")))
        res["same_out_error"] = _error(lambda: ppu_fast.refine_file(
            path, m, Path(outdir) / "q.npy", rows=(s, e), process_group=group))
        # Each rank removes its own temporary file before it raises: list once all have.
        dist.barrier()
        res["leftovers"] = np.array(sorted(f.name for f in Path(outdir).iterdir()
                                           if f.name.startswith(".q") or f.name == "q.npy"))
    elif scenario == "hostile":
        # Found by a hostile review: each of these hung a rank, or was not refused.
        import os
        import warnings

        pick = (lambda a, b: a if rank == 0 else b)
        for seed in range(1, 7):  # float32 / float16 on rank 0, float64 on rank 1
            pm, mm = mixed_problem(seed)
            s, e = pick(0, 1300), pick(1300, len(pm))
            for low in (np.float32, np.float16):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q, info = ppu_fast.refine(pm[s:e].astype(pick(low, np.float64)), mm[s:e],
                                              process_group=group, return_info=True)
                tag = f"mixed{seed}_{np.dtype(low).name}"
                res[f"{tag}_alpha"] = info.alpha.numpy()
                res[f"{tag}_q"] = np.asarray(q, dtype=np.float64)
                res[f"{tag}_converged"] = np.array(info.converged)
        # The prior's pseudo rows were rounded in each rank's own dtype: with marginals="pseudo"
        # the ranks' targets differed in the 8th digit, they stopped a pass apart and one hung.
        pm, mm = mixed_problem(1)
        q, info = ppu_fast.refine(pm[s:e].astype(pick(np.float32, np.float64)), mm[s:e],
                                  pseudo="prior", marginals="pseudo", process_group=group,
                                  return_info=True)
        res["prior_alpha"], res["prior_passes"] = info.alpha.numpy(), np.array(info.iterations)
        res["prior_residual"] = np.array(info.residual)
        # A rank holding no rows passed any weights unchecked.
        res["empty_weights_error"] = _error(lambda: ppu_fast.refine(
            pm[pick(0, 0):pick(len(pm), 0)], mm[pick(0, 0):pick(len(pm), 0)],
            weights=pick(np.ones(len(pm)), np.array([-1.0, np.nan, 0.0])), process_group=group))
        s, e = pick(0, 1234), pick(1234, len(p))
        w = [1.0] * (e - s)
        if rank == 1:
            w[3] = 10 ** 400
        res["overflow_error"] = _error(lambda: ppu_fast.refine(p[s:e], mask[s:e], weights=w,
                                                               process_group=group))
        path = Path(outdir) / "p.npy"
        if rank == 0:
            np.save(path, p)
            (Path(outdir) / "rodir").mkdir()
        dist.barrier()
        real_access = os.access
        # Rank 1's folder reads as not writable (the tests run as root, who may write anything).
        os.access = lambda f, mode, **kw: ("rodir" not in str(f)) and real_access(f, mode, **kw)
        res["readonly_error"] = _error(lambda: ppu_fast.refine_file(
            path, mask[s:e], Path(outdir) / pick("q0.npy", "rodir/q1.npy"), rows=(s, e),
            process_group=group))
        os.access = real_access
        res["overlap_error"] = _error(lambda: ppu_fast.refine_file(
            path, mask[pick(0, 1000):e], Path(outdir) / f"o{rank}.npy",
            rows=(pick(0, 1000), e), process_group=group))
        empty_out = np.empty((0, p.shape[1])) if rank == 0 else np.empty((len(p), p.shape[1]))
        x0 = p[:0] if rank == 0 else p
        ppu_fast.refine(x0, mask[:0] if rank == 0 else mask, out=empty_out, process_group=group)
        res["empty_out_q"] = empty_out
        res["group_error"] = _error(lambda: ppu_fast.refine(p[s:e], mask[s:e],
                                                            process_group="world"))
        # A sparse / meta matrix on one rank failed inside torch after the checks, on that rank
        # only: the other waited in the next collective.
        dense = torch.as_tensor(p[s:e])
        res["sparse_error"] = _error(lambda: ppu_fast.refine(
            dense.to_sparse() if rank == 1 else dense, mask[s:e], process_group=group))
        res["meta_error"] = _error(lambda: ppu_fast.refine(
            dense.to("meta") if rank == 1 else dense, mask[s:e], process_group=group))
        # out= the input on every rank, a NaN in rank 1's rows: rank 0's rows are valid, but its
        # pass wrote log P^ over them before the error reached it.
        mine = p[s:e].copy()
        if rank == 1:
            mine[2, 1] = np.nan
        before = mine.copy()
        res["in_place_error"] = _error(lambda: ppu_fast.refine(mine, mask[s:e], out=mine,
                                                               process_group=group))
        res["in_place_changed"] = np.array(not np.array_equal(mine, before, equal_nan=True))
        dist.barrier()  # as above: every rank has cleaned up
        res["leftovers"] = np.array(sorted(f.name for f in Path(outdir).rglob("*")
                                           if f.name.startswith(".")))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    np.savez(Path(outdir) / f"rank{rank}.npz", **res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
