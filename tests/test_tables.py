"""The paper-shaped tables: the paper's numbers file, the tables set beside a run, Figure 3, merging
seeds, and ``ppu-fast run --methods all`` end to end on a tiny configuration."""
import json
import math
import re
from pathlib import Path

import pytest

from ppu_fast import tables
from ppu_fast.tables import (context, error_table, merge, mia_table, paper_numbers, plot_time, render,
                             table_ids, time_ratio, time_table, write_tables)
from ppu_fast.unlearn import methods as registered
from ppu_fast.unlearn._loop import ALL_METHODS, all_methods, expand_methods

from conftest import SHARED

PAPER_TEXT = SHARED / "paper" / "ppu-paper.txt"


def fake_methods(seed=0, with_std=True):
    """Measured-looking numbers for every method (distinct, so a test can find each in the output)."""
    out = {}
    # NTK (small scale only) last, so that the other methods keep their numbers whatever the scale
    for i, name in enumerate(ALL_METHODS + ("ntk",)):
        base = 1.0 + 3.1 * i + 0.01 * seed
        out[name] = {"test_error": base, "retain_error": base / 2, "forget_error": base * 2,
                     "val_error": base, "mia": 50 + base / 3, "seconds": 10.0 + i,
                     "std": {k: (0.5 if with_std else 0.0) for k in
                             ("test_error", "retain_error", "forget_error", "val_error", "mia", "seconds")},
                     "sem": {k: (0.5 if with_std else float("nan")) for k in
                             ("test_error", "retain_error", "forget_error", "val_error", "mia", "seconds")}}
    return out


def config_for(table):
    """A run configuration that the paper's table applies to."""
    dataset = "cifar5" if table["scale"] == "small" else "cifar10"
    return {"dataset": dataset, "model": table.get("model") or "allcnn",
            "scenario": table.get("scenario") or "selective"}


def test_paper_numbers_parse_with_table_and_row():
    doc = paper_numbers()
    assert set(doc["tables"]) == {"1", "2", "3", "4", "6", "7", "8", "9", "10", "5.7"}
    known = set(registered())
    for tid, t in doc["tables"].items():
        assert t["caption"] and t["scale"] in ("small", "large") and t["rows"], tid
        assert t.get("scenario") in (None, "selective", "class")
        for row in t["rows"]:
            assert row["method"] is None or row["method"] in known, (tid, row["row"])
            for col, vals in row["values"].items():
                for v in vals.values():
                    assert isinstance(v, float) and 0 <= v <= 100, (tid, row["row"], col)
        names = [r["row"] for r in t["rows"]]
        assert len(names) == len(set(names)), tid
    assert 0 < doc["figure_3"]["ppu_over_scrub_below"] < 1


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text is not beside the repository")
def test_paper_numbers_are_the_papers():
    # Every row of every table, re-read from the paper's tab-separated lines: same numbers, same order.
    text = PAPER_TEXT.read_text()
    for tid, t in paper_numbers()["tables"].items():
        if tid == "5.7":
            for phrase in ("2.5% retain error and a 60% forget error", "2% retain error and a 16% forget"):
                assert phrase in text
            continue
        block = text[text.index(f"Table {tid}:"):]
        for row in t["rows"]:
            line = re.search(rf"^{re.escape(row['row'])}\t(.*)$", block, re.M).group(1)
            printed = [float(c) for c in line.split("\t")]
            if tid == "4":
                ours = [x for c in t["columns"] for x in (row["values"][c]["mean"], row["values"][c]["std"])]
            else:
                ours = [row["values"][d][m] for d in t["datasets"] for m in t["metrics"]]
            assert ours == printed, (tid, row["row"])


