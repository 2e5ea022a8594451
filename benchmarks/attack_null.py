"""How often the verdict would call an attack gap "real" when the losses carry no membership:
the calibration of ``metrics.mia_detail``'s ``chance`` (docs/unlearning.md, "the attack").

    python benchmarks/attack_null.py [--sizes 12 36 100] [--tables 150] [--seed 0]
                                     [--out benchmarks/results]

For each size n (examples a side) and loss distribution, ``--tables`` null tables: two
independent draws of n forget and n test losses from the same distribution (an "Original" and a
"Retrain" whose attack can tell nothing), each scored by the attack itself (scikit-learn's
logistic regression over its 5 splits, ``metrics._attack``), and ``chance`` computed as the
verdict gets it (Retrain's ``_null_spread``). Reported: the spread (standard deviation) of the
attack's scores over the tables, the mean ``chance``, the coin flips' 50 / sqrt(scored) that the
rule used before 2026-12-07, and the share of tables whose gap exceeds the verdict's 2 sqrt(2)
chance (what a two-standard-deviation rule should keep near 5 %), beside the share the old
figure would have called real. Writes attack-null-<stamp>.json / .md to ``--out``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

from ppu_fast import metrics  # noqa: E402

# Loss distributions of a model's cross-entropy: positive, mostly small, some large.
DISTRIBUTIONS = {
    "exponential": lambda rng, m: rng.exponential(size=m) * 0.5,
    "lognormal": lambda rng, m: rng.lognormal(-2.0, 1.5, size=m),
    "half-normal": lambda rng, m: np.abs(rng.normal(size=m)) * 2.0,
    "tiny (~1e-3)": lambda rng, m: rng.exponential(size=m) * 1e-3,
}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=common.positive_int, default=[12, 36, 100],
                    help="examples a side (default 12 36 100)")
    ap.add_argument("--tables", type=common.positive_int, default=150,
                    help="null tables per size and distribution (default 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    args = ap.parse_args()
    if any(n < metrics.MIA_MIN_PER_SIDE for n in args.sizes):
        ap.error(f"argument --sizes: the attack needs at least {metrics.MIA_MIN_PER_SIDE} a side")
    meta = common.metadata("cpu")
    meta["command"] = f"python benchmarks/attack_null.py {' '.join(sys.argv[1:])}".strip()
    rng = np.random.default_rng(args.seed)
    rows, table = [], []
    cases = [(n, d) for n in args.sizes for d in DISTRIBUTIONS]
    for n, dist in tqdm(cases, desc="attack null"):
        draw = DISTRIBUTIONS[dist]
        scores, chances, real, real_coin = [], [], 0, 0
        for t in range(args.tables):
            pair = []
            for side in range(2):  # Original, then Retrain (whose chance the verdict reads)
                sc, _, scored, (x, y, splits) = metrics._attack(
                    list(draw(rng, n)), list(draw(rng, n)), 2 * t + side)
                pair.append(100.0 * float(np.mean(sc)))
            chance = metrics._null_spread(x, y, splits, t)
            coin = 50.0 / math.sqrt(scored)
            gap = abs(pair[0] - pair[1])
            scores += pair
            chances.append(chance)
            real += gap > 2 * math.sqrt(2) * chance
            real_coin += gap > 2 * math.sqrt(2) * coin
        row = {"n": n, "losses": dist, "tables": args.tables, "scored": scored,
               "score_sd": float(np.std(scores, ddof=1)), "chance_mean": float(np.mean(chances)),
               "coin": coin, "real_share": real / args.tables,
               "real_share_coin": real_coin / args.tables}
        rows.append(row)
        table.append([str(n), dist, f"{row['score_sd']:.2f}", f"{row['chance_mean']:.2f}",
                      f"{coin:.2f}", f"{100 * row['real_share']:.1f}",
                      f"{100 * row['real_share_coin']:.1f}"])
    stem = common.write_record(
        Path(args.out), "attack-null", meta, rows,
        "the attack on losses that carry no membership: its spread against chance",
        f"{args.tables} null tables per row (two independent draws of n losses a side from one "
        f"distribution, seed {args.seed}); real = the share of tables whose two scores differ by "
        f"more than 2 sqrt(2) x chance (the verdict's rule; ~5 % expected), coin = the same with "
        f"50 / sqrt(scored) in place of chance (the rule before 2026-12-07)",
        ["n a side", "losses", "score SD", "mean chance", "coin flips", "real %",
         "real % (coin)"], table)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
