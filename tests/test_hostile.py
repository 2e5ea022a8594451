"""Inputs a hostile or careless caller passes: each gives the right answer or a clear error, never a
silent wrong one. Right answers are judged against the float64 oracle (tests/oracle.py), never
against ppu_fast itself."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ppu_fast
from backend_cases import classifier_probs
from oracle import oracle_refine, oracle_solve
from ppu_fast.solver import ConvergenceWarning

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["cpu", "torch"]


def _problem(n=400, k=5, seed=0, margin=3.0, dtype=torch.float32):
    return classifier_probs(n, k, margin, seed, dtype)


def _residual(q, m):
    q = torch.as_tensor(q).double()
    return float((q.sum(0) - torch.as_tensor(m).double()).abs().sum()) / q.shape[0]


# -- defect 1: what counts as a mask ----------------------------------------------------------------

def test_bool_masks_in_every_form_forget_the_same_rows():
    p, labels = _problem()
    mask = labels == 2
    expected = ppu_fast.refine(p, mask)
    for form in (mask.tolist(), tuple(mask.tolist()), mask.numpy(),
                 [bool(v) for v in mask.numpy()], list(mask.numpy())):  # np.bool_ elements too
        assert torch.equal(ppu_fast.refine(p, form), expected), type(form)


@pytest.mark.parametrize("make", [lambda m: m.to(torch.uint8), lambda m: m.long(),
                                  lambda m: m.int().numpy(), lambda m: m.numpy().astype(np.uint8),
                                  lambda m: [int(v) for v in m]])
def test_an_integer_0_1_vector_of_length_n_is_refused_as_ambiguous(make):
    p, labels = _problem()
    with pytest.raises(ValueError, match=r"forget_mask: an integer vector of length N = 400 "
                                         r"holding only 0 and 1 is ambiguous.*mask\.bool\(\).*"
                                         r"nonzero"):
        ppu_fast.refine(p, make(labels == 2))


def test_integer_indices_stay_indices_and_negative_ones_count_from_the_end():
    p, labels = _problem()
    idx = torch.nonzero(labels == 2).flatten()
    mask = labels == 2
    expected = ppu_fast.refine(p, mask)
    assert torch.equal(ppu_fast.refine(p, idx), expected)
    assert torch.equal(ppu_fast.refine(p, idx.tolist()), expected)
    assert torch.equal(ppu_fast.refine(p, (idx - 400).numpy()), expected)  # [-N, 0)
    assert torch.equal(ppu_fast.refine(p, [0, 1]), ppu_fast.refine(p, [-400, -399]))
    with pytest.raises(ValueError, match=re.escape("expected indices in [-400, 400) (negative")):
        ppu_fast.refine(p, [-401])


@pytest.mark.parametrize("bad,err,msg", [
    ([True, 1, 0], TypeError, "mixing bools and integers"),
    ([0.5, 2], TypeError, "a sequence element is float"),
    # An element neither bool nor int is named, also beside bools (it was "mixing bools and
    # integers" with no integer there: a pandas boolean Series holding pd.NA, None, 0.5).
    ([True, False, None], TypeError, r"a sequence element is NoneType \(None\)"),
    ([True, 0.5], TypeError, r"a sequence element is float \(0.5\)"),
    ("0,1", TypeError, "forget_mask: expected a bool mask"),
    (3, TypeError, "forget_mask: expected a bool mask"),
    # A mapping was read by its keys: {0: False, 3: True} forgot rows 0 and 3.
    ({0: False, 3: True}, TypeError, "forget_mask: expected a bool mask .* got dict"),
    (np.ma.array([True, False, True], mask=[0, 0, 1]), ValueError,
     r"forget_mask: a masked array with masked entries \(the first at \(2,\)\)"),
])
def test_malformed_masks(bad, err, msg):
    p, _ = _problem()
    with pytest.raises(err, match=msg):
        ppu_fast.refine(p, bad)


# -- defect 2: autograd inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_requiring_grad_give_plain_targets(backend):
    p, labels = _problem()
    mask = labels == 1
    expected = ppu_fast.refine(p, mask, backend=backend)
    for kw in ({"probs": p.clone().requires_grad_()},
               {"logits": torch.log(p).clone().requires_grad_()}):
        leaf = next(iter(kw.values()))
        q = ppu_fast.refine(forget_mask=mask, backend=backend, **kw)
        assert not q.requires_grad and q.grad_fn is None
        assert torch.allclose(q, expected, atol=1e-6)
        assert leaf.grad is None
    pseudo = torch.full((int(mask.sum()), 5), 0.2, requires_grad=True)
    m = (p[~mask].double().sum(0) * 400 / int((~mask).sum())).requires_grad_()
    q = ppu_fast.refine(p, mask, pseudo=pseudo, marginals=m, backend=backend)
    assert not q.requires_grad and torch.allclose(q, expected, atol=1e-6)
    lp = torch.log(p).requires_grad_()
    w = torch.ones(400, requires_grad=True)
    alpha, _ = ppu_fast.solve(lp, w, m, backend=backend)
    q2 = ppu_fast.targets(lp, w, alpha.requires_grad_(), backend=backend)
    assert not alpha.grad_fn and not q2.requires_grad


# -- defect 3: lam over its whole range, weights of any scale ---------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [1e-30, 1e-12, 1e-8, 1e-6, 1e-2, 1e2, 1e8, 1e30])
@pytest.mark.parametrize("scenario", ["class", "selective"])
def test_refine_is_right_for_every_lam(backend, lam, scenario):
    p, labels = _problem(seed=1)
    mask = (labels == 0) if scenario == "class" else (torch.arange(400) % 37 == 0)
    q, info = ppu_fast.refine(p, mask, lam=lam, backend=backend, tol=1e-7, return_info=True)
    assert info.converged
    alpha, q_ora = oracle_refine(p, mask.numpy(), lam=lam)
    assert np.abs(q.double().numpy() - q_ora).max() <= 2e-5
    # info.alpha is the caller's alpha: targets() with the same weights reproduces Q.
    c = torch.where(mask, torch.tensor(1.0, dtype=torch.float64), lam)
    q_t = ppu_fast.targets(torch.log(p).masked_fill(mask[:, None], -np.log(5.0)), c, info.alpha,
                           backend=backend)
    assert torch.allclose(q_t, q, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [1e-8, 1e-4])
def test_newton_when_the_heavy_forget_rows_must_move(backend, lam):
    """Class unlearning, "retain" targets, a confident model and a tiny lam: the retain rows give
    the forgotten class nothing to take back, so the forget rows (weight 1 >> lam) must move, at
    alpha ~ 1 / lam, while the other alphas differ by O(1). (Newton stopped at residual 7e-3 when
    the line search capped every step at 100 logits of the lightest rows, and the float32 shift
    lost the O(1) differences next to 1e9.)"""
    p, labels = _problem(n=1000, k=10, seed=2, margin=8.0)
    mask = labels == 0
    q, info = ppu_fast.refine(p, mask, lam=lam, backend=backend, tol=1e-7, return_info=True)
    assert info.converged and info.iterations <= 60
    _, q_ora = oracle_refine(p, mask.numpy(), lam=lam)
    assert np.abs(q.double().numpy() - q_ora).max() <= 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-200, 1.0, 1e200])
def test_solve_with_weights_of_any_scale_and_a_wide_ratio(backend, scale):
    p, labels = _problem(seed=2)
    lp = torch.log(p)
    g = torch.Generator().manual_seed(3)
    c = torch.exp(torch.rand(400, generator=g, dtype=torch.float64) * np.log(1e20)) * scale
    m = p.double().sum(0) * 0.5 + 0.5 * 80.0
    m = m * 400 / m.sum()
    alpha, info = ppu_fast.solve(lp, c, m, backend=backend, tol=1e-7)
    a_ora, q_ora = oracle_solve(lp, c, m)
    q = ppu_fast.targets(lp, c, alpha, backend=backend)
    assert info.converged and np.abs(q.double().numpy() - q_ora).max() <= 2e-5
    assert np.allclose(alpha.numpy(), a_ora - a_ora.mean(), rtol=1e-3,
                       atol=1e-6 * float(np.abs(a_ora).max()))


def test_weights_beyond_the_representable_ratio_are_refused():
    p, _ = _problem()
    c = torch.ones(400, dtype=torch.float64)
    c[0] = 1e31
    with pytest.raises(ValueError, match=r"weights: max / min = 1e\+31; expected at most 1e\+30"):
        ppu_fast.solve(torch.log(p), c, torch.full((5,), 80.0))


# -- defect 4: infeasible marginals -----------------------------------------------------------------

def _sparse_probs():
    """Probabilities with exact zeros: only rows 0-9 give class 2 any probability, and rows 10-59
    give it to class 0 alone."""
    p, _ = _problem(n=200, k=3, seed=4, dtype=torch.float64)
    p[10:, 2] = 0.0
    p[10:60] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    return (p / p.sum(1, keepdim=True)).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_class_total_above_its_support_raises_infeasible(backend):
    p = _sparse_probs()
    m = torch.tensor([80.0, 70.0, 50.0])  # class 2: at most 10 rows can carry it
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the error comes before any warning
        with pytest.raises(ValueError, match=r"marginals: infeasible marginals: class 2 has "
                                             r"target total 50 but only 10 rows.*M_2 <= 10"):
            ppu_fast.refine(p, [], marginals=m, backend=backend)
        with pytest.raises(ValueError, match=r"infeasible marginals: class 2"):
            ppu_fast.solve(torch.log(p), torch.ones(200), m, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_class_total_below_its_one_hot_rows_raises_infeasible(backend):
    p = _sparse_probs()
    # Within the upper bounds (class 1: 150 rows, class 2: 10), but rows 10-59 give class 0 alone.
    m = torch.tensor([40.0, 150.0, 10.0])
    with pytest.raises(ValueError, match=r"class 0 has target total 40 but 50 rows of P\^ give "
                                         r"probability to class 0 alone.*M_0 >= 50"):
        ppu_fast.refine(p, [], marginals=m, backend=backend)


def test_a_feasible_problem_with_zeros_still_solves():
    p = _sparse_probs()
    m = torch.tensor([100.0, 95.0, 5.0])
    q, info = ppu_fast.refine(p, [], marginals=m, tol=1e-7, return_info=True)
    assert info.converged and _residual(q, m) < 1e-6


def test_a_solver_stopped_short_returns_its_best_iterate():
    p, labels = _problem(n=2000, k=10, seed=5, margin=30.0)
    with pytest.warns(ConvergenceWarning):
        q, info = ppu_fast.refine(p, labels == 0, marginals="original", method="gradient",
                                  max_iter=25, return_info=True)
    assert info.residual == min(info.history)
    m = p.double().sum(0)
    assert abs(_residual(q, m) - info.residual) <= 1e-6 + 1e-3 * info.residual


# -- defect 5: half-precision results ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_results_report_the_residual_of_what_is_returned(dtype):
    p, labels = _problem(n=3000, k=10, seed=6, dtype=dtype)
    mask = labels == 3
    q, info = ppu_fast.refine(p, mask, return_info=True)
    assert q.dtype == dtype
    pn = p.double() / p.double().sum(1, keepdim=True)  # the rows as refine reads them
    m = pn[~mask].sum(0) * 3000 / int((~mask).sum())
    measured = _residual(q, m)
    assert info.output_residual == pytest.approx(measured, rel=1e-3)  # M's rounding
    assert info.output_residual > 10 * info.residual
    assert "info.output_residual" in info.message
    _, info32 = ppu_fast.refine(pn.float(), mask, return_info=True)
    assert info32.output_residual is None


# -- smaller holes ----------------------------------------------------------------------------------

def test_k1_checks_every_argument():
    p = torch.ones(6, 1)
    assert torch.equal(ppu_fast.refine(p, [0]), torch.ones(6, 1))
    with pytest.raises(ValueError, match="method: unknown 'bogus'"):
        ppu_fast.refine(p, [0], method="bogus")
    with pytest.raises(ValueError, match="backend: unknown name 'jax'"):
        ppu_fast.refine(p, [0], backend="jax")
    with pytest.raises(ValueError, match="marginals: unknown name 'typo'"):
        ppu_fast.refine(p, [0], marginals="typo")
    with pytest.raises(ValueError, match="probs: row 2"):
        ppu_fast.refine(torch.tensor([[1.0], [1.0], [0.5], [1.0]]), [0])


def test_numpy_and_0d_torch_scalars_are_accepted():
    p, labels = _problem()
    mask = labels == 1
    expected = ppu_fast.refine(p, mask, lam=0.5, tol=1e-6, max_iter=50)
    for lam, tol, max_iter in [(np.float32(0.5), np.float64(1e-6), np.int64(50)),
                               (torch.tensor(0.5), torch.tensor(1e-6), torch.tensor(50)),
                               (np.array(0.5), 1e-6, np.int32(50))]:
        got = ppu_fast.refine(p, mask, lam=lam, tol=tol, max_iter=max_iter)
        assert torch.equal(got, expected)
    with pytest.raises(TypeError, match="max_iter: expected an integer"):
        ppu_fast.refine(p, mask, max_iter=5.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_targets_refuses_non_finite_alpha(bad):
    p, _ = _problem()
    alpha = [0.0, 0.1, bad, 0.0, -0.1]
    with pytest.raises(ValueError, match="alpha: entry 2 is .*; expected finite dual variables"):
        ppu_fast.targets(torch.log(p), torch.ones(400), alpha)


def test_bool_vectors_are_refused_where_numbers_belong():
    """weights, marginals and alpha given as bools (a list, a bool tensor or array, or one bool
    in a list of numbers) were read as 1.0 / 0.0: most likely a mask passed where numbers
    belong."""
    p, labels = _problem()
    n, k = p.shape
    mask = labels == 1
    for bools in ([True] * n, torch.ones(n, dtype=torch.bool), np.ones(n, dtype=bool),
                  [0.5] * (n - 1) + [True]):
        with pytest.raises(TypeError, match="weights: bool values; expected real numbers > 0, "
                                            "one per row .the rows to forget go in forget_mask."):
            ppu_fast.refine(p, mask, weights=bools)
    for bools in ([True] * k, torch.ones(k, dtype=torch.bool),
                  [float(n - 1), True] + [0] * (k - 2)):
        with pytest.raises(TypeError, match="marginals: bool values; expected real numbers"):
            ppu_fast.refine(p, mask, marginals=bools)
        with pytest.raises(TypeError, match="alpha: bool values; expected real numbers"):
            ppu_fast.targets(torch.log(p), torch.ones(n), bools)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_targets_refuses_an_alpha_past_float32_range_for_a_float32_log_p(backend):
    """Finite alphas whose spread / min(c) passes float32's range became +-inf in the float32
    kernels and Q all NaN, silently; now refused naming alpha, while float64 log_p evaluates
    them (one-hot on the class of the smallest alpha) and a spread within range still works."""
    lp = torch.log_softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), 1)
    alpha = [1e39, 0.0, 0.0, -1e39]
    for dt in (torch.float32, torch.float16):
        with pytest.raises(ValueError, match="alpha: its entries differ from their median by up "
                                             "to 1e.39, .*beyond float32's range"):
            ppu_fast.targets(lp.to(dt), torch.ones(5), alpha, backend=backend)
    with pytest.raises(ValueError, match="divided by min.weights. = 0.01 is beyond"):
        ppu_fast.targets(lp, torch.full((5,), 0.01), [1e37, 0.0, 0.0, -1e37], backend=backend)
    onehot = torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(5, 4)
    torch.testing.assert_close(ppu_fast.targets(lp.double(), torch.ones(5), alpha,
                                                backend=backend), onehot.double())
    torch.testing.assert_close(ppu_fast.targets(lp, torch.ones(5), [1e38, 0.0, 0.0, -1e38],
                                                backend=backend), onehot)
    # alpha / min(c) past float64's range (inf, or NaN once the median is inf too), any dtype;
    # the message gives the spread before the division
    tiny_c = torch.full((5,), 1e-250, dtype=torch.float64)  # the smallest weights accepted
    for dt in (torch.float32, torch.float64):
        for bad in ([1e100, 1e100, 1e100, 0.0], [1e100, 0.0, 0.0, -1e100]):
            with pytest.raises(ValueError, match=r"alpha: its entries differ from their median "
                                                 r"by up to 1e\+100, which divided by min"):
                ppu_fast.targets(lp.to(dt), tiny_c, bad, backend=backend)


def test_a_cpu_isa_typo_raises_instead_of_falling_back(monkeypatch):
    p, labels = _problem()
    monkeypatch.setenv("PPU_FAST_CPU_ISA", "avx-512")
    with pytest.raises(ValueError, match=r"PPU_FAST_CPU_ISA: unknown CPU kernel 'avx-512'; "
                                         r"expected one of \['auto', 'avx512', 'avx2', 'generic'\]"):
        ppu_fast.refine(p, labels == 1)
    monkeypatch.setenv("PPU_FAST_CPU_ISA", "generic")
    _, info = ppu_fast.refine(p, labels == 1, return_info=True)
    assert info.backend == "cpu"


@pytest.mark.parametrize("method", ["newton", "sinkhorn"])
def test_step_size_is_refused_where_it_would_be_ignored(method):
    p, labels = _problem()
    with pytest.raises(ValueError, match=f"step_size: only method='gradient'.*'{method}'"):
        ppu_fast.refine(p, labels == 1, method=method, step_size=0.1)
    with pytest.raises(ValueError, match="step_size: only method='gradient'"):
        ppu_fast.solve(torch.log(p), torch.ones(400), torch.full((5,), 80.0), method=method,
                       step_size=0.1)


def test_the_design_doc_is_in_the_repository_and_linked():
    assert (ROOT / "docs" / "design.md").is_file()
    assert "docs/design.md" in (ROOT / "README.md").read_text()
    for path in list((ROOT / "ppu_fast").rglob("*.py")) + [ROOT / "README.md"]:
        text = path.read_text()
        assert not re.search(r"(?<!docs/)DESIGN\.md", text), path


def test_sparse_and_meta_tensors_are_named():
    """A sparse or meta tensor as any tensor argument failed inside torch (NotImplementedError,
    'can't convert Sparse layout', 'Cannot copy out of meta tensor'), or as out= with a message
    about shared memory; a sharded call's other ranks then waited (test_scaling)."""
    p, labels = _problem()
    n, k = p.shape
    mask = labels == 1
    lp = torch.log(p)
    totals = torch.full((k,), n / k, dtype=torch.float64)
    for kind, convert in (("sparse_coo", lambda t: t.to_sparse()),
                          ("meta", lambda t: t.to("meta"))):
        want = ("a sparse_coo tensor; expected a dense (strided) tensor" if kind == "sparse_coo"
                else "a meta tensor holds no data; expected a tensor on the CPU or a CUDA device")
        calls = {
            "probs": lambda: ppu_fast.refine(convert(p), mask),
            "logits": lambda: ppu_fast.refine(logits=convert(lp), forget_mask=mask),
            "forget_mask": lambda: ppu_fast.refine(p, convert(torch.as_tensor(mask))),
            "pseudo": lambda: ppu_fast.refine(p, mask, pseudo=convert(
                torch.full((int(mask.sum()), k), 1.0 / k))),
            "marginals": lambda: ppu_fast.refine(p, mask, marginals=convert(totals)),
            "weights": lambda: ppu_fast.refine(p, mask, weights=convert(torch.ones(n))),
            "out": lambda: ppu_fast.refine(p, mask, out=convert(torch.empty_like(p))),
            "log_p": lambda: ppu_fast.solve(convert(lp), torch.ones(n), totals),
            "alpha": lambda: ppu_fast.targets(lp, torch.ones(n), convert(torch.zeros(k))),
        }
        for name, call in calls.items():
            with pytest.raises((TypeError, ValueError), match=rf"^{name}: {re.escape(want)}"):
                call()
