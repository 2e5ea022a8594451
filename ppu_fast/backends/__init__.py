"""Backend registry: picks the backend that runs ``step`` / ``materialize`` for a tensor.

Order (docs/design.md §4): CUDA tensors try triton, cuda, torch; CPU tensors try cpu, torch.
``backend="auto"`` takes the first whose ``not_supported_reasons`` is empty; the environment
variable ``PPU_FAST_BACKEND`` replaces "auto" by a name; a named backend that cannot serve the
call raises with its reasons. Compiled and Triton backends are imported lazily, and a failed
import becomes a reason, never an import error of ``ppu_fast``.
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, List, Optional, Tuple

import torch

from .base import Backend

# name -> (module, class); modules are imported on first use only.
_SPECS: Dict[str, Tuple[str, str]] = {
    "triton": ("ppu_fast.backends.triton", "TritonBackend"),
    "cuda": ("ppu_fast.backends.cuda", "CudaBackend"),
    "cpu": ("ppu_fast.backends.cpu", "CpuBackend"),
    "torch": ("ppu_fast.backends.torch_ref", "TorchBackend"),
}
BACKEND_NAMES: Tuple[str, ...] = tuple(_SPECS)
_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

_cache: Dict[str, object] = {}


def load(name: str) -> Tuple[Backend | None, List[str]]:
    """Instantiate backend ``name``; returns (backend, []) or (None, [why it cannot load])."""
    if name not in _SPECS:
        raise ValueError(f"backend: unknown name {name!r}; expected 'auto' or one of "
                         f"{list(BACKEND_NAMES)}")
    if name not in _cache:
        module, cls = _SPECS[name]
        try:
            _cache[name] = getattr(importlib.import_module(module), cls)()
        except Exception as exc:  # any failure (missing module, no Triton) becomes a reason
            _cache[name] = [f"cannot import {module}: {type(exc).__name__}: {exc}"]
    got = _cache[name]
    if isinstance(got, list):
        return None, list(got)
    return got, []  # type: ignore[return-value]


def reasons(name: str, log_p: torch.Tensor) -> List[str]:
    """Why backend ``name`` cannot serve a call on ``log_p`` (empty: it can)."""
    backend, why = load(name)
    if backend is None:
        return why
    return backend.available_reasons() + backend.not_supported_reasons(log_p)


def check_backend_name(name: object) -> None:
    """Refuse a ``backend=`` that is not "auto" or a backend's name (before any data exists)."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a string, got {type(name).__name__}")
    if name != "auto" and name not in _SPECS:
        raise ValueError(f"backend: unknown name {name!r}; expected 'auto' or one of "
                         f"{list(BACKEND_NAMES)}")


def env_backend_name() -> str:
    """The backend ``PPU_FAST_BACKEND`` names ("auto" when unset or empty), or the ValueError for
    a name no backend has."""
    name = os.environ.get("PPU_FAST_BACKEND", "auto") or "auto"
    if name != "auto" and name not in _SPECS:
        raise ValueError(f"PPU_FAST_BACKEND: unknown backend name {name!r} (the environment "
                         f"variable replaces backend='auto'); expected 'auto' or one of "
                         f"{list(BACKEND_NAMES)}, or the variable unset")
    return name


def get_backend(name: str, log_p: torch.Tensor, shape: Optional[Tuple[int, int]] = None
                ) -> Backend:
    """Resolve ``name`` ("auto" or a backend name) to a backend able to run on ``log_p``;
    ``shape``: the whole input's (N, k) for messages, when ``log_p`` stands for it (a chunk, a
    probe row)."""
    check_backend_name(name)
    # Where the name came from, for the errors: a name set in the environment, away from the
    # call, must say so or the caller looks for a backend= argument that is not there.
    source = ""
    if name == "auto":
        name = env_backend_name()
        if name != "auto":
            source = " (from the environment variable PPU_FAST_BACKEND, which replaces 'auto')"
    if log_p.device.type == "cpu" and name in ("auto", "cpu"):
        isa = os.environ.get("PPU_FAST_CPU_ISA", "")
        if isa and isa != "auto":
            # A typo here must not quietly hand the call to the torch reference.
            from .cpu import check_isa
            check_isa(isa, "PPU_FAST_CPU_ISA")
    if name == "auto":
        order = _ORDER["cuda" if log_p.device.type == "cuda" else "cpu"]
        tried = []
        for cand in order:
            why = reasons(cand, log_p)
            if not why:
                return load(cand)[0]  # type: ignore[return-value]
            tried.append(f"{cand}: {'; '.join(why)}")
        raise RuntimeError("backend: no backend can run on this input:\n  " + "\n  ".join(tried))
    why = reasons(name, log_p)
    if why:
        raise RuntimeError(f"backend: {name!r}{source} cannot run on this input ({log_p.dtype}, "
                           f"{tuple(shape or log_p.shape)}, {log_p.device}): " + "; ".join(why))
    return load(name)[0]  # type: ignore[return-value]


def check_environment(device: "str | torch.device") -> None:
    """Refuse a bad ``PPU_FAST_BACKEND`` / ``PPU_FAST_CPU_ISA`` / ``PPU_FAST_HOST_CACHE_MB`` now:
    they are read when a refine starts, which in an unlearning run comes after the Original,
    Retrain and the methods before PPU have trained."""
    from .cpu import check_host_cache_env
    if os.environ.get("PPU_FAST_BACKEND") or os.environ.get("PPU_FAST_CPU_ISA"):
        get_backend("auto", torch.empty(1, 2, device=device))
    check_host_cache_env()


def describe() -> List[Tuple[str, bool, str]]:
    """(name, available, why-not) for every backend, judged without a particular input."""
    rows = []
    for name in BACKEND_NAMES:
        backend, why = load(name)
        if backend is not None:
            why = backend.available_reasons()
        rows.append((name, not why, "; ".join(why)))
    return rows
