"""The CPU studies in benchmarks/ that docs cite for decisions still run, and still say what the
docs say: the float64-oracle fuzzer (benchmarks/fuzz_refine.py) finds no bad result on a few of
its cases, and the Hessian study (benchmarks/hessian_estimators.py) puts the exact Hessian at zero
error with the row sample above it. Each runs as a user would, as a script, into a temporary
folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = out.glob("*.json")
    assert record.with_suffix(".md").exists()
    return json.loads(record.read_text())


def test_fuzz_refine_finds_no_bad_result_on_its_first_cases(tmp_path):
    got = _run("fuzz_refine.py", "--cases", "6", "--threads", "1", out=tmp_path)
    counts = {r["backend"]: r for r in got["rows"] if "backend" in r}
    assert set(counts) == {"cpu", "torch"}
    for backend, r in counts.items():
        assert sum(r[k] for k in r if k != "backend") == 6, backend
        for outcome in ("bad", "exception", "oracle-fail", "harness-error"):
            assert r[outcome] == 0, (backend, outcome, got["rows"][-1]["flagged"])
        assert r["ok"] >= 4, (backend, r)


def test_fuzz_refine_only_runs_the_cases_named(tmp_path):
    got = _run("fuzz_refine.py", "--cases", "40", "--only", "3", "17", "--backends", "cpu",
               "--threads", "1", out=tmp_path)
    (row,) = [r for r in got["rows"] if "backend" in r]
    assert sum(v for k, v in row.items() if k != "backend") == 2


def test_hessian_study_ranks_the_estimators(tmp_path):
    got = _run("hessian_estimators.py", "--sizes", "8192x40", "--top-strides", "1",
               out=tmp_path)
    err = {r["estimator"]: r["w_rel_error"] for r in got["rows"]}
    assert set(err) == {"sampled", "top/1", "exact"}
    assert err["exact"] == 0.0
    assert 0.0 < err["top/1"] < err["sampled"]
    for r in got["rows"]:
        assert r["hessian_stride"] > 1 and r["passes"] is not None
        assert r["history"][-1] <= 1e-6


def _refused(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    return proc.stderr


def test_benchmark_arguments_are_refused_before_any_measurement(tmp_path):
    """A results folder that is empty, a file or not writable, a size with k = 1, the fuzzer's
    repeated or unknown backends and empty selections, a bad study parameter: exit 2 naming the
    argument (they gave tracebacks after measuring, or a record of nothing)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "argument --out: empty" in _refused("host_overhead.py", "--sizes", "256x10",
                                               "--out", "")
    assert "is a file" in _refused("solver_grid.py", "--out", str(afile))
    assert "cannot write a folder at '/proc/ppu-fast-no'" in _refused(
        "run.py", "--device", "cpu", "--sizes", "256x10", "--out", "/proc/ppu-fast-no")
    assert "k >= 2" in _refused("host_overhead.py", "--sizes", "256x1", "--out", str(tmp_path))
    assert "invalid choice: 'bogus'" in _refused("fuzz_refine.py", "--backends", "bogus",
                                                 "--out", str(tmp_path))
    assert "repeats a backend" in _refused("fuzz_refine.py", "--backends", "cpu", "cpu",
                                           "--out", str(tmp_path))
    assert "no case to run" in _refused("fuzz_refine.py", "--cases", "3", "--start", "10",
                                        "--out", str(tmp_path))
    assert "expected a positive number, got '0'" in _refused("few_forget_rows.py", "--lams",
                                                             "0", "--out", str(tmp_path))
    assert not any(tmp_path.glob("*.json"))


def test_two_records_in_one_minute_keep_both(tmp_path):
    """Records are named by the minute; a second one in the same minute gets the seconds (it
    overwrote the first), and --max-case-s inf means no limit (it overflowed in every case)."""
    for size in ("256x10", "512x10"):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device",
                               "cpu", "--quick", "--no-compile", "--no-pot", "--threads", "1",
                               "--sizes", size, "--budget", "0.02", "--max-case-s", "inf",
                               "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(r.read_text()) for r in sorted(tmp_path.glob("cpu-*.json"))]
    assert len(records) == 2 and sorted(s for r in records for s in r["sizes"]) == [
        "256x10", "512x10"]
    for r in records:
        assert r["rows"] and not any(row.get("error") for row in r["rows"]), r["rows"]


def test_the_studies_records_of_one_minute_keep_both(tmp_path, monkeypatch):
    """lam_range.py and scaling.py named their records by the minute alone: a second run in
    the same minute overwrote the first (their measurements are replaced by stand-ins here)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lam_range
    import scaling

    monkeypatch.setattr(lam_range, "PROBLEMS", [(100, 6.0)])
    monkeypatch.setattr(lam_range, "sweep",
                        lambda n, margin: {"float32": {"class": {"lam 1": f"ok {n}"}}})
    monkeypatch.setattr(sys, "argv", ["lam_range.py", "--out", str(tmp_path)])
    lam_range.main()
    lam_range.main()
    assert len(list(tmp_path.glob("lam-range-*.md"))) == 2
    assert len(list(tmp_path.glob("lam-range-*.json"))) == 2
    world = {"threads_per_rank": 1, "seconds_median": 0.5, "pass_seconds_median": 0.1,
             "allreduce_share_median": 0.05}
    result = {"n": 100, "k": 10, "worlds": {"1": world, "2": world},
              "plain_in_memory": {"seconds_median": 0.4, "pass_seconds_median": 0.08}}
    paths = {scaling.write("dist", result, tmp_path) for _ in range(2)}
    assert len(paths) == 2 and all(p.is_file() and p.with_suffix(".md").is_file() for p in paths)
