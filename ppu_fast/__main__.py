"""``python -m ppu_fast``: the solver demo on a synthetic CIFAR-10-sized problem.

Builds a confident synthetic classifier's probabilities (50,000 x 10), forgets one whole class,
refines with each method and prints passes, residual and time. ``python -m ppu_fast demo | run |
refine ...`` is the ``ppu-fast`` command.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Tuple

import torch


def synthetic_probs(n: int, k: int, seed: int = 0,
                    margin: float = 6.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels (n,), probabilities (n x k)) of a confident classifier: true-class logit + margin."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), y] += margin
    return y, torch.softmax(logits, dim=1)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo (or, for ``demo | run | refine``, the ``ppu-fast`` command) on ``argv``
    (default ``sys.argv[1:]``); returns the exit status."""
    args_in = sys.argv[1:] if argv is None else list(argv)
    if args_in and args_in[0] in ("demo", "run", "refine"):
        # `python -m ppu_fast refine ...` is the `ppu-fast` command, as a user would guess.
        from .cli import main as cli_main
        return cli_main(args_in)
    ap = argparse.ArgumentParser(prog="python -m ppu_fast", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--n", type=int, default=50_000, help="rows (training examples)")
    ap.add_argument("--k", type=int, default=10, help="classes")
    ap.add_argument("--forget-class", type=int, default=5)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(args_in)
    # Refused as argparse refuses a bad value (usage, status 2), not a traceback or a table of NaN.
    if args.n < 1:
        ap.error(f"argument --n: expected at least 1 row, got {args.n}")
    if args.k < 2:
        ap.error(f"argument --k: expected at least 2 classes, got {args.k}")
    if not 0 <= args.forget_class < args.k:
        ap.error(f"argument --forget-class: expected a class in [0, {args.k}), got {args.forget_class}")
    if not 1e-30 <= args.lam <= 1e30:  # refine's range (problem.check_lam)
        ap.error(f"argument --lam: expected a positive number in [1e-30, 1e30], got {args.lam}")
    from .stream import check_device
    from .backends import get_backend
    try:
        check_device(args.device)
        get_backend(args.backend, torch.empty(1, 2, device=args.device))
    except (ValueError, RuntimeError) as exc:
        ap.error(str(exc))
    try:
        return _solve_demo(ap, args)
    except (MemoryError, RuntimeError) as exc:
        # As the ppu-fast commands: a size the machine cannot hold is not a crash to debug.
        from .cli import allocation_failed

        text = str(exc) or type(exc).__name__
        if not (isinstance(exc, MemoryError) or allocation_failed(exc)):
            raise
        print(f"{ap.prog}: error: out of memory ({text.splitlines()[0]}); expected sizes that "
              f"fit this machine (--n, --k)", file=sys.stderr)
        return 3


def _solve_demo(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The demo's table of the three methods on validated ``args``; returns the exit status."""
    import ppu_fast

    y, p = synthetic_probs(args.n, args.k)
    p = p.to(args.device)
    mask = (y == args.forget_class).to(args.device)
    if not bool(mask.any()):
        ap.error(f"argument --forget-class: no row of the {args.n} is of class {args.forget_class}; "
                 f"expected more rows (--n)")
    print(f"refining {args.n} x {args.k} probabilities, forgetting class {args.forget_class} "
          f"({int(mask.sum())} rows), lam={args.lam}")
    print(f"{'method':10s} {'backend':8s} {'passes':>6s} {'residual':>10s} {'ms':>9s}  "
          f"forget rows' mean prob. of class {args.forget_class}")
    for method in ("newton", "sinkhorn", "gradient"):
        t = time.perf_counter()
        q, info = ppu_fast.refine(p, mask, lam=args.lam, method=method, backend=args.backend,
                                  return_info=True)
        ms = (time.perf_counter() - t) * 1e3
        share = float(q[mask][:, args.forget_class].mean())
        print(f"{method:10s} {info.backend:8s} {info.iterations:6d} {info.residual:10.2e} "
              f"{ms:9.1f}  {share:.4f} (was {float(p[mask][:, args.forget_class].mean()):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
