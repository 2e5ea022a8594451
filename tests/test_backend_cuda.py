"""The ``cuda`` backend (CUDA C++ kernels in ppu_fast._cuda).

GPU tests (``@pytest.mark.gpu``; skipped without a device) compare ``prepare``, ``step`` and
``materialize`` with the reference and the float64 oracle under the shared rules of
``backend_cases`` (2x the reference's error plus a floor; the Hessian within HESS_TOL; the same
first bad row and kind), on the shared cases plus the kernel-family boundaries of this backend
(k = 32 / 33, 512 / 513, 1024 / 1025), grid-stride loops, one-hot rows, offsets past 2^31 and
determinism. The whole GPU part is sized to run in well under a minute on an H100 / H200.

The other tests run on any machine: availability reasons, input validation, the compiled module's
behaviour without a GPU driver (a clear CUDA error, never a crash) and the kernels themselves
compiled for the CPU emulation of csrc/cuda/emu (fibers for threads, barriers for __syncthreads
and warp shuffles), checked against the reference like the GPU tests: CI has no GPU, so this is
where the CUDA sources run there (``PPU_FAST_CUDA_EMU=0`` leaves them out).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ppu_fast

from backend_cases import (bad_inputs, cases, check_bound_step, check_materialize, check_prepare,
                           check_step, make_case, onehot_cases, prepare_inputs)
from oracle import oracle_q, oracle_step
from ppu_fast.backends import get_backend
from ppu_fast.backends.base import (ERR_NONFINITE, FLOAT64_GPU_REASON, ROW_SUM_ULPS,
                                   hessian_stride)
from ppu_fast.backends.cuda import CudaBackend, _load_module
from ppu_fast.backends.torch_ref import reference_prepare, reference_step

HESSIANS = (False, True, "diag")
ROOT = Path(__file__).resolve().parents[1]


def _module_or_skip():
    mod, why = _load_module()
    if mod is None:
        pytest.skip(f"ppu_fast._cuda not built ({why})")
    return mod


# ---------------------------------------------------------------------------------------------
# Tests that run everywhere (no GPU needed).

def test_available_reasons_name_what_is_missing():
    reasons = CudaBackend().available_reasons()
    mod, _ = _load_module()
    if mod is None:
        assert any("ppu_fast._cuda not built" in r for r in reasons), reasons
    if not torch.cuda.is_available():
        assert any("no CUDA device" in r for r in reasons), reasons
    if mod is not None and torch.cuda.is_available():
        # A GPU and the module: only a runtime/driver mismatch may make it unavailable.
        assert all("cannot use the GPU" in r or "sees no CUDA device" in r for r in reasons)


def test_not_supported_reasons_for_cpu_and_float64_inputs():
    backend = CudaBackend()
    why = backend.not_supported_reasons(torch.randn(5, 3))
    assert any("CUDA tensors only" in r for r in why), why
    why = backend.not_supported_reasons(torch.randn(5, 3, dtype=torch.float64))
    assert any("dtype torch.float64" in r for r in why), why
    assert FLOAT64_GPU_REASON in why  # it says who solves float64 instead
    # A float64 solver buffer is refused by prepare too (float64 input into a float32 buffer is
    # read; test_registry_refuses_cpu_tensors_with_reasons).
    x = prepare_inputs(11, 4, "probs", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        backend.prepare(x, "probs", None, None, torch.empty(11, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float64"):
        backend.prepare(torch.log(x), "log_p", None, None, None)


def test_registry_refuses_cpu_tensors_with_reasons():
    log_p, inv_c, alpha = make_case(11, 4)
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        get_backend("cuda", log_p)
    with pytest.raises(RuntimeError, match="cuda backend cannot run"):
        CudaBackend().step(log_p, inv_c, alpha)
    with pytest.raises(RuntimeError, match="cuda backend cannot run"):
        CudaBackend().materialize(log_p, inv_c, alpha, torch.empty_like(log_p))
    x = prepare_inputs(11, 4, "probs", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="cuda backend cannot run"):
        CudaBackend().prepare(x, "probs", None, None, torch.empty(11, 4))
    with pytest.raises(ValueError, match="mode"):  # the contract's checks come first
        CudaBackend().prepare(x, "probabilities", None, None, torch.empty(11, 4))


def test_module_without_driver_reports_cuda_error_instead_of_crashing():
    mod = _module_or_skip()
    try:
        count = mod.device_count()
    except RuntimeError as exc:
        count = None
        assert "cudaError" in str(exc), str(exc)
    if count is not None:
        pytest.skip(f"a usable CUDA driver is present ({count} devices); the GPU tests launch")
    assert "CUDA runtime" in mod.version_info()
    # No driver: the first CUDA call fails before anything touches the (null) pointers.
    pattern = r"cudaError\w+ \(\d+\)"
    with pytest.raises(RuntimeError, match=pattern):
        mod.plan_step(100, 3, mod.NO_HESSIAN, mod.FLOAT32, 0)
    with pytest.raises(RuntimeError, match=pattern):
        mod.step(0, mod.FLOAT32, 100, 3, 3, 1, 0, 0, mod.NO_HESSIAN, 1, 0, 4, 0, 0, 0)
    with pytest.raises(RuntimeError, match=pattern):
        mod.materialize(0, mod.FLOAT16, 100, 40, 40, 1, 0, 0, 0, mod.FLOAT32, 40, 1, 1, 0, 0)
    with pytest.raises(RuntimeError, match=pattern):
        mod.plan_prepare(100, 3, mod.PROBS, mod.FLOAT64, True, mod.FULL_HESSIAN, 0)
    with pytest.raises(RuntimeError, match=pattern):
        mod.prepare(0, mod.FLOAT32, 100, 3, 3, 1, mod.LOGITS, 0, 0, 0, 16, mod.FLOAT32, 3, 1, 0,
                    0, 1, 1e-3, 16, 1 << 20, 16, 0, 0)
    assert CudaBackend().available_reasons(), "no driver must make the backend unavailable"


def test_module_validates_arguments_before_any_cuda_call():
    """Argument errors read the same with or without a GPU: ValueError, nothing launched."""
    mod = _module_or_skip()
    with pytest.raises(ValueError, match="full Hessian"):
        mod.plan_step(10, mod.SMALL_K + 1, mod.FULL_HESSIAN, mod.FLOAT32, 0)
    with pytest.raises(ValueError, match="mode"):
        mod.plan_step(10, 3, 7, mod.FLOAT32, 0)
    with pytest.raises(ValueError, match="dtype code"):
        mod.plan_materialize(10, 3, mod.FLOAT64, 0)  # float64 is not a solver dtype
    with pytest.raises(ValueError, match="dtype code"):
        mod.step(0, 9, 10, 3, 3, 1, 0, 0, mod.NO_HESSIAN, 1, 0, 4, 0, 0, 0)
    with pytest.raises(ValueError, match="hess_stride"):
        mod.step(0, mod.FLOAT32, 10, 3, 3, 1, 0, 0, mod.FULL_HESSIAN, 0, 0, 4, 0, 0, 0)
    with pytest.raises(ValueError, match="aligned"):
        mod.step(0, mod.FLOAT32, 10, 3, 3, 1, 0, 0, mod.NO_HESSIAN, 1, 8, 4, 0, 0, 0)
    with pytest.raises(ValueError, match="strides"):
        mod.step(0, mod.FLOAT32, 10, 3, -3, 1, 0, 0, mod.NO_HESSIAN, 1, 0, 4, 0, 0, 0)
    with pytest.raises(ValueError, match="grid"):
        mod.materialize(0, mod.FLOAT32, 10, 3, 3, 1, 0, 0, 0, mod.FLOAT32, 3, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="out dtype code"):
        mod.materialize(0, mod.FLOAT32, 10, 3, 3, 1, 0, 0, 0, 9, 3, 1, 1, 0, 0)
    # prepare: mode, a Hessian without inv_c, W for k > SMALL_K, out required, out dtype.
    with pytest.raises(ValueError, match="prepare mode"):
        mod.plan_prepare(10, 3, 5, mod.FLOAT32, False, 0, 0)
    with pytest.raises(ValueError, match="first evaluation"):
        mod.plan_prepare(10, 3, mod.PROBS, mod.FLOAT32, False, mod.DIAG_HESSIAN, 0)
    with pytest.raises(ValueError, match="full Hessian"):
        mod.plan_prepare(10, 40, mod.PROBS, mod.FLOAT32, True, mod.FULL_HESSIAN, 0)
    args = dict(x=0, dtype=mod.FLOAT64, n=10, k=3, stride_row=3, stride_col=1, mode=mod.LOG_P,
                forget=0, fill=0, fill_first=0, out=0, out_dtype=mod.FLOAT32, out_row=3,
                out_col=1, inv_c=0, hess=0, hess_stride=1, tol=1e-3, workspace=0,
                workspace_size=100, result=0, device=0, stream=0)
    with pytest.raises(ValueError, match="out is required"):
        mod.prepare(**args)
    with pytest.raises(ValueError, match="out dtype code"):
        mod.prepare(**{**args, "out": 16, "out_dtype": mod.FLOAT64})
    with pytest.raises(ValueError, match="fill_first"):
        mod.prepare(**{**args, "out": 16, "mode": mod.PROBS, "forget": 16, "fill": 16,
                       "inv_c": 16})


def test_module_does_not_link_libtorch_or_a_shared_cudart():
    mod = _module_or_skip()
    if shutil.which("ldd") is None:
        pytest.skip("ldd not available")
    deps = subprocess.run(["ldd", mod.__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in deps and "libc10" not in deps, deps
    assert "libcudart" not in deps, deps  # static CUDA runtime


# ---------------------------------------------------------------------------------------------
# The checks shared by the GPU tests and the CPU emulation.

PREP_KS = (1, 2, 3, 10, 17, 32, 33, 100, 1000, 1023)


def _prepare_configs(mode: str, k: int, device: str):
    """(x, forget, fill, out_dtype, inv_c, hessian, tol) for one (mode, k): every input dtype,
    contiguous and strided x, forget with and without fill, float32 / float16 / bfloat16 out,
    inv_c given or not, every Hessian mode. Half inputs get the row-sum tolerance of their
    rounding (base.ROW_SUM_TOL's note)."""
    n = 601 if k < 100 else 131
    g = torch.Generator().manual_seed(k)
    forget = (torch.rand(n, generator=g) < 0.25).to(device)
    fill = torch.linspace(-1.0, 1.0, k, dtype=torch.float32) - math.log(k)
    fill = fill.to(device)
    inv_c = torch.where(forget, 1.0, 1.0 / 3.0).float()
    x32 = prepare_inputs(n, k, mode, torch.float32, seed=k, device=device)
    x64 = prepare_inputs(n, k, mode, torch.float64, seed=k + 1, device=device)
    xbf = prepare_inputs(n, k, mode, torch.bfloat16, seed=k + 2, noncontig=True, device=device)
    x16 = prepare_inputs(n, k, mode, torch.float16, seed=k + 3, margin=30.0, device=device)
    if mode == "log_p":
        # log_p mode writes x as it is: no forget set, no fill (refused).
        return [(x32, None, None, None, inv_c, True, 1e-3),  # validate only; first from x
                (x64, None, None, torch.float32, inv_c, "diag", 1e-3),
                # first from the stored halves (no Hessian: the oracle evaluates x unrounded)
                (xbf, None, None, torch.float16, inv_c, False, 1e-3),
                (x16, None, None, torch.float32, None, False, 1e-3)]
    return [(x32, forget, fill, torch.float32, inv_c, True, 1e-3),
            (x64, None, None, torch.float32, inv_c, "diag", 1e-3),
            (xbf, forget, None, torch.bfloat16, None, False, 2e-2),
            (x16, forget, fill, torch.float16, inv_c, True, 2e-3),  # half out: no first
            # refine's route for 16-bit inputs: a float32 buffer, the first evaluation from it
            (xbf, forget, fill, torch.float32, inv_c, True, 2e-2),
            (x16, None, None, torch.float32, inv_c, "diag", 2e-3)]


def _check_prepare_mode_k(backend, mode: str, k: int, device: str) -> None:
    for x, forget, fill, out_dtype, inv_c, hessian, tol in _prepare_configs(mode, k, device):
        check_prepare(backend, x, mode, forget, fill, out_dtype,
                      None if inv_c is None else inv_c.to(device), hessian, tol)


def _check_bad_inputs(backend, mode: str, k: int, device: str) -> None:
    x = prepare_inputs(200, k, mode, seed=2, device=device)
    for name, make, kind in bad_inputs(mode):
        bad = make(x)
        got = backend.prepare(bad, mode, None, None, torch.empty(200, k, device=device))
        ref = reference_prepare(bad, mode, None, None, torch.empty(200, k, device=device))
        assert got.error == ref.error and got.error[0] == kind, (name, got.error, ref.error)
    # the first bad row over the whole matrix, whichever block saw it
    bad = x.clone()
    rows = [199, 150, 64 + 3]
    for r in rows:
        bad[r, 0] = float("nan")
    got = backend.prepare(bad, mode, None, None, torch.empty(200, k, device=device))
    assert got.error == (ERR_NONFINITE, min(rows)), got.error


def _check_determinism(backend, device: str, rows=(20_011, 1_009),
                       ks=(3, 17, 33, 100, 1100)) -> None:
    """Two runs give bit-identical step and prepare results (every kernel family)."""
    for k in ks:
        log_p, inv_c, alpha = make_case(rows[0] if k < 100 else rows[1], k, seed=11,
                                        device=device)
        for hessian in HESSIANS:
            first = backend.step(log_p, inv_c, alpha, hessian)
            again = backend.step(log_p, inv_c, alpha, hessian)
            for a, b in zip(first, again):
                assert (a is None and b is None) or torch.equal(a, b), (k, hessian)
        for mode in ("probs", "log_p"):
            x = prepare_inputs(log_p.shape[0], k, mode, seed=k, device=device)
            outs = []
            for _ in range(2):
                out = torch.empty(x.shape, device=device)
                outs.append((backend.prepare(x, mode, None, None, out, inv_c, True), out))
            (a, oa), (b, ob) = outs
            assert torch.equal(oa, ob), (k, mode)
            if mode == "probs":
                assert torch.equal(a.retain_sums, b.retain_sums), k
            for ta, tb in zip(a.first, b.first):
                assert torch.equal(ta, tb), (k, mode)


FUSED_KS = (3, 17, 32, 33, 100, 512, 513, 1000, 1025)


def _check_materialize_sums(backend, device: str, ks=FUSED_KS) -> None:
    """Newton's last pass (``materialize_sums``, ``step_write`` for k <= 1024): materialize's Q
    (bit for bit up to k = 512, where one warp holds a row as in materialize; within an ulp
    above, where a pair of warps adds the row's float64 sum in another order), step's column
    sums and sum of log Z, both also against the float64 oracle; in place and into another
    buffer (which leaves log_p unchanged); half log_p with a float32 Q; rows sum to 1."""
    for k in ks:
        n = 1009 if k < 100 else 263
        for dtype, out_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float32),
                                 (torch.bfloat16, torch.bfloat16)):
            log_p, inv_c, alpha = make_case(n, k, dtype, shift=3.0, seed=k, device=device)
            q_ref = torch.empty(log_p.shape, dtype=out_dtype, device=device)
            backend.materialize(log_p, inv_c, alpha, q_ref)
            colsum_ref, wlogz_ref, _ = backend.step(log_p, inv_c, alpha, False)
            colsum64, wlogz64, _ = oracle_step(log_p.cpu(), inv_c.cpu(), alpha.cpu())
            places = [False] + ([True] if out_dtype == dtype else [])
            for in_place in places:
                buf = log_p.clone()
                out = buf if in_place else torch.full(log_p.shape, float("nan"), dtype=out_dtype,
                                                      device=device)
                colsum, wlogz = backend.materialize_sums(buf, inv_c, alpha, out)
                what = (k, dtype, in_place)
                if k <= 512 or k > 1024:
                    assert torch.equal(out, q_ref), what
                else:
                    torch.testing.assert_close(out, q_ref, rtol=2.0 ** -22, atol=0.0, msg=str(what))
                if not in_place:
                    assert torch.equal(buf, log_p), ("materialize_sums modified log_p",) + what
                # column sums of the values written, not of step's float q: float32 rounding
                tol = 1e-5 if out_dtype == torch.float32 else 1e-2
                torch.testing.assert_close(colsum.cpu(), colsum_ref.cpu(), rtol=tol, atol=tol)
                torch.testing.assert_close(wlogz.cpu(), wlogz_ref.cpu(), rtol=1e-6, atol=0.0)
                torch.testing.assert_close(colsum.cpu(), torch.from_numpy(colsum64), rtol=tol,
                                           atol=tol)
                torch.testing.assert_close(wlogz.cpu(), torch.tensor(wlogz64, dtype=torch.float64),
                                           rtol=1e-5, atol=0.0)
                if out_dtype == torch.float32 and k <= 1024:
                    dev = float((out.double().sum(1) - 1.0).abs().max()) / 2.0 ** -23
                    assert dev <= ROW_SUM_ULPS, what + (dev,)


