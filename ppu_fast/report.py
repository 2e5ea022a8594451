"""Results of an unlearning experiment: the paper-style table, a plain-words verdict computed from it
(:func:`judge`), ``results.json``, ``results.md`` and a PNG plot (matplotlib's Agg backend: no
display needed)."""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

METRICS = ("test_error", "retain_error", "forget_error", "val_error", "mia", "seconds", "mia_auc",
           "mia_tpr_at_1fpr", "mia_tpr_at_5fpr", "retrain_gap")
HEADERS = {"test_error": "Test error", "retain_error": "Retain error", "forget_error": "Forget error",
           "val_error": "Val error (forget cl.)", "mia": "MIA", "seconds": "Seconds", "mia_auc": "Attack AUC",
           "mia_tpr_at_1fpr": "TPR@1%FPR", "mia_tpr_at_5fpr": "TPR@5%FPR", "retrain_gap": "Retrain gap"}
# Row labels of results.md, the verdict, the plots and the progress lines, the paper's names. A
# method's id (what --methods takes) stays the key in results.json.
LABELS = {"original": "Original", "retrain": "Retrain", "finetune": "Finetune", "fisher": "Fisher",
          "ntk": "NTK", "neggrad+": "NegGrad+", "cf-k": "CF-k", "eu-k": "EU-k", "bad-t": "Bad-T",
          "scrub": "SCRUB", "scrub+r": "SCRUB+R", "ppu": "PPU (privacy)",
          "ppu-bias": "PPU w/ uniform (bias)", "ppu-random": "PPU w/ random (bias)",
          "scrub+ppu": "SCRUB + PPU", "finetune+ppu": "Finetune + PPU"}
# A row of the λ sweep (ppu-fast run --lam-sweep).
LAM_ROW = re.compile(r"^ppu\[lam=([^\]]+)\]$")


def label(name: str, labels: Mapping[str, str] = LABELS) -> str:
    """The row label of method ``name``: ``labels[name]``, "PPU (λ = x)" for a row of the λ sweep
    (``ppu[lam=x]``), else the name itself (a variant of the caller's)."""
    m = LAM_ROW.match(name)
    return f"PPU (λ = {m.group(1)})" if m else labels.get(name, name)


# What "±" means in every table: the standard error of the mean over seeds.
SPREAD = "mean ± standard error over seeds (sample std / √n)"


def _finite_values(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = _finite_values(values)
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    # Population std (ddof=0), as the paper's "mean / std" over a handful of runs; 0 for one run.
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return mean, std


def _sem(values: Sequence[float]) -> float:
    # The standard error of the mean: sample std (ddof=1) / sqrt(n); undefined (NaN) for one run.
    vals = _finite_values(values)
    n = len(vals)
    if n < 2:
        return float("nan")
    mean = sum(vals) / n
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n)


def summarize(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, Any]]:
    """Mean and spread over seeds. ``runs``: one dict per seed, method name -> {metric: value}.

    Returns method -> {metric: mean, ..., "std": {metric: population std (ddof 0)}, "sem": {metric:
    standard error of the mean, sample std (ddof 1) / sqrt(n), NaN for one seed}, "n": {metric: seeds
    with a value}, "cached": seeds whose model came from the cache (only where some did)}, methods in
    first-seen order. ``sem`` and ``n`` are what :func:`welch_test` needs."""
    names: list[str] = []
    for run in runs:
        names += [n for n in run if n not in names]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [run[name] for run in runs if name in run]
        entry: dict[str, Any] = {"std": {}, "sem": {}, "n": {}}
        for metric in METRICS:
            values = [row.get(metric, float("nan")) for row in rows]
            mean, std = _mean_std(values)
            entry[metric] = mean
            entry["std"][metric] = std
            entry["sem"][metric] = _sem(values)
            entry["n"][metric] = len(_finite_values(values))
        cached = sum(bool(row.get("cached")) for row in rows)
        if cached:
            entry["cached"] = cached
        out[name] = entry
    return out


