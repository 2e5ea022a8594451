"""The paper's tables, reproduced from an experiment's results with the paper's numbers beside ours.

``ppu-fast run`` calls :func:`write_tables` beside ``results.json``; ``python -m ppu_fast.tables DIR``
does the same for a finished run, and ``python -m ppu_fast.tables DIR1 DIR2 ... --out DIR`` first
merges runs of single seeds into one (mean ± standard error over all their seeds).

Our cells read mean ± standard error of the mean over seeds (sample std / √n; files written before
the standard error was recorded fall back to their population std, and the caption says so). A † marks
a method whose mean differs from PPU's (privacy) by Welch's t-test at p < 0.05
(:func:`ppu_fast.report.welch_test`). Beside the paper's tables, "Attack with signal" lists the offline
LiRA-style attack (ROC AUC, TPR at 1 % and 5 % FPR) and the retrain gap; with two or more seeds the
document ends with the retrain gap against each PPU form, paired by seed (:func:`gap_table`).

The paper's numbers live only in ``paper_numbers.json`` (read off the paper's text, with table and
row); every number that this module prints beside them is measured. Which paper tables a run is set
beside follows from its configuration:

- small scale (``digits5``, ``cifar5``): Table 1 (ResNet-18, bias removal) and Table 6 (ALL-CNN, with
  SCRUB + PPU);
- large scale, selective: Table 2 (bias removal), Table 3 (privacy), Tables 9 and 10 (SCRUB + PPU);
- large scale, class: Tables 7 and 8 (SCRUB + PPU);
- large scale, either: Table 4 (MIA, the run's scenario) and §5.7's Finetune + PPU numbers.

Tables 3 (privacy) and 4 (MIA) are always printed, without paper numbers where the paper has none for
the run's setting. The paper's CIFAR columns stand beside ``cifar*`` and ``digits*`` runs, its Lacuna
columns beside ``imagefolder`` runs (the Lacuna sets are VGGFace2 image folders). Figure 3 (time per
method) is a PNG; the paper prints no times, only the claim that PPU needs under half of SCRUB's time,
which the time table tests. Figure 2 (forget error per epoch, every seed, the selected epoch
marked) and Figure 4 (SCRUB's MIA per method, standard error bars) are PNGs too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import report
from .report import LAM_ROW, differs, pyplot, save_figure, seeds_note, spread, write_text_whole

PAPER_FILE = Path(__file__).with_name("paper_numbers.json")
SMALL_SCALE = ("digits5", "cifar5")
METRIC_NAMES = {"test_error": "Test error", "retain_error": "Retain error", "forget_error": "Forget error",
                "mia": "MIA"}
MODEL_NAMES = {"resnet18": "ResNet-18", "allcnn": "ALL-CNN", "smallcnn": "small CNN"}
# Our row label for a method that the paper table at hand does not list: results.md's, with the
# paper's plain PPU names (its tables put PPU's mode in the column heads).
LABELS = {**report.LABELS, "ppu": "PPU", "ppu-bias": "PPU w/ uniform", "ppu-random": "PPU w/ random"}
DASH = "—"
# The method every other is tested against for the † marks.
SIGNIFICANCE_REFERENCE = "ppu"
MARK = "†"
ATTACK_METRICS = {"mia": "MIA (SCRUB)", "mia_auc": "Attack AUC", "mia_tpr_at_1fpr": "TPR@1%FPR",
                  "mia_tpr_at_5fpr": "TPR@5%FPR", "retrain_gap": "Retrain gap"}


def label(name: str) -> str:
    """Our row label for method ``name``: :data:`LABELS`, "PPU (λ = x)" for a row of the λ sweep
    (``ppu[lam=x]``), else the name itself."""
    return report.label(name, LABELS)


def lam_rows(methods: Mapping[str, Any]) -> list[tuple[float, str]]:
    """The λ sweep's rows of a run, ``(λ, method name)`` in increasing λ."""
    out = []
    for name in methods:
        m = LAM_ROW.match(name)
        if m:
            try:
                out.append((float(m.group(1)), name))
            except ValueError:
                continue
    return sorted(out)


@lru_cache(maxsize=1)
def paper_numbers() -> dict:
    """The paper's reported numbers (``paper_numbers.json``), parsed once."""
    return json.loads(PAPER_FILE.read_text(encoding="utf-8"))


def context(config: Mapping[str, Any]) -> dict:
    """What of a run's configuration decides its paper tables: scale, scenario, model, paper column."""
    for key in ("dataset", "model"):
        if key not in config:
            raise ValueError(f"config: missing '{key}' (expected the 'config' of a results.json)")
    dataset = str(config["dataset"])
    small = dataset in SMALL_SCALE
    return {"dataset": dataset, "model": str(config["model"]), "scale": "small" if small else "large",
            "scenario": None if small else str(config.get("scenario", "selective")),
            "column": 1 if dataset == "imagefolder" else 0}


def applies(table: Mapping[str, Any], ctx: Mapping[str, Any]) -> bool:
    """Whether the paper reports ``table`` for the run's scale and scenario."""
    if table["scale"] != ctx["scale"]:
        return False
    return table.get("scenario") is None or ctx["scenario"] is None or table["scenario"] == ctx["scenario"]


def _fmt(value: float | None) -> str:
    return DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _ours(methods: Mapping[str, Mapping[str, Any]], name: str | None, metric: str, with_std: bool) -> str:
    if name is None:
        return "not implemented"
    if name not in methods:
        return "not run"
    entry = methods[name]
    mean = entry.get(metric)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return DASH
    mark = f" {MARK}" if differs(methods, name, SIGNIFICANCE_REFERENCE, metric) else ""
    sd = spread(entry, metric)
    note = seeds_note(methods, name, metric) if with_std else ""
    if with_std and not math.isnan(sd):
        return f"{mean:.2f} ± {sd:.2f}{note}{mark}"
    return f"{mean:.2f}{note}{mark}"


