#!/usr/bin/env bash
# GPU check: install, report backends, run the GPU tests, run the GPU benchmarks.
#
#   benchmarks/gpu/check.sh OUTDIR
#
# Meant for a one-GPU machine with no network (torch, triton, nvcc, pybind11, cmake, ninja,
# numpy, pytest preinstalled; POT, hypothesis, tqdm, matplotlib optional). Every phase has its
# own timeout and log, a failing phase does not stop the later ones, and the exit status is
# non-zero if any phase failed. The whole script keeps inside TOTAL_BUDGET (540 s; the device
# tool stops a call at 600 s): each phase's limit is its own cap (120 + 60 + 210 + 170 s) cut to
# what the budget has left, its kill grace (10 s) and the probes and summary (~30 s) included,
# and a phase with under 5 s left is not started (TIMEOUT). A normal run takes about 6 minutes.
# summary.txt is rewritten after every phase, so a run stopped from outside still says how far it
# got.
#
# Files written into OUTDIR (flat, at most 8): install.log, info.txt (backends, driver, CUDA
# versions), tests.log, summary.txt, bench.log, cuda-<stamp>.json, cuda-<stamp>.md,
# cuda-<stamp>.png.
#
# Environment:
#   PYTHON=...        interpreter to use (default: python3, else python)
#   SKIP_INSTALL=1    skip the pip install (e.g. testing this script on a machine where the
#                     package is already importable, without touching that environment)
#   BENCH_DEVICE=cpu  benchmark the CPU instead (for testing this script without a GPU)
#   BENCH_ARGS="..."  extra arguments for benchmarks/run.py (e.g. --sizes 50000x10 --quick)
#   INSTALL_TIMEOUT, TESTS_TIMEOUT, BENCH_TIMEOUT  phase caps in seconds (120, 210, 170);
#                     the benchmark stops starting new cases (and compilations) 40 s before its
#                     limit; the tests are interrupted (SIGINT) at theirs, so tests.log still
#                     names what ran, passed and failed
#   TOTAL_BUDGET=S    seconds the whole script may take (default 540)
#   TEST_WORKERS=N    pytest-xdist workers for the tests where xdist is installed (default 6)
#   PPU_FAST_COMMIT=SHA  the commit the benchmark record names, for a copy of the tree without
#                     .git (the device tool's); without it the record says "unknown"
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root
# python3 first: on the device image it is the interpreter that holds torch.
PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
INSTALL_TIMEOUT=${INSTALL_TIMEOUT:-120}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-210}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-170}
TOTAL_BUDGET=${TOTAL_BUDGET:-540}
T_START=$(date +%s)
KILL_GRACE=10   # `timeout --kill-after`: a phase may run this long past its limit
RESERVE=30      # the probes between phases and the summary at the end
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"

declare -a NAMES=() RESULTS=() SECONDS_TAKEN=()
FAILED=0

# phase_limit CAP: CAP cut to what TOTAL_BUDGET has left after the kill grace and the reserve.
phase_limit() {
    local left=$(( T_START + TOTAL_BUDGET - $(date +%s) - KILL_GRACE - RESERVE ))
    echo $(( $1 < left ? $1 : left ))
}

# probe CMD...: a short helper command, never longer than 30 s (a hung driver must not eat the
# budget).
probe() {
    timeout --kill-after=5 30 "$@"
}

write_summary() {  # the phases so far, into summary.txt (rewritten after each phase)
    {
        echo "GPU check, started $(date -u -d "@$T_START" +%Y-%m-%dT%H:%M:%SZ), budget ${TOTAL_BUDGET}s"
        printf '%-14s %-28s %6s\n' phase result seconds
        for i in "${!NAMES[@]}"; do
            printf '%-14s %-28s %6s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}"
        done
        echo "elapsed $(( $(date +%s) - T_START ))s"
    } > "$OUT/summary.txt"
}

# run_phase NAME LIMIT_S LOGFILE CMD...: runs CMD under `timeout`, stdout+stderr to LOGFILE,
# records PASS / FAIL (rc) / TIMEOUT. Never exits the script (set -e is suspended around it).
run_phase() {
    local name=$1 limit log=$3
    limit=$(phase_limit "$2")
    shift 3
    local t0 rc
    t0=$(date +%s)
    if (( limit < 5 )); then
        echo "== $name: not started, ${limit}s of TOTAL_BUDGET left" | tee "$log" >&2
        NAMES+=("$name"); RESULTS+=("TIMEOUT (budget spent)"); SECONDS_TAKEN+=(0)
        FAILED=1
        write_summary
        return 0
    fi
    echo "== $name (limit ${limit}s): $*" >&2
    set +e
    # PHASE_SIGNAL=INT for pytest: interrupted, it still writes its summary into tests.log.
    timeout --signal="${PHASE_SIGNAL:-TERM}" --kill-after="$KILL_GRACE" "$limit" "$@" > "$log" 2>&1
    rc=$?
    set -e
    local res=PASS
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        res="TIMEOUT (${limit}s)"
        FAILED=1
    elif [[ $rc -ne 0 ]]; then
        res="FAIL (rc $rc)"
        FAILED=1
    fi
    NAMES+=("$name"); RESULTS+=("$res"); SECONDS_TAKEN+=("$(( $(date +%s) - t0 ))")
    write_summary
    echo "   -> $res; last lines of $(basename "$log"):" >&2
    tail -n 15 "$log" >&2 || true
}

