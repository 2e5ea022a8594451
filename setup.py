"""Build script: setuptools drives CMake (pybind11's cmake_example pattern).

CMakeLists.txt builds ``ppu_fast._C`` (C++17/OpenMP CPU kernels) always and ``ppu_fast._cuda``
whenever a CUDA compiler is found; ``PPU_FAST_SKIP_CUDA=1`` skips the CUDA module and
``PPU_FAST_FORCE_CUDA=1`` makes its absence an error. Nothing here imports torch: the compiled
modules do not link libtorch, so the build works where torch is not importable.

    pip install -e .                                   # build isolation: cmake/ninja/pybind11 from PyPI
    pip install --no-build-isolation --no-deps -e .    # where they are preinstalled
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension built by CMake from ``sourcedir`` (no sources for setuptools to compile)."""

    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


def _tool(name: str, module: str) -> str | None:
    """Path of the ``name`` executable: on PATH, else from the PyPI package ``module``."""
    found = shutil.which(name)
    if found:
        return found
    try:
        mod = __import__(module)
        path = Path(mod.BIN_DIR if module == "ninja" else mod.CMAKE_BIN_DIR) / name
        return os.fspath(path) if path.exists() else None
    except Exception:
        return None


def _truthy(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "on", "true", "yes")


def _stable_pybind11(dest_root: Path) -> str | None:
    """pybind11's CMake directory, from a copy at a path that does not change between builds.

    pip's build isolation installs pybind11 under a new temporary directory for every build; its
    include path is on every compile command line, so ninja would recompile everything (minutes
    of nvcc) although nothing changed. A copy per pybind11 version keeps the command lines and the
    headers' timestamps the same from one build to the next."""
    try:
        import pybind11
    except ImportError:
        return None  # let CMake search for it
    dest = dest_root / f"pybind11-{pybind11.__version__}"
    if not dest.is_dir():
        tmp = dest_root / f".pybind11-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(pybind11.__file__).parent, tmp,
                        ignore=shutil.ignore_patterns("__pycache__"))
        try:
            tmp.rename(dest)
        except OSError:  # another build got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return os.fspath(dest / "share" / "cmake" / "pybind11")


class CMakeBuild(build_ext):
    """Configure and build the CMake project, then copy its modules into the package directory.

    The CMake tree is build/cmake-<platform>-<python>, the same for ``pip install -e .``, ``pip
    install .`` and ``pip wheel .`` from one checkout (setuptools would give an editable install a
    fresh temporary directory each time), so a later build recompiles only what changed."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cmake = _tool("cmake", "cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: pip install cmake (a build requirement)")
        build_dir = (Path(ext.sourcedir) / "build"
                      / f"cmake-{sysconfig.get_platform()}-{sys.implementation.cache_tag}")
        # The modules go to a fixed folder inside the tree and are copied from there: a changed
        # output path would relink them (LTO makes linking _C a large part of its build).
        modules = build_dir / "modules"
        build_type = os.environ.get("PPU_FAST_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={modules}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPPU_FAST_SKIP_CUDA={'ON' if _truthy('PPU_FAST_SKIP_CUDA') else 'OFF'}",
            f"-DPPU_FAST_FORCE_CUDA={'ON' if _truthy('PPU_FAST_FORCE_CUDA') else 'OFF'}",
        ]
        build_dir.mkdir(parents=True, exist_ok=True)
        pybind11_dir = _stable_pybind11(build_dir)
        if pybind11_dir:
            args.append(f"-Dpybind11_DIR={pybind11_dir}")
        if "CMAKE_GENERATOR" not in os.environ:
            ninja = _tool("ninja", "ninja")
            if ninja:
                args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)

        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)

        # Only the modules of this configuration: the folder may hold a _cuda from an earlier one.
        names = (build_dir / "ppu_fast_modules.txt").read_text().split()
        extdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(modules / name, extdir / name)
        # setuptools copies only _C back into the source tree for editable installs.
        if getattr(self, "editable_mode", False) and not self.inplace:
            for name in names:
                shutil.copy2(modules / name, ROOT / "ppu_fast" / name)


setup(
    name="ppu_fast",
    version="0.1.0",
    description="Fast Pseudo-Probability Unlearning (PPU / AdaProb): the dual solver, "
                "compiled CPU/CUDA/Triton kernels and the unlearning pipeline",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8")
    if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ppu_fast", "ppu_fast.*"]),
    # Files the package reads at run time; tests/test_packaging.py checks that none is missing.
    # py.typed: the PEP 561 marker, so that type checkers read the package's own hints.
    package_data={"ppu_fast": ["paper_numbers.json", "py.typed"]},
    ext_modules=[CMakeExtension("ppu_fast._C", sourcedir=os.fspath(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    # torch.get_default_device (ppu_fast/torch_defaults.py) is torch 2.3's.
    install_requires=["torch>=2.3", "numpy", "scipy", "tqdm", "matplotlib", "scikit-learn", "threadpoolctl"],
    extras_require={
        # pybind11, cmake and ninja: tests/test_build.py configures the CMake project itself.
        # pytest-xdist: README's test command runs the suite on two workers (CI's two cores).
        "test": ["pytest", "pytest-xdist>=3.2", "hypothesis", "POT", "scikit-learn",
                 "pytest-benchmark", "pybind11", "cmake", "ninja"],
        "bench": ["pytest-benchmark"],
    },
    entry_points={"console_scripts": ["ppu-fast = ppu_fast.cli:main"]},
    zip_safe=False,
)