def spread_kind(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """What the ± of our cells is: "standard error" where the entries record ``sem``, else
    "population std" (results.json files written before it)."""
    return "standard error" if any("sem" in e for e in methods.values()) else "population std"


def attack_table(methods: Mapping[str, Mapping[str, Any]], *, with_std: bool = True) -> str:
    """Our attack with signal beside SCRUB's MIA, per method: the offline LiRA-style attack's ROC AUC
    and TPR at 1 % and 5 % FPR (%; chance: AUC 50, TPR@x%FPR about x with many non-members) and the
    retrain gap (% points; 0 for Retrain). The paper reports none of these."""
    lines = ["### Attack with signal and the retrain gap (ours; the paper has no such table)", "",
             "MIA (SCRUB): the paper's attack, balanced accuracy (50 ideal). Attack AUC, TPR@x%FPR: an "
             "offline LiRA-style attack (each example's logit-scaled confidence z-scored against a "
             "Gaussian of the test examples of its class; members: forget set, non-members: test "
             "examples of the forget classes); Retrain's values are what an unlearned model should "
             "show. Retrain gap: mean |difference| to Retrain over test, retain and forget error and "
             "MIA, per seed, then averaged."
             + (f" Cells: mean ± {spread_kind(methods)} over seeds; {MARK}: differs from PPU (privacy), "
                f"Welch's t-test, p < 0.05." if with_std else ""), "",
             "| Method | " + " | ".join(ATTACK_METRICS.values()) + " |",
             "|---|" + "---:|" * len(ATTACK_METRICS)]
    for name in methods:
        lines.append(f"| {label(name)} | "
                     + " | ".join(_ours(methods, name, m, with_std) for m in ATTACK_METRICS) + " |")
    return "\n".join(lines)


def _rows(table: Mapping[str, Any] | None, methods: Mapping[str, Any]) -> list[tuple[str, str | None, dict]]:
    """(label, our method, paper row) for the paper's rows in its order, then our other methods."""
    out: list[tuple[str, str | None, dict]] = []
    named = set()
    for row in (table or {}).get("rows", []):
        out.append((row["row"], row["method"], row))
        named.add(row["method"])
    for name in methods:
        if name not in named:
            out.append((label(name), name, {}))
    return out


def _setting(table: Mapping[str, Any], ctx: Mapping[str, Any], column: str) -> str:
    paper_model = MODEL_NAMES.get(table.get("model") or "", "ResNet-18 and ALL-CNN")
    ours = f"{MODEL_NAMES.get(ctx['model'], ctx['model'])} on {ctx['dataset']}"
    if ctx["scenario"]:
        ours += f" ({ctx['scenario']})"
    same = " (same architecture)" if table.get("model") == ctx["model"] else ""
    return f"Paper: {paper_model} on {column}. This run: {ours}{same}."


def error_table(tid: str, methods: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any], *,
                with_std: bool = True) -> str:
    """Paper table ``tid`` (1, 2, 3, 6-10 or 5.7) as Markdown: per metric, ours (mean ± standard error
    over seeds, † where it differs from PPU's by Welch's t-test) beside the paper's number. The paper's numbers are left out when the paper reports the
    table for another scale or scenario than the run's."""
    table = paper_numbers()["tables"][tid]
    ctx = context(config)
    column = table["datasets"][min(ctx["column"], len(table["datasets"]) - 1)]
    with_paper = applies(table, ctx)
    title = table["caption"] if tid != "5.7" else "§5.7: PPU after fine-tuning"
    lines = [f"### {title}", ""]
    if tid == "5.7":
        lines += [table["caption"], ""]
    lines.append(_setting(table, ctx, column) if with_paper else
                 f"The paper reports this table only at {table['scale']} scale"
                 f"{' (' + table['scenario'] + ')' if table.get('scenario') else ''}: ours alone.")
    if table.get("note"):
        lines.append(f"Note: {table['note']}")
    lines.append("")
    metrics = table["metrics"]
    head = ["Method"]
    for m in metrics:
        head += [f"{METRIC_NAMES[m]} (ours)"] + ([f"{METRIC_NAMES[m]} (paper, {column})"] if with_paper else [])
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, name, row in _rows(table if with_paper else _rows_only(table), methods):
        cells = [label]
        for m in metrics:
            cells.append(_ours(methods, name, m, with_std))
            if with_paper:
                paper = row.get("values", {}).get(column, {}).get(m) if row else None
                cells.append(_fmt(paper))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rows_only(table: Mapping[str, Any]) -> dict:
    # Without paper numbers the table still lists the paper's methods, so its shape stays the paper's.
    return {"rows": [{"row": r["row"], "method": r["method"]} for r in table["rows"]]}


