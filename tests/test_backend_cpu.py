"""Tests of the ``cpu`` backend (ppu_fast._C via ppu_fast.backends.cpu).

Every kernel variant this CPU runs is tested: "auto" (AVX-512 here) on all shared cases, and the
AVX2 and generic kernels on a subset (they share the code, compiled for other vector widths);
``prepare`` on every mode, dtype and bad input on all of them. Skipped as a whole only if
ppu_fast._C is not built (CI builds it with ``pip install -e .``).

Timing is not tested here (benchmarks/ does that); the numbers quoted in
ppu_fast/backends/cpu.py came from median-of-N ``time.perf_counter`` loops around ``step``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

_C = pytest.importorskip("ppu_fast._C", reason="ppu_fast._C is not built (pip install -e .)")

from backend_cases import (bad_inputs, cases, cases_f64, check_materialize,  # noqa: E402
                           check_prepare, check_step, make_case, onehot_cases, prepare_inputs)
import ppu_fast  # noqa: E402
from ppu_fast.backends import get_backend  # noqa: E402
from ppu_fast.backends.base import ROW_SUM_ULPS, compute_dtype  # noqa: E402
from ppu_fast.backends.cpu import CpuBackend  # noqa: E402

HESSIANS = (False, True, "diag")
ISAS = tuple(_C.supported_isas())
OTHER_ISAS = tuple(i for i in ISAS if i != _C.best_isa())
# float64 buffers (cases_f64) take the float64 kernels, judged against the float64 reference.
CASES = cases() + cases_f64()
# The other kernels share the code at other vector widths: both code paths (k < 32 in lanes,
# k >= 32 along the row) with float32 / bfloat16, the awkward cases (tiny N, huge shifts, -inf,
# non-contiguous float16) for k = 3 and 17, and one k = 1023 row-path case with a ragged tail.
SUBSET = ([c for c in CASES if c[1] <= 100 and c[2] != torch.float64
           and (c[2] != torch.float16 or c[5])]
          + [c for c in CASES if c[1] == 1023 and c[2] == torch.bfloat16]
          + [c for c in CASES if c[2] == torch.float64 and c[1] in (3, 17, 100, 1023)])


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


@pytest.mark.parametrize("case", SUBSET, ids=_id)
def test_bound_step_is_step(case) -> None:
    """The solver's bound step (checked once, bound pointers) returns exactly what ``step``
    returns, for every Hessian mode, with strided inputs and a non-contiguous inv_c; its results
    are the caller's to keep (a later pass neither overwrites them nor reads a stale alpha)."""
    from ppu_fast.backends.base import Backend, host_step

    n, k, dtype, shift, neg_inf, noncontig = case
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=n * 1000 + k + 1)
    inv_c = torch.stack([inv_c, inv_c], 1)[:, 0]  # strided: bind_step must copy it
    be = CpuBackend(num_threads=2)
    run, generic = be.bind_step(log_p, inv_c), Backend.bind_step(be, log_p, inv_c)
    kept = []
    for i, hessian in enumerate((False, True, "diag", "exact")):
        a = (alpha * (1 + i)).numpy()
        want = host_step(*be.step(log_p, inv_c, torch.from_numpy(a), hessian))
        for got in (run(a, hessian), generic(a, hessian)):
            assert np.array_equal(got[0], want[0]) and got[1] == want[1]
            assert (got[2] is None) == (want[2] is None)
            if want[2] is not None:
                assert np.array_equal(got[2], want[2], equal_nan=True)
        kept.append((want, run(a, hessian)))
    for want, got in kept:  # every pass's arrays are still its own
        assert np.array_equal(got[0], want[0])
        assert got[2] is None or np.array_equal(got[2], want[2], equal_nan=True)
    with pytest.raises(ValueError, match="hessian: expected one of"):
        run(alpha.numpy(), "full")
    with pytest.raises(ValueError, match=r"alpha: expected shape"):
        run(np.zeros(k + 1), False)


