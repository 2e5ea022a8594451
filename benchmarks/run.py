"""Benchmark every available backend's ``step`` and a full ``refine`` beside three anchors.

    python benchmarks/run.py --device cpu|cuda --out benchmarks/results [--sizes 50000x10 ...]
                             [--quick]

For each size N x k (float32) and each backend the registry can run on this device:
  * ``step`` with hessian=False, and ``step`` with the Hessian the Newton solver asks for
    (dense for k <= solver.DENSE_HESSIAN_MAX_K, else its diagonal); where that dense Hessian
    is a row sample (base.hessian_stride > 1), the compiled backends' ``step`` with
    hessian="exact" too (``step+exactH``: what a pass costs once a stalled Newton asks for it);
  * a full ``ppu_fast.refine`` (Newton, tol 1e-6, lam 1) of a synthetic confident classifier
    (true-class logit +6) forgetting the first max(1, k // 10) classes (10 % of the rows),
    broken down into its phases (``info.timings``: prepare, the solver's passes, materialize)
    and divided by the same run's step.
Anchors, measured in the same run on the same inputs:
  (a) the pure-PyTorch reference in eager mode: ``TorchBackend`` (backend "torch");
  (b) ``torch.compile(step_chunk, dynamic=False)`` -- the reference's own per-chunk function,
      compiled once and called per row chunk exactly as ``TorchBackend.step`` calls it (we run
      ``TorchBackend.step`` itself with its module-level ``step_chunk`` swapped for the compiled
      one), so (a) and (b) differ only by compilation; its ``refine`` is ``ppu_fast.refine`` with
      backend resolution returning this compiled backend;
  (c) POT's numpy ``ot.sinkhorn`` (lam == 1 makes the problem entropic OT with kernel P^): the
      time of one iteration of its ``sinkhorn_knopp`` loop (two matrix-vector products with
      the precomputed K, no exp, plus its every-10th-iteration marginal check), run through
      POT's own numpy backend on the same N x k problem; see ``pot_per_iteration``. Skipped
      when POT is not importable or the predicted time exceeds --pot-max-s.
Writes <out>/<device>-<UTC stamp>.json and .md, a .png bar chart and <out>/latest-<device>.md.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import ppu_fast  # noqa: E402
from ppu_fast.backends import BACKEND_NAMES, load, reasons  # noqa: E402
from ppu_fast.backends.base import hessian_stride  # noqa: E402
from ppu_fast.backends.cpu import empty_buffer  # noqa: E402
from ppu_fast.solver import DENSE_HESSIAN_MAX_K  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional (the GPU machines may lack it)
    class tqdm:  # type: ignore[no-redef]
        def __init__(self, iterable=None, total=None, desc="", **kw):
            self.iterable, self.desc = iterable, desc

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix_str(self, s):
            print(f"[{self.desc}] {s}", file=sys.stderr, flush=True)

        def update(self, n=1):
            pass

        def close(self):
            pass

DEFAULT_SIZES = {
    "cpu": ["50000x10", "50000x100", "1000000x100", "262144x1000"],
    # The sizes with targets first: the GPU check's deadline and compile budget cut from the end.
    "cuda": ["50000x10", "1281167x1000", "50000x32000", "50000x100", "262144x1000"],
}
EAGER = "torch eager (a)"
COMPILED = "torch.compile (b)"
POT = "POT sinkhorn (c)"

# The issues' targets (requirements, not measurements). "step" means hessian=False; "refine/step"
# compares a refine with (its solver passes + slack) steps of the same run; "x_vs_a" is the
# speed-up over the pure-PyTorch reference's refine in the same run.
TARGETS = [
    # issue 9: refine at the memory bound
    {"device": "cpu", "size": (1000000, 100), "op": "refine", "passes_plus": 3,
     "text": "<= (passes + 3) steps (2 threads)"},
    {"device": "cpu", "size": (262144, 1000), "op": "refine", "passes_plus": 3,
     "text": "<= (passes + 3) steps (2 threads)"},
    {"device": "cpu", "size": (50000, 10), "op": "refine", "passes_plus": 3,
     "text": "<= (passes + 3) steps (2 threads)"},
    {"device": "cpu", "size": (50000, 100), "op": "refine", "max_ms": 10.0,
     "text": "<= 10 ms (2 threads)"},
    {"device": "cpu", "size": (1000000, 100), "op": "refine", "min_x_vs_a": 10.0,
     "text": ">= 10x the torch backend's refine"},
    {"device": "cuda", "size": (1281167, 1000), "op": "refine", "max_ms": 15.0,
     "text": "<= 15 ms"},
    {"device": "cuda", "size": (50000, 10), "op": "refine", "max_ms": 0.5, "text": "<= 0.5 ms"},
    {"device": "cuda", "size": (1281167, 1000), "op": "step", "min_pct_copy": 80.0,
     "text": ">= 80 % of copy BW"},
    # earlier issue: the kernels alone
    {"device": "cpu", "size": (50000, 10), "op": "step", "max_ms": 0.15,
     "text": "<= 0.15 ms (2 threads)"},
    {"device": "cpu", "size": (262144, 1000), "op": "step", "max_ms": 70.0,
     "text": "<= 70 ms (2 threads)"},
]

# The ways a refine is timed (all of them judged against the refine targets).
REFINE_OPS = ("refine", "refine out=", "refine cold")
PHASES = ("setup", "prepare", "targets", "solve", "materialize")


def parse_size(s: str):
    n, k = s.lower().replace(",", "").replace("_", "").split("x")
    return int(n), int(k)


def copy_bandwidth(device: str, args) -> Optional[Dict[str, float]]:
    """Device-to-device copy of a large float32 tensor: (bytes read + written) / median time."""
    if device != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info()
    nbytes = int(min(4 << 30, free // 8)) // 4 * 4
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = common.time_call(lambda i: dst.copy_(src), device, budget_s=args.budget, min_reps=5,
                         max_reps=100, warmup=3)
    del src, dst
    torch.cuda.empty_cache()
    t["bytes"] = 2 * nbytes
    t["GB_s"] = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9
    return t


# Reads of K per POT iteration: two matrix-vector products, and every 10th iteration's check.
POT_K_READS = 2.1


def pot_per_iteration(log_p: torch.Tensor, marg: torch.Tensor, args) -> Dict[str, object]:
    """Anchor (c): one iteration of POT's numpy ``sinkhorn_knopp`` on the same N x k problem.

    With lam == 1 the problem is entropic OT with cost M = -log P^ and reg = 1, so POT's Gibbs
    kernel K = exp(-M / reg) is P^. POT builds K (and Kp = K / a, which is K itself here since
    a = 1) once, then each iteration is ``v = b / (K^T u); u = 1 / (Kp v)`` through its numpy
    backend, plus the marginal check ``einsum("i,ij,j->j", u, K, v)`` every 10th iteration. We
    build K once (untimed) and time ten of POT's iterations with one check, through the same
    backend calls, divided by ten; timing ``ot.sinkhorn`` itself and subtracting its setup proved
    too noisy (the setup's N x k exp dwarfs an iteration).
    """
    import numpy as np
    from ot.backend import get_backend

    k_mat = torch.exp(log_p.float()).cpu().numpy()  # K = exp(-M / reg) with M = -log P^, reg = 1
    n = k_mat.shape[0]
    a = np.ones(n, dtype=np.float32)
    b = marg.cpu().numpy().astype(np.float32)
    nx = get_backend(k_mat, a, b)
    kp = k_mat  # POT's Kp = (1 / a)[:, None] * K, equal to K for a = 1
    state = {"u": nx.ones(n, type_as=k_mat) / n}

    def ten_iterations(_i):
        u = state["u"]
        for _ in range(10):
            v = b / nx.dot(k_mat.T, u)
            u = 1.0 / nx.dot(kp, v)
        tmp2 = nx.einsum("i,ij,j->j", u, k_mat, v)  # POT's every-10th-iteration check
        nx.norm(tmp2 - b)
        state["u"] = u

    t = common.time_call(ten_iterations, "cpu", budget_s=args.budget, min_reps=3,
                         max_case_s=args.pot_max_s / 2)
    out = {key: (t[key] / 10 if key.endswith("_ms") else t[key]) for key in t}
    out["pot_call_ms"] = t["median_ms"]
    out["note"] = "POT numpy sinkhorn_knopp loop body, (10 iterations + 1 check) / 10"
    return out


def pot_predicted_s(n: int, k: int, prev: Optional[Dict[str, object]]) -> float:
    """Predicted wall time of the POT measurement, scaled linearly in N*k from the previous
    size: at least five calls of ten iterations (warm-up, estimate, >= 3 repeats)."""
    if not prev:
        return 0.0
    return n * k / prev["elems"] * 5 * prev["pot_call_ms"] * 1e-3


def marginals_retain(p: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
    """refine's default "retain" targets: (N / N_retain) * colsum(P[retain rows])."""
    n = p.shape[0]
    retain = ~forget
    return p[retain].sum(dim=0, dtype=torch.float64) * (n / int(retain.sum()))


def measure_size(n: int, k: int, device: str, args, state, bar) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    size = f"{n}x{k}"
    hmode = True if k <= DENSE_HESSIAN_MAX_K else "diag"
    hname = "step+H" if hmode is True else "step+diagH"
    elem_bytes = 4

    def base(impl, op):
        return {"size": size, "n": n, "k": k, "dtype": "float32", "impl": impl, "op": op}

    def over_deadline() -> bool:
        return time.perf_counter() - state["t0"] > args.deadline_s

    def record(impl, op, fn, **kw):
        row = base(impl, op)
        if over_deadline():
            row["note"] = "skipped: run deadline (--deadline-s) reached"
            rows.append(row)
            return row
        bar.set_postfix_str(f"{size} {impl} {op}")
        try:
            row.update(common.time_call(fn, device, budget_s=args.budget,
                                        max_case_s=args.max_case_s, min_reps=args.min_reps,
                                        warmup=kw.get("warmup", 1), before=kw.get("before")))
        except Exception as exc:  # one failing backend must not stop the others
            row["note"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        return row

    bar.set_postfix_str(f"{size}: generating data")
    y, p = common.confident_classifier(n, k, device=device, seed=0)
    forget = y < max(1, k // 10)  # class unlearning of 10 % of the rows
    del y
    log_p, inv_c, alpha = common.step_inputs(p, forget, lam=1.0)
    # Rotate input copies so small matrices are not served from cache on every repeat.
    nb = common.n_buffers(log_p.numel() * elem_bytes, device)
    lps = [log_p] + [log_p.clone() for _ in range(nb - 1)]
    ps = [p] + [p.clone() for _ in range(nb - 1)]
    state["meta_sizes"][size] = {"buffers_rotated": nb}

    impls = []  # (label, backend object or None, registry name or None)
    for name in BACKEND_NAMES:
        if name == "torch":
            continue
        try:
            why = reasons(name, log_p)
        except Exception as exc:  # a broken backend is reported, the others still measured
            why = [f"reasons() raised {type(exc).__name__}: {exc}"]
        if why:
            state["unavailable"].setdefault(name, "; ".join(why))
            continue
        impls.append((name, load(name)[0], name))
    impls.append((EAGER, load("torch")[0], "torch"))
    if not args.no_compile:
        impls.append((COMPILED, state["compiled"], None))

    for label, be, reg_name in impls:
        if label == COMPILED and state["compile_s"] > args.compile_budget_s:
            for op in ("step", hname, "refine"):
                r = base(label, op)
                r["note"] = (f"skipped: torch.compile already took {state['compile_s']:.0f} s "
                             f"(budget --compile-budget-s {args.compile_budget_s:.0f} s)")
                rows.append(r)
            continue
        step_ops = [("step", False), (hname, hmode)]
        if hmode is True and hessian_stride(n, k) > 1 and label not in (EAGER, COMPILED):
            step_ops.append(("step+exactH", "exact"))
        for op, h in step_ops:
            fn = (lambda i, h=h: be.step(lps[i % nb], inv_c, alpha, h))
            compile_s = None
            if label == COMPILED and state["compile_s"] > args.compile_budget_s:
                r = base(label, op)
                r["note"] = (f"skipped: torch.compile already took {state['compile_s']:.0f} s "
                             f"(budget --compile-budget-s {args.compile_budget_s:.0f} s)")
                rows.append(r)
                continue
            if label == COMPILED and not over_deadline():
                # Compile outside the timer (one call), so the timer's warm-up and its
                # estimate of the per-call cost see the compiled code only.
                t_c = time.perf_counter()
                try:
                    fn(0)
                    common._sync(device)
                except Exception:
                    pass  # record() below reports the error
                compile_s = time.perf_counter() - t_c
                state["compile_s"] += compile_s
            r = record(label, op, fn)
            if compile_s is not None:
                r["compile_s"] = compile_s  # first call, compilation included
            if "median_ms" in r:
                t = r["median_ms"] * 1e-3
                r["G_exp_s"] = n * k / t / 1e9
                r["GB_s"] = n * k * elem_bytes / t / 1e9
                if state.get("copy"):
                    r["pct_copy_bw"] = 100.0 * r["GB_s"] / state["copy"]["GB_s"]

        def refine_call(i, reg_name=reg_name, be=be, outs=None, route=None):
            ctx = common.forced_backend(be) if reg_name is None else contextlib.nullcontext()
            with ctx, route or contextlib.nullcontext(), warnings.catch_warnings():
                warnings.simplefilter("ignore", ppu_fast.ConvergenceWarning)
                q, info = ppu_fast.refine(ps[i % nb], forget, lam=1.0, tol=1e-6,
                                          method="newton", backend=reg_name or "torch",
                                          return_info=True,
                                          out=None if outs is None else outs[i % nb])
            state["infos"].append(info)
            # Held until the next call has returned, as `q = refine(...)` in a caller's loop: the
            # new result cannot reuse the previous one's memory.
            state["held"] = q
            return None

        skip_big = args.quick and label in (EAGER, COMPILED) and n * k > args.quick_refine_max
        # Anchor (b)'s refine needs the Hessian-step graph; if that was skipped for the compile
        # budget, the refine would compile it: skip it too.
        skip_compile = label == COMPILED and rows[-1]["op"] == hname and "median_ms" not in rows[-1]
        if skip_compile:
            r = base(label, "refine")
            r["note"] = "skipped: its step graph was not compiled (see above)"
            rows.append(r)
        elif skip_big:
            r = base(label, "refine")
            r["note"] = "skipped in --quick (anchor refine above --quick-refine-max elements)"
            rows.append(r)
        else:
            ops = [("refine", None, None, None)]
            if label not in (EAGER, COMPILED):
                # The same call writing into reused buffers (out=): no N x k allocation at all.
                ops.append(("refine out=", [torch.empty_like(p) for _ in range(nb)], None, None))
                if device == "cpu":
                    # With the host cache emptied before each call: the result's pages are
                    # fresh, and their first touch (the kernel zeroing them) is paid in the call,
                    # as by a process's first refine.
                    ops.append(("refine cold", None, ppu_fast.empty_host_cache, None))
                elif label in ("cuda", "triton"):
                    # The passes through step and its device-side gathering, as before the
                    # backends' own bind_step: that route's per-pass host cost, in this run.
                    ops.append(("refine step route", None, None, be))
            for op_name, outs, before, route_of in ops:
                state["infos"] = []
                hc0 = ppu_fast.host_cache_stats()
                r = record(label, op_name,
                           lambda i, outs=outs, route_of=route_of: refine_call(
                               i, outs=outs, route=(None if route_of is None
                                                    else common.generic_passes(route_of))),
                           before=before)
                state.pop("held", None)
                _refine_details(r, state["infos"])
                _host_cache_note(r, hc0, ppu_fast.host_cache_stats(), device)
            del ops
        if device == "cuda":
            torch.cuda.empty_cache()

    # What a fresh N x k result costs before any kernel runs: the cold refine above allocates
    # one (the others reuse memory), and its first touch is paid wherever it happens.
    reused = torch.empty_like(p)
    record("memory", "fresh N x k buffer + fill",
           lambda i: empty_buffer(p.shape, p.dtype, p.device).fill_(0.0),
           before=ppu_fast.empty_host_cache)
    record("memory", "fill (reused buffer)", lambda i: reused.fill_(0.0))
    del reused

    # Anchor (c): POT.
    r = base(POT, "sinkhorn iter")
    if args.no_pot:
        r["note"] = "skipped: --no-pot"
    elif common._version("ot") is None:
        r["note"] = "skipped: POT not importable"
    elif over_deadline():
        r["note"] = "skipped: run deadline (--deadline-s) reached"
    else:
        pred = pot_predicted_s(n, k, state.get("pot_prev"))
        if pred > args.pot_max_s:
            r["note"] = f"skipped: predicted {pred:.0f} s > --pot-max-s {args.pot_max_s:.0f} s"
        else:
            bar.set_postfix_str(f"{size} POT")
            try:
                r.update(pot_per_iteration(lps[0], marginals_retain(p, forget), args))
                t = r["median_ms"] * 1e-3
                if t > 0:
                    # K read twice an iteration (K^T u, K v) and once more by every 10th's check.
                    r["GB_s"] = POT_K_READS * n * k * 4 / t / 1e9
                state["pot_prev"] = {"elems": n * k, "pot_call_ms": r["pot_call_ms"]}
            except Exception as exc:
                r["note"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
    rows.append(r)

    del lps, ps, log_p, p, inv_c, alpha, forget
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _refine_details(r: Dict[str, object], infos) -> None:
    """Passes, convergence and the phase medians (host clock) of a refine row's timed calls."""
    if not infos or "median_ms" not in r:
        return
    info = infos[-1]
    # The solver's passes over the matrix after prepare's (step calls), the last one writing Q
    # where the refine fused it (info.materialized: no separate materialize then).
    r["passes"] = info.steps
    r["materialized"] = info.materialized
    r["evaluations"] = info.iterations  # the first may come from prepare's pass
    r["converged"] = info.converged
    r["residual"] = info.residual
    timed = infos[-r["reps"]:] if r.get("reps") else infos
    r["phases_ms"] = {ph: statistics.median(i.timings.get(ph, 0.0) for i in timed) * 1e3
                      for ph in PHASES}


def _host_cache_note(r, before: dict, after: dict, device: str) -> None:
    """Record how the row's calls (warm-up included) got their CPU buffers: from the host cache
    (hits) or as fresh mappings (misses)."""
    if device != "cpu" or not after["limit_bytes"] and not after["misses"]:
        return
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    r["host_cache"] = {"hits": hits, "misses": misses, "limit_bytes": after["limit_bytes"]}
    note = f"host cache: {hits} hits, {misses} misses"
    r["note"] = f"{r['note']}; {note}" if r.get("note") else note


def add_ratios_and_targets(rows, device: str, state) -> None:
    """x vs (a) / (b): anchor time / this time for the same size and op (> 1: faster)."""
    ref = {}
    for r in rows:
        if r.get("median_ms") and r["impl"] in (EAGER, COMPILED):
            ref[(r["size"], r["op"], r["impl"])] = r["median_ms"]
    threads = torch.get_num_threads()
    steps = {(r["size"], r["impl"]): r["median_ms"] for r in rows
             if r.get("op") == "step" and r.get("median_ms")}
    for r in rows:
        if (r.get("op") in REFINE_OPS and r.get("median_ms")
                and (r["size"], r["impl"]) in steps):
            r["refine_over_step"] = r["median_ms"] / steps[(r["size"], r["impl"])]
    for r in rows:
        r.pop("targets", None)  # recomputed after every size
        t = r.get("median_ms")
        if not t:
            continue
        for impl, key in ((EAGER, "x_vs_a"), (COMPILED, "x_vs_b")):
            op = "refine" if r["op"] in REFINE_OPS else r["op"]  # anchors: default call
            a = ref.get((r["size"], op, impl))
            if a:
                r[key] = a / t
        for tg in TARGETS:
            op = "refine" if r["op"] in REFINE_OPS else r["op"]
            if tg["device"] != device or tg["op"] != op or (r["n"], r["k"]) != tg["size"]:
                continue
            if r["impl"] in (EAGER, COMPILED, POT):
                continue  # targets are for the package's backends
            if "max_ms" in tg:
                met = t <= tg["max_ms"]
            elif "passes_plus" in tg:
                if r.get("refine_over_step") is None or r.get("passes") is None:
                    continue
                met = r["refine_over_step"] <= r["passes"] + tg["passes_plus"]
            elif "min_x_vs_a" in tg:
                if r.get("x_vs_a") is None:
                    continue
                met = r["x_vs_a"] >= tg["min_x_vs_a"]
            else:
                pct = r.get("pct_copy_bw")
                if pct is None:
                    continue
                met = pct >= tg["min_pct_copy"]
            r.setdefault("targets", []).append({"text": tg["text"], "met": met})
            r["target"] = "; ".join(x["text"] for x in r["targets"])
            r["target_met"] = all(x["met"] for x in r["targets"])
            if device == "cpu" and threads != 2:
                r["target_note"] = f"measured with {threads} threads, target is for 2"


def render_markdown(meta, rows, device, state, png_name: Optional[str]) -> str:
    m = meta["machine"]
    v = meta["versions"]
    lines = [f"# ppu_fast benchmarks: {device}", "",
             f"- date (UTC): {meta['date_utc']}; commit: `{meta['git_commit']}`",
             f"- CPU: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads "
             f"{m['torch_threads']}" + (f"; GPU: {m['gpu']['name']}" if m.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in v),
             f"- options: {state['argv']}"]
    la = state.get("load")
    if la:
        lines.append(f"- 1-min load average: {la[0]:.2f} at start, {la[1]:.2f} at the last "
                     f"write (the run itself adds up to its thread count; a load above the "
                     f"core count means other processes competed and inflated the timings)")
    if state.get("copy"):
        c = state["copy"]
        lines.append(f"- device-to-device copy bandwidth: {common.fmt(c['GB_s'])} GB/s "
                     f"(median of {c['reps']}, {c['bytes'] / 1e9:.2f} GB read + written)")
    if state["unavailable"]:
        lines.append("- not measured (unavailable): " + "; ".join(
            f"{k}: {v}" for k, v in state["unavailable"].items()))
    if state["compile_s"]:
        lines.append(f"- torch.compile time spent (excluded from timings): "
                     f"{state['compile_s']:.1f} s")
    lines += ["", "Median over `reps` repeats after warm-up; IQR = interquartile range "
              "(below 5 repeats: the fastest and slowest repeat, marked (range)). "
              "G exp/s and GB/s count N*k exps and N*k*4 bytes of log_p per step (POT's row: "
              f"{POT_K_READS} reads of its float32 K per iteration, two matrix-vector products "
              "and every 10th iteration's check). "
              "x vs (a)/(b) = anchor median / this median (> 1 is faster; refine out= and refine "
              "cold against the anchor's refine). (b) compiles the reference's per-chunk step "
              "function; its Hessian's Gram product, prepare and materialize run eager "
              "(benchmarks/README.md). "
              "refine = full `ppu_fast.refine` (Newton, tol 1e-6, lam 1, class unlearning of 10 % "
              "of the rows); `passes` = the solver's passes over the matrix after prepare's (step "
              "calls; where the last one writes Q, `info.materialized`, no materialize pass "
              "follows); refine / step = refine median / the same backend's step median; the "
              "phases are medians of the refine's own clock (`info.timings`). "
              "refine holds its previous result until the next call returns (as "
              "`q = refine(...)` in a loop), so its fresh N x k result comes from ppu_fast's "
              "host cache (on a CPU: memory a freed result left mapped); refine out= writes into "
              "reused buffers; refine cold empties the host cache before each call (untimed), "
              "so its result's pages are new to the process, as in a process's first refine; "
              "refine step route (GPU backends) runs the solver's passes through `step` and "
              "its device-side gathering of the results (the base class's `bind_step`) instead "
              "of the backend's own bound route (pinned staging, one packed copy, H assembled "
              "on the host). "
              "The note of a CPU refine row counts its calls' buffers (warm-up included) "
              "served by the host cache (hits) and freshly mapped (misses). "
              "memory: a new N x k buffer (ppu_fast.backends.cpu.empty_buffer; on a CPU after "
              "ppu_fast.empty_host_cache, as the cold refine gets it) filled once, against a "
              "fill of a reused buffer; their difference is what the first touch of fresh pages "
              "costs on this machine in this run (the operating system's zeroing, and on a VM "
              "the host backing them).",
              ""]
    show_pct = any("pct_copy_bw" in r for r in rows)
    header = ["impl", "op", "median ms", "IQR ms", "reps", "G exp/s", "GB/s"]
    if show_pct:
        header.append("% copy BW")
    header += ["x vs (a)", "x vs (b)", "passes", "refine / step",
               "prepare / solve / materialize ms", "target", "note"]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for size in sizes:
        lines += [f"## {size} float32", ""]
        body = []
        for r in rows:
            if r["size"] != size:
                continue
            iqr = ""
            if r.get("q1_ms") is not None and r.get("q3_ms") is not None:
                iqr = f"{common.fmt(r['q1_ms'])}-{common.fmt(r['q3_ms'])}"
                if r.get("spread") == "range":
                    iqr += " (range)"
            tgt = "; ".join(f"{'MET' if x['met'] else 'MISSED'} {x['text']}"
                            for x in r.get("targets", []))
            if tgt and r.get("target_note"):
                tgt += f" ({r['target_note']})"
            row = [r["impl"], r["op"], common.fmt(r.get("median_ms")), iqr,
                   str(r.get("reps", "")), common.fmt(r.get("G_exp_s")), common.fmt(r.get("GB_s"))]
            if show_pct:
                row.append(common.fmt(r.get("pct_copy_bw")))
            passes = str(r.get("passes", ""))
            if r.get("converged") is False:
                passes += " (not converged)"
            ph = r.get("phases_ms")
            phases = (" / ".join(common.fmt(ph[p]) for p in ("prepare", "solve", "materialize"))
                      if ph else "")
            row += [common.fmt(r.get("x_vs_a")), common.fmt(r.get("x_vs_b")), passes,
                    common.fmt(r.get("refine_over_step")), phases, tgt, r.get("note", "")]
            body.append(row)
        lines += [common.markdown_table(header, body), ""]
    if png_name:
        lines += [f"![median ms per implementation and size]({png_name})", ""]
    return "\n".join(lines)


def plot(rows, path: Path, device: str) -> Optional[str]:
    """Log-scale bar chart of median ms, one group per size, one bar per implementation; one
    panel per op (step, refine). Returns the file name, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    ops = [("step", "step (hessian=False); POT: one iteration"),
           ("refine", "full refine (Newton, tol 1e-6)")]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows
                               if r["op"] in ("step", "refine", "sinkhorn iter")))
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, (op, title) in zip(axes[0], ops):
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, s in enumerate(sizes):
                for r in rows:
                    # POT's per-iteration time sits beside the steps (an iteration reads K twice).
                    match = r["op"] == op or (op == "step" and r["op"] == "sinkhorn iter")
                    if r["size"] == s and r["impl"] == impl and match and r.get("median_ms"):
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r["median_ms"])
            if xs:
                ax.bar(xs, ys, width=width, label=impl)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes, rotation=20)
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"{device}: {title}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=common.out_dir,
                    default=str(common.RESULTS), help="where the results go")
    ap.add_argument("--sizes", nargs="+", type=common.size_arg, help="N x k sizes, e.g. 50000x10 (default per device)")
    ap.add_argument("--quick", action="store_true",
                    help="shorter per-case budget; anchors' refine only on small sizes")
    ap.add_argument("--budget", type=common.nonneg_float, help="seconds of repeats per case")
    ap.add_argument("--max-case-s", type=common.nonneg_float, help="at most this many seconds per case")
    ap.add_argument("--min-reps", type=common.positive_int, default=3,
                    help="at least this many repeats per case")
    ap.add_argument("--deadline-s", type=common.nonneg_float, default=float("inf"),
                    help="skip cases (with a note) once the run has taken this long")
    ap.add_argument("--compile-budget-s", type=common.nonneg_float, default=float("inf"),
                    help="skip torch.compile anchor once compilation has taken this long")
    ap.add_argument("--quick-refine-max", type=common.nonneg_int, default=10_000_000,
                    help="--quick: largest N*k for the anchors' refine")
    ap.add_argument("--pot-max-s", type=common.nonneg_float, default=20.0,
                    help="skip POT where its predicted time is longer")
    ap.add_argument("--no-pot", action="store_true", help="leave out the POT anchor")
    ap.add_argument("--no-compile", action="store_true",
                    help="leave out the torch.compile anchor (b)")
    ap.add_argument("--no-latest", action="store_true", help="do not write latest-<device>.md")
    ap.add_argument("--threads", type=common.positive_int, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 0.25 if args.quick else 1.0
    if args.max_case_s is None:
        args.max_case_s = 6.0 if args.quick else 20.0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda but torch.cuda.is_available() is False (no CUDA device); "
              "nothing measured", file=sys.stderr)
        return 2
    sizes = [parse_size(s) for s in (args.sizes or DEFAULT_SIZES[device])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = common.metadata(device)
    stem = common.free_stem(out, device)
    state = {"t0": time.perf_counter(), "load_start": _loadavg(), "compile_s": 0.0,
             "unavailable": {}, "meta_sizes": {},
             "argv": " ".join(sys.argv[1:] if argv is None else argv)}
    if not args.no_compile:
        common.raise_recompile_limit()
        state["compiled"] = common.CompiledReference()
    state["copy"] = copy_bandwidth(device, args)

    rows: List[Dict[str, object]] = []
    bar = tqdm(total=len(sizes), desc=f"bench {device}", unit="size")
    for n, k in sizes:
        try:
            rows += measure_size(n, k, device, args, state, bar)
        except Exception as exc:  # e.g. out of memory on one size: keep the rest
            rows.append({"size": f"{n}x{k}", "n": n, "k": k, "dtype": "float32", "impl": "-",
                         "op": "-", "note": f"error: {type(exc).__name__}: {str(exc)[:300]}"})
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        bar.update(1)
        # Write after every size, so a run cut short by a timeout still leaves its numbers.
        state["load"] = (state["load_start"], _loadavg())
        add_ratios_and_targets(rows, device, state)
        png = plot(rows, out / f"{stem}.png", device)
        extra = {"options": {k: (v if v != float("inf") else None) for k, v in vars(args).items()},
                 "copy_bandwidth": state["copy"], "sizes": state["meta_sizes"],
                 "unavailable": state["unavailable"], "compile_s": state["compile_s"],
                 "wall_s": time.perf_counter() - state["t0"], "load_avg_1min": state["load"]}
        common.write_json(out / f"{stem}.json", meta, rows, extra)
        md = render_markdown(meta, rows, device, state, png)
        (out / f"{stem}.md").write_text(md + "\n")
        if not args.no_latest:
            (out / f"latest-{device}.md").write_text(md + "\n")
    bar.close()
    print(md)
    print(f"\nwrote {out / stem}.json/.md{'/.png' if png else ''} in "
          f"{time.perf_counter() - state['t0']:.0f} s", file=sys.stderr)
    failed = [r for r in rows if str(r.get("note", "")).startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
