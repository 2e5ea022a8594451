"""Behaviour no test pinned down before a mutation test of the core (2026-12-06): each of these
passes on the code and fails on a one-line change that an earlier suite let through (a k == 1
refine that left out= unfilled, out= the transposed input accepted, info.dual_value off the
dual's definition, boundary off-by-ones in the checks)."""
import numpy as np
import pytest
import torch

import ppu_fast
from backend_cases import classifier_probs
from ppu_fast.solver import ConvergenceWarning


def _problem(n=400, k=5, seed=0, margin=3.0, dtype=torch.float32):
    return classifier_probs(n, k, margin, seed, dtype)


def test_marginals_off_by_5e_6_of_n_are_refused():
    p, labels = _problem(n=300)
    m = torch.full((5,), 60.0, dtype=torch.float64)
    m[0] += 300 * 5e-6  # 5e-6 relative: above MARGINAL_RTOL
    with pytest.raises(ValueError, match="marginals: sum to"):
        ppu_fast.refine(p, labels == 0, marginals=m)


def test_a_repeated_index_with_pseudo_rows_is_named():
    p, _ = _problem(n=50)
    with pytest.raises(ValueError, match="forget_mask: row 3 is listed more than once"):
        ppu_fast.refine(p, [3, 3, 9], pseudo=torch.full((3, 5), 0.2))


def test_an_out_that_requires_grad_is_refused():
    p, labels = _problem(n=300)
    with pytest.raises(ValueError, match="out: a tensor that requires grad"):
        ppu_fast.refine(p, labels == 0, out=torch.empty(300, 5, requires_grad=True))


def test_an_out_sharing_only_the_last_element_is_refused():
    flat = torch.empty(2 * 300 * 5 - 1)
    p, labels = _problem(n=300)
    x = flat[:1500].view(300, 5)
    x.copy_(p)
    out = flat[1499:].view(300, 5)
    with pytest.raises(ValueError, match="out: overlaps the input without being it"):
        ppu_fast.refine(x, labels == 0, out=out)


def test_a_non_monotone_stop_returns_the_best_iterate():
    p, labels = _problem(n=2000, k=10, seed=5, margin=30.0)
    with pytest.warns(ConvergenceWarning):
        q, info = ppu_fast.refine(p, labels == 0, marginals="original", method="gradient",
                                  step_size=1.0, max_iter=25, return_info=True)
    assert info.residual == min(info.history) < info.history[-1]


def test_k1_fills_out():
    p = torch.ones(20, 1)
    out = torch.full((20, 1), 7.0)
    q = ppu_fast.refine(p, [0, 3], out=out)
    assert q is out and torch.equal(out, torch.ones(20, 1))


def test_dual_value_in_the_callers_scale():
    p, labels = _problem(n=400)
    mask = labels == 1
    _, i1 = ppu_fast.refine(p.double(), mask, lam=0.01, return_info=True, tol=1e-10)
    # g(alpha) = -sum_i c_i log Z_i - alpha.M, c = lam (retain), 1 (forget), in the caller's scale
    lp = torch.log(p.double() / p.double().sum(1, keepdim=True))
    lp[mask] = float(np.float32(-np.log(5.0)))  # the uniform pseudo row, stored in float32
    c = torch.where(mask, 1.0, 0.01).double()
    a = i1.alpha
    x = lp - a[None, :] / c[:, None]
    m = p.double()[~mask].sum(0) * 400 / int((~mask).sum())
    g = float(-(c * torch.logsumexp(x, 1)).sum() - a @ m)
    assert i1.dual_value == pytest.approx(g, rel=1e-6, abs=1e-6)


def test_rows_past_the_end_are_refused(tmp_path):
    p, labels = _problem(n=100)
    np.save(tmp_path / "p.npy", p.numpy())
    with pytest.raises(ValueError, match="rows: \\(0, 101\\) is not a range"):
        ppu_fast.refine_file(tmp_path / "p.npy", [], tmp_path / "q.npy", rows=(0, 101),
                             progress=False)


def test_torch_backend_names_a_row_in_a_later_chunk():
    p, labels = _problem(n=300)
    p[250, 0] = float("nan")
    from ppu_fast.backends.torch_ref import TorchBackend
    out = torch.empty_like(p)
    got = TorchBackend(chunk_elems=50 * 5).prepare(p, "probs", None, None, out)
    assert got.error is not None and got.error[1] == 250


def test_solve_refuses_an_unsupported_class_up_front():
    p, _ = _problem(n=300)
    lp = torch.log(p)
    lp[:, 2] = float("-inf")
    m = torch.tensor([70.0, 70.0, 20.0, 70.0, 70.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="marginals: infeasible: class 2 has target total 20"):
        ppu_fast.solve(lp, torch.ones(300), m)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_k1_keeps_the_input_dtype(dtype):
    q = ppu_fast.refine(torch.ones(20, 1, dtype=dtype), [0, 3])
    assert q.dtype == dtype


def test_k1_numpy_out_is_returned():
    o = np.zeros((20, 1), np.float32)
    q = ppu_fast.refine(np.ones((20, 1), np.float32), [0, 3], out=o)
    assert q is o and (o == 1).all()


def test_out_the_transposed_input_is_refused():
    p, _ = _problem(n=5, k=5)
    x = p.clone()
    with pytest.raises(ValueError, match="out: overlaps the input without being it"):
        ppu_fast.refine(x, [0], out=x.t())


def test_float64_random_pseudo_meets_a_tight_tol():
    p, labels = _problem(n=2000, k=10, seed=3)
    q, info = ppu_fast.refine(p.double(), labels == 2, pseudo="random", marginals="pseudo",
                              tol=1e-12, generator=torch.Generator().manual_seed(0),
                              return_info=True)
    assert info.converged


def test_refine_file_k1_writes_ones(tmp_path):
    np.save(tmp_path / "p.npy", np.ones((30, 1), np.float32))
    ppu_fast.refine_file(tmp_path / "p.npy", [0, 5], tmp_path / "q.npy", progress=False)
    assert (np.load(tmp_path / "q.npy") == 1).all()


def test_solve_alpha_does_not_alias_info():
    p, _ = _problem(n=300)
    alpha, info = ppu_fast.solve(np.log(p.numpy()), np.ones(300), np.full(5, 60.0))
    before = info.alpha.clone()
    alpha[:] = 0
    assert torch.equal(info.alpha, before)


def _dual(lp, c, a, m):
    x = lp - a[None, :] / c[:, None]
    return float(-(c * torch.logsumexp(x, 1)).sum() - a @ m)


def test_prior_dual_value():
    p, labels = _problem(n=400)
    mask = labels == 1
    p = p.double() / p.double().sum(1, keepdim=True)
    q, info = ppu_fast.refine(p, mask, pseudo="prior", marginals="original", return_info=True)
    prior = p[~mask].mean(0)
    lp = torch.log(p)
    lp[mask] = torch.log(prior)
    c = torch.ones(400, dtype=torch.float64)
    assert info.dual_value == pytest.approx(_dual(lp, c, info.alpha, p.sum(0)), rel=1e-6, abs=1e-6)


def test_torch_backend_dual_value_matches_cpu():
    p, labels = _problem(n=400)
    p = p.double() * 1.0005  # rows sum to 1.0005: within the row-sum tolerance
    mask = labels == 1
    _, a = ppu_fast.refine(p, mask, backend="torch", return_info=True, tol=1e-9)
    _, b = ppu_fast.refine(p, mask, backend="cpu", return_info=True, tol=1e-9)
    assert a.dual_value == pytest.approx(b.dual_value, rel=1e-7, abs=1e-7)
