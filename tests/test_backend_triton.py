"""Tests of the ``triton`` backend.

* On the CPU (CI): the kernels run under Triton's interpreter, which must be enabled before Triton
  is imported, so ``test_kernels_under_interpreter`` runs ``tests/triton_interp`` in a fresh
  ``pytest`` process with ``TRITON_INTERPRET=1`` (that directory skips itself otherwise).
* In this process (interpreter off): how the backend reports itself to the registry.
* On a GPU (``-m gpu``): the shared cases, determinism and the wide-row kernels on CUDA tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend_cases import cases, check_materialize, check_step, make_case
from ppu_fast.backends import load, reasons

ROOT = Path(__file__).resolve().parents[1]
INNER = ROOT / "tests" / "triton_interp"
HAVE_TRITON = load("triton")[0] is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not importable: "
                                  + "; ".join(load("triton")[1]))
HAVE_GPU = torch.cuda.is_available()


@needs_triton
def test_kernels_under_interpreter():
    """Every kernel path on CPU tensors under TRITON_INTERPRET=1, in its own process."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PPU_FAST_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(INNER), "-q", "-p", "no:cacheprovider",
         "-o", "addopts=", "--durations=5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed (rc {proc.returncode}):\n{tail}"
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "failed" not in last, tail


def test_inner_module_skips_without_interpreter():
    """The interpreter-only module must not run (nor import Triton kernels) in a normal run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs with the interpreter on")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(INNER), "-q", "-p", "no:cacheprovider",
         "-o", "addopts="],
        cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="0",
                           PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")])),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5 or "skipped" in proc.stdout, proc.stdout[-2000:]
    assert " passed" not in proc.stdout, proc.stdout[-2000:]


@needs_triton
def test_reports_reasons_without_interpreter():
    from ppu_fast.backends.triton import INTERPRET, TritonBackend

    b = TritonBackend()
    cpu = torch.randn(4, 3)
    if INTERPRET:
        pytest.skip("this process runs with the interpreter on")
    assert any("TRITON_INTERPRET" in r for r in b.not_supported_reasons(cpu))
    assert any("dtype" in r for r in b.not_supported_reasons(cpu.double()))
    if not HAVE_GPU:
        assert b.available_reasons() == ["no CUDA device and TRITON_INTERPRET is not 1"]
        assert reasons("triton", cpu)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            b.step(cpu.log_softmax(1), torch.ones(4), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="online_block_k"):
        TritonBackend(online_block_k=48)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

CASES = cases()
IDS = [f"n{n}-k{k}-{str(dt).split('.')[-1]}-s{s:g}{'-inf' if ni else ''}{'-nc' if nc else ''}"
       for n, k, dt, s, ni, nc in CASES]


def _backends(k):
    from ppu_fast.backends.triton import TritonBackend

    out = [TritonBackend()]
    if k > 16:  # the wide-row kernels, forced, with several k-blocks
        out.append(TritonBackend(max_single_block_k=16, online_block_k=64 if k <= 100 else 256))
    return out


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device")
@pytest.mark.parametrize("n,k,dtype,shift,neg_inf,noncontig", CASES, ids=IDS)
def test_gpu_cases(n, k, dtype, shift, neg_inf, noncontig):
    log_p, inv_c, alpha = make_case(n, k, dtype, shift=shift, neg_inf=neg_inf,
                                    noncontig=noncontig, seed=n + k, device="cuda")
    for b in _backends(k):
        for hessian in (False, True, "diag"):
            check_step(b, log_p, inv_c, alpha, hessian)
        check_materialize(b, log_p, inv_c, alpha)
        check_materialize(b, log_p, inv_c, alpha, out_dtype=torch.float32)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device")
@pytest.mark.parametrize("n,k", [(100_003, 10), (20_011, 1000), (2_003, 5000), (509, 32_000)])
def test_gpu_large_deterministic_and_accurate(n, k):
    """Shapes with many tiles per program (persistent loop) and the default wide-row path
    (k = 5000, 32,000): bit-identical reruns, agreement with the float64 oracle."""
    from ppu_fast.backends.triton import TritonBackend

    log_p, inv_c, alpha = make_case(n, k, torch.float32, seed=k, device="cuda")
    b = TritonBackend()
    for hessian in (False, "diag"):
        r1 = b.step(log_p, inv_c, alpha, hessian)
        r2 = b.step(log_p, inv_c, alpha, hessian)
        for x, y in zip(r1, r2):
            assert (x is None and y is None) or torch.equal(x, y), "two runs differ"
        check_step(b, log_p, inv_c, alpha, hessian)
    if k <= 1000:
        check_step(b, log_p, inv_c, alpha, True)
    check_materialize(b, log_p, inv_c, alpha, out_dtype=torch.float32)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device")
def test_gpu_registry_picks_triton_first():
    from ppu_fast.backends import get_backend

    log_p = torch.randn(8, 4, device="cuda").log_softmax(1)
    assert reasons("triton", log_p) == []
    if os.environ.get("PPU_FAST_BACKEND", "auto") in ("", "auto"):
        assert get_backend("auto", log_p).name == "triton"