def mia_table(methods: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any], *,
              with_std: bool = True) -> str:
    """Table 4 (membership-inference attack, 50 is ideal): ours beside the paper's mean ± std for the
    run's scenario with ResNet-18 and with ALL-CNN (large scale only)."""
    table = paper_numbers()["tables"]["4"]
    ctx = context(config)
    with_paper = applies(table, ctx)
    cols = [c for c in table["columns"] if ctx["scenario"] and c.endswith("/" + ctx["scenario"])] \
        if with_paper else []
    lines = [f"### {table['caption']}", ""]
    if with_paper:
        lines.append(f"Paper: {table['datasets'][0]}, {ctx['scenario']} unlearning. This run: "
                     f"{MODEL_NAMES.get(ctx['model'], ctx['model'])} on {ctx['dataset']} ({ctx['scenario']}).")
        if table.get("note"):
            lines.append(f"Note: {table['note']}")
    else:
        lines.append("The paper reports the attack only at large scale: ours alone.")
    lines.append("")
    # The paper prints mean ± standard deviation; ours is mean ± standard error over the seeds.
    head = ["Method", "MIA (ours)"] + [f"MIA (paper, {MODEL_NAMES[c.split('/')[0]]}; ± std)"
                                        for c in cols]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, name, row in _rows(table, methods):
        cells = [label, _ours(methods, name, "mia", with_std)]
        for c in cols:
            v = row.get("values", {}).get(c) if row else None
            cells.append(f"{v['mean']:.2f} ± {v['std']:.2f}" if v else DASH)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_ratio(methods: Mapping[str, Mapping[str, Any]], name: str, reference: str = "scrub") -> float:
    """Mean seconds of ``name`` over mean seconds of ``reference``; NaN when either did not run."""
    try:
        a, b = float(methods[name]["seconds"]), float(methods[reference]["seconds"])
    except (KeyError, TypeError):
        return float("nan")
    return a / b if b > 0 else float("nan")


def time_table(methods: Mapping[str, Mapping[str, Any]], *, with_std: bool = True) -> str:
    """Figure 3 as a table: unlearning seconds per method (PPU's include collecting the probabilities
    and the refine; Retrain's are its training time), their ratio to SCRUB's, and the paper's claim
    (§5.6) that PPU needs under half of SCRUB's time, checked."""
    fig = paper_numbers()["figure_3"]
    bound = float(fig["ppu_over_scrub_below"])
    lines = ["### Figure 3: time needed for the unlearning method (ours; see figure3_time.png)", "",
             f"Paper: {fig['claim']} {fig['note']}", "",
             "| Method | Seconds (ours) | × SCRUB's time |", "|---|---:|---:|"]
    for name in methods:
        r = time_ratio(methods, name)
        lines.append(f"| {label(name)} | {_ours(methods, name, 'seconds', with_std)} | "
                     f"{DASH if math.isnan(r) else f'{r:.2f}'} |")
    lines.append("")
    for name in ("ppu", "ppu-bias", "ppu-random"):
        r = time_ratio(methods, name)
        if not math.isnan(r):
            verdict = "holds" if r < bound else "does not hold"
            lines.append(f"- {LABELS[name]} / SCRUB = {r:.2f} (paper: below {bound:g}): the claim {verdict} "
                         f"on this run.")
    if "scrub" not in methods:
        lines.append("- SCRUB did not run: the paper's time claim cannot be checked on this run.")
    return "\n".join(lines)