def welch_test(mean_a: float, sem_a: float, n_a: int, mean_b: float, sem_b: float,
               n_b: int) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test from two summaries (mean, standard error of the mean, sample
    size), two-sided: ``(t, df, p)``. The standard error is the sample std (ddof 1) / sqrt(n), so
    ``sem**2`` is Welch's s^2 / n. df by the Welch-Satterthwaite equation; p from scipy's Student t
    (scipy comes with scikit-learn, a dependency). NaN when a side has fewer than 2 samples or a
    value is missing; where both spreads are 0, p is 0 for unequal means and 1 for equal ones."""
    values = (mean_a, sem_a, mean_b, sem_b)
    if n_a is None or n_b is None or int(n_a) < 2 or int(n_b) < 2 or \
            any(v is None or math.isnan(float(v)) for v in values):
        return float("nan"), float("nan"), float("nan")
    va, vb = float(sem_a) ** 2, float(sem_b) ** 2
    diff = float(mean_a) - float(mean_b)
    if va + vb == 0:
        return (math.copysign(math.inf, diff) if diff else 0.0), float("nan"), (0.0 if diff else 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (int(n_a) - 1) + vb ** 2 / (int(n_b) - 1))
    from scipy.stats import t as student_t

    return t, df, float(2.0 * student_t.sf(abs(t), df))


def welch_samples(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """:func:`welch_test` on two samples (NaNs dropped): ``(t, df, p)``."""
    va, vb = _finite_values(a), _finite_values(b)
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return welch_test(mean(va), _sem(va), len(va), mean(vb), _sem(vb), len(vb))


def paired_samples(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Paired two-sided t-test of ``a[i] - b[i]`` against 0 (pairs with a NaN on either side
    dropped): ``(t, df, p)`` with ``df = pairs - 1``, NaN below 2 pairs. For values measured on the
    same seeds (one split and one Original per seed), where :func:`welch_samples` ignores that a
    seed moves both methods together. Where every difference is equal, p is 0 unless they are 0."""
    if len(a) != len(b):
        raise ValueError(f"paired_samples: {len(a)} values against {len(b)}; expected one pair per seed")
    diffs = [float(x) - float(y) for x, y in zip(a, b)
             if x is not None and y is not None and not math.isnan(float(x)) and not math.isnan(float(y))]
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    mean = sum(diffs) / n
    sem = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    if sem == 0:
        return (math.copysign(math.inf, mean) if mean else 0.0), float(n - 1), (0.0 if mean else 1.0)
    t = mean / sem
    from scipy.stats import t as student_t

    return t, float(n - 1), float(2.0 * student_t.sf(abs(t), n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order; NaN stays NaN and is not
    counted): a difference is significant at level a over the whole family when its adjusted p is
    below a, which holds the chance of any false mark at a however many comparisons a table makes."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None and not math.isnan(float(p))),
                 key=lambda i: float(pvalues[i]))
    m = len(idx)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def differs(methods: Mapping[str, Mapping[str, Any]], name: str, reference: str, metric: str,
            alpha: float = 0.05) -> bool:
    """Whether ``name`` and ``reference`` differ on ``metric`` by :func:`welch_test` at level ``alpha``,
    from :func:`summarize`'s entries; False where the test cannot be made (a method missing, fewer than
    2 seeds, or entries without ``sem`` / ``n``, as in results.json files written before them)."""
    if name == reference or name not in methods or reference not in methods:
        return False
    a, b = methods[name], methods[reference]
    try:
        _, _, p = welch_test(a[metric], a["sem"][metric], a["n"][metric], b[metric], b["sem"][metric],
                             b["n"][metric])
    except (KeyError, TypeError):
        return False
    return not math.isnan(p) and p < alpha


