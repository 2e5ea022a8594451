"""The solver core on the reference backend: optimality, agreement with POT, scenarios, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppu_fast
from ppu_fast.backends.torch_ref import shifted_logits
from conftest import confident_classifier
from solver_problems import probe_classifier, saturated_family


def p_hat_of(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """P with forget rows replaced by uniform pseudo-probabilities (float64)."""
    ph = p.double().clone()
    ph[mask] = 1.0 / p.shape[1]
    return ph


def retain_marginals(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return p[~mask].double().sum(0) * (p.shape[0] / int((~mask).sum()))


def assert_kkt(q: torch.Tensor, log_p_hat: torch.Tensor, inv_c: torch.Tensor, m: torch.Tensor,
               tol: float = 1e-5) -> None:
    """Rows on the simplex, column sums M, and log q - log p^ + alpha/c constant along rows."""
    q = q.double()
    n = q.shape[0]
    assert (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(n, dtype=torch.float64), atol=tol)
    assert float((q.sum(0) - m).abs().sum()) / n <= tol
    # Recover alpha from the stationarity condition by least squares, then check the residual:
    # log q_ik - log p^_ik = -alpha_k inv_c_i + b_i.
    d = torch.log(q) - log_p_hat
    a_hat = -((d - d.mean(1, keepdim=True)) * inv_c[:, None]).sum(0) / (inv_c ** 2).sum()
    r = d + inv_c[:, None].double() * a_hat[None, :]
    spread = (r - r.mean(1, keepdim=True)).abs().max()
    assert float(spread) <= tol, f"stationarity violated by {float(spread):.3g}"


SCENARIOS = [(n, k, kind, lam, marg)
             for n, k in ((50_000, 10), (50_000, 100))
             for kind in ("class", "selective")
             for lam in (0.5, 1.0, 3.0)
             for marg in ("retain", "original")]


@pytest.mark.parametrize("n,k,kind,lam,marg", SCENARIOS)
def test_paper_scenarios_newton_within_10_passes(n, k, kind, lam, marg):
    y, p = confident_classifier(n, k, seed=k)
    mask = (y == 5) if kind == "class" else torch.zeros(n, dtype=torch.bool)
    if kind == "selective":
        mask[torch.nonzero(y == 5)[:100, 0]] = True
    q, info = ppu_fast.refine(p, mask, lam=lam, marginals=marg, return_info=True)
    assert info.converged and info.residual <= 1e-6
    assert info.iterations <= 10, info.history
    assert len(info.history) == info.iterations
    m = retain_marginals(p, mask) if marg == "retain" else p.double().sum(0)
    assert float((q.double().sum(0) - m).abs().sum()) / n <= 1e-6 * 1.01
    # Sinkhorn reaches the same answer (gradient ascent is checked on k = 10 below).
    q_s, info_s = ppu_fast.refine(p, mask, lam=lam, marginals=marg, method="sinkhorn",
                                  return_info=True)
    assert info_s.converged and info_s.iterations > info.iterations
    assert float((q_s - q).abs().max()) < 1e-4


@pytest.mark.parametrize("kind", ["class", "selective"])
@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_three_methods_agree(kind, lam):
    y, p = confident_classifier(50_000, 10, seed=3)
    mask = (y == 5) if kind == "class" else torch.zeros(50_000, dtype=torch.bool)
    if kind == "selective":
        mask[torch.nonzero(y == 5)[:100, 0]] = True
    qs, infos = [], []
    for method in ("newton", "sinkhorn", "gradient"):
        q, info = ppu_fast.refine(p, mask, lam=lam, method=method, return_info=True)
        assert info.converged, (method, info.residual)
        qs.append(q)
        infos.append(info)
    assert infos[0].iterations < infos[1].iterations
    assert infos[0].iterations < infos[2].iterations
    for q in qs[1:]:
        assert float((q - qs[0]).abs().max()) < 1e-4


def test_matches_pot_sinkhorn_log_when_lam_is_one():
    ot = pytest.importorskip("ot")
    y, p = confident_classifier(200, 7, seed=11)
    mask = torch.zeros(200, dtype=torch.bool)
    mask[torch.nonzero(y == 3)[:20, 0]] = True
    for marg in ("retain", "original"):
        q = ppu_fast.refine(p.double(), mask, lam=1.0, marginals=marg, tol=1e-7)
        ph = p_hat_of(p, mask)
        m = retain_marginals(p, mask) if marg == "retain" else p.double().sum(0)
        pi = ot.bregman.sinkhorn_log(np.ones(200), m.numpy(), (-torch.log(ph)).numpy(), reg=1.0,
                                     numItermax=20_000, stopThr=1e-6)
        assert np.abs(q.numpy() - pi).max() < 1e-5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 200), k=st.integers(2, 12), lam=st.floats(0.1, 10.0),
       frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000),
       pseudo=st.sampled_from(["uniform", "random", "prior"]),
       marg=st.sampled_from(["retain", "original"]))
def test_kkt_conditions_hold(n, k, lam, frac, seed, pseudo, marg):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, dim=1)
    mask = torch.rand(n, generator=g) < frac
    q, info = ppu_fast.refine(p, mask, lam=lam, pseudo=pseudo, marginals=marg,
                              generator=torch.Generator().manual_seed(seed), return_info=True)
    # Rebuild P^ the same way (same generator seed for "random").
    ph = p.clone()
    nf = int(mask.sum())
    if nf:
        if pseudo == "uniform":
            ph[mask] = 1.0 / k
        elif pseudo == "random":
            z = torch.randn(nf, k, generator=torch.Generator().manual_seed(seed))
            ph[mask] = torch.softmax(z, 1).double()
        else:
            prior = p[~mask].mean(0) if (~mask).any() else torch.full((k,), 1.0 / k)
            ph[mask] = prior.float().double()
    if marg == "original":
        m = p.sum(0)
    elif (~mask).any():
        m = retain_marginals(p, mask)
    else:
        m = ph.sum(0)
    inv_c = torch.where(mask, 1.0, 1.0 / lam).double()
    assert_kkt(q, torch.log(ph.float().double()), inv_c, m)


def test_solve_and_targets_low_level():
    y, p = confident_classifier(2000, 6, seed=5)
    log_p = torch.log(p)
    w = torch.where(y == 1, 1.0, 2.5)
    m = torch.full((6,), 2000 / 6, dtype=torch.float64)
    alpha, info = ppu_fast.solve(log_p, w, m)
    assert info.converged and alpha.shape == (6,) and alpha.dtype == torch.float64
    assert abs(float(alpha.sum())) < 1e-8  # gauge fixed
    q = ppu_fast.targets(log_p, w, alpha)
    assert q.shape == p.shape and q.dtype == p.dtype
    assert float((q.double().sum(0) - m).abs().sum()) / 2000 <= 1e-6 * 1.01
    assert_kkt(q, log_p.double(), 1 / w.double(), m)
    # Rows need not be normalised: a per-row shift changes nothing.
    alpha2, _ = ppu_fast.solve(log_p + torch.randn(2000, 1), w, m)
    assert torch.allclose(alpha, alpha2, atol=1e-4)


def test_zero_probabilities_stay_zero():
    y, p = confident_classifier(500, 5, seed=2)
    p = p.clone()
    p[::3, 4] = 0.0
    p = p / p.sum(1, keepdim=True)
    mask = torch.zeros(500, dtype=torch.bool)
    mask[:20] = True
    q = ppu_fast.refine(p, mask)
    assert (q[~mask][p[~mask] == 0] == 0).all()


def test_k_equal_one_returns_ones():
    q, info = ppu_fast.refine(torch.ones(5, 1), torch.tensor([1, 3]), return_info=True)
    assert torch.equal(q, torch.ones(5, 1)) and info.converged


def test_empty_forget_set_keeps_probabilities(small_problem):
    p, _ = small_problem
    q = ppu_fast.refine(p, torch.zeros(p.shape[0], dtype=torch.bool))
    assert torch.allclose(q, p, atol=1e-5)
    q2 = ppu_fast.refine(p, torch.tensor([], dtype=torch.long))
    assert torch.allclose(q2, q)


def test_all_forget_set_works(small_problem):
    p, _ = small_problem
    for pseudo in ("uniform", "prior", "random"):
        for marg in ("retain", "original"):
            q, info = ppu_fast.refine(p, torch.ones(p.shape[0], dtype=torch.bool), pseudo=pseudo,
                                      marginals=marg, return_info=True)
            assert info.converged
            assert torch.allclose(q.sum(1), torch.ones(p.shape[0]), atol=1e-5)


def test_index_mask_equals_bool_mask(small_problem):
    p, mask = small_problem
    q1 = ppu_fast.refine(p, mask)
    q2 = ppu_fast.refine(p, torch.nonzero(mask)[:, 0])
    q3 = ppu_fast.refine(p, torch.nonzero(mask)[:, 0].numpy())
    assert torch.equal(q1, q2) and torch.equal(q1, q3)


def test_numpy_in_numpy_out(small_problem):
    p, mask = small_problem
    q = ppu_fast.refine(p.numpy(), mask.numpy())
    assert isinstance(q, np.ndarray) and q.dtype == np.float32
    assert np.allclose(q, ppu_fast.refine(p, mask).numpy())
    q64 = ppu_fast.refine(p.double().numpy(), mask.numpy())
    assert q64.dtype == np.float64


def test_logits_input_matches_probs():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(300, 8, generator=g) * 3
    mask = torch.rand(300, generator=g) < 0.1
    q1 = ppu_fast.refine(logits=logits, forget_mask=mask)
    q2 = ppu_fast.refine(torch.softmax(logits, 1), mask)
    assert torch.allclose(q1, q2, atol=1e-5)


def test_non_contiguous_input(small_problem):
    p, mask = small_problem
    wide = torch.cat([p, p], dim=1)[:, ::2]  # a strided view (not the same values as p)
    wide = wide / wide.sum(1, keepdim=True)
    q = ppu_fast.refine(wide, mask)
    q_ref = ppu_fast.refine(wide.contiguous(), mask)
    assert torch.allclose(q, q_ref, atol=1e-6)
    assert ppu_fast.refine(p.T.contiguous().T, mask).shape == p.shape


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs_compute_in_float32(small_problem, dtype, atol):
    p, mask = small_problem
    ph = p.to(dtype)
    q, info = ppu_fast.refine(ph, mask, return_info=True)
    assert q.dtype == dtype and info.converged
    q32 = ppu_fast.refine(ph.float() / ph.float().sum(1, keepdim=True), mask)
    assert float((q.float() - q32).abs().max()) < atol


def test_max_iter_warns_and_reports(small_problem):
    p, mask = small_problem
    with pytest.warns(ppu_fast.ConvergenceWarning, match="did not converge"):
        q, info = ppu_fast.refine(p, mask, method="gradient", max_iter=3, return_info=True)
    assert not info.converged and info.iterations == 3 and info.residual > 1e-6
    assert "max_iter" in info.message


def test_gradient_step_size_override(small_problem):
    p, mask = small_problem
    _, a = ppu_fast.refine(p, mask, method="gradient", return_info=True)
    _, b = ppu_fast.refine(p, mask, method="gradient", step_size=0.02, return_info=True)
    assert a.converged and b.converged and a.iterations != b.iterations


def test_info_fields(small_problem):
    p, mask = small_problem
    _, info = ppu_fast.refine(p, mask, return_info=True)
    assert isinstance(info, ppu_fast.RefineInfo)
    assert info.method == "newton" and info.backend in ("torch", "cpu")
    assert info.seconds > 0 and np.isfinite(info.dual_value)
    assert info.alpha.shape == (5,) and info.history[-1] == info.residual


def test_random_pseudo_is_reproducible(small_problem):
    p, mask = small_problem
    a = ppu_fast.refine(p, mask, pseudo="random", generator=torch.Generator().manual_seed(7))
    b = ppu_fast.refine(p, mask, pseudo="random", generator=torch.Generator().manual_seed(7))
    c = ppu_fast.refine(p, mask, pseudo="random", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_large_shift_does_not_overflow():
    # A forgotten class whose marginal is tiny drives alpha far from zero.
    y, p = confident_classifier(5000, 4, seed=9, margin=12.0)
    mask = y == 0
    q, info = ppu_fast.refine(p, mask, marginals="retain", return_info=True)
    assert info.converged and torch.isfinite(q).all()
    assert float(info.alpha.abs().max()) > 5


def test_shifted_logits_is_the_single_formula():
    lp = torch.log_softmax(torch.randn(4, 3), 1)
    x = shifted_logits(lp, torch.tensor([1.0, 0.5, 2.0, 1.0]), torch.tensor([0.1, -0.2, 0.1]))
    assert torch.allclose(x[1], lp[1] - 0.5 * torch.tensor([0.1, -0.2, 0.1]))


def _backends_here():
    """cpu and torch, and the GPU backends (marked gpu, so benchmarks/gpu/check.sh runs them)."""
    out = ["cpu", "torch"]
    out += [pytest.param(b, marks=pytest.mark.gpu) for b in ("triton", "cuda")]
    return out


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("k", [10, 40])
@pytest.mark.parametrize("marg", ["retain", "original"])
@pytest.mark.parametrize("margin", [30.0, 60.0])
def test_newton_on_a_confident_model(backend, k, marg, margin):
    """Logit margins of 30 / 60 make 1 - q ~ 1e-13 / 1e-26: the Hessian must keep it (the old
    float32 route cancelled it to 0 and stalled Newton for 100 passes)."""
    from ppu_fast.backends import reasons
    dev = "cuda" if backend in ("triton", "cuda") else "cpu"
    why = reasons(backend, torch.zeros(2, 2, device=dev) if dev == "cpu" or
                  torch.cuda.is_available() else torch.zeros(2, 2))
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    y, p = confident_classifier(20_000, k, seed=1, margin=margin)
    p = p.to(dev)
    q, info = ppu_fast.refine(p, (y == 0).to(dev), marginals=marg, backend=backend,
                              return_info=True)
    assert info.converged and info.iterations <= 15, (info.iterations, info.history)
    m = (retain_marginals(p.cpu(), y == 0) if marg == "retain" else p.cpu().double().sum(0))
    assert float((q.cpu().double().sum(0) - m).abs().sum()) / 20_000 <= 1e-6 * 1.01


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("k", [6, 40])
def test_out_buffer_and_in_place(backend, k):
    """out= receives Q (the same values as a fresh result); out= the input itself overwrites it."""
    y, p = confident_classifier(3001, k, seed=4)
    mask = y == 1
    q = ppu_fast.refine(p, mask, backend=backend)
    buf = torch.full_like(p, float("nan"))
    assert ppu_fast.refine(p, mask, backend=backend, out=buf) is buf
    assert torch.equal(buf, q)
    inplace = p.clone()
    assert ppu_fast.refine(inplace, mask, backend=backend, out=inplace) is inplace
    torch.testing.assert_close(inplace, q, rtol=0, atol=1e-6)
    arr = p.numpy().copy()
    out = np.empty_like(arr)
    assert ppu_fast.refine(arr, mask.numpy(), backend=backend, out=out) is out
    np.testing.assert_allclose(out, q.numpy(), atol=1e-6)


def _laplacian_hessian(k: int, rng: np.random.Generator, empty: int = 0) -> np.ndarray:
    """A Newton-like Hessian: S L S with L the Laplacian of random weights (PSD, as the kernels
    assemble it), its first ``empty`` classes reached by no row (all zero)."""
    w = rng.random((k, k)) ** 3
    w[:empty, :] = 0.0
    w[:, :empty] = 0.0
    w = np.triu(w, 1)
    w = w + w.T
    s = np.exp(rng.normal(0.0, 1.0, k))
    return s[:, None] * (np.diag(w.sum(1)) - w) * s[None, :]


def _direction_oracle(h: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """The regularised system the solver defines (docs: Newton's matrix H = balanced_laplacian(h),
    rank-one gauge term, 1e-12 ridge), by least squares in float64, mean removed."""
    from ppu_fast import solver
    h = solver.balanced_laplacian(h)
    k = h.shape[0]
    scale = np.diagonal(h).mean()
    a = h + scale / k + 1e-12 * scale * np.eye(k)
    d = np.linalg.lstsq(a, grad, rcond=None)[0]
    return d - d.mean()


@pytest.mark.parametrize("k", [2, 3, 10, 40, 100, 128])
def test_newton_direction_in_cpp_matches_a_float64_oracle(k):
    """The C++ Cholesky route (ppu_fast._C.newton_direction), which the solver takes, against
    least squares on the same system; numpy's route (no build, or Cholesky declined) agrees."""
    from ppu_fast import solver
    from ppu_fast.backends.cpu import _C
    if _C is None:
        pytest.skip("ppu_fast._C is not built")
    rng = np.random.default_rng(k)
    h = _laplacian_hessian(k, rng)
    grad = rng.normal(size=k)
    d = _C.newton_direction(h, grad, solver.BALANCE_ITERS, solver.BALANCE_TOL)
    assert d is not None and d.shape == (k,) and d.dtype == np.float64
    oracle = _direction_oracle(h, grad)
    scale = np.abs(oracle).max()
    assert abs(d.sum()) <= 1e-13 * scale * k
    np.testing.assert_allclose(d, oracle, rtol=0, atol=1e-9 * scale)
    np.testing.assert_array_equal(solver._newton_direction(h, grad), d)
    np.testing.assert_allclose(solver._dense_direction_numpy(solver.balanced_laplacian(h), grad),
                               d, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("k", [3, 10, 100])
def test_newton_direction_with_a_class_no_row_reaches(k):
    """A class with an all-zero Hessian row leaves only the 1e-12 ridge on it (condition ~1e12):
    whichever route the solver takes (Cholesky, or numpy when a pivot rounds to <= 0), the
    direction is finite and matches the oracle to what that conditioning allows."""
    from ppu_fast import solver
    rng = np.random.default_rng(k + 1)
    h = _laplacian_hessian(k, rng, empty=1)
    grad = rng.normal(size=k)
    d = solver._newton_direction(h, grad)
    oracle = _direction_oracle(h, grad)
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d, oracle, rtol=0, atol=1e-3 * np.abs(oracle).max())
def test_newton_direction_falls_back_to_numpy_when_not_positive_definite():
    """An indefinite H (not what the kernels assemble, but a backend might round to one) makes
    the Cholesky route decline; the solver then takes numpy's pivoted solve, not a NaN step."""
    from ppu_fast import solver
    from ppu_fast.backends.cpu import _C
    if _C is None:
        pytest.skip("ppu_fast._C is not built")
    h = np.diag([1.0, -3.0, 2.0, 5.0])
    grad = np.array([0.5, -1.0, 0.25, 0.25])
    it, tol = solver.BALANCE_ITERS, solver.BALANCE_TOL
    assert _C.newton_direction(h, grad, it, tol) is None
    d = solver._newton_direction(h, grad)
    np.testing.assert_array_equal(d, solver._dense_direction_numpy(h, grad))
    assert np.isfinite(d).all()
    assert _C.newton_direction(np.full((3, 3), np.nan), np.ones(3), it, tol) is None
    with pytest.raises(ValueError, match=r"h \(k, k\) and grad \(k,\)"):
        _C.newton_direction(np.eye(3), np.ones(4), it, tol)


