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


class CMakeBuild(build_ext):
    """Configure and build the CMake project into the package directory of ``ext``."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cmake = _tool("cmake", "cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: pip install cmake (a build requirement)")
        build_type = os.environ.get("PPU_FAST_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPPU_FAST_SKIP_CUDA={'ON' if _truthy('PPU_FAST_SKIP_CUDA') else 'OFF'}",
            f"-DPPU_FAST_FORCE_CUDA={'ON' if _truthy('PPU_FAST_FORCE_CUDA') else 'OFF'}",
        ]
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass  # let CMake search for it
        if "CMAKE_GENERATOR" not in os.environ:
            ninja = _tool("ninja", "ninja")
            if ninja:
                args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)

        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)

        # CMake also builds ppu_fast._cuda beside _C; setuptools copies only _C back into the
        # source tree for editable installs, so copy every module it built.
        if getattr(self, "editable_mode", False) and not self.inplace:
            pkg_src = ROOT / "ppu_fast"
            for so in extdir.glob("_*.so"):
                shutil.copy2(so, pkg_src / so.name)
            for so in extdir.glob("_*.pyd"):
                shutil.copy2(so, pkg_src / so.name)


setup(
    name="ppu_fast",
    version="0.1.0",
    description="Fast Pseudo-Probability Unlearning (PPU / AdaProb): the dual solver, "
                "compiled CPU/CUDA/Triton kernels and the unlearning pipeline",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8")
    if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ppu_fast", "ppu_fast.*"]),
    ext_modules=[CMakeExtension("ppu_fast._C", sourcedir=os.fspath(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "tqdm", "matplotlib", "scikit-learn", "threadpoolctl"],
    extras_require={
        # pybind11, cmake and ninja: tests/test_build.py configures the CMake project itself.
        "test": ["pytest", "hypothesis", "POT", "scikit-learn", "pytest-benchmark", "pybind11",
                 "cmake", "ninja"],
        "bench": ["pytest-benchmark"],
    },
    entry_points={"console_scripts": ["ppu-fast = ppu_fast.cli:main"]},
    zip_safe=False,
)
