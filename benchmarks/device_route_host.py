"""The host work of one solver pass on the GPU backends, by route: the base class's generic
``bind_step`` (``step`` per pass: its checks and allocations, the Hessian assembled by torch ops,
a concatenation and a copy) against the backend's own (checked and planned once, alpha staged,
one packed copy, H assembled in numpy).

    python benchmarks/device_route_host.py [--ks 10 100] [--reps 2000] [--out benchmarks/results]

Runs anywhere: on CPU tensors with the kernel launches replaced by stand-ins that only fill
what the kernels would write with plausible sums (the cuda backend's packed result, the triton
kernel's partial sums; the same stand-in for both routes), so what is timed is the Python,
numpy and torch work of each route and nothing else. On a GPU each of the generic route's torch
ops is also a kernel launch and its copies wait for the device, so these figures are a lower
bound of what the bound route saves there; ``benchmarks/run.py``'s ``refine step route`` rows
measure the whole difference on a device. Medians of ``--reps`` passes per route, Hessian mode
and k (32 rows), the two routes taking turns. Writes device-route-host-<stamp>.json / .md to
``--out``.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

from ppu_fast.backends import base  # noqa: E402
from ppu_fast.backends import cuda as cb  # noqa: E402


class _NoKernels:
    """Stands in for ``ppu_fast._cuda``: the plans of a small grid, and a ``step`` that only
    writes its packed result."""

    SMALL_K = 32
    ROW_K = 1024

    @staticmethod
    def plan_step(n, k, mode, dtype, device, write=False):
        width = k + 1 + (k if mode else 0) + (k * k if mode == 2 else 0)
        return 2, width, 2 * width + 2

    @staticmethod
    def step(log_p, dtype, n, k, sr, sc, inv_c, alpha, mode, m, ws, ws_size, out, device,
             stream):
        # What the kernels would leave: the packed result written (plausible positive sums, so
        # the Hessian's assembly takes its usual path, not that of classes no row reaches).
        width = _NoKernels.plan_step(n, k, mode, dtype, device)[1]
        ctypes.memmove(out, _filled(width).ctypes.data, 8 * width)


_FILLED = {}


def _filled(width: int) -> np.ndarray:
    if width not in _FILLED:
        _FILLED[width] = np.full(width, 0.01)
    return _FILLED[width]


def _cuda_backend():
    """A CudaBackend on CPU tensors with no kernels behind it."""
    cb._load_module = lambda: (_NoKernels, "")
    cb._module = lambda: _NoKernels
    cb._stream = lambda dev: 0
    cb.CudaBackend._require = lambda self, t: None
    return cb.CudaBackend()


def _triton_backend():
    """A TritonBackend on CPU tensors whose step kernel only writes its partial sums (None
    without Triton)."""
    try:
        from ppu_fast.backends import triton as tb
    except ImportError:
        return None

    class _NoLaunch:
        def __getitem__(self, grid):
            # What the kernel would leave: its programs' partial sums written (plausible
            # positive values, as in _NoKernels.step).
            return lambda *a, **kw: a[3].fill_(0.01)

    tb._step_tile_kernel = _NoLaunch()
    tb.TritonBackend._require = lambda self, t: None
    return tb.TritonBackend()


def time_routes(routes: dict, alpha: np.ndarray, hessian, reps: int) -> dict:
    """Median microseconds per pass of each ``run(alpha, hessian)`` in ``routes``, the routes
    taking turns pass by pass (so a slow spell of the machine hits both), after 100 untimed
    rounds."""
    for _ in range(100):
        for run in routes.values():
            run(alpha, hessian)
    ts = {name: [] for name in routes}
    for _ in range(reps):
        for name, run in routes.items():
            t = time.perf_counter()
            run(alpha, hessian)
            ts[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e6 for name, v in ts.items()}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--ks", nargs="+", type=common.positive_int, default=[10, 100],
                    help="numbers of classes k (32 rows each)")
    ap.add_argument("--reps", type=common.positive_int, default=2000,
                    help="timed passes per route, Hessian mode and k")
    ap.add_argument("--out", type=common.out_dir,
                    default=str(common.RESULTS), help="results folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = common.metadata("cpu")
    meta["command"] = "python benchmarks/device_route_host.py " + " ".join(sys.argv[1:])
    backends = [("cuda", _cuda_backend())]
    tri = _triton_backend()
    if tri is not None:
        backends.append(("triton", tri))
    rows, table = [], []
    g = torch.Generator().manual_seed(0)
    for name, be in backends:
        for k in args.ks:
            log_p = torch.log_softmax(torch.randn(32, k, generator=g), dim=1)
            inv_c = torch.ones(32)
            alpha = np.linspace(-1.0, 1.0, k)
            routes = {"generic": base.Backend.bind_step(be, log_p, inv_c),
                      "bound": be.bind_step(log_p, inv_c)}
            # The dense Hessian's W is the step kernels' only for k <= 32; above, both routes
            # form it with the materialize kernel, which the stand-ins do not replace
            # (device_route_ops.py counts that route's ops).
            for hessian in ([True, "diag"] if k <= 32 else ["diag"]):
                us = time_routes(routes, alpha, hessian, args.reps)
                row = {"backend": name, "k": k, "hessian": str(hessian),
                       "generic_us": us["generic"], "bound_us": us["bound"],
                       "saved_us": us["generic"] - us["bound"]}
                rows.append(row)
                table.append([name, str(k), "dense" if hessian is True else "diagonal",
                              f"{us['generic']:.1f}", f"{us['bound']:.1f}",
                              f"{us['generic'] / us['bound']:.1f}x"])
                print(" | ".join(table[-1]), flush=True)
    stem = common.write_record(
        Path(args.out), "device-route-host", meta, rows,
        "one solver pass's host work on the GPU backends, by route (kernels stubbed)",
        f"CPU tensors, 32 rows, the kernel launches replaced by stand-ins that fill what the "
        f"kernels would write; medians of {args.reps} "
        f"passes; generic = the base class's bind_step (step per pass), bound = the backend's "
        f"own. A lower bound of the saving on a GPU, where the generic route's torch ops are "
        f"also launches.",
        ["backend", "k", "Hessian", "generic us / pass", "bound us / pass", "ratio"], table)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