def _plain_laplacian(h: np.ndarray) -> np.ndarray:
    """The Laplacian of h's off-diagonal entries (diagonal: minus their row sums)."""
    lap = h - np.diag(np.diagonal(h))
    return lap - np.diag(lap.sum(axis=1))


def _balance_factors(h: np.ndarray, lap: np.ndarray) -> np.ndarray:
    """t with lap_il = t_i t_l h_il off the diagonal, from the triangle (i, l, m): t_i^2 =
    r_il r_im / r_lm with r = lap / h (k >= 3, every weight positive)."""
    r = lap / h
    k = h.shape[0]
    return np.array([np.sqrt(r[i, (i + 1) % k] * r[i, (i + 2) % k]
                             / r[(i + 1) % k, (i + 2) % k]) for i in range(k)])


@pytest.mark.parametrize("k", [3, 10, 40, 128])
def test_balanced_laplacian_is_a_rescaled_laplacian_with_the_diagonal(k):
    """What Newton solves with: rows summing to 0 (to float64 rounding), off-diagonal entries
    h_il rescaled by t_i t_l (a symmetric congruence: PSD), and, once the sweeps have converged,
    h's diagonal within BALANCE_TOL; with a few sweeps the diagonal moves toward it. An h that
    is already a Laplacian comes back unchanged."""
    from ppu_fast import solver
    rng = np.random.default_rng(100 + k)
    # A Hessian as a row sample assembles it: the Laplacian of W = sum_i q_i q_i^T over softmax
    # rows, each class rescaled (S L S) so that its diagonal is the exact one; balancing can
    # then reach that diagonal (by t = 1 / s).
    x = 2.0 * rng.normal(size=(50 * k, k))
    q = np.exp(x - x.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    s_ = np.exp(rng.normal(0.0, 0.3, k))
    h = s_[:, None] * _plain_laplacian(-(q.T @ q)) * s_[None, :]
    d = np.diagonal(h)
    lap = solver.balanced_laplacian(h)
    assert np.abs(lap - lap.T).max() == 0.0
    assert np.abs(lap.sum(axis=1)).max() <= 1e-14 * np.abs(lap).max()
    assert np.linalg.eigvalsh(lap).min() >= -1e-12 * np.abs(lap).max()
    t = _balance_factors(h, lap)
    off = ~np.eye(k, dtype=bool)
    np.testing.assert_allclose(lap[off], (t[:, None] * h * t[None, :])[off], rtol=1e-12)
    plain = np.abs(np.diagonal(_plain_laplacian(h)) / d - 1).max()
    assert np.abs(np.diagonal(lap) / d - 1).max() < plain  # the sweeps moved toward d
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(solver, "BALANCE_ITERS", 500)
        full = solver.balanced_laplacian(h)
    assert np.abs(np.diagonal(full) / d - 1).max() <= solver.BALANCE_TOL
    assert np.abs(full.sum(axis=1)).max() <= 1e-14 * np.abs(full).max()
    exact = _plain_laplacian(h)  # already a Laplacian: nothing to rescale
    np.testing.assert_allclose(solver.balanced_laplacian(exact), exact, rtol=1e-15,
                               atol=1e-15 * np.abs(exact).max())


@pytest.mark.parametrize("k", [2, 3, 10, 100, 128])
@pytest.mark.parametrize("empty", [0, 1])
def test_balanced_laplacian_in_cpp_matches_numpy(k, empty):
    """csrc/cpu/newton.cpp's balanced_laplacian (the one the solver's direction uses) against the
    numpy one, including a class no row reaches (its diagonal stays h's: 0)."""
    from ppu_fast import solver
    from ppu_fast.backends.cpu import _C
    if _C is None:
        pytest.skip("ppu_fast._C is not built")
    rng = np.random.default_rng(200 + k)
    h = _laplacian_hessian(k, rng, empty=empty)
    for iters in (0, solver.BALANCE_ITERS, 50):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(solver, "BALANCE_ITERS", iters)
            ref = solver.balanced_laplacian(h)
        got = _C.balanced_laplacian(h, iters, solver.BALANCE_TOL)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13 * np.abs(ref).max())
        assert (np.diagonal(got)[:empty] == 0).all()


