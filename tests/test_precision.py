"""float64 solved in float64, the precision floors of ``tol``, the row sums of a float32 Q.

A float64 input is solved in float64 by the cpu and torch backends (docs/design.md §3): to tol
1e-11 and within 1e-9 in Q of an independent float64 solve (tests/oracle.py ``oracle_solve``).
A tol below the floor of the dtype being solved is refused before any pass over the data. The
GPU backends compute in float32 and refuse float64 with a reason, so ``backend="auto"`` hands a
CUDA float64 tensor to the torch reference.
"""

from __future__ import annotations

import re
import warnings
import numpy as np
import pytest
import torch

import ppu_fast
from oracle import oracle_solve
from ppu_fast import solver
import ppu_fast.backends as registry
from ppu_fast.backends import get_backend, load, reasons
from ppu_fast.backends.base import FLOAT64_GPU_REASON, ROW_SUM_ULPS

BACKENDS = ["cpu", "torch"]


def _classifier(n: int, k: int, margin: float, seed: int) -> tuple:
    """Labels and float64 probabilities of a synthetic classifier (true class + margin)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, k, generator=g, dtype=torch.float64)
    z[torch.arange(n), y] += margin
    return y, torch.softmax(z, dim=1)


def _weights(forget: torch.Tensor, lam: float) -> torch.Tensor:
    """refine's row weights in float64: 1 on forget rows, lam elsewhere (a float32 lam, as
    torch.where with Python scalars gives, moved Q by 2e-9)."""
    c = torch.full(forget.shape, lam, dtype=torch.float64)
    c[forget] = 1.0
    return c


def _targets(p: torch.Tensor, forget: torch.Tensor, marginals: str) -> torch.Tensor:
    n = p.shape[0]
    if marginals == "original":
        return p.sum(0)
    return p[~forget].sum(0) * (n / int((~forget).sum()))


# (n, k, margin, lam, marginals): selective forgetting (the oracle's plain Newton converges
# there; class forgetting's exponential tail is tested against the KKT conditions below).
PROBLEMS = [(2000, 10, 6.0, 0.1, "retain"), (2000, 10, 6.0, 10.0, "original"),
            (1000, 40, 30.0, 1.0, "retain"), (600, 3, 2.0, 1.0, "retain"),
            (400, 200, 6.0, 0.5, "original")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,margin,lam,marginals", PROBLEMS)
def test_float64_refine_matches_the_float64_oracle(backend, n, k, margin, lam, marginals):
    """numpy float64 in: Q float64 out, converged to tol 1e-11 (the residual measured on the
    returned Q too) and within 1e-9 of the oracle's Q."""
    _, p = _classifier(n, k, margin, seed=k)
    forget = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.1
    q, info = ppu_fast.refine(p.numpy(), forget.numpy(), lam=lam, marginals=marginals,
                              backend=backend, tol=1e-11, return_info=True)
    assert isinstance(q, np.ndarray) and q.dtype == np.float64
    assert info.converged and info.residual <= 1e-11, info
    m = _targets(p, forget, marginals)
    assert np.abs(q.sum(0) - m.numpy()).sum() / n <= 2e-11
    log_p_hat = torch.log(p)
    log_p_hat[forget] = -np.log(k)
    c = _weights(forget, lam)
    _, q_ora = oracle_solve(log_p_hat, c, m, tol=1e-13)
    assert np.abs(q - q_ora).max() <= 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_solve_and_targets_match_the_oracle(backend):
    """A caller's own weights (not 1 / lam) and tol 1e-12: alpha and Q(alpha) from ``targets``
    agree with the oracle's."""
    n, k = 1500, 12
    _, p = _classifier(n, k, 4.0, seed=3)
    log_p = torch.log(p)
    c = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    m = torch.softmax(torch.randn(k, generator=torch.Generator().manual_seed(5),
                                  dtype=torch.float64) * 0.3, 0) * n
    alpha, info = ppu_fast.solve(log_p, c, m, backend=backend, tol=1e-12)
    assert info.converged and info.residual <= 1e-12 and alpha.dtype == torch.float64
    q = ppu_fast.targets(log_p, c, alpha, backend=backend)
    assert q.dtype == torch.float64
    a_ora, q_ora = oracle_solve(log_p, c, m, tol=1e-13)
    assert float((q - torch.from_numpy(q_ora)).abs().max()) <= 1e-9
    assert np.abs((alpha - alpha.mean()).numpy() - (a_ora - a_ora.mean())).max() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.01, 1.0, 100.0])