def test_bound_step_goes_through_a_replaced_step(monkeypatch) -> None:
    """A subclass's or a test's own ``step`` is what the solver's passes call."""
    import ppu_fast

    calls = []

    class Counting(CpuBackend):
        def step(self, *a):
            calls.append(a[3])
            return super().step(*a)

    log_p, inv_c, alpha = make_case(300, 5, seed=3)
    Counting().bind_step(log_p, inv_c)(alpha.numpy(), True)
    assert calls == [True]
    step = CpuBackend.step
    monkeypatch.setattr(CpuBackend, "step", lambda self, *a: calls.append(a[3]) or step(self, *a))
    ppu_fast.refine(torch.softmax(torch.randn(300, 5), 1), torch.arange(300) < 30, backend="cpu")
    assert len(calls) > 1


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


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,margin", onehot_cases())
def test_hessian_of_one_hot_rows(isa: str, n: int, k: int, margin: float) -> None:
    """The diagonal and the Newton Hessian stay within 1e-3 of the float64 oracle on rows whose
    1 - q is 1e-13 (margin 30) or 1e-26 (margin 60), and the Hessian is PSD."""
    log_p, inv_c, alpha = make_case(n, k, margin=margin, seed=k)
    be = CpuBackend(isa=isa)
    check_step(be, log_p, inv_c, alpha, "diag")
    if k <= 128:
        check_step(be, log_p, inv_c, alpha, True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", [3, 10, 40, 100, 1000])
@pytest.mark.parametrize("margin", [30.0, 60.0])
def test_prepare_of_one_hot_rows(isa: str, mode: str, k: int, margin: float) -> None:
    """prepare's log P^, sums and first evaluation (its Hessian within 1e-3 of the oracle, where
    1 - q is 1e-13 or 1e-26) on near one-hot rows, float32 and float64 buffers, every kernel."""
    be = CpuBackend(isa=isa)
    n = 257 if k >= 100 else 1009
    for dtype in (torch.float32, torch.float64):
        x = prepare_inputs(n, k, mode, dtype, seed=k + 7, margin=margin)
        forget = torch.rand(n, generator=torch.Generator().manual_seed(5)) < 0.2
        inv_c = torch.where(forget, 1.0, 0.5).to(dtype)
        fill = torch.full((k,), -math.log(k))
        for hessian in ("diag", True) if k <= 128 else ("diag",):
            if mode == "log_p":
                check_prepare(be, x, mode, None, None, dtype, inv_c, hessian)
            else:
                check_prepare(be, x, mode, forget, fill, dtype, inv_c, hessian)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [3, 40, 1000])
@pytest.mark.parametrize("inv_c_min,margin", [(1e-8, 30.0), (1e-30, 0.0)])
def test_extreme_weights(isa: str, k: int, inv_c_min: float, margin: float) -> None:
    """Row weights as refine scales them at lam = 1e8 / 1e30 (inv_c down to 1e-30): the column
    sums, Q and the Hessians (whose heavy rows contribute q (1 - q) inv_c, subnormal in
    float32) against the oracle, on every kernel variant."""
    n = 1009 if k < 1000 else 131
    log_p, inv_c, alpha = make_case(n, k, margin=margin, seed=k + 11)
    inv_c = torch.where(inv_c < 0.5, torch.tensor(inv_c_min), torch.tensor(1.0)).float()
    be = CpuBackend(isa=isa)
    for hessian in HESSIANS:
        if hessian is True and k > 128:
            continue
        check_step(be, log_p, inv_c, alpha, hessian)
    check_materialize(be, log_p, inv_c, alpha)


PREP_KS = (1, 2, 3, 10, 17, 31, 32, 33, 100, 1000, 1023)
PREP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_prepare_matrix(backend: CpuBackend, mode: str, k: int, dtypes, outs) -> None:
    """check_prepare on every input dtype of ``dtypes``, contiguous and strided, into each buffer
    dtype of ``outs(dtype)`` (None: no out, x is the buffer), with and without a forget set, fill
    and the first evaluation in every Hessian mode."""
    n = 257 if k >= 32 else 1009
    for dtype in dtypes:
        for noncontig in (False, True):
            x = prepare_inputs(n, k, mode, dtype, seed=k, noncontig=noncontig)
            forget = torch.rand(n, generator=torch.Generator().manual_seed(k)) < 0.25
            fill = torch.full((k,), -math.log(k))
            for out_dtype in outs(dtype):
                buf = x.dtype if out_dtype is None else out_dtype
                inv_c = torch.where(forget, 1.0, 0.5).to(compute_dtype(buf))
                for hessian in (False, "diag", True):
                    if hessian is True and k > 128:
                        continue
                    if mode == "log_p":
                        check_prepare(backend, x, mode, None, None, out_dtype, inv_c, hessian)
                    else:
                        check_prepare(backend, x, mode, forget, fill, out_dtype, inv_c, hessian)
                check_prepare(backend, x, mode, None if mode == "log_p" else forget, None,
                              out_dtype)