@pytest.mark.parametrize("tid", ["1", "2", "3", "6", "7", "8", "9", "10", "5.7"])
def test_every_paper_row_is_in_our_table(tid):
    table = paper_numbers()["tables"][tid]
    ours = fake_methods()
    text = error_table(tid, ours, config_for(table))
    column = table["datasets"][0]
    for row in table["rows"]:
        line = next((l for l in text.splitlines() if l.startswith(f"| {row['row']} |")), None)
        assert line is not None, f"Table {tid} lacks the paper's row {row['row']}"
        for m in table["metrics"]:
            assert f"{row['values'][column][m]:.2f}" in line
            if row["method"] is not None:
                assert f"{ours[row['method']][m]:.2f} ± 0.50" in line
        if row["method"] is None:
            assert "not implemented" in line
    # our methods that the paper's table lacks are listed too, without paper numbers
    listed = {r["method"] for r in table["rows"]}
    for name in ours:
        if name not in listed:
            assert f"| {tables.LABELS[name]} | {ours[name][table['metrics'][0]]:.2f} ± 0.50 | — |" in text


def test_mia_table_puts_both_architectures_beside_ours():
    ours = fake_methods()
    text = mia_table(ours, {"dataset": "cifar10", "model": "resnet18", "scenario": "class"})
    t4 = paper_numbers()["tables"]["4"]
    for row in t4["rows"]:
        line = next(l for l in text.splitlines() if l.startswith(f"| {row['row']} |"))
        for col in ("resnet18/class", "allcnn/class"):
            v = row["values"][col]
            assert f"{v['mean']:.2f} ± {v['std']:.2f}" in line
        assert f"{row['values']['resnet18/selective']['mean']:.2f} ±" not in line or \
            row["values"]["resnet18/selective"]["mean"] in (row["values"]["resnet18/class"]["mean"],
                                                             row["values"]["allcnn/class"]["mean"])
    # The paper's ± is a standard deviation, ours a standard error: the header says which.
    assert "| MIA (paper, ResNet-18; ± std) | MIA (paper, ALL-CNN; ± std) |" in text
    small = mia_table(ours, {"dataset": "digits5", "model": "smallcnn"})
    assert "ours alone" in small and "(paper" not in small


def test_tables_follow_the_runs_setting():
    assert table_ids({"dataset": "digits5", "model": "smallcnn"}) == ["1", "6"]
    assert table_ids({"dataset": "cifar10", "model": "allcnn", "scenario": "selective"}) == ["2", "9", "10", "5.7"]
    assert table_ids({"dataset": "digits", "model": "smallcnn", "scenario": "class"}) == ["7", "8", "5.7"]
    assert context({"dataset": "imagefolder", "model": "resnet18", "scenario": "class"})["column"] == 1
    text = error_table("7", fake_methods(), {"dataset": "imagefolder", "model": "resnet18", "scenario": "class"})
    assert "(paper, Lacuna-10)" in text and "(same architecture)" in text
    with pytest.raises(ValueError, match="dataset"):
        context({"model": "allcnn"})


def test_time_table_checks_the_papers_claim():
    ours = fake_methods()
    ours["scrub"]["seconds"], ours["ppu"]["seconds"], ours["ppu-bias"]["seconds"] = 10.0, 4.0, 6.0
    assert time_ratio(ours, "ppu") == pytest.approx(0.4)
    text = time_table(ours)
    assert "PPU / SCRUB = 0.40 (paper: below 0.5): the claim holds" in text
    assert "PPU w/ uniform / SCRUB = 0.60 (paper: below 0.5): the claim does not hold" in text
    del ours["scrub"]
    assert math.isnan(time_ratio(ours, "ppu")) and "SCRUB did not run" in time_table(ours)


