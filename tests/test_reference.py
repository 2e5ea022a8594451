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

from backend_cases import (HESS_TOL, HESS_TOL_F64, bad_inputs, check_prepare, hessian_floor,
                           make_case, prepare_inputs, rel_err)
from oracle import hessian_error, oracle_prepare, oracle_q, oracle_step
from ppu_fast.backends.base import ROW_SUM_ULPS, assemble_hessian, hessian_sample_rows
from ppu_fast.backends.torch_ref import TorchBackend, reference_materialize, reference_step

REF = TorchBackend()
# float32 work on O(1) quantities: relative errors of a few ulps, growing with |alpha / c|.
TOL = {"colsum": 1e-5, "wlogz": 1e-5, "q": 1e-5}


def _cases():
    out = []
    for k in (2, 3, 10, 40, 100, 1000):
        n = 997 if k < 1000 else 131
        for margin in (0.0, 30.0, 60.0):
            out.append((n, k, margin, 3.0, 1.0))
        out.append((n, k, 0.0, 1e4, 1.0))      # |alpha / c| up to 1e4
        out.append((n, k, 0.0, 3e-4, 1e4))    # lam = 1e-4: inv_c = 1e4 on the retained rows
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
        scale = max(abs(ora[1]), float((alpha.abs().max() * inv_c.double().reciprocal()
                                         * inv_c.double()).sum()), 1.0)
        assert abs(float(got[1]) - ora[1]) <= TOL["wlogz"] * scale, (float(got[1]), ora[1])
        if hessian is not False:
            err = hessian_error(got[2], ora[2], hessian_floor(inv_c))
            assert err <= HESS_TOL, f"{hessian}: {err:.3g}"
    q = reference_materialize(log_p, inv_c, alpha)
    assert rel_err(q, oracle_q(log_p, inv_c, alpha)) <= TOL["q"]


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


@pytest.mark.parametrize("mode", ["probs", "logits", "log_p"])
@pytest.mark.parametrize("k", [3, 10, 100])
@pytest.mark.parametrize("hessian", [False, "diag", True])
def test_prepare_against_float64(mode, k, hessian):
    x = prepare_inputs(601, k, mode, seed=k)
    forget = torch.rand(601, generator=torch.Generator().manual_seed(1)) < 0.2
    fill = torch.full((k,), -math.log(k))
    inv_c = torch.where(forget, 1.0, 0.5).float()
    if mode == "log_p":
        check_prepare(REF, x, mode, None, None, None, inv_c, hessian)
    else:
        check_prepare(REF, x, mode, forget, fill, torch.float32, inv_c, hessian)


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
        scale = max(abs(ora[1]), float((alpha.abs().max() / inv_c * inv_c).sum()), 1.0)
        assert abs(float(got[1]) - ora[1]) <= TOL_F64["wlogz"] * scale, (float(got[1]), ora[1])
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