@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", PREP_KS)
def test_prepare_matches_reference(backend: CpuBackend, mode: str, k: int) -> None:
    """Float32 and bfloat16 buffers from every input dtype (float64 too): the reference's values
    within its own error."""
    _check_prepare_matrix(
        backend, mode, k, PREP_DTYPES,
        lambda dt: ((None, torch.float32) if mode == "log_p" and dt != torch.float64
                    else (torch.float32, torch.bfloat16)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", [1, 5, 17, 40, 1000])
def test_prepare_reports_every_bad_input(isa: str, mode: str, k: int) -> None:
    """Each fault is reported with the reference's kind and first row, by every kernel."""
    be = CpuBackend(isa=isa)
    x = prepare_inputs(203, k, mode, seed=2)
    for name, make, kind in bad_inputs(mode):
        bad = make(x)
        check_prepare(be, bad, mode, None, None, None if mode == "log_p" else torch.float32)
        got = be.prepare(bad, mode, None, None,
                         None if mode == "log_p" else torch.empty(203, k))
        assert got.error == (kind, 37), (name, got.error)


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_prepare_refuses_a_bad_fill(name: str) -> None:
    """fill must be float32 (k,) on x's device or the CPU: the error names it, says what is
    expected and what came; nothing is written."""
    from ppu_fast.backends.torch_ref import TorchBackend
    be = CpuBackend() if name == "cpu" else TorchBackend()
    x = prepare_inputs(20, 5, "probs", seed=1)
    forget = torch.zeros(20, dtype=torch.bool)
    forget[3] = True
    out = torch.full((20, 5), 7.0)
    for fill, got in ((torch.zeros(4), r"torch.float32 \(4,\) on cpu"),
                      (torch.zeros(5, dtype=torch.float64), r"torch.float64 \(5,\) on cpu"),
                      (torch.zeros(5, device="meta"), r"torch.float32 \(5,\) on meta")):
        with pytest.raises(ValueError, match=r"fill: expected a float32 tensor \(5,\) on the "
                                             r"CPU, got " + got):
            be.prepare(x, "probs", forget, fill, out)
    assert bool((out == 7.0).all())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [3, 17, 40, 1000])
def test_prepare_of_logits_far_from_zero(isa: str, k: int) -> None:
    """log_softmax of logits offset by up to 1e30 (ties at the maximum included) against float64:
    the kernels formed max + log(sum e) and lost the log to its rounding (two tied logits of 1e30
    gave log P^ = 0 instead of -log 2; at 1e4 an error of ~5e-4 per row). A row-constant error
    cancels in Q but not in the first evaluation's log Z = 0. Found by a Triton-vs-cpu fuzz."""
    be = CpuBackend(isa=isa)
    g = torch.Generator().manual_seed(k)
    for dtype in (torch.float32, torch.float64):
        for offset in (0.0, 1e2, 1e4, 1e8, 1e30, -1e30):
            x = torch.randn(37, k, generator=g, dtype=torch.float64) * 3
            x[:, 1] = x.max(1).values  # a tie at the maximum in every row
            # Exactly representable offsets: the oracle sees the same values as the kernel.
            x = (x.to(dtype) + offset).to(dtype)
            want = torch.log_softmax(x.double(), dim=1)
            out = torch.empty(x.shape, dtype=dtype)
            prep = be.prepare(x, "logits", None, None, out)
            assert prep.error is None
            finite = want > -60
            err = float((out.double() - want)[finite].abs().max())
            # A few ulps of the largest |x - max| term, and the sum of k exps' rounding in the
            # log (a sequential float32 sum of 1,000 terms: ~2.7e-5 relative).
            span = float((x.double() - x.double().max(1, keepdim=True).values)[finite].abs().max())
            eps = torch.finfo(dtype).eps
            assert err <= eps * (8 * max(span, 1.0) + k), (dtype, offset, err)


@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
def test_prepare_of_no_rows(mode: str) -> None:
    """N = 0 with out and inv_c given: the reference's zero sums and first evaluation (an empty
    tensor's data pointer, 0, read as "no out" / "no inv_c", was refused or mis-sized)."""
    from ppu_fast.backends.torch_ref import reference_prepare
    x = torch.empty(0, 4)
    for inv_c, hessian in ((None, False), (torch.ones(0), True), (torch.ones(0), "diag")):
        got = CpuBackend().prepare(x, mode, None, None, torch.empty(0, 4), inv_c, hessian)
        ref = reference_prepare(x, mode, None, None, torch.empty(0, 4), inv_c, hessian)
        assert got.error is None and (got.first is None) == (ref.first is None)
        for a, b in zip([got.retain_sums, got.forget_sums, *(got.first or ())],
                        [ref.retain_sums, ref.forget_sums, *(ref.first or ())]):
            assert (a is None and b is None) or torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_prepare_in_log_p_mode_refuses_a_forget_set(name: str) -> None:
    """log_p mode writes x as it is: a forget set or fill there is refused by every backend (the
    cpu kernel ignored it while the reference wrote fill), and nothing is written."""
    from ppu_fast.backends.torch_ref import TorchBackend
    be = CpuBackend() if name == "cpu" else TorchBackend()
    x = prepare_inputs(20, 5, "log_p", seed=1)
    forget = torch.zeros(20, dtype=torch.bool)
    forget[3] = True
    out = torch.full((20, 5), 7.0)
    for fg, fill in ((forget, torch.zeros(5)), (forget, None), (None, torch.zeros(5))):
        with pytest.raises(ValueError, match=r"forget, fill: only for mode 'probs' or 'logits'"):
            be.prepare(x, "log_p", fg, fill, out)
    assert bool((out == 7.0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", [5, 40, 1000])
def test_prepare_reports_bad_rows_of_every_input_dtype(backend: CpuBackend, dtype, mode: str,
                                                       k: int) -> None:
    """The faults of the float32 test above in half and float64 inputs: the oracle's kind and
    first row, with the row-sum tolerance refine passes for the dtype."""
    from ppu_fast.problem import row_sum_tol

    tol = row_sum_tol(dtype)  # what refine passes: two ulps of 1 for half rows
    x = prepare_inputs(203, k, mode, dtype, seed=3)
    for name, make, kind in bad_inputs(mode):
        bad = make(x)
        check_prepare(backend, bad, mode, None, None, None if mode == "log_p" else torch.float32,
                      tol=tol)
        got = backend.prepare(bad, mode, None, None,
                              None if mode == "log_p" else torch.empty(203, k), None, False, tol)
        if name == "sum 1.01" and tol > 0.01:
            assert got.error is None, "a bfloat16 row 1 % off is within its 2-ulp tolerance"
            continue
        assert got.error == (kind, 37), (name, dtype, got.error)


@pytest.mark.skipif(not OTHER_ISAS, reason="this CPU runs only one kernel variant")
@pytest.mark.parametrize("isa", OTHER_ISAS)
@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", [3, 17, 100, 1023])
def test_prepare_other_isas(isa: str, mode: str, k: int) -> None:
    be = CpuBackend(isa=isa)
    n = 257
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = prepare_inputs(n, k, mode, dtype, seed=k + 1, noncontig=dtype == torch.bfloat16)
        forget = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.3
        inv_c = torch.where(forget, 1.0, 2.0).float()
        fill = torch.full((k,), -math.log(k))
        hessian = True if k <= 128 else "diag"
        if mode == "log_p":
            check_prepare(be, x, mode, None, None, torch.float32, inv_c, hessian)
        else:
            check_prepare(be, x, mode, forget, fill, torch.float32, inv_c, hessian)


def test_prepare_writes_log_p_hat_and_first_evaluation(backend: CpuBackend) -> None:
    """The buffer holds log(p / sum p) with fill on forget rows, and the first evaluation equals a
    step at alpha = 0 on it (to float32 rounding)."""
    x = prepare_inputs(3001, 12, "probs", seed=9)
    forget = torch.zeros(3001, dtype=torch.bool)
    forget[::7] = True
    fill = torch.log(torch.full((12,), 1.0 / 12))
    inv_c = torch.where(forget, 1.0, 4.0).float()
    out = torch.empty(3001, 12)
    got = backend.prepare(x, "probs", forget, fill, out, inv_c, True)
    assert torch.equal(out[forget], fill.expand(int(forget.sum()), 12))
    want = torch.log(x[~forget].double() / x[~forget].double().sum(1, keepdim=True))
    torch.testing.assert_close(out[~forget].double(), want, rtol=0, atol=2e-6)
    colsum, wlogz, h = backend.step(out, inv_c, torch.zeros(12, dtype=torch.float64), True)
    torch.testing.assert_close(got.first[0], colsum, rtol=1e-6, atol=1e-4)
    assert abs(float(got.first[1]) - float(wlogz)) < 1e-3
    torch.testing.assert_close(got.first[2], h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n,k", [(200_011, 10), (30_011, 100), (3_001, 1000)])
@pytest.mark.parametrize("hessian", HESSIANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic(n: int, k: int, hessian, dtype: torch.dtype) -> None:
    """Bit-identical results across runs and across 1, 2 and 4 threads (fixed ranges, fixed
    order; the pool decides only who runs a range), for step, prepare and materialize, in both
    kernel dtypes. The sizes give every call several threads. (The dense Hessian at k = 1,000:
    what a stalled diagonal Newton asks for.)"""
    log_p, inv_c, alpha = make_case(n, k, dtype, seed=11)
    assert _C.threads_for(n, k, 4) >= 2
    runs = [CpuBackend(num_threads=t).step(log_p, inv_c, alpha, hessian) for t in (2, 2, 1, 4)]
    for colsum, wlogz, h in runs[1:]:
        assert torch.equal(colsum, runs[0][0])
        assert torch.equal(wlogz, runs[0][1])
        if hessian is not False:
            assert torch.equal(h, runs[0][2])
    if hessian is False:  # materialize does not depend on the Hessian mode
        qs = []
        for t in (2, 1, 4):
            q = torch.empty_like(log_p)
            CpuBackend(num_threads=t).materialize(log_p, inv_c, alpha, q)
            qs.append(q)
        assert all(torch.equal(q, qs[0]) for q in qs[1:])
    x = prepare_inputs(n, k, "probs", dtype, seed=12)
    forget = torch.arange(n) % 9 == 0
    fill = torch.full((k,), -math.log(k))
    outs = []
    for t in (2, 1, 4):
        out = torch.empty(n, k, dtype=dtype)
        res = CpuBackend(num_threads=t).prepare(x, "probs", forget, fill, out, inv_c, hessian)
        outs.append((out, res))
    for out, res in outs[1:]:
        assert torch.equal(out, outs[0][0])
        assert torch.equal(res.retain_sums, outs[0][1].retain_sums)
        for a, b in zip(res.first, outs[0][1].first):
            assert (a is None and b is None) or torch.equal(a, b)


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
    with pytest.raises(ValueError, match="inv_c: expected a float64"):
        backend.step(log_p.double(), inv_c, alpha)  # a float64 log_p takes float64 weights
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
    meta = torch.empty(20, 3, device="meta")
    assert any("CPU" in r for r in backend.not_supported_reasons(meta))
    with pytest.raises(ValueError, match="device|CPU"):
        backend.step(meta, inv_c.to("meta"), alpha.to("meta"))
    assert backend.not_supported_reasons(log_p.double()) == []
    assert backend.not_supported_reasons(log_p) == []
    assert any("int32" in r for r in backend.not_supported_reasons(log_p.int()))


def test_raw_binding_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        _C.step(1, 7, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="full Hessian"):
        _C.step(1, 0, 1, 2000, 2000, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="hstride"):
        _C.step(1, 0, 1, 4, 4, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="isa"):
        _C.step(1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1, "sse9")
    with pytest.raises(ValueError, match="mode"):
        _C.prepare(1, 0, 1, 2, 2, 1, 5, 0, 0, 1, 0, 2, 1, 0, 0, 1, 1e-3, 1, 6, 1)
    with pytest.raises(ValueError, match="packed"):
        _C.prepare(1, 0, 1, 2, 2, 1, 0, 0, 0, 1, 0, 2, 1, 0, 0, 1, 1e-3, 1, 5, 1)
    with pytest.raises(ValueError, match="out: required"):
        _C.prepare(1, 0, 1, 2, 2, 1, 0, 0, 0, 0, 0, 2, 1, 0, 0, 1, 1e-3, 1, 6, 1)


def test_small_problems_stay_on_one_thread() -> None:
    assert _C.threads_for(50_000, 1, 8) == 1
    assert _C.threads_for(1_000_000, 100, 2) == 2
    assert _C.threads_for(1_000_000, 100, 64) == 64
    assert _C.threads_for(300_000, 1, 64) == 300_000 // _C.MIN_WORK


_NO_THREADS_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
static int fail = 0;
void shim_fail(int on) { fail = on; }
int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
  static int (*real)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*) = 0;
  if (!real) real = (int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*))
      dlsym(RTLD_NEXT, "pthread_create");
  return fail ? EAGAIN : real(t, a, f, arg);
}
"""

_NO_THREADS_SCRIPT = r"""
import ctypes, time, numpy as np, torch, ppu_fast
torch.set_num_threads(1)  # no pool thread yet, and none of torch's
g = torch.Generator().manual_seed(0)
p = torch.softmax(torch.randn(200_000, 10, generator=g), 1)
mask = torch.arange(200_000) % 7 == 0
want = ppu_fast.refine(p, mask, backend="cpu").numpy()
ctypes.CDLL(None).shim_fail(1)  # from here the OS refuses every new thread
torch.set_num_threads(2)
for _ in range(2):
    got = ppu_fast.refine(p, mask, backend="cpu").numpy()  # numpy: torch's ops would want threads
    assert np.array_equal(got, want)
assert ppu_fast._C.pool_threads() == 0
# The limit was a moment's: a call a second after the refusal tries again and gets its helper.
ctypes.CDLL(None).shim_fail(0)
time.sleep(1.1)
got = ppu_fast.refine(p, mask, backend="cpu").numpy()
assert np.array_equal(got, want)
assert ppu_fast._C.pool_threads() == 1, ppu_fast._C.pool_threads()
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("cc") is None,
                    reason="needs Linux and a C compiler (an LD_PRELOAD shim)")
def test_a_refused_thread_leaves_the_call_on_fewer_threads(tmp_path) -> None:
    """Where the OS refuses a pool thread (a container's process limit), the kernels run on the
    threads there are, with the same answer; they raised RuntimeError("Resource temporarily
    unavailable") from std::thread. Once the OS allows threads again, a call a second later gets
    its helper (the pool had stopped trying for the rest of the process)."""
    (tmp_path / "shim.c").write_text(_NO_THREADS_SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(tmp_path / "shim.so"),
                    str(tmp_path / "shim.c"), "-ldl"], check=True)
    env = dict(os.environ, LD_PRELOAD=str(tmp_path / "shim.so"))
    run = subprocess.run([sys.executable, "-c", _NO_THREADS_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.parametrize("isa", ISAS)
def test_wide_rows_sum_without_the_float32_bias(isa: str) -> None:
    """At k = 100,000 a plain float32 sum of e = exp(x - m) per lane dropped the terms below half
    an ulp of its running sum: row sums low, every q high, sum(colsum) / N - 1 = +2.3e-6, a
    residual floor above tol 1e-6 (a refine stalled). Wide rows sum compensated: the column sums
    of the step, of its diagonal-Hessian variant and of prepare's first evaluation ("log_p") add
    up to N within float32's tol floor 1e-7 (what is left is each row's rounded 1 / sum, of
    either sign), and match float64's column sums."""
    n, k = 24, 100_000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=g) * 3
    x[torch.arange(n), torch.randint(0, k, (n,), generator=g)] += 9  # peaked rows
    log_p = torch.log_softmax(x.double(), dim=1).float()
    inv_c = torch.ones(n)
    alpha = torch.zeros(k, dtype=torch.float64)
    be = CpuBackend(isa=isa, num_threads=1)
    q64 = torch.softmax(log_p.double(), dim=1)
    for hessian in (False, "diag"):
        colsum, _, _ = be.step(log_p, inv_c, alpha, hessian)
        assert abs(float(colsum.sum()) / n - 1.0) < 1e-7, hessian
        torch.testing.assert_close(colsum.double(), q64.sum(0), rtol=1e-5, atol=1e-9)
    first = be.prepare(log_p, "log_p", None, None, None, inv_c, "diag").first
    assert abs(float(first[0].sum()) / n - 1.0) < 1e-7
    # prepare's own normalisation (probs: the row sum; logits: the softmax), whose column sums
    # are the targets: summed plainly, "original" targets exceeded N by 2.6e-6 and a refine
    # meeting them with the compensated passes was refused as infeasible.
    forget = torch.zeros(n, dtype=torch.bool)
    forget[:3] = True
    for mode, x_in in (("probs", torch.exp(log_p)), ("logits", x)):
        out = torch.empty(n, k)
        res = be.prepare(x_in, mode, forget, None, out)
        total = float(res.retain_sums.sum() + res.forget_sums.sum())
        assert abs(total / n - 1.0) < 1e-7, mode


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k, scale", [(1000, 2.0), (5000, 5.0)])
def test_rows_of_many_small_entries_sum_without_the_float32_bias(isa: str, k: int,
                                                                 scale: float) -> None:
    """Below the compensated width, one plain float32 sum per lane dropped every entry below
    half an ulp of it: with many small entries (logits randn * 5, k = 5,000) the step's and
    prepare's column sums added up to N + 3.5e-7 per row, above float32's tol floor 1e-7, and a
    refine to "original" or "retain" targets at tol 2e-7 stopped short or was refused as
    infeasible. Blocks of vectors summed plainly, then paired (RowSum's blocked mode), keep
    them within 1e-7 of N per row, and the step's column sums match float64's."""
    n = 300
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, k, generator=g) * scale
    be = CpuBackend(isa=isa, num_threads=1)
    out = torch.empty(n, k)
    res = be.prepare(x, "logits", None, None, out)
    assert abs(float(res.retain_sums.sum()) / n - 1.0) < 5e-8
    colsum, _, _ = be.step(out, torch.ones(n), torch.zeros(k, dtype=torch.float64))
    assert abs(float(colsum.sum()) / n - 1.0) < 5e-8
    q64 = torch.softmax(x.double(), dim=1)
    assert float((colsum - q64.sum(0)).abs().sum()) / n < 2e-7


