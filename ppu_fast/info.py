"""``python -m ppu_fast.info``: every backend, available or not, and why; versions and devices."""

from __future__ import annotations

import os
import platform
import sys
from typing import List


def report() -> List[str]:
    """Lines describing the environment and each backend's availability."""
    import torch

    from . import __version__
    from .backends import describe

    lines = [f"ppu_fast {__version__}  python {platform.python_version()}  torch {torch.__version__}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: not importable ({type(exc).__name__})")
    if torch.cuda.is_available():
        lines.append(f"cuda device: {torch.cuda.get_device_name(0)} "
                     f"(torch CUDA {torch.version.cuda})")
    else:
        lines.append("cuda device: none")
    lines.append(f"cpu threads: {torch.get_num_threads()}  machine: {platform.machine()}")
    # What every refine would refuse in the environment, on any device: an unknown backend name,
    # a CPU ISA typo, a bad host-cache limit. (Checking the override against a CPU tensor called
    # a valid PPU_FAST_BACKEND=cuda invalid: that backend serves CUDA tensors only.)
    from .backends import env_backend_name
    from .backends.cpu import check_host_cache_env, check_isa
    problems = []
    override = os.environ.get("PPU_FAST_BACKEND")
    try:
        env_backend_name()
        if override:
            lines.append(f"PPU_FAST_BACKEND={override} (overrides backend='auto')")
    except ValueError as exc:
        problems.append(str(exc))
    isa = os.environ.get("PPU_FAST_CPU_ISA", "")
    for check in ((lambda: check_isa(isa, "PPU_FAST_CPU_ISA")) if isa and isa != "auto" else None,
                  check_host_cache_env):
        if check is None:
            continue
        try:
            check()
        except (ValueError, RuntimeError) as exc:
            problems.append(str(exc))
    for why in problems:
        lines.append(f"environment: invalid, every refine refuses it: {why}")
    lines.append("backends:")
    for name, ok, why in describe():
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}"
                     + ("" if ok else f": {why}"))
    return lines


def main() -> int:
    """``python -m ppu_fast.info``: print :func:`report` (the backends, which run here and why not)."""
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
