"""Shared benchmark helpers: run metadata, a median timer, the synthetic problem, writers.

Nothing here hard-codes a figure: cache sizes, thread counts and versions are read from the
machine at run time, and every reported number is measured by the run that reports it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import sys

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks run from a checkout, installed or not
    sys.path.insert(0, str(REPO))

from ppu_fast import api  # noqa: E402
from ppu_fast.cli import (_finite_float, _int_at_least, _positive_float,  # noqa: E402
                          _unwritable)
from ppu_fast.backends import torch_ref  # noqa: E402
from ppu_fast.backends.base import Backend  # noqa: E402


# Where results go unless --out says otherwise: this folder's results/, wherever the script is run
# from (a relative "benchmarks/results" made a new folder under any other working directory).
RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: Optional[str]) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help shows the script's whole docstring as written."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


# argparse types, the command line's own (ppu_fast.cli): counts (--reps, --threads, ...) are
# integers >= 1; limits where 0 means none (e.g. --quick-refine-max 0) integers >= 0.
positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "an integer >= 0")
num_classes = _int_at_least(2, "a number of classes >= 2")


# Numbers as the command line's own types take them (a finite number; one > 0).
finite_float = _finite_float
positive_float = _positive_float


def nonneg_float(s: str) -> float:
    """argparse type of durations and budgets in seconds: a number >= 0 ("inf": no limit)."""
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not v >= 0.0:  # NaN too
        raise argparse.ArgumentTypeError(f"{s!r}: expected a number of seconds >= 0 (or inf)")
    return v


def int_list(s: str) -> List[int]:
    """argparse type of comma-separated integers (e.g. --seeds 1,2,3)."""
    try:
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated integers, "
                                         f"e.g. 1,2,3") from None


def free_stem(out: Path, prefix: str) -> str:
    """``<prefix>-<UTC minute>`` (``...T1523Z``) of the run's start (the date its record gives),
    or with the seconds (``...T1523Z_07s``, then a counter) when a record of that name is already
    in ``out``: two runs in one minute overwrote each other's files without a word."""
    now = _dt.datetime.fromisoformat(_STARTED["date_utc"])
    taken = (lambda stem: any(out.glob(f"{stem}.*")))
    # "_" sorts after ".": the later record sorts last by name (check.sh's summary takes the last).
    minute = f"{prefix}-{now.strftime('%Y-%m-%dT%H%MZ')}"
    for stem in (minute, f"{minute}_{now.strftime('%S')}s"):
        if not taken(stem):
            return stem
    i = 2
    while taken(f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"


def out_dir(s: str) -> str:
    """argparse type of a results folder (``--out``): refused (exit 2, before anything is measured)
    when empty, a file, or not writable; a missing one is made and removed again to try it.
    Records went into the working directory for an empty value, and a file or a read-only folder
    gave a traceback after the measurements."""
    if not str(s).strip():
        raise argparse.ArgumentTypeError("empty; expected a folder (created if missing)")
    p = Path(s)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"'{s}' is a file; expected a folder (created if missing)")
    why = _unwritable(p)  # made if missing, tried, and removed again
    if why:
        raise argparse.ArgumentTypeError(f"cannot write a folder at '{s}' ({why})")
    return s