def test_float64_class_unlearning_reaches_1e_11(backend, lam):
    """Class unlearning on a confident model (exponential tails, forget rows far from P^): the
    float64 solve reaches tol 1e-11, and the returned Q satisfies the KKT form
    Q = softmax(log P^ - alpha / c) with colsum(Q) = M."""
    n, k = 3000, 10
    y, p = _classifier(n, k, 8.0, seed=1)
    forget = y == 0
    q, info = ppu_fast.refine(p, forget, lam=lam, backend=backend, tol=1e-11, return_info=True)
    assert q.dtype == torch.float64 and info.converged and info.residual <= 1e-11, info
    m = _targets(p, forget, "retain")
    assert float((q.sum(0) - m).abs().sum()) / n <= 2e-11
    log_p_hat = torch.log(p)
    log_p_hat[forget] = -np.log(k)
    c = _weights(forget, lam)
    want = torch.softmax(log_p_hat - info.alpha[None, :] / c[:, None], dim=1)
    assert float((q - want).abs().max()) <= 1e-9


@pytest.mark.parametrize("dtype,tol,floor", [(torch.float32, 5e-8, 1e-7),
                                             (torch.float16, 5e-8, 1e-7),
                                             (torch.bfloat16, 1e-10, 1e-7),
                                             (torch.float64, 1e-14, 1e-13)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tol_below_the_dtype_floor_is_refused_up_front(monkeypatch, dtype, tol, floor,
                                                       backend):
    """A ValueError naming tol and the floor, before any pass over the data (prepare and step
    would fail this test if called)."""
    assert solver.TOL_FLOOR[torch.float64 if dtype == torch.float64 else torch.float32] == floor
    be = load(backend)[0]

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the data ran before tol was checked")

    monkeypatch.setattr(type(be), "prepare", no_pass)
    monkeypatch.setattr(type(be), "step", no_pass)
    monkeypatch.setattr(type(be), "bind_step", no_pass)
    _, p = _classifier(200, 4, 3.0, seed=0)
    p = p.to(dtype)
    mask = torch.arange(200) < 20
    with pytest.raises(ValueError, match=rf"tol: .*below the precision floor {floor:g}"):
        ppu_fast.refine(p, mask, tol=tol, backend=backend)
    with pytest.raises(ValueError, match=rf"tol: .*below the precision floor {floor:g}"):
        ppu_fast.solve(torch.log(p.double()).to(dtype), torch.ones(200),
                       torch.full((4,), 50.0), tol=tol, backend=backend)


def test_tol_at_the_floor_is_accepted():
    """The floors themselves are accepted (and reached on a small problem)."""
    _, p = _classifier(500, 5, 3.0, seed=2)
    mask = torch.arange(500) < 50
    for x, tol in ((p.float(), solver.TOL_FLOOR[torch.float32]),
                   (p, solver.TOL_FLOOR[torch.float64])):
        _, info = ppu_fast.refine(x, mask, tol=tol, return_info=True)
        assert info.converged, (x.dtype, info.message)


def test_solve_dual_checks_the_floor_too():
    log_p = torch.log_softmax(torch.randn(50, 3, dtype=torch.float64), dim=1)
    be = load("torch")[0]
    with pytest.raises(ValueError, match="tol: .*floor 1e-13"):
        solver.solve_dual(be, log_p, torch.ones(50, dtype=torch.float64),
                          torch.full((3,), 50 / 3, dtype=torch.float64), tol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [10, 1000])
def test_float32_q_rows_sum_to_one_within_two_ulps(backend, k):
    _, p = _classifier(3000 if k < 1000 else 400, k, 3.0, seed=k)
    mask = torch.arange(p.shape[0]) % 7 == 0
    q = ppu_fast.refine(p.float(), mask, backend=backend)
    assert q.dtype == torch.float32
    dev = float((q.double().sum(1) - 1.0).abs().max()) / 2.0 ** -23
    assert dev <= ROW_SUM_ULPS, f"a row of Q sums to 1 +- {dev:.2f} float32 ulps"


def test_gpu_backends_refuse_float64_with_a_reason(monkeypatch):
    """triton and cuda compute in float32: their reasons name float64 (asked on CPU tensors here,
    no GPU needed); forcing them raises with it; "auto" in the CUDA order then picks torch."""
    t64 = torch.zeros(8, 3, dtype=torch.float64)
    from ppu_fast.backends.cuda import CudaBackend
    assert FLOAT64_GPU_REASON in CudaBackend().not_supported_reasons(t64)
    assert FLOAT64_GPU_REASON not in CudaBackend().not_supported_reasons(t64.float())
    triton_be, why = load("triton")
    if triton_be is not None:
        assert FLOAT64_GPU_REASON in triton_be.not_supported_reasons(t64)
        assert FLOAT64_GPU_REASON not in triton_be.not_supported_reasons(t64.float())
    for name in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match=f"backend: '{name}' cannot run"):
            get_backend(name, t64)
    assert reasons("torch", t64) == []
    monkeypatch.setitem(registry._ORDER, "cpu", registry._ORDER["cuda"])
    monkeypatch.delenv("PPU_FAST_BACKEND", raising=False)
    assert get_backend("auto", t64).name == "torch"
    if torch.cuda.is_available():
        assert get_backend("auto", t64.cuda()).name == "torch"
        q = ppu_fast.refine(torch.softmax(torch.randn(100, 4, dtype=torch.float64), 1).cuda(),
                            torch.arange(100) < 10, tol=1e-11)
        assert q.dtype == torch.float64 and q.is_cuda


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,shift", [(20011, 10, 3.0), (2003, 100, 100.0), (1009, 3, 1e4)])
def test_float64_dual_value_is_within_the_solver_noise_bound(backend, n, k, shift):
    """The line search treats changes of g below G_NOISE_REL[float64] times the sum of its
    terms' magnitudes as rounding: sum c log Z from a float64 step must be that accurate
    (against a long-double evaluation; measured 2e-16 at worst, the bound is 1e-15)."""
    from backend_cases import make_case

    log_p, inv_c, alpha = make_case(n, k, torch.float64, shift=shift, seed=k)
    _, wlogz, _ = load(backend)[0].step(log_p, inv_c, alpha)
    ld = np.longdouble
    x = log_p.numpy().astype(ld) - inv_c.numpy().astype(ld)[:, None] * alpha.numpy().astype(ld)
    mx = x.max(1, keepdims=True)
    lz = mx[:, 0] + np.log(np.exp(x - mx).sum(1))
    exact = (lz / inv_c.numpy().astype(ld)).sum()
    # The scale the solver's noise bound uses (solver._Evaluator.record).
    scale = float((np.abs(lz) / inv_c.numpy().astype(ld)).sum()) + n * float(alpha.abs().max()) \
        + np.log(k) * float((1.0 / inv_c).sum())
    assert abs(float(wlogz) - float(exact)) <= solver.G_NOISE_REL[torch.float64] * scale


def _exact_cases():
    """(backend, cpu kernel variant or None for the default) pairs."""
    out = [(b, None) for b in BACKENDS]
    try:
        from ppu_fast import _C
    except ImportError:  # no compiled module: the cpu backend is skipped elsewhere too
        return out
    return out + [("cpu", isa) for isa in _C.supported_isas() if isa != _C.best_isa()]


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("margin", [0.0, 30.0])
@pytest.mark.parametrize("backend,isa", _exact_cases())
def test_exact_hessian_of_every_kernel_variant(backend, isa, k, margin):
    """hessian="exact" on every cpu kernel variant (and the reference), near one-hot rows and
    k up to DENSE_HESSIAN_MAX_K included, against the float64 formula."""
    from backend_cases import make_case
    from oracle import hessian_error, newton_hessian, one_minus, oracle_q
    from ppu_fast.backends.cpu import CpuBackend

    log_p, inv_c, alpha = make_case(3001, k, torch.float64, margin=margin, seed=k)
    be = CpuBackend(isa=isa) if isa else load(backend)[0]
    _, _, h = be.step(log_p, inv_c, alpha, "exact")
    q, ic = oracle_q(log_p, inv_c, alpha), inv_c.numpy()
    h_ora = newton_hessian((ic[:, None] * q * one_minus(q)).sum(0), (q * ic[:, None]).T @ q)
    assert hessian_error(h, h_ora, 1e-300) <= 1e-11


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_hessian_takes_every_row(backend):
    """hessian="exact" (what a float64 Newton solve asks for below EXACT_HESSIAN_BELOW, and any
    Newton solve whose sampled Hessian stalls) is the Hessian over every row, also where the
    sample of hessian=True skips rows; in float32 too, to its rounding."""
    from backend_cases import make_case
    from oracle import hessian_error, newton_hessian, one_minus, oracle_q
    from ppu_fast.backends.base import hessian_stride

    n, k = 20011, 10
    assert hessian_stride(n, k) > 1
    log_p, inv_c, alpha = make_case(n, k, torch.float64, seed=3)
    be = load(backend)[0]
    _, _, h = be.step(log_p, inv_c, alpha, "exact")
    q, ic = oracle_q(log_p, inv_c, alpha), inv_c.numpy()
    h_ora = newton_hessian((ic[:, None] * q * one_minus(q)).sum(0), (q * ic[:, None]).T @ q)
    assert hessian_error(h, h_ora, 1e-300) <= 1e-12
    _, _, h_sampled = be.step(log_p, inv_c, alpha, True)
    assert hessian_error(h_sampled, h_ora, 1e-300) > 1e-6  # the sample is not the whole
    _, _, h32 = be.step(log_p.float(), inv_c.float(), alpha, "exact")
    assert hessian_error(h32, h_ora, 1e-300) <= 1e-5
    assert float(torch.linalg.eigvalsh(h32).min()) >= -1e-9 * float(h32.diagonal().max())


# A fuzz-found 2 x 33 problem (one retained row, one forgotten with given pseudo-probabilities):
# float32 evaluation stalls at ~3e-6 for tens of passes, float64 converges in ~22.
_STALL_X = np.array([
    [0.0003046989440917969, 0.00031065940856933594, 0.0009517669677734375, 0, 0,
     0.00018036365509033203, 0.005588531494140625, 0.0006327629089355469, 0.00047516822814941406,
     0.00057220458984375, 0, 0, 0.00022041797637939453, 0.0018720626831054688,
     0.0006442070007324219, 0.002780914306640625, 0, 0.00022912025451660156, 0,
     0.003032684326171875, 5.799531936645508e-05, 0.96826171875, 0, 0.00112152099609375,
     0.0034809112548828125, 0.0035305023193359375, 0.00023281574249267578, 0.0010833740234375,
     0.0027637481689453125, 5.704164505004883e-05, 0, 0.0007390975952148438,
     0.0009217262268066406],
    [6.002187728881836e-05, 5.21540641784668e-05, 0.0002923011779785156, 0.0006456375122070312,
     0.0008645057678222656, 0, 0.98876953125, 0.00022470951080322266, 0.00014495849609375,
     0.0011157989501953125, 0.0006718635559082031, 0, 0.00208282470703125, 0,
     0.00017750263214111328, 0.0001024007797241211, 0.00028228759765625, 0.00029754638671875,
     0.0006403923034667969, 0.00029730796813964844, 0.0007281303405761719, 0.0009102821350097656,
     0, 0, 0.0002498626708984375, 0.0010747909545898438, 0.00018393993377685547, 0, 0, 0,
     8.177757263183594e-05, 0, 0],
], dtype=np.float32)
_STALL_PSEUDO = np.array([[0.012709743343293667, 0.015931326895952225, 0.0008020774112083018, 0.03584563732147217,
    0.010536662302911282, 0.40294814109802246, 0.004634746350347996, 0.0003442942979745567,
    0.001122869667597115, 0.010194090195000172, 9.66648367466405e-05, 0.0060523380525410175,
    0.022430481389164925, 0.00032588871545158327, 0.018798671662807465, 0.011176126077771187,
    0.01260930486023426, 0.0004015108570456505, 0.03676077350974083, 0.01974516361951828,
    0.0250710379332304, 0.012095021083950996, 0.04193468764424324, 0.022285714745521545,
    0.24393346905708313, 0.0007875378942117095, 0.01128214132040739, 0.002737116301432252,
    0.0035765254870057106, 0.005690655205398798, 0.0024871639907360077, 0.0015649086562916636,
    0.003087493823841214]])


def test_a_float32_stall_near_its_floor_says_float64_would_help(monkeypatch):
    args = dict(forget_mask=np.array([False, True]), lam=0.021196067681412665,
                pseudo=_STALL_PSEUDO, marginals="original", return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ppu_fast.ConvergenceWarning)
        _, info = ppu_fast.refine(_STALL_X, **args)
    assert info.converged  # solved again in float64 if float32 stalled (it does on AVX-512)
    # Above the size of that retry (set to 0 here) the stall is reported with the hint.
    monkeypatch.setattr(solver, "FLOAT64_RETRY_MAX_ELEMENTS", 0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, info = ppu_fast.refine(_STALL_X, **args)
    if info.converged:  # found with the AVX-512 kernels; another ISA rounds differently
        pytest.skip("this CPU's float32 kernels do not stall on this problem")
    assert info.residual < 1e-5
    assert ("near the float32 precision floor; a float64 input is solved in float64"
            in str(record[-1].message))
    _, info64 = ppu_fast.refine(_STALL_X.astype(np.float64), **args)
    assert info64.converged
    # Out of passes while still converging: no such hint.
    with pytest.warns(ppu_fast.ConvergenceWarning) as record:
        ppu_fast.refine(_STALL_X, **{**args, "max_iter": 3})
    assert "precision floor" not in str(record[-1].message)


def _many_classes_few_rows(seed: int) -> tuple:
    """64 x 100 float32 logits of a confident model (margin 30: at most 64 classes are anyone's
    label) and its first third forgotten: refine with lam 10, pseudo "prior" and "original"
    marginals stalls in float32 for most seeds (seed 0 on cpu and torch), never in float64."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 100, (64,), generator=g)
    x = torch.randn(64, 100, generator=g)
    x[torch.arange(64), y] += 30.0
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:21] = True
    return x, mask


_MANY_CLASSES = dict(lam=10.0, pseudo="prior", marginals="original", return_info=True)


@pytest.mark.parametrize("backend,how", [("cpu", "fresh"), ("cpu", "out=input"), ("cpu", "solve"),
                                         ("torch", "fresh"), ("torch", "out=input")])
def test_a_tiny_float32_stall_is_solved_again_in_float64(monkeypatch, backend, how):
    x, mask = _many_classes_few_rows(0)
    # The independent answer, from the formulas: P^ (forget rows = the retain rows' mean),
    # M = the input's column sums, c = 1 / lam.
    p = torch.softmax(x.double(), dim=1)
    m = p.sum(0)
    p_hat = p.clone()
    p_hat[mask] = p[~mask].mean(0)
    c = torch.where(mask, 1.0, 10.0).double()
    _, q_ref = oracle_solve(torch.log(p_hat), c, m, tol=1e-10)

    def call():
        if how == "solve":
            return ppu_fast.solve(torch.log(p_hat).float(), c, m, backend=backend)
        xin = x.clone()
        extra = {"out": xin} if how == "out=input" else {}
        q, info = ppu_fast.refine(logits=xin, forget_mask=mask, backend=backend,
                                  **_MANY_CLASSES, **extra)
        assert q is xin or how == "fresh"
        return q, info

    # The float32 solve alone stalls (the retry switched off; solve's log P^, taken from the
    # float64 probabilities, stalls the cpu backend only):
    monkeypatch.setattr(solver, "FLOAT64_RETRY_MAX_ELEMENTS", 0)
    with pytest.warns(ppu_fast.ConvergenceWarning):
        _, info = call()
    assert not info.converged
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got, info = call()
    assert not [w for w in said if issubclass(w.category, ppu_fast.ConvergenceWarning)]
    # solve's alpha needs a float64 log_p in targets (below): solve says so, refine need not.
    hint = [w for w in said if "alpha was solved in float64" in str(w.message)]
    assert len(hint) == (how == "solve") and info.solve_dtype == torch.float64
    assert info.converged and "solved again in float64" in info.message
    first = int(re.search(r"float32 Newton stopped after (\d+) passes", info.message).group(1))
    assert info.iterations == len(info.history) > first  # both solves' passes
    if how == "solve":  # alpha has a gauge, and classes with ~no mass barely pin theirs
        got = ppu_fast.targets(torch.log(p_hat), c, got, backend=backend)
    assert got.dtype == (torch.float64 if how == "solve" else torch.float32)
    # Q is evaluated in float64 at the float64 alpha and then rounded: its residual is the
    # solver's, below tol (evaluated in float32 it missed tol by up to 6 %).
    assert float((got.double().sum(0) - m).abs().sum()) / 64 <= 1e-6
    assert float((got.double() - torch.as_tensor(q_ref)).abs().max()) < 1e-6


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_float32_stall_hands_over_to_float64_before_max_iter(backend):
    """A refine's float32 solve that stalls below residual 1e-4 stops there and lets the float64
    solve finish, instead of running on to max_iter (it did: 100 float32 passes, then 2-20 in
    float64): found within the first seeds of the stall family (6 of 30 on cpu, 11 on torch)."""
    for seed in range(30):
        x, mask = _many_classes_few_rows(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ppu_fast.ConvergenceWarning)
            _, info = ppu_fast.refine(logits=x, forget_mask=mask, backend=backend,
                                      **_MANY_CLASSES)
        if "residual not halved in 10 passes below 0.0001" in info.message:
            break
    else:
        pytest.fail("no float32 solve of the stall family handed over")
    first = int(re.search(r"float32 Newton stopped after (\d+) passes at residual ([0-9.e+-]+)",
                          info.message).group(1))
    assert first < 100 and info.converged and info.solve_dtype == torch.float64
    # It had stalled below 1e-4: its best residual then, not at its last pass.
    assert min(info.history[:first]) <= 1e-4 < info.history[0]


def test_the_float64_retry_warns_once_when_it_fails_too(monkeypatch):
    x, mask = _many_classes_few_rows(0)
    with pytest.warns(ppu_fast.ConvergenceWarning) as record:
        q, info = ppu_fast.refine(logits=x, forget_mask=mask, backend="cpu", max_iter=3,
                                  **_MANY_CLASSES)
    assert len(record) == 1
    text = str(record[0].message)
    assert "float32 Newton stopped after 3 passes" in text and "float64" in text
    assert not info.converged and info.iterations == len(info.history) == 6
    # The float64 solve starts from the float32 one's best iterate (it went from alpha = 0,
    # finding the basin again), not from alpha = 0.
    assert info.history[3] == pytest.approx(min(info.history[:3]), rel=1e-5)
    assert info.history[3] < 0.99 * info.history[0]
    # The better of the two solves' best iterates, and Q is that iterate's (evaluated in float64).
    assert info.residual == min(info.history)
    m = torch.softmax(x.double(), dim=1).sum(0)
    assert float((q.double().sum(0) - m).abs().sum()) / 64 == pytest.approx(info.residual,
                                                                              rel=1e-3)
