"""The pure-PyTorch reference against the independent float64 oracle (tests/oracle.py).

Every fast backend is judged against the reference's own error, so the reference itself must be
judged against something else: float64 formulas written separately, on small cases including near
one-hot rows (logit margins 30 and 60), |alpha / c| up to 1e4 and lam = 1e-4 (inv_c = 1e4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ppu_fast

from backend_cases import (HESS_TOL, HESS_TOL_F64, bad_inputs, hessian_floor, make_case,
                           prepare_inputs, rel_err)
from oracle import hessian_error, oracle_prepare, oracle_q, oracle_step, wlogz_scale
from ppu_fast.backends.base import ROW_SUM_ULPS, assemble_hessian, hessian_sample_rows
from ppu_fast.backends.torch_ref import TorchBackend, reference_materialize, reference_step

REF = TorchBackend()
# float32 work on O(1) quantities: relative errors of a few ulps, growing with |alpha / c|.
TOL = {"colsum": 1e-5, "wlogz": 1e-5, "q": 1e-5}


def _wlogz_unit(log_p, inv_c, alpha, ora_wlogz: float) -> float:
    """What sum_i c_i log Z_i's rounding is measured against: each row's log Z carries an error
    of a few ulps of (1 + |log Z_i| + max |alpha_j inv_c_i|) (the largest shifted logit), and
    the row counts 1 / inv_c_i times. With inv_c = 1e-30 that is ~1e23 a row: the dual value is
    noise there, which the solver's line search knows (solver.G_NOISE_REL)."""
    ic = inv_c.double()
    shift = alpha.abs().max().double() * ic
    return max(abs(ora_wlogz), wlogz_scale(log_p, inv_c, alpha)
               + float(((1.0 + shift) / ic).sum()))


def _cases():
    out = []
    for k in (2, 3, 10, 40, 100, 1000):
        n = 997 if k < 1000 else 131
        for margin in (0.0, 30.0, 60.0):
            out.append((n, k, margin, 3.0, 1.0))
        out.append((n, k, 0.0, 1e4, 1.0))      # |alpha / c| up to 1e4
        out.append((n, k, 0.0, 3e-4, 1e4))    # lam = 1e-4: inv_c = 1e4 on the retained rows
        out.append((n, k, 30.0, 3.0, 1e-8))   # lam = 1e8 on confident rows: q (1 - q) / c ~ 1e-21
        out.append((n, k, 0.0, 3.0, 1e-30))   # the smallest weight ratio refine accepts
    return out


@pytest.mark.parametrize("n,k,margin,shift,inv_c_big", _cases(),
                         ids=lambda v: f"{v:g}" if isinstance(v, float) else str(v))
def test_step_and_q_against_float64(n, k, margin, shift, inv_c_big):
    log_p, inv_c, alpha = make_case(n, k, shift=shift, margin=margin, seed=n + k)
    if inv_c_big != 1.0:
        inv_c = torch.where(inv_c < 0.5, torch.tensor(inv_c_big), torch.tensor(1.0)).float()
    for hessian in (False, "diag", True):
        got = reference_step(log_p, inv_c, alpha, hessian)
        ora = oracle_step(log_p, inv_c, alpha, hessian)
        # sum c log Z is a sum of large terms of both signs at |alpha / c| = 1e4: judge it on the
        # sum of their magnitudes.
        assert rel_err(got[0], ora[0]) <= TOL["colsum"]
        assert abs(float(got[1]) - ora[1]) <= TOL["wlogz"] * _wlogz_unit(log_p, inv_c, alpha,
                                                                           ora[1]), \
            (float(got[1]), ora[1])
        if hessian is not False:
            err = hessian_error(got[2], ora[2], hessian_floor(inv_c))
            assert err <= HESS_TOL, f"{hessian}: {err:.3g}"
    q = reference_materialize(log_p, inv_c, alpha)
    ora_q = oracle_q(log_p, inv_c, alpha)
    assert rel_err(q, ora_q) <= TOL["q"]
    # Entry by entry too (the norm hides the tiny entries of confident rows): exp of a float32
    # logit x is good to ~|x| ulps, so the bound grows with -log q.
    live = ora_q > 1e-30
    rel = np.abs(q.double().numpy()[live] - ora_q[live]) / ora_q[live]
    assert float((rel / (1.0 - np.log(ora_q[live]))).max()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [3, 10, 100, 1000])