def write_record(out: Path, name: str, meta: Dict[str, object], rows: List[Dict[str, object]],
                 title: str, setting: str, header: Sequence[str],
                 table: Sequence[Sequence[str]]) -> Path:
    """``out/<name>-<stamp>.json`` (``meta`` and ``rows``) and ``.md`` (``title``, date, commit,
    machine, versions, ``meta["command"]``, one ``setting`` line, then the table); returns the
    path both share, without suffix."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / free_stem(out, name)
    write_json(stem.with_suffix(".json"), meta, rows)
    md = [f"# {title}", "", f"- date (UTC): {meta['date_utc']}; commit: `{meta['git_commit']}`",
          *machine_lines(meta), f"- command: `{meta['command']}`", f"- {setting}", "",
          markdown_table(header, table), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    return stem


def machine_lines(meta: Dict[str, object]) -> List[str]:
    """The machine and versions lines of a results .md header, from :func:`metadata`."""
    m = meta["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return [f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads "
            f"{m['torch_threads']}", f"- versions: {versions}"]


def size_arg(s: str) -> str:
    """argparse type of ``--sizes`` entries: "NxK" with positive N and K (commas and underscores
    allowed as digit separators), returned as "NxK"; anything else is an argparse error, not a
    traceback from the unpacking after it."""
    parts = s.lower().replace(",", "").replace("_", "").split("x")
    if (len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts)
            or int(parts[0]) < 1 or int(parts[1]) < 2):
        # k = 1 has nothing to solve (refine returns at once: host_overhead divided by its 0
        # passes, after the sizes before it were measured).
        raise argparse.ArgumentTypeError(f"{s!r}: expected N x k as NxK, integers N >= 1 and "
                                         f"k >= 2, e.g. 50000x10")
    return f"{int(parts[0])}x{int(parts[1])}"


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    """A module's __version__, or None when it is not importable (POT is absent on GPU boxes)."""
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:
        return None


def git_commit() -> str:
    """HEAD, with "-dirty" when the working tree differs from it (numbers from uncommitted code).

    A copy without .git (the GPU machine gets the working tree alone) reads PPU_FAST_COMMIT,
    which benchmarks/gpu/check.sh's caller sets to the commit it sent."""
    if os.environ.get("PPU_FAST_COMMIT"):
        return os.environ["PPU_FAST_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                                capture_output=True, text=True, timeout=30).stdout.splitlines()
        # Untracked sources count (an uncommitted backend changes the numbers); earlier result
        # files do not.
        dirty = [ln for ln in status if not ln[3:].startswith("benchmarks/results/")]
        return head + ("-dirty" if dirty else "")
    except Exception as exc:  # not a git checkout (e.g. an sdist): say so rather than fail
        return f"unknown ({type(exc).__name__})"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


# The run's start, when the script imported this module (and this checkout's ppu_fast): the
# commit of the code that runs, and the date a record names, whenever the script writes it (most
# write their record at the end, and a commit made meanwhile is not the code that ran).
_STARTED = {"date_utc": utc_now().isoformat(timespec="seconds"), "git_commit": git_commit()}


def metadata(device: str) -> Dict[str, object]:
    """Machine, versions, commit and date of this run (commit and date as at its start)."""
    gpu = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_GiB": round(props.total_memory / 2**30, 1),
               "sm_count": props.multi_processor_count,
               "l2_cache_MiB": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
               "cuda": torch.version.cuda}
    return {
        **_STARTED,
        "machine": {"cpu_model": _cpu_model(), "cpu_cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "gpu": gpu},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton"), "numpy": _version("numpy"),
                     "POT": _version("ot"), "ppu_fast": _version("ppu_fast")},
    }


