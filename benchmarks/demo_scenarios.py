"""Candidate scenarios for ``ppu-fast demo``, measured: which one shows forgetting on the embedded
data (scikit-learn's digits) in about a minute on 2 cores?

For each candidate: Original, Retrain, Finetune and the PPU variants (PPU with the API's default
fine-tuning, 10 epochs at lr 0.01, and with the earlier demo's 30 epochs at lr 0.05), each row with
forget / retain / test error, the attack (mean, its split accuracies and the predictions it
scores) and seconds, plus the candidate's wall time. docs/unlearning.md ("Why this demo") quotes
the result.

    PYTHONPATH=. python benchmarks/demo_scenarios.py --out /tmp/scenarios.json [--only NAME,...]

Candidates:
- ``digits5``: the earlier demo (classes 0-4, forget 25 zeros);
- ``digits-class5``: digits, forget every training 5 (class unlearning);
- ``digits-noisy100`` / ``digits-noisy50``: digits with 100 / 50 training labels flipped to another
  class at random, and exactly those examples forgotten (a selective forget set that only
  memorisation gets "right").

The original and retrained models go to the usual cache (``$PPU_FAST_CACHE``); the seconds are
each method's own, so compare them within a candidate on a busy machine.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

from ppu_fast.data import make_split  # noqa: E402
from ppu_fast.models import build_model  # noqa: E402
from ppu_fast.training import fit_cached  # noqa: E402
from ppu_fast.unlearn import unlearn  # noqa: E402
from ppu_fast.unlearn.experiment import default_train_config, evaluate  # noqa: E402

CANDIDATES = ("digits5", "digits-class5", "digits-noisy100", "digits-noisy50")
VARIANTS = {"ppu": {}, "ppu-bias": {}, "ppu-random": {},
            "ppu@30": {"epochs": 30, "lr": 0.05}, "ppu-bias@30": {"epochs": 30, "lr": 0.05},
            "ppu-random@30": {"epochs": 30, "lr": 0.05}}


def build(name: str, seed: int):
    if name == "digits5":
        return make_split("digits5", seed=seed, progress=False)
    if name == "digits-class5":
        return make_split("digits", scenario="class", forget_class=5, seed=seed, progress=False)
    n = int(name.removeprefix("digits-noisy"))
    split = make_split("digits", scenario="selective", seed=seed, progress=False)
    rng = np.random.default_rng(seed + 1)
    idx = np.sort(rng.choice(len(split.train), n, replace=False))
    targets = split.train.targets.clone()
    shift = torch.as_tensor(rng.integers(1, split.num_classes, n))
    targets[idx] = (targets[idx] + shift) % split.num_classes
    split.train.targets = targets
    split.forget_idx = idx.astype(np.int64)
    split.retain_idx = np.setdiff1d(np.arange(len(split.train)), idx)
    return split


def run(name: str, seed: int) -> dict:
    started = time.perf_counter()
    split = build(name, seed)
    dataset = "digits5" if name == "digits5" else "digits"
    tcfg = default_train_config(dataset, seed)
    torch.manual_seed(seed)
    init = build_model("smallcnn", split.num_classes, split.in_channels)
    original, meta = fit_cached(init, split.train, tcfg, progress=False, cache=True)
    rows = {"original": {**evaluate(original, split, seed=seed), "seconds": 0.0,
                         "train_seconds": meta["train_seconds"]}}
    for method in ("retrain", "finetune", *VARIANTS):
        base = method.split("@")[0]
        kw = dict(VARIANTS.get(method, {}))
        if base == "retrain":
            kw = {"config": tcfg, "init": init}
        res = unlearn(original, split.forget, split.retain, method=base, val=split.val, seed=seed,
                      progress=False, **kw)
        seconds = res.timings["train"] if base == "retrain" else res.timings["total"]
        rows[method] = {**evaluate(res.model, split, seed=seed), "seconds": seconds}
        r = rows[method]
        print(f"{name} seed {seed} {method:<14} forget {r['forget_error']:6.2f} retain {r['retain_error']:5.2f} "
              f"test {r['test_error']:5.2f} MIA {r['mia']:6.2f} (±{r['mia_chance']:.1f} by chance) "
              f"{seconds:5.1f} s", flush=True)
    return {"candidate": name, "seed": seed, "split": {k: v for k, v in split.describe().items()
                                                       if k not in ("data_root", "forget_classes")},
            "rows": rows, "wall_seconds": time.perf_counter() - started,
            "loadavg_after": os.getloadavg()}


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--out", required=True)  # a JSON file, checked below
    p.add_argument("--only", default=",".join(CANDIDATES))
    p.add_argument("--seeds", type=common.int_list, default=[0], help="comma-separated")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out: no folder {os.path.dirname(os.path.abspath(args.out))!r} to write "
                f"{os.path.basename(args.out)!r} into")
    unknown = [n for n in args.only.split(",") if n not in CANDIDATES
               and not (n.startswith("digits-noisy") and n[len("digits-noisy"):].isdigit())]
    if unknown:
        p.error(f"--only: unknown {unknown}; expected some of {list(CANDIDATES)} (or "
                f"digits-noisyN for another N)")
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    results = []
    for name in args.only.split(","):
        for seed in args.seeds:
            results.append(run(name, seed))
            with open(args.out, "w") as fh:
                json.dump({"torch": torch.__version__, "loadavg_start": load_start, "runs": results}, fh,
                          indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