def test_a_wide_refine_meets_original_targets() -> None:
    """k = 100,000 with marginals="original": refused as infeasible (2.6e-6 above tol 1e-6)
    while prepare's normalisation still summed plainly."""
    n, k = 60, 100_000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=g) * 3
    x[torch.arange(n), torch.randint(0, k, (n,), generator=g)] += 9
    for kw in ({"probs": torch.softmax(x.double(), 1).float()}, {"logits": x}):
        _, info = ppu_fast.refine(forget_mask=torch.arange(4), marginals="original",
                                  backend="cpu", return_info=True, **kw)
        assert info.converged and info.residual <= 1e-6, (list(kw), info.history)


def test_registry_picks_cpu_for_cpu_tensors() -> None:
    log_p, _, _ = make_case(10, 3)
    assert get_backend("cpu", log_p).name == "cpu"
    assert get_backend("auto", log_p).name in ("cpu", "torch")  # PPU_FAST_BACKEND may override


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [4, 40])
def test_prepare_logs_tiny_and_zero_probabilities(isa: str, k: int) -> None:
    """Subnormal probabilities get their exact log and zeros -inf (row and lane paths)."""
    row = torch.full((k,), 0.0, dtype=torch.float64)
    row[:3] = torch.tensor([1e-40, 1e-45, 0.0], dtype=torch.float64)
    row[3:] = (1.0 - 1e-40 - 1e-45) / (k - 3)
    x = row.float().expand(37, k).contiguous()
    out = torch.empty(37, k)
    res = CpuBackend(isa=isa).prepare(x, "probs", None, None, out)
    assert res.error is None
    want = torch.log(x.double() / x.double().sum(1, keepdim=True))
    assert torch.isneginf(out[:, 2]).all()
    finite = torch.isfinite(want)
    torch.testing.assert_close(out.double()[finite], want[finite], rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [3, 300])
