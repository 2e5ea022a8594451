"""Scaling past one device (docs/scaling.md): a streamed refine of a large ``.npy`` file against the
in-memory pass of the same size, with peak resident memory; and 1 vs 2 Gloo processes.

    python benchmarks/scaling.py stream [--n 4000000 --k 1000 --dir /var/tmp/ppu-stream]
    python benchmarks/scaling.py dist [--n 2000000 --k 100]

Writes benchmarks/results/scaling-{stream,dist}-<UTC stamp>.{json,md} (machine, versions,
commit, date). Each measured refine runs in a child process of its own, so ``ru_maxrss`` is the
peak resident memory of that refine alone (the interpreter and torch included).

stream: the file is made once (softmax of 3 x standard normals, float32; kept for later runs
with --keep). The child runs ``refine_file`` (default budget 1 GiB), then times three more
streamed solver passes (the sharded step over the output file, warm in the page cache) and
reports their median. A second child loads the same matrix into memory and times three passes
of the backend's own step on it (the in-memory pass); the ratio is streamed / in-memory.

dist: ``refine(..., process_group=...)`` with the rows split over 1 and 2 Gloo processes on this
machine (the cores shared out: 2 threads for one process, 1 each for two), three refines each;
per pass = solve seconds / steps, the all-reduce's share = its seconds / solve seconds; beside
them the plain in-memory refine of one process.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path, children too)

from ppu_fast.stream import parse_bytes  # noqa: E402


def make_file(path: Path, n: int, k: int, block: int = 65536) -> None:
    """The benchmark's probabilities, written block by block (never whole in memory)."""
    import numpy.lib.format as npformat
    import torch
    from tqdm.auto import tqdm

    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        npformat.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False,
                                            "shape": (n, k)})
        for s in tqdm(range(0, n, block), desc=f"make {path.name}", unit="block",
                      disable=not sys.stderr.isatty()):
            g = torch.Generator().manual_seed(s // block)
            r = min(block, n - s)
            f.write(torch.softmax(torch.randn(r, k, generator=g) * 3, 1).numpy().tobytes())
    os.replace(tmp, path)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_passes(step, k: int, reps: int = 3) -> list:
    """Seconds of ``reps`` calls of ``step(alpha, hessian)`` at alpha = 0, with the Hessian
    Newton asks for at this k."""
    import torch

    from ppu_fast.solver import hessian_mode

    alpha = torch.zeros(k, dtype=torch.float64)
    passes = []
    for _ in range(reps):
        t = time.perf_counter()
        step(alpha, hessian_mode("newton", k))
        passes.append(time.perf_counter() - t)
    return passes


def child_stream(path: str, out: str, budget: str, n: int) -> dict:
    import torch

    from ppu_fast import refine_file
    from ppu_fast.backends import get_backend
    from ppu_fast.sharded import Comm, ShardedBackend
    from ppu_fast.stream import FileStore, NpyFile

    mask = np.zeros(n, dtype=bool)
    mask[:: 100] = True  # 1 % of the rows, spread over every chunk
    t = time.perf_counter()
    info = refine_file(path, mask, out, memory_budget=budget)
    total = time.perf_counter() - t
    rss_refine = _peak_rss_mib()
    f = NpyFile(out, "out")
    k = f.shape[1]
    rows = info.chunk_rows
    store = FileStore(f, 0, n, f, rows, torch.device("cpu"), torch.float32)
    be = get_backend("auto", torch.empty((1, k)))
    sb = ShardedBackend(be, store, torch.ones(n), Comm(None), 0, n, k)
    passes = _time_passes(lambda a, h: sb.step(None, None, a, h), k)
    return {"refine_seconds": total, "timings": info.timings, "steps": info.steps,
            "iterations": info.iterations, "converged": info.converged,
            "residual": info.residual, "solve_seconds_per_step": info.timings["solve"]
            / max(info.steps, 1), "streamed_pass_seconds": passes,
            "streamed_pass_median": statistics.median(passes), "chunk_rows": rows,
            "peak_rss_MiB_refine": rss_refine, "peak_rss_MiB_after_passes": _peak_rss_mib(),
            "backend": info.backend}


def child_memory(path: str, n: int, max_bytes: int) -> dict:
    """Time the backend's step on the matrix held in memory (the rows of ``path``; when they do
    not fit ``max_bytes``, the first rows that do, scaled to n)."""
    import torch

    from ppu_fast.backends import get_backend
    from ppu_fast.stream import NpyFile

    f = NpyFile(path, "out")
    k = f.shape[1]
    rows = min(n, max(1, max_bytes // f.row_bytes))
    x = torch.empty((rows, k), dtype=torch.float32)
    block = 1 << 16
    for s in range(0, rows, block):
        with f.rows(s, min(rows, s + block)) as a:
            x[s:s + a.shape[0]] = torch.from_numpy(a.copy())
    be = get_backend("auto", x)
    ic = torch.ones(rows)
    passes = _time_passes(lambda a, h: be.step(x, ic, a, h), k)
    med = statistics.median(passes)
    return {"rows_in_memory": rows, "pass_seconds": passes, "pass_median": med,
            "pass_median_scaled_to_n": med * n / rows, "peak_rss_MiB": _peak_rss_mib(),
            "backend": be.name}


def _child(args: list) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_stream(a) -> dict:
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    src, out = d / f"probs-{a.n}x{a.k}.npy", d / f"q-{a.n}x{a.k}.npy"
    t = time.perf_counter()
    if not src.exists():
        make_file(src, a.n, a.k)
    made = time.perf_counter() - t
    streamed = _child(["_stream", str(src), str(out), a.budget, str(a.n)])
    avail = _mem_available()
    memory = _child(["_memory", str(out), str(a.n), str(int(avail * 0.8))])
    if not a.keep:
        for p in (src, out):
            p.unlink(missing_ok=True)
    return {"n": a.n, "k": a.k, "dtype": "float32", "file_GB": a.n * a.k * 4 / 1e9,
            "memory_budget": a.budget, "make_seconds": made, "streamed": streamed,
            "in_memory": memory,
            "ratio_streamed_over_in_memory": streamed["streamed_pass_median"]
            / memory["pass_median_scaled_to_n"]}


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(s: int, e: int, k: int, block: int = 65536):
    """Rows [s, e) of the dist benchmark's matrix, the same whatever the split."""
    import torch
    out = torch.empty((e - s, k))
    b = s // block
    while b * block < e:
        g = torch.Generator().manual_seed(b)
        rows = torch.softmax(torch.randn(block, k, generator=g) * 3, 1)
        lo, hi = max(s, b * block), min(e, (b + 1) * block)
        out[lo - s:hi - s] = rows[lo - b * block:hi - b * block]
        b += 1
    return out


def child_dist(n: int, k: int, reps: int) -> dict:
    import torch
    import torch.distributed as dist

    import ppu_fast

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    s, e = rank * n // world, (rank + 1) * n // world
    x = rows_of(s, e, k)
    mask = np.zeros(e - s, dtype=bool)
    mask[(np.arange(s, e) % 100) == 0] = True
    out = torch.empty_like(x)
    runs = []
    for _ in range(reps):
        dist.barrier()
        _, info = ppu_fast.refine(x, mask, return_info=True, process_group=dist.group.WORLD,
                                  out=out)
        runs.append({"seconds": info.seconds, "steps": info.steps,
                     "iterations": info.iterations, "timings": info.timings})
    res = {"rank": rank, "world": world, "threads": torch.get_num_threads(), "runs": runs}
    if world == 1:
        plain = []
        for _ in range(reps):
            _, info = ppu_fast.refine(x, mask, return_info=True, out=out)
            plain.append({"seconds": info.seconds, "steps": info.steps,
                          "timings": info.timings})
        res["plain"] = plain
    dist.destroy_process_group()
    return res


def bench_dist(a) -> dict:
    out = {"n": a.n, "k": a.k, "dtype": "float32", "worlds": {}}
    for world in (1, 2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(world)}
        procs = [subprocess.Popen([sys.executable, __file__, "_dist", str(a.n), str(a.k),
                                   str(a.reps)], env={**env, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        got = []
        for p in procs:
            so, se = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"dist child failed:\n{so}\n{se}")
            got.append(json.loads(so.strip().splitlines()[-1]))
        r0 = got[0]["runs"]
        per_pass = [r["timings"]["solve"] / max(r["steps"], 1) for r in r0]
        share = [r["timings"].get("allreduce", 0.0) / r["timings"]["solve"] for r in r0]
        out["worlds"][str(world)] = {
            "ranks": got, "threads_per_rank": got[0]["threads"],
            "seconds_median": statistics.median(r["seconds"] for r in r0),
            "pass_seconds_median": statistics.median(per_pass),
            "allreduce_share_median": statistics.median(share),
            "steps": r0[0]["steps"]}
        if world == 1:
            pl = got[0]["plain"]
            out["plain_in_memory"] = {
                "seconds_median": statistics.median(r["seconds"] for r in pl),
                "pass_seconds_median": statistics.median(r["timings"]["solve"]
                                                         / max(r["steps"], 1) for r in pl)}
    return out


def write(kind: str, result: dict, res_dir: Path) -> Path:
    from common import free_stem, metadata

    res_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(res_dir, f"scaling-{kind}")
    meta = metadata("cpu")
    path = res_dir / f"{stem}.json"
    path.write_text(json.dumps({"meta": meta, "kind": kind, "result": result}, indent=1))
    lines = [f"# Scaling benchmark: {kind} ({meta['date_utc']}, commit {meta['git_commit']})", "",
             f"Machine: {meta['machine']['cpu_model']}, {meta['machine']['cpu_cores']} cores; "
             f"torch {meta['versions']['torch']}, numpy {meta['versions']['numpy']}.", ""]
    if kind == "stream":
        s, m = result["streamed"], result["in_memory"]
        lines += [
            f"`python benchmarks/scaling.py stream --n {result['n']} --k {result['k']}` "
            f"(float32, {result['file_GB']:.1f} GB file, memory budget {result['memory_budget']}, "
            f"chunks of {s['chunk_rows']} rows, backend {s['backend']}).", "",
            "| quantity | value |", "|---|---|",
            f"| refine_file, whole call | {s['refine_seconds']:.1f} s |",
            f"| of which prepare / solve / materialize | {s['timings']['prepare']:.1f} / "
            f"{s['timings']['solve']:.1f} / {s['timings']['materialize']:.1f} s |",
            f"| solver passes (steps) | {s['steps']} (+1 from prepare), converged "
            f"{s['converged']} |",
            f"| solve seconds per step | {s['solve_seconds_per_step']:.2f} s |",
            f"| streamed pass, warm page cache (median of 3) | "
            f"{s['streamed_pass_median']:.2f} s |",
            f"| in-memory pass, same size (median of 3) | "
            f"{m['pass_median_scaled_to_n']:.2f} s"
            + ("" if m["rows_in_memory"] == result["n"] else
               f" (measured on {m['rows_in_memory']} rows, scaled)") + " |",
            f"| streamed / in-memory | {result['ratio_streamed_over_in_memory']:.2f}x "
            f"(target <= 1.5x) |",
            f"| peak RSS of the refine_file process | {s['peak_rss_MiB_refine']:.0f} MiB "
            f"(target < 2048) |",
            f"| peak RSS of the in-memory process | {m['peak_rss_MiB']:.0f} MiB |"]
    else:
        w1, w2 = result["worlds"]["1"], result["worlds"]["2"]
        pl = result["plain_in_memory"]
        lines += [
            f"`python benchmarks/scaling.py dist --n {result['n']} --k {result['k']}` (float32; "
            f"medians of the refines on rank 0).", "",
            "| layout | threads / rank | refine | per pass | all-reduce share |",
            "|---|---|---|---|---|",
            f"| plain refine, 1 process | {w1['threads_per_rank']} | "
            f"{pl['seconds_median']:.3f} s | {pl['pass_seconds_median'] * 1e3:.1f} ms | - |",
            f"| 1 Gloo process | {w1['threads_per_rank']} | {w1['seconds_median']:.3f} s | "
            f"{w1['pass_seconds_median'] * 1e3:.1f} ms | {w1['allreduce_share_median']:.1%} |",
            f"| 2 Gloo processes | {w2['threads_per_rank']} | {w2['seconds_median']:.3f} s | "
            f"{w2['pass_seconds_median'] * 1e3:.1f} ms | {w2['allreduce_share_median']:.1%} |"]
    (res_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        cmd, rest = sys.argv[1], sys.argv[2:]
        if cmd == "_stream":
            res = child_stream(rest[0], rest[1], rest[2], int(rest[3]))
        elif cmd == "_memory":
            res = child_memory(rest[0], int(rest[1]), int(rest[2]))
        else:
            res = child_dist(int(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(res))
        return 0
    ap = common.parser(__doc__)
    ap.add_argument("what", choices=("stream", "dist"))
    ap.add_argument("--n", type=common.positive_int, default=None)
    ap.add_argument("--k", type=common.positive_int, default=None)
    ap.add_argument("--out", type=common.out_dir,
                    default=str(HERE / "results"), help="where the results go")
    ap.add_argument("--dir", default="/var/tmp/ppu-stream", help="where the stream files go")
    ap.add_argument("--budget", default="1GiB", help="refine_file's memory_budget (stream)")
    ap.add_argument("--reps", type=common.positive_int, default=3,
                    help="timed refines (dist; stream times 3 passes)")
    ap.add_argument("--keep", action="store_true", help="keep the stream files for a rerun")
    a = ap.parse_args()
    try:  # checked here: the stream child would fail on it after the file is written
        parse_bytes(a.budget, "--budget")
    except ValueError as exc:
        ap.error(str(exc))
    if a.what == "stream":
        a.n, a.k = a.n or 4_000_000, a.k or 1000
        res = bench_stream(a)
    else:
        a.n, a.k = a.n or 2_000_000, a.k or 100
        res = bench_dist(a)
    path = write(a.what, res, Path(a.out))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
