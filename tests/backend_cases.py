"""Shared cases and accuracy checks for every backend's ``step`` / ``materialize``.

Each backend's test module parametrises over ``CASES`` and calls ``check_step`` /
``check_materialize``. The rule (DESIGN.md §4, flash-attention's): a backend's error against the
float64 oracle may be at most twice the float32 reference's own error on the same input, plus a
small floor for reordered float32 sums.
"""

from __future__ import annotations

import itertools
from typing import Optional, Tuple

import torch

from ppu_fast.backends.torch_ref import oracle_q, oracle_step, reference_materialize, reference_step

KS = (1, 2, 3, 10, 17, 100, 1000, 1023)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Floors on the relative error, per quantity: reordering float32 sums differs by a few ulps.
FLOOR = 2e-6


def make_case(n: int, k: int, dtype: torch.dtype = torch.float32, *, shift: float = 3.0,
              neg_inf: bool = False, noncontig: bool = False, seed: int = 0,
              device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random (log_p (n x k) in ``dtype``, inv_c (n,) f32, alpha (k,) f64).

    ``shift`` scales alpha so that |alpha * inv_c| reaches about ``shift``; ``neg_inf`` puts -inf
    entries (zero probabilities) in, never a whole row; ``noncontig`` returns a strided view.
    """
    g = torch.Generator().manual_seed(seed)
    cols = 2 * k if noncontig else k
    logits = torch.randn(n, cols, generator=g, dtype=torch.float64) * 2.0
    log_p = torch.log_softmax(logits, dim=1)
    if neg_inf and k > 1:
        mask = torch.rand(n, cols, generator=g) < 0.2
        mask[:, 0] = False  # keep every row feasible
        log_p = log_p.masked_fill(mask, float("-inf"))
    log_p = log_p.to(dtype)
    if noncontig:
        log_p = log_p[:, ::2]
    inv_c = torch.where(torch.rand(n, generator=g) < 0.3, torch.tensor(1.0),
                        torch.tensor(1.0 / 3.0)).float()
    alpha = torch.randn(k, generator=g, dtype=torch.float64) * shift
    return log_p.to(device), inv_c.to(device), alpha.to(device)


def rel_err(x: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """||x - ref|| / max(||ref||, scale): relative, except that a reference far below its natural
    ``scale`` (a Hessian of nearly one-hot rows is ~0) is judged on that scale instead."""
    x, ref = x.double().cpu(), ref.double().cpu()
    assert not torch.isnan(x).any(), "NaN in backend output"
    return float((x - ref).norm() / max(float(ref.norm()), scale, 1e-300))


def check_step(backend, log_p: torch.Tensor, inv_c: torch.Tensor, alpha: torch.Tensor,
               hessian=False) -> None:
    """Assert ``backend.step`` is as accurate as the float32 reference (2x rule + floor)."""
    got = backend.step(log_p, inv_c, alpha, hessian)
    ref = reference_step(log_p, inv_c, alpha, hessian)
    ora = oracle_step(log_p.cpu(), inv_c.cpu(), alpha.cpu(), hessian)
    names = ("colsum", "wlogz", "hessian")
    for name, g, r, o in zip(names, got, ref, ora):
        if o is None:
            assert g is None, f"{name}: expected None"
            continue
        assert g.dtype == torch.float64, f"{name}: dtype {g.dtype}, expected float64"
        assert g.shape == o.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(o.shape)}"
        # ||H|| <= sum_i inv_c_i / 2; float32 rounding is relative to that bound, not to ||H||.
        scale = 1e-3 * float(inv_c.double().sum()) if name == "hessian" else 0.0
        e_got, e_ref = rel_err(g, o, scale), rel_err(r, o, scale)
        assert e_got <= 2 * e_ref + FLOOR, f"{name}: error {e_got:.3g} vs reference {e_ref:.3g}"


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
    ora = oracle_q(log_p.cpu(), inv_c.cpu(), alpha.cpu())
    e_got, e_ref = rel_err(out, ora), rel_err(ref, ora)
    assert e_got <= 2 * e_ref + FLOOR, f"Q: error {e_got:.3g} vs reference {e_ref:.3g}"
    if torch.isinf(log_p).any():
        assert (out[torch.isinf(log_p)] == 0).all(), "-inf log-probabilities must give exact zeros"


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
