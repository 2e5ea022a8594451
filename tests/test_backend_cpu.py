"""Tests of the ``cpu`` backend (ppu_fast._C via ppu_fast.backends.cpu).

Every kernel variant this CPU runs is tested: "auto" (AVX-512 here) on all shared cases, and the
AVX2 and generic kernels on a subset (they share the code, compiled for other vector widths).
Skipped as a whole only if ppu_fast._C is not built (CI builds it with ``pip install -e .``).

Timing is not tested here (benchmarks/ does that); the numbers quoted in
ppu_fast/backends/cpu.py came from median-of-N ``time.perf_counter`` loops around ``step``.
"""

from __future__ import annotations

import threading

import pytest
import torch

_C = pytest.importorskip("ppu_fast._C", reason="ppu_fast._C is not built (pip install -e .)")

from backend_cases import cases, check_materialize, check_step, make_case  # noqa: E402
from ppu_fast.backends import get_backend  # noqa: E402
from ppu_fast.backends.cpu import CpuBackend  # noqa: E402
from ppu_fast.backends.torch_ref import reference_step  # noqa: E402

HESSIANS = (False, True, "diag")
ISAS = tuple(_C.supported_isas())
OTHER_ISAS = tuple(i for i in ISAS if i != _C.best_isa())
CASES = cases()
# The other kernels share the code at other vector widths: both code paths (k < 32 in lanes,
# k >= 32 along the row) with float32 / bfloat16, the awkward cases (tiny N, huge shifts, -inf,
# non-contiguous float16) for k = 3 and 17, and one k = 1023 row-path case with a ragged tail.
SUBSET = ([c for c in CASES if c[1] <= 100 and (c[2] != torch.float16 or c[5])]
          + [c for c in CASES if c[1] == 1023 and c[2] == torch.bfloat16])


def _id(case) -> str:
    n, k, dtype, shift, neg_inf, noncontig = case
    return (f"n{n}-k{k}-{str(dtype).split('.')[-1]}-s{shift:g}"
            + ("-inf" if neg_inf else "") + ("-nc" if noncontig else ""))


@pytest.fixture(scope="module")
def backend() -> CpuBackend:
    return CpuBackend()


def test_isa_report() -> None:
    assert "generic" in ISAS
    assert _C.best_isa() == ISAS[0]
    assert "threads" in CpuBackend().describe()


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_step_and_materialize(backend: CpuBackend, case) -> None:
    n, k, dtype, shift, neg_inf, noncontig = case
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=n * 1000 + k)
    before = log_p.clone()
    for hessian in HESSIANS:
        check_step(backend, log_p, inv_c, alpha, hessian)
    check_materialize(backend, log_p, inv_c, alpha)
    check_materialize(backend, log_p, inv_c, alpha, torch.float32)
    assert torch.equal(log_p, before), "the backend modified its input"


@pytest.mark.skipif(not OTHER_ISAS, reason="this CPU runs only one kernel variant")
@pytest.mark.parametrize("isa", OTHER_ISAS)
@pytest.mark.parametrize("case", SUBSET, ids=_id)
def test_other_isas(isa: str, case) -> None:
    n, k, dtype, shift, neg_inf, noncontig = case
    be = CpuBackend(isa=isa)
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=7 * n + k)
    for hessian in HESSIANS:
        check_step(be, log_p, inv_c, alpha, hessian)
    check_materialize(be, log_p, inv_c, alpha)