def _cell(mean: float, spread: float, with_std: bool, n_note: str = "") -> str:
    if mean is None or math.isnan(mean):
        return "-"
    if with_std and spread is not None and not math.isnan(spread):
        return f"{mean:.2f} ± {spread:.2f}{n_note}"
    return f"{mean:.2f}{n_note}"


def _n(entry: Mapping[str, Any] | None, metric: str) -> int | None:
    # The seeds behind an entry's mean (summarize's "n"), None where not recorded.
    return None if entry is None else (entry.get("n") or {}).get(metric)


def seeds_note(methods: Mapping[str, Mapping[str, Any]], name: str, metric: str) -> str:
    """" (n=K)" when ``name``'s ``metric`` rests on fewer seeds than the table's fullest entry (a
    method run on some seeds of a merged table), so that a one-seed value is not read as a mean over
    all of them; "" otherwise (or where no seed counts were recorded)."""
    n = _n(methods[name], metric)
    full = max((_n(e, metric) or 0 for e in methods.values()), default=0)
    return f" (n={n})" if n is not None and n < full else ""


def spread(entry: Mapping[str, Any], metric: str) -> float:
    """The ± of a table cell: the standard error (``sem``) where the entry has one, else its ``std``
    (results.json files written before ``sem`` existed); NaN when neither."""
    for key in ("sem", "std"):
        v = (entry.get(key) or {}).get(metric)
        if v is not None:
            return float(v)
    return float("nan")