def test_balanced_laplacian_odd_inputs_agree_in_cpp_and_numpy():
    """Inputs no backend assembles but a caller of the C++ route could pass: the two
    implementations agree (NaN where NaN, finite where finite), a class with weight but d_i <= 0
    is not rescaled and gets its row sum (rows still sum to 0), and a NaN weight reaches the
    direction's finiteness check (None from C++, as before the change)."""
    from ppu_fast import solver
    from ppu_fast.backends.cpu import _C
    if _C is None:
        pytest.skip("ppu_fast._C is not built")
    lap4 = _plain_laplacian(-np.array([[0, 1, 2, 3], [1, 0, 4, 5], [2, 4, 0, 6], [3, 5, 6, 0.0]]))
    cases = {"zeros": np.zeros((4, 4)), "diagonal only": np.diag([1.0, 2.0, 0.0, 3.0]),
             "positive off-diagonal": np.array([[1.0, 0.5], [0.5, 1.0]]),
             "d <= 0 with weight": lap4 - np.diag([lap4[0, 0] + 1.0, 0, 0, 0]),
             "k = 1": np.array([[2.0]])}
    nan = lap4.copy()
    nan[2, 1] = nan[1, 2] = np.nan
    cases["nan weight"] = nan
    for name, h in cases.items():
        ref = solver.balanced_laplacian(h)
        got = _C.balanced_laplacian(h, solver.BALANCE_ITERS, solver.BALANCE_TOL)
        np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-300, equal_nan=True,
                                   err_msg=name)
    lap = solver.balanced_laplacian(cases["d <= 0 with weight"])
    np.testing.assert_allclose(lap, lap4, rtol=1e-15)  # not rescaled; its row sum on the diagonal
    assert _C.newton_direction(nan, np.array([1.0, -1.0, 0.5, -0.5]), solver.BALANCE_ITERS,
                               solver.BALANCE_TOL) is None


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("n, margin, lam", [(1500, 30.0, 1e-6), (20_000, 8.0, 1e-4),
                                            (20_000, 8.0, 1e-6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_on_class_unlearning_at_small_lam(backend, n, margin, lam, dtype):
    """The forget rows (weight 1) must give up the forgotten class while the retain rows (weight
    lam) absorb it: that class's alpha runs to ~1 / lam, so Newton's direction has a huge
    component along 1, and any H 1 != 0 (float32 rounding of an exact Hessian; a row sample's
    rescaling) times it swamped the other classes. Solved with the backends' H itself these
    stalled: 1,500 x 10 at margin 30 float32 at residual 1.6e-5 after 88 passes; 20,000 x 10 at
    margin 8, 8e-4 (lam 1e-4, float32) and 2e-2 (lam 1e-6, float32 and float64) after 100."""
    from ppu_fast.backends import reasons
    gpu = backend in ("triton", "cuda")
    if gpu and dtype == torch.float64:
        pytest.skip(f"{backend}: float32 kernels (float64 goes to the torch backend)")
    dev = "cuda" if gpu else "cpu"
    why = reasons(backend, torch.zeros(2, 2, device=dev) if dev == "cpu" or
                  torch.cuda.is_available() else torch.zeros(2, 2))
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    y, p = confident_classifier(n, 10, seed=0, margin=margin)
    mask = y == 0
    q, info = ppu_fast.refine(p.to(dtype).to(dev), mask.to(dev), lam=lam, backend=backend,
                              return_info=True)
    assert info.converged and info.iterations <= 25, (info.iterations, info.history)
    m = retain_marginals(p, mask)
    assert float((q.cpu().double().sum(0) - m).abs().sum()) / n <= 1.2e-6


def test_solver_without_the_compiled_module_takes_numpy(monkeypatch):
    """Without ``ppu_fast._C`` (a build that failed) the solver's directions and host arithmetic
    (log-form right-hand side, pass terms) come from numpy:
    the same passes and the same Q to float32 rounding as with the C++ route."""
    from ppu_fast import solver
    y, p = confident_classifier(4000, 12, margin=8.0, seed=3)
    mask = y < 2
    q1, i1 = ppu_fast.refine(p, mask, backend="torch", return_info=True)
    monkeypatch.setattr(solver, "_C", None)
    q2, i2 = ppu_fast.refine(p, mask, backend="torch", return_info=True)
    assert i1.converged and i2.converged and i1.iterations == i2.iterations
    torch.testing.assert_close(q1, q2, rtol=0, atol=1e-6)


def _zero_target_problem(n: int, k: int = 12):
    """(P (n x k) float64, forget: the rows whose argmax is class 3, M: the retain rows' class mix
    with class 3 set to exactly 0, summing to n): feasible, no row being one-hot on class 3."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, k)) * 3
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    forget = p.argmax(1) == 3
    m = p[~forget].sum(0)
    m[3] = 0.0
    return p, forget, m * (n / m.sum())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_newton_reaches_a_class_target_of_zero(backend, dtype):
    """A target of exactly 0 on one class (reachable: no row is one-hot on it) leaves that class's
    mass on the few rows the Hessian's sample misses: the sampled Hessian wandered for 100 passes
    (float64) or failed its line search (float32), ending on a ConvergenceWarning. A stalled
    Newton now takes the exact Hessian (probe 27)."""
    from ppu_fast.backends.base import hessian_stride

    import warnings

    n = 8000
    assert hessian_stride(n, 12) > 1
    p, forget, m = _zero_target_problem(n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = ppu_fast.refine(p.astype(dtype), forget, marginals=m, backend=backend,
                                  return_info=True)
    assert info.converged and info.iterations <= 15, (info.iterations, info.message)
    tot = q.astype(np.float64).sum(0)
    assert tot[3] < 1e-6 * n and np.abs(tot - m).sum() / n <= 1e-6 * 1.01


def _saturated_problems():
    """(name, probs or logits kwargs, forget, pseudo, M, log P^ float64) of three feasible problems
    whose Hessian is nearly singular, so the capped Newton step is ~1e-10-1e-16 of its direction:
    saturated rows (logit scale 20, every class kept in M), one uniform row whose target puts 0.95
    on a class of 50 (Q = M), and a saturated model's totals as targets for uniform rows."""
    z = np.random.default_rng(17).standard_normal((17, 32)) * 20
    mx = z.max(1, keepdims=True)
    lp = z - mx - np.log(np.exp(z - mx).sum(1, keepdims=True))
    m = 0.7 * np.exp(lp).sum(0) + 0.3 * 17 / 32
    k = 50
    mb = np.full(k, 1e-3)
    mb[0] = 1.0
    mb /= mb.sum()
    # Every row forgotten (uniform), "original" targets of a saturated model (3 x 100).
    r = np.random.default_rng(2)
    z3 = r.standard_normal((3, 100)) * 20
    z3[np.arange(3), r.integers(0, 100, 3)] += 60
    p3 = np.exp(z3 - z3.max(1, keepdims=True))
    p3 /= p3.sum(1, keepdims=True)
    return [("saturated rows", dict(logits=z), [], "uniform", m, lp),
            ("one peaked target", dict(probs=np.full((1, k), 1.0 / k)), [], None, mb,
             np.full((1, k), -np.log(k))),
            ("all rows forgotten", dict(probs=p3), [0, 1, 2], "uniform", p3.sum(0),
             np.full((3, 100), -np.log(100)))]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", [0, 1, 2])
def test_newton_tries_a_capped_step_however_short_a_fraction(backend, dtype, case):
    """The line search goes below its floor of 1e-10 when the trust radius made its first trial
    smaller (a step must then gain g): that trial, capped at 100 logits, is 1e-10-1e-16 of the
    Newton direction here, and with the floor alone Newton stopped after 1-3 passes with "line
    search failed" and Q up to 0.29 from the optimum (found by fuzzing against the float64
    oracle)."""
    import warnings

    from oracle import oracle_solve

    name, x, forget, pseudo, m, lp = _saturated_problems()[case]
    x = {key: v.astype(dtype) for key, v in x.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = ppu_fast.refine(**x, forget_mask=forget, pseudo=pseudo, marginals=m,
                                  backend=backend, return_info=True)
    assert info.converged, (name, info.iterations, info.message)
    # The oracle is seeded with refine's alpha (it checks its own residual, to 1e-10).
    _, q_star = oracle_solve(lp, np.ones(lp.shape[0]), m, alpha0=info.alpha.numpy())
    err = float(np.abs(q.astype(np.float64) - q_star).max())
    assert err <= (1e-4 if dtype == np.float32 else 1e-5), (name, err)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_newton_solves_a_family_of_saturated_feasible_problems(backend):
    """30 fixed draws of :func:`solver_problems.saturated_family` in float64, Newton to tol 1e-9, each against
    the float64 oracle. Before the line search went below its floor, 86 of 200 draws like these
    stopped with "line search failed" (1-31 passes) on each backend."""
    import warnings

    from oracle import oracle_solve

    for seed in range(30):
        p, forget, pseudo, m, lp = saturated_family(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            q, info = ppu_fast.refine(p, forget, pseudo=pseudo, marginals=m, backend=backend,
                                      tol=1e-9, return_info=True)
        assert info.converged, (seed, p.shape, info.iterations, info.message)
        _, q_star = oracle_solve(lp, np.ones(p.shape[0]), m, tol=1e-11,
                                 alpha0=info.alpha.numpy())
        assert np.abs(q - q_star).max() <= 1e-6, seed


def test_a_failed_line_search_is_retried_with_the_exact_hessian(monkeypatch):
    """A line search that fails on the sampled Hessian is retried with the exact one before the
    solver gives up. (The zero-target solve above used to end that way in float32; with the
    balanced Laplacian it converges on the sample, so the failure is forced here: every
    direction taken from a sampled Hessian points downhill.)"""
    import warnings

    from ppu_fast import solver
    from ppu_fast.backends.cpu import CpuBackend

    p, forget, m = _zero_target_problem(8000)
    monkeypatch.setattr(solver, "STALL_RATIO", float("inf"))
    asked = []
    step = CpuBackend.step
    monkeypatch.setattr(CpuBackend, "step", lambda self, *a: asked.append(a[3]) or step(self, *a))
    direction = solver._newton_direction
    monkeypatch.setattr(solver, "_newton_direction",
                        lambda h, g: direction(h, g) * (1.0 if "exact" in asked else -1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = ppu_fast.refine(p.astype(np.float32), forget, marginals=m, backend="cpu",
                                  return_info=True)
    assert info.converged, info.message
    first = asked.index("exact")
    # after the failed line search (its halvings to MIN_STEP), not before, and never back
    assert first > 20 and all(h == "exact" for h in asked[first:])


def test_a_trial_within_tol_is_accepted_whatever_g_rounds_to():
    """A trial whose residual is within tol ends the solve: Q(alpha) is then the exact projection
    onto its own column sums, and g's float32 rounding has no say (a non-finite g still does)."""
    from ppu_fast import solver
    assert solver._accepted(g_n=-31.4, res_n=9e-7, g=0.0, res=6e-5, t=1.0, slope=1.0,
                            noise=30.6, tol=1e-6)
    assert not solver._accepted(g_n=-31.4, res_n=9e-7, g=0.0, res=6e-5, t=1.0, slope=1.0,
                                noise=30.6, tol=1e-7)
    assert not solver._accepted(g_n=float("nan"), res_n=0.0, g=0.0, res=6e-5, t=1.0, slope=1.0,
                                noise=30.6, tol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_identical_pseudo_rows_at_small_lam_converge_in_float32(backend):
    """150 uniform pseudo rows of weight 1 against retain rows of weight 1e-6: the rows' float32
    log Z round alike, so g's rounding moves by ~31 where its estimate said 30.6, and the trial
    that reached tol (residual 9e-7) was refused: 100 passes, residual 4.2e-5 (cpu backend; the
    torch backend's rounding stayed within the estimate). Converged now."""
    import warnings
    g = torch.Generator().manual_seed(0)
    n, k = 1500, 10
    lab = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), lab] += 30.0
    mask = torch.rand(n, generator=g) < 0.1
    p = torch.softmax(logits.double(), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = ppu_fast.refine(p.float(), mask, lam=1e-6, backend=backend, return_info=True)
    assert info.converged and info.iterations <= 40, (info.iterations, info.message)
    m = retain_marginals(p, mask)
    assert float((q.double().sum(0) - m).abs().sum()) / n <= 1e-6 * 1.01


def test_a_trial_that_more_than_doubles_the_residual_is_refused():
    """However much g gains, a Newton trial may not multiply the residual by more than
    RES_GROWTH_MAX (unless it reaches tol): Armijo alone let steps flip whole groups of retain
    rows and Newton wandered at residuals of ~1 for 100 passes."""
    from ppu_fast import solver
    big_gain = dict(g_n=1e6, g=0.0, t=1.0, slope=1.0, noise=1.0, tol=1e-6)
    assert solver._accepted(res_n=1.9e-2, res=1e-2, growth=2.0, **big_gain)
    assert not solver._accepted(res_n=2.1e-2, res=1e-2, growth=2.0, **big_gain)
    assert solver._accepted(res_n=2.1e-2, res=1e-2, **big_gain)  # sinkhorn: no cap
    assert solver._accepted(res_n=1e-7, res=1e-9, growth=2.0, **big_gain)  # within tol


def _log_residual_impls():
    """The solver's log-form right-hand side as it runs (C++ where _C is built) and its numpy
    twin, the specification."""
    from ppu_fast import solver
    return {"solver": solver._log_residual, "numpy": solver._log_residual_numpy}


@pytest.mark.parametrize("impl", ["solver", "numpy"])
def test_log_residual_against_its_formula(impl):
    """Newton's right-hand side on log-form equations, written out class by class: s log(s / M)
    within e^span of M, the tangent line of F = log beyond, grad where s or M is not positive;
    continuous at the span's ends, and grad to first order where s is near M."""
    import math
    import warnings
    from decimal import Decimal, localcontext

    from ppu_fast import solver
    log_residual = _log_residual_impls()[impl]
    span = solver.LOG_NEWTON_SPAN
    e = math.exp(span)
    m = np.array([3.0, 3.0, 3.0, 3.0, 0.0, 2.0, 1e-30, 5.0, 4.0, 1e-300])
    s = np.array([6.0, 3.0 * e * 10, 3.0 / e / 10, 0.0, 1.0, 2.0, 1e-20, 5.0 * (1 + 1e-9), 1.5,
                  1e10])  # the last: s / M overflows, and must neither warn nor leak inf
    grad = s - m

    def oracle(sj: float, mj: float) -> float:
        if sj <= 0 or mj <= 0:
            return sj - mj
        # the float inputs' logarithms to 40 digits (s within 1e-9 of M included)
        ln = Decimal(sj).ln() - Decimal(mj).ln()
        if abs(ln) <= span:
            return float(Decimal(sj) * ln)
        edge = mj * math.exp(math.copysign(span, float(ln)))  # where F's tangent line starts
        # F = +-span + (s - edge) / edge and F' = 1 / edge there: F / F', multiplied out
        return math.copysign(span, float(ln)) * edge + (sj - edge)

    with localcontext() as ctx:
        ctx.prec = 40
        want = [oracle(float(sj), float(mj)) for sj, mj in zip(s, m)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = log_residual(grad, m)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    assert got[5] == 0.0 and abs(got[7] / grad[7] - 1.0) < 1e-6
    for side in (e, 1.0 / e):  # the two pieces meet
        lo, hi = side * (1 - 1e-12), side * (1 + 1e-12)
        a, b = log_residual(np.array([lo - 1.0, hi - 1.0]), np.ones(2))
        assert abs(a - b) < 1e-9
    assert not np.shares_memory(got, grad)
    nan = log_residual(np.array([np.nan, 1.0, -np.inf]), np.array([1.0, np.nan, 2.0]))
    assert np.isnan(nan[0]) and nan[1] == 1.0 and nan[2] == -np.inf  # grad kept


def test_cpp_host_arithmetic_equals_its_numpy_twins():
    """The solver's host arithmetic in C++ (_C.log_residual, _C.pass_terms) against the numpy
    functions that specify it, on random k-vectors spanning the log form's pieces (s far above,
    near and far below M; M or s not positive): the log form to a few ulp (the same elementwise
    operations; numpy's SIMD log1p and libm's differ in the last bit), the pass terms to float64
    rounding (numpy's dot and pairwise sum add in another order) and against math.fsum."""
    import math

    from ppu_fast import solver
    from ppu_fast.backends.cpu import _C
    if _C is None:
        pytest.skip("ppu_fast._C is not built")
    rng = np.random.default_rng(7)
    for k in (2, 3, 10, 17, 100, 1000):
        m = rng.uniform(0.0, 50.0, k) * (rng.random(k) < 0.9)
        s = m * np.exp(rng.uniform(-6.0, 6.0, k)) * (rng.random(k) < 0.9)
        grad = s - m
        got = _C.log_residual(grad, m, solver.LOG_NEWTON_SPAN)
        want = solver._log_residual_numpy(grad, m)
        np.testing.assert_array_equal(got == 0.0, want == 0.0)
        np.testing.assert_allclose(got, want, rtol=8 * 2.0 ** -53, atol=0)
        alpha = rng.normal(0.0, 10.0, k)
        g2, am, amax, ares = _C.pass_terms(s, m, alpha)
        ng, nam, namax, nares = solver._pass_terms_numpy(s, m, alpha)
        np.testing.assert_array_equal(g2, ng)
        assert amax == namax
        scale = float(np.abs(alpha * m).sum())
        assert abs(am - math.fsum(alpha * m)) <= 4 * k * 2.0 ** -53 * scale
        assert abs(am - nam) <= 8 * k * 2.0 ** -53 * scale
        assert abs(ares - math.fsum(np.abs(ng))) <= 4 * k * 2.0 ** -53 * ares
    _, _, amax, _ = _C.pass_terms(np.ones(3), np.ones(3), np.array([1.0, np.nan, 2.0]))
    assert np.isnan(amax)  # as numpy's max: a NaN iterate must not look small
    with pytest.raises(ValueError, match="pass_terms: expected colsum, m and alpha"):
        _C.pass_terms(np.ones(3), np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="log_residual: expected grad"):
        _C.log_residual(np.ones(3), np.ones(2), 2.0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_newton_follows_a_class_total_that_must_grow_by_a_factor(backend):
    """Class unlearning on a confident model (20,000 x 10, margin 6, class 0 forgotten): the
    forgotten class's total must grow ~2.4x, along an exponential. Newton on the totals in log
    form takes the first step from 1.8e-2 to 2.9e-4 and ends after 3 steps; on the totals
    themselves it took 1.8e-2 -> 4.4e-3 and 4 steps."""
    y, p = confident_classifier(20_000, 10, seed=0)
    q, info = ppu_fast.refine(p, y == 0, backend=backend, return_info=True)
    assert info.converged and info.steps <= 3, (info.steps, info.history)
    assert info.history[1] <= 0.05 * info.history[0], info.history


@pytest.mark.parametrize("lam, weights, log_form", [
    (1.0, None, True), (0.01, None, True), (100.0, None, True), (0.009, None, False),
    (1e-6, None, False), (1.0, "ratio 50", True), (1.0, "ratio 200", False)])
def test_newton_takes_the_log_form_only_for_weights_within_a_factor_100(monkeypatch, lam,
                                                                         weights, log_form):
    """LOG_FORM_WEIGHT_RATIO: lam 0.01 and 100 are in (the float32 weights' ratio, 100.0000002,
    rounds past 100), 0.009 and per-row weights 200x apart are out."""
    from ppu_fast import solver
    calls = []
    real = solver._log_residual
    monkeypatch.setattr(solver, "_log_residual", lambda g, m: calls.append(1) or real(g, m))
    y, p = confident_classifier(3_000, 10, seed=2)
    w = None
    if weights is not None:
        w = torch.ones(3_000, dtype=torch.float64)
        w[:1000] = float(weights.split()[1])
    ppu_fast.refine(p, y == 0, lam=lam, weights=w, backend="cpu")
    assert bool(calls) == log_form


def test_a_log_direction_that_is_not_an_ascent_falls_back_to_plain_newton(monkeypatch):
    """With the log form's right-hand side pointing downhill (grad . d <= 0) every pass takes
    plain Newton's direction: the solve is the plain one, pass for pass."""
    from ppu_fast import solver
    y, p = confident_classifier(3_000, 10, seed=2)
    monkeypatch.setattr(solver, "LOG_FORM_WEIGHT_RATIO", 0.0)  # plain Newton throughout
    _, plain = ppu_fast.refine(p, y == 0, backend="cpu", return_info=True)
    monkeypatch.setattr(solver, "LOG_FORM_WEIGHT_RATIO", 100.0)
    monkeypatch.setattr(solver, "_log_residual", lambda g, m: -g)
    _, info = ppu_fast.refine(p, y == 0, backend="cpu", return_info=True)
    assert info.converged and info.history == plain.history


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_newton_on_an_imbalanced_model_at_lam_1e3(backend):
    """k = 40, 8 classes 100x rarer, logit margin 15, a random half forgotten, lam 1e-3: Armijo
    accepted steps that raised the residual 30x and Newton ended at 0.197 after 100 passes
    (float64 too); with the residual's growth capped, 31."""
    import warnings
    y, p = probe_classifier(2000, 40, 15.0, 1253, rare=(8, 100))
    forget = torch.rand(2000, generator=torch.Generator().manual_seed(1254)) < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = ppu_fast.refine(p, forget, lam=1e-3, backend=backend, return_info=True)
    assert info.converged and info.iterations <= 50, (info.iterations, info.message)
    m = retain_marginals(p, forget)
    assert float((q.double().sum(0) - m).abs().sum()) / 2000 <= 1e-6 * 1.01


@pytest.mark.parametrize("k,seed,marginals,backend,dtype", [
    (128, 3, "original", "cpu", torch.float32), (128, 3, "retain", "cpu", torch.float32),
    (129, 0, "retain", "cpu", torch.float32), (129, 3, "original", "cpu", torch.float32),
    (128, 3, "retain", "cpu", torch.float64), (129, 3, "original", "torch", torch.float32)])
def test_newton_keeps_common_classes_within_their_walls(k, seed, marginals, backend, dtype):
    """20,000 x k, the first k // 5 classes 100x rarer (0-2 retain rows each), logit margin 20,
    a random half forgotten, lam 1e-3: the rare classes' alphas must run ~1e4, the growing
    logit cap let the same steps move the common classes' alphas 50-100 logits apart (their
    retain rows flip at ~20), and Newton wandered for 100 passes (residual 2e-2 to 2e-1, float64
    too). With the cap shrinking after a step that raises the residual: 22-31 passes (float64
    and the torch reference alike)."""
    import warnings
    y, p = probe_classifier(20000, k, 20.0, 100 + seed, rare=(k // 5, 100))
    forget = torch.rand(20000, generator=torch.Generator().manual_seed(7 + seed)) < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = ppu_fast.refine(p.to(dtype), forget, lam=1e-3, marginals=marginals,
                                  backend=backend, return_info=True)
    assert info.converged and info.iterations <= 50, (info.iterations, info.message)
    p = p.to(dtype)
    m = p.double().sum(0) if marginals == "original" else retain_marginals(p, forget)
    assert float((q.double().sum(0) - m).abs().sum()) / 20000 <= 1e-6 * 1.01


@pytest.mark.parametrize("n,k,seed,marginals", [
    (20000, 128, 2, "original"), (10000, 200, 0, "retain"), (10000, 200, 2, "original")])
def test_newton_does_not_cycle_on_residual_rises_at_small_lam(n, k, seed, marginals):
    """The models above at lam 1e-4: a step taken whole grew the trust radius 8x, the next moved
    the common classes' alphas past their retain rows' walls and raised the residual 1.5-1.9x
    (under the former 2x cap), the radius shrank, the steps after undid it, and the cycle ran
    out of passes (residual 7e-2, 9e-2, 2e-1). Capped at 1.5x: 42, 40 and 65 passes."""
    import warnings
    y, p = probe_classifier(n, k, 20.0, 200 + seed, rare=(k // 5, 100))
    forget = torch.rand(n, generator=torch.Generator().manual_seed(17 + seed)) < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = ppu_fast.refine(p, forget, lam=1e-4, marginals=marginals, backend="cpu",
                                  return_info=True)
    assert info.converged and info.iterations <= 80, (info.iterations, info.message)
    m = p.double().sum(0) if marginals == "original" else retain_marginals(p, forget)
    assert float((q.double().sum(0) - m).abs().sum()) / n <= 1e-6 * 1.01


def test_line_search_interpolates_a_refused_step():
    """A trial that loses g far below its linear prediction is followed by the maximiser of the
    quadratic through g, the slope and the trial (clamped to [1/4, 1/2] of the step), not by a
    halving."""
    from ppu_fast import solver

    class Quadratic:  # g(a) = -50 a^2 + 10 a on one variable: maximiser 0.1, slope 10 at 0
        def __init__(self):
            self.passes, self.max_passes, self.g_noise, self.trials = 0, 100, 0.0, []

        def __call__(self, a, hessian=None):
            self.passes += 1
            self.trials.append(float(a[0]))
            g = -50.0 * a[0] ** 2 + 10.0 * a[0]
            grad = np.array([-100.0 * a[0] + 10.0])
            return grad, g, None, abs(grad[0])

    ev = Quadratic()
    out = solver._line_search(ev, np.zeros(1), np.ones(1), np.array([10.0]), 0.0, 10.0, 1.0,
                              interpolate=True)
    assert out is not None and ev.trials[0] == 1.0
    assert ev.trials[1] == 0.25  # the quadratic's 0.1, clamped to 1/4 of the step
    ev = Quadratic()
    out = solver._line_search(ev, np.zeros(1), np.ones(1), np.array([10.0]), 0.0, 10.0, 0.3,
                              interpolate=True)
    # within [0.075, 0.15]: the maximiser itself, accepted
    assert ev.trials[0] == 0.3 and ev.trials[1] == pytest.approx(0.1, rel=1e-12)
    assert out is not None and out[5] == ev.trials[1] and len(ev.trials) == 2
    ev2 = Quadratic()
    solver._line_search(ev2, np.zeros(1), np.ones(1), np.array([10.0]), 0.0, 10.0, 1.0)
    assert ev2.trials[:2] == [1.0, 0.5]


@pytest.mark.parametrize("backend,dtype,n", [("cpu", torch.float32, 2000),
                                             ("cpu", torch.float64, 2000),
                                             ("torch", torch.float32, 2000),
                                             ("cpu", torch.float32, 8000)])
def test_a_stalled_diagonal_newton_goes_on_with_the_dense_hessian(backend, dtype, n):
    """k = 129 (one above the dense Hessian's start), logit margin 20, "original" marginals,
    class unlearning at lam = 1: the diagonal Newton lost ~2 % a pass and stopped at 100 passes
    (residual 7e-6, float64 too), where k = 128 took 10; it now asks for the dense Hessian once
    it stalls (every row at 2,000 rows, a sample at 8,000)."""
    import warnings

    from ppu_fast.backends.base import Backend
    y, p = probe_classifier(n, 129, 20.0, 11)
    be = type(ppu_fast.backends.get_backend(backend, p))
    asked = []
    step = be.step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(be, "step", lambda self, *a: asked.append(a[3]) or step(self, *a))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            q, info = ppu_fast.refine(p.to(dtype), y == 0, marginals="original",
                                      backend=backend, return_info=True)
    assert issubclass(be, Backend)
    assert info.converged and info.iterations <= 20, (info.iterations, info.message)
    assert asked[0] == "diag" and True in asked
    m = p.double().sum(0)
    assert float((q.double().sum(0) - m).abs().sum()) / n <= 1e-6 * 1.01


def test_a_failed_diagonal_line_search_goes_on_with_the_dense_hessian(monkeypatch):
    """The line search of a diagonal Newton failing (forced: every direction from a diagonal
    points downhill) is retried with the dense Hessian, not reported as a failure."""
    import warnings

    from ppu_fast import solver
    y, p = probe_classifier(2000, 129, 20.0, 11)
    direction = solver._newton_direction
    monkeypatch.setattr(solver, "_newton_direction",
                        lambda h, g: direction(h, g) * (-1.0 if h.ndim == 1 else 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = ppu_fast.refine(p, y == 0, marginals="original", backend="cpu",
                                  return_info=True)
    assert info.converged, info.message
