"""``prepare`` cases shared by the interpreter tests (test_triton_kernels.py, CPU tensors) and the
GPU tests (tests/test_backend_triton.py, CUDA tensors).  Not a test module: nothing here runs
Triton at import, so it imports with or without the interpreter."""

from __future__ import annotations

import torch

from backend_cases import check_prepare, prepare_inputs
from ppu_fast.backends.torch_ref import reference_prepare

MODES = ("probs", "logits", "log_p")
# (x dtype, out dtype or None, non-contiguous x, forget: None / "mask" / "fill", inv_c given,
# hessian): rotated over (k, mode) so that every option meets every k and mode somewhere.
CONFIGS = [
    (torch.float32, torch.float32, False, "fill", True, True),
    (torch.float64, torch.float32, False, None, True, "diag"),
    (torch.float16, torch.float16, True, "mask", False, False),
    (torch.float32, torch.float32, True, None, True, True),
    (torch.bfloat16, torch.bfloat16, False, "fill", True, "diag"),
    (torch.float64, torch.float32, True, "fill", True, False),
    (torch.float32, None, False, "mask", True, "diag"),   # "log_p" only: validate, no out
    (torch.float16, torch.float32, False, "fill", True, "diag"),
]
HALF = (torch.float16, torch.bfloat16)


def prepare_case(b, n, k, mode, cfg, seed, margin=0.0, device="cpu"):
    """Build a random valid ``prepare`` input for config ``cfg`` and check ``b.prepare`` on it
    (``backend_cases.check_prepare``).  Returns (x, forget, fill, inv_c)."""
    x_dtype, out_dtype, noncontig, fkind, with_inv_c, hessian = cfg
    if out_dtype is None and mode != "log_p":
        out_dtype = torch.float32
    if mode != "log_p" and fkind == "mask" and with_inv_c:
        with_inv_c = False  # the first evaluation needs final rows (fill)
    if mode == "log_p":
        fkind = None  # log_p mode writes x as it is: no forget set, no fill (refused)
    x = prepare_inputs(n, k, mode, dtype=x_dtype, seed=seed, noncontig=noncontig, margin=margin,
                       device=device)
    g = torch.Generator().manual_seed(seed + 1)
    forget = (torch.rand(n, generator=g) < 0.25).to(device) if fkind else None
    fill = (torch.log_softmax(torch.randn(k, generator=g), dim=0).float().to(device)
            if fkind == "fill" else None)
    if fill is not None and noncontig:
        # A strided fill (every other entry of a buffer): Triton's prepare read it as contiguous.
        buf = torch.full((2 * k,), float("nan"), device=device)
        buf[::2] = fill
        fill = buf[::2]
    inv_c = (torch.where(torch.rand(n, generator=g) < 0.3, 1.0, 1 / 3).float().to(device)
             if with_inv_c else None)
    tol = max(1e-3, 2 * torch.finfo(x_dtype).eps)
    if mode == "log_p" and out_dtype in HALF and inv_c is not None and hessian is not False:
        # The first evaluation is of the values as stored (rounded to half precision), the
        # oracle's of x: judge its Hessian against the reference on the same buffer instead.
        check_prepare(b, x, mode, forget, fill, out_dtype, inv_c, False, tol)
        check_half_first(b, x, forget, fill, out_dtype, inv_c, hessian)
    else:
        check_prepare(b, x, mode, forget, fill, out_dtype, inv_c, hessian, tol)
    return x, forget, fill, inv_c


def check_half_first(b, x, forget, fill, out_dtype, inv_c, hessian):
    """"log_p" into a half buffer: the first evaluation (colsum, wlogz, H) matches the reference's,
    which evaluates the same rounded values."""
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    got = b.prepare(x, "log_p", forget, fill, out, inv_c, hessian)
    ref = reference_prepare(x, "log_p", forget, fill, torch.empty_like(out), inv_c, hessian)
    for g, r in zip(got.first, ref.first):
        assert float((g - r).norm()) <= 1e-5 * float(r.norm()) + 1e-12, (g, r)
