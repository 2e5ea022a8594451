"""The torch ops a ``refine`` on the GPU backends dispatches, phase by phase: on a GPU each is a
launch, an allocation or a copy, a few microseconds of host time, and at 50,000 x 10 a pass's
kernel takes only a few microseconds of device time, so these counts are what a small refine's
host work is made of.

    python benchmarks/device_route_ops.py [--sizes 2000x10 2000x100] [--backends triton cuda]
                                          [--out benchmarks/results]

Runs on a CPU: triton under its interpreter (this script sets TRITON_INTERPRET=1 before Triton
is imported), cuda on the CPU emulation of its kernels (``csrc/cuda/emu/build.sh``, built into a
temporary folder, about 30 s; needs g++). ``ppu_fast.refine`` of the synthetic problem of
``run.py`` (a confident classifier, the first max(1, k // 10) classes forgotten, lam 1, Newton
to tol 1e-6), once untimed, then once counted: a ``TorchDispatchMode`` sees every op (a view
included), and the backend's kernel launches are counted apart. Phases: "api" (``refine``'s own
work around the backend), "prepare", "bind" (the bound step's planning), "passes" (all bound
passes together, and per pass), "final" (the pass that writes Q, ``materialize_sums``).
Caveat: on a GPU some of these ops act on CPU tensors and launch nothing (the "api" phase's
targets, ``torch.from_numpy`` and ``.numpy()`` bookkeeping, shown as lift_fresh / detach);
the op names are in the JSON. Writes device-route-ops-<stamp>.json / .md to ``--out``.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

import ppu_fast.api as api  # noqa: E402

PHASES = ("api", "prepare", "bind", "passes", "final")
ROOT = Path(__file__).resolve().parent.parent
# What is being counted: the current phase, the ops by phase, the kernel launches by phase and
# the bound passes (reset by count()).
STATE: dict = {"phase": "api", "passes": 0, "ops": collections.defaultdict(collections.Counter),
               "launches": collections.Counter()}


class _Counter(TorchDispatchMode):
    """Counts the ops dispatched while it is active, by the current phase."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        STATE["ops"][STATE["phase"]][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _in_phase(label: str, fn):
    def wrapped(*a, **kw):
        prev, STATE["phase"] = STATE["phase"], label
        try:
            return fn(*a, **kw)
        finally:
            STATE["phase"] = prev
    return wrapped


def _instrument(be):
    """Wrap the backend's entry points so that the ops they dispatch land in their phase."""
    be.prepare = _in_phase("prepare", be.prepare)
    be.materialize_sums = _in_phase("final", be.materialize_sums)
    bind = be.bind_step

    def bound(log_p, inv_c):
        run = _in_phase("bind", bind)(log_p, inv_c)

        def one_pass(*a, **kw):
            STATE["passes"] += 1
            return _in_phase("passes", run)(*a, **kw)
        return one_pass
    be.bind_step = bound
    return be


def _triton_backend():
    """A TritonBackend on CPU tensors (the interpreter), its launches counted; None without
    Triton."""
    try:
        import triton.runtime.interpreter as interp

        from ppu_fast.backends import triton as tb
    except ImportError:
        return None
    run = interp.InterpretedFunction.run

    def counted(self, *a, **kw):
        STATE["launches"][STATE["phase"]] += 1
        prev, STATE["phase"] = STATE["phase"], "kernel"  # the interpreter's own ops: not counted
        try:
            return run(self, *a, **kw)
        finally:
            STATE["phase"] = prev
    interp.InterpretedFunction.run = counted
    be = tb.TritonBackend()
    be._require = lambda *a, **kw: None
    return _instrument(be)


