"""Bad input: a clear error naming the argument, and the caller's tensors untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ppu_fast


@pytest.fixture
def problem(small_problem):
    p, mask = small_problem
    return p.clone(), mask.clone()


def call_and_check_unchanged(fn, *tensors):
    before = [t.clone() for t in tensors]
    try:
        return fn()
    finally:
        for b, t in zip(before, tensors):
            assert torch.equal(b, t) or (torch.isnan(b).any() and torch.equal(b.isnan(), t.isnan())), \
                "an input tensor was modified"


def bad(p, i, value):
    p = p.clone()
    p[i] = value
    return p


@pytest.mark.parametrize("make,match", [
    (lambda p: bad(p, (7, 1), float("nan")), r"probs: row 7 contains NaN or Inf"),
    (lambda p: bad(p, (9, 0), float("inf")), r"probs: row 9 contains NaN or Inf"),
    (lambda p: bad(p, (4, 2), -0.1), r"probs: row 4 has a negative entry"),
    (lambda p: bad(p, 11, p[11] * 1.01), r"probs: row 11 sums to 1.01.*simplex"),
    (lambda p: p[:0], r"probs: N == 0"),
    (lambda p: p[0], r"probs: expected a 2-D"),
])
def test_bad_probs(problem, make, match):
    p, mask = problem
    x = make(p)
    m = mask[: x.shape[0]] if x.dim() == 2 else mask
    with pytest.raises(ValueError, match=match):
        call_and_check_unchanged(lambda: ppu_fast.refine(x, m), x)


def test_bad_logits(problem):
    p, mask = problem
    lg = torch.randn(p.shape)
    lg[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"logits: row 3 contains NaN"):
        call_and_check_unchanged(lambda: ppu_fast.refine(logits=lg, forget_mask=mask), lg)


def test_probs_and_logits_exclusive(problem):
    p, mask = problem
    with pytest.raises(ValueError, match="exactly one.*both"):
        ppu_fast.refine(p, mask, logits=torch.log(p))
    with pytest.raises(ValueError, match="exactly one.*neither"):
        ppu_fast.refine(forget_mask=mask)


@pytest.mark.parametrize("mask,exc,match", [
    (torch.zeros(10, dtype=torch.bool), ValueError, r"forget_mask: bool mask has length 10; expected N = 300"),
    (torch.tensor([0, 300]), ValueError, r"forget_mask: row index 300 is out of range"),
    (torch.tensor([0.0, 1.0]), TypeError, r"forget_mask: expected bool or integer"),
    (torch.zeros(3, 3, dtype=torch.bool), ValueError, r"forget_mask: expected 1-D"),
])
def test_bad_mask(problem, mask, exc, match):
    p, _ = problem
    with pytest.raises(exc, match=match):
        call_and_check_unchanged(lambda: ppu_fast.refine(p, mask), p, mask)


def test_missing_mask(problem):
    p, _ = problem
    with pytest.raises(ValueError, match="forget_mask: required"):
        ppu_fast.refine(p)


@pytest.mark.parametrize("pseudo,exc,match", [
    ("gaussian", ValueError, r"pseudo: unknown name 'gaussian'.*uniform.*random.*prior"),
    (torch.full((29, 5), 0.2), ValueError, r"pseudo: shape \(29, 5\); expected \(N_forget, k\) = \(30, 5\)"),
    (torch.full((30, 5), 0.3), ValueError, r"pseudo: row 0 sums to 1.5"),
    (torch.ones(30, 5, dtype=torch.long), TypeError, r"pseudo: expected a floating-point"),
])
def test_bad_pseudo(problem, pseudo, exc, match):
    p, mask = problem
    with pytest.raises(exc, match=match):
        call_and_check_unchanged(lambda: ppu_fast.refine(p, mask, pseudo=pseudo), p, mask)


@pytest.mark.parametrize("marg,match", [
    ("balanced", r"marginals: unknown name 'balanced'.*retain.*original"),
    (torch.full((4,), 75.0), r"marginals: shape \(4,\); expected \(5,\)"),
    (torch.tensor([100.0, 100.0, 100.0, 100.0, -100.0]), r"marginals: class 4 is negative"),
    (torch.full((5,), 61.0), r"marginals: sum to 305; expected N = 300"),
    (torch.tensor([60.0, 60.0, float("nan"), 60.0, 60.0]), r"marginals: class 2 is NaN"),
])
def test_bad_marginals(problem, marg, match):
    p, mask = problem
    with pytest.raises(ValueError, match=match):
        call_and_check_unchanged(lambda: ppu_fast.refine(p, mask, marginals=marg), p, mask)


def test_infeasible_marginals_name_the_class(problem):
    p, mask = problem
    p = p.clone()
    p[:, 3] = 0.0
    p = p / p.sum(1, keepdim=True)
    pseudo = p[mask].clone()  # pseudo rows also give class 3 nothing
    with pytest.raises(ValueError, match=r"marginals: infeasible: class 3"):
        ppu_fast.refine(p, mask, pseudo=pseudo, marginals=torch.full((5,), 60.0))


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf"), 1e-31, 1e31])
def test_bad_lam(problem, lam):
    p, mask = problem
    with pytest.raises(ValueError, match=r"lam: expected a finite number in \[1e-30, 1e\+30\]"):
        ppu_fast.refine(p, mask, lam=lam)


@pytest.mark.parametrize("lam", ["1", True, None, [1.0]])
def test_lam_of_the_wrong_type(problem, lam):
    p, mask = problem
    with pytest.raises(TypeError, match="lam: expected a real number"):
        ppu_fast.refine(p, mask, lam=lam)


def test_unknown_method_and_backend(problem):
    p, mask = problem
    with pytest.raises(ValueError, match=r"method: unknown 'lbfgs'.*newton.*sinkhorn.*gradient"):
        ppu_fast.refine(p, mask, method="lbfgs")
    with pytest.raises(ValueError, match=r"backend: unknown name 'jax'.*torch"):
        ppu_fast.refine(p, mask, backend="jax")


def test_bad_tol_and_max_iter(problem):
    p, mask = problem
    with pytest.raises(ValueError, match="tol: expected a finite number > 0"):
        ppu_fast.refine(p, mask, tol=0)
    with pytest.raises(ValueError, match="max_iter: expected an integer >= 1"):
        ppu_fast.refine(p, mask, max_iter=0)
    with pytest.raises(ValueError, match="step_size: expected a finite number > 0"):
        ppu_fast.refine(p, mask, method="gradient", step_size=-1.0)


def test_wrong_types(problem):
    p, mask = problem
    with pytest.raises(TypeError, match="probs: expected a torch.Tensor or numpy.ndarray, got list"):
        ppu_fast.refine(p.tolist(), mask)
    with pytest.raises(TypeError, match="probs: expected a floating-point dtype"):
        ppu_fast.refine(torch.ones(3, 2, dtype=torch.long), torch.tensor([0]))


@pytest.mark.parametrize("scale, row", [(1e308, 3), (1e-320, 3), (1e251, 0), (1e-251, 39)])
def test_weights_beyond_the_absolute_range_are_refused(scale, row):
    """alpha comes back as alpha_solver * min(c): at weights of 1e308 it overflowed to -inf,
    at 1e-320 it kept a few digits (targets then missed M by 9e-6); both were "converged"."""
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(5), size=40))
    m = np.array([0.5, 0.5, 0.5, 0.5, 38.0])
    w = np.full(40, 1e240 if scale > 1 else 1e-240)  # within 1e30 of each other but row's
    w[row] = scale
    with pytest.raises(ValueError, match=rf"weights: row {row} has weight .*; expected weights "
                                         r"in \[1e-250, 1e\+250\] \(Q depends only on"):
        ppu_fast.solve(lp, w, m)
    p = np.exp(lp)
    with pytest.raises(ValueError, match=rf"weights: row {row} has weight"):
        ppu_fast.refine(p, [1, 2], weights=w)
    w = np.full(40, scale)
    with pytest.raises(ValueError, match=r"weights: row 0 has weight"):
        ppu_fast.solve(lp, w, m)
    alpha, info = ppu_fast.solve(lp, w / w.max(), m)  # the advice works
    assert info.converged and np.isfinite(alpha).all()


def test_solve_bad_inputs():
    lp = torch.log_softmax(torch.randn(50, 4), 1)
    w = torch.ones(50)
    m = torch.full((4,), 12.5)
    with pytest.raises(ValueError, match=r"weights: row 2 has weight 0"):
        ppu_fast.solve(lp, w.index_fill(0, torch.tensor([2]), 0.0), m)
    with pytest.raises(ValueError, match=r"weights: shape \(49,\); expected \(50,\)"):
        ppu_fast.solve(lp, w[:49], m)
    bad = lp.clone()
    bad[5] = float("-inf")
    with pytest.raises(ValueError, match=r"log_p: row 5 is entirely -inf"):
        ppu_fast.solve(bad, w, m)
    bad = lp.clone()
    bad[6, 1] = float("inf")
    with pytest.raises(ValueError, match=r"log_p: row 6 contains NaN or \+Inf"):
        ppu_fast.solve(bad, w, m)
    with pytest.raises(ValueError, match=r"alpha: shape \(3,\); expected \(4,\)"):
        ppu_fast.targets(lp, w, torch.zeros(3))


def test_vector_arguments_refuse_complex_values_and_text():
    # Cast to float64 these would lose the imaginary part (at most torch's warn-once message,
    # which names no argument) or read '1' as 1.
    lp = torch.log_softmax(torch.randn(20, 4), 1)
    w, m = np.ones(20), np.full(4, 5.0)
    wc = w.astype(complex)
    wc[3] += 5j
    mc = m.astype(complex)
    mc[0] += 7j
    for call, name in [(lambda: ppu_fast.solve(lp, wc, m), "weights"),
                       (lambda: ppu_fast.solve(lp, w, mc), "marginals"),
                       (lambda: ppu_fast.solve(lp, torch.from_numpy(wc), m), "weights"),
                       (lambda: ppu_fast.refine(lp.exp(), [0], marginals=list(mc)), "marginals"),
                       (lambda: ppu_fast.targets(lp, w, np.zeros(4, complex)), "alpha"),
                       (lambda: ppu_fast.solve(lp, ["1"] * 20, m), "weights"),
                       (lambda: ppu_fast.solve(lp, w, [5.0, 5.0, 5.0, "5"]), "marginals")]:
        with pytest.raises(TypeError, match=rf"^{name}: "):
            call()
    # Numbers of any real kind still are numbers.
    alpha, info = ppu_fast.solve(lp, [1] * 20, [5, 5.0, np.float32(5), True * 5])
    assert info.converged


def test_inputs_unchanged_after_successful_refine(problem):
    p, mask = problem
    pseudo = torch.softmax(torch.randn(30, 5), 1)
    m = torch.full((5,), 60.0)
    before = [t.clone() for t in (p, mask, pseudo, m)]
    ppu_fast.refine(p, mask, pseudo=pseudo, marginals=m)
    for b, t in zip(before, (p, mask, pseudo, m)):
        assert torch.equal(b, t)
    lg = torch.randn(300, 5)
    lg0 = lg.clone()
    ppu_fast.refine(logits=lg, forget_mask=mask)
    assert torch.equal(lg, lg0)


def test_bad_out(problem):
    p, mask = problem
    with pytest.raises(ValueError, match=r"out: expected shape \(300, 5\), dtype torch.float32"):
        ppu_fast.refine(p, mask, out=torch.empty(300, 4))
    with pytest.raises(ValueError, match=r"out: expected .*dtype torch.float32.*got .*float64"):
        ppu_fast.refine(p, mask, out=torch.empty(300, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="out: expected a torch.Tensor like the input, got ndarray"):
        ppu_fast.refine(p, mask, out=np.empty((300, 5), np.float32))
    big = torch.empty(301, 5)
    big[:300] = p
    with pytest.raises(ValueError, match="out: overlaps the input without being it"):
        call_and_check_unchanged(lambda: ppu_fast.refine(big[:300], mask, out=big[1:]), big)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("levels", [(1.0, 1.0), (1e-8, 1.0), (1.0, 1e-30), (3e-39, 1e30),
                                    (-0.0, 0.0)])
def test_two_levels_selects_exactly(dtype, levels):
    """The weights' bit-pattern select equals np.where bit for bit, for any pair of levels
    (subnormal, signed zero, equal) and masks that are empty, full or random."""
    from ppu_fast.problem import two_levels
    lv = np.array(levels, dtype=dtype)
    rng = np.random.default_rng(0)
    for mask in (np.zeros(7, bool), np.ones(7, bool), rng.random(1001) < 0.3, np.zeros(0, bool)):
        got = two_levels(mask, lv)
        want = np.where(mask, lv[1], lv[0]).astype(dtype)
        assert got.dtype == dtype and got.shape == mask.shape
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_refine_weights_follow_the_mask_with_lam():
    """lam != 1 gives the retain and forget rows different weights: refine's Q equals the one
    from the same weights passed explicitly (c_i = lam on retain rows, 1 on forget rows)."""
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(300, 5, generator=g) * 2, 1)
    f = torch.rand(300, generator=g) < 0.2
    q1 = ppu_fast.refine(p, f, lam=0.25)
    w = torch.where(f, 1.0, 0.25)
    q2 = ppu_fast.refine(p, f, weights=w)
    torch.testing.assert_close(q1, q2, rtol=1e-5, atol=1e-6)


def test_labels_passed_as_forget_mask_are_refused(problem, tmp_path):
    """An integer vector of length N that repeats an index is per-row data (class labels, a 0/1/2
    mask) passed by mistake: read as row indices, labels 0..2 forgot rows 0, 1 and 2 only and
    the call went on silently. refine and refine_file both refuse it; N distinct indices (every
    row, in any order) and shorter index lists with repeats are read as before."""
    from ppu_fast.problem import forget_rows

    p, _ = problem
    n = p.shape[0]
    labels = torch.arange(n) % 3
    match = (rf"forget_mask: an integer vector of length N = {n} that repeats row 0 \(100 times\) "
             r"looks like per-row labels or a mask, not row indices; expected a bool mask of "
             r"length N \(e\.g\. labels == c\) or distinct row indices")
    for lab in (labels, labels.int(), labels.numpy(), labels.tolist()):
        with pytest.raises(ValueError, match=match):
            call_and_check_unchanged(lambda: ppu_fast.refine(p, lab), p)
    np.save(tmp_path / "p.npy", p.numpy())
    # refine_file's argument is called forget
    with pytest.raises(ValueError, match="^forget: " + match[len("forget_mask: "):]):
        ppu_fast.refine_file(tmp_path / "p.npy", labels.numpy(), tmp_path / "q.npy")
    with pytest.raises(ValueError, match=r"length N = 100 that repeats row 0 \(34 times\)"):
        ppu_fast.refine_file(tmp_path / "p.npy", labels.numpy()[:100], tmp_path / "q.npy",
                             rows=(0, 100))
    assert not (tmp_path / "q.npy").exists()
    # -1 and N - 1 are one row: N indices naming it twice repeat it.
    wrapped = torch.arange(n)
    wrapped[0] = -1
    with pytest.raises(ValueError, match=rf"repeats row {n - 1} \(2 times\)"):
        ppu_fast.refine(p, wrapped)
    assert forget_rows(torch.randperm(n), n).all()
    # Shorter lists may repeat an index (the row is forgotten once), as documented.
    np.testing.assert_array_equal(forget_rows(torch.tensor([3, 3, 5]), n),
                                  forget_rows(torch.tensor([3, 5]), n))
    assert torch.equal(ppu_fast.refine(p, torch.tensor([3, 3, 5, 7])),
                       ppu_fast.refine(p, torch.tensor([3, 5, 7])))


def test_marginals_no_set_of_rows_can_carry_are_refused():
    # Each class alone passes the count checks (at most the rows that give it probability, at
    # least the rows that give it alone), but classes {0, 1} must get at least 2 (rows 0 and 1
    # give nothing else) and {2, 3} at most 3: the solver stalled at residual 0.4 and only warned.
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5],
                              [.25] * 4]))
    bad = np.array([0.5, 0.5, 2.0, 2.0])
    floor = r"smallest residual .* reaches is 0.4, above tol 1e-06"
    with pytest.raises(ValueError, match=r"marginals: infeasible marginals: .*" + floor):
        ppu_fast.solve(lp, np.ones(5), bad)
    with pytest.raises(ValueError, match=r"marginals: infeasible marginals: .*" + floor):
        ppu_fast.refine(np.exp(lp), [4], pseudo=None, marginals=bad)
    # On the boundary (row 4 must give {0, 1} nothing) and inside: solved.
    for good in ([1.0, 1.0, 1.5, 1.5], [1.2, 1.2, 1.3, 1.3]):
        _, info = ppu_fast.solve(lp, np.ones(5), np.array(good))
        assert info.converged