def _step_cases():
    """The shared cases plus this backend's kernel boundaries: KMAX buckets (4 / 5, 8 / 9,
    16 / 17), k = 32 / 33 (small / row), 64 / 65 .. 512 / 513 (row: EPL buckets, one warp / a pair),
    1024 / 1025 (row / wide), strided half inputs with -inf entries."""
    out = list(cases())
    for k in (4, 5, 8, 9, 16, 31, 32, 33, 64, 65, 255, 256, 257, 512, 513, 1024, 1025):
        out.append((1031 if k <= 256 else 263, k, torch.float32, 3.0, False, False))
    out.append((1031, 32, torch.bfloat16, 3.0, True, True))
    out.append((1031, 33, torch.float16, 1e4, True, True))
    out.append((263, 700, torch.bfloat16, 3.0, True, True))
    out.append((61, 2100, torch.float16, 3.0, True, True))
    return out


def _ids(case):
    n, k, dtype, shift, neg_inf, noncontig = case
    return (f"n{n}-k{k}-{str(dtype).split('.')[-1]}-s{shift:g}"
            f"{'-inf' if neg_inf else ''}{'-strided' if noncontig else ''}")


STEP_CASES = _step_cases()


# ---------------------------------------------------------------------------------------------
# GPU tests.

@pytest.fixture(scope="module")
def backend():
    b = CudaBackend()
    why = b.available_reasons()
    if why:
        pytest.skip("; ".join(why))
    return b