def _cuda_backend(build_dir: str):
    """A CudaBackend on CPU tensors over the CPU emulation of its kernels, its kernel calls
    counted; None when the emulation does not build."""
    from ppu_fast.backends import cuda as cb
    res = subprocess.run(["sh", str(ROOT / "csrc" / "cuda" / "emu" / "build.sh"), build_dir],
                         capture_output=True, text=True, env={**os.environ,
                                                              "PYTHON": sys.executable})
    if res.returncode != 0:
        print(f"cuda: the emulation did not build:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    spec = importlib.util.spec_from_file_location("_cuda", res.stdout.strip().splitlines()[-1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernels = {"prepare", "step", "materialize"}

    class _Proxy:  # CPU tensors have device index None: the emulation takes 0
        def __getattr__(self, name):
            f = getattr(mod, name)
            if not callable(f):
                return f

            def call(*a):
                if name in kernels:
                    STATE["launches"][STATE["phase"]] += 1
                return f(*(0 if v is None else v for v in a))
            return call

    proxy = _Proxy()
    os.environ["PPU_EMU_SMS"] = "1"
    cb._load_module = lambda: (proxy, "")
    cb._module = lambda: proxy
    cb._stream = lambda dev: 0
    cb.CudaBackend._require = lambda self, t, any_dtype=False: None
    return _instrument(cb.CudaBackend())


def count(be, n: int, k: int) -> dict:
    """Ops per phase of one refine of the synthetic n x k problem on ``be``."""
    real_get = api.get_backend
    api.get_backend = lambda name, t, shape=None: be
    try:
        y, p = common.confident_classifier(n, k)
        forget = y < max(1, k // 10)
        api.refine(p, forget, lam=1.0, tol=1e-6, backend=be.name)  # compiles, plans
        STATE["ops"].clear()
        STATE["launches"].clear()
        STATE["passes"] = 0
        with _Counter():
            _, info = api.refine(p, forget, lam=1.0, tol=1e-6, backend=be.name,
                                 return_info=True)
    finally:
        api.get_backend = real_get
    ops = {ph: dict(STATE["ops"][ph].most_common()) for ph in PHASES}
    return {"iterations": info.iterations, "bound_passes": STATE["passes"],
            "materialized": info.materialized, "ops": ops,
            "op_counts": {ph: sum(ops[ph].values()) for ph in PHASES},
            "launches": {ph: STATE["launches"][ph] for ph in PHASES}}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.size_arg, default=["2000x10", "2000x100"],
                    help="problem sizes NxK (small: the interpreter runs the kernels in numpy)")
    ap.add_argument("--backends", nargs="+", choices=["triton", "cuda"],
                    default=["triton", "cuda"], help="GPU backends to count")
    ap.add_argument("--out", type=common.out_dir,
                    default=str(common.RESULTS), help="results folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = common.metadata("cpu")
    meta["command"] = "python benchmarks/device_route_ops.py " + " ".join(sys.argv[1:])
    rows, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends:
            be = _triton_backend() if name == "triton" else _cuda_backend(tmp)
            if be is None:
                print(f"{name}: unavailable here, skipped", file=sys.stderr)
                continue
            for size in args.sizes:
                n, k = (int(v) for v in size.split("x"))
                r = count(be, n, k)
                per_pass = r["op_counts"]["passes"] / max(r["bound_passes"], 1)
                rows.append({"backend": name, "size": size, **r})
                c = r["op_counts"]
                table.append([name, size, str(r["iterations"]), str(r["bound_passes"]),
                              str(c["api"]), str(c["prepare"]), str(c["bind"]),
                              f"{c['passes']} ({per_pass:.1f})", str(c["final"]),
                              str(sum(c.values()))])
                print(" | ".join(table[-1]), flush=True)
    stem = common.write_record(
        Path(args.out), "device-route-ops", meta, rows,
        "torch ops dispatched by a refine on the GPU backends, by phase",
        "ppu_fast.refine on CPU tensors (triton: its interpreter; cuda: the CPU emulation of its "
        "kernels), Newton tol 1e-6, lam 1, the first max(1, k // 10) classes forgotten; every "
        "dispatched op counted once (views and host-side bookkeeping included; kernel launches "
        "not), the second of two calls",
        ["backend", "size", "passes", "bound passes", "api", "prepare", "bind",
         "passes (per pass)", "final", "total"], table)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