@pytest.mark.parametrize("margin", [0.0, 30.0, 60.0])
def test_half_buffers_step_and_q_against_float64(dtype, k, margin):
    """Half buffers are evaluated in float32: the oracle reads the same stored (rounded) values,
    so the float32 tolerances hold; Q written to the half buffer's dtype is judged on its one
    rounding (half an ulp of each entry, relative)."""
    n = 997 if k < 1000 else 131
    log_p, inv_c, alpha = make_case(n, k, dtype, margin=margin, seed=n + k + int(margin))
    for hessian in (False, "diag", True):
        got = reference_step(log_p, inv_c, alpha, hessian)
        ora = oracle_step(log_p, inv_c, alpha, hessian)
        assert rel_err(got[0], ora[0]) <= TOL["colsum"]
        scale = max(abs(ora[1]), wlogz_scale(log_p, inv_c, alpha), 1.0)
        assert abs(float(got[1]) - ora[1]) <= TOL["wlogz"] * scale
        if hessian is not False:
            assert hessian_error(got[2], ora[2], hessian_floor(inv_c)) <= HESS_TOL
    q = reference_materialize(log_p, inv_c, alpha, torch.empty(log_p.shape, dtype=dtype))
    assert q.dtype == dtype
    assert rel_err(reference_materialize(log_p, inv_c, alpha), oracle_q(log_p, inv_c, alpha)) \
        <= TOL["q"], "float32 Q from a half buffer"
    ora_q = oracle_q(log_p, inv_c, alpha)
    half_ulp = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    big = ora_q > 1e-3  # above the half formats' subnormal range
    rel = np.abs(q.double().numpy()[big] - ora_q[big]) / ora_q[big]
    assert float(rel.max()) <= 1.01 * half_ulp + 1e-6, float(rel.max())


@pytest.mark.parametrize("margin", [30.0, 60.0])
def test_hessian_of_one_hot_rows_is_accurate_and_psd(margin):
    """The cancellation the old route suffered: diag(sum w q) - sum w q q^T on one-hot rows."""
    log_p, inv_c, _ = make_case(4003, 40, margin=margin, seed=3)
    alpha = torch.zeros(40, dtype=torch.float64)
    _, _, h = reference_step(log_p, inv_c, alpha, True)
    _, _, h_ora = oracle_step(log_p, inv_c, alpha, True)
    assert hessian_error(h, h_ora, hessian_floor(inv_c)) <= HESS_TOL
    # The diagonal is ~1e-13 (margin 30) or ~1e-26 (margin 60) per row and must not be 0.
    assert float(h.diagonal().min()) > 0
    assert float(torch.linalg.eigvalsh(h).min()) >= -1e-12 * float(h.diagonal().max())


def test_assembled_hessian_is_exact_when_every_row_is_sampled():
    """With m = 1 (small problems) the assembled Hessian is the exact one."""
    log_p, inv_c, alpha = make_case(500, 7, seed=4)
    _, _, h = reference_step(log_p, inv_c, alpha, True)
    q = torch.from_numpy(oracle_q(log_p, inv_c, alpha))
    w = inv_c.double()
    exact = torch.diag((w[:, None] * q).sum(0)) - (q * w[:, None]).T @ q
    torch.testing.assert_close(h, exact, rtol=1e-5, atol=1e-6)


def test_assemble_hessian_keeps_the_diagonal_and_psd():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    w = torch.rand(6, 6, generator=g, dtype=torch.float64)
    w[4, :] = 0
    w[:, 4] = 0  # a class no sampled row reaches
    h = assemble_hessian(d, w)
    torch.testing.assert_close(h.diagonal(), d)
    assert float(torch.linalg.eigvalsh(h).min()) >= -1e-12
    assert float(h[4].abs().sum() - h[4, 4]) == 0.0