def test_prepare_log_within_ulps_of_float64(isa: str, k: int) -> None:
    """log P^ of probabilities spread over every float32 binade (subnormals, values next to 1)
    within 1.5 float32 ulps of the float64 log, on rows whose float32 sum is exactly 1 (so that
    only the log is measured): the table log of the AVX-512 kernels and the polynomial one of the
    others, in the lane (k = 3) and row (k = 300) paths."""
    rng = np.random.default_rng(5)
    n = 20000
    a = rng.integers(1, 0x3E800000, size=n, dtype=np.uint32).view(np.float32)  # (0, 0.25)
    a[:2000] = np.nextafter(np.float32(0.25), np.float32(0)) - np.arange(2000, dtype=np.float32) * np.float32(2 ** -26)
    b = (np.float32(0.25) - a).astype(np.float32)
    rest = np.zeros(k - 2, dtype=np.float32)
    rest[-1] = 0.75
    x = np.concatenate([a[:, None], b[:, None], np.broadcast_to(rest, (n, len(rest)))], 1)
    keep = (x.astype(np.float32).sum(1, dtype=np.float32) == np.float32(1.0)) & \
        (x.astype(np.float64).sum(1) == 1.0)
    x = torch.from_numpy(np.ascontiguousarray(x[keep]))
    assert len(x) > 1000
    out = torch.empty_like(x)
    assert CpuBackend(isa=isa).prepare(x, "probs", None, None, out).error is None
    want = np.log(x[:, 0].double().numpy())
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    err = np.abs(out[:, 0].double().numpy() - want) / ulp
    assert err.max() <= 1.5, (isa, float(err.max()))


