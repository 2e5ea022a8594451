"""Which lam a refine solves to tol: converged or the residual reached, per lam decade, dtype and
forget set (class unlearning, all rows but one, a random 10 %), on confident classifiers (k = 10,
logit margins 8 and 30) of N = 1,500 rows (Newton's Hessian holds every row) and N = 20,000 (a
row sample, ``backends.base.hessian_stride``). The README's statement on tiny lam quotes these
tables.

    python benchmarks/lam_range.py --out benchmarks/results
"""

from __future__ import annotations

import datetime
import json
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's ppu_fast first on sys.path)

import ppu_fast  # noqa: E402

# (N, logit margin) of the tables.
PROBLEMS = [(1500, 8.0), (20000, 8.0), (1500, 30.0), (20000, 30.0)]


def sweep(n: int = 1500, k: int = 10, margin: float = 8.0, seed: int = 0) -> dict:
    """{dtype: {forget set: {lam: "ok" or the residual reached}}}."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), lab] += margin
    sets = {"class": lab == 0, "all but one": torch.arange(n) > 0,
            "random 10 %": torch.rand(n, generator=g) < 0.1}
    lams = sorted([10.0 ** -e for e in range(0, 31, 2)] + [10.0 ** e for e in range(2, 31, 4)])
    table: dict = {}
    for dt in (torch.float32, torch.float64):
        p = torch.softmax(logits.double(), 1).to(dt)
        for name, mask in sets.items():
            row = {}
            for lam in lams:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ppu_fast.ConvergenceWarning)
                    _, info = ppu_fast.refine(p, mask, lam=lam, return_info=True)
                row[f"{lam:.0e}"] = "ok" if info.converged else f"{info.residual:.1e}"
            table.setdefault(str(dt).split(".")[-1], {})[name] = row
    return table


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=common.out_dir, default=str(common.RESULTS))
    args = ap.parse_args()
    tables = {f"N = {n:,}, logit margin {m:g}": sweep(n=n, margin=m)
              for n, m in tqdm(PROBLEMS, desc="lam sweeps")}
    meta = common.metadata("cpu")
    commit = meta["git_commit"]  # the checkout's, "-dirty" for uncommitted code
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = common.free_stem(out, "lam-range")
    lines = [f"# lam range ({stamp}, commit {commit}, {meta['machine']['cpu_model']}, torch "
             f"{torch.__version__})", "",
             "`python benchmarks/lam_range.py`: refine (Newton, tol 1e-6, pseudo uniform, "
             "\"retain\" marginals, default backend) of confident classifiers (k = 10); ok = "
             "converged, else the residual it stopped at (with a ConvergenceWarning)."]
    for title, table in tables.items():
        lams = next(iter(next(iter(table.values())).values())).keys()
        lines += ["", f"## {title}", "", "| dtype | forget set | " + " | ".join(lams) + " |",
                  "|---|---|" + "---|" * len(lams)]
        for dt, sets in table.items():
            for name, row in sets.items():
                lines.append(f"| {dt} | {name} | " + " | ".join(row.values()) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"date": stamp, "commit": commit, "torch": torch.__version__, "meta": meta,
         "tables": tables},
        indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
