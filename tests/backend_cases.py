"""Shared cases and accuracy checks for every backend's ``prepare`` / ``step`` / ``materialize``.

Each backend's test module parametrises over ``CASES`` and calls ``check_step`` /
``check_materialize`` / ``check_prepare``. The rules:

* column sums, sum c log Z and Q: a backend's error against the float64 oracle (tests/oracle.py,
  independent of every backend) may be at most twice the reference's own error on the same input
  (the float32 reference, or the float64 one for a float64 buffer), plus a small floor for
  reordered sums (``FLOOR``, ``FLOOR_F64``);
* the Hessian (both forms) must be within ``HESS_TOL`` (``HESS_TOL_F64``) of the oracle in the
  error Newton feels (``oracle.hessian_error``), in every backend and in the reference, on one-hot
  rows too;
* ``prepare`` reports exactly the reference's first offending row and kind.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from oracle import hessian_error, oracle_prepare, oracle_q, oracle_step, wlogz_scale
from ppu_fast.backends.base import SUPPORTED_DTYPES, compute_dtype
from ppu_fast.backends.torch_ref import reference_materialize, reference_prepare, reference_step

KS = (1, 2, 3, 10, 17, 100, 1000, 1023)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Floors on the relative error, per quantity: reordering float32 sums differs by a few ulps.
FLOOR = 2e-6
HESS_TOL = 1e-3
# The same for float64 buffers, computed in float64 (measured errors: 1e-14 and below).
FLOOR_F64 = 1e-12
HESS_TOL_F64 = 1e-10


def floor_for(dtype: torch.dtype) -> float:
    """The relative-error floor of the 2x rule for a buffer of ``dtype``."""
    return FLOOR_F64 if dtype == torch.float64 else FLOOR


def hess_tol_for(dtype: torch.dtype) -> float:
    """How close the Hessian must be to the oracle for a buffer of ``dtype``."""
    return HESS_TOL_F64 if dtype == torch.float64 else HESS_TOL


def make_case(n: int, k: int, dtype: torch.dtype = torch.float32, *, shift: float = 3.0,
              neg_inf: bool = False, noncontig: bool = False, seed: int = 0,
              device: str = "cpu", margin: float = 0.0
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random (log_p (n x k) in ``dtype``, inv_c (n,) f32 (f64 for a float64 log_p), alpha
    (k,) f64).

    ``shift`` scales alpha so that |alpha * inv_c| reaches about ``shift``; ``neg_inf`` puts -inf
    entries (zero probabilities) in, never a whole row; ``noncontig`` returns a strided view;
    ``margin`` adds that much to one random logit per row (30 or 60: near one-hot rows).
    """
    g = torch.Generator().manual_seed(seed)
    cols = 2 * k if noncontig else k
    logits = torch.randn(n, cols, generator=g, dtype=torch.float64) * 2.0
    if margin:
        logits[torch.arange(n), torch.randint(0, cols, (n,), generator=g)] += margin
    log_p = torch.log_softmax(logits, dim=1)
    if neg_inf and k > 1:
        mask = torch.rand(n, cols, generator=g) < 0.2
        mask[:, 0] = False  # keep every row feasible
        log_p = log_p.masked_fill(mask, float("-inf"))
    log_p = log_p.to(dtype)
    if noncontig:
        log_p = log_p[:, ::2]
    inv_c = torch.where(torch.rand(n, generator=g) < 0.3, torch.tensor(1.0, dtype=torch.float64),
                        torch.tensor(1.0 / 3.0, dtype=torch.float64)).to(compute_dtype(dtype))
    alpha = torch.randn(k, generator=g, dtype=torch.float64) * shift
    return log_p.to(device), inv_c.to(device), alpha.to(device)


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| (float64)."""
    x = torch.as_tensor(np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x))
    ref = torch.as_tensor(np.asarray(ref.detach().cpu().double() if isinstance(ref, torch.Tensor)
                                     else ref, dtype=float))
    assert not torch.isnan(x).any(), "NaN in backend output"
    return float((x.double() - ref.double()).norm() / max(float(ref.double().norm()), 1e-300))


def _err(name: str, got, ora, wlogz_scale: float) -> float:
    """Relative error; wlogz's against the sum of its terms' magnitudes (the terms may cancel)."""
    if name != "wlogz":
        return rel_err(got, ora)
    return abs(float(got) - float(ora)) / max(abs(float(ora)), wlogz_scale, 1e-300)


def hessian_floor(inv_c: torch.Tensor) -> float:
    """Oracle entries below this are float32 underflow territory (e^-69 per unit weight)."""
    return 1e-30 * float(inv_c.double().sum())


def check_step(backend, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
               hessian=False) -> None:
    """Assert ``backend.step`` is as accurate as the reference (2x rule + floor) and its Hessian
    within HESS_TOL (HESS_TOL_F64) of the oracle."""
    got = backend.step(log_p, inv_c, alpha, hessian)
    ref = reference_step(log_p, inv_c, alpha, hessian)
    ora = oracle_step(log_p, inv_c, alpha, hessian)
    scale = wlogz_scale(log_p, inv_c, alpha)
    for name, g, r, o in zip(("colsum", "wlogz"), got[:2], ref[:2], ora[:2]):
        assert g.dtype == torch.float64, f"{name}: dtype {g.dtype}, expected float64"
        assert tuple(g.shape) == np.shape(o), f"{name}: shape {tuple(g.shape)}"
        e_got, e_ref = _err(name, g, o, scale), _err(name, r, o, scale)
        assert e_got <= 2 * e_ref + floor_for(log_p.dtype), \
            f"{name}: error {e_got:.3g} vs reference {e_ref:.3g}"
    if ora[2] is None:
        assert got[2] is None, "hessian: expected None"
        return
    h = got[2]
    assert h.dtype == torch.float64 and tuple(h.shape) == ora[2].shape, f"hessian: {h.shape}"
    err = hessian_error(h, ora[2], hessian_floor(inv_c))
    tol = hess_tol_for(log_p.dtype)
    assert err <= tol, f"hessian ({hessian}): error {err:.3g} > {tol}"
    if hessian is True:
        assert float(torch.linalg.eigvalsh(h.cpu()).min()) >= -1e-9 * float(h.diagonal().max()), \
            "hessian: not positive semi-definite"


def check_bound_step(backend, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                     hessians=(False, "diag", True, "exact"),
                     before: Optional[Callable[[], object]] = None) -> None:
    """Assert ``backend.bind_step`` (the solver's passes) gives ``backend.step``'s results for
    each Hessian mode, over two alphas, so that a pass on the bound buffers must not disturb
    results handed out before it. ``before()`` runs before each bound pass (a GPU test queues a
    long sleep there on the caller's stream: a copy or kernel on another stream would then not
    wait for the previous work, and read a stale alpha or result). On the CPU (the emulation,
    the interpreter) colsum, wlogz and the diagonal agree bit for bit; on a GPU within 1e-13 (a
    reduction of the programs' partial sums into a slice of a packed buffer may take another
    order than into its own tensor); H to its assembly's rounding. ``step`` itself is checked
    against the oracle by :func:`check_step`."""
    from ppu_fast.backends.base import host_step

    rtol = 0.0 if log_p.device.type == "cpu" else 1e-13
    run = backend.bind_step(log_p, inv_c)
    got = []
    for a in (alpha, -0.5 * alpha):
        for hessian in hessians:
            if before is not None:
                before()
            got.append((a, hessian, run(a.detach().cpu().numpy(), hessian)))
    for a, hessian, (colsum, wlogz, h) in got:
        want = host_step(*backend.step(log_p, inv_c, a.to(log_p.device), hessian))
        assert isinstance(colsum, np.ndarray) and colsum.dtype == np.float64
        np.testing.assert_allclose(colsum, want[0], rtol=rtol, atol=0,
                                   err_msg=f"colsum ({hessian})")
        assert abs(wlogz - want[1]) <= rtol * abs(want[1]), f"wlogz ({hessian}): {wlogz!r} != " \
                                                              f"{want[1]!r}"
        if want[2] is None:
            assert h is None, f"hessian {hessian!r}: expected None"
        elif hessian == "diag":
            np.testing.assert_allclose(h, want[2], rtol=rtol, atol=0, err_msg="diag")
        else:
            scale = float(np.abs(want[2]).max())
            np.testing.assert_allclose(h, want[2], rtol=1e-12, atol=1e-12 * scale,
                                       err_msg=f"H ({hessian})")


def check_materialize(backend, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
                      out_dtype: Optional[torch.dtype] = None) -> None:
    """Assert ``backend.materialize`` writes every element, as accurately as the reference."""
    out_dtype = out_dtype or log_p.dtype
    out = torch.full(log_p.shape, float("nan"), dtype=out_dtype, device=log_p.device)
    got = backend.materialize(log_p, inv_c, alpha, out)
    assert got.data_ptr() == out.data_ptr(), "materialize must write into out"
    assert not torch.isnan(out).any(), "materialize left elements unwritten (NaN poison)"
    ref = reference_materialize(log_p, inv_c, alpha,
                                torch.empty(log_p.shape, dtype=out_dtype, device=log_p.device))
    ora = oracle_q(log_p, inv_c, alpha)
    e_got, e_ref = rel_err(out, ora), rel_err(ref, ora)
    floor = floor_for(log_p.dtype if out_dtype == torch.float64 else torch.float32)
    assert e_got <= 2 * e_ref + floor, f"Q: error {e_got:.3g} vs reference {e_ref:.3g}"
    if torch.isinf(log_p).any():
        assert (out[torch.isinf(log_p)] == 0).all(), "-inf log-probabilities must give exact zeros"


def check_prepare(backend, x: torch.Tensor, mode: str, forget: Optional[torch.Tensor] = None,
                  fill: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = torch.float32,
                  inv_c: Optional[torch.Tensor] = None, hessian=False, tol: float = 1e-3) -> None:
    """Assert ``backend.prepare`` agrees with the reference (the same first bad row and kind) and
    is as accurate as it against the oracle (log P^ written, sums, the first evaluation)."""
    def run(be):
        out = None if out_dtype is None else torch.full(x.shape, float("nan"), dtype=out_dtype,
                                                        device=x.device)
        before = x.clone()
        res = be.prepare(x, mode, forget, fill, out, inv_c, hessian, tol)
        assert torch.equal(x, before) or (x.isnan().any() and torch.equal(x.isnan(), before.isnan())), \
            "prepare modified its input"
        return res, out

    got, out = run(backend)
    ref, out_ref = run(_Ref())
    stored = out_dtype if out_dtype is not None else (x.dtype if x.dtype in SUPPORTED_DTYPES
                                                      else torch.float32)
    floor = floor_for(stored)
    ora = oracle_prepare(x, mode, forget, fill, inv_c, hessian, tol, stored)
    assert ref.error == ora["error"], f"reference error {ref.error} vs oracle {ora['error']}"
    assert got.error == ref.error, f"first bad row: {got.error} vs reference {ref.error}"
    if got.error is not None:
        return
    if out is not None:
        ok = np.isfinite(ora["log_p"])
        o = out.detach().cpu().double().numpy()
        assert np.array_equal(np.isfinite(o), ok), "log P^: -inf entries differ"
        e_got = rel_err(torch.from_numpy(o[ok]), ora["log_p"][ok])
        e_ref = rel_err(out_ref.cpu()[torch.from_numpy(ok)], ora["log_p"][ok])
        assert e_got <= 2 * e_ref + floor, f"log P^: error {e_got:.3g} vs reference {e_ref:.3g}"
    if mode == "log_p":
        assert torch.equal(got.support, torch.from_numpy(ora["support"])), "support"
    else:
        for name in ("retain_sums", "forget_sums"):
            g, r, o = getattr(got, name), getattr(ref, name), ora[name]
            e_got, e_ref = rel_err(g, o), rel_err(r, o)
            assert e_got <= 2 * e_ref + floor, f"{name}: {e_got:.3g} vs reference {e_ref:.3g}"
    if ref.first is None:
        assert got.first is None, "first: the reference gives none for this call"
        return
    assert got.first is not None, "first: missing"
    scale = ora["wlogz_scale"]
    for name, g, r, o in zip(("colsum", "wlogz"), got.first[:2], ref.first[:2], ora["first"][:2]):
        e_got, e_ref = _err(name, g, o, scale), _err(name, r, o, scale)
        assert e_got <= 2 * e_ref + floor, f"first {name}: {e_got:.3g} vs reference {e_ref:.3g}"
    if hessian is not False:
        err = hessian_error(got.first[2], ora["first"][2], hessian_floor(inv_c))
        assert err <= hess_tol_for(stored), f"first hessian ({hessian}): error {err:.3g}"


class _Ref:
    def prepare(self, *args):
        return reference_prepare(*args)


def cases(ks=KS, dtypes=DTYPES):
    """(n, k, dtype, shift, neg_inf, noncontig) combinations every backend is tested on."""
    out = []
    for k, dtype in itertools.product(ks, dtypes):
        n = 257 if k >= 100 else 1009  # primes, N not a multiple of any block size
        out.append((n, k, dtype, 3.0, False, False))
    for k in (3, 17, 1000):
        out.append((7, k, torch.float32, 3.0, False, False))        # N smaller than one block
        out.append((131, k, torch.float32, 1e4, False, False))      # |alpha / c| up to 1e4
        out.append((131, k, torch.float32, 3.0, True, False))       # -inf entries
        out.append((131, k, torch.float16, 3.0, False, True))       # non-contiguous view
    return out


def cases_f64(ks=KS):
    """The shapes of :func:`cases` with float64 buffers (the float64 kernels and reference)."""
    return [(n, k, torch.float64, shift, neg_inf, noncontig)
            for n, k, _, shift, neg_inf, noncontig in cases(ks, dtypes=(torch.float32,))]


def onehot_cases(ks=(3, 10, 40, 100, 1000)):
    """(n, k, margin) near one-hot cases (logit margins 30 and 60) for the Hessian checks."""
    return [(2003 if k < 1000 else 211, k, margin) for k in ks for margin in (30.0, 60.0)]


def classifier_probs(n: int, k: int, margin: float, seed: int = 0, dtype=torch.float32
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (n x k) in ``dtype``, labels (n,)): a classifier's outputs, its logits
    standard normal x 2 with ``margin`` added to each row's label, for whole-refine tests."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (n,), generator=g)
    logits[torch.arange(n), labels] += margin
    return torch.softmax(logits, 1).to(dtype), labels


def prepare_inputs(n: int, k: int, mode: str, dtype=torch.float32, seed: int = 0,
                   noncontig: bool = False, margin: float = 0.0, device: str = "cpu"):
    """Fresh random valid input for ``prepare``: probabilities, logits or log-probabilities."""
    g = torch.Generator().manual_seed(seed)
    cols = 2 * k if noncontig else k
    z = torch.randn(n, cols, generator=g, dtype=torch.float64) * 2.0
    if margin:
        z[torch.arange(n), torch.randint(0, cols, (n,), generator=g)] += margin
    if noncontig:
        z = z[:, ::2]
    if mode == "probs":
        x = torch.softmax(z, dim=1)
    elif mode == "logits":
        x = z * 3.0
    else:
        x = torch.log_softmax(z, dim=1) + torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if mode == "probs" and dtype != torch.float64:
        x = x.float()
        x = (x / x.sum(dim=1, keepdim=True)).to(dtype)
    if noncontig:
        x = torch.empty(n, 2 * k, dtype=dtype)[:, ::2].copy_(x)
    return x.to(device)


def bad_inputs(mode: str):
    """(description, make(x) -> x with one bad row, expected kind) for the validation tests:
    every fault ``prepare`` must report, planted in row 37 and, for order, also in row 90."""
    inf, nan = float("inf"), float("nan")
    cases = [("nan", lambda x: _plant(x, 37, 1, nan), 1),
             ("+inf", lambda x: _plant(x, 37, 0, inf), 1)]
    if mode != "log_p":
        cases.append(("-inf", lambda x: _plant(x, 37, 2, -inf), 1))
    if mode == "probs":
        cases += [("negative", lambda x: _plant(x, 37, 1, -0.1), 2),
                  ("sum 1.01", lambda x: _scale(x, 37, 1.01), 3),
                  ("zero row", lambda x: _scale(x, 37, 0.0), 3),
                  ("negative after nan", lambda x: _plant(_plant(x, 90, 0, nan), 37, 1, -0.5), 2)]
    if mode == "log_p":
        cases.append(("all -inf", lambda x: _scale(x, 37, 0.0, fill=-inf), 4))
    return cases


def _plant(x, i, j, v):
    x = x.clone()
    x[i, j % x.shape[1]] = v
    return x


def _scale(x, i, f, fill=None):
    x = x.clone()
    if fill is not None:
        x[i] = fill
    else:
        x[i] = x[i] * f
    return x
