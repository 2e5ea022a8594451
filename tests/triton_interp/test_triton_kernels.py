"""Triton kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter must be switched on before Triton is imported, so this module runs in its own
process: ``tests/test_backend_triton.py`` launches ``pytest`` on this directory with the variable
set.  In a normal pytest run (variable unset) the whole module skips itself, so nothing runs twice.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported (run by "
                "tests/test_backend_triton.py in a subprocess)", allow_module_level=True)

import torch  # noqa: E402

from backend_cases import cases, check_materialize, check_step, make_case  # noqa: E402
from ppu_fast.backends import load  # noqa: E402
from ppu_fast.backends.torch_ref import oracle_q, reference_step  # noqa: E402
from ppu_fast.backends.triton import INTERPRET, TritonBackend  # noqa: E402

# The interpreter is slow: every k and dtype of cases() is kept, but rows of 1000+ entries use the
# smaller prime N of cases() (131 instead of 257).
CASES = [(min(n, 131) if k >= 1000 else n, k, *rest) for n, k, *rest in cases()]
IDS = [f"n{n}-k{k}-{str(dt).split('.')[-1]}-s{s:g}{'-inf' if ni else ''}{'-nc' if nc else ''}"
       for n, k, dt, s, ni, nc in CASES]


def wide(k: int) -> TritonBackend:
    """A backend forced onto the two-pass wide-row kernels for any k > 16, with blocks small
    enough that k spans several of them (partial last blocks included)."""
    return TritonBackend(max_single_block_k=16, online_block_k=64 if k <= 100 else 512)


def test_interpreter_is_on():
    assert INTERPRET
    assert TritonBackend().available_reasons() == []
    backend, why = load("triton")
    assert backend is not None and why == []
    assert backend.not_supported_reasons(torch.zeros(2, 2)) == []


@pytest.mark.parametrize("n,k,dtype,shift,neg_inf,noncontig", CASES, ids=IDS)
def test_single_read_kernels(n, k, dtype, shift, neg_inf, noncontig):
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=n + k)
    before = (log_p.clone(), inv_c.clone(), alpha.clone())
    b = TritonBackend()
    for hessian in (False, True, "diag"):
        check_step(b, log_p, inv_c, alpha, hessian)
    check_materialize(b, log_p, inv_c, alpha)
    for t, t0 in zip((log_p, inv_c, alpha), before):  # inputs untouched
        assert torch.equal(t, t0)


# k <= 16 takes the single-read path even in wide(k); the wide-row variant keeps every longer k and
# dtype, with the smaller N from k = 100 on.
WIDE = [(min(n, 131) if k >= 100 else n, k, *rest) for n, k, *rest in CASES if k > 16]
WIDE_IDS = [f"n{w[0]}-{i.split('-', 1)[1]}" for w, i in zip(WIDE, [i for c, i in zip(CASES, IDS)
                                                                   if c[1] > 16])]


@pytest.mark.parametrize("n,k,dtype,shift,neg_inf,noncontig", WIDE, ids=WIDE_IDS)
def test_wide_row_kernels(n, k, dtype, shift, neg_inf, noncontig):
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=7 * n + k)
    b = wide(k)
    for hessian in (False, True, "diag"):
        check_step(b, log_p, inv_c, alpha, hessian)
    check_materialize(b, log_p, inv_c, alpha)


@pytest.mark.parametrize("k", [3, 17])
def test_hessian_by_chunks_for_small_k(k):
    """The GEMM-on-materialised-chunks Hessian (used above hessian_kernel_max_k) on small k."""
    log_p, inv_c, alpha = make_case(1009, k, torch.float32, seed=k)
    check_step(TritonBackend(hessian_kernel_max_k=0), log_p, inv_c, alpha, True)


@pytest.mark.parametrize("k", [10, 100])
def test_hessian_is_symmetric_and_annihilates_ones(k):
    log_p, inv_c, alpha = make_case(263, k, torch.float32, seed=k + 1)
    for b in (TritonBackend(), TritonBackend(hessian_kernel_max_k=0), wide(k)):
        _, _, h = b.step(log_p, inv_c, alpha, True)
        # float32 products (ic q_j) q_k and (ic q_k) q_j round differently: symmetric to ~1e-7
        assert torch.allclose(h, h.T, rtol=0, atol=1e-6 * h.abs().max())
        # sum_k H_jk = sum_i ic_i q_ij (1 - sum_k q_ik) = 0 (gauge direction)
        assert h.sum(dim=1).abs().max() <= 1e-5 * h.abs().max()


@pytest.mark.parametrize("make_backend", [lambda k: TritonBackend(), wide], ids=["single", "wide"])
def test_deterministic(make_backend):
    for k, n, modes in ((10, 1009, (False, "diag", True)), (1000, 131, (False, "diag"))):
        log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=k + 3)
        b = make_backend(k)
        for hessian in modes:
            r1 = b.step(log_p, inv_c, alpha, hessian)
            r2 = b.step(log_p, inv_c, alpha, hessian)
            for x, y in zip(r1, r2):
                if x is None:
                    assert y is None
                else:
                    assert torch.equal(x, y), "two runs differ"


@pytest.mark.parametrize("make_backend", [lambda k: TritonBackend(), wide], ids=["single", "wide"])
def test_neg_inf_blocks_and_rows(make_backend):
    """Whole -inf k-blocks (first, middle, last) and rows that are -inf but for one entry: no NaN,
    exact zeros in Q, and agreement with the float64 oracle."""
    n, k = 67, 100
    log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=11)
    log_p = log_p.clone()
    log_p[0, :64] = float("-inf")      # first k-block of the wide kernels (64 wide) all -inf
    log_p[1, 16:48] = float("-inf")    # middle blocks
    log_p[2, 64:] = float("-inf")      # last (partial) block
    log_p[3, 1:] = float("-inf")       # a single finite entry
    log_p[4, :-1] = float("-inf")      # only the last entry finite
    b = make_backend(k)
    for hessian in (False, True, "diag"):
        check_step(b, log_p, inv_c, alpha, hessian)
    out = torch.full((n, k), float("nan"))
    b.materialize(log_p, inv_c, alpha, out)
    assert (out[torch.isinf(log_p)] == 0).all()
    assert out[3, 0] == 1.0 and out[4, -1] == 1.0
    ora = oracle_q(log_p, inv_c, alpha)
    assert torch.allclose(out.double(), ora, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make_backend", [lambda k: TritonBackend(), wide], ids=["single", "wide"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16,
                                       torch.float64])
def test_materialize_out_dtypes_and_strides(make_backend, out_dtype):
    k = 37
    log_p, inv_c, alpha = make_case(131, k, torch.float16, seed=5)
    b = make_backend(k)
    check_materialize(b, log_p, inv_c, alpha, out_dtype=out_dtype)
    # a transposed (column-major) out, and a strided inv_c
    inv_c_strided = torch.stack([inv_c, inv_c], dim=1)[:, 0]
    out = torch.full((k, 131), float("nan"), dtype=out_dtype).T
    b.materialize(log_p, inv_c_strided, alpha, out)
    ref = oracle_q(log_p, inv_c, alpha)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(out_dtype, 1e-6)
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)


def test_tiny_shapes():
    for n, k in ((1, 1), (1, 2), (2, 1), (1, 1000), (3, 17)):
        log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=n * k)
        for b in (TritonBackend(), wide(k)):
            for hessian in (False, True, "diag"):
                check_step(b, log_p, inv_c, alpha, hessian)
            check_materialize(b, log_p, inv_c, alpha)


def test_empty_and_errors():
    b = TritonBackend()
    log_p, inv_c, alpha = make_case(5, 4, torch.float32)
    colsum, wlogz, h = b.step(log_p[:0], inv_c[:0], alpha, True)
    assert colsum.shape == (4,) and float(wlogz) == 0.0 and h.shape == (4, 4)
    assert (colsum == 0).all()
    with pytest.raises(TypeError, match="out"):
        b.materialize(log_p, inv_c, alpha, torch.empty(5, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="inv_c"):
        b.step(log_p, inv_c[:3], alpha)
    with pytest.raises(ValueError, match="hessian"):
        b.step(log_p, inv_c, alpha, "full")
    with pytest.raises(ValueError, match="k >= 1"):
        b.step(log_p[:, :0], inv_c, alpha[:0])
    with pytest.raises(ValueError, match="max_single_block_k"):
        TritonBackend(max_single_block_k=100)


def test_agrees_with_reference_at_large_shift():
    """|alpha * inv_c| up to 1e4: most of Q underflows to exact zeros; colsum still matches."""
    log_p, inv_c, alpha = make_case(257, 100, torch.float32, shift=1e4, seed=2)
    for b in (TritonBackend(), wide(100)):
        got = b.step(log_p, inv_c, alpha)[0]
        ref = reference_step(log_p, inv_c, alpha)[0]
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