# -- float64 buffers: the float64 kernels (csrc/cpu/kernel_f64.h; step and materialize on the
# shared cases are in test_step_and_materialize / test_other_isas) ------------------------------
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,margin", onehot_cases())
def test_float64_hessian_of_one_hot_rows(isa: str, n: int, k: int, margin: float) -> None:
    """Rows whose 1 - q is 1e-13 (margin 30) or 1e-26 (margin 60): the float64 diagonal and
    Newton Hessian within 1e-10 of the oracle, PSD."""
    log_p, inv_c, alpha = make_case(n, k, torch.float64, margin=margin, seed=k)
    be = CpuBackend(isa=isa)
    check_step(be, log_p, inv_c, alpha, "diag")
    if k <= 128:
        check_step(be, log_p, inv_c, alpha, True)


@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", PREP_KS)
def test_float64_prepare_matches_reference(backend: CpuBackend, mode: str, k: int) -> None:
    """A float64 out (or, in log_p mode, a float64 x without out) is written and summed in
    float64, from float64, float32 and bfloat16 input, contiguous and strided, with a forget
    set, fill and the first evaluation in every Hessian mode."""
    _check_prepare_matrix(
        backend, mode, k, (torch.float64, torch.float32, torch.bfloat16),
        lambda dt: ((torch.float64, None) if mode == "log_p" and dt == torch.float64
                    else (torch.float64,)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", [1, 5, 40, 1000])
def test_float64_prepare_reports_every_bad_input(isa: str, mode: str, k: int) -> None:
    be = CpuBackend(isa=isa)
    x = prepare_inputs(203, k, mode, torch.float64, seed=2)
    for name, make, kind in bad_inputs(mode):
        bad = make(x)
        check_prepare(be, bad, mode, None, None, None if mode == "log_p" else torch.float64)
        got = be.prepare(bad, mode, None, None,
                         None if mode == "log_p" else torch.empty(203, k, dtype=torch.float64))
        assert got.error == (kind, 37), (name, got.error)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [3, 40])
def test_float64_in_place_and_strides(isa: str, k: int) -> None:
    """out may be the input itself (a row is read whole before it is written), column-major or a
    strided slice; inputs may be broadcast (row stride 0) or transposed."""
    be = CpuBackend(isa=isa)
    log_p, inv_c, alpha = make_case(509, k, torch.float64, seed=k)
    want = torch.softmax(log_p - inv_c[:, None] * alpha[None, :], dim=1)
    buf = log_p.clone()
    be.materialize(buf, inv_c, alpha, buf)
    torch.testing.assert_close(buf, want, rtol=1e-13, atol=1e-15)
    colmajor = torch.full((k, 509), float("nan"), dtype=torch.float64).T
    be.materialize(log_p, inv_c, alpha, colmajor)
    torch.testing.assert_close(colmajor, want, rtol=1e-13, atol=1e-15)
    wide = torch.full((509, 2 * k), -7.0, dtype=torch.float64)
    be.materialize(log_p, inv_c, alpha, wide[:, 1::2])
    torch.testing.assert_close(wide[:, 1::2], want, rtol=1e-13, atol=1e-15)
    assert (wide[:, 0::2] == -7.0).all(), "materialize wrote outside out's elements"
    g = torch.Generator().manual_seed(k)
    row = torch.log_softmax(torch.randn(1, k, generator=g, dtype=torch.float64), dim=1)
    for lp in (row.expand(509, k), log_p.T.contiguous().T):
        assert not lp.is_contiguous()
        for hessian in HESSIANS:
            check_step(be, lp, inv_c, alpha, hessian)
        check_materialize(be, lp, inv_c, alpha)
    x = prepare_inputs(509, k, "probs", torch.float64, seed=k)
    ref = x.clone()
    got = be.prepare(x, "probs", None, None, x)  # refine(out=probs): log P^ over the input
    assert got.error is None
    torch.testing.assert_close(x, torch.log(ref / ref.sum(1, keepdim=True)), rtol=1e-14,
                               atol=1e-14)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [2, 3, 10, 17, 31, 32, 40, 100, 1000, 1023])