@pytest.mark.parametrize("k", [3, 17, 100])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_materialize_strided_out(backend: CpuBackend, k: int, out_dtype) -> None:
    """out may be column-major or a strided slice; every element is written, nothing else."""
    log_p, inv_c, alpha = make_case(509, k, torch.float32, seed=k)
    colmajor = torch.full((k, 509), float("nan"), dtype=out_dtype).T
    check_materialize(backend, log_p, inv_c, alpha, out_dtype)  # contiguous out
    backend.materialize(log_p, inv_c, alpha, colmajor)
    wide = torch.full((509, 2 * k), -7.0, dtype=out_dtype)
    backend.materialize(log_p, inv_c, alpha, wide[:, 1::2])
    want = torch.softmax(log_p.double() - inv_c.double()[:, None] * alpha[None, :], dim=1)
    tol = 1e-6 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(colmajor.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(wide[:, 1::2].double(), want, atol=tol, rtol=tol)
    assert (wide[:, 0::2] == -7.0).all(), "materialize wrote outside out's elements"


@pytest.mark.parametrize("k", [5, 40])
def test_broadcast_and_transposed_inputs(backend: CpuBackend, k: int) -> None:
    """Row stride 0 (an expanded row) and column-major log_p go through the generic paths."""
    g = torch.Generator().manual_seed(k)
    row = torch.log_softmax(torch.randn(1, k, generator=g), dim=1)
    _, inv_c, alpha = make_case(300, k, seed=k)
    for log_p in (row.expand(300, k), torch.log_softmax(torch.randn(k, 300, generator=g), 0).T):
        assert not log_p.is_contiguous()
        for hessian in HESSIANS:
            check_step(backend, log_p, inv_c, alpha, hessian)
        check_materialize(backend, log_p, inv_c, alpha)


def test_gemm_hessian_matches_kernel_hessian() -> None:
    """For k < 32 the Hessian can come from either route; they agree to float32 accuracy."""
    log_p, inv_c, alpha = make_case(4099, 10, seed=3)
    _, _, h_kernel = CpuBackend().step(log_p, inv_c, alpha, True)
    _, _, h_gemm = CpuBackend(gemm_hessian_min_k=1).step(log_p, inv_c, alpha, True)
    _, _, h_ref = reference_step(log_p, inv_c, alpha, True)
    torch.testing.assert_close(h_kernel, h_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h_gemm, h_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h_kernel, h_kernel.T, rtol=0, atol=0)


@pytest.mark.parametrize("n,k", [(20011, 10), (3001, 100), (2003, 1000)])
@pytest.mark.parametrize("hessian", HESSIANS)
def test_deterministic(n: int, k: int, hessian) -> None:
    """Bit-identical results across runs and across thread counts (fixed ranges, fixed order)."""
    log_p, inv_c, alpha = make_case(n, k, seed=11)
    runs = [CpuBackend(num_threads=t).step(log_p, inv_c, alpha, hessian) for t in (2, 2, 1, 3)]
    for colsum, wlogz, h in runs[1:]:
        assert torch.equal(colsum, runs[0][0])
        assert torch.equal(wlogz, runs[0][1])
        if hessian is not False:
            assert torch.equal(h, runs[0][2])


def test_python_threads_share_the_backend(backend: CpuBackend) -> None:
    """The kernel releases the GIL; concurrent calls from Python threads stay correct."""
    log_p, inv_c, alpha = make_case(30011, 17, seed=5)
    want = backend.step(log_p, inv_c, alpha, "diag")
    got = [None] * 4

    def work(i: int) -> None:
        got[i] = backend.step(log_p, inv_c, alpha, "diag")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in got:
        assert torch.equal(res[0], want[0]) and torch.equal(res[2], want[2])


def test_outputs_and_edge_shapes(backend: CpuBackend) -> None:
    log_p, inv_c, alpha = make_case(33, 4, seed=1)
    colsum, wlogz, h = backend.step(log_p, inv_c, alpha, True)
    assert colsum.dtype == wlogz.dtype == h.dtype == torch.float64
    assert colsum.shape == (4,) and wlogz.shape == () and h.shape == (4, 4)
    assert backend.step(log_p, inv_c, alpha)[2] is None
    torch.testing.assert_close(colsum.sum(), torch.tensor(33.0, dtype=torch.float64))
    empty = torch.empty(0, 4)
    c0, w0, h0 = backend.step(empty, torch.empty(0), alpha, "diag")
    assert torch.equal(c0, torch.zeros(4, dtype=torch.float64)) and float(w0) == 0.0
    assert torch.equal(h0, torch.zeros(4, dtype=torch.float64))


def test_bad_inputs(backend: CpuBackend) -> None:
    log_p, inv_c, alpha = make_case(20, 3, seed=2)
    with pytest.raises(TypeError, match="log_p"):
        backend.step(log_p.double(), inv_c, alpha)
    with pytest.raises(ValueError, match="log_p"):
        backend.step(log_p[0], inv_c, alpha)
    with pytest.raises(ValueError, match="inv_c"):
        backend.step(log_p, inv_c[:-1], alpha)
    with pytest.raises(ValueError, match="inv_c"):
        backend.step(log_p, inv_c.double(), alpha)
    with pytest.raises(ValueError, match="alpha"):
        backend.step(log_p, inv_c, alpha.float())
    with pytest.raises(ValueError, match="hessian"):
        backend.step(log_p, inv_c, alpha, "full")
    with pytest.raises(ValueError, match="k >= 1|column"):
        backend.step(torch.empty(5, 0), torch.ones(5), torch.empty(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        backend.materialize(log_p, inv_c, alpha, torch.empty(20, 4))
    with pytest.raises(TypeError, match="out"):
        backend.materialize(log_p, inv_c, alpha, torch.empty(20, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="out"):
        backend.materialize(log_p, inv_c, alpha, torch.empty(20, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="isa"):
        CpuBackend(isa="sse9")
    with pytest.raises(ValueError, match="gemm_hessian_min_k"):
        CpuBackend(gemm_hessian_min_k=64)
    meta = torch.empty(20, 3, device="meta")
    assert any("CPU" in r for r in backend.not_supported_reasons(meta))
    with pytest.raises(ValueError, match="device|CPU"):
        backend.step(meta, inv_c.to("meta"), alpha.to("meta"))
    assert any("float64" in r for r in backend.not_supported_reasons(log_p.double()))
    assert backend.not_supported_reasons(log_p) == []


def test_raw_binding_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        _C.step(1, 7, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="full Hessian"):
        _C.step(1, 0, 1, 40, 40, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="isa"):
        _C.step(1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, "sse9")


def test_registry_picks_cpu_for_cpu_tensors() -> None:
    log_p, _, _ = make_case(10, 3)
    assert get_backend("cpu", log_p).name == "cpu"
    assert get_backend("auto", log_p).name in ("cpu", "torch")  # PPU_FAST_BACKEND may override
