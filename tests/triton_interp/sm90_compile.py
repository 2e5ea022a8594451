"""Compile the Triton backend's kernels for an H100/H200 (sm_90) on a machine without a GPU.

Usage (interpreter OFF; needs Triton's bundled ptxas / cuobjdump, no CUDA device):

    python tests/triton_interp/sm90_compile.py            # every launcher path, a table
    python tests/triton_interp/sm90_compile.py --sass DIR # also write each variant's SASS

The launchers (``_launch_step`` / ``_launch_prepare`` / ``_launch_materialize``) run on CPU
tensors exactly as they would on CUDA ones; every kernel launch is intercepted and, instead of
running, compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with the same
specialisation the JIT would use (dtypes, 16-byte alignment, ints equal to 1, constexprs).  For each
compiled variant it reports registers per thread, spill bytes (ptxas via ``cuobjdump
-res-usage``), shared memory, and counts of the SASS instructions that matter for a streaming
kernel (global loads / stores, shared loads / stores, barriers, MUFU, float64 ops) in the whole
kernel.  ``tests/test_backend_triton.py::test_kernels_compile_for_sm90`` runs ``--check`` (every
path must compile without spills).  docs/triton_notes.md records the numbers.
"""

from __future__ import annotations

import argparse
import os
import warnings
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run with TRITON_INTERPRET unset: the interpreter does not compile")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import ppu_fast.backends.triton as tri  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
RECORDS = []
_SASS_OPS = {"LDG": r"\bLDG\.", "STG": r"\bSTG\.", "LDGSTS": r"\bLDGSTS\b", "LDS": r"\bLDS\b",
             "STS": r"\bSTS\b", "BAR": r"\bBAR\.", "SHFL": r"\bSHFL\.", "MUFU": r"\bMUFU\.",
             "F64": r"\b(DADD|DMUL|DFMA|F2F\.F64)", "LOCAL": r"\b(LDL|STL)\b"}


def _compile(self, *args, grid, warmup, **kwargs):
    """JITFunction.run replacement: compile for sm_90, record, launch nothing."""
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound_args,
                                                           specialization, options)
    src = ASTSource(self, signature, constexprs, attrs)
    ck = triton.compile(src, target=TARGET, options=options.__dict__)
    consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    RECORDS.append((self.__name__, consts, kwargs.get("num_warps"), ck))
    return ck


def _resources(ck) -> dict:
    """Registers / spills / shared of a compiled kernel (cuobjdump on its cubin)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res)
    out = {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(4)),
           "shared": ck.metadata.shared}
    out.update({k: len(re.findall(p, sass)) for k, p in _SASS_OPS.items()})
    out["sass"] = sass
    return out


def loop_stats(sass: str) -> dict:
    """The main loop of a kernel's SASS: the backward branch spanning the most instructions.
    Returns its instruction count and the counts of the opcode classes above inside it."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s*/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    best = (0, 0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA (?:P\d, )?0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr[i]:
            j = addr.index(int(m.group(1), 16)) if int(m.group(1), 16) in addr else None
            if j is not None and i - j > best[0]:
                best = (i - j + 1, j, i)
    body = "\n".join(lines[best[1]:best[2] + 1])
    out = {"loop": best[0]}
    out.update({k: len(re.findall(p, body)) for k, p in _SASS_OPS.items()})
    return out


def paths(k: int = 1000, n: int = 4099):
    """Run every launcher path once on CPU tensors of N x k (float32 unless stated)."""
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(n, k, generator=g).log_softmax(1)
    ic = torch.ones(n)
    a = torch.zeros(k)
    big, online = 4096, 1024
    yield "step", lambda: tri._launch_step(lp, ic, a, tri._H_NONE, big, online)
    yield "step diag", lambda: tri._launch_step(lp, ic, a, tri._H_DIAG, big, online)
    yield "materialize", lambda: tri._launch_materialize(lp, ic, a, torch.empty(n, k), big, online)
    yield "materialize sums (in place)", lambda: tri._launch_materialize(
        lp, ic, a, lp.clone(), big, online, True)
    forget = torch.zeros(n, dtype=torch.bool)
    fill = torch.zeros(k)
    x = lp.exp()
    for mode, xx in (("probs", x), ("logits", lp), ("log_p", lp)):
        yield f"prepare {mode}", lambda xx=xx, mode=mode: tri._launch_prepare(
            xx, mode, None, None, torch.empty(n, k), None, False, 1e-3, big, online, 32, None)
        yield f"prepare {mode} forget+fill first diag", lambda xx=xx, mode=mode: \
            tri._launch_prepare(xx, mode, forget, fill, torch.empty(n, k), ic, "diag", 1e-3, big,
                                online, 32, None)
    yield "prepare probs float64 in", lambda: tri._launch_prepare(
        x.double(), "probs", None, None, torch.empty(n, k), None, False, 1e-3, big, online, 32,
        None)
    yield "prepare log_p bf16 out first", lambda: tri._launch_prepare(
        lp, "log_p", None, None, torch.empty(n, k, dtype=torch.bfloat16), ic, "diag", 1e-3, big,
        online, 32, None)


