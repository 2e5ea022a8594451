"""Triton kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter must be switched on before Triton is imported, so this module runs in its own
process: ``tests/test_backend_triton.py`` launches ``pytest`` on this directory with the variable
set.  In a normal pytest run (variable unset) the whole module skips itself, so nothing runs twice.

Every kernel and launcher path is exercised: the single-read kernels (default backend), the
wide-row kernels (``max_single_block_k=16``: forced for k > 16, with several k-blocks), the
in-kernel sampled Hessian weights (k <= 32) and the chunked route (``hessian_kernel_max_k=0``),
for ``step`` / ``materialize`` on the shared cases and near one-hot rows, and ``prepare`` in its
three modes on awkward k, input and buffer dtypes, strides, forget masks with and without fill,
with and without the first evaluation, and every bad input.  The interpreter is slow: N is a
small prime (131, 257) and the prepare matrix rotates through its options instead of taking
their full product.
"""

from __future__ import annotations

import math
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported (run by "
                "tests/test_backend_triton.py in a subprocess)", allow_module_level=True)

import torch  # noqa: E402

from backend_cases import (KS, bad_inputs, cases, check_bound_step,  # noqa: E402
                           check_materialize, check_prepare, check_step, make_case, onehot_cases,
                           prepare_inputs)
from prepare_cases import CONFIGS, MODES, check_half_first, prepare_case  # noqa: E402
from oracle import oracle_q, oracle_step  # noqa: E402
from ppu_fast.backends import load  # noqa: E402
from ppu_fast.backends.base import ROW_SUM_ULPS, hessian_stride  # noqa: E402
from ppu_fast.backends.torch_ref import reference_prepare, reference_step  # noqa: E402
from ppu_fast.backends.triton import INTERPRET, TritonBackend  # noqa: E402

# log(0) of zero probabilities and the NaN of planted bad rows are expected in the interpreter's
# numpy arithmetic; the backend's methods keep numpy quiet about them (a caller's -W error must
# not fail on them), which this makes a test of.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# The interpreter is slow: every k and dtype of cases() is kept, but rows of 1000+ entries use the
# smaller prime N of cases() (131 instead of 257).
CASES = [(min(n, 131) if k >= 1000 else n, k, *rest) for n, k, *rest in cases()]
IDS = [f"n{n}-k{k}-{str(dt).split('.')[-1]}-s{s:g}{'-inf' if ni else ''}{'-nc' if nc else ''}"
       for n, k, dt, s, ni, nc in CASES]


def wide(k: int) -> TritonBackend:
    """A backend forced onto the two-pass wide-row kernels for any k > 16, with blocks small
    enough that k spans several of them (partial last blocks included)."""
    return TritonBackend(max_single_block_k=16, online_block_k=64 if k <= 100 else 512)


def hessians(k: int, full: bool = True):
    """Hessian modes to check.  For k >= 1000 the dense one only where ``full``: the shared check's
    eigvalsh of a 1000 x 1000 Hessian takes seconds here, and above k = 32 the dense route is the
    same launcher code for every k (materialize kernel on the sampled rows + GEMM)."""
    return (False, "diag", True) if k < 1000 or full else (False, "diag")


def chunked() -> TritonBackend:
    """The sampled Hessian weights by chunks (materialize kernel + GEMM) for every k."""
    return TritonBackend(hessian_kernel_max_k=0)


def test_interpreter_is_on():
    assert INTERPRET
    assert TritonBackend().available_reasons() == []
    backend, why = load("triton")
    assert backend is not None and why == []
    assert backend.not_supported_reasons(torch.zeros(2, 2)) == []


