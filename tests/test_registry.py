"""Backend registry: ordering, forcing, the environment override and ``python -m ppu_fast.info``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import ppu_fast
from ppu_fast import backends
from ppu_fast.backends.torch_ref import TorchBackend
from backend_cases import HESS_TOL, hessian_floor, make_case, rel_err
from oracle import hessian_error, oracle_q, oracle_step, wlogz_scale


def _compiled_cpu_module_present() -> bool:
    try:
        importlib.import_module("ppu_fast._C")
    except ImportError:
        return False
    return True


def test_auto_on_cpu_picks_the_compiled_backend():
    """Judged without the registry: with ppu_fast._C importable, "auto" must give "cpu" (a silent
    fallback to the torch reference fails here)."""
    lp = torch.log_softmax(torch.randn(5, 3), 1)
    be = backends.get_backend("auto", lp)
    if not _compiled_cpu_module_present():
        pytest.skip("ppu_fast._C is not built (pip install -e .)")
    assert be.name == "cpu"
    _, info = ppu_fast.refine(torch.softmax(torch.randn(50, 4), 1), [0, 3], return_info=True)
    assert info.backend == "cpu"


def test_auto_falls_back_to_torch_only_with_a_reason(monkeypatch):
    """Without the compiled module, "auto" serves CPU tensors with the reference and the reason is
    visible in describe()."""
    monkeypatch.setitem(backends._cache, "cpu", ["cannot import ppu_fast.backends.cpu: test"])
    lp = torch.log_softmax(torch.randn(5, 3), 1)
    assert backends.get_backend("auto", lp).name == "torch"
    assert dict((r[0], r[2]) for r in backends.describe())["cpu"].endswith(": test")
    with pytest.raises(RuntimeError, match=r"backend: 'cpu' cannot run.*: test"):
        backends.get_backend("cpu", lp)


def test_env_override(monkeypatch, small_problem):
    p, mask = small_problem
    monkeypatch.setenv("PPU_FAST_BACKEND", "torch")
    _, info = ppu_fast.refine(p, mask, return_info=True)
    assert info.backend == "torch"
    monkeypatch.setenv("PPU_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PPU_FAST_BACKEND: unknown backend name 'nonsense'"):
        ppu_fast.refine(p, mask)


def test_env_override_errors_name_the_variable(monkeypatch, small_problem, tmp_path):
    """A bad PPU_FAST_BACKEND said "backend: unknown name 'nope'", sending the caller to a
    backend= argument they had not passed: refine, solve and refine_file name the variable; a
    backend= given in the call is still named as the argument."""
    import numpy as np

    p, mask = small_problem
    np.save(tmp_path / "p.npy", p.numpy())
    monkeypatch.setenv("PPU_FAST_BACKEND", "nope")
    match = (r"^PPU_FAST_BACKEND: unknown backend name 'nope' \(the environment variable replaces "
             r"backend='auto'\); expected 'auto' or one of \[.*'cpu'.*\], or the variable unset$")
    calls = [lambda: ppu_fast.refine(p, mask),
             lambda: ppu_fast.solve(torch.log(p), torch.ones(len(p)), p.sum(0)),
             lambda: ppu_fast.refine_file(tmp_path / "p.npy", mask.numpy(), tmp_path / "q.npy",
                                          chunk_rows=64)]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match=r"^backend: unknown name 'jax'"):
        ppu_fast.refine(p, mask, backend="jax")
    assert ppu_fast.refine(p, mask, return_info=True, backend="torch")[1].backend == "torch"
    # triton refuses float64 on every machine (its kernels compute in float32), GPU or not.
    monkeypatch.setenv("PPU_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"^backend: 'triton' \(from the environment variable "
                                           r"PPU_FAST_BACKEND, which replaces 'auto'\) cannot run "
                                           r"on this input"):
        ppu_fast.refine(p.double(), mask)


@pytest.mark.skipif(not _compiled_cpu_module_present(), reason="the compiled cpu module is absent")
def test_a_bad_cpu_isa_variable_is_named(monkeypatch):
    """PPU_FAST_CPU_ISA, the other variable that selects something, is named as well when the
    cpu backend is built from it (not only when get_backend checks it)."""
    from ppu_fast.backends.cpu import CpuBackend

    monkeypatch.setenv("PPU_FAST_CPU_ISA", "avx-512")
    with pytest.raises(ValueError, match=r"^PPU_FAST_CPU_ISA: unknown CPU kernel 'avx-512'"):
        CpuBackend()
    with pytest.raises(ValueError, match=r"^isa: unknown CPU kernel 'sse'"):
        CpuBackend(isa="sse")


def test_forcing_an_unavailable_backend_raises_with_reasons(small_problem):
    p, mask = small_problem
    unavailable = [n for n, ok, _ in backends.describe() if not ok]
    if not unavailable:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=rf"backend: '{unavailable[0]}' cannot run"):
        ppu_fast.refine(p, mask, backend=unavailable[0])


def test_describe_lists_every_backend_with_reason():
    rows = backends.describe()
    assert [r[0] for r in rows] == list(backends.BACKEND_NAMES)
    for name, ok, why in rows:
        assert ok or why, f"{name} is unavailable without a reason"
    assert dict((r[0], r[1]) for r in rows)["torch"]


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "ppu_fast.info"], capture_output=True, text=True,
                         check=True).stdout
    for name in backends.BACKEND_NAMES:
        assert name in out
    assert "torch" in out and "available" in out


@pytest.mark.parametrize("hessian", [False, True, "diag"])
def test_chunked_reference_against_float64(hessian):
    """The reference over several row chunks, judged against the float64 oracle."""
    lp, ic, a = make_case(211, 17, torch.float32, neg_inf=True)
    ref = TorchBackend(chunk_elems=17 * 50)
    colsum, wlogz, h = ref.step(lp, ic, a, hessian)
    o_colsum, o_wlogz, o_h = oracle_step(lp, ic, a, hessian)
    assert rel_err(colsum, o_colsum) <= 1e-5
    assert abs(float(wlogz) - o_wlogz) <= 1e-5 * wlogz_scale(lp, ic, a)
    if hessian is not False:
        assert hessian_error(h, o_h, hessian_floor(ic)) <= HESS_TOL
    q = torch.empty_like(lp)
    ref.materialize(lp, ic, a, q)
    assert rel_err(q, oracle_q(lp, ic, a)) <= 1e-5


def test_reference_materialize_may_alias_its_input():
    lp, ic, a = make_case(300, 9, torch.float32)
    expected = torch.empty_like(lp)
    TorchBackend().materialize(lp, ic, a, expected)
    buf = lp.clone()
    TorchBackend(chunk_elems=9 * 64).materialize(buf, ic, a, buf)
    assert torch.equal(buf, expected)


def test_solver_demo_runs():
    out = subprocess.run([sys.executable, "-m", "ppu_fast", "--n", "3000", "--k", "10"],
                         capture_output=True, text=True, check=True).stdout
    assert "newton" in out and "sinkhorn" in out and "gradient" in out
