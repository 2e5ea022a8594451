"""pytest-benchmark microbenchmarks: one ``step`` and a full ``refine`` per available backend,
beside the reference eager (a) and under torch.compile (b).

    pytest benchmarks/bench_kernels.py --benchmark-only

Small sizes only, so the whole file stays quick; ``benchmarks/run.py`` covers the large sizes,
POT and the tables. Runs on the GPU when one is present (and then times the GPU backends),
else on the CPU. Backends that cannot run here are skipped with the registry's reasons.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ppu_fast  # noqa: E402
from ppu_fast.backends import BACKEND_NAMES, load, reasons  # noqa: E402
from ppu_fast.solver import DENSE_HESSIAN_MAX_K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(50_000, 10), (50_000, 100)]
COMPILED = "torch.compile"
IMPLS = [n for n in BACKEND_NAMES if n != "torch"] + ["torch", COMPILED]
# Compiling costs seconds per graph: anchor (b) only on the smallest size keeps the file quick.
COMPILED_SIZES = {SIZES[0]}

# Short runs: a few rounds or half a second per case, whichever is more.
pytestmark = pytest.mark.benchmark(max_time=0.5, min_rounds=3, warmup=True,
                                   warmup_iterations=1)

_compiled = None


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}x{k}" for n, k in SIZES])
def problem(request):
    n, k = request.param
    y, p = common.confident_classifier(n, k, device=DEVICE)
    forget = y == 0
    log_p, inv_c, alpha = common.step_inputs(p, forget)
    return {"n": n, "k": k, "p": p, "forget": forget, "log_p": log_p, "inv_c": inv_c,
            "alpha": alpha}


def _backend(impl, prob):
    """(backend, registry name or None for the compiled anchor); skips when it cannot run."""
    global _compiled
    if impl == COMPILED:
        if (prob["n"], prob["k"]) not in COMPILED_SIZES:
            pytest.skip("torch.compile anchor only on the smallest size (compile time)")
        if _compiled is None:
            common.raise_recompile_limit()
            _compiled = common.CompiledReference()
        return _compiled, None
    why = reasons(impl, prob["log_p"])
    if why:
        pytest.skip(f"{impl}: " + "; ".join(why))
    return load(impl)[0], impl


def _synced(fn):
    if DEVICE != "cuda":
        return fn

    def call(*a, **kw):
        out = fn(*a, **kw)
        torch.cuda.synchronize()  # time the work, not the launch
        return out
    return call


@pytest.mark.parametrize("hessian", ["none", "newton"])
@pytest.mark.parametrize("impl", IMPLS)
def test_step(benchmark, problem, impl, hessian):
    be, _ = _backend(impl, problem)
    k = problem["k"]
    h = False if hessian == "none" else (True if k <= DENSE_HESSIAN_MAX_K else "diag")
    args = (problem["log_p"], problem["inv_c"], problem["alpha"], h)
    be.step(*args)  # compile / warm up outside the timed rounds
    benchmark.group = f"step {problem['n']}x{k} hessian={h}"
    benchmark.extra_info.update(n=problem["n"], k=k, device=DEVICE)
    colsum, _, _ = benchmark(_synced(be.step), *args)
    assert torch.isfinite(colsum).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_refine(benchmark, problem, impl):
    be, name = _backend(impl, problem)

    def refine():
        ctx = common.forced_backend(be) if name is None else common.contextlib.nullcontext()
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore", ppu_fast.ConvergenceWarning)
            return ppu_fast.refine(problem["p"], problem["forget"], lam=1.0, tol=1e-6,
                                   method="newton", backend=name or "torch", return_info=True)

    refine()
    benchmark.group = f"refine {problem['n']}x{problem['k']}"
    benchmark.extra_info.update(n=problem["n"], k=problem["k"], device=DEVICE)
    _, info = benchmark(_synced(refine))
    benchmark.extra_info["passes"] = info.iterations
    assert info.converged, info.message