@pytest.mark.parametrize("k", [1, 2, 10, 37, 100])
def test_assemble_hessian_against_its_formula(k):
    """The host assembly (the cpu path of assemble_hessian; the GPU backends' bound routes use
    it every pass) against S L S written out entry by entry: L the Laplacian of W's strict upper
    triangle mirrored, s_j = sqrt(max(d_j, 0) / L_jj) (0 where L_jj = 0), diagonal max(d, 0).
    W's lower triangle and diagonal are never read: NaN there changes nothing."""
    g = torch.Generator().manual_seed(k)
    d = torch.rand(k, generator=g, dtype=torch.float64) + 0.05
    w = torch.rand(k, k, generator=g, dtype=torch.float64) * 0.1
    if k > 2:
        d[1] = -1e-17  # rounding below zero: clamped
        w[0, :] = 0
        w[:, 0] = 0    # a class no sampled row reaches
    garbage = w.clone()
    garbage.view(-1)[torch.tril(torch.ones(k, k, dtype=torch.bool)).view(-1)] = float("nan")
    up = [[float(w[min(i, j), max(i, j)]) if i != j else 0.0 for j in range(k)]
          for i in range(k)]
    lap = [sum(row) for row in up]
    s = [math.sqrt(max(float(d[i]), 0.0) / lap[i]) if lap[i] > 0 else 0.0 for i in range(k)]
    want = torch.tensor([[max(float(d[i]), 0.0) if i == j else -(s[i] * up[i][j] * s[j])
                          for j in range(k)] for i in range(k)], dtype=torch.float64)
    d0, w0 = d.clone(), w.clone()
    for given in (w, garbage, w.t().contiguous().t()):
        h = assemble_hessian(d, given)
        torch.testing.assert_close(h, want, rtol=1e-13, atol=0.0)
    assert torch.equal(d, d0) and torch.equal(w, w0)  # inputs untouched


# prepare's outputs against the oracle, by the solver buffer's dtype: log P^ elementwise in units
# of 1 + |log p| (one ulp of a half buffer: the rounding of the store; a few float32 ulps), the
# float64 sums and the first evaluation relative to their scale. Measured worst cases over the
# grid below: log P^ 3.4e-7 (float32), 4.8e-4 (float16), 3.8e-3 (bfloat16); sums 1.2e-7; first
# colsum 1.2e-7; first Hessian 1.9e-6 -- a wrong formula is off by O(1).
PREP_TOL = {torch.float32: (2e-6, 1e-6), torch.float16: (1e-3, 1e-6),
            torch.bfloat16: (7.9e-3, 1e-6), torch.float64: (1e-14, 1e-13)}


def _prepare_grid():
    out = []
    for mode in ("probs", "logits", "log_p"):
        for k in (3, 10, 100, 1000):
            for margin in (0.0, 30.0, 60.0):
                for stored in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    out.append((mode, k, margin, stored))
    return out


@pytest.mark.parametrize("mode,k,margin,stored", _prepare_grid(),
                         ids=lambda v: str(v).replace("torch.", ""))