@pytest.mark.gpu
@pytest.mark.parametrize("case", STEP_CASES, ids=_ids)
def test_step_and_materialize_match_oracle(backend, case):
    n, k, dtype, shift, neg_inf, noncontig = case
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=k + n, device="cuda")
    for hessian in HESSIANS:
        if hessian is True and k > 1100:
            continue  # the same W route as k = 1025; the check's k x k eigvalsh is the cost
        check_step(backend, log_p, inv_c, alpha, hessian)
    check_materialize(backend, log_p, inv_c, alpha)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [10, 40])
def test_exact_hessian_takes_every_row(backend, k):
    """hessian="exact" (a stalled Newton's): the step kernel's W with stride 1 (k <= SMALL_K)
    or the chunked GEMM over contiguous rows, against the float64 oracle."""
    log_p, inv_c, alpha = make_case(20_011, k, torch.float32, seed=k + 7, device="cuda")
    check_step(backend, log_p, inv_c, alpha, "exact")


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(100_003, 10), (20_011, 32), (20_011, 40), (20_011, 1000)])
def test_bound_step_is_step(backend, n, k):
    """The solver's passes on the device (pinned staging of alpha, one copy of the packed result)
    give step's results."""
    check_bound_step(backend, *make_case(n, k, seed=k + 5, device="cuda"))