# ----------------------------------------------------------------------------------------------
# step / materialize
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,dtype,shift,neg_inf,noncontig", CASES, ids=IDS)
def test_single_read_kernels(n, k, dtype, shift, neg_inf, noncontig):
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=n + k)
    before = (log_p.clone(), inv_c.clone(), alpha.clone())
    b = TritonBackend()
    for hessian in hessians(k, dtype == torch.float32 and shift == 3.0 and not neg_inf
                            and n > 7 and k == 1000):
        check_step(b, log_p, inv_c, alpha, hessian)
    check_materialize(b, log_p, inv_c, alpha)
    for t, t0 in zip((log_p, inv_c, alpha), before):  # inputs untouched
        assert torch.equal(t, t0)


@pytest.mark.parametrize("k", [3, 17, 100, 1000])
def test_single_read_materialize_rows_sum_to_one(k):
    """The single-read materialize normalises by a float64 row sum: rows of a float32 Q within
    ROW_SUM_ULPS float32 ulps of 1. (The wide-row kernels keep their float32 online sum.)"""
    for shift in (3.0, 30.0):
        log_p, inv_c, alpha = make_case(257 if k < 1000 else 131, k, shift=shift, seed=k)
        q = torch.empty(log_p.shape)
        TritonBackend().materialize(log_p, inv_c, alpha, q)
        dev = float((q.double().sum(1) - 1.0).abs().max()) / 2.0 ** -23
        assert dev <= ROW_SUM_ULPS, f"shift {shift}: {dev:.2f} ulps"


# k <= 16 takes the single-read path even in wide(k); the wide-row variant keeps every longer k and
# dtype, with smaller N (257, and 131 from k = 100 on).
WIDE = [(min(n, 131 if k >= 100 else 257), k, *rest) for n, k, *rest in CASES if k > 16]
WIDE_IDS = [f"n{w[0]}-{i.split('-', 1)[1]}" for w, i in zip(WIDE, [i for c, i in zip(CASES, IDS)
                                                                   if c[1] > 16])]


@pytest.mark.parametrize("n,k,dtype,shift,neg_inf,noncontig", WIDE, ids=WIDE_IDS)
def test_wide_row_kernels(n, k, dtype, shift, neg_inf, noncontig):
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=7 * n + k)
    b = wide(k)
    for hessian in hessians(k, dtype == torch.float32 and k == 1000 and shift == 3.0
                            and not neg_inf and n > 7):
        check_step(b, log_p, inv_c, alpha, hessian)
    check_materialize(b, log_p, inv_c, alpha)


# Near one-hot rows (logit margins 30 and 60): the Hessian's diagonal must come from the other
# entries of a row, never from 1 - q in float32.  N is cut to keep the interpreter quick; k = 40
# and 100 run the chunked W route by default, k = 3 and 10 the in-kernel one.
ONEHOT = [(min(n, 257 if k < 40 else 131), k, margin) for n, k, margin in onehot_cases()
          if k < 1000 or margin == 60.0]


@pytest.mark.parametrize("n,k,margin", ONEHOT, ids=[f"n{n}-k{k}-m{m:g}" for n, k, m in ONEHOT])
def test_onehot_hessians(n, k, margin):
    log_p, inv_c, alpha = make_case(n, k, margin=margin, seed=k + int(margin))
    backends = [TritonBackend()]
    if k > 16:
        backends.append(wide(k))
    if k <= 32:
        backends.append(chunked())
    for b in backends:
        for hessian in hessians(k, b is backends[0]):
            check_step(b, log_p, inv_c, alpha, hessian)
    # alpha = 0: the rows stay one-hot (the case that stalled Newton)
    zero = torch.zeros_like(alpha)
    for hessian in hessians(k, False)[1:]:
        check_step(backends[0], log_p, inv_c, zero, hessian)
    d = backends[0].step(log_p, inv_c, zero, "diag")[2]
    assert float(d.min()) > 0, "a one-hot row's diagonal rounded to 0"


@pytest.mark.parametrize("k", [10, 40])
def test_exact_hessian_takes_every_row(k):
    """hessian="exact" (Newton's answer to a stalled sampled Hessian) sums every row, where the
    sample of hessian=True skips some: against the float64 oracle over every row."""
    n = 5003
    assert hessian_stride(n, k) > 1
    log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=k + 7)
    for b in (TritonBackend(), chunked()):
        check_step(b, log_p, inv_c, alpha, "exact")


