"""benchmarks/gpu/unlearn_gpu.sh, run on the CPU (DEVICE=cpu) on a tiny random ImageFolder tree, and
benchmarks/gpu/check.sh in its CPU mode (BENCH_DEVICE=cpu), so that the scripts a GPU session
spends its minutes on have run before it gets there."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import image_tree
from ppu_fast.data import CIFAR10_CLASSES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "unlearn_gpu.sh"
CHECK = ROOT / "benchmarks" / "gpu" / "check.sh"

def torch_cuda_absent() -> bool:
    import torch
    return not torch.cuda.is_available()


pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "SKIP_INSTALL": "1",
            "PPU_FAST_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=600)


def test_plan_lists_the_copy_step_twelve_calls_and_four_merges(tmp_path):
    res = run([str(tmp_path / "out"), "plan"], tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("mkdir -p shared/data && cp -r ../shared/data/cifar10")
    assert sum("unlearn_gpu.sh" in line for line in lines) == 12
    assert sum("ppu_fast.tables" in line for line in lines) == 4


def test_missing_data_stops_with_a_message(tmp_path):
    res = run([str(tmp_path / "out"), "allcnn", "class", "a"], tmp_path, DATA_ROOT=str(tmp_path / "none"))
    assert res.returncode == 3
    assert "no CIFAR-10 at DATA_ROOT" in res.stderr


def test_bad_model_is_named(tmp_path):
    res = run([str(tmp_path / "out"), "vgg", "class", "a"], tmp_path)
    assert res.returncode == 2 and "MODEL must be allcnn or resnet18, got 'vgg'" in res.stderr


def test_part_a_runs_and_merges(tmp_path):
    data = image_tree(tmp_path / "cifar10", list(CIFAR10_CLASSES), {"train": 12, "test": 6})
    out = tmp_path / "out"
    res = run([str(out), "allcnn", "class", "a"], tmp_path, DATA_ROOT=str(data), EPOCHS="1", WIDTH="0.25")
    assert res.returncode == 0, res.stdout + res.stderr
    part = out / "allcnn_class_a"
    assert {"results.json", "results.md", "tables.md", "run.log"} <= {p.name for p in part.iterdir()}
    result = json.loads((part / "results.json").read_text())
    assert list(result["methods"]) == ["original", "retrain"]
    assert result["config"]["dataset"] == "cifar10" and result["config"]["scenario"] == "class"
    merged = subprocess.run([sys.executable, "-m", "ppu_fast.tables", str(part), "--out", str(tmp_path / "m")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    assert "Retrain" in (tmp_path / "m" / "results.md").read_text()


def run_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "SKIP_INSTALL": "1", "BENCH_DEVICE": "cpu",
            "TEST_WORKERS": "1", "PYTHONPATH": str(ROOT),
            "BENCH_ARGS": "--sizes 2000x10 --quick --no-compile --no-pot --threads 1", **env}
    return subprocess.run(["bash", str(CHECK), str(out)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)


def summary(out: Path) -> dict:
    rows = (out / "summary.txt").read_text().splitlines()
    return {line.split()[0]: line.split(None, 1)[1].rsplit(None, 1)[0].strip() for line in rows[2:]
            if line.split() and not line.startswith("elapsed")}


@pytest.mark.skipif(not torch_cuda_absent(), reason="runs the CPU mode; a GPU box runs the real check")
def test_check_script_runs_every_phase_in_cpu_mode(tmp_path):
    out = tmp_path / "out"
    res = run_check(out)
    phases = summary(out)
    # No device here: the backends' check fails, so the script's status is 1; the rest passes.
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert phases == {"install": "SKIP (SKIP_INSTALL=1)", "info": "PASS",
                      "gpu-backends": "FAIL (no CUDA device)", "tests": "PASS", "bench": "PASS"}
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8, files  # what the device tool brings back
    assert {"install.log", "info.txt", "tests.log", "summary.txt", "bench.log"} <= set(files)
    bench = [f for f in files if f.startswith("cpu-") and f.endswith(".json")]
    assert len(bench) == 1
    assert "torch.version.cuda" in (out / "info.txt").read_text()
    assert "GPU check: FAILED" in res.stdout


@pytest.mark.skipif(not torch_cuda_absent(), reason="runs the CPU mode; a GPU box runs the real check")
def test_check_script_starts_no_phase_past_its_budget(tmp_path):
    out = tmp_path / "out"
    # 41 s leave 1 s after the kill grace (10 s) and the reserve (30 s): nothing is started.
    res = run_check(out, TOTAL_BUDGET="41")
    phases = summary(out)
    assert res.returncode == 1
    assert phases["info"] == phases["tests"] == phases["bench"] == "TIMEOUT (budget spent)"
    assert "not started" in (out / "bench.log").read_text()


def test_check_script_names_a_python_that_cannot_run(tmp_path):
    """A PYTHON that cannot run (a wrong path in the documented example) stopped the script at
    its first probe under set -e: exit 127, no summary, nothing in OUTDIR."""
    out = tmp_path / "out"
    res = run_check(out, PYTHON=str(tmp_path / "no" / "python"))
    assert res.returncode == 1, res.stderr[-2000:]
    assert summary(out) == {"python": "FAIL (cannot run PYTHON)"}
    assert "set PYTHON to the interpreter that holds torch" in res.stderr
    assert "GPU check: FAILED" in res.stdout