def test_write_tables_and_figure3(tmp_path):
    cfg = {"dataset": "cifar5", "model": "allcnn", "width": 1.0, "scenario": "selective"}
    paths = write_tables(tmp_path, cfg, fake_methods(), seeds=3)
    md = paths["tables"].read_text()
    assert md.count("\n### ") == 6 and "mean ± standard error over 3 seeds (sample std / √n)" in md
    assert "### Attack with signal" in md
    assert paths["figure3"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_time({"original": {"seconds": 0.0, "std": {}}}, tmp_path / "one.png").is_file()
    assert paths["trajectory"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = render(cfg, fake_methods(with_std=False), seeds=1)
    assert "±" not in one.split("### Table 3")[1].split("###")[0]
    assert "Reduced run" not in one
    reduced = {"dataset": "cifar10", "model": "resnet18", "scenario": "class",
               "split": {"reduced": {"train_per_class": 200, "test_per_class": 100}}}
    assert "**Reduced run**: 200 training and 100 test images per class" in \
        render(reduced, fake_methods(with_std=False), seeds=1)


def test_forget_error_versus_seconds_plot(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((list(args[0]), list(args[1]), kwargs.get("label")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    methods = {"original": {"seconds": 0.0, "forget_error": 0.0},
               "scrub": {"seconds": 4.0, "forget_error": 20.0},
               "ppu": {"seconds": 1.5, "forget_error": 40.0}}
    history = {"ppu": [{"epoch": 0, "wall_seconds": 0.2, "forget_error": 0.0},
                       {"epoch": 1, "wall_seconds": 0.9, "forget_error": 30.0},
                       {"epoch": 2, "wall_seconds": 1.5, "forget_error": 40.0}],
               "scrub": [{"epoch": 1, "loss": 0.3}]}  # no wall_seconds: a point only
    from ppu_fast.tables import plot_trajectory

    assert plot_trajectory(methods, history, tmp_path / "t.png").is_file()
    lines = [d for d in drawn if d[2] is None]
    points = {d[2]: (d[0][0], d[1][0]) for d in drawn if d[2] is not None}
    assert lines == [([0.2, 0.9, 1.5], [0.0, 30.0, 40.0], None)]
    assert points == {"SCRUB": (4.0, 20.0), "PPU": (1.5, 40.0)}


def test_trajectory_of_an_original_only_run_draws_without_a_legend_warning(tmp_path):
    import warnings

    from ppu_fast.tables import plot_trajectory

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" is a UserWarning
        assert plot_trajectory({"original": {"seconds": 0.01, "forget_error": 0.0}}, None,
                               tmp_path / "o.png").is_file()


def _spy(monkeypatch, method):
    """Record what ``matplotlib.axes.Axes.<method>`` is called with, then draw as usual."""
    import matplotlib.axes

    calls = []
    real = getattr(matplotlib.axes.Axes, method)

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, method, spy)
    return calls


def ppu_histories():
    # seed 0 stops early (the "fast" schedule), seed 1 runs all three epochs; SCRUB+R keeps one seed
    return {"ppu": [{"seed": 0, "selected_epoch": 1,
                     "history": [{"epoch": 0, "forget_error": 0.0}, {"epoch": 1, "forget_error": 20.0}]},
                    {"seed": 1, "selected_epoch": 2,
                     "history": [{"epoch": 0, "forget_error": 4.0}, {"epoch": 1, "forget_error": 12.0},
                                 {"epoch": 2, "forget_error": 30.0}, {"epoch": 3, "forget_error": 44.0}]}],
            "scrub+r": [{"seed": 0, "selected_epoch": 0,
                         "history": [{"epoch": 0, "forget_error": 1.0}, {"epoch": 1, "forget_error": 9.0}]}],
            "ppu-bias": [{"seed": 0, "selected_epoch": 2, "history": [{"epoch": 1, "loss_0": 0.4}]}]}


def test_figure2_draws_every_seed_and_marks_the_selected_epoch(tmp_path, monkeypatch):
    from ppu_fast.tables import plot_forget_per_epoch

    calls = _spy(monkeypatch, "plot")
    lines = []
    monkeypatch.setattr("matplotlib.axes.Axes.axhline",
                        lambda self, y, *a, **k: lines.append(y))
    methods = {"retrain": {"forget_error": 25.0}, "ppu": {"forget_error": 25.0}}
    assert plot_forget_per_epoch(ppu_histories(), methods, tmp_path / "f2.png").is_file()
    drawn = [(list(a[0]), list(a[1]), a[2] if len(a) > 2 else None) for a, _ in calls]
    curves = [(x, y) for x, y, fmt in drawn if fmt == "-"]
    stars = [(x, y) for x, y, fmt in drawn if fmt == "*"]
    # every seed's curve, different lengths kept; the bias-mode run without forget error left out
    assert curves == [([0, 1], [0.0, 20.0]), ([0, 1, 2, 3], [4.0, 12.0, 30.0, 44.0]), ([0, 1], [1.0, 9.0])]
    assert stars == [([1], [20.0]), ([2], [30.0]), ([0], [1.0])]
    assert lines == [25.0]


def test_figure2_without_any_history_says_so(tmp_path, monkeypatch):
    from ppu_fast.tables import plot_forget_per_epoch

    texts = _spy(monkeypatch, "text")
    assert plot_forget_per_epoch({}, {"ppu": {"forget_error": 3.0}}, tmp_path / "f2.png").is_file()
    assert any("no method kept a per-epoch history" in a[2] for a, _ in texts)


def test_figure4_bars_are_the_mia_means_with_standard_errors(tmp_path, monkeypatch):
    from ppu_fast.tables import plot_mia

    calls = _spy(monkeypatch, "bar")
    methods = {"original": {"mia": 70.0, "sem": {"mia": 2.0}, "std": {"mia": 9.0}},
               "retrain": {"mia": 51.0, "sem": {"mia": 1.5}},
               "fisher": {"mia": float("nan")},  # not measured: no bar
               "ppu": {"mia": 49.0, "sem": {"mia": float("nan")}}}  # one seed: no error bar
    assert plot_mia(methods, tmp_path / "f4.png").is_file()
    (args, kwargs), = calls
    assert list(args[1]) == [70.0, 51.0, 49.0] and list(kwargs["yerr"]) == [2.0, 1.5, 0.0]


def test_write_tables_writes_figures_2_and_4_from_per_seed_histories(tmp_path, monkeypatch):
    from ppu_fast.report import write_results

    cfg = {"dataset": "cifar5", "model": "allcnn", "width": 1.0, "scenario": "selective", "seeds": [0, 1]}
    calls = _spy(monkeypatch, "plot")
    paths = write_tables(tmp_path, cfg, fake_methods(), seeds=2, histories=ppu_histories())
    for key, name in (("figure2", "figure2_forget_per_epoch.png"), ("figure4", "figure4_mia.png")):
        assert paths[key] == tmp_path / name and paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ([0, 1, 2, 3], [4.0, 12.0, 30.0, 44.0]) in [(list(a[0]), list(a[1])) for a, _ in calls]
    # results.json keeps the first seed's history and adds every seed's
    write_results(tmp_path, cfg, fake_methods(), per_seed=[{}, {}],
                  history={"ppu": ppu_histories()["ppu"][0]["history"]}, histories=ppu_histories())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["histories"]["ppu"][1]["selected_epoch"] == 2 and len(saved["history"]["ppu"]) == 2


def test_merge_keeps_every_seeds_history(tmp_path):
    h = ppu_histories()
    for seed, entry in zip((0, 1), h["ppu"]):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        per = {"ppu": {"test_error": 1.0, "retain_error": 1.0, "forget_error": 1.0, "mia": 50.0}}
        (d / "results.json").write_text(json.dumps({
            "config": {"dataset": "cifar5", "model": "allcnn", "width": 1.0, "seeds": [seed]},
            "per_seed": [per], "history": {"ppu": entry["history"]}, "histories": {"ppu": [entry]}}))
    # a file written before per-seed histories: its first seed's history stands in
    old = tmp_path / "s2"
    old.mkdir()
    per = {"ppu": {"test_error": 1.0, "retain_error": 1.0, "forget_error": 1.0, "mia": 50.0,
                   "selected_epoch": 1}}
    (old / "results.json").write_text(json.dumps({
        "config": {"dataset": "cifar5", "model": "allcnn", "width": 1.0, "seeds": [2]},
        "per_seed": [per], "history": {"ppu": [{"epoch": 0, "forget_error": 5.0},
                                               {"epoch": 1, "forget_error": 6.0}]}}))
    res = merge([tmp_path / "s0", tmp_path / "s1", old])
    assert [(e["seed"], e["selected_epoch"], len(e["history"])) for e in res["histories"]["ppu"]] == \
        [(0, 1, 2), (1, 2, 4), (2, 1, 2)]


def test_run_experiment_keeps_every_seeds_history(tmp_path, monkeypatch):
    import torch

    from ppu_fast.unlearn.experiment import run_experiment

    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_experiment(dataset="digits5", model="smallcnn", width=0.25, methods=["original", "ppu"],
                             seeds=[0, 1], train={"epochs": 1}, method_kwargs={"ppu": {"epochs": 2}},
                             progress=False, log=None)
    finally:
        torch.set_num_threads(n)
    entries = res["histories"]["ppu"]
    assert [e["seed"] for e in entries] == [0, 1] and "original" not in res["histories"]
    for e, row in zip(entries, res["per_seed"]):
        assert e["selected_epoch"] == row["ppu"]["selected_epoch"]
        assert e["history"][0]["epoch"] == 0 and "forget_error" in e["history"][0]
    assert res["history"]["ppu"] == entries[0]["history"]  # the first seed's, as before


def test_merge_seeds(tmp_path):
    for seed in (1, 2):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        per = {k: {m: v for m, v in e.items() if m != "std"} for k, e in fake_methods(seed).items()}
        per["original"]["val_error"] = None  # results.json writes NaN as null
        (d / "results.json").write_text(json.dumps({
            "config": {"dataset": "cifar5", "model": "allcnn", "width": 1.0, "scenario": "selective",
                       "seeds": [seed], "wall_seconds": 5.0},
            "methods": {}, "per_seed": [per], "history": {}}))
    res = merge([tmp_path / "s1", tmp_path / "s2"])
    assert res["config"]["seeds"] == [1, 2] and res["config"]["wall_seconds"] == 10.0
    assert len(res["per_seed"]) == 2 and math.isnan(res["per_seed"][0]["original"]["val_error"])
    assert tables.main([str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["methods"]["scrub"]["test_error"] == pytest.approx(1.0 + 3.1 * 8 + 0.015)
    md = (tmp_path / "m" / "tables.md").read_text()
    # the merge recomputed each seed's retrain gap, and the tables pair them by seed
    assert "### Retrain gap against PPU, paired by seed" in md and "2 seeds have both Retrain and PPU;" in md
    assert "### Retrain gap against PPU w/ uniform, paired by seed" in md
    (tmp_path / "m" / "tables.md").unlink()  # the single-folder form reads results.json's nulls back
    assert tables.main([str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "tables.md").read_text() == md
    other = tmp_path / "s3"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"config": {"dataset": "cifar5", "model": "resnet18"},
                                                    "per_seed": []}))
    with pytest.raises(ValueError, match="different experiment"):
        merge([tmp_path / "s1", other])
    # a pre-trained start is another experiment; a file without "init" started from scratch
    pre = tmp_path / "s4"
    pre.mkdir()
    cfg = json.loads((tmp_path / "s1" / "results.json").read_text())
    (pre / "results.json").write_text(json.dumps({**cfg, "config": {**cfg["config"], "init": "cifar10-other"}}))
    with pytest.raises(ValueError, match="cifar10-other"):
        merge([tmp_path / "s1", pre])
    (pre / "results.json").write_text(json.dumps({**cfg, "config": {**cfg["config"], "init": "scratch",
                                                                     "seeds": [4]}}))
    assert merge([tmp_path / "s1", pre])["config"]["num_seeds"] == 2
    assert tables.main([str(tmp_path / "nothing")]) == 2


def test_significance_marks_against_ppu():
    from ppu_fast.report import summarize

    # PPU's test error ~ 10, Finetune's ~ 20 (clearly apart), Retrain's ~ 10.5 (inside the noise)
    runs = [{"ppu": {"test_error": 10.0 + d, "mia": 50.0 + d}, "finetune": {"test_error": 20.0 + d, "mia": 50.0 - d},
             "retrain": {"test_error": 10.5 - d, "mia": 50.0}} for d in (-1.0, 0.0, 1.0, 0.5, -0.5)]
    methods = summarize(runs)
    cfg = {"dataset": "cifar5", "model": "allcnn"}
    text = render(cfg, methods, seeds=5)
    assert "†: differs from PPU (privacy) by Welch's t-test, p < 0.05" in text
    line = lambda label, t: next(ln for ln in t.splitlines() if ln.startswith(f"| {label} |"))  # noqa: E731
    sem = methods["finetune"]["sem"]["test_error"]
    assert f"| 20.00 ± {sem:.2f} † |" in line("Finetune", error_table("1", methods, cfg))
    assert "†" not in line("Retrain", error_table("1", methods, cfg))  # 10.5 vs 10: not significant
    assert "†" not in line("PPU", error_table("6", methods, cfg))  # never against itself
    attack = tables.attack_table(methods)
    assert "†" not in line("Finetune", attack)  # equal MIA means
    # one seed: no test, no marks; no PPU row: no marks and the caption says so
    assert "†" not in render(cfg, summarize(runs[:1]), seeds=1)
    no_ppu = summarize([{k: v for k, v in r.items() if k != "ppu"} for r in runs])
    assert "no PPU row, so no significance marks" in render(cfg, no_ppu, seeds=5)


def test_gap_table_pairs_the_seeds():
    from ppu_fast.metrics import add_retrain_gaps
    from ppu_fast.report import summarize

    # A seed effect moves every method's gap together. NegGrad+'s gap is PPU w/ uniform's + delta
    # (differences -0.9 -1.5 -2.1 -0.7 -1.6), EU-k's + 2.0 3.5 1.0 2.5 and missing at the last seed:
    # Welch cannot see NegGrad+'s, the paired test does, and the seeds stay aligned.
    base, delta, eu = [5.0, 9.0, 3.0, 12.0, 7.0], [-0.9, -1.5, -2.1, -0.7, -1.6], [2.0, 3.5, 1.0, 2.5]
    runs = []
    for i, (b, d) in enumerate(zip(base, delta)):
        ret = {"test_error": 10.0, "retain_error": 5.0, "forget_error": 50.0, "mia": 50.0}
        # the gap is the mean |difference| over four columns: put 4 x the wanted gap in forget error
        rows = {"original": ret, "retrain": ret, "ppu-bias": {**ret, "forget_error": 50.0 + 4 * b},
                "neggrad+": {**ret, "forget_error": 50.0 + 4 * (b + d),
                             "mia": float("nan") if b == 12.0 else 50.0}}
        if i < 4:
            rows["eu-k"] = {**ret, "forget_error": 50.0 + 4 * (b + eu[i])}
        runs.append(add_retrain_gaps(rows))
    text = tables.gap_table(runs, "ppu-bias")
    row = lambda label: next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))[2:-2].split(" | ")  # noqa: E731
    assert row("PPU w/ uniform")[:3] == ["PPU w/ uniform", "—", "7.20 ± 1.56"]  # 5, 9, 3, 12, 7
    ng, ek = row("NegGrad+"), row("EU-k")
    # NegGrad+: the seed with a NaN MIA has no four-column gap, so 4 pairs there (-0.9 -1.5 -2.1
    # -1.6) and 5 for the errors-only gap, which is 4/3 of the differences
    assert ng[1] == "4" and ng[3] == "-1.52 ± 0.25"  # mean -1.525, sem 0.2462
    assert ng[4] == "0.008"  # scipy.stats.ttest_rel: 0.00848
    assert ng[6] == "0.233"  # scipy.stats.ttest_ind(4 values, 5, equal_var=False): 0.2327, blind to it
    assert ng[8] == "-1.81 ± 0.34" and ng[9] == "0.006"  # 4/3 x (mean -1.36, sem 0.2522); p 0.00572
    assert ek[1] == "4" and ek[3] == "2.25 ± 0.52" and ek[4] == "0.023"  # ttest_rel: 0.02281
    # Holm over the two: the smaller p doubled, the larger kept (it is above the doubled one)
    assert (ng[5], ek[5]) == ("0.017", "0.023")  # 2 x 0.00848, 0.02281
    assert (ng[10], ek[10]) == ("0.011", "0.023")  # 2 x 0.00572, 0.02281
    assert "over the 2 methods of its column with a test (2 for the errors-only column)" in text
    assert "5 seeds have both Retrain and PPU w/ uniform" in text
    # the same table whatever the order of the seeds
    assert tables.gap_table(runs[::-1], "ppu-bias") == text
    assert tables.gap_table(runs[:1], "ppu-bias") == ""  # one seed: no test
    assert tables.gap_table(runs, "ppu") == ""  # no such method
    cfg = {"dataset": "cifar5", "model": "allcnn"}
    assert "paired by seed" in render(cfg, summarize(runs), seeds=5, per_seed=runs)
    assert "paired by seed" not in render(cfg, summarize(runs), seeds=5)


def test_old_results_without_sem_say_std():
    old = fake_methods()
    for e in old.values():
        del e["sem"]
    text = render({"dataset": "cifar5", "model": "allcnn"}, old, seeds=3)
    assert "mean ± population std over 3 seeds" in text


def test_expand_methods():
    assert expand_methods(["all"]) == list(ALL_METHODS)
    assert expand_methods(["ppu", "all"])[0] == "ppu" and len(expand_methods(["ppu", "all"])) == len(ALL_METHODS)
    assert set(ALL_METHODS) <= set(registered())
    # NTK only at small scale, in the paper's row order (Tables 1 and 6: Fisher, NTK, NegGrad+)
    for dataset in ("digits5", "cifar5"):
        small = expand_methods(["all"], dataset)
        assert small == list(ALL_METHODS[:7]) + ["ntk"] + list(ALL_METHODS[7:])
    assert "ntk" not in expand_methods(["all"], "cifar10") and "ntk" in registered()


@pytest.mark.slow
def test_run_with_all_methods(tmp_path, monkeypatch):
    import torch

    from ppu_fast.cli import main

    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        code = main(["run", "--dataset", "digits5", "--model", "smallcnn", "--width", "0.25", "--methods",
                     "all", "--seeds", "1", "--epochs", "2", "--unlearn-epochs", "1", "--threads", "1",
                     "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == list(all_methods("digits5"))
    for name, entry in res["methods"].items():
        assert {"test_error", "retain_error", "forget_error", "val_error", "mia", "seconds"} <= set(entry), name
        assert entry["seconds"] >= 0 and 0 <= entry["mia"] <= 100
    md = (out / "tables.md").read_text()
    for row in paper_numbers()["tables"]["1"]["rows"]:
        assert f"| {row['row']} |" in md
    assert (out / "figure3_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the baselines got the small-scale setting, the composites the command's PPU epochs
    assert res["config"]["method_options"]["scrub"] == {"setting": "small"}


def test_merge_methods_of_one_seed(tmp_path):
    ours = fake_methods()
    parts = [["original", "retrain"], ["scrub", "ppu"]]
    for i, names in enumerate(parts):
        d = tmp_path / f"p{i}"
        d.mkdir()
        per = {n: {m: v for m, v in ours[n].items() if m != "std"} for n in names}
        (d / "results.json").write_text(json.dumps({
            "config": {"dataset": "cifar10", "model": "allcnn", "width": 1.0, "scenario": "class",
                       "seeds": [1], "wall_seconds": 1.0}, "per_seed": [per], "history": {}}))
    res = merge([tmp_path / "p0", tmp_path / "p1"])
    assert res["config"]["seeds"] == [1] and list(res["per_seed"][0]) == ["original", "retrain", "scrub", "ppu"]
    # the gap of a method is taken against the Retrain row of another part of the same seed
    row, ref = res["per_seed"][0]["scrub"], ours["retrain"]
    assert res["per_seed"][0]["retrain"]["retrain_gap"] == 0.0
    assert row["retrain_gap"] == pytest.approx(sum(abs(row[m] - ref[m]) for m in
                                                   ("test_error", "retain_error", "forget_error", "mia")) / 4)
    assert res["config"]["methods"] == ["original", "retrain", "scrub", "ppu"]


# ------------------------------------------------------------------------------- Table 5: λ sweep
def test_lam_sweep_end_to_end(tmp_path, monkeypatch):
    import torch

    from ppu_fast.cli import main
    from ppu_fast.unlearn import experiment

    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path / "cache"))
    calls = []
    real = experiment.unlearn

    def spy(model, forget, retain, *, method, **kw):
        calls.append((method, kw.get("lam"), kw["seed"], id(model)))
        return real(model, forget, retain, method=method, **kw)

    monkeypatch.setattr(experiment, "unlearn", spy)
    n = torch.get_num_threads()
    out = tmp_path / "sweep"
    try:
        code = main(["run", "--dataset", "digits5", "--model", "smallcnn", "--width", "0.25", "--seeds", "0",
                     "--epochs", "1", "--unlearn-epochs", "1", "--threads", "1", "--lam-sweep", "0.1,1,2,10",
                     "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    names = ["ppu[lam=0.1]", "ppu[lam=1]", "ppu[lam=2]", "ppu[lam=10]"]
    assert list(res["methods"]) == ["original", "retrain", *names]
    # PPU once per λ, each with its λ and the command's PPU epochs, all on the same original model
    ppu_calls = [c for c in calls if c[0] == "ppu"]
    assert [c[1] for c in ppu_calls] == [0.1, 1.0, 2.0, 10.0]
    assert len({c[3] for c in calls}) == 1
    assert res["config"]["variants"]["ppu[lam=2]"] == {"method": "ppu", "epochs": "1", "lam": "2.0"}
    md = (out / "tables.md").read_text()
    t5 = md.split("### Table 5")[1].split("\n### ")[0]
    ours = res["methods"]["ppu[lam=2]"]
    assert f"| 2 | {ours['retain_error']:.2f} | {ours['forget_error']:.2f} | 0.00 | 56.00 |" in t5
    assert "| 3 | not run | not run | 0.00 | 23.00 |" in t5 and "| 0.1 |" in t5
    assert "| PPU (λ = 10) |" in md  # the sweep's rows in the other tables, labelled


def test_lam_sweep_refuses_other_method_choices(capsys):
    from ppu_fast.cli import main

    assert main(["run", "--dataset", "digits5", "--model", "smallcnn", "--lam-sweep", "1,2", "--methods",
                 "ppu", "--out", "x"]) == 2
    assert "--lam-sweep, --methods: pass one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # as the command line is parsed
        main(["run", "--dataset", "digits5", "--model", "smallcnn", "--lam-sweep", "1,0", "--out", "x"])
    assert exc.value.code == 2
    assert "argument --lam-sweep: expected a number in [1e-30, 1e30], got '0.0'" in capsys.readouterr().err
    assert not Path("x").exists()  # --out was checked, and left as it was


def test_lam_table_without_paper_numbers_at_large_scale():
    from ppu_fast.tables import lam_table

    ours = {"retrain": {"retain_error": 1.0, "forget_error": 9.0},
            "ppu[lam=5]": {"retain_error": 2.0, "forget_error": 3.0},
            "ppu[lam=0.5]": {"retain_error": 4.0, "forget_error": 6.0}}
    text = lam_table(ours, {"dataset": "cifar10", "model": "allcnn", "scenario": "selective"}, with_std=False)
    assert "ours alone" in text and "paper)" not in text
    body = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| λ")]
    assert body == ["| 0.5 | 4.00 | 6.00 |", "| 5 | 2.00 | 3.00 |", "| Retrain | 1.00 | 9.00 |"]
    # two spellings of one λ are two runs (they were merged into one row, the other's lost)
    ours["ppu[lam=5.0]"] = {"retain_error": 7.0, "forget_error": 8.0}
    text = lam_table(ours, {"dataset": "cifar10", "model": "allcnn", "scenario": "selective"}, with_std=False)
    body = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| λ")]
    assert body[1:3] == ["| 5 (ppu[lam=5.0]) | 7.00 | 8.00 |", "| 5 (ppu[lam=5]) | 2.00 | 3.00 |"]


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text is not beside the repository")
def test_table_5_numbers_are_the_papers():
    t5 = paper_numbers()["table_5"]
    line = re.search(r"^PPU\t(.*)$", PAPER_TEXT.read_text()[PAPER_TEXT.read_text().index("Table 5:"):],
                     re.M).group(1)
    printed = [float(c) for c in line.split("\t")]
    assert printed == [t5["values"][lam][m] for lam in ("1", "2", "3", "4")
                       for m in ("retain_error", "forget_error")]


def test_lam_sweep_names_two_values_that_print_alike():
    # "λ = 0.123457 is listed twice" for two distinct values that %g prints alike (probe 28)
    from ppu_fast.unlearn.experiment import lam_variants

    with pytest.raises(ValueError, match=r"λ = 0\.1234567 and 0\.1234568 both name the row "
                                         r"'ppu\[lam=0\.123457\]'"):
        lam_variants([0.1234567, 0.1234568])
    with pytest.raises(ValueError, match=r"λ = 2 is listed twice"):
        lam_variants([2, 2.0])