@pytest.mark.parametrize("k", [3, 10, 33, 100])
@pytest.mark.parametrize("make_backend", [lambda k: TritonBackend(), wide], ids=["single", "wide"])
def test_bound_step_is_step(make_backend, k):
    """The solver's passes (``bind_step``: planned once, alpha staged, one packed copy to the
    host, H assembled there; k > 32's dense Hessian with W from the sampled rows gathered once;
    wide rows through ``step``) give ``step``'s results, pass after pass."""
    log_p, inv_c, alpha = make_case(257, k, seed=k + 11)
    check_bound_step(make_backend(k), log_p, inv_c, alpha)
    for hessian in (False, "diag", True, "exact"):  # and step, so both, against float64
        check_step(make_backend(k), log_p, inv_c, alpha, hessian)


def test_bound_step_takes_its_own_path(monkeypatch):
    """For k <= 32 every Hessian mode runs on the planned kernel, not through ``step``."""
    import ppu_fast.backends.triton as tb

    log_p, inv_c, alpha = make_case(131, 10, seed=4)
    run = TritonBackend().bind_step(log_p, inv_c)
    monkeypatch.setattr(tb, "_launch_step", lambda *a, **kw: pytest.fail("step's launcher ran"))
    for hessian in (False, "diag", True, "exact"):
        run(alpha.numpy(), hessian)
    for bad in ("full", 0, 1):  # 0 / 1 equal False / True but are not the modes
        with pytest.raises(ValueError, match="hessian: expected one of"):
            run(alpha.numpy(), bad)
    with pytest.raises(ValueError, match=r"alpha: expected shape \(10,\)"):
        run(alpha.numpy()[:4], False)
    big = alpha.numpy().copy()
    big[:2] = (1e300, -1e300)  # +-inf in float32, without numpy's overflow warning (an error here)
    run(big, False)


@pytest.mark.parametrize("k", [3, 17])
def test_sampled_gram_by_chunks_for_small_k(k):
    """The GEMM-on-materialised-chunks W (used above hessian_kernel_max_k) on small k."""
    log_p, inv_c, alpha = make_case(1009, k, torch.float32, seed=k)
    check_step(chunked(), log_p, inv_c, alpha, True)


@pytest.mark.parametrize("m", [2, 3])
def test_sampled_rows_with_a_stride(monkeypatch, m):
    """m = hessian_stride(N, k) > 1 (which takes N >= 8192 for real; patched here, in base, in
    the reference, this backend and the oracle alike, to keep N small): the in-kernel W uses the
    sampled 16-row blocks only (k = 32: tiles of 32 rows; with m = 3 most tiles have none and
    skip the dot), the same rows as base.hessian_sample_rows; the chunked route agrees, and so
    do the bound passes."""
    import oracle
    import ppu_fast.backends.base as base
    import ppu_fast.backends.torch_ref as ref
    import ppu_fast.backends.triton as tri
    for mod in (base, ref, tri, oracle):
        monkeypatch.setattr(mod, "hessian_stride", lambda n, k: m)
    n, k = 1009, 32
    log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=m)
    for mode in ("probs", "log_p"):
        prepare_case(TritonBackend(), n, k, mode,
                      (torch.float32, torch.float32, False, "fill", True, True), seed=m)
    check_step(TritonBackend(), log_p, inv_c, alpha, True)
    h1 = TritonBackend().step(log_p, inv_c, alpha, True)[2]
    h2 = chunked().step(log_p, inv_c, alpha, True)[2]
    assert torch.allclose(h1, h2, rtol=1e-5, atol=1e-9 * float(h1.abs().max()))
    # The bound route at this stride: the in-kernel W (k = 32), and W from the sample gathered
    # once (k = 40), against step's chunks.
    check_bound_step(TritonBackend(), log_p, inv_c, alpha)
    check_bound_step(TritonBackend(), *make_case(n, 40, torch.float32, seed=m + 7))