def format_table(methods: Mapping[str, Mapping[str, Any]], *, with_std: bool = False) -> str:
    """A markdown table, one row per method: errors (%), MIA (%, 50 is ideal), seconds, the offline
    LiRA-style attack's AUC and TPR at 1 % / 5 % FPR (%) and the retrain gap (% points); with
    ``with_std``, mean ± standard error over seeds."""
    head = "| Method | " + " | ".join(HEADERS[m] for m in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    lines = [head, rule]
    for name, entry in methods.items():
        cells = [_cell(entry.get(m, float("nan")), spread(entry, m), with_std,
                       seeds_note(methods, name, m) if with_std else "") for m in METRICS]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What "closest to Retrain" compares, with the words the verdict uses for each.
VERDICT_METRICS = {"forget_error": "forget error", "test_error": "test error", "mia": "attack"}


@dataclass
class Verdict:
    """A results table read in plain words (:func:`judge`).

    Attributes:
        closest: the method nearest the reference (Retrain) on average, or None without one.
        gaps: method -> mean absolute difference from the reference, in % points, over ``compared``.
        compared: the metrics that ``gaps`` averages (the attack only when it is informative).
        nearest: metric -> the method nearest the reference on that metric alone.
        speedup: reference seconds / ``closest``'s seconds (NaN when either is missing or zero).
        attack_informative: whether the attack separates the starting model from the reference by
            more than ``luck`` (None when its sample size is unknown).
        luck: how far chance alone moves the gap between two attack scores at this size (two
            standard deviations, % points; NaN when unknown).
        lines: the verdict, one sentence per line.
        headline: its gist in a few words (the PNG's title), "" when nothing was ranked.
    """

    closest: str | None = None
    gaps: dict[str, float] = field(default_factory=dict)
    compared: tuple[str, ...] = ()
    nearest: dict[str, str] = field(default_factory=dict)
    speedup: float = float("nan")
    attack_informative: bool | None = None
    luck: float = float("nan")
    lines: list[str] = field(default_factory=list)
    headline: str = ""

    @property
    def text(self) -> str:
        """The lines joined by newlines."""
        return "\n".join(self.lines)


def _finite(v: Any) -> bool:
    return v is not None and not math.isnan(float(v))


def _value(row: Mapping[str, Any], key: str) -> float:
    """A metric of a table's row for the plots: NaN (nothing drawn) where the row lacks it or holds
    None, as the tables show "-" (a hand-built or merged table failed in the plot, after
    results.json and .md were written)."""
    v = row.get(key)
    return float("nan") if v is None else float(v)


def _pct(v: float) -> str:
    return f"{v:.1f} %"


def _secs(x: float) -> str:
    """Seconds for the verdict: one decimal from 0.95 s, two significant digits below (a tiny
    run's 0.04 s against 0.03 s printed as 0.0 against 0.0, beside a 1.3x ratio), "< 0.001"
    below a millisecond."""
    if x >= 0.95:
        return f"{x:.1f}"
    return f"{x:.2g}" if x >= 1e-3 else "< 0.001"


def judge(methods: Mapping[str, Mapping[str, Any]], *, chance: float | None = None, n: int | None = None,
          reference: str = "retrain", start: str = "original") -> Verdict:
    """Read a results table (method -> metrics, as :func:`summarize` returns) against ``reference``.

    The method closest to the reference is the one with the smallest mean absolute gap, in % points,
    over forget error, test error and, when it is informative, the attack (ties: the first in table
    order). ``chance`` is the standard deviation of the score of an attacker that knows nothing, with
    ``n`` examples a side (:func:`attack_size`); the attack is informative when it scores ``start``
    (the model before unlearning) and the reference more than ``2 * sqrt(2) * chance`` points apart
    (two standard deviations of the difference of two such scores): closer, it cannot tell a model
    that trained on the forget set from one that never saw it, so its scores say nothing.
    Returns a :class:`Verdict`; without the reference its ``lines`` say so and nothing is ranked.
    """
    if chance is not None and not (isinstance(chance, numbers.Real) and not isinstance(chance, bool)
                                   and (math.isnan(chance) or chance >= 0)):
        # A negative spread made every gap count as real (luck < 0): the attack then ranked.
        raise ValueError(f"chance: expected the attack's chance spread, a number >= 0 (or None or "
                         f"NaN: unknown), got {chance!r}")
    if reference not in methods:
        return Verdict(lines=[f"No {label(reference)} row: nothing to compare against."])
    ref = methods[reference]
    orig = methods.get(start)
    out = Verdict()

    gap_attack = abs(orig["mia"] - ref["mia"]) if orig is not None and _finite(orig.get("mia")) \
        and _finite(ref.get("mia")) else float("nan")
    # ``chance`` is the spread of the reference's mean score; the difference of two means has the
    # spread sqrt(1/S_start + 1/S_ref) of one seed's, which is sqrt(2) of the reference's when both
    # rest on as many seeds, more when the starting model has fewer.
    n_start, n_ref = _n(orig, "mia"), _n(ref, "mia")
    ratio = n_ref / n_start if n_start and n_ref else 1.0
    out.luck = luck = 2 * math.sqrt(1.0 + ratio) * float(chance) if _finite(chance) else float("nan")
    if _finite(luck) and _finite(gap_attack):
        out.attack_informative = gap_attack > luck
    # Only what the reference has can be compared; a method lacking one of those is not ranked
    # (a gap over fewer metrics would not be the gap the sentence names).
    out.compared = tuple(m for m in VERDICT_METRICS
                         if (m != "mia" or out.attack_informative) and _finite(ref.get(m)))

    others = [m for m in methods if m not in (reference, start)]
    unranked = []
    for name in others:
        if out.compared and all(_finite(methods[name].get(m)) for m in out.compared):
            out.gaps[name] = sum(abs(methods[name][m] - ref[m]) for m in out.compared) / len(out.compared)
        else:
            unranked.append(name)
    for metric in VERDICT_METRICS:
        near = [(abs(methods[m][metric] - ref[metric]), m) for m in others
                if _finite(methods[m].get(metric)) and _finite(ref.get(metric))]
        if near:
            out.nearest[metric] = min(near, key=lambda t: t[0])[1]  # min keeps the first of ties
    if out.gaps:
        out.closest = min(out.gaps, key=out.gaps.get)

    lines = out.lines
    if out.closest is not None:
        c = methods[out.closest]
        shown = ", ".join(f"{VERDICT_METRICS[m]} {_pct(c[m])} ({label(reference)} {_pct(ref[m])})"
                          for m in out.compared if _finite(c.get(m)) and _finite(ref.get(m)))
        names = [VERDICT_METRICS[m] for m in out.compared]
        what = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
        out.headline = f"Closest to {label(reference)}: {label(out.closest)}"
        seeds = _seeds_apart(c, ref, out.compared, label(out.closest), label(reference))
        lines.append(f"Closest to {label(reference)}: {label(out.closest)}, {out.gaps[out.closest]:.1f} "
                     f"points off on average over {what}{seeds}: {shown}.")
        alone = {m: name for m, name in out.nearest.items() if m in out.compared}
        if len(alone) < 2:
            pass  # one metric compared: "closest" already says it
        elif set(alone.values()) == {out.closest}:
            lines.append("It is also the nearest on each of them alone.")
        else:
            per = "; ".join(f"{VERDICT_METRICS[m]}: {label(name)}" for m, name in alone.items())
            lines.append(f"Nearest to {label(reference)} on each alone: {per}.")
        r_c, r_ref = c.get("retain_error"), ref.get("retain_error")
        if _finite(r_c) and _finite(r_ref) and r_c - r_ref > RETAIN_WARNING_POINTS:
            lines.append(f"But its retain error, {_pct(r_c)}, is {r_c - r_ref:.0f} points above "
                         f"{label(reference)}'s ({_pct(r_ref)}): it forgot at the cost of what it should "
                         f"keep, which the ranking above does not weigh.")
    elif out.compared and others:
        lines.append("No method has all of " + ", ".join(VERDICT_METRICS[m] for m in out.compared)
                     + ": nothing was ranked.")
    elif not out.compared:
        lines.append(f"{label(reference)} has no forget or test error: nothing was ranked.")
    if unranked and out.compared:
        lines.append("Not ranked (a compared metric missing): " + ", ".join(label(m) for m in unranked) + ".")
    if orig is not None and _finite(orig.get("forget_error")) and _finite(ref.get("forget_error")):
        f0, fr = orig["forget_error"], ref["forget_error"]
        if abs(f0 - fr) < 10:
            lines.append(f"{label(reference)}'s forget error ({_pct(fr)}) is close to the {label(start)}'s "
                         f"({_pct(f0)}): in this setting forgetting hardly shows in the errors.")
        else:
            kept = [name for name in others if _finite(methods[name].get("forget_error"))
                    and abs(methods[name]["forget_error"] - f0) < abs(methods[name]["forget_error"] - fr)]
            if kept:
                lines.append(f"Did not forget: {', '.join(label(k) for k in kept)}: forget error nearer the "
                             f"{label(start)}'s ({_pct(f0)}) than {label(reference)}'s ({_pct(fr)}).")
    if out.closest is not None:
        secs, secs_ref = methods[out.closest].get("seconds"), ref.get("seconds")
        if _finite(secs) and _finite(secs_ref) and secs > 0 and secs_ref > 0:
            out.speedup = secs_ref / secs
            how = (f"{out.speedup:.1f}x faster than" if out.speedup >= 1
                   else f"{1 / out.speedup:.1f}x slower than")
            seeds = _seeds_apart(methods[out.closest], ref, ("seconds",), label(out.closest),
                                 label(reference))
            # A cached reference's seconds were measured by the run that trained it, under that
            # run's load (or on another machine): the ratio then compares two runs' clocks.
            n_cached = int(ref.get("cached") or 0)
            n_ref_secs = _n(ref, "seconds")
            if n_cached:
                of = f" in {n_cached} of {n_ref_secs} seeds" if n_ref_secs and n_cached < n_ref_secs else ""
                seeds += (f"; {label(reference)}'s time came from the model cache{of}: it was measured "
                          f"by the run that trained it, not beside this one")
            lines.append(f"Time: {label(out.closest)} took {_secs(secs)} s, {how} retraining from "
                         f"scratch ({_secs(secs_ref)} s){seeds}.")
            out.headline += f", {how} {label(reference)}"
    if _finite(gap_attack):
        head = (f"Attack (50 % = it cannot tell the forget set from unseen data): {label(start)} "
                f"{_pct(orig['mia'])}, {label(reference)} {_pct(ref['mia'])}.")
        if out.attack_informative is None:
            lines.append(head + " How far luck moves it at this size is unknown, so it was left out above.")
        else:
            size = f" with {n} examples a side" if n else ""
            luck_says = f"Luck alone can put two of its scores about {luck:.0f} points apart{size}"
            if out.attack_informative:
                lines.append(head + f" {luck_says}, so this gap is real: a score near "
                             f"{label(reference)}'s leaves about as little trace of the forget set as "
                             f"retraining.")
            else:
                lines.append(head + f" {luck_says}, so at this size it cannot tell a model that trained "
                             f"on the forget set from one that never saw it: its column says nothing "
                             f"about privacy here, and was left out above.")
    return out


# A closest method whose retain error exceeds the reference's by more than this is flagged.
RETAIN_WARNING_POINTS = 10.0


def _seeds_apart(a: Mapping[str, Any], b: Mapping[str, Any], metrics: Sequence[str], la: str,
                 lb: str) -> str:
    # " (means over 1 seed for X, 3 for Retrain)" when two means rest on different seeds, else "".
    na = min((_n(a, m) for m in metrics if _n(a, m) is not None), default=None)
    nb = min((_n(b, m) for m in metrics if _n(b, m) is not None), default=None)
    if na is None or nb is None or na == nb:
        return ""
    return f" (means over {na} seed{'s' if na != 1 else ''} for {la}, {nb} for {lb})"


def attack_size(per_seed: Sequence[Mapping[str, Mapping[str, Any]]], reference: str = "retrain"
                ) -> tuple[float | None, int | None]:
    """``(chance, n)`` of the attack in an experiment's per-seed rows (``mia_chance`` and ``mia_n`` of
    :func:`ppu_fast.unlearn.experiment.evaluate`, read from the ``reference`` rows): the standard
    deviation of an uninformed attacker's mean score over the seeds (one seed's, divided by the square
    root of the number of seeds) and the smallest number of examples a side; ``(None, None)`` when the
    rows do not record them."""
    rows = [run[reference] for run in per_seed if reference in run and _finite(run[reference].get("mia_chance"))]
    if not rows:
        return None, None
    one = sum(r["mia_chance"] for r in rows) / len(rows)
    sizes = [int(r["mia_n"]) for r in rows if _finite(r.get("mia_n"))]
    return one / math.sqrt(len(rows)), (min(sizes) if sizes else None)


def _clean(obj: Any) -> Any:
    # JSON has no NaN: write null.
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: the figures are files, no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110,
                rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay ``fig`` out (inside ``rect`` when a caption needs room), write it to ``path`` and close it
    (a run draws many figures: open ones would pile up in pyplot's registry). Written beside and
    renamed, as :func:`write_text_whole` writes."""
    import matplotlib.pyplot as plt

    from .stream import written_beside

    fig.tight_layout(**({"rect": rect} if rect is not None else {}))
    path = Path(path)
    try:
        with written_beside(path, path.suffix) as tmp:  # the suffix tells savefig the format
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def write_text_whole(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it, renamed onto it: an
    interrupt or a full disk leaves the previous file or the new one, never a truncated one (a
    truncated results.json failed the tables tool's merge with a JSON error)."""
    from .stream import written_beside

    path = Path(path)
    with written_beside(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def plot(methods: Mapping[str, Mapping[str, Any]], history: Mapping[str, Sequence[Mapping]] | None,
         path: str | Path, title: str = "") -> Path:
    """Bar chart of test / retain / forget error and MIA per method; beside it, when ``history`` is
    given, the forget error of each fine-tuned method per epoch (the paper's Figure 2)."""
    plt = pyplot()

    names = list(methods)
    shown = ("test_error", "retain_error", "forget_error", "mia")
    # Methods that kept their last epoch record only the loss per epoch: no curve to draw.
    curves = {k: v for k, v in (history or {}).items() if v and "forget_error" in v[-1]}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 8, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(shown)
    for j, metric in enumerate(shown):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(names))]
        ys = [_value(methods[n], metric) for n in names]
        es = [0.0 if math.isnan(spread(methods[n], metric)) else spread(methods[n], metric) for n in names]
        ax.bar(xs, ys, width, yerr=es, label=HEADERS[metric])
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([label(n) for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title(title or "Unlearning results (MIA: 50 is ideal)", fontsize=10)
    if curves:
        ax2 = axes[0][1]
        for name, rows in curves.items():
            ax2.plot([r["epoch"] for r in rows], [r.get("forget_error") for r in rows], marker="o",
                     label=f"{label(name)} forget")
            if rows and "val_error" in rows[0]:
                ax2.plot([r["epoch"] for r in rows], [r["val_error"] for r in rows], ls=":",
                         label=f"{label(name)} val (forget cl.)")
        ax2.set_xlabel("fine-tuning epoch")
        ax2.set_ylabel("error %")
        ax2.set_title("Forget error during fine-tuning", fontsize=10)
        ax2.legend(fontsize=7)
    return save_figure(fig, path)


def plot_story(methods: Mapping[str, Mapping[str, Any]], verdict: Verdict | None, path: str | Path,
               title: str = "", reference: str = "retrain") -> Path:
    """The demo's picture: one row per method, four panels (forget error, test error, attack, seconds),
    each with the ``reference`` (Retrain) value as a dashed line, so a bar that reaches the line did
    what retraining does; the verdict's closest method is drawn in green, its headline is the title,
    and its ``luck`` (what chance alone explains) is shaded around Retrain's attack score."""
    plt = pyplot()

    names = list(methods)
    closest = verdict.closest if verdict is not None else None
    colors = ["#555555" if n == reference else "#2ca02c" if n == closest else "#bbbbbb" if n == "original"
              else "#1f77b4" for n in names]
    noise = " - noise at this size" if verdict is not None and verdict.attack_informative is False else ""
    panels = [("forget_error", "Forget error (%)"), ("test_error", "Test error (%)"),
              ("mia", f"Attack (%; 50: can't tell){noise}"), ("seconds", "Seconds to unlearn")]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 0.42 * len(names) + 1.6), sharey=True)
    ys = list(range(len(names)))[::-1]
    ref = methods.get(reference)
    luck = verdict.luck if verdict is not None and _finite(verdict.luck) else None
    for ax, (metric, head) in zip(axes, panels):
        vals = [_value(methods[n], metric) for n in names]
        shown = [0.0 if math.isnan(v) else v for v in vals]
        ax.barh(ys, shown, color=colors, height=0.65, zorder=2)
        top = max([v for v in shown if v > 0] + [1.0])
        for y, v in zip(ys, vals):
            if not math.isnan(v):
                ax.text(v + top * 0.02, y, f"{v:.1f}", va="center", fontsize=7)
        if ref is not None and not math.isnan(_value(ref, metric)):
            ax.axvline(ref[metric], color="#555555", ls="--", lw=1, zorder=3)
            if metric == "mia" and luck:
                ax.axvspan(ref[metric] - luck, ref[metric] + luck, color="#555555", alpha=0.12, lw=0,
                           zorder=1)
        if metric == "mia":
            ax.axvline(50, color="#555555", ls=":", lw=0.8, zorder=3)
        # Errors and the attack are percentages; test error and time use their own scale, or the
        # bars of a few % would not show.
        ax.set_xlim(0, 105 if metric in ("forget_error", "mia") else top * 1.3)
        ax.set_title(head, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([label(n) for n in names], fontsize=8)
    caption = verdict.headline if verdict is not None and verdict.headline else "Unlearning results"
    fig.suptitle(f"{title}: {caption}" if title else caption, fontsize=10)
    fig.text(0.5, 0.01, "dashed: Retrain (the goal); green: closest to it"
             + ("; shaded: what luck alone explains around Retrain's attack score" if luck else ""),
             ha="center", fontsize=7, color="#555555")
    return save_figure(fig, path, dpi=100, rect=(0, 0.04, 1, 1))


def write_results(out_dir: str | Path, config: Mapping[str, Any], methods: Mapping[str, Mapping[str, Any]],
                  *, per_seed: Sequence[Mapping] = (), history: Mapping[str, Sequence[Mapping]] | None = None,
                  verdict: Verdict | None = None, story: bool = False,
                  histories: Mapping[str, Sequence[Mapping]] | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir`` (created if needed).
    ``verdict`` (:func:`judge`) goes into the JSON and below the table; ``story=True`` draws the PNG
    with :func:`plot_story` (each method beside Retrain), else :func:`plot` (errors, MIA and the
    per-epoch curves). ``histories`` (every seed's, see
    :func:`ppu_fast.unlearn.experiment.run_experiment`) goes into the JSON beside ``history`` (the
    first seed's, kept for older readers). Returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with_std = len(per_seed) > 1
    payload = {"config": dict(config), "methods": {k: dict(v) for k, v in methods.items()},
               "per_seed": list(per_seed), "history": dict(history or {})}
    if histories:
        payload["histories"] = {k: list(v) for k, v in histories.items()}
    if verdict is not None:
        payload["verdict"] = {"closest": verdict.closest, "gaps": verdict.gaps, "compared": list(verdict.compared),
                              "nearest": verdict.nearest, "speedup": verdict.speedup,
                              "attack_informative": verdict.attack_informative, "luck": verdict.luck,
                              "lines": verdict.lines}
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    write_text_whole(paths["json"], json.dumps(_clean(payload), indent=2) + "\n")
    cfg = ", ".join(f"{k}={v}" for k, v in config.items() if not isinstance(v, (dict, list)))
    cached = sum(bool((run.get("retrain") or {}).get("cached")) for run in per_seed)
    if cached:
        cfg += (f"\n\nRetrain came from the model cache in {cached} of {len(per_seed)} seed(s): its "
                f"Seconds there are the training time recorded when it was trained, by another run "
                f"(perhaps on another machine, device or thread count), not measured in this one.")
    write_text_whole(
        paths["md"],
        f"# Unlearning results\n\n{cfg}\n\nErrors in %; MIA is the attacker's accuracy in % (50 is "
        f"ideal); Seconds is the unlearning time (Retrain: its training time)"
        f"; Attack AUC and TPR@x%FPR: the offline LiRA-style attack (members: forget set, non-members: "
        f"test examples of its classes; AUC 50 and TPR@x%FPR about x are chance with many non-members); Retrain gap: mean |difference| "
        f"to Retrain over test, retain and forget error and MIA, per seed (% points)"
        f"{'; ' + SPREAD if with_std else ''}.\n\n{format_table(methods, with_std=with_std)}\n"
        + ("\n## Verdict\n\n" + "".join(f"- {line}\n" for line in verdict.lines) if verdict else ""))
    title = f"{config.get('dataset', '')} / {config.get('model', '')}"
    if story:
        split = config.get("split") or {}
        if split.get("scenario") == "class" and split.get("forget_classes"):
            title += f", forget class {', '.join(str(c) for c in split['forget_classes'])}"
        elif split.get("forget"):
            title += f", forget {split['forget']} samples"
        plot_story(methods, verdict, paths["png"], title=title)
    else:
        plot(methods, history, paths["png"], title=title)
    return paths
