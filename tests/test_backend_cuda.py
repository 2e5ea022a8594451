"""The ``cuda`` backend (CUDA C++ kernels in ppu_fast._cuda).

GPU tests (``@pytest.mark.gpu``; skipped without a device) compare ``step`` and ``materialize``
with the float64 oracle under the shared 2x rule of ``backend_cases``, on the shared cases plus the
kernel-path boundaries of this backend (k = 32 / 33, grid-stride loops, very wide rows). The other
tests run on any machine: availability reasons, input validation, and the compiled module's
behaviour without a GPU driver (a clear CUDA error, never a crash).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from backend_cases import cases, check_materialize, check_step, make_case
from ppu_fast.backends import get_backend
from ppu_fast.backends.cuda import CudaBackend, _load_module
from ppu_fast.backends.torch_ref import oracle_q, oracle_step, reference_step

HESSIANS = (False, True, "diag")


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


def test_registry_refuses_cpu_tensors_with_reasons():
    log_p, inv_c, alpha = make_case(11, 4)
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        get_backend("cuda", log_p)
    with pytest.raises(RuntimeError, match="cuda backend cannot run"):
        CudaBackend().step(log_p, inv_c, alpha)
    with pytest.raises(RuntimeError, match="cuda backend cannot run"):
        CudaBackend().materialize(log_p, inv_c, alpha, torch.empty_like(log_p))


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
    with pytest.raises(RuntimeError, match=r"cudaError\w+ \(\d+\)"):
        mod.plan_step(100, 3, mod.NO_HESSIAN, mod.FLOAT32, 0)
    with pytest.raises(RuntimeError, match=r"cudaError\w+ \(\d+\)"):
        mod.step(0, mod.FLOAT32, 100, 3, 3, 1, 0, 0, mod.NO_HESSIAN, 0, 1, 4, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"cudaError\w+ \(\d+\)"):
        mod.materialize(0, mod.FLOAT16, 100, 40, 40, 1, 0, 0, 0, mod.FLOAT32, 40, 1, 1, 0, 0)
    assert CudaBackend().available_reasons(), "no driver must make the backend unavailable"


def test_module_validates_arguments_before_any_cuda_call():
    """Argument errors read the same with or without a GPU: ValueError, nothing launched."""
    mod = _module_or_skip()
    with pytest.raises(ValueError, match="full Hessian"):
        mod.plan_step(10, mod.SMALL_K + 1, mod.FULL_HESSIAN, mod.FLOAT32, 0)
    with pytest.raises(ValueError, match="mode"):
        mod.plan_step(10, 3, 7, mod.FLOAT32, 0)
    with pytest.raises(ValueError, match="dtype code"):
        mod.plan_materialize(10, 3, mod.FLOAT64, 0)  # float64 is an output type only
    with pytest.raises(ValueError, match="width"):
        mod.step(0, mod.FLOAT32, 10, 3, 3, 1, 0, 0, mod.NO_HESSIAN, 0, 1, 99, 0, 0, 0)
    with pytest.raises(ValueError, match="dtype code"):
        mod.step(0, 9, 10, 3, 3, 1, 0, 0, mod.NO_HESSIAN, 0, 1, 4, 0, 0, 0)
    with pytest.raises(ValueError, match="grid"):
        mod.step(0, mod.FLOAT32, 10, 3, 3, 1, 0, 0, mod.NO_HESSIAN, 0, 0, 4, 0, 0, 0)
    with pytest.raises(ValueError, match="out dtype code"):
        mod.materialize(0, mod.FLOAT32, 10, 3, 3, 1, 0, 0, 0, 9, 3, 1, 1, 0, 0)


def test_module_does_not_link_libtorch_or_a_shared_cudart():
    mod = _module_or_skip()
    if shutil.which("ldd") is None:
        pytest.skip("ldd not available")
    deps = subprocess.run(["ldd", mod.__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in deps and "libc10" not in deps, deps
    assert "libcudart" not in deps, deps  # static CUDA runtime


# ---------------------------------------------------------------------------------------------
# GPU tests.

@pytest.fixture(scope="module")
def backend():
    b = CudaBackend()
    why = b.available_reasons()
    if why:
        pytest.skip("; ".join(why))
    return b


def _extra_cases():
    """Boundaries of this backend's kernels: KMAX buckets, k = 32 / 33, block sizes of the
    large-k kernel, more rows than one grid sweep, very wide rows."""
    out = []
    for k in (4, 5, 8, 9, 16, 31, 32, 33, 64, 65, 255, 256, 257):
        out.append((1031, k, torch.float32, 3.0, False, False))
    out.append((1031, 32, torch.bfloat16, 3.0, True, True))
    out.append((1031, 33, torch.float16, 1e4, True, True))
    return out


def _ids(case):
    n, k, dtype, shift, neg_inf, noncontig = case
    return (f"n{n}-k{k}-{str(dtype).split('.')[-1]}-s{shift:g}"
            f"{'-inf' if neg_inf else ''}{'-strided' if noncontig else ''}")


ALL_CASES = cases() + _extra_cases()


@pytest.mark.gpu
@pytest.mark.parametrize("hessian", HESSIANS, ids=["nohess", "hess", "diag"])
@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_step_matches_oracle(backend, case, hessian):
    n, k, dtype, shift, neg_inf, noncontig = case
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=k + n, device="cuda")
    check_step(backend, log_p, inv_c, alpha, hessian)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_materialize_matches_oracle(backend, case):
    n, k, dtype, shift, neg_inf, noncontig = case
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=k + n, device="cuda")
    check_materialize(backend, log_p, inv_c, alpha)


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
@pytest.mark.parametrize("n,k", [(300_007, 10), (20_011, 100), (67, 32_000)])
def test_step_grid_stride_and_wide_rows(backend, n, k):
    """More rows than one sweep of the persistent grid (small and large k), and k = 32,000."""
    log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=5, device="cuda")
    for hessian in (False, "diag"):
        check_step(backend, log_p, inv_c, alpha, hessian)
    if k <= 100:
        check_step(backend, log_p, inv_c, alpha, True)
    q = backend.materialize(log_p, inv_c, alpha, torch.empty_like(log_p))
    ora = oracle_q(log_p.cpu(), inv_c.cpu(), alpha.cpu())
    assert float((q.double().cpu() - ora).abs().max()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("k", (3, 17, 32, 33, 1000))
@pytest.mark.parametrize("hessian", HESSIANS, ids=["nohess", "hess", "diag"])
def test_step_is_deterministic(backend, k, hessian):
    log_p, inv_c, alpha = make_case(40_009 if k < 100 else 3_001, k, seed=11, device="cuda")
    first = backend.step(log_p, inv_c, alpha, hessian)
    for _ in range(2):
        again = backend.step(log_p, inv_c, alpha, hessian)
        for a, b in zip(first, again):
            assert (a is None and b is None) or torch.equal(a, b)


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
def test_plans_are_persistent_grids_with_the_documented_layout(backend):
    mod = _load_module()[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid, width = mod.plan_step(10_000_000, 10, mod.NO_HESSIAN, mod.FLOAT32, 0)
    assert 1 <= grid <= 8 * sms and width == 11
    assert mod.plan_step(1000, 10, mod.DIAG_HESSIAN, mod.FLOAT16, 0) == (4, 21)  # 256 rows/block
    assert mod.plan_step(7, 32, mod.FULL_HESSIAN, mod.FLOAT32, 0) == (1, 32 + 1 + 32 * 32)
    assert mod.plan_step(100, 1000, mod.NO_HESSIAN, mod.BFLOAT16, 0) == (7, 1001)  # 16-row tiles
    assert mod.plan_step(0, 5, mod.NO_HESSIAN, mod.FLOAT32, 0)[0] == 1
    assert 1 <= mod.plan_materialize(10_000_000, 1000, mod.FLOAT32, 0) <= 8 * sms


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
    ref = oracle_step(log_p.cpu(), inv_c.cpu(), alpha.cpu())[1]
    torch.testing.assert_close(wlogz.cpu(), ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="at least one column"):
        backend.step(torch.empty(5, 0, device="cuda"), torch.ones(5, device="cuda"),
                     torch.zeros(0, dtype=torch.float64, device="cuda"))