@pytest.mark.parametrize("k", [10, 100])
def test_hessian_is_symmetric_and_annihilates_ones(k):
    """With every row sampled (small N: m = 1) the assembled Hessian is the exact one: symmetric
    and zero on the gauge direction (to the float32 rounding of W)."""
    log_p, inv_c, alpha = make_case(263, k, torch.float32, seed=k + 1)
    assert hessian_stride(263, k) == 1
    for b in (TritonBackend(), chunked(), wide(k)):
        _, _, h = b.step(log_p, inv_c, alpha, True)
        assert torch.allclose(h, h.T, rtol=0, atol=1e-6 * h.abs().max())
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
    ora = torch.from_numpy(oracle_q(log_p, inv_c, alpha))
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
    ref = torch.from_numpy(oracle_q(log_p, inv_c, alpha))
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(out_dtype, 1e-6)
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)


def test_tiny_shapes():
    for n, k in ((1, 1), (1, 2), (2, 1), (1, 1000), (3, 17)):
        log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=n * k)
        for b in (TritonBackend(), wide(k)):
            for hessian in hessians(k, full=False):
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


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------

PREP = [(k, mode, i) for k in KS for mode in MODES for i in range(len(CONFIGS))
        if (i + KS.index(k) + MODES.index(mode)) % 3 == 0 or (i == 0 and k >= 1000)]


@pytest.mark.parametrize("k,mode,cfg", PREP, ids=[f"k{k}-{m}-c{i}" for k, m, i in PREP])
def test_prepare_single_read(k, mode, cfg):
    n = 131 if k >= 1000 else 257
    prepare_case(TritonBackend(), n, k, mode, CONFIGS[cfg], seed=k + cfg)


PREP_WIDE = [(k, mode, i) for k in (17, 100, 1023) for mode in MODES
             for i in range(len(CONFIGS)) if (i + MODES.index(mode) + k) % 4 == 0]


@pytest.mark.parametrize("k,mode,cfg", PREP_WIDE, ids=[f"k{k}-{m}-c{i}" for k, m, i in PREP_WIDE])
def test_prepare_wide_rows(k, mode, cfg):
    prepare_case(wide(k), 131, k, mode, CONFIGS[cfg], seed=3 * k + cfg)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [3, 17, 100])
@pytest.mark.parametrize("hessian", [False, "diag", True])
def test_prepare_first_evaluation(mode, k, hessian):
    """The first evaluation, every Hessian mode, in-kernel W (k <= 32), the chunked W, and the
    wide rows, with fill rows in "probs" / "logits" (the launcher adds their terms)."""
    backends = ([TritonBackend()] + ([wide(k)] if k > 16 else [])
                + ([chunked()] if k <= 32 and hessian is True else []))
    fk = None if mode == "log_p" else "fill"
    for i, b in enumerate(backends):
        prepare_case(b, 131, k, mode, (torch.float32, torch.float32, False, fk, True, hessian),
                      seed=k + i)


@pytest.mark.parametrize("mode", ["probs", "logits"])
@pytest.mark.parametrize("margin", [30.0, 60.0])
def test_prepare_onehot_rows(mode, margin):
    """Confident rows: the first evaluation's Hessian diagonal from the other entries of a row."""
    m = margin if mode == "probs" else margin / 3  # prepare_inputs' logits are 3 z
    for k, b in ((10, TritonBackend()), (40, TritonBackend()), (40, wide(40))):
        for hessian in ("diag", True):
            prepare_case(b, 257, k, mode, (torch.float32, torch.float32, False, "fill", True,
                                            hessian), seed=k, margin=m)


