#!/usr/bin/env bash
# The paper's large-scale comparison on a GPU: CIFAR-10, class and selective unlearning, ALL-CNN and
# ResNet-18, every method (`ppu-fast run --methods all`), split into calls that each stay under about
# 8 minutes of device time.
#
#   benchmarks/gpu/unlearn_gpu.sh OUTDIR MODEL SCENARIO PART
#       MODEL     allcnn | resnet18
#       SCENARIO  class | selective
#       PART      a | b | c   (each trains or loads the original model, then runs its methods)
#                 a: original, retrain
#                 b: original, finetune, neggrad+, cf-k, eu-k, fisher, bad-t
#                 c: original, scrub, scrub+r, ppu, ppu-bias, ppu-random, scrub+ppu, finetune+ppu
#   benchmarks/gpu/unlearn_gpu.sh OUTDIR plan     prints the 12 calls and the merge commands
#
# Twelve calls in all (2 models x 2 scenarios x 3 parts). Back on a development machine, merge the
# three parts of one configuration into one result with the paper's tables:
#   python -m ppu_fast.tables OUT/allcnn_class_a OUT/allcnn_class_b OUT/allcnn_class_c \
#       --out docs/results/cifar10_allcnn_class
#
# Each part writes into OUTDIR/MODEL_SCENARIO_PART/ (flat, 6 files): results.json, results.md,
# results.png, tables.md, figure3_time.png, run.log.
#
# Data. CIFAR-10 must be on the device machine: DATA_ROOT (default shared/data/cifar10 inside the
# checkout) holds torchvision's python batches (cifar-10-batches-py/) or an ImageFolder tree with
# train/ and test/. The JPEG tree ../shared/data/cifar10 holds 56.9 MB of file contents (236 MB on
# disk only because of 4 KiB blocks per file), so with the ~1 MB repository it fits the 64 MiB that
# travel to a device machine. The device tool sends a `shared/` folder inside the checkout but not
# the ../shared beside it, so before the calls, on the development machine:
#   mkdir -p shared/data && cp -r ../shared/data/cifar10 shared/data/ && echo /shared/ >> .git/info/exclude
# (ignored by git: the data is never committed). The script stops with a clear message when the
# folder is missing.
#
# Time. Every part trains the original model (30 epochs of CIFAR-10 minus 5 % validation, unless
# it is in PPU_FAST_CACHE from an earlier part on the same machine), so each call is self-contained;
# the part's command runs under `timeout` (RUN_TIMEOUT, default 470 s) so that a call ends within
# about 8 minutes. Estimates (not measured in this project): 1-2 min per 30-epoch training of
# ALL-CNN or ResNet-18 on an H100, bounded by the per-example data path on the CPU.
#
# Environment:
#   PYTHON=...       interpreter (default: python)
#   DATA_ROOT=...    CIFAR-10 folder (see above)
#   SEEDS=1          comma-separated seeds (default 1: one seed fits a call)
#   WIDTH=1.0        channel width factor of both models
#   EPOCHS=...       training epochs of the original and retrained models (default: the runner's 30)
#   RUN_TIMEOUT=470  limit of the part's run in seconds
#   DEVICE=cuda      cpu runs the same commands without a GPU (to test this script on a tiny tree)
#   SKIP_INSTALL=1   skip `pip install --no-build-isolation --no-deps -e .`
#   PPU_FAST_CACHE   model cache (default ~/.cache/ppu_fast): reused by later parts on a warm machine
set -euo pipefail

PARTS_a="original,retrain"
PARTS_b="original,finetune,neggrad+,cf-k,eu-k,fisher,bad-t"
PARTS_c="original,scrub,scrub+r,ppu,ppu-bias,ppu-random,scrub+ppu,finetune+ppu"

usage() {
    echo "usage: $0 OUTDIR MODEL{allcnn,resnet18} SCENARIO{class,selective} PART{a,b,c}" >&2
    echo "       $0 OUTDIR plan" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
if [[ $2 == plan ]]; then
    echo "mkdir -p shared/data && cp -r ../shared/data/cifar10 shared/data/ && echo /shared/ >> .git/info/exclude"
    for m in allcnn resnet18; do for s in class selective; do
        for p in a b c; do echo "benchmarks/gpu/unlearn_gpu.sh $1 $m $s $p"; done
        echo "python -m ppu_fast.tables $1/${m}_${s}_a $1/${m}_${s}_b $1/${m}_${s}_c --out docs/results/cifar10_${m}_${s}"
    done; done
    exit 0
fi
[[ $# -eq 4 ]] || usage
MODEL=$2 SCENARIO=$3 PART=$4
case $MODEL in allcnn|resnet18) ;; *) echo "MODEL must be allcnn or resnet18, got '$MODEL'" >&2; exit 2;; esac
case $SCENARIO in class|selective) ;; *) echo "SCENARIO must be class or selective, got '$SCENARIO'" >&2; exit 2;; esac
case $PART in a|b|c) ;; *) echo "PART must be a, b or c, got '$PART'" >&2; exit 2;; esac
METHODS_VAR="PARTS_$PART"
METHODS=${!METHODS_VAR}

cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root
mkdir -p "$1/${MODEL}_${SCENARIO}_${PART}"
OUT=$(cd "$1/${MODEL}_${SCENARIO}_${PART}" && pwd)
PY=${PYTHON:-python}
DATA_ROOT=${DATA_ROOT:-shared/data/cifar10}
SEEDS=${SEEDS:-1}
WIDTH=${WIDTH:-1.0}
RUN_TIMEOUT=${RUN_TIMEOUT:-470}
DEVICE=${DEVICE:-cuda}
LOG="$OUT/run.log"

if [[ ! -d $DATA_ROOT ]]; then
    echo "no CIFAR-10 at DATA_ROOT='$DATA_ROOT': put torchvision's python batches or the train/ and" \
         "test/ image folders there (copy ../shared/data/cifar10 to shared/data/cifar10 before the call: see the header)" | tee "$LOG" >&2
    exit 3
fi

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    echo "== install" | tee "$LOG" >&2
    timeout 120 "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1 \
        || { echo "install failed (see $LOG)" >&2; tail -n 20 "$LOG" >&2; exit 4; }
fi
if [[ $DEVICE == cuda ]]; then
    "$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("cuda:", ok, torch.cuda.get_device_name(0) if ok else ""); sys.exit(0 if ok else 5)' \
        | tee -a "$LOG" || { echo "no CUDA device (DEVICE=cpu runs without one)" >&2; exit 5; }
fi

EXTRA=()
[[ -n ${EPOCHS:-} ]] && EXTRA+=(--epochs "$EPOCHS")
echo "== ppu-fast run: $MODEL / $SCENARIO / part $PART: $METHODS (limit ${RUN_TIMEOUT}s)" | tee -a "$LOG" >&2
t0=$(date +%s)
set +e
timeout --kill-after=10 "$RUN_TIMEOUT" "$PY" -m ppu_fast.cli run --dataset cifar10 --data-root "$DATA_ROOT" \
    --model "$MODEL" --width "$WIDTH" --scenario "$SCENARIO" --methods "$METHODS" --seeds "$SEEDS" \
    --device "$DEVICE" --no-progress --out "$OUT" "${EXTRA[@]}" >> "$LOG" 2>&1
rc=$?
set -e
echo "== rc $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG" >&2
tail -n 25 "$LOG"
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "TIMEOUT: part $PART did not finish in ${RUN_TIMEOUT}s; split it further (--methods) or lower EPOCHS" >&2
fi
echo "files in $OUT:"; ls -1 "$OUT"
exit $rc