def test_float32_rows_sum_to_one_within_two_ulps(isa: str, k: int) -> None:
    """Rows of a float32 Q sum to 1 within ROW_SUM_ULPS float32 ulps (2^-23 each; before the
    compensated row sums: 6 at k = 1000), in the lanes path (k < 32) and the row path, with
    contiguous and strided out, at moderate and large shifts."""
    be = CpuBackend(isa=isa)
    ulp = 2.0 ** -23
    for shift in (3.0, 30.0):
        log_p, inv_c, alpha = make_case(2003 if k < 1000 else 301, k, shift=shift, seed=k)
        for out in (torch.empty(log_p.shape), torch.empty(log_p.shape[1], log_p.shape[0]).T):
            be.materialize(log_p, inv_c, alpha, out)
            dev = float((out.double().sum(1) - 1.0).abs().max()) / ulp
            assert dev <= ROW_SUM_ULPS, f"shift {shift}: a row sums to 1 +- {dev:.2f} ulps"




@pytest.mark.parametrize("isa", ISAS)
def test_large_prepare_streams_the_same_values(isa: str) -> None:
    """From 64 MiB on, prepare writes log P^ with non-temporal stores (aligned vectors after a
    scalar head): every value equals what the cached stores write for the same rows in chunks
    below that size, on rows that start at every alignment (row stride k + 3, odd k), forget rows
    holding fill included."""
    n, k = 16_500, 1_021
    assert n * k * 4 >= 64 << 20
    g = torch.Generator().manual_seed(5)
    x = torch.softmax(4 * torch.randn(n, k, generator=g), dim=1)
    forget = torch.rand(n, generator=g) < 0.1
    fill = torch.log_softmax(torch.randn(k, generator=g), dim=0)
    be = CpuBackend(isa=isa)
    big = torch.full((n, k + 3), float("nan"))[:, :k]
    got = be.prepare(x, "probs", forget, fill, big)
    assert got.error is None
    chunks = torch.full((n, k), float("nan"))
    for s in range(0, n, 4_000):
        part = be.prepare(x[s:s + 4_000], "probs", forget[s:s + 4_000], fill,
                          chunks[s:s + 4_000])
        assert part.error is None
    assert torch.equal(big, chunks)
    assert torch.equal(big[forget], fill.expand(int(forget.sum()), k))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,dtype", [(20_011, 129, torch.float32), (20_011, 129, torch.float64),
                                       (8_209, 300, torch.float32)])