@pytest.mark.parametrize("make_backend", [lambda k: TritonBackend(), wide], ids=["single", "wide"])
@pytest.mark.parametrize("mode", MODES)
def test_prepare_bad_inputs(make_backend, mode):
    """Every fault, planted in row 37 (and a later one in row 90): the reference's kind and row.
    k = 20 runs several k-blocks of the wide kernels; float64 input (faults judged in it)."""
    n, k = 131, 20
    b = make_backend(k)
    for dtype in (torch.float32, torch.float64):
        x = prepare_inputs(n, k, mode, dtype=dtype, seed=2)
        for name, make, kind in bad_inputs(mode):
            bad = make(x)
            for inv_c in ((None, torch.ones(n)) if dtype == torch.float32 else (None,)):
                out = torch.empty(n, k)
                ref = reference_prepare(bad, mode, None, None, torch.empty(n, k), inv_c)
                got = b.prepare(bad, mode, None, None, out, inv_c)
                assert ref.error == (kind, 37), (name, ref.error)
                assert got.error == ref.error, (name, dtype, got.error, ref.error)
        # the first offending row is the minimum over programs: plant faults in late tiles too
        bad = bad_inputs(mode)[0][1](x)
        late = bad.clone()
        late[37] = x[37]
        late[n - 1, 0] = float("nan")
        late[n - 2, 1] = float("nan")
        got = b.prepare(late, mode, None, None, torch.empty(n, k))
        assert got.error == (1, n - 2)
        got = b.prepare(bad, mode, None, None, torch.empty(n, k))
        assert got.error == (1, 37)


