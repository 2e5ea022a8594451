#!/usr/bin/env bash
# Smoke check of a built wheel as a user gets it: a fresh virtual environment, a non-editable
# install, run from a folder outside the checkout so that nothing in it can be imported.
#
#   .ci/wheel_smoke.sh WHEEL                   # installs torch as README.md does, then the wheel
#   .ci/wheel_smoke.sh WHEEL --deps-from VENV  # the dependencies come from VENV's site-packages
#
# --deps-from is what .ci/run uses: torch and its CUDA libraries are 6 GB and take minutes to
# install a second time. The new environment then sees VENV's packages, except any ppu_fast, and
# pip still checks the wheel's requirements against them.
set -euo pipefail
usage="usage: $0 WHEEL [--deps-from VENV]"
wheel="$(realpath "${1:?$usage}")"
[ -f "$wheel" ] || { echo "wheel_smoke: no file $wheel" >&2; exit 2; }
deps=""
if [ $# -ge 2 ]; then
  [ "$2" = "--deps-from" ] && [ $# -eq 3 ] || { echo "$usage" >&2; exit 2; }
  deps="$(realpath "$3")"
fi
work="$(mktemp -d)"
cd "$work"
python3 -m venv venv
py="$work/venv/bin/python"
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -n "$deps" ]; then
  # A folder of links, not VENV's site-packages itself: VENV holds the editable ppu_fast, which
  # must not be importable or count as installed here.
  theirs="$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir deps
  for entry in "$theirs"/*; do
    case "$(basename "$entry")" in
      ppu_fast* | __editable__*) ;;
      *) ln -s "$entry" deps/ ;;
    esac
  done
  echo "$work/deps" > "$site/ci_shared_deps.pth"
else
  "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
"$py" -m pip install -q "$wheel"
"$py" -m pip check

echo "== the installed package and its compiled modules"
"$py" - "$site" "$wheel" <<'EOF'
import importlib, sys, zipfile
from pathlib import Path

site, wheel = Path(sys.argv[1]).resolve(), sys.argv[2]
import ppu_fast
where = Path(ppu_fast.__file__).resolve()
assert where.is_relative_to(site), f"ppu_fast imported from {where}, not from {site}"
compiled = sorted(Path(n).name.split(".")[0] for n in zipfile.ZipFile(wheel).namelist()
                  if n.startswith("ppu_fast/") and n.endswith((".so", ".pyd")))
assert "_C" in compiled, f"the wheel has no ppu_fast._C: {compiled}"
# PEP 561: without the marker, type checkers ignore the package's hints.
assert (where.parent / "py.typed").is_file(), "the installed package has no py.typed"
for name in compiled:
    mod = importlib.import_module(f"ppu_fast.{name}")  # _cuda loads without a GPU
    print(f"ppu_fast.{name}: {mod.__file__}")
print("ppu_fast", ppu_fast.__version__, "from", where.parent)
EOF
"$py" -m ppu_fast.info | tee info.txt
grep -Eq '^ +cpu +available' info.txt || { echo "wheel_smoke: the cpu backend is not available" >&2; exit 1; }

echo "== ppu-fast refine on a small .npy file"
"$py" - <<'EOF'
import numpy as np

rng = np.random.default_rng(0)
logits = rng.normal(size=(500, 6)) * 3
probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
np.save("probs.npy", probs.astype(np.float32))
np.save("forget.npy", np.arange(500) % 10 == 0)
EOF
venv/bin/ppu-fast refine --probs probs.npy --forget forget.npy --backend cpu --out q.npy
"$py" - <<'EOF'
import numpy as np

q = np.load("q.npy")
assert q.shape == (500, 6) and q.dtype == np.float32, (q.shape, q.dtype)
assert np.abs(q.sum(1) - 1).max() < 1e-5, np.abs(q.sum(1) - 1).max()
EOF

echo "== ppu-fast refine streaming the same file in chunks (ppu_fast.refine_file)"
venv/bin/ppu-fast refine --probs probs.npy --forget forget.npy --backend cpu --out q_stream.npy \
  --chunk-rows 64 --no-progress
"$py" - <<'EOF'
import numpy as np

q, qs = np.load("q.npy"), np.load("q_stream.npy")
assert np.abs(q - qs).max() < 1e-6, np.abs(q - qs).max()
EOF

echo "== ppu-fast run: the paper's tables (paper_numbers.json) beside a one-epoch run"
PPU_FAST_CACHE="$work/cache" venv/bin/ppu-fast run --dataset digits5 --model smallcnn \
  --methods original,ppu --epochs 1 --unlearn-epochs 1 --threads 1 --no-progress --out run
grep -q '(paper, ' run/tables.md || { echo "wheel_smoke: no paper numbers in run/tables.md" >&2; exit 1; }
echo "wheel_smoke: ok ($work)"
