"""Backend registry: ordering, forcing, the environment override and ``python -m ppu_fast.info``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ppu_fast
from ppu_fast import backends
from ppu_fast.backends.torch_ref import TorchBackend
from backend_cases import check_materialize, check_step, make_case


def test_auto_on_cpu_picks_first_available_cpu_backend():
    lp = torch.log_softmax(torch.randn(5, 3), 1)
    be = backends.get_backend("auto", lp)
    expected = "cpu" if not backends.reasons("cpu", lp) else "torch"
    assert be.name == expected


def test_env_override(monkeypatch, small_problem):
    p, mask = small_problem
    monkeypatch.setenv("PPU_FAST_BACKEND", "torch")
    _, info = ppu_fast.refine(p, mask, return_info=True)
    assert info.backend == "torch"
    monkeypatch.setenv("PPU_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend: unknown name 'nonsense'"):
        ppu_fast.refine(p, mask)


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
def test_reference_backend_meets_its_own_contract(hessian):
    lp, ic, a = make_case(211, 17, torch.float32, neg_inf=True)
    check_step(TorchBackend(chunk_elems=17 * 50), lp, ic, a, hessian)  # several chunks
    check_materialize(TorchBackend(chunk_elems=17 * 50), lp, ic, a)


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