def small_paths(n: int = 4099):
    """The in-kernel W (k <= 32) and the wide-row kernels."""
    for k in (10, 32):
        lp = torch.randn(n, k).log_softmax(1)
        ic, a = torch.ones(n), torch.zeros(k)
        yield f"step full k{k}", lambda lp=lp, ic=ic, a=a: tri._launch_step(lp, ic, a, tri._H_FULL,
                                                                            4096, 1024)
        yield f"prepare logits full k{k}", lambda lp=lp, ic=ic, k=k: tri._launch_prepare(
            lp, "logits", None, None, torch.empty(n, k), ic, True, 1e-3, 4096, 1024, 32, None)
        # Forget rows with a fill: the kernel's F sums, the sampled one beside the dot.
        fg = torch.arange(n) % 5 == 0
        yield f"prepare probs forget+fill full k{k}", lambda lp=lp, ic=ic, k=k, fg=fg: \
            tri._launch_prepare(lp.exp(), "probs", fg, torch.zeros(k), torch.empty(n, k), ic,
                                True, 1e-3, 4096, 1024, 32, None)
    n3 = 3 * 4096 + 77  # hessian_stride(n3, 32) == 3: the sampled-block test is not constant
    lp3 = torch.randn(n3, 32).log_softmax(1)
    yield "step full k32 m3", lambda: tri._launch_step(lp3, torch.ones(n3), torch.zeros(32),
                                                       tri._H_FULL, 4096, 1024)
    for k in (512, 4096):  # 1 and 8 warps
        lp = torch.randn(n, k).log_softmax(1)
        ic, a = torch.ones(n), torch.zeros(k)
        yield f"step diag k{k}", lambda lp=lp, ic=ic, a=a: tri._launch_step(lp, ic, a, tri._H_DIAG,
                                                                            4096, 1024)
        yield f"prepare logits first diag k{k}", lambda lp=lp, ic=ic, k=k: tri._launch_prepare(
            lp, "logits", None, None, torch.empty(n, k), ic, "diag", 1e-3, 4096, 1024, 32, None)
    lpk = torch.randn(n, 1000).log_softmax(1)
    ick, ak = torch.ones(n), torch.zeros(1000)
    yield "step bf16 diag", lambda: tri._launch_step(lpk.bfloat16(), ick, ak, tri._H_DIAG, 4096,
                                                     1024)
    yield "prepare log_p no out first diag", lambda: tri._launch_prepare(
        lpk, "log_p", None, None, None, ick, "diag", 1e-3, 4096, 1024, 32, None)
    k = 32000
    lp = torch.randn(64, k).log_softmax(1)  # the last binding: the lambdas below may use it
    ic, a = torch.ones(64), torch.zeros(k)
    yield "step wide", lambda: tri._launch_step(lp, ic, a, tri._H_NONE, 4096, 1024)
    yield "step wide diag", lambda: tri._launch_step(lp, ic, a, tri._H_DIAG, 4096, 1024)
    yield "materialize wide", lambda: tri._launch_materialize(lp, ic, a, torch.empty(64, k), 4096,
                                                              1024)
    for mode in ("probs", "logits", "log_p"):
        xx = lp.exp() if mode == "probs" else lp
        yield f"prepare wide {mode} first diag", lambda xx=xx, mode=mode: tri._launch_prepare(
            xx, mode, None, None, torch.empty(64, k), ic, "diag", 1e-3, 4096, 1024, 32, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", type=Path, help="write each variant's SASS into this folder")
    ap.add_argument("--check", action="store_true", help="exit 1 on spills (CI)")
    ap.add_argument("--quick", action="store_true", help="k = 1000 step / prepare paths only")
    ap.add_argument("--num-stages", type=int, default=None, help="override NUM_STAGES")
    ap.add_argument("--tile", default=None,
                    help="ROWSxWARPS: override the single-read tile (not the in-kernel W tile)")
    ap.add_argument("--loop", action="store_true",
                    help="report the main loop's instruction mix instead of the whole kernel's")
    args = ap.parse_args(argv)
    missing = [t for t in ("ptxas", "cuobjdump") if not (BIN / t).exists()]
    if missing:
        print(f"SKIP: Triton's bundled {', '.join(missing)} not found in {BIN}")
        return 77
    if args.num_stages is not None:
        tri.NUM_STAGES = args.num_stages
    if args.tile:
        t_rows, t_warps = (int(v) for v in args.tile.split("x"))
        orig = tri._single_tile
        tri._single_tile = lambda k, full=False, rows=2: (
            orig(k, full) if full else tri._Tile(t_rows, tri._next_pow2(k), t_warps))
    JITFunction.run = _compile
    warnings.simplefilter("ignore")  # the launchers reduce uninitialised workspaces here
    todo = list(paths()) + ([] if args.quick else list(small_paths()))
    bad = 0
    cols = (["loop"] if args.loop else []) + list(_SASS_OPS)
    print(f"{'path':42s} {'kernel':20s} {'warps':>5s} {'regs':>4s} {'local':>5s} {'smem':>6s} "
          + " ".join(f"{k:>6s}" for k in cols))
    for name, run in todo:
        start = len(RECORDS)
        try:
            run()
        except Exception as exc:  # a kernel that does not compile
            print(f"{name:42s} FAILED: {type(exc).__name__}: {str(exc)[:400]}")
            bad += 1
            continue
        for kname, consts, warps, ck in RECORDS[start:]:
            r = _resources(ck)
            if args.loop:
                r.update(loop_stats(r["sass"]))
            print(f"{name:42s} {kname[:20]:20s} {warps!s:>5s} {r['regs']:4d} {r['local']:5d} "
                  f"{r['shared']:6d} " + " ".join(f"{r[k]:6d}" for k in cols))
            if r["local"] or r["LOCAL"]:
                bad += 1
            if args.sass:
                args.sass.mkdir(parents=True, exist_ok=True)
                tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_{kname}")
                (args.sass / f"{tag}.sass").write_text(r["sass"])
                (args.sass / f"{tag}.ptx").write_text(ck.asm["ptx"])
                (args.sass / f"{tag}.ttgir").write_text(ck.asm["ttgir"])
    return 1 if (bad and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
