"""Packaging (issue 11): every file the package reads at run time ships in the wheel and the sdist.

Building a wheel compiles the extensions (minutes), so these tests ask setuptools for the two
lists instead, in seconds: ``build_py`` lays out the wheel's Python part (modules and package
data) exactly as ``bdist_wheel`` does, and ``egg_info`` writes SOURCES.txt, the file list that
``sdist`` archives. .ci/wheel_smoke.sh installs and runs a real wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ppu_fast"
# Produced by builds, never sources: compiled modules and bytecode.
BUILT = (".so", ".pyd", ".pyc", ".pyo")


def _package_files(suffixes: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Files under ppu_fast/, relative to the repository root, build outputs left out."""
    out = []
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.name.endswith(BUILT):
            continue
        if suffixes is not None and not path.name.endswith(suffixes):
            continue
        if path.name.endswith(exclude):
            continue
        out.append(path.relative_to(ROOT).as_posix())
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The wheel's Python part (a build_py folder) and the sdist's file list (SOURCES.txt)."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("packaging")
    lib = tmp / "lib"
    # Everything goes under tmp: egg_info's --egg-base keeps the checkout free of *.egg-info.
    res = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp),
                          "build_py", "--build-lib", str(lib)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sources = (tmp / "ppu_fast.egg-info" / "SOURCES.txt").read_text().split("\n")
    return {"lib": lib, "sdist": {s.strip() for s in sources if s.strip()}}


def test_wheel_holds_every_package_file(layout: dict) -> None:
    """Every file in ppu_fast/ that is not Python (paper_numbers.json and the PEP 561 marker
    py.typed today) is package data: a data file added without declaring it in setup.py fails
    here, not after a user's install."""
    wheel = {p.relative_to(layout["lib"]).as_posix() for p in layout["lib"].rglob("*") if p.is_file()}
    data = _package_files(exclude=(".py",))
    assert {"ppu_fast/paper_numbers.json", "ppu_fast/py.typed"} <= set(data)
    missing = [f for f in _package_files() if f not in wheel]
    assert not missing, f"not in the wheel (add them to package_data in setup.py): {missing}"


def test_sdist_holds_what_a_build_needs(layout: dict) -> None:
    """A wheel can be built from the sdist: the build files, all of csrc/ and the package."""
    need = ["setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", *_package_files()]
    need += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").rglob("*"))
             if p.is_file() and not p.name.endswith(BUILT)]
    assert any(f.endswith(".cu") for f in need)
    missing = [f for f in need if f not in layout["sdist"]]
    assert not missing, f"not in the sdist (MANIFEST.in or package_data): {missing}"
    built = [f for f in layout["sdist"] if f.endswith(BUILT) or f.startswith("build/")]
    assert not built, f"build outputs in the sdist: {built}"


def test_installed_package_reads_the_paper_numbers(layout: dict, tmp_path: Path) -> None:
    """The paper's numbers load from the wheel's layout alone, as after a non-editable install:
    through importlib.resources and through ppu_fast.tables, which `ppu-fast run` calls."""
    script = textwrap.dedent(f"""
        import importlib.resources, json, sys
        from pathlib import Path
        sys.path.insert(0, {os.fspath(layout["lib"])!r})
        import ppu_fast.tables
        assert Path(ppu_fast.__file__).resolve().is_relative_to({os.fspath(layout["lib"].resolve())!r}), \\
            ppu_fast.__file__
        text = importlib.resources.files("ppu_fast").joinpath("paper_numbers.json").read_text("utf-8")
        assert json.loads(text) == ppu_fast.tables.paper_numbers()
        print(sorted(json.loads(text)["tables"]))
    """)
    # Run from an empty folder so that the checkout is not on sys.path.
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "'1'" in res.stdout


def test_lazy_names_are_typed_for_type_checkers() -> None:
    """ppu_fast ships py.typed; its lazily imported names (refine_file, unlearn, ...) resolve
    through a module __getattr__, which type checkers read as Any: each one is imported under
    TYPE_CHECKING too, and nothing there is imported at run time."""
    import ast

    import ppu_fast

    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    typed = {alias.asname or alias.name
             for node in tree.body if isinstance(node, ast.If)
             and getattr(node.test, "id", None) == "TYPE_CHECKING"
             for stmt in node.body if isinstance(stmt, ast.ImportFrom) for alias in stmt.names}
    assert typed == set(ppu_fast._LAZY), (typed, set(ppu_fast._LAZY))
    code = ("import sys, ppu_fast; print(sorted(m for m in ('ppu_fast.stream', 'ppu_fast.unlearn', "
            "'ppu_fast.finetune') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