def test_prepare_against_float64(mode, k, margin, stored):
    """The reference's prepare (every backend's is judged against it) against the float64
    oracle with fixed tolerances, never against itself: near one-hot rows included, every
    buffer dtype, with forget rows and a fill, and the first evaluation with each Hessian."""
    n = 601 if k < 1000 else 131
    in_dtype = torch.float64 if stored == torch.float64 else torch.float32
    x = prepare_inputs(n, k, mode, dtype=in_dtype, seed=k + int(margin), margin=margin)
    forget = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.2
    fill = torch.full((k,), -math.log(k))
    inv_c = torch.where(forget, 1.0, 0.5).to(in_dtype)
    f, fl = (None, None) if mode == "log_p" else (forget, fill)
    tol_lp, tol_sum = PREP_TOL[stored]
    for hessian in (False, "diag", True):
        out = torch.full(x.shape, float("nan"), dtype=stored)
        before = x.clone()
        res = REF.prepare(x, mode, f, fl, out, inv_c, hessian, 1e-3)
        assert torch.equal(x, before), "prepare modified its input"
        ora = oracle_prepare(x, mode, f, fl, inv_c, hessian, 1e-3, stored)
        assert res.error is None and ora["error"] is None
        ok = np.isfinite(ora["log_p"])
        o = out.double().numpy()
        assert np.array_equal(np.isfinite(o), ok), "log P^: -inf entries differ"
        err = np.abs(o[ok] - ora["log_p"][ok]) / (1.0 + np.abs(ora["log_p"][ok]))
        assert float(err.max()) <= tol_lp, f"log P^ ({hessian}): {float(err.max()):.3g}"
        if mode == "log_p":
            assert torch.equal(res.support, torch.from_numpy(ora["support"]))
        else:
            for name in ("retain_sums", "forget_sums"):
                e = rel_err(getattr(res, name), ora[name])
                assert e <= tol_sum, f"{name}: {e:.3g}"
        if res.first is None:
            # The contract (base.PrepareOut): no first evaluation into a half buffer from
            # probabilities or logits; every other call has one.
            assert mode != "log_p" and stored in (torch.float16, torch.bfloat16)
            continue
        colsum, wlogz, h = res.first
        assert rel_err(colsum, ora["first"][0]) <= tol_sum, "first colsum"
        # At alpha = 0 each row's log Z is ~0 (rows normalised): judge sum c log Z on sum c.
        scale = max(abs(ora["first"][1]), ora["wlogz_scale"],
                    float((1.0 / inv_c.double()).sum()))
        assert abs(float(wlogz) - ora["first"][1]) <= tol_sum * scale, "first wlogz"
        if hessian is False:
            assert h is None
        else:
            e = hessian_error(h, ora["first"][2], hessian_floor(inv_c))
            assert e <= (HESS_TOL_F64 if stored == torch.float64 else HESS_TOL), \
                f"first hessian ({hessian}): {e:.3g}"


@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
def test_prepare_reports_the_first_bad_row(mode):
    x = prepare_inputs(200, 5, mode, seed=2)
    for name, make, kind in bad_inputs(mode):
        bad = make(x)
        res = REF.prepare(bad, mode, None, None, torch.empty(200, 5))
        assert res.error == (kind, 37), (name, res.error)


