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
    from .backends import check_environment
    try:
        # What a refine would refuse in the environment (a backend name, an ISA, the host cache's
        # limit): said here, not shown as if in effect.
        check_environment("cpu")
        env_error = None
    except (ValueError, RuntimeError) as exc:
        env_error = str(exc)
    override = os.environ.get("PPU_FAST_BACKEND")
    if override and env_error is None:
        lines.append(f"PPU_FAST_BACKEND={override} (overrides backend='auto')")
    if env_error is not None:
        lines.append(f"environment: invalid, every refine refuses it: {env_error}")
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