def cpu_cache_bytes() -> int:
    """Largest CPU cache (bytes) reported by sysfs; 0 if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            s = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        try:
            best = max(best, int(s.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return best


def cache_bytes(device: str) -> int:
    if device == "cuda" and torch.cuda.is_available():
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0))
    return cpu_cache_bytes()


def n_buffers(nbytes: int, device: str, cap: int = 16) -> int:
    """How many copies of an input to rotate through so that consecutive calls never find their
    input in cache: enough to cover twice the last-level cache, at most ``cap``."""
    c = cache_bytes(device)
    if c <= 0 or nbytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(2 * c / nbytes)))


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[int], object], device: str, *, budget_s: float = 1.0,
              min_reps: int = 3, max_reps: int = 200, max_case_s: float = 30.0,
              warmup: int = 1, before: Optional[Callable[[], object]] = None
              ) -> Dict[str, float]:
    """Median time of ``fn(i)`` (i: the repeat index, for rotating buffers); ``before()``, when
    given, runs untimed before every call (e.g. emptying a cache, for a cold call).

    Warm-up calls first (compilation, allocator, page faults), then enough repeats to fill
    ``budget_s`` (between ``min_reps`` and ``max_reps``) -- but never more than ``max_case_s`` in
    all, so a call that takes many seconds is repeated fewer than ``min_reps`` times (at least
    once); ``reps`` in the result says how many. CPU: time.perf_counter around each call. CUDA:
    a pair of CUDA events around each call on the current stream (GPU time, including any gap
    the host leaves the GPU idle within the call), synchronised once at the end.
    A first call longer than ``max_case_s`` is returned as the only sample (``reps`` 1).
    Returns median/q1/q3 in ms (:func:`summarize`), the repeat count, and the first warm-up
    call's time.
    """
    warmup = max(1, warmup)
    first = last = 0.0
    prep = before if before is not None else (lambda: None)
    for w in range(warmup):
        prep()
        t0 = time.perf_counter()
        fn(w)
        _sync(device)
        last = time.perf_counter() - t0
        if w == 0:
            first = last
    if warmup == 1 and first > max_case_s:
        # One call already exceeds the case's limit (seconds-long refines of large matrices
        # with nothing to compile): that call is the single sample, and ``reps`` = 1 says so.
        out = summarize([first * 1e3], first_s=first)
        out["note"] = "single call (longer than --max-case-s): no separate warm-up"
        return out
    if warmup == 1 and 2 * first <= max_case_s:
        # Estimate the per-call cost from one more call (the first may have compiled); a call
        # so slow that two would exceed the case's limit is its own estimate.
        prep()
        t1 = time.perf_counter()
        fn(warmup)
        _sync(device)
        last = time.perf_counter() - t1
        warmup += 1
    est = max(last, 1e-7)
    reps = int(max(min_reps, min(max_reps, budget_s / est)))
    if math.isfinite(max_case_s):  # inf: no limit (--max-case-s inf)
        reps = max(1, min(reps, int(max_case_s / est)))
    samples: List[float] = []
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for r, (a, b) in enumerate(events):
            prep()
            a.record()
            fn(warmup + r)
            b.record()
        torch.cuda.synchronize()
        samples = [a.elapsed_time(b) for a, b in events]
    else:
        for r in range(reps):
            prep()
            s = time.perf_counter()
            fn(warmup + r)
            samples.append((time.perf_counter() - s) * 1e3)
    return summarize(samples, first_s=first)


SPREAD_MIN_SAMPLES = 5


def summarize(samples_ms: Sequence[float], first_s: float = float("nan")) -> Dict[str, object]:
    """Median and spread of ``samples_ms``: the quartiles (q1_ms, q3_ms) from
    ``SPREAD_MIN_SAMPLES`` samples on, below that the smallest and largest sample (``spread`` =
    "range"): quartiles interpolated between two or three samples are no sample's time (two
    samples 8,076 and 9,383 ms gave "8,403-9,056")."""
    xs = sorted(samples_ms)
    if len(xs) >= SPREAD_MIN_SAMPLES:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        q1, q3, spread = q[0], q[2], "iqr"
    else:
        q1, q3, spread = xs[0], xs[-1], "range"
    return {"median_ms": statistics.median(xs), "q1_ms": q1, "q3_ms": q3, "spread": spread,
            "reps": len(xs), "first_call_s": first_s}


# ---------------------------------------------------------------------------------------------
# The synthetic problem
# ---------------------------------------------------------------------------------------------
def confident_classifier(n: int, k: int, device: str = "cpu", seed: int = 0,
                         margin: float = 6.0, dtype: torch.dtype = torch.float32):
    """Labels (n,) and probabilities (n x k) of a confident classifier: the true-class logit gets
    +margin over standard-normal noise. Generated on ``device`` directly, in place where possible
    (5-6 GB matrices on the GPU must not be built on the host or copied twice)."""
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g, device=device)
    p = torch.randn(n, k, generator=g, device=device, dtype=dtype)
    p[torch.arange(n, device=device), y] += margin
    # In-place softmax over row chunks: no second N x k matrix.
    rows = max(1, (1 << 24) // max(k, 1))
    for s in range(0, n, rows):
        blk = p[s:s + rows]
        blk.copy_(torch.softmax(blk, dim=1))
    return y, p


def step_inputs(p: torch.Tensor, forget: torch.Tensor, lam: float = 1.0, seed: int = 1):
    """What ``refine`` hands a backend: log P^ (forget rows uniform), inv_c (1 on forget rows,
    1/lam elsewhere) and a non-trivial alpha (k,) float64, so the step is not at alpha = 0."""
    n, k = p.shape
    log_p = torch.empty_like(p)
    rows = max(1, (1 << 24) // max(k, 1))
    for s in range(0, n, rows):
        torch.log(p[s:s + rows], out=log_p[s:s + rows])
    log_p[forget] = -math.log(k)
    inv_c = torch.where(forget, 1.0, 1.0 / lam).to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    alpha = torch.randn(k, generator=g, dtype=torch.float64).to(p.device)
    return log_p, inv_c, alpha - alpha.mean()


# ---------------------------------------------------------------------------------------------
# Anchor (b): the reference step under torch.compile
# ---------------------------------------------------------------------------------------------
class CompiledReference(torch_ref.TorchBackend):
    """Anchor (b): TorchBackend.step with its per-chunk function compiled by torch.compile.

    Swapping the module attribute for the duration of the call keeps the chunking loop the
    reference's own, so the only difference from (a) is compilation."""

    name = "torch.compile"

    def __init__(self) -> None:
        super().__init__()
        self.eager_fn = torch_ref.step_chunk
        self.compiled = torch.compile(self.eager_fn, dynamic=False)

    def step(self, log_p, inv_c, alpha, hessian=False):
        torch_ref.step_chunk = self.compiled
        try:
            return super().step(log_p, inv_c, alpha, hessian)
        finally:
            torch_ref.step_chunk = self.eager_fn