def test_prepare_writes_fill_and_sums_both_sets():
    x = prepare_inputs(300, 4, "probs", seed=5)
    forget = torch.zeros(300, dtype=torch.bool)
    forget[::3] = True
    fill = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    out = torch.empty(300, 4)
    res = REF.prepare(x, "probs", forget, fill, out)
    assert torch.equal(out[forget], fill.expand(100, 4))
    np.testing.assert_allclose(res.retain_sums.numpy(), x[~forget].double().sum(0).numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(res.forget_sums.numpy(), x[forget].double().sum(0).numpy(),
                               rtol=1e-6)
    assert res.first is None


def test_hessian_sample_rows_is_every_mth_block():
    """The sample's rows, built without a device sync, are exactly the rows of the 16-row blocks
    b with b % m == 0, for any window [start, stop)."""
    for n, m in ((1, 1), (100, 3), (1000, 5), (4099, 12)):
        for start, stop in ((0, n), (1, n), (17, min(n, 200)), (48, min(n, 49)), (33, 33)):
            if stop < start:
                continue
            rows = torch.arange(start, stop)
            want = torch.nonzero((rows // 16) % m == 0)[:, 0]
            assert torch.equal(hessian_sample_rows(n, m, start, stop), want), (n, m, start, stop)


# -- float64 buffers: the reference computes in float64 (it serves float64 on every device) -------
TOL_F64 = {"colsum": 1e-13, "wlogz": 1e-14, "q": 1e-12}


@pytest.mark.parametrize("n,k,margin,shift,inv_c_big", _cases(),
                         ids=lambda v: f"{v:g}" if isinstance(v, float) else str(v))
def test_float64_step_and_q_against_oracle(n, k, margin, shift, inv_c_big):
    """Within ~1e-13 of the oracle (|alpha / c| up to 1e4 costs ~eps64 * 1e4 in each shifted
    logit, hence the looser Q), the Hessian within HESS_TOL_F64 on one-hot rows too."""
    log_p, inv_c, alpha = make_case(n, k, torch.float64, shift=shift, margin=margin, seed=n + k)
    if inv_c_big != 1.0:
        inv_c = torch.where(inv_c < 0.5, inv_c_big, 1.0).double()
    for hessian in (False, "diag", True):
        got = reference_step(log_p, inv_c, alpha, hessian)
        ora = oracle_step(log_p, inv_c, alpha, hessian)
        assert rel_err(got[0], ora[0]) <= TOL_F64["colsum"]
        assert abs(float(got[1]) - ora[1]) <= TOL_F64["wlogz"] * _wlogz_unit(
            log_p, inv_c, alpha, ora[1]), (float(got[1]), ora[1])
        if hessian is not False:
            err = hessian_error(got[2], ora[2], hessian_floor(inv_c))
            assert err <= HESS_TOL_F64, f"{hessian}: {err:.3g}"
    q = reference_materialize(log_p, inv_c, alpha, torch.empty(n, k, dtype=torch.float64))
    assert rel_err(q, oracle_q(log_p, inv_c, alpha)) <= TOL_F64["q"]


@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", [3, 10, 100])
def test_float64_prepare_against_oracle(mode, k):
    """float64 input into a float64 buffer: log P^, the sums and the first evaluation to ~1e-14."""
    x = prepare_inputs(601, k, mode, torch.float64, seed=k)
    forget = torch.rand(601, generator=torch.Generator().manual_seed(1)) < 0.2
    fill = torch.full((k,), -math.log(k))
    inv_c = torch.where(forget, 1.0, 0.5).double()
    f, fl = (None, None) if mode == "log_p" else (forget, fill)
    for hessian in (False, "diag", True):
        out = torch.empty(601, k, dtype=torch.float64)
        res = REF.prepare(x, mode, f, fl, out, inv_c, hessian)
        ora = oracle_prepare(x, mode, f, fl, inv_c, hessian, stored_dtype=torch.float64)
        assert res.error is None
        ok = np.isfinite(ora["log_p"])
        np.testing.assert_allclose(out.numpy()[ok], ora["log_p"][ok], rtol=1e-14, atol=1e-14)
        if mode != "log_p":
            np.testing.assert_allclose(res.retain_sums.numpy(), ora["retain_sums"], rtol=1e-13)
            np.testing.assert_allclose(res.forget_sums.numpy(), ora["forget_sums"], rtol=1e-13)
        colsum, wlogz, h = res.first
        np.testing.assert_allclose(colsum.numpy(), ora["first"][0], rtol=1e-13)
        assert abs(float(wlogz) - ora["first"][1]) <= 1e-13 * max(ora["wlogz_scale"], 1.0)
        if hessian is not False:
            assert hessian_error(h, ora["first"][2], hessian_floor(inv_c)) <= HESS_TOL_F64


@pytest.mark.parametrize("k", [2, 3, 10, 40, 100, 1000])
def test_float32_rows_sum_to_one_within_two_ulps(k):
    """The reference's float32 Q is normalised by a float64 row sum: rows within ROW_SUM_ULPS
    float32 ulps of 1 (torch's float32 softmax left them 6 ulps off at k = 1000)."""
    for shift in (3.0, 30.0):
        log_p, inv_c, alpha = make_case(2003 if k < 1000 else 301, k, shift=shift, seed=k)
        for dtype in (torch.float32, torch.bfloat16):
            q = reference_materialize(log_p.to(dtype), inv_c, alpha)
            dev = float((q.double().sum(1) - 1.0).abs().max()) / 2.0 ** -23
            assert dev <= ROW_SUM_ULPS, f"shift {shift}, {dtype}: {dev:.2f} ulps"


def test_prepare_allocates_no_k_by_k_matrix_without_the_dense_hessian():
    """prepare allocated a k x k float64 matrix whatever the Hessian asked for (only the dense
    one, k <= 128, reads it): at k = 100,000 that is 80 GB, and refine failed."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, 100_000, generator=g), 1)
    q, info = ppu_fast.refine(p, [0], backend="torch", return_info=True)
    assert info.converged and q.shape == p.shape
    torch.testing.assert_close(q.double().sum(1), torch.ones(8, dtype=torch.float64))