record() {  # record NAME RESULT (a phase decided without running a command)
    NAMES+=("$1"); RESULTS+=("$2"); SECONDS_TAKEN+=(0)
    [[ $2 == PASS* || $2 == SKIP* ]] || FAILED=1
    write_summary
}

# 0. The interpreter: one that cannot run (a wrong PYTHON) failed the first probe below under
# set -e, with no summary and nothing in OUTDIR.
if ! probe "$PY" -c 'import sys' >/dev/null 2>&1; then
    echo "python: cannot run '$PY'; set PYTHON to the interpreter that holds torch" >&2
    record python "FAIL (cannot run PYTHON)"
    echo "GPU check: FAILED (see $OUT/summary.txt)"
    exit 1
fi

# 1. Install (build the C++ and CUDA modules in place). The CUDA module takes minutes to build
# for three targets on few cores, so build only the device's own architecture here; a module
# prebuilt from the same sources for this Python (PPU_FAST_PREBUILT_CUDA=1, the .so placed in
# ppu_fast/ beforehand) is kept as it is.
EXT_SUFFIX=$(probe "$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
if [[ ${PPU_FAST_PREBUILT_CUDA:-0} == 1 && -f ppu_fast/_cuda$EXT_SUFFIX ]]; then
    echo "install: keeping the prebuilt ppu_fast/_cuda$EXT_SUFFIX" >&2
    export PPU_FAST_SKIP_CUDA=1
else
    CC_ARCH=$(probe "$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}-real")' \
              2>/dev/null || echo "80-real;90-real;90-virtual")
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=$CC_ARCH"
    # CMake looks for nvcc on PATH (or CUDAToolkit_ROOT) only: an image that keeps it in
    # /usr/local/cuda/bin would build without the CUDA module and every cuda test would skip.
    if ! command -v nvcc >/dev/null 2>&1; then
        for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
            if [[ -x $d/nvcc ]]; then export PATH="$d:$PATH"; break; fi
        done
    fi
    # (Not PPU_FAST_FORCE_CUDA: with no nvcc at all it would fail the whole install, and the
    # triton and cpu checks with it; a missing CUDA module already fails gpu-backends.)
fi
if [[ ${SKIP_INSTALL:-0} == 1 ]]; then
    record install "SKIP (SKIP_INSTALL=1)"
    echo "install skipped (SKIP_INSTALL=1)" > "$OUT/install.log"
else
    run_phase install "$INSTALL_TIMEOUT" "$OUT/install.log" \
        "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

# 2. Backends report.
run_phase info 60 "$OUT/info.txt" "$PY" -m ppu_fast.info
# The driver and the CUDA versions: the CUDA module links CUDA's runtime statically, and a
# driver older than its nvcc makes it unavailable while torch still works.
{
    echo "nvidia-smi: $(probe nvidia-smi --query-gpu=name,driver_version,memory.total \
                        --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
    echo "nvcc: $(probe nvcc --version 2>&1 | grep -i release || echo 'not on PATH')"
    probe "$PY" -c 'import torch; print(f"torch {torch.__version__}, torch.version.cuda {torch.version.cuda}")' 2>&1
} >> "$OUT/info.txt" || true
cat "$OUT/info.txt"

# Is there a device, and can the GPU backends run on it? (A GPU box whose cuda/triton backend
# is unavailable is a failed check, not a quiet fallback to torch.)
HAVE_GPU=$(probe "$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ $HAVE_GPU == 1 ]]; then
    if probe "$PY" - >> "$OUT/info.txt" 2>&1 <<'PYEOF'
import sys
from ppu_fast.backends import describe
bad = [f"{n}: {why}" for n, ok, why in describe() if n in ("cuda", "triton") and not ok]
print("GPU backends: " + ("all available" if not bad else "UNAVAILABLE " + " | ".join(bad)))
sys.exit(1 if bad else 0)
PYEOF
    then record gpu-backends PASS
    else record gpu-backends "FAIL (see info.txt)"
    fi
else
    echo "no CUDA device (torch.cuda.is_available() is False)" | tee -a "$OUT/info.txt" >&2
    record gpu-backends "FAIL (no CUDA device)"
fi

# 3. GPU tests. Name the files explicitly (collecting all of tests/ would import modules that
# need packages absent here, e.g. hypothesis); leave out files that import hypothesis at top
# level when it is not installed.
HAVE_HYP=$(probe "$PY" -c 'import hypothesis' >/dev/null 2>&1 && echo 1 || echo 0)
TEST_FILES=()
while IFS= read -r f; do
    if [[ $HAVE_HYP == 0 ]] && grep -qE '^(import|from) hypothesis' "$f"; then
        echo "tests: leaving out $f (imports hypothesis, not installed)" >&2
        continue
    fi
    TEST_FILES+=("$f")
done < <( { ls tests/test_backend_cuda.py tests/test_backend_triton.py 2>/dev/null || true
            grep -rlE 'mark\.gpu|marks=.*gpu' tests --include='test_*.py' 2>/dev/null || true; } \
          | awk '!seen[$0]++')
if [[ ${#TEST_FILES[@]} -eq 0 ]]; then
    record tests "FAIL (no test files with gpu tests found)"
    echo "no test files found" > "$OUT/tests.log"
else
    # The Triton tests compile ~480 kernel variants (~0.4 s each for sm_90): spread over
    # workers where pytest-xdist is installed (the device image has it).
    PARALLEL=()
    if probe "$PY" -c 'import xdist' >/dev/null 2>&1; then
        PARALLEL=(-n "${TEST_WORKERS:-6}" --dist load)
    fi
    PHASE_SIGNAL=INT run_phase tests "$TESTS_TIMEOUT" "$OUT/tests.log" \
        "$PY" -m pytest -m gpu -p no:cacheprovider -v -rfEs \
        ${PARALLEL[@]+"${PARALLEL[@]}"} "${TEST_FILES[@]}"
fi

# 4. Benchmarks. run.py stops starting new cases (and compilations) at --deadline-s and caps
# torch.compile's compilation at --compile-budget-s, so it ends (and writes its tables) inside
# the timeout; it writes after every size, so even a killed run leaves what it measured.
BENCH_LIMIT=$(phase_limit "$BENCH_TIMEOUT")
BENCH_DEADLINE=$(( BENCH_LIMIT > 80 ? BENCH_LIMIT - 40 : (BENCH_LIMIT > 0 ? BENCH_LIMIT / 2 : 0) ))
run_phase bench "$BENCH_TIMEOUT" "$OUT/bench.log" \
    "$PY" benchmarks/run.py --device "$BENCH_DEVICE" --out "$OUT" --no-latest \
    --budget 0.5 --max-case-s 8 --deadline-s "$BENCH_DEADLINE" --compile-budget-s 60 \
    ${BENCH_EXTRA[@]+"${BENCH_EXTRA[@]}"}

# 5. Summary (last thing printed).
echo
echo "================ summary ================"
write_summary
cat "$OUT/summary.txt"
probe "$PY" - "$OUT" <<'PYEOF' || true
import json, sys
from pathlib import Path
files = sorted(Path(sys.argv[1]).glob("*-*.json"))
if not files:
    print("no benchmark JSON written"); sys.exit()
doc = json.loads(files[-1].read_text())
cp = doc.get("copy_bandwidth") or {}
if cp:
    print(f"copy bandwidth: {cp['GB_s']:.0f} GB/s")
print(f"{'size':>13} {'impl':<18} {'op':<17} {'median ms':>10} {'GB/s':>7} {'%copy':>6} "
      f"{'x(a)':>6} {'x(b)':>6} {'ref/step':>8}  target")
for r in doc["rows"]:
    if r.get("op") not in ("step", "refine", "refine step route") or "median_ms" not in r:
        continue
    f = lambda key, fmt: (fmt % r[key]) if r.get(key) is not None else ""
    tgt = "; ".join(("MET " if x["met"] else "MISSED ") + x["text"] for x in r.get("targets", []))
    print(f"{r['size']:>13} {r['impl']:<18} {r['op']:<17} {r['median_ms']:>10.3f} "
          f"{f('GB_s', '%.3g'):>7} {f('pct_copy_bw', '%.0f'):>6} {f('x_vs_a', '%.1f'):>6} "
          f"{f('x_vs_b', '%.1f'):>6} {f('refine_over_step', '%.1f'):>8}  {tgt}")
PYEOF
echo "files in $OUT:"; ls -1 "$OUT"
if [[ $FAILED -ne 0 ]]; then
    echo "GPU check: FAILED (see the phases above)"
    exit 1
fi
echo "GPU check: all phases passed"