@pytest.mark.gpu
def test_bound_step_on_a_side_stream_and_another_device(backend):
    """The bound route's copies and kernels on one stream: a caller's non-default stream, and
    (with two GPUs) tensors on a device that is not the current one."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        # A sleep queued on s before each pass: a copy or kernel of the route on another stream
        # would not wait for it and read the previous pass's alpha.
        check_bound_step(backend, *make_case(100_003, 10, seed=3, device="cuda"),
                         before=lambda: torch.cuda._sleep(20_000_000))
    if torch.cuda.device_count() > 1:
        with torch.cuda.device(0):
            check_bound_step(backend, *make_case(100_003, 10, seed=4, device="cuda:1"))


@pytest.mark.gpu
def test_materialize_sums_is_materialize_and_step(backend):
    _check_materialize_sums(backend, "cuda")


@pytest.mark.gpu
def test_refine_ends_on_the_fused_pass(backend):
    """A cuda refine writes Q with its last Newton pass and agrees with the cpu backend's."""
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(3 * torch.randn(20_000, 100, generator=g), 1)
    mask = p.argmax(1) == 0
    q, info = ppu_fast.refine(p.cuda(), mask.cuda(), backend="cuda", return_info=True)
    q_cpu = ppu_fast.refine(p, mask, backend="cpu")
    assert info.converged and info.materialized
    torch.testing.assert_close(q.cpu(), q_cpu, rtol=0, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,margin", onehot_cases())
def test_hessian_of_one_hot_rows(backend, n, k, margin):
    """The cancellation the old kernels suffered (q (1 - q) in float32 on a confident row)."""
    log_p, inv_c, alpha = make_case(n, k, margin=margin, seed=3, device="cuda")
    for a in (alpha * 0, alpha):
        check_step(backend, log_p, inv_c, a, "diag")
        check_step(backend, log_p, inv_c, a, True)
    _, _, d = backend.step(log_p, inv_c, alpha * 0, "diag")
    assert float(d.min()) > 0, "a one-hot row's diagonal must not round to 0"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", PREP_KS)
def test_prepare_matches_reference(backend, mode, k):
    _check_prepare_mode_k(backend, mode, k, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", [5, 40])
def test_prepare_reports_the_first_bad_row(backend, mode, k):
    _check_bad_inputs(backend, mode, k, "cuda")


@pytest.mark.gpu
def test_prepare_first_evaluation_matches_step(backend):
    """prepare's first evaluation is step at alpha = 0 on the rows it wrote (to rounding)."""
    x = prepare_inputs(3001, 10, "logits", seed=4, device="cuda")
    forget = torch.zeros(3001, dtype=torch.bool, device="cuda")
    forget[::7] = True
    fill = torch.log(torch.full((10,), 0.1, device="cuda"))
    inv_c = torch.where(forget, 1.0, 0.25).float()
    out = torch.empty(3001, 10, device="cuda")
    res = backend.prepare(x, "logits", forget, fill, out, inv_c, True)
    ref = backend.step(out, inv_c, torch.zeros(10, dtype=torch.float64, device="cuda"), True)
    torch.testing.assert_close(res.first[0], ref[0].cpu(), rtol=1e-5, atol=1e-6)
    # log Z = 0 exactly in prepare; step re-derives it from the stored float32 rows (~1e-7 each)
    torch.testing.assert_close(res.first[1], ref[1].cpu(), rtol=0, atol=1e-2)
    torch.testing.assert_close(res.first[2], ref[2].cpu(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[forget], fill.expand(int(forget.sum()), 10))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("cuda", "triton"))
@pytest.mark.parametrize("hessian", (True, "diag"))
def test_prepare_takes_fill_from_the_cpu(backend, name, hessian):
    """refine passes fill from the CPU (the GPU backends derive the forget rows' first-evaluation
    terms from it on the host); a device fill gives the same buffer, sums and first evaluation,
    and the fill, a strided view, is left as it was."""
    if name == "cuda":
        be = backend
    else:
        pytest.importorskip("triton")
        from ppu_fast.backends.triton import TritonBackend
        be = TritonBackend()
    n, k = 5003, 10
    x = prepare_inputs(n, k, "probs", seed=9, device="cuda")
    forget = torch.arange(n, device="cuda") % 5 == 1
    inv_c = torch.where(forget, 1.0, 0.5).float()
    wide = torch.randn(k, 2, generator=torch.Generator().manual_seed(3))
    fill_cpu = torch.log_softmax(wide[:, 0], dim=0)  # strided, on the CPU
    before = fill_cpu.clone()
    res = []
    for fill in (fill_cpu, fill_cpu.to("cuda")):
        out = torch.empty(n, k, device="cuda")
        res.append((be.prepare(x, "probs", forget, fill, out, inv_c, hessian), out))
    (a, oa), (b, ob) = res
    assert torch.equal(oa, ob)
    assert torch.equal(a.retain_sums, b.retain_sums) and torch.equal(a.forget_sums, b.forget_sums)
    for u, v in zip(a.first, b.first):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=0)
    assert torch.equal(fill_cpu, before)


@pytest.mark.gpu
@pytest.mark.parametrize("k", (10, 1000))
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_materialize_other_out_dtypes_and_strided_out(backend, k, out_dtype):
    log_p, inv_c, alpha = make_case(257, k, torch.float16, seed=3, device="cuda")
    check_materialize(backend, log_p, inv_c, alpha, out_dtype=out_dtype)
    # A transposed (column-major) out: every element written, same values.
    out_t = torch.full((k, 257), float("nan"), dtype=out_dtype, device="cuda").T
    backend.materialize(log_p, inv_c, alpha, out_t)
    dense = backend.materialize(log_p, inv_c, alpha, torch.empty(257, k, dtype=out_dtype,
                                                                  device="cuda"))
    assert torch.equal(out_t, dense)


@pytest.mark.gpu
@pytest.mark.parametrize("k", (10, 100, 1000, 2000))
def test_materialize_in_place(backend, k):
    """out may be log_p itself (refine turns log P^ into Q in place)."""
    log_p, inv_c, alpha = make_case(1031, k, seed=8, device="cuda")
    expect = backend.materialize(log_p, inv_c, alpha, torch.empty_like(log_p))
    backend.materialize(log_p, inv_c, alpha, log_p)
    assert torch.equal(log_p, expect)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(300_007, 10), (20_011, 100), (9_001, 1000), (67, 32_000)])
