"""benchmarks/gpu/unlearn_gpu.sh, run on the CPU (DEVICE=cpu) on a tiny random ImageFolder tree, so
that the script a GPU session spends its minutes on has run before it gets there."""
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
