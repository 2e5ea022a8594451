"""PPU's fine-tuning schedule, lever by lever (issue 12): what each one does to the unlearning time,
forget / retain / test error and the attack, beside SCRUB and SCRUB+R measured in the same process.

Time is each method's ``timings["total"]``: from the original model to the unlearned one, with the
probabilities, the refine, the fine-tuning and the per-epoch evaluation that the method's own
selection reads (SCRUB+R's and PPU (privacy)'s), not the final reporting. Retrain's row gives the
spread that PPU (privacy)'s forget error is judged against.

    PYTHONPATH=. python benchmarks/ppu_schedule.py --settings digits-class,digits-selective,digits5 \\
        --seeds 1,2,3 [--variants "paper;fast;..."]

Settings: ``digits-class`` / ``digits-selective`` (digits, forget class 5 / 100 of its examples,
PPU at 30 epochs, lr 0.05, as docs/results record them), ``digits5`` (25 zeros of classes 0-4, same
PPU options), ``cifar5-allcnn`` / ``cifar5-resnet18`` (25 airplanes, PPU at the API's 10 epochs,
lr 0.01; needs ../shared/data/cifar10 or --data-root). Writes
``benchmarks/results/ppu-schedule-<stamp>.{json,md}``; original and retrained models go to the
usual cache.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import free_stem, markdown_table, metadata  # noqa: E402

from ppu_fast.data import make_split  # noqa: E402
from ppu_fast.finetune import select_val  # noqa: E402
from ppu_fast.models import build_model  # noqa: E402
from ppu_fast.training import fit_cached  # noqa: E402
from ppu_fast.unlearn import unlearn  # noqa: E402
from ppu_fast.unlearn.experiment import default_train_config, evaluate  # noqa: E402

SETTINGS = {
    "digits-class": dict(dataset="digits", scenario="class", forget_class=5, model="smallcnn",
                         ppu=dict(epochs=30, lr=0.05), scrub="class"),
    "digits-selective": dict(dataset="digits", scenario="selective", forget_class=5, model="smallcnn",
                             ppu=dict(epochs=30, lr=0.05), scrub="selective"),
    "digits5": dict(dataset="digits5", scenario="selective", forget_class=None, model="smallcnn",
                    ppu=dict(epochs=30, lr=0.05), scrub="small"),
    "cifar5-allcnn": dict(dataset="cifar5", scenario="selective", forget_class=None, model="allcnn",
                          ppu={}, scrub="small"),
    "cifar5-resnet18": dict(dataset="cifar5", scenario="selective", forget_class=None, model="resnet18",
                            width=0.4, ppu={}, scrub="small"),
}
# Each variant: the schedule and the levers changed from it. "paper" is the earlier default.
VARIANTS = {
    "paper": dict(schedule="paper"),
    "paper + retain 25 %": dict(schedule="paper", retain_fraction=0.25),
    "paper + retain 10 %": dict(schedule="paper", retain_fraction=0.1),
    "paper + early stop": dict(schedule="paper", early_stop=True, history_retain=0),
    "paper + retain 25 % + forget x2": dict(schedule="paper", forget_repeats=2, retain_fraction=0.25),
    "paper + retain 25 % + forget x4": dict(schedule="paper", forget_repeats=4, retain_fraction=0.25),
    "paper + retain 50 % + forget x2": dict(schedule="paper", forget_repeats=2, retain_fraction=0.5),
    "paper + last block": dict(schedule="paper", trainable="last-block"),
    "paper + head": dict(schedule="paper", trainable="head"),
    "fast": dict(schedule="fast"),
    "fast + retain 40 %": dict(schedule="fast", retain_fraction=0.4),
    "fast + weighted retain": dict(schedule="fast", retain_sampling="weighted"),
    "fast + 4 evals/epoch": dict(schedule="fast", evals_per_epoch=4),
    "fast + 8 evals/epoch": dict(schedule="fast", evals_per_epoch=8),
    # SCRUB+R's target (the last model's validation error) in place of each epoch's own; it needs
    # the whole run, so no early stop.
    "paper + final-val target": dict(schedule="paper", history_retain=0, select="final-val"),
    "paper + final-val target + 4 evals/epoch": dict(schedule="paper", history_retain=0,
                                                     select="final-val", evals_per_epoch=4),
    # Not a schedule lever but the refine's class totals: the original model's, not the retain mix.
    "fast + original marginals": dict(schedule="fast", marginals="original"),
    # Forget rows' pseudo-probabilities from a retain-only probe (ppu.probe_pseudo), a stand-in for
    # Retrain's outputs, with P^'s own totals (the refine keeps them) or the retain mix.
    "fast + probe": dict(schedule="fast", pseudo="probe", marginals="pseudo"),
    "fast + probe + retain totals": dict(schedule="fast", pseudo="probe", marginals="retain"),
}


def select_final_val(history: list[dict]) -> float:
    """The evaluated epoch (> 0) whose forget error is nearest the last one's validation error on
    the forget classes (SCRUB+R's rewinding target); ties go to the earliest."""
    target = history[-1]["val_error"]
    return select_val([{**h, "val_error": target} for h in history])


SELECT_RULES = {"final-val": select_final_val}
PPU_KINDS = ("ppu", "ppu-bias")
# Early stopping reads the "val" selection, which only PPU (privacy) makes.
PRIVACY_ONLY = ("paper + early stop", "fast + 4 evals/epoch", "fast + 8 evals/epoch",
                "paper + final-val target", "paper + final-val target + 4 evals/epoch",
                "fast + original marginals", "fast + probe", "fast + probe + retain totals")
METRICS = ("seconds", "forget_error", "retain_error", "test_error", "mia")


def run_setting(name: str, seed: int, variants: list[str], data_root: str | None) -> dict:
    cfg = SETTINGS[name]
    split = make_split(cfg["dataset"], data_root=data_root, scenario=cfg["scenario"],
                       forget_class=cfg["forget_class"], seed=seed, progress=False)
    tcfg = default_train_config(cfg["dataset"], seed)
    torch.manual_seed(seed)
    init = build_model(cfg["model"], split.num_classes, split.in_channels, cfg.get("width", 1.0))
    original, _ = fit_cached(init, split.train, tcfg, progress=False, cache=True)
    rows: dict[str, dict] = {"original": {**evaluate(original, split, seed=seed), "seconds": 0.0}}
    runs = [("retrain", "retrain", {"config": tcfg, "init": init}),
            ("scrub", "scrub", {"setting": cfg["scrub"]}),
            ("scrub+r", "scrub+r", {"setting": cfg["scrub"]})]
    runs += [(f"{kind}: {v}", kind, {**cfg["ppu"], **VARIANTS[v]}) for v in variants for kind in PPU_KINDS
             if kind == "ppu" or v not in PRIVACY_ONLY]
    for label, method, kw in runs:
        if kw.get("select") in SELECT_RULES:
            kw = {**kw, "select": SELECT_RULES[kw["select"]]}
        res = unlearn(original, split.forget, split.retain, method=method, val=split.val, seed=seed,
                      progress=False, **kw)
        seconds = res.timings["train"] if method == "retrain" else res.timings["total"]
        row = {**evaluate(res.model, split, seed=seed), "seconds": seconds}
        if res.history:
            row["epochs_run"] = res.history[-1]["epoch"]
            row["selected_epoch"] = res.selected_epoch
        rows[label] = row
        print(f"{name} seed {seed} {label:<40} {seconds:7.2f} s  forget {row['forget_error']:6.2f}  "
              f"retain {row['retain_error']:5.2f}  test {row['test_error']:5.2f}  MIA {row['mia']:6.2f}",
              flush=True)
    return {"setting": name, "seed": seed, "rows": rows, "loadavg_after": os.getloadavg()}


def summarise(results: list[dict]) -> str:
    """One table per setting: mean over seeds of every metric, time relative to SCRUB (bias
    variants) and SCRUB+R (privacy variants), both measured in the same runs."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        runs = [r for r in results if r["setting"] == setting]
        labels = list(runs[0]["rows"])
        mean = {lab: {m: statistics.fmean(r["rows"][lab][m] for r in runs) for m in METRICS}
                for lab in labels}
        body = []
        for lab in labels:
            ref = "scrub+r" if lab.startswith("ppu:") else "scrub"
            ratio = (f"{mean[lab]['seconds'] / mean[ref]['seconds']:.2f}x {ref}"
                     if lab.startswith("ppu") else "")
            epochs = [r["rows"][lab].get("epochs_run") for r in runs]
            body.append([lab, f"{mean[lab]['seconds']:.2f}", ratio,
                         *(f"{mean[lab][m]:.2f}" for m in METRICS[1:]),
                         "" if epochs[0] is None else "/".join(str(e) for e in epochs)])
        out.append(f"### {setting} (means over seeds {', '.join(str(r['seed']) for r in runs)})\n")
        out.append(markdown_table(["method: schedule", "seconds", "time vs", "forget %", "retain %",
                                   "test %", "MIA %", "epochs run"], body))
        out.append("")
    return "\n".join(out)


def header(meta: dict) -> list[str]:
    return ["# PPU's fine-tuning schedule, lever by lever", "",
            f"- date (UTC): {meta['date_utc']}; commit: `{meta['git_commit']}`; "
            f"CPU: {meta['machine']['cpu_model']} ({meta['machine']['cpu_cores']} cores); "
            f"torch {meta['versions']['torch']}; {meta['threads']} thread(s); load average at start "
            f"{meta['loadavg_start'][0]:.1f}; wall {meta.get('wall_seconds', float('nan')):.0f} s",
            f"- command: `{meta['command']}`",
            "- seconds: the method's whole call (probabilities, refine, fine-tuning, the per-epoch "
            "evaluation its selection reads); time vs: PPU w/ uniform (ppu-bias) against SCRUB, "
            "PPU (privacy) (ppu) against SCRUB+R, in the same runs; epochs run: per seed", "", ""]


def render(path: Path) -> int:
    """Rewrite ``path``'s .md from the JSON (labels written as "kind | variant" by the first
    version of this script read as "kind: variant")."""
    doc = json.loads(path.read_text())
    for run in doc["runs"]:
        run["rows"] = {k.replace(" | ", ": "): v for k, v in run["rows"].items()}
    path.with_suffix(".md").write_text("\n".join(header(doc["meta"])) + summarise(doc["runs"]) + "\n")
    print(path.with_suffix(".md"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--settings", default="digits-class,digits-selective,digits5")
    p.add_argument("--seeds", type=common.int_list, default=[1, 2, 3], help="comma-separated")
    p.add_argument("--variants", default=";".join(VARIANTS), help="semicolon-separated")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=common.positive_int, default=1)
    p.add_argument("--out", type=common.out_dir,
                   default=None, help="folder (default benchmarks/results)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the .md beside a finished run's JSON")
    args = p.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    torch.set_num_threads(args.threads)
    variants = args.variants.split(";")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {unknown}; expected some of {list(SETTINGS)}")
    data_root = args.data_root
    if data_root is None and any(s.startswith("cifar") for s in settings):
        data_root = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
    out = Path(args.out or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out, "ppu-schedule")
    meta = {**metadata("cpu"), "command": "python benchmarks/ppu_schedule.py " + " ".join(argv or sys.argv[1:]),
            "threads": args.threads, "loadavg_start": os.getloadavg()}
    results = []
    t0 = time.perf_counter()
    for setting in settings:
        for seed in args.seeds:
            results.append(run_setting(setting, seed, variants, data_root))
            (out / f"{stem}.json").write_text(json.dumps(
                {"meta": meta, "variants": {v: VARIANTS[v] for v in variants}, "runs": results}, indent=1))
    meta["wall_seconds"] = time.perf_counter() - t0
    (out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "variants": {v: VARIANTS[v] for v in variants}, "runs": results}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(header(meta)) + summarise(results) + "\n")
    print(out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
