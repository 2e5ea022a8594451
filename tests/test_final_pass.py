"""Newton's last pass writes Q (solver.FinalPass): the cpu backend's fused materialize, the refine
that ends on it, and the rebuild of log P^ when the prediction that the pass is the last fails."""

from __future__ import annotations

import pytest
import torch

import ppu_fast
from ppu_fast import solver
from conftest import confident_classifier
from oracle import oracle_step

_C = pytest.importorskip("ppu_fast._C", reason="ppu_fast._C is not built (pip install -e .)")

from ppu_fast.backends.cpu import CpuBackend  # noqa: E402


def _inputs(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(3 * torch.randn(n, k, generator=g, dtype=torch.float64), dim=1)
    inv_c = torch.where(torch.rand(n, generator=g) < 0.2, 1.0, 0.25).to(dtype)
    alpha = torch.randn(k, generator=g, dtype=torch.float64)
    return log_p.to(dtype), inv_c, alpha - alpha.median()


@pytest.mark.parametrize("k", [3, 10, 100, 1023])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_materialize_sums_is_materialize_and_step(k: int, dtype: torch.dtype,
                                                   in_place: bool) -> None:
    """One pass gives materialize's Q (bit for bit) and step's column sums and sum of log Z."""
    be = CpuBackend()
    log_p, inv_c, alpha = _inputs(1000 + 7, k, dtype)
    q_ref = torch.empty_like(log_p)
    be.materialize(log_p, inv_c, alpha, q_ref)
    colsum_ref, wlogz_ref, _ = be.step(log_p, inv_c, alpha, False)
    buf = log_p.clone()
    out = buf if in_place else torch.full_like(log_p, float("nan"))
    colsum, wlogz = be.materialize_sums(buf, inv_c, alpha, out)
    assert torch.equal(out, q_ref)
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(colsum, colsum_ref, rtol=rtol, atol=rtol)
    torch.testing.assert_close(wlogz, wlogz_ref, rtol=rtol, atol=0.0)
    # and against the float64 formulas (the kernels round alpha / c to the buffer's dtype)
    colsum64, wlogz64, _ = oracle_step(log_p, inv_c, alpha)
    tol64 = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(colsum, torch.from_numpy(colsum64), rtol=tol64, atol=tol64)
    torch.testing.assert_close(wlogz, torch.tensor(wlogz64, dtype=torch.float64), rtol=tol64,
                               atol=0.0)
    if not in_place:
        assert torch.equal(buf, log_p), "materialize_sums modified log_p"


def _residual(q: torch.Tensor, m: torch.Tensor) -> float:
    return float((q.double().sum(0) - m).abs().sum()) / q.shape[0]


@pytest.mark.parametrize("pseudo", ["uniform", "prior", "random"])
@pytest.mark.parametrize("k", [10, 100])
def test_refine_ends_on_the_pass_that_writes_q(pseudo: str, k: int) -> None:
    """The cpu refine writes Q with its last Newton pass; the residual it reports is that of
    the Q returned, and Q agrees with the reference backend's."""
    y, p = confident_classifier(20_000, k, seed=3)
    mask = y == 0
    g = torch.Generator().manual_seed(0)
    q, info = ppu_fast.refine(p, mask, pseudo=pseudo, backend="cpu", return_info=True,
                              generator=g)
    assert info.converged
    # "prior" with the retain rows' totals starts at the optimum: its only pass evaluates
    # alpha = 0, and there is no Newton step to fuse with the writing of Q.
    assert info.materialized == (info.iterations > 1)
    assert info.iterations > 1 or pseudo == "prior"
    g = torch.Generator().manual_seed(0)
    q_ref, info_ref = ppu_fast.refine(p, mask, pseudo=pseudo, backend="torch",
                                      return_info=True, generator=g)
    assert not info_ref.materialized
    torch.testing.assert_close(q, q_ref, rtol=0, atol=2e-6)
    m = p[~mask].double().sum(0) * (p.shape[0] / int((~mask).sum()))
    assert _residual(q, m) <= 1e-6
    assert _residual(q, m) == pytest.approx(info.residual, rel=0.05, abs=1e-8)


@pytest.mark.parametrize("pseudo", ["uniform", "random"])
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("how", ["short", "refused"])
def test_mispredicted_last_pass_rebuilds_log_p(monkeypatch, pseudo: str, logits: bool,
                                               how: str) -> None:
    """A fused pass whose Q has not converged leaves Q in the buffer: refine rebuilds log P^
    (pseudo rows included), the line search takes that pass as its first trial (the point is
    not evaluated again), and the solve ends on the Q it reaches without the fused pass.
    "short": an honest pass that falls short of tol (predicted at the first chance, float64,
    tol 1e-10), accepted by the line search; "refused": one whose sums are far off, refused."""
    y, p = confident_classifier(20_000, 10, seed=3)
    p = p.double()
    x = torch.log(p) + 3.0 if logits else p
    x_before = x.clone()
    mask = y == 0
    kw = dict(pseudo=pseudo, backend="cpu", return_info=True, tol=1e-10)
    kw["logits" if logits else "probs"] = x

    monkeypatch.setattr(CpuBackend, "fused_materialize", False)
    q_plain, info_plain = ppu_fast.refine(forget_mask=mask,
                                          generator=torch.Generator().manual_seed(1), **kw)
    assert not info_plain.materialized and info_plain.converged
    monkeypatch.setattr(CpuBackend, "fused_materialize", True)
    # One prediction, made while far from tol.
    monkeypatch.setattr(solver, "FINAL_PREDICT_SLACKS", (1e12,))

    real_write, real_bind = CpuBackend.materialize_sums, CpuBackend.bind_step
    written, stepped = [], []

    def write(self, log_p, inv_c, alpha, out):
        colsum, wlogz = real_write(self, log_p, inv_c, alpha, out)  # Q is now in the buffer
        written.append(alpha.clone())
        return (colsum + 1.0 if how == "refused" else colsum), wlogz

    def bind(self, log_p, inv_c):
        run = real_bind(self, log_p, inv_c)

        def spied(alpha, hessian):
            stepped.append(torch.from_numpy(alpha.copy()))
            return run(alpha, hessian)
        return spied

    monkeypatch.setattr(CpuBackend, "materialize_sums", write)
    monkeypatch.setattr(CpuBackend, "bind_step", bind)
    q, info = ppu_fast.refine(forget_mask=mask, generator=torch.Generator().manual_seed(1), **kw)
    assert len(written) == 1 and not info.materialized and info.converged, info.history
    assert info.residual <= 1e-10
    assert not any(torch.equal(a, written[0]) for a in stepped), "the trial was evaluated again"
    torch.testing.assert_close(q, q_plain, rtol=0, atol=1e-8)
    assert torch.equal(x, x_before), "refine modified its input"


@pytest.mark.parametrize("slacks", [(1e12,), (1e12, 1e12)])
def test_failed_write_predictions_are_bounded(monkeypatch, slacks) -> None:
    """Each failed write prediction costs a rebuild of log P^: the solver predicts again after
    a failure, but at most ``len(FINAL_PREDICT_SLACKS)`` times in one solve, and ends on the Q
    the plain solve reaches."""
    y, p = confident_classifier(20_000, 10, seed=3)
    p = p.double()
    mask = y == 0
    kw = dict(backend="cpu", return_info=True, tol=1e-10)
    monkeypatch.setattr(CpuBackend, "fused_materialize", False)
    q_plain, info_plain = ppu_fast.refine(p, mask, **kw)
    assert not info_plain.materialized and info_plain.converged
    assert info_plain.iterations > len(slacks) + 1, "too few passes to predict that often"
    monkeypatch.setattr(CpuBackend, "fused_materialize", True)
    monkeypatch.setattr(solver, "FINAL_PREDICT_SLACKS", slacks)
    real_write, real_prepare = CpuBackend.materialize_sums, CpuBackend.prepare
    written, prepared = [], []

    def write(self, log_p, inv_c, alpha, out):
        colsum, wlogz = real_write(self, log_p, inv_c, alpha, out)
        written.append(alpha.clone())
        return colsum + 1.0, wlogz  # refused: never converged

    def prepare(self, *a, **kw):
        prepared.append(1)
        return real_prepare(self, *a, **kw)

    monkeypatch.setattr(CpuBackend, "materialize_sums", write)
    monkeypatch.setattr(CpuBackend, "prepare", prepare)
    q, info = ppu_fast.refine(p, mask, **kw)
    assert len(written) == len(slacks), info.history
    assert len(prepared) == 1 + len(slacks)  # the first, and a rebuild per failure
    assert info.converged and not info.materialized
    torch.testing.assert_close(q, q_plain, rtol=0, atol=1e-8)


def test_in_place_refine_keeps_the_separate_materialize() -> None:
    """With out= the input itself, log P^ overwrites the input and could not be rebuilt: the
    solver then certifies convergence before it writes Q. (A problem whose refine does write Q
    in its last pass: the first assertion checks that premise.)"""
    y, p = confident_classifier(4_000, 10, seed=3)
    mask = y == 0
    q, info = ppu_fast.refine(p, mask, backend="cpu", return_info=True)
    buf = p.clone()
    q2, info2 = ppu_fast.refine(buf, mask, backend="cpu", return_info=True, out=buf)
    assert info.materialized and not info2.materialized
    assert q2 is buf
    torch.testing.assert_close(q2, q, rtol=0, atol=1e-6)