def test_dense_hessian_above_128_for_a_stalled_diagonal_newton(isa, n, k, dtype):
    """Above k = 128 Newton starts with the diagonal and, when that stalls, asks the step for the
    dense Hessian (sampled rows, then every row) up to solver.DENSE_ESCALATION_MAX_K: both
    against the float64 oracle, near one-hot rows included."""
    from ppu_fast import solver
    from ppu_fast.backends.base import hessian_stride
    assert hessian_stride(n, k) > 1
    assert solver.DENSE_ESCALATION_MAX_K <= _C.MAX_FULL_K  # the escalation's k, formed here
    be = CpuBackend(isa=isa)
    for margin in (0.0, 30.0):
        log_p, inv_c, alpha = make_case(n, k, dtype, margin=margin, seed=k + n)
        check_step(be, log_p, inv_c, alpha, True)
        check_step(be, log_p, inv_c, alpha, "exact")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_row_sums_at_the_tolerance_are_judged_as_the_reference_judges_them(isa, dtype) -> None:
    """Rows whose sum is off by tol plus or minus 1e-11 .. 1e-5: the cpu kernels flagged rows by
    float32 sums against tol rounded to float32, and let rows up to ~k * 6e-8 past tol through
    that the reference (the float64 sum) refused. Every row of each matrix is judged alone."""
    from ppu_fast.backends.torch_ref import TorchBackend
    from ppu_fast.problem import row_sum_tol

    be, ref = CpuBackend(isa=isa), TorchBackend()
    tol = row_sum_tol(dtype)
    rng = np.random.default_rng(11)
    disagree = []
    for k in (3, 10, 15, 16, 17, 100, 1000):
        for trial in range(12):
            p = rng.dirichlet(np.full(k, 0.5))
            sign = rng.choice([-1.0, 1.0])
            delta = sign * tol + rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-11, -5)
            x = torch.tensor(p * (1.0 + delta), dtype=dtype).reshape(1, k)
            if trial % 3 == 2:  # a strided view
                x = torch.cat([x, x], dim=1)[:, ::2]
            for out_dtype in {compute_dtype(dtype), torch.float32}:
                if dtype == torch.float64 or out_dtype == torch.float32:
                    got = be.prepare(x, "probs", None, None, torch.empty(x.shape, dtype=out_dtype),
                                     None, False, tol).error
                    want = ref.prepare(x, "probs", None, None,
                                       torch.empty(x.shape, dtype=out_dtype), None, False,
                                       tol).error
                    # And the independent judgement: the row's sum, correctly rounded
                    # (math.fsum of its values, each exact in float64), against tol.
                    exact = math.fsum(x.double().flatten().tolist()) - 1.0
                    if got != want or (got is not None) != (abs(exact) > tol):
                        disagree.append((k, trial, str(out_dtype), exact, got, want))
    assert not disagree, disagree[:5]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [16, 17, 40, 100])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prepare_takes_a_fill_at_any_alignment(isa: str, k: int, out_dtype) -> None:
    """The forget rows' fill was read with aligned vector loads where k >= 16: a fill that is a
    view at an offset (or numpy memory, 16-byte aligned) crashed the process on AVX-512."""
    be = CpuBackend(isa=isa)
    g = torch.Generator().manual_seed(k)
    x = torch.softmax(torch.randn(300, k, generator=g), 1)
    forget = torch.rand(300, generator=g) < 0.3
    whole = torch.log_softmax(torch.randn(k + 16, generator=g), 0)
    for offset in (1, 3, 4, 8):
        fill = whole[offset:offset + k]  # contiguous, 4 * offset bytes past an aligned start
        assert fill.data_ptr() % 64 != 0
        check_prepare(be, x, "probs", forget, fill, out_dtype, torch.ones(300), True)