def test_step_grid_stride_and_wide_rows(backend, n, k):
    """More rows than one sweep of the persistent grid, and k = 32,000 (the wide path)."""
    log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=5, device="cuda")
    for hessian in (False, "diag"):
        check_step(backend, log_p, inv_c, alpha, hessian)
    if k <= 100:
        check_step(backend, log_p, inv_c, alpha, True)
    q = backend.materialize(log_p, inv_c, alpha, torch.empty_like(log_p))
    ora = oracle_q(log_p.cpu(), inv_c.cpu(), alpha.cpu())
    assert float((q.double().cpu() - torch.from_numpy(ora)).abs().max()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("k", (10, 1000))
def test_offsets_past_2_31_elements(backend, k):
    """N * k > 2^31 (bfloat16, 4.3 GB): uniform rows with one distinct last row; the last row's
    elements sit past 2^31, where an int32 offset would wrap."""
    n = (1 << 31) // k + 1031
    try:
        log_p = torch.zeros(n, k, dtype=torch.bfloat16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    log_p[-1, 0] = 5.0
    inv_c = torch.ones(n, device="cuda")
    alpha = torch.zeros(k, dtype=torch.float64, device="cuda")
    colsum, wlogz, d = backend.step(log_p, inv_c, alpha, "diag")
    q_last = torch.softmax(log_p[-1].float(), 0).double()
    expect = (n - 1) / k + q_last
    torch.testing.assert_close(colsum, expect, rtol=1e-5, atol=0)
    expect_z = (n - 1) * math.log(k) + float(torch.logsumexp(log_p[-1].double(), 0))
    assert abs(float(wlogz) - expect_z) <= 1e-5 * expect_z
    # prepare validates every row: a NaN in the last one is found (log_p mode, no out).
    log_p[-1, k - 1] = float("nan")
    res = backend.prepare(log_p, "log_p", None, None, None)
    assert res.error == (ERR_NONFINITE, n - 1), res.error
    del log_p
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_step_and_prepare_are_deterministic(backend):
    _check_determinism(backend, "cuda")


@pytest.mark.gpu
def test_runs_on_the_current_stream(backend):
    """Kernels go on torch's current stream: results are ready after that stream synchronises."""
    log_p, inv_c, alpha = make_case(50_021, 10, seed=7, device="cuda")
    expect = reference_step(log_p, inv_c, alpha, "diag")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = backend.step(log_p, inv_c, alpha, "diag")
        out = backend.materialize(log_p, inv_c, alpha, torch.empty_like(log_p))
    stream.synchronize()
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.sum(1), torch.ones(50_021, device="cuda"), rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_plans_have_the_documented_layout(backend):
    mod = _load_module()[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, width, size = mod.plan_step(10_000_000, 10, mod.NO_HESSIAN, mod.FLOAT32, 0)
    assert 1 <= rows <= 8 * sms and width == 11 and size == rows * width
    assert mod.plan_step(1000, 10, mod.DIAG_HESSIAN, mod.FLOAT16, 0)[:2] == (4, 21)  # 256 rows
    assert mod.plan_step(7, 32, mod.FULL_HESSIAN, mod.FLOAT32, 0)[:2] == (1, 32 + 1 + 32 + 32 * 32)
    assert mod.plan_step(1000, 1000, mod.NO_HESSIAN, mod.BFLOAT16, 0)[:2] == (16, 1001)  # 64 rows
    assert mod.plan_step(1000, 500, mod.DIAG_HESSIAN, mod.FLOAT32, 0)[:2] == (8, 1001)  # 128 rows
    rows, width, size = mod.plan_step(50_000, 32_000, mod.DIAG_HESSIAN, mod.FLOAT32, 0)
    assert width == 64_001 and rows * width <= 1 << 22 and size >= rows * width + 2 * 50_000
    assert mod.plan_step(0, 5, mod.NO_HESSIAN, mod.FLOAT32, 0)[0] == 1
    assert 1 <= mod.plan_materialize(10_000_000, 1000, mod.FLOAT32, 0) <= 8 * sms
    grid, width, size = mod.plan_prepare(1000, 10, mod.PROBS, mod.FLOAT64, True, 2, 0)
    assert (grid, width, size) == (4, 2 + 20 + 10 + 1 + 10 + 100, 4 * 143)
    assert hessian_stride(1000, 10) == 1


@pytest.mark.gpu
def test_empty_and_single_column_inputs(backend):
    log_p, inv_c, alpha = make_case(0, 5, device="cuda")
    colsum, wlogz, h = backend.step(log_p, inv_c, alpha, True)
    assert torch.equal(colsum, torch.zeros(5, dtype=torch.float64, device="cuda"))
    assert float(wlogz) == 0.0 and torch.equal(h, torch.zeros(5, 5, dtype=torch.float64,
                                                             device="cuda"))
    log_p, inv_c, alpha = make_case(101, 1, device="cuda")
    colsum, wlogz, h = backend.step(log_p, inv_c, alpha, True)
    assert float(colsum[0]) == 101.0  # q == 1 exactly
    assert float(h.abs().max()) == 0.0
    expect = float((log_p.double()[:, 0] - inv_c.double() * alpha.double()[0])
                   .div(inv_c.double()).sum())
    assert abs(float(wlogz) - expect) <= 1e-6 * abs(expect)
    with pytest.raises(ValueError, match="at least one column"):
        backend.step(torch.empty(5, 0, device="cuda"), torch.ones(5, device="cuda"),
                     torch.zeros(0, dtype=torch.float64, device="cuda"))
    x = prepare_inputs(0, 4, "probs", device="cuda")
    res = backend.prepare(x, "probs", None, None, torch.empty(0, 4, device="cuda"))
    assert res.error is None and torch.equal(res.retain_sums, torch.zeros(4, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# The kernels on the CPU emulation: CI has no GPU, so this is where the CUDA sources run there
# (about 2 minutes in all; PPU_FAST_CUDA_EMU=0 leaves them out).

def _emulated_backend(tmp_path_factory):
    if os.environ.get("PPU_FAST_CUDA_EMU", "1") == "0":
        pytest.skip("PPU_FAST_CUDA_EMU=0: the CUDA kernels' CPU emulation is left out")
    if shutil.which("g++") is None:
        pytest.skip("g++ not available")
    out = tmp_path_factory.mktemp("cuda_emu")
    res = subprocess.run(["sh", str(ROOT / "csrc" / "cuda" / "emu" / "build.sh"), str(out)],
                         capture_output=True, text=True, env={**os.environ,
                                                              "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    path = res.stdout.strip().splitlines()[-1]
    spec = importlib.util.spec_from_file_location("_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class _Proxy:  # CPU tensors have device index None: the emulation takes 0
        def __getattr__(self, name):
            f = getattr(mod, name)
            if not callable(f):
                return f
            return lambda *a: f(*(0 if v is None else v for v in a))

    return _Proxy()


@pytest.fixture(scope="module")
def emulated_module(tmp_path_factory):
    """The emulation of ppu_fast._cuda, built once for this file (a proxy to it)."""
    return _emulated_backend(tmp_path_factory)


@pytest.fixture(scope="module")
def emulated(emulated_module):
    from ppu_fast.backends import cuda as cb
    proxy = emulated_module
    mp = pytest.MonkeyPatch()
    mp.setattr(cb, "_load_module", lambda: (proxy, ""))
    mp.setattr(cb, "_module", lambda: proxy)
    mp.setattr(cb, "_stream", lambda dev: 0)
    mp.setattr(cb.CudaBackend, "_require", lambda self, t, any_dtype=False: None)
    mp.setenv("PPU_EMU_SMS", "1")  # a 2-block device: every grid-stride loop iterates
    yield CudaBackend()
    mp.undo()


def test_emulated_workspaces_stay_bounded_on_a_large_device(emulated_module):
    """On an H100-sized device (132 SMs, 4 blocks each: grids of up to 528 blocks) the plans'
    float64 partial rows stay within 2^22 (32 MB) however wide the rows: prepare's at k = 32,000
    and 151,936 (its grid had no cap: 0.5 and 2.6 GB), the step's wide path as before; narrow
    rows keep the whole grid. Planned in a fresh process, whose occupancy cache sees this
    device (the fixture's module plans for a 1-SM one)."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('_cuda', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "for k in (100, 32_000, 151_936):\n"
        "    print(k, *m.plan_prepare(50_000, k, m.PROBS, m.FLOAT32, True, m.DIAG_HESSIAN, 0))\n"
        "print('step', *m.plan_step(50_000, 32_000, m.DIAG_HESSIAN, m.FLOAT32, 0))\n")
    env = {**os.environ, "PPU_EMU_SMS": "132", "PPU_EMU_BLOCKS_PER_SM": "4"}
    res = subprocess.run([sys.executable, "-c", code, emulated_module.__file__], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln.split() for ln in res.stdout.splitlines()]
    plans = {int(ln[0]): tuple(int(v) for v in ln[1:]) for ln in lines if ln[0] != "step"}
    for k, (grid, width, size) in plans.items():
        assert width == 4 * k + 3 and size == grid * width, (k, grid, width, size)
        assert 1 <= grid and size <= 1 << 22, (k, grid, width, size)
    assert plans[100][0] == 132 * 4  # 3,125 tiles of 16 rows: the whole resident grid
    assert plans[32_000][0] == (1 << 22) // (4 * 32_000 + 3) < 132 * 4
    rows, width, size = (int(v) for v in lines[-1][1:])
    assert rows * width <= 1 << 22


EMU_STEP_CASES = [c for c in STEP_CASES if c[0] * c[1] <= 300_000]


@pytest.mark.parametrize("case", EMU_STEP_CASES, ids=_ids)
def test_emulated_step_and_materialize(emulated, case):
    n, k, dtype, shift, neg_inf, noncontig = case
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=k + n)
    for hessian in HESSIANS:
        if hessian is True and k > 300:
            continue  # the oracle's dense k x k work dominates; the GPU tests cover it
        check_step(emulated, log_p, inv_c, alpha, hessian)
    check_materialize(emulated, log_p, inv_c, alpha)


@pytest.mark.parametrize("k", [3, 10, 40, 100, 1000])
@pytest.mark.parametrize("margin", [30.0, 60.0])
def test_emulated_hessian_of_one_hot_rows(emulated, k, margin):
    """The kernels' 1 - q path (q (1 - q) on rows whose 1 - q is 1e-13 or 1e-26) on the
    emulation, so CI checks it without a GPU; fewer rows than the GPU test (the emulation runs
    the threads one by one)."""
    log_p, inv_c, alpha = make_case(301 if k < 1000 else 67, k, margin=margin, seed=3)
    for a in (alpha * 0, alpha):
        check_step(emulated, log_p, inv_c, a, "diag")
        if k <= 300:
            check_step(emulated, log_p, inv_c, a, True)
    _, _, d = emulated.step(log_p, inv_c, alpha * 0, "diag")
    assert float(d.min()) > 0, "a one-hot row's diagonal must not round to 0"
    check_materialize(emulated, log_p, inv_c, alpha)


@pytest.mark.parametrize("k", [10, 40])
def test_emulated_exact_hessian_takes_every_row(emulated, k):
    """hessian="exact" (Newton's answer to a stalled sampled Hessian) sums every row where the
    sample of hessian=True skips some: against the float64 oracle over every row."""
    from ppu_fast.backends.base import hessian_stride

    n = 5003
    assert hessian_stride(n, k) > 1
    log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=k + 7)
    check_step(emulated, log_p, inv_c, alpha, "exact")


def test_stage_waits_for_a_pass_that_never_fetched(monkeypatch):
    """base.DeviceStepStage reuses its pinned alpha buffer pass after pass, safe because each pass
    waits for its result. A pass that stopped between staging alpha and fetching (its launch
    raised) may leave the copy in flight: the next put_alpha waits for the device first; a pass
    that fetched does not make the next one wait."""
    import numpy as np

    from ppu_fast.backends.base import DeviceStepStage

    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    stage = DeviceStepStage(3, torch.device("cpu"))
    stage.pinned = True  # the GPU path's bookkeeping, on CPU tensors
    packed = torch.arange(4, dtype=torch.float64)
    stage._host[4] = torch.empty(4, dtype=torch.float64)  # no pinned memory without a GPU
    stage.put_alpha(np.array([1.0, 2.0, 3.0]))
    assert waits == []
    stage.put_alpha(np.array([4.0, 5.0, 6.0]))  # the pass before never fetched
    assert len(waits) == 1
    assert stage.alpha.tolist() == [4.0, 5.0, 6.0]
    colsum, wlogz, h = stage.fetch(packed, False)
    assert colsum.tolist() == [0.0, 1.0, 2.0] and wlogz == 3.0 and h is None
    stage.put_alpha(np.array([7.0, 8.0, 9.0]))
    assert len(waits) == 1


@pytest.mark.parametrize("k", [3, 10, 32, 33, 100])
def test_emulated_bound_step_is_step(emulated, k):
    """The solver's passes (``bind_step``: alpha through a staging buffer, one copy of the packed
    result, H assembled on the host; for k > SMALL_K's dense Hessian W from the sampled rows
    gathered once) give ``step``'s results."""
    from ppu_fast.backends import cuda as cb

    log_p, inv_c, alpha = make_case(1009, k, seed=k + 11)
    check_bound_step(emulated, log_p, inv_c, alpha)
    for hessian in (False, "diag", True, "exact"):  # and step, so both, against float64
        check_step(emulated, log_p, inv_c, alpha, hessian)
    # ... and on its own path: step's launcher runs only for what the bound path hands over.
    launched = []
    real = cb._launch_step
    run = emulated.bind_step(log_p, inv_c)
    try:
        cb._launch_step = lambda *a, **kw: launched.append(1) or real(*a, **kw)
        for hessian in (False, "diag", True, "exact"):
            run(alpha.numpy(), hessian)
    finally:
        cb._launch_step = real
    assert not launched  # k > SMALL_K's dense Hessian too: the diagonal's kernels + BoundGram


@pytest.mark.parametrize("m", [2, 3])
def test_emulated_bound_dense_hessian_on_a_row_sample(emulated, monkeypatch, m):
    """k > SMALL_K with a sample stride m > 1 (patched: it takes N >= 8192 for real): the bound
    passes' W, from the sampled rows gathered once, is step's (the same rows and chunks)."""
    import ppu_fast.backends.base as base
    from ppu_fast.backends import cuda as cb
    for mod in (base, cb):
        monkeypatch.setattr(mod, "hessian_stride", lambda n, k: m)
    check_bound_step(emulated, *make_case(1009, 40, seed=m))


def test_emulated_bound_step_refuses_bad_arguments(emulated):
    log_p, inv_c, alpha = make_case(101, 5, seed=2)
    run = emulated.bind_step(log_p, inv_c)
    for bad in ("full", 0, 1):  # 0 / 1 equal False / True but are not the modes
        with pytest.raises(ValueError, match="hessian: expected one of"):
            run(alpha.numpy(), bad)
    with pytest.raises(ValueError, match=r"alpha: expected shape \(5,\)"):
        run(alpha.numpy()[:3], False)
    with pytest.raises(ValueError, match="inv_c: expected"):
        emulated.bind_step(log_p, inv_c[:50])
    # An alpha beyond float32 becomes +-inf, as torch's conversion makes it, without numpy's
    # overflow warning (an error under -W error).
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(np.array([1e300, -1e300, 0.0, 0.0, 0.0]), False)


def test_emulated_materialize_sums(emulated):
    _check_materialize_sums(emulated, "cpu")


@pytest.mark.parametrize("k", [10, 40])
def test_emulated_refine_ends_on_the_fused_pass(emulated, monkeypatch, k):
    """The whole refine on the emulated kernels (prepare, steps, step_write as the last pass):
    it ends on the pass that writes Q, and Q is the cpu backend's."""
    import ppu_fast.api as api
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(3 * torch.randn(3001, k, generator=g), 1)
    mask = p.argmax(1) == 0
    q_cpu, info_cpu = ppu_fast.refine(p, mask, backend="cpu", return_info=True)
    monkeypatch.setattr(api, "get_backend", lambda name, t: emulated)
    q, info = ppu_fast.refine(p, mask, return_info=True)
    assert info.converged and info.materialized and info.backend == "cuda"
    assert info.iterations == info_cpu.iterations
    torch.testing.assert_close(q, q_cpu, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_16_bit_refine(emulated, monkeypatch, dtype):
    """A 16-bit input on the emulated kernels: prepare reads the halves into the float32 buffer
    (with the first evaluation from the normalised rows) and the last pass writes the 16-bit Q.
    The cpu backend's refine of the same input agrees to Q's rounding."""
    import ppu_fast.api as api
    g = torch.Generator().manual_seed(9)
    z = 3 * torch.randn(2003, 10, generator=g)
    z[torch.arange(2003), torch.randint(0, 10, (2003,), generator=g)] += 20.0
    p = torch.softmax(z, 1).to(dtype)
    mask = torch.rand(2003, generator=g) < 0.5
    opts = dict(lam=1e-4, pseudo="prior", marginals="original")
    q_cpu, info_cpu = ppu_fast.refine(p, mask, backend="cpu", return_info=True, **opts)
    monkeypatch.setattr(api, "get_backend", lambda name, t: emulated)
    q, info = ppu_fast.refine(p, mask, return_info=True, **opts)
    assert info.converged and info.backend == "cuda" and q.dtype == dtype
    assert abs(info.iterations - info_cpu.iterations) <= 1
    # Two half-ulp roundings of answers 1e-6 apart: at most one ulp (eps) between them.
    assert float((q.float() - q_cpu.float()).abs().max()) <= torch.finfo(dtype).eps


def test_emulated_step_write_refuses_what_it_cannot_serve(emulated):
    """step_write: k <= ROW_K, no Hessian mode, a known out dtype; named errors."""
    from ppu_fast.backends import cuda as cb
    mod = cb._module()
    with pytest.raises(ValueError, match="step_write serves k <= 1024"):
        mod.plan_step(10, 1025, 0, 0, 0, True)
    with pytest.raises(ValueError, match="no Hessian"):
        mod.plan_step(10, 10, 1, 0, 0, True)
    log_p, inv_c, alpha = make_case(10, 4, seed=1)
    a32 = alpha.float()
    ws = torch.empty(4096, dtype=torch.float64)
    res = torch.empty(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="out dtype code"):
        mod.step_write(log_p.data_ptr(), 0, 10, 4, 4, 1, inv_c.data_ptr(), a32.data_ptr(),
                       ws.data_ptr(), 4096, res.data_ptr(), log_p.data_ptr(), 7, 4, 1, 0, 0)
    with pytest.raises(ValueError, match="needs q_out"):
        mod.step_write(log_p.data_ptr(), 0, 10, 4, 4, 1, inv_c.data_ptr(), a32.data_ptr(),
                       ws.data_ptr(), 4096, res.data_ptr(), 0, 0, 4, 1, 0, 0)


@pytest.mark.parametrize("k", [3, 17, 32, 33, 100, 1000])
def test_emulated_float32_rows_sum_to_one(emulated, k):
    """The small (k <= 32) and row (k <= 1024) materialize kernels normalise by a float64 sum:
    rows of a float32 Q within ROW_SUM_ULPS float32 ulps of 1. (k > 1024's two-pass kernel keeps
    its float32 online sum.)"""
    for shift in (3.0, 30.0):
        log_p, inv_c, alpha = make_case(1009 if k < 1000 else 131, k, shift=shift, seed=k)
        q = torch.empty(log_p.shape)
        emulated.materialize(log_p, inv_c, alpha, q)
        dev = float((q.double().sum(1) - 1.0).abs().max()) / 2.0 ** -23
        assert dev <= ROW_SUM_ULPS, f"shift {shift}: {dev:.2f} ulps"


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("bad", ["all -inf", "+inf"])
def test_emulated_prepare_of_a_fill_with_no_finite_maximum(emulated, bad):
    """The launcher's host-side softmax of fill warned ("invalid value in subtract") where the cpu
    backend returns the same NaN first evaluation quietly (a helper's emulation fuzz)."""
    n, k = 5, 3
    x = torch.softmax(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), 1)
    forget = torch.tensor([True, False, False, True, False])
    fill = torch.full((k,), float("-inf"))
    if bad == "+inf":
        fill[1] = float("inf")
    got = emulated.prepare(x, "probs", forget, fill, torch.empty(n, k), torch.ones(n), False)
    from ppu_fast.backends.cpu import CpuBackend
    ref = CpuBackend().prepare(x, "probs", forget, fill, torch.empty(n, k), torch.ones(n), False)
    assert got.error is None and bool(torch.isnan(got.first[0]).all())
    assert bool(torch.isnan(ref.first[0]).all())


@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", PREP_KS)
def test_emulated_prepare(emulated, mode, k):
    _check_prepare_mode_k(emulated, mode, k, "cpu")


@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
def test_emulated_bad_rows_and_determinism(emulated, mode):
    for k in (5, 40):
        _check_bad_inputs(emulated, mode, k, "cpu")
    if mode == "probs":
        # Emulated fibers run in a fixed order, so this only guards the emulation's own plumbing
        # (a buffer reused between calls, say): one small and one wide family, small sizes. The
        # GPU tests check every family at full size, where the order is not fixed.
        _check_determinism(emulated, "cpu", rows=(1_001, 301), ks=(3, 33))
