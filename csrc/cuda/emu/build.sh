#!/bin/sh
# Builds the CPU emulation of ppu_fast._cuda (see emu_cuda.h) from the same sources:
#   csrc/cuda/emu/build.sh OUT_DIR [extra compiler flags, e.g. -fsanitize=address]
# -> OUT_DIR/_cuda<ext suffix>, a module with ppu_fast._cuda's API whose "device pointers" are CPU
# pointers. Needs g++ (C++17, _Float16) and the Python running the tests (pybind11 importable).
set -e
OUT=${1:?usage: build.sh OUT_DIR [flags]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(dirname "$HERE")
PY=${PYTHON:-python}
INC=$($PY -c 'import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()["include"])')
EXT=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
mkdir -p "$OUT"
FLAGS="-std=c++17 -O1 -g -fPIC -DPPU_CUDA_EMULATE -I$SRC -Wno-attributes $*"
for f in kernels prepare; do
  g++ $FLAGS $(for i in $INC; do echo -I$i; done) -x c++ -c "$SRC/$f.cu" -o "$OUT/$f.o" &
done
g++ $FLAGS $(for i in $INC; do echo -I$i; done) -c "$SRC/bindings.cpp" -o "$OUT/bindings.o"
wait
g++ -shared $* "$OUT/kernels.o" "$OUT/prepare.o" "$OUT/bindings.o" -o "$OUT/_cuda$EXT"
echo "$OUT/_cuda$EXT"