@contextlib.contextmanager
def forced_backend(backend):
    """ppu_fast.refine with backend resolution returning ``backend`` (for anchor (b))."""
    orig = api.get_backend
    api.get_backend = lambda name, log_p: backend
    try:
        yield
    finally:
        api.get_backend = orig


@contextlib.contextmanager
def generic_passes(backend):
    """The solver's passes on ``backend`` through the base class's ``bind_step`` (``step`` per
    pass, its results gathered on the device and copied), instead of the backend's own bound
    route: the GPU backends' per-pass host work before their ``bind_step``."""
    cls = type(backend)
    own = cls.__dict__.get("bind_step")
    cls.bind_step = Backend.bind_step
    try:
        yield
    finally:
        if own is None:
            del cls.bind_step
        else:
            cls.bind_step = own


def raise_recompile_limit(n: int = 64) -> None:
    # Each (shape, hessian mode) is its own graph with dynamic=False: 3-5 sizes x 2 modes x
    # (full chunk, last chunk) exceeds dynamo's default limit of 8, after which it would
    # silently run eager and (b) would measure (a).
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(getattr(cfg, attr), n))


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def write_json(path: Path, meta: Dict[str, object], rows: List[Dict[str, object]],
               extra: Optional[Dict[str, object]] = None) -> None:
    doc = {"meta": meta, **(extra or {}), "rows": rows}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def fmt(x: Optional[float], digits: int = 3) -> str:
    """Numbers for the table: ``digits`` significant figures, '' for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    dec = max(0, digits - 1 - mag)
    return f"{x:,.{dec}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
