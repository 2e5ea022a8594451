"""Results of an unlearning experiment: the paper-style table, ``results.json``, ``results.md`` and a
PNG plot (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

METRICS = ("test_error", "retain_error", "forget_error", "val_error", "mia", "seconds")
HEADERS = {"test_error": "Test error", "retain_error": "Retain error", "forget_error": "Forget error",
           "val_error": "Val error (forget cl.)", "mia": "MIA", "seconds": "Seconds"}
LABELS = {"original": "Original", "retrain": "Retrain", "finetune": "Finetune", "ppu": "PPU (privacy)",
          "ppu-bias": "PPU w/ uniform (bias)", "ppu-random": "PPU w/ random (bias)"}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    # Population std (ddof=0), as the paper's "mean / std" over a handful of runs; 0 for one run.
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return mean, std


def summarize(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, Any]]:
    """Mean and std over seeds. ``runs``: one dict per seed, method name -> {metric: value}.
    Returns method -> {metric: mean, ..., "std": {metric: std}}, methods in first-seen order."""
    names: list[str] = []
    for run in runs:
        names += [n for n in run if n not in names]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [run[name] for run in runs if name in run]
        entry: dict[str, Any] = {"std": {}}
        for metric in METRICS:
            mean, std = _mean_std([row.get(metric, float("nan")) for row in rows])
            entry[metric] = mean
            entry["std"][metric] = std
        out[name] = entry
    return out


def _cell(mean: float, std: float, with_std: bool) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if with_std else f"{mean:.2f}"


def format_table(methods: Mapping[str, Mapping[str, Any]], *, with_std: bool = False) -> str:
    """A markdown table, one row per method: errors (%), MIA (%, 50 is ideal) and seconds."""
    head = "| Method | " + " | ".join(HEADERS[m] for m in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    lines = [head, rule]
    for name, entry in methods.items():
        cells = [_cell(entry[m], entry["std"][m], with_std) for m in METRICS]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _clean(obj: Any) -> Any:
    # JSON has no NaN: write null.
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def plot(methods: Mapping[str, Mapping[str, Any]], history: Mapping[str, Sequence[Mapping]] | None,
         path: str | Path, title: str = "") -> Path:
    """Bar chart of test / retain / forget error and MIA per method; beside it, when ``history`` is
    given, the forget error of each fine-tuned method per epoch (the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    shown = ("test_error", "retain_error", "forget_error", "mia")
    # Methods that kept their last epoch record only the loss per epoch: no curve to draw.
    curves = {k: v for k, v in (history or {}).items() if v and "forget_error" in v[-1]}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 8, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(shown)
    for j, metric in enumerate(shown):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(names))]
        ys = [methods[n][metric] for n in names]
        es = [methods[n]["std"][metric] for n in names]
        ax.bar(xs, ys, width, yerr=es, label=HEADERS[metric])
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([LABELS.get(n, n) for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title(title or "Unlearning results (MIA: 50 is ideal)", fontsize=10)
    if curves:
        ax2 = axes[0][1]
        for name, rows in curves.items():
            ax2.plot([r["epoch"] for r in rows], [r.get("forget_error") for r in rows], marker="o",
                     label=f"{LABELS.get(name, name)} forget")
            if rows and "val_error" in rows[0]:
                ax2.plot([r["epoch"] for r in rows], [r["val_error"] for r in rows], ls=":",
                         label=f"{LABELS.get(name, name)} val (forget cl.)")
        ax2.set_xlabel("fine-tuning epoch")
        ax2.set_ylabel("error %")
        ax2.set_title("Forget error during fine-tuning", fontsize=10)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(out_dir: str | Path, config: Mapping[str, Any], methods: Mapping[str, Mapping[str, Any]],
                  *, per_seed: Sequence[Mapping] = (), history: Mapping[str, Sequence[Mapping]] | None = None
                  ) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir`` (created if needed).
    Returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with_std = len(per_seed) > 1
    payload = {"config": dict(config), "methods": {k: dict(v) for k, v in methods.items()},
               "per_seed": list(per_seed), "history": dict(history or {})}
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps(_clean(payload), indent=2) + "\n")
    cfg = ", ".join(f"{k}={v}" for k, v in config.items() if not isinstance(v, (dict, list)))
    paths["md"].write_text(
        f"# Unlearning results\n\n{cfg}\n\nErrors in %; MIA is the attacker's accuracy in % (50 is "
        f"ideal); Seconds is the unlearning time (Retrain: its training time)"
        f"{'; mean ± std over seeds' if with_std else ''}.\n\n{format_table(methods, with_std=with_std)}\n")
    plot(methods, history, paths["png"], title=f"{config.get('dataset', '')} / {config.get('model', '')}")
    return paths