def lam_table(methods: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any], *,
              with_std: bool = True) -> str:
    """Table 5, the λ sweep (:func:`ppu_fast.unlearn.experiment.lam_variants`): retain and forget
    error of PPU (privacy) per λ, ours (mean ± standard error over seeds) beside the paper's where it
    prints that λ (1, 2, 3, 4; small scale only), with Retrain's and Original's errors as the
    reference lines."""
    table = paper_numbers()["table_5"]
    ctx = context(config)
    with_paper = ctx["scale"] == table["scale"]
    paper = {float(k): v for k, v in table["values"].items()} if with_paper else {}
    ours: dict[float, list[str]] = {}
    for lam, name in lam_rows(methods):
        # Two spellings of one λ ("ppu[lam=2]", "ppu[lam=2.0]") are two runs: both rows, by name.
        ours.setdefault(lam, []).append(name)
    lines = [f"### {table['caption']}", ""]
    if with_paper:
        lines.append(f"Paper: {MODEL_NAMES[table['model']]} on {table['dataset']}. This run: "
                     f"{MODEL_NAMES.get(ctx['model'], ctx['model'])} on {ctx['dataset']}. Note: {table['note']}")
    else:
        lines.append(f"The paper reports this table only at {table['scale']} scale: ours alone.")
    lines.append("")
    metrics = ("retain_error", "forget_error")
    head = ["λ"] + [f"{METRIC_NAMES[m]} (ours)" for m in metrics] \
        + ([f"{METRIC_NAMES[m]} (paper)" for m in metrics] if with_paper else [])
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for lam in sorted(set(ours) | set(paper)):
        names = ours.get(lam) or [None]
        for name in names:
            head_cell = f"{lam:g}" if len(names) == 1 else f"{lam:g} ({name})"
            cells = [head_cell] + [_ours(methods, name, m, with_std) if name else "not run"
                                   for m in metrics]
            if with_paper:
                cells += [_fmt(paper.get(lam, {}).get(m)) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    for name in ("retrain", "original"):
        if name in methods:
            lines.append("| " + " | ".join([label(name)] + [_ours(methods, name, m, with_std) for m in metrics]
                                           + ([DASH] * len(metrics) if with_paper else [])) + " |")
    return "\n".join(lines)


# The gap over the errors alone: the retrain gap without SCRUB's MIA, which at our sizes often
# cannot tell a trained-on set from an unseen one and then adds noise to the four-column mean.
GAP_ERRORS = ("test_error", "retain_error", "forget_error")


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return DASH
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _errors_gap(row: Mapping[str, Any], ref: Mapping[str, Any]) -> float:
    diffs = [abs(float(row[m]) - float(ref[m])) for m in GAP_ERRORS
             if row.get(m) is not None and ref.get(m) is not None]
    return sum(diffs) / len(diffs) if len(diffs) == len(GAP_ERRORS) else float("nan")


def gap_table(per_seed: Sequence[Mapping[str, Mapping[str, Any]]], reference: str) -> str:
    """The retrain gap of every method against ``reference``'s, paired by seed (a seed's methods
    start from one Original on one split): per method the mean gap ± standard error, the mean of the
    per-seed differences ``method - reference`` (negative: nearer Retrain) ± its standard error, the
    paired t-test's p (:func:`ppu_fast.report.paired_samples`), Holm's adjustment over the column's
    methods (:func:`ppu_fast.report.holm`) and Welch's unpaired p (the † marks' test); then the same
    over the three errors alone (:data:`GAP_ERRORS`). Original and Retrain are not rows. "" when
    fewer than 2 seeds have both Retrain and ``reference``."""
    from .report import _mean_std, _sem, holm, paired_samples, welch_samples

    nan = float("nan")
    seeds = [run for run in per_seed if "retrain" in run and reference in run]
    if len(seeds) < 2:
        return ""
    names: list[str] = []
    for run in seeds:
        names += [m for m in run if m not in names and m not in ("original", "retrain", reference)]
    if not names:
        return ""

    def values(name: str, errors: bool) -> list[float]:
        out = []
        for run in seeds:
            row = run.get(name)
            if row is None:
                out.append(nan)
            else:
                v = _errors_gap(row, run["retrain"]) if errors else row.get("retrain_gap")
                out.append(nan if v is None else float(v))
        return out

    def cell(v: Sequence[float]) -> str:
        m, s = _mean_std(v)[0], _sem(v)
        return DASH if math.isnan(m) else (f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}")

    cols = {}
    for errors in (False, True):
        vals = {n: values(n, errors) for n in [reference] + names}
        ref = vals[reference]
        diffs = {n: [a - b for a, b in zip(vals[n], ref)] for n in names}
        paired = {n: paired_samples(vals[n], ref)[2] for n in names}
        adjusted = dict(zip(names, holm([paired[n] for n in names])))
        welch = {n: welch_samples(vals[n], ref)[2] for n in names}
        tested = sum(not math.isnan(paired[n]) for n in names)
        cols[errors] = (vals, diffs, paired, adjusted, welch, tested)
    ref_label = label(reference)
    fam = cols[False][5], cols[True][5]
    lines = [f"### Retrain gap against {ref_label}, paired by seed", "",
             f"{len(seeds)} seeds have both Retrain and {ref_label}; Pairs: those where the method has a "
             f"four-column gap too (its Δ and tests use those). Δ: the mean over the pairs of (the method's gap − "
             f"{ref_label}'s) ± its standard error, negative where the method is nearer Retrain (it "
             f"differs from the difference of the two gap columns where a method misses seeds). Paired "
             f"p: the t-test of those differences; Holm: that p adjusted over the {fam[0]} methods of "
             f"its column with a test ({fam[1]} for the errors-only column), so that below 0.05 the "
             f"chance of any false finding in that column stays at 5 %; Welch: the unpaired test (the "
             f"one behind the † marks, which are against PPU (privacy)). Errors only: the same gap "
             f"without SCRUB's MIA (test, retain and forget error).", "",
             "| Method | Pairs | Retrain gap | Δ | Paired p | Holm | Welch p | Gap, errors only | Δ | Paired p "
             "| Holm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in [reference] + names:
        row = [label(name)]
        if name == reference:
            row.append(DASH)
        else:
            row.append(str(sum(not math.isnan(d) for d in cols[False][1][name])))
        for errors in (False, True):
            vals, diffs, paired, adjusted, welch, _ = cols[errors]
            if name == reference:
                row += [cell(vals[name]), DASH, DASH, DASH] + ([] if errors else [DASH])
            else:
                row += [cell(vals[name]), cell(diffs[name]), _p(paired[name]), _p(adjusted[name])]
                if not errors:
                    row.append(_p(welch[name]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def table_ids(config: Mapping[str, Any]) -> list[str]:
    """The paper tables set beside a run (error tables), in the paper's order."""
    ctx = context(config)
    tables = paper_numbers()["tables"]
    return [tid for tid in tables if tid not in ("3", "4") and applies(tables[tid], ctx)]


def render(config: Mapping[str, Any], methods: Mapping[str, Mapping[str, Any]], *, seeds: int = 1,
           per_seed: Sequence[Mapping[str, Mapping[str, Any]]] | None = None) -> str:
    """The whole Markdown document: the applicable paper tables, Table 3, Table 4, the attack with
    signal, Table 5 when the run holds a λ sweep (:func:`lam_table`), the time table and, given the
    per-seed rows of two or more seeds, the retrain gap against each PPU form, paired by seed
    (:func:`gap_table`)."""
    with_std = seeds > 1
    ctx = context(config)
    kind = spread_kind(methods)
    ours = (f"mean ± {kind} over {seeds} seeds"
            + (" (sample std / √n)" if kind == "standard error" else "")
            + (f"; {MARK}: differs from PPU (privacy) by Welch's t-test, p < 0.05"
               if SIGNIFICANCE_REFERENCE in methods else "; no PPU row, so no significance marks")
            if with_std else "one seed")
    parts = [f"# The paper's tables: {ctx['dataset']} / {ctx['model']}"
             f"{' / ' + ctx['scenario'] if ctx['scenario'] else ''}", "",
             f"Ours: {ours}; errors and MIA in %. Starting weights: {config.get('init', 'scratch')}. Paper: the numbers printed in the paper (ppu_fast/paper_numbers.json), as a "
             f"reference measured elsewhere (CIFAR-100 pre-training, other data, other hardware)."]
    reduced = (config.get("split") or {}).get("reduced")
    if reduced:
        parts[-1] += (f" **Reduced run**: {reduced.get('train_per_class') or 'all'} training and "
                      f"{reduced.get('test_per_class') or 'all'} test images per class "
                      f"(`--train-per-class` / `--test-per-class`), not the paper's full dataset.")
    ids = table_ids(config)
    ordered = [t for t in ids if t in ("1", "2")] + ["3", "4"] + [t for t in ids if t not in ("1", "2")]
    for tid in ordered:
        parts += ["", mia_table(methods, config, with_std=with_std) if tid == "4" else
                  error_table(tid, methods, config, with_std=with_std)]
        if tid == "4":
            parts += ["", attack_table(methods, with_std=with_std)]
    if lam_rows(methods):
        parts += ["", lam_table(methods, config, with_std=with_std)]
    parts += ["", time_table(methods, with_std=with_std), ""]
    for reference in ("ppu", "ppu-bias"):
        table = gap_table(per_seed or (), reference)
        if table:
            parts += [table, ""]
    return "\n".join(parts)


def _is_ppu(name: str) -> bool:
    return name.startswith("ppu") or name.endswith("+ppu")


def _colors(names: Sequence[str]) -> list[str]:
    """PPU and the +PPU methods in orange, the others in blue."""
    return ["tab:orange" if _is_ppu(n) else "tab:blue" for n in names]


def _per_method(methods: Mapping[str, Mapping[str, Any]], metric: str
                ) -> tuple[list[str], list[float], list[float]]:
    """(names, means, error bars) of the methods that report ``metric``; a missing spread draws
    no bar."""
    def value(n: str) -> float:
        v = methods[n].get(metric)
        return float("nan") if v is None else float(v)

    names = [n for n in methods if not math.isnan(value(n))]
    errs = [0.0 if math.isnan(spread(methods[n], metric)) else spread(methods[n], metric) for n in names]
    return names, [value(n) for n in names], errs


def plot_time(methods: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Figure 3 for our run: unlearning seconds per method (mean, standard error as error bars), Agg
    backend."""
    plt = pyplot()

    names, secs, errs = _per_method(methods, "seconds")
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 1.4))
    ax.barh(range(len(names)), secs, xerr=errs, color=_colors(names))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([label(n) for n in names], fontsize=8)
    ax.invert_yaxis()
    positive = [s for s in secs if s > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    for i, (s, e) in enumerate(zip(secs, errs)):
        # Right of the error bar, so the label does not sit on it.
        ax.text(s + e, i, f" {s:.2f}s", va="center", fontsize=7)
    ax.set_xlabel("unlearning time (s); Retrain: training time")
    ax.set_title(title or "Time needed for the unlearning method", fontsize=10)
    return save_figure(fig, path)


def plot_trajectory(methods: Mapping[str, Mapping[str, Any]],
                    history: Mapping[str, Sequence[Mapping[str, Any]]] | None, path: str | Path,
                    title: str = "") -> Path:
    """Forget error against seconds: each method whose history records ``wall_seconds`` (PPU's
    fine-tuning, from the original model on) as its trajectory over the epochs it ran, the selected
    model marked; every method's final result (mean over seeds) as a point. Retrain's forget error is
    the dashed line privacy mode aims at (§5.5: "the forget error remains close to that of
    retraining")."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    cmap = plt.get_cmap("tab20")
    for i, (name, row) in enumerate(methods.items()):
        secs, fe = row.get("seconds"), row.get("forget_error")
        if name == "original" or secs is None or fe is None or math.isnan(float(secs)):
            continue
        color = cmap(i % 20)
        rows = [h for h in (history or {}).get(name, ()) if "wall_seconds" in h and "forget_error" in h]
        if rows:
            ax.plot([h["wall_seconds"] for h in rows], [h["forget_error"] for h in rows], "-", lw=1,
                    color=color, alpha=0.7)
        marker = "s" if _is_ppu(name) else "o"
        ax.plot([secs], [fe], marker, color=color, ms=7, label=label(name))
    xs = [x for line in ax.get_lines() for x in line.get_xdata() if x > 0]
    if xs:
        # Seconds span decades (a refine-only epoch to Retrain's training): log, from the fastest.
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
    # After the scale: axhline spans the axes in axes coordinates, not data.
    if "retrain" in methods and methods["retrain"].get("forget_error") is not None:
        ax.axhline(float(methods["retrain"]["forget_error"]), color="grey", ls="--", lw=0.8)
    ax.set_xlabel("seconds from the original model (Retrain: its training)")
    ax.set_ylabel("forget error %")
    ax.set_title(title or "Forget error versus time (lines: PPU's epochs, first seed)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:  # an Original-only run has nothing to label
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def histories_from(history: Mapping[str, Sequence[Mapping[str, Any]]] | None,
                   per_seed: Sequence[Mapping[str, Mapping[str, Any]]] = (),
                   seeds: Sequence[Any] = ()) -> dict[str, list[dict]]:
    """Per-seed histories (the ``histories`` of results.json) for a file written before they were
    kept: its first seed's ``history``, with that seed's ``selected_epoch`` where recorded."""
    first = per_seed[0] if per_seed else {}
    seed = seeds[0] if seeds else None
    return {name: [{"seed": seed, "selected_epoch": (first.get(name) or {}).get("selected_epoch"),
                    "history": list(rows)}]
            for name, rows in (history or {}).items() if rows}


def plot_forget_per_epoch(histories: Mapping[str, Sequence[Mapping[str, Any]]] | None,
                          methods: Mapping[str, Mapping[str, Any]], path: str | Path,
                          title: str = "") -> Path:
    """Figure 2: forget error per epoch for every method that kept a per-epoch history, one line per
    seed (histories may differ in length: PPU's "fast" schedule stops early), the selected epoch of
    each seed marked with a star; Retrain's mean forget error is the dashed line. ``histories``:
    method -> [{"seed", "selected_epoch", "history": [{"epoch", "forget_error", ...}]}]. Methods
    without a per-epoch forget error (PPU's bias mode unless run with ``history=True``, the one-shot
    baselines) are not drawn; with none at all the figure says so. Agg backend."""
    plt = pyplot()

    curves = {name: [e for e in runs if any("forget_error" in h for h in e.get("history") or ())]
              for name, runs in (histories or {}).items()}
    curves = {name: runs for name, runs in curves.items() if runs}
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    cmap = plt.get_cmap("tab10")
    for i, (name, runs) in enumerate(curves.items()):
        color = cmap(i % 10)
        for j, entry in enumerate(runs):
            rows = [h for h in entry["history"] if "forget_error" in h]
            ax.plot([h["epoch"] for h in rows], [h["forget_error"] for h in rows], "-", lw=1, alpha=0.8,
                    color=color, label=f"{label(name)} ({len(runs)} seed{'s' * (len(runs) > 1)})"
                    if j == 0 else None)
            chosen = [h for h in rows if h["epoch"] == entry.get("selected_epoch")]
            if chosen:
                ax.plot([chosen[0]["epoch"]], [chosen[0]["forget_error"]], "*", ms=11, color=color,
                        markeredgecolor="black", markeredgewidth=0.5)
    retrain = (methods.get("retrain") or {}).get("forget_error")
    if retrain is not None and not math.isnan(float(retrain)):
        ax.axhline(float(retrain), color="grey", ls="--", lw=0.8, label="Retrain (mean)")
    if not curves:
        ax.text(0.5, 0.5, "no method kept a per-epoch history\n(PPU's bias mode keeps none unless "
                "history=True)", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("epoch (0: the original model)")
    ax.set_ylabel("forget error %")
    ax.set_title(title or "Forget error per epoch (all seeds; ★ the selected epoch)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_mia(methods: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Figure 4: SCRUB's membership-inference attack per method (mean over seeds, standard error as
    error bars; 50 % is chance, the ideal), Agg backend."""
    plt = pyplot()

    names, values, errs = _per_method(methods, "mia")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 1.5), 4.2))
    ax.bar(range(len(names)), values, yerr=errs, color=_colors(names), capsize=3)
    ax.axhline(50, color="grey", ls="--", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([label(n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("MIA accuracy % (50: chance)")
    ax.set_title(title or "Membership inference attack per method", fontsize=10)
    return save_figure(fig, path)


# What write_tables writes, by key (a folder's results.json is another run's once these are stale).
TABLE_FILES = {"tables": "tables.md", "figure2": "figure2_forget_per_epoch.png",
               "figure3": "figure3_time.png", "figure4": "figure4_mia.png",
               "trajectory": "forget_vs_seconds.png"}


def write_tables(out_dir: str | Path, config: Mapping[str, Any], methods: Mapping[str, Mapping[str, Any]],
                 *, seeds: int = 1,
                 history: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 per_seed: Sequence[Mapping[str, Mapping[str, Any]]] | None = None) -> dict[str, Path]:
    """Write ``tables.md`` (with :func:`gap_table` when ``per_seed`` holds two or more seeds),
    ``figure2_forget_per_epoch.png`` (:func:`plot_forget_per_epoch`, from
    ``histories``, else from the first seed's ``history``), ``figure3_time.png``, ``figure4_mia.png``
    and ``forget_vs_seconds.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in TABLE_FILES.items()}
    write_text_whole(paths["tables"], render(config, methods, seeds=seeds, per_seed=per_seed))
    ctx = context(config)
    where = f"{ctx['dataset']} / {ctx['model']}{' / ' + ctx['scenario'] if ctx['scenario'] else ''}"
    if not histories and history:
        # Without per-seed records the first seed's curves are drawn, with no selection to mark.
        histories = histories_from(history, (), (config.get("seeds") or [None])[:1])
    plot_forget_per_epoch(histories, methods, paths["figure2"],
                          title=f"Forget error per epoch: {where} (★ selected epoch)")
    plot_time(methods, paths["figure3"], title=f"Time needed for the unlearning method: {where}")
    plot_mia(methods, paths["figure4"], title=f"Membership inference attack: {where} (50 is ideal)")
    plot_trajectory(methods, history, paths["trajectory"],
                    title=f"Forget error versus time: {where} (lines: PPU's epochs, first seed)")
    return paths


def load_results(folder: str | Path) -> dict:
    """A run's ``results.json``; a clear error when the folder has none."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in '{folder}' (run `ppu-fast run ... --out {folder}` first)")
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"'{path}' is not valid JSON ({exc}); expected the results.json of a "
                         f"ppu-fast run") from None
    what = None
    if not isinstance(res, dict):
        what = f"a JSON {type(res).__name__}"
    elif not isinstance(res.get("config"), dict):
        what = "no 'config' object"
    elif not isinstance(res.get("methods"), dict) and not isinstance(res.get("per_seed"), list):
        what = "neither a 'methods' object nor a 'per_seed' list"
    elif not isinstance(res.get("per_seed", []), list):
        what = "a 'per_seed' that is not a list"
    if what:
        raise ValueError(f"'{path}' holds {what}; expected the results.json of a ppu-fast run "
                         f"(an object with 'config', 'methods' and 'per_seed')")
    bad = _malformed(res)
    if bad:
        raise ValueError(f"'{path}': {bad}; expected the results.json of a ppu-fast run (edited by "
                         f"hand?)")
    return res


def _malformed(res: Mapping[str, Any]) -> str | None:
    """What in a results.json (already an object with a config) the tables cannot read, or None:
    seeds that are not integers, a method's entry or a per-seed row that is not an object, or a
    metric (or its std / sem / n) that is not a number or null."""
    from .report import METRICS

    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    seeds = res["config"].get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        return f"config.seeds is {seeds!r}, not a list of integers"
    entries = [(f"methods.{m}", e) for m, e in (res.get("methods") or {}).items()]
    for i, row in enumerate(res.get("per_seed") or []):
        if not isinstance(row, dict):
            return f"per_seed[{i}] is {row!r}, not an object of method rows"
        entries += [(f"per_seed[{i}].{m}", e) for m, e in row.items()]
    for where, e in entries:
        if not isinstance(e, dict):
            return f"{where} is {e!r}, not an object of metrics"
        for metric in METRICS:
            if not number(e.get(metric)):
                return f"{where}.{metric} is {e[metric]!r}, not a number or null"
        for part in ("std", "sem", "n"):
            if part in e:
                if not isinstance(e[part], dict):
                    return f"{where}.{part} is {e[part]!r}, not an object of metrics"
                for metric, v in e[part].items():
                    if not number(v):
                        return f"{where}.{part}.{metric} is {v!r}, not a number or null"
    return None


def _nan(obj: Any) -> Any:
    # results.json writes NaN as null; summaries want NaN back.
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    return obj


# What two runs of one experiment must agree on, beyond ``MERGE_KEY``: each entry is compared when both
# runs record it (files written before a key existed are not refused for lacking it).
MERGE_KEY = ("dataset", "model", "width", "scenario", "init", "device type")
# The split's sizes, forget classes and reduction, less where the images were read from (one dataset
# may sit at different paths on different machines).
_SAME_SPLIT_EXCEPT = ("data_root",)
# A pre-training's own timing differs between two trainings of one recipe.
_SAME_PRETRAIN_EXCEPT = ("train_seconds",)


def _experiment_differences(cfg: Mapping[str, Any], first: Mapping[str, Any]) -> list[str]:
    """The settings in which run config ``cfg`` differs from ``first`` (empty: the same experiment)."""
    def get(c: Mapping[str, Any], k: str) -> Any:
        if k == "device type":  # seconds on a CPU and on a GPU do not average (cuda:0 = cuda:1)
            return str(c.get("device") or "cpu").split(":")[0]
        return c.get(k, "scratch" if k == "init" else None)  # runs before "init": scratch
    diffs = [f"{k}: {get(cfg, k)!r} vs {get(first, k)!r}" for k in MERGE_KEY if get(cfg, k) != get(first, k)]
    for k, skip in (("split", _SAME_SPLIT_EXCEPT), ("train", ()), ("pretrain", _SAME_PRETRAIN_EXCEPT)):
        a, b = cfg.get(k), first.get(k)
        if a is None or b is None:
            continue
        for sub in sorted(set(a) | set(b)):
            if sub not in skip and a.get(sub) != b.get(sub):
                diffs.append(f"{k}.{sub}: {a.get(sub)!r} vs {b.get(sub)!r}")
    if "init_head" in cfg and "init_head" in first and cfg["init_head"] != first["init_head"]:
        diffs.append(f"init_head: {cfg['init_head']!r} vs {first['init_head']!r}")
    # A method run in both must have run with the same options (a method absent from one is fine):
    # the options it ran with, defaults included, where both runs record them (a default that
    # changed between two versions shows there; the options typed do not), else those typed.
    both = set(cfg.get("methods") or []) & set(first.get("methods") or [])
    used_a, used_b = cfg.get("method_options_used"), first.get("method_options_used")
    keys = ("variants",) if used_a is not None and used_b is not None else ("method_options", "variants")
    for k in keys:
        a, b = cfg.get(k) or {}, first.get(k) or {}
        for m in sorted(both):
            if a.get(m, {}) != b.get(m, {}):
                diffs.append(f"{k}[{m}]: {a.get(m, {})!r} vs {b.get(m, {})!r}")
    if used_a is not None and used_b is not None:
        for m in sorted(both & set(used_a) & set(used_b)):
            ua, ub = used_a[m], used_b[m]
            for o in sorted(set(ua) | set(ub)):
                if ua.get(o) != ub.get(o):
                    diffs.append(f"method_options_used[{m}].{o}: {ua.get(o)!r} vs {ub.get(o)!r}")
    return diffs


def _same_measurement(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    # Two rows of one (seed, method) measure the same model when every metric but the clock agrees
    # (a cached Original or Retrain evaluated by two runs); NaN equals NaN here.
    keys = (set(a) | set(b)) - {"seconds", "retrain_gap", "cached"}
    same = lambda x, y: x == y or (isinstance(x, float) and isinstance(y, float)  # noqa: E731
                                   and math.isnan(x) and math.isnan(y))
    return all(same(_nan(a.get(k)), _nan(b.get(k))) for k in keys)


def merge(folders: Sequence[str | Path]) -> dict:
    """Runs of the same experiment as one result: runs of other seeds add seeds, runs of the same
    seed with other methods add methods to that seed (so a long experiment can be split into several
    calls, e.g. on a GPU machine with a time limit per call). The config is the first run's, with the
    union of seeds, methods and method options and the summed wall time; the history is the union of
    the runs', and ``histories`` the union of their per-seed histories (a file without them
    contributes its first seed's ``history``).
    Each seed's ``retrain_gap`` is recomputed against that seed's merged Retrain row.

    Raises ValueError when the runs are not one experiment: they differ in dataset, model, width,
    scenario or starting weights (``init``), in the split (sizes, forget classes, reduction; not the
    data's path), the training recipe, the pre-training recipe, or the options of a method both ran;
    when one folder is named twice; or when two runs hold the same (seed, method) with different
    measurements (the same cached Original or Retrain evaluated by two runs agrees, clock aside, and
    counts once, with the later run's row)."""
    from .metrics import add_retrain_gaps  # lazily: metrics imports torch, the tables alone need none

    seen: dict[Path, str | Path] = {}
    for f in folders:
        where = Path(f).resolve()
        if where in seen:
            raise ValueError(f"folders: '{f}' is named twice (as '{seen[where]}'); each run counts once")
        seen[where] = f
    runs = [load_results(f) for f in folders]
    if not runs:
        raise ValueError("folders: name at least one run folder")
    first = runs[0]["config"]
    for f, r in zip(folders, runs):
        diffs = _experiment_differences(r["config"], first)
        if diffs:
            raise ValueError(f"'{f}' is a different experiment from '{folders[0]}': " + "; ".join(diffs))
    by_seed: dict[Any, dict] = {}
    source: dict[tuple, str | Path] = {}
    methods: list[str] = []
    history: dict = {}
    histories: dict[str, list[dict]] = {}
    options: dict[str, dict] = {k: {} for k in ("method_options", "variants", "method_options_used")}
    for f, r in zip(folders, runs):
        seeds = r["config"].get("seeds") or []
        rows = r.get("per_seed", [])
        if len(seeds) != len(rows):
            raise ValueError(f"'{f}': {len(seeds)} seeds but {len(rows)} per-seed rows")
        for seed, row in zip(seeds, rows):
            have = by_seed.setdefault(seed, {})
            for m, vals in row.items():
                if m in have and not _same_measurement(have[m], vals):
                    raise ValueError(f"seed {seed}, method {m}: measured differently by '{source[seed, m]}' "
                                     f"and '{f}'; a merge counts each (seed, method) once: leave one out")
                have[m], source[seed, m] = _nan(vals), f  # the later of two agreeing rows, as before
            methods += [m for m in row if m not in methods]
        for k in options:
            for m, o in (r["config"].get(k) or {}).items():
                options[k].setdefault(m, o)
        for name, h in (r.get("history") or {}).items():
            history.setdefault(name, h)
        runs_h = r.get("histories") or histories_from(r.get("history"), rows, seeds)
        for name, entries in runs_h.items():
            have_h = {e.get("seed") for e in histories.get(name, [])}
            histories.setdefault(name, []).extend(e for e in entries if e.get("seed") not in have_h)
    config = {**first, "seeds": list(by_seed), "num_seeds": len(by_seed), "methods": methods}
    for k, v in options.items():
        if v or k in first:
            config[k] = v
    if all("wall_seconds" in r["config"] for r in runs):
        config["wall_seconds"] = round(sum(float(r["config"]["wall_seconds"]) for r in runs), 2)
    # Method order: the first run's, then the others' in order of appearance.
    # The retrain gap again: a seed's Retrain may come from another run than the method's row.
    per_seed = [add_retrain_gaps({m: row[m] for m in methods if m in row}) for row in by_seed.values()]
    return {"config": config, "per_seed": per_seed, "history": history, "histories": histories}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ppu_fast.tables DIR [DIR ...] [--out OUT]``: write the tables (and, for several
    folders, the merged results.json / .md / .png) of finished runs."""
    from .report import attack_size, judge, summarize, write_results

    p = argparse.ArgumentParser(prog="python -m ppu_fast.tables", description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="run folders holding results.json")
    p.add_argument("--out", default=None, help="output folder (default: the single input folder)")
    args = p.parse_args(argv)
    from .cli import _check_out_folder, _unwritable

    try:
        if args.out is not None:
            # The command line's own check (empty, a file, not writable: tried and undone, so a
            # refused merge leaves no folder behind; a results file that is a folder), before
            # anything is read.
            _check_out_folder(args.out)
        if len(args.folders) == 1 and args.out is None:
            res = load_results(args.folders[0])
            why = _unwritable(Path(args.folders[0]))
            if why:
                raise ValueError(f"{args.folders[0]}: cannot write the tables beside its "
                                 f"results.json ({why}); pass --out to write them elsewhere")
            per_seed = [_nan(run) for run in res.get("per_seed", [])]
            # A file written before the standard errors were recorded has the per-seed rows they
            # come from: summarised again, its tables get the † marks and the "(n=K)" notes.
            stored = res.get("methods")
            methods = ({k: _nan(v) for k, v in stored.items()}
                       if stored and (not per_seed or all("sem" in e for e in stored.values()))
                       else summarize(per_seed))
            histories = res.get("histories") or histories_from(
                res.get("history"), res.get("per_seed", []), res["config"].get("seeds") or [])
            paths = write_tables(args.folders[0], res["config"], methods,
                                 seeds=len(res.get("per_seed", [])) or 1, history=res.get("history"),
                                 histories=histories, per_seed=per_seed)
        else:
            if args.out is None:
                raise ValueError("--out is required when merging several folders")
            inputs = {Path(f).resolve() for f in args.folders}
            if Path(args.out).resolve() in inputs:
                raise ValueError(f"--out: '{args.out}' is one of the folders merged, whose results.json "
                                 f"the merge would overwrite; expected a folder of its own")
            res = merge(args.folders)
            methods = summarize(res["per_seed"])
            chance, n = attack_size(res["per_seed"])
            Path(args.out).mkdir(parents=True, exist_ok=True)  # the inputs merged: now the files
            write_results(args.out, res["config"], methods, per_seed=res["per_seed"], history=res["history"],
                          histories=res["histories"], verdict=judge(methods, chance=chance, n=n))
            paths = write_tables(args.out, res["config"], methods, seeds=len(res["per_seed"]),
                                 history=res["history"], histories=res["histories"], per_seed=res["per_seed"])
    except (ValueError, FileNotFoundError) as exc:
        print(f"ppu_fast.tables: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ppu_fast.tables: interrupted; files already written in the output folder are left as "
              "they are (run the command again to rewrite them all)", file=sys.stderr)
        return 130
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
