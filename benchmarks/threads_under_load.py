"""``refine`` with 1 and 2 threads, on an idle machine and with a busy process on one core.

    python benchmarks/threads_under_load.py [--sizes 50000x10 1000000x100] [--reps 31]
                                            [--out benchmarks/results]

The busy process is a Python loop started by this script (one core's worth of load, as another
user's job would be). For each size and load, the median and 90th percentile wall time of
``ppu_fast.refine`` (cpu backend, Newton, class unlearning of 10 % of the rows) with
``torch.set_num_threads(1)`` and ``(2)``; the claim checked is that the 2-thread median is never
above the 1-thread median. Writes ``threads-<stamp>.json`` and ``.md`` to ``--out`` with the
machine, versions, commit and date (benchmarks/common.py).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ppu_fast  # noqa: E402


def _spin(stop) -> None:  # one core's worth of load
    while not stop.is_set():
        pass


def _time(p, forget, threads: int, reps: int):
    torch.set_num_threads(threads)
    ppu_fast.refine(p, forget, backend="cpu")  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        ppu_fast.refine(p, forget, backend="cpu")
        ts.append((time.perf_counter() - t) * 1e3)
    # The 90th percentile interpolated between the samples around it (indexing int(0.9 (n - 1))
    # took the second slowest of 7); the slowest is shown beside it.
    return {"median_ms": statistics.median(ts),
            "p90_ms": statistics.quantiles(ts, n=10, method="inclusive")[8] if reps > 1 else ts[0],
            "max_ms": max(ts), "reps": reps}


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.size_arg, default=["50000x10", "1000000x100"])
    ap.add_argument("--reps", type=common.positive_int, default=31)
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        n, k = (int(v) for v in size.split("x"))
        y, p = common.confident_classifier(n, k, seed=0)
        forget = y < max(1, k // 10)
        reps = args.reps if n * k <= 10_000_000 else max(5, args.reps // 4)
        for load in ("idle", "one busy core"):
            stop, proc = None, None
            if load != "idle":
                stop = mp.Event()
                proc = mp.Process(target=_spin, args=(stop,), daemon=True)
                proc.start()
                time.sleep(0.5)
            try:
                for threads in (1, 2):
                    r = _time(p, forget, threads, reps)
                    rows.append({"size": size, "load": load, "threads": threads, **r})
                    print(f"{size:>12} {load:>14} {threads} threads: median {r['median_ms']:8.2f} "
                          f"ms, p90 {r['p90_ms']:8.2f} ms, max {r['max_ms']:8.2f} ms", flush=True)
            finally:
                if proc is not None:
                    stop.set()
                    proc.join(timeout=5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = common.free_stem(out, "threads")
    meta = common.metadata("cpu")
    meta["machine"]["torch_threads"] = "1 and 2 (the table's)"
    common.write_json(out / f"{stem}.json", meta, rows)
    lines = ["# refine with 1 and 2 threads, idle and under load", "",
             f"- date (UTC): {meta['date_utc']}; commit: `{meta['git_commit']}`",
             *common.machine_lines(meta),
             f"- command: `python benchmarks/threads_under_load.py {' '.join(sys.argv[1:])}`", "",
             "| size | load | threads | median ms | p90 ms | max ms | reps |",
             "|---|---|--:|--:|--:|--:|--:|"]
    lines += [f"| {r['size']} | {r['load']} | {r['threads']} | {common.fmt(r['median_ms'])} | "
              f"{common.fmt(r['p90_ms'])} | {common.fmt(r['max_ms'])} | {r['reps']} |"
              for r in rows]
    worse = [(a["size"], a["load"]) for a in rows if a["threads"] == 2
             for b in rows if b["threads"] == 1 and (b["size"], b["load"]) == (a["size"], a["load"])
             and a["median_ms"] > b["median_ms"]]
    lines += ["", "2 threads slower than 1 (median): " + (", ".join(f"{s} ({l})" for s, l in worse)
                                                          if worse else "never")]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