@pytest.mark.parametrize("make_backend", [lambda k: TritonBackend(), wide], ids=["single", "wide"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepare_finds_nan_in_half_inputs(make_backend, dtype):
    """A NaN in a 16-bit input is the row's fault in every mode (the NaN test on the bfloat16
    values themselves never fired here: refine then failed in scipy, naming no row). Found by a
    Triton-vs-cpu fuzz."""
    from ppu_fast.problem import row_sum_tol

    n, k = 40, 20
    b = make_backend(k)
    for mode in MODES:
        x = prepare_inputs(n, k, mode, dtype=torch.float32, seed=3).to(dtype)
        x[23, 4] = float("nan")
        x[31, 0] = float("nan")
        # The row-sum tolerance refine uses for a 16-bit input (its rounding).
        got = b.prepare(x, mode, None, None, torch.empty(n, k), tol=row_sum_tol(dtype))
        assert got.error == (1, 23), (mode, got.error)


def test_refine_of_one_column_nan_logits_names_the_row():
    """k = 1 logits with a NaN row: the row's error, and no numpy warning from the interpreter's
    max over it (this module turns RuntimeWarnings into errors)."""
    import ppu_fast

    with pytest.raises(ValueError, match="logits: row 1 contains NaN or Inf"):
        ppu_fast.refine(logits=torch.tensor([[0.0], [float("nan")]]), forget_mask=[0],
                        backend="triton")


def test_a_tiny_float32_stall_is_solved_again_by_the_torch_reference():
    """The triton kernels compute in float32 only: a small refine they leave unconverged is
    solved again in float64 by the torch backend (tests/test_precision.py's stalling problem)."""
    import warnings

    import ppu_fast
    from test_precision import _MANY_CLASSES, _many_classes_few_rows

    x, mask = _many_classes_few_rows(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ppu_fast.ConvergenceWarning)
        q, info = ppu_fast.refine(logits=x, forget_mask=mask, backend="triton", **_MANY_CLASSES)
    assert info.converged and info.backend == "torch"
    assert "solved again in float64 from the same log P^ and weights by the torch backend" in (
        info.message)
    m = torch.softmax(x.double(), dim=1).sum(0)
    assert q.dtype == torch.float32
    assert float((q.double().sum(0) - m).abs().sum()) / x.shape[0] <= 1e-6


def test_prepare_row_sum_tolerance_is_float64():
    """tol travels as float32 hi + lo and is compared in float64 like the reference's."""
    n, k = 64, 4
    x = torch.full((n, k), 0.25, dtype=torch.float64)
    x[5] *= 1 + 1.00000001e-3   # just past tol = 1e-3 (float32 1e-3 is 1.0000000475e-3)
    x[9] *= 1 + 0.99999999e-3   # just inside
    for b in (TritonBackend(), TritonBackend(max_single_block_k=16, online_block_k=16)):
        got = b.prepare(x, "probs", None, None, torch.empty(n, k))
        ref = reference_prepare(x, "probs", None, None, torch.empty(n, k))
        assert got.error == ref.error == (3, 5)


def test_prepare_writes_fill_and_sums_both_sets():
    n, k = 300, 4
    x = prepare_inputs(n, k, "probs", seed=5)
    forget = torch.zeros(n, dtype=torch.bool)
    forget[::3] = True
    fill = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    for b in (TritonBackend(), wide(k)):
        out = torch.empty(n, k)
        res = b.prepare(x, "probs", forget, fill, out)
        assert torch.equal(out[forget], fill.expand(100, k))
        torch.testing.assert_close(res.retain_sums, x[~forget].double().sum(0), rtol=1e-6,
                                   atol=0)
        torch.testing.assert_close(res.forget_sums, x[forget].double().sum(0), rtol=1e-6, atol=0)
        assert res.first is None and res.support is None and res.error is None


def test_prepare_log_p_support_and_stored_rounding():
    """"log_p": support from the column maxima (-inf columns), and the first evaluation from the
    values as stored in a half buffer (not from x)."""
    n, k = 131, 40
    x = prepare_inputs(n, k, "log_p", seed=9)
    x[:, 7] = float("-inf")
    x[:, 39] = float("-inf")
    x[3, 39] = -2.0
    inv_c = torch.full((n,), 0.5)
    for b in (TritonBackend(), wide(k)):
        got = b.prepare(x, "log_p", None, None, None, inv_c, "diag")
        assert got.support.tolist() == [j != 7 for j in range(k)]
        for out_dtype in (torch.float16, torch.bfloat16):
            check_prepare(b, x, "log_p", None, None, out_dtype, inv_c, False)
            check_half_first(b, x, None, None, out_dtype, inv_c, "diag")
            out = torch.empty(n, k, dtype=out_dtype)
            got = b.prepare(x, "log_p", None, None, out, inv_c, False)
            assert torch.equal(out, x.to(out_dtype)), "bfloat16 / float16 rounding"
            step = reference_step(out, inv_c, torch.zeros(k, dtype=torch.float64))
            torch.testing.assert_close(got.first[0], step[0], rtol=1e-5, atol=1e-6)


def test_prepare_deterministic_and_input_untouched():
    n, k = 257, 17
    x = prepare_inputs(n, k, "logits", seed=4)
    forget = torch.arange(n) % 5 == 0
    fill = torch.full((k,), -math.log(k))
    inv_c = torch.where(forget, 1.0, 0.25).float()
    for b in (TritonBackend(), wide(k)):
        res = []
        for _ in range(2):
            out = torch.empty(n, k)
            res.append((b.prepare(x, "logits", forget, fill, out, inv_c, True), out))
        (a, oa), (c, oc) = res
        assert torch.equal(oa, oc)
        for u, v in ((a.retain_sums, c.retain_sums), (a.forget_sums, c.forget_sums),
                     *zip(a.first, c.first)):
            assert torch.equal(u, v)


def test_prepare_empty_and_errors():
    b = TritonBackend()
    x = prepare_inputs(5, 4, "probs", seed=1)
    res = b.prepare(x[:0], "probs", None, None, torch.empty(0, 4), torch.ones(0), True)
    ref = reference_prepare(x[:0], "probs", None, None, torch.empty(0, 4), torch.ones(0), True)
    assert res.error is None and torch.equal(res.retain_sums, ref.retain_sums)
    assert torch.equal(res.first[2], ref.first[2])
    res = b.prepare(x[:0], "log_p", None, None, None, None)
    assert res.support.tolist() == [False] * 4
    with pytest.raises(ValueError, match="mode"):
        b.prepare(x, "probabilities", None, None, torch.empty(5, 4))
    with pytest.raises(ValueError, match="out"):
        b.prepare(x, "probs", None, None, None)
    with pytest.raises(ValueError, match="fill"):
        b.prepare(x, "probs", torch.zeros(5, dtype=torch.bool), None, torch.empty(5, 4),
                  torch.ones(5))


@pytest.mark.parametrize("k", [3, 17, 100, 1000])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("make_backend", [TritonBackend, wide], ids=["single", "wide"])
def test_materialize_sums(k, in_place, make_backend):
    """One pass (the single-read kernel; a step then materialize on wide rows) gives
    materialize's Q bit for bit and step's column sums and sum of log Z."""
    be = make_backend() if make_backend is TritonBackend else make_backend(k)
    g = torch.Generator().manual_seed(k)
    n = 131
    log_p = torch.log_softmax(3 * torch.randn(n, k, generator=g), dim=1)
    inv_c = torch.where(torch.rand(n, generator=g) < 0.2, 1.0, 0.25)
    alpha = torch.randn(k, generator=g, dtype=torch.float64)
    q_ref = torch.empty_like(log_p)
    be.materialize(log_p, inv_c, alpha, q_ref)
    colsum_ref, wlogz_ref, _ = reference_step(log_p, inv_c, alpha, False)
    buf = log_p.clone()
    out = buf if in_place else torch.full_like(log_p, float("nan"))
    colsum, wlogz = be.materialize_sums(buf, inv_c, alpha, out)
    assert torch.equal(out, q_ref)
    torch.testing.assert_close(colsum, colsum_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wlogz, wlogz_ref.to(wlogz.dtype), rtol=1e-6, atol=0.0)
    # and against the float64 oracle
    colsum64, wlogz64, _ = oracle_step(log_p, inv_c, alpha)
    torch.testing.assert_close(colsum, torch.from_numpy(colsum64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wlogz, torch.tensor(wlogz64, dtype=torch.float64), rtol=1e-5,
                               atol=0.0)


@pytest.mark.parametrize("k", [17, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
def test_materialize_sums_half_buffers(k, dtype, in_place):
    """Half-precision solver buffers (half inputs keep their dtype): Q bit for bit as materialize
    writes it, the sums against the float64 oracle evaluated on the values as stored."""
    be = TritonBackend()
    g = torch.Generator().manual_seed(100 + k)
    n = 131
    log_p = torch.log_softmax(3 * torch.randn(n, k, generator=g), dim=1).to(dtype)
    inv_c = torch.where(torch.rand(n, generator=g) < 0.2, 1.0, 0.25)
    alpha = torch.randn(k, generator=g, dtype=torch.float64)
    q_ref = torch.empty_like(log_p)
    be.materialize(log_p, inv_c, alpha, q_ref)
    buf = log_p.clone()
    out = buf if in_place else torch.full_like(log_p, float("nan"))
    colsum, wlogz = be.materialize_sums(buf, inv_c, alpha, out)
    assert torch.equal(out, q_ref)
    if not in_place:
        assert torch.equal(buf, log_p), "materialize_sums modified log_p"
    colsum64, wlogz64, _ = oracle_step(log_p.double(), inv_c.double(), alpha)
    torch.testing.assert_close(colsum, torch.from_numpy(colsum64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wlogz, torch.tensor(wlogz64, dtype=torch.float64), rtol=1e-5,
                               atol=0.0)


def test_refine_ends_on_the_pass_that_writes_q():
    """backend="triton" fuses Newton's last pass with the writing of Q, like the cpu backend,
    and agrees with the reference. (tol 1e-5: after the first step, at 2.8e-4, the prediction
    res^2 / res_prev = 3.7e-6 is below it and the pass that writes Q converges, at 4.8e-8; at
    tol 1e-6 this small problem certifies that pass and writes Q separately.)"""
    import ppu_fast
    g = torch.Generator().manual_seed(3)
    n, k = 2003, 10
    y = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), y] += 6.0
    p = torch.softmax(logits, dim=1)
    q, info = ppu_fast.refine(p, y == 0, backend="triton", return_info=True, tol=1e-5)
    q_ref = ppu_fast.refine(p, y == 0, backend="torch")
    assert info.converged and info.materialized, info.history
    torch.testing.assert_close(q, q_ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refine_of_a_16_bit_input_writes_q_from_a_float32_buffer(dtype):
    """A 16-bit input is solved from a float32 log P^ and Q written into a 16-bit result by the
    last pass: the float32 refine of the same numbers, rounded (log P^ in 16 bits was off by up
    to 0.1 at lam 1e-4)."""
    import numpy as np

    import ppu_fast
    r = np.random.default_rng(3)
    n, k = 600, 10
    z = r.standard_normal((n, k))
    z[np.arange(n), r.integers(0, k, n)] += 20
    x = torch.softmax(torch.tensor(z), dim=1).to(dtype)
    mask = torch.from_numpy(r.random(n) < 0.5)
    opts = dict(lam=1e-4, pseudo="prior", marginals="original")
    q, info = ppu_fast.refine(x, mask, backend="triton", return_info=True, **opts)
    xd = x.double()
    want = ppu_fast.refine((xd / xd.sum(1, keepdim=True)).float(), mask, backend="torch",
                           tol=1e-7, **opts)
    assert q.dtype == dtype and info.converged
    assert float((q.float() - want).abs().max()) <= torch.finfo(dtype).eps / 2 + 1e-5


def test_grid_probes_compile_the_variant_that_is_launched(monkeypatch):
    """``_capacity`` sizes a grid from the compiled kernel of its probe arguments: on a GPU
    Triton compiles one variant per pointer type, so a probe whose pointers differ from the
    launch's compiles a second variant, never launched (prepare's error keys were probed as
    float64 for int64: every prepare compiled twice). Every probe here, on every launcher path,
    has the launch's pointer types."""
    from ppu_fast.backends import triton as tb

    probes, launches = [], []
    capacity = tb._capacity

    def probe(kernel, args, consts, num_warps, device):
        probes.append((kernel, tuple(a.dtype if isinstance(a, torch.Tensor) else None
                                     for a in args)))
        return capacity(kernel, args, consts, num_warps, device)

    monkeypatch.setattr(tb, "_capacity", probe)
    kind = type(tb._prep_tile_kernel)  # the kernels' class (the interpreter's)
    getitem = kind.__getitem__

    def launcher(self, grid):
        run = getitem(self, grid)

        def record(*args, **kw):
            launches.append((self, tuple(a.dtype if isinstance(a, torch.Tensor) else None
                                         for a in args)))
            return run(*args, **kw)
        return record

    monkeypatch.setattr(kind, "__getitem__", launcher)
    for be in (TritonBackend(), wide(100)):
        for k in (10, 100):
            for mode in MODES:
                x = prepare_inputs(131, k, mode, seed=k)
                forget = torch.zeros(131, dtype=torch.bool)
                forget[::7] = True
                fill = torch.full((k,), -math.log(k))
                out = torch.empty(131, k)
                ic = torch.ones(131)
                if mode == "log_p":  # takes no forget set (refused)
                    forget = fill = None
                be.prepare(x, mode, forget, fill, out, ic, True)
            log_p, inv_c, alpha = make_case(131, k, seed=k)
            be.step(log_p, inv_c, alpha, "diag")
            be.materialize(log_p, inv_c, alpha, torch.empty_like(log_p))
    assert probes and {k for k, _ in probes} <= {k for k, _ in launches}
    launched = set(launches)
    wrong = [(getattr(k, "__name__", k), spec) for k, spec in probes if (k, spec) not in launched]
    assert not wrong, wrong
