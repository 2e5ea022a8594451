"""An outside reviewer's misuses of the evaluation layer (``ppu_fast.metrics``, ``ppu_fast.tables.merge``,
the tables' cells): each gave a silent wrong number or an unhelpful crash before it was fixed."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ppu_fast import metrics, tables
from ppu_fast.metrics import add_retrain_gaps, error, lira, mia, mia_from_losses, offline_lira_scores
from ppu_fast.report import format_table, summarize, write_results


class _Linear(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


@pytest.fixture()
def labelled():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(80, 4, generator=g), torch.randn(4, 3, generator=g)
    y = (x @ w).argmax(1)
    y[::4] = (y[::4] + 1) % 3  # a quarter wrong: error 25 %
    return _Linear(w), x, y


def test_column_labels_are_not_broadcast(labelled):
    model, x, y = labelled
    assert error(model, TensorDataset(x, y)) == pytest.approx(25.0)
    assert error(model, TensorDataset(x, y[:, None])) == pytest.approx(25.0)
    forget, test = TensorDataset(x[:40], y[:40, None]), TensorDataset(x[40:], y[40:, None])
    assert mia(model, forget, test) == mia(model, TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:]))
    with pytest.raises(ValueError, match=r"labels of shape \(80, 2\); expected \(80,\) integer"):
        error(model, TensorDataset(x, torch.stack([y, y], 1)))


def test_labels_must_be_integer_classes_of_the_model(labelled):
    model, x, y = labelled
    assert mia(model, TensorDataset(x[:40], y[:40].int()), TensorDataset(x[40:], y[40:].int())) == \
        mia(model, TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:]))
    for bad, what in ((7, r"labels must lie in \[0, 3\).*\[0, 7\]"), (-100, r"labels must lie in \[0, 3\)")):
        wrong = y.clone()
        wrong[0] = bad
        with pytest.raises(ValueError, match=what):
            error(model, TensorDataset(x, wrong))
        with pytest.raises(ValueError, match=what):
            metrics.losses(model, TensorDataset(x, wrong))
    with pytest.raises(ValueError, match="labels are float32; expected integer class indices"):
        error(model, TensorDataset(x, y.float()))
    with pytest.raises(ValueError, match="1 logit per example; expected .* k >= 2"):
        error(_Linear(torch.randn(4, 1)), TensorDataset(x, torch.zeros(80, dtype=torch.long)))


def test_nan_is_named_not_blamed_on_class_size():
    with pytest.raises(ValueError, match="nonmember_values contains NaN at position 0"):
        offline_lira_scores([0.0, 1.0], [0, 0], [np.nan] + list(range(9)), [0] * 10)
    with pytest.raises(ValueError, match="member_labels: expected integer class labels"):
        offline_lira_scores([0.0, 1.0, 2.0], [0, 0, np.nan], [0.0, 0.5, 1.0, 1.5], [0, 0, 0, 0])
    f, t = np.linspace(0, 1, 200), np.linspace(0.5, 2, 200)
    f[3] = np.nan
    with pytest.raises(ValueError, match="forget_losses contains NaN at position 3"):
        mia_from_losses(f, t)


def test_nan_logits_in_lira_are_named(labelled):
    model, x, y = labelled
    x = x.clone()
    x[50] = float("nan")
    with pytest.raises(ValueError, match="nonmember_values contains NaN at position"):
        lira(model, TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:]))


def test_attack_minimum_is_what_the_splits_need():
    with pytest.raises(ValueError, match="at least 6 forget and 6 test losses"):
        mia_from_losses(range(5), range(5))
    assert 0.0 <= mia_from_losses(range(6), range(6)) <= 100.0


def test_attack_leaves_the_callers_random_streams_alone():
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    mia_from_losses(np.linspace(0, 1, 30), np.linspace(0.2, 3, 50), seed=0)
    assert (random.random(), np.random.rand()) == expected


# ------------------------------------------------------------------------------------------------
# merging run folders

def _config(seeds, methods, **over):
    c = {"dataset": "digits5", "model": "smallcnn", "width": 1.0, "scenario": "selective",
         "seeds": list(seeds), "num_seeds": len(seeds), "init": "scratch", "methods": list(methods),
         "device": "cpu",
         "split": {"dataset": "digits5", "scenario": "selective", "num_classes": 5, "train": 500,
                   "forget": 25, "retain": 475, "forget_classes": [0], "data_root": "/a"},
         "train": {"epochs": 30, "lr": 0.05}, "method_options": {}, "wall_seconds": 10.0}
    for k, v in over.items():
        c[k] = {**c[k], **v} if isinstance(c.get(k), dict) and k != "method_options" else v
    return c


def _row(forget_error, **kw):
    r = {"test_error": 10.0, "retain_error": 5.0, "forget_error": forget_error, "val_error": 0.0,
         "mia": 50.0, "seconds": 1.0, "mia_auc": 50.0, "mia_tpr_at_1fpr": 1.0, "mia_tpr_at_5fpr": 5.0}
    r.update(kw)
    return r


def _run(folder, seeds, per_seed, **over):
    per_seed = [add_retrain_gaps(r) for r in per_seed]
    methods = list(dict.fromkeys(m for r in per_seed for m in r))
    write_results(folder, _config(seeds, methods, **over), summarize(per_seed), per_seed=per_seed)
    return folder


@pytest.mark.parametrize("over, what", [
    ({"split": {"forget": 50, "retain": 450}}, "split.forget: 50 vs 25"),
    ({"split": {"forget_classes": [3]}}, r"split.forget_classes: \[3\] vs \[0\]"),
    ({"split": {"reduced": {"train_per_class": 50}}}, "split.reduced"),
    ({"train": {"epochs": 5}}, "train.epochs: 5 vs 30"),
    ({"method_options": {"ppu": {"lam": "10"}}}, r"method_options\[ppu\]: \{'lam': '10'\} vs \{\}"),
])
def test_merge_refuses_runs_of_another_experiment(tmp_path, over, what):
    a = _run(tmp_path / "a", [0], [{"retrain": _row(80.0), "ppu": _row(70.0)}])
    b = _run(tmp_path / "b", [1], [{"retrain": _row(80.0), "ppu": _row(60.0)}], **over)
    with pytest.raises(ValueError, match="is a different experiment from .*" + what):
        tables.merge([a, b])


def test_merge_accepts_what_does_not_change_the_experiment(tmp_path):
    # another data path, another device of the same type (a CPU's and a GPU's seconds do not
    # merge: test_hostile_runner.py), a method's options where the other run lacks the method
    a = _run(tmp_path / "a", [0], [{"retrain": _row(80.0), "ppu": _row(70.0)}],
             device="cuda:0", method_options={"ppu": {"lam": "1"}})
    b = _run(tmp_path / "b", [1], [{"retrain": _row(82.0), "scrub": _row(30.0)}],
             split={"data_root": "/b"}, device="cuda:1", method_options={"scrub": {"msteps": "3"}})
    res = tables.merge([a, b])
    assert res["config"]["method_options"] == {"ppu": {"lam": "1"}, "scrub": {"msteps": "3"}}
    assert res["config"]["seeds"] == [0, 1]


def test_merge_counts_each_seed_and_method_once(tmp_path):
    a = _run(tmp_path / "a", [0], [{"retrain": _row(80.0), "ppu": _row(10.0)}])
    b = _run(tmp_path / "b", [0], [{"retrain": _row(80.0), "ppu": _row(30.0)}])
    with pytest.raises(ValueError, match="seed 0, method ppu: measured differently by"):
        tables.merge([a, b])
    with pytest.raises(ValueError, match="is named twice"):
        tables.merge([a, tmp_path / "x" / ".." / "a"])
    # the same cached Retrain evaluated by two runs (its clock aside) is one measurement
    c = _run(tmp_path / "c", [0], [{"retrain": _row(80.0, seconds=7.0), "scrub": _row(40.0)}])
    res = tables.merge([a, c])
    assert set(res["per_seed"][0]) == {"retrain", "ppu", "scrub"}
    assert res["per_seed"][0]["retrain"]["seconds"] == 7.0


def test_a_method_on_fewer_seeds_shows_its_count(tmp_path):
    folders = [_run(tmp_path / f"s{s}", [s], [{"retrain": _row(80.0 + s), "ppu": _row(10.0 + s)}
                                              | ({"scrub": _row(40.0)} if s == 0 else {})])
               for s in range(3)]
    methods = summarize(tables.merge(folders)["per_seed"])
    table = format_table(methods, with_std=True)
    scrub = next(line for line in table.splitlines() if line.startswith("| SCRUB |"))
    ppu = next(line for line in table.splitlines() if line.startswith("| PPU (privacy)"))
    assert "40.00 (n=1)" in scrub and "(n=" not in ppu
    assert tables.main([*map(str, folders), "--out", str(tmp_path / "m")]) == 0
    assert "(n=1)" in (tmp_path / "m" / "tables.md").read_text()
    assert json.loads((tmp_path / "m" / "results.json").read_text())["methods"]["scrub"]["n"]["forget_error"] == 1


# ------------------------------------------------------------------------------------------------
# the verdict

def _entry(forget, test, mia=50.0, seconds=1.0, retain=0.0, n=None):
    e = {"forget_error": forget, "test_error": test, "mia": mia, "seconds": seconds, "retain_error": retain}
    if n is not None:
        e["n"] = {k: n for k in e}
    return e


def test_a_method_missing_a_compared_metric_is_not_ranked():
    from ppu_fast.report import judge

    methods = {"original": _entry(0.0, 1.0), "retrain": _entry(100.0, 10.7),
               "finetune": _entry(float("nan"), 10.7), "ppu": _entry(100.0, 11.5)}
    v = judge(methods)
    assert v.closest == "ppu" and "finetune" not in v.gaps
    assert any(line.startswith("Not ranked (a compared metric missing): Finetune") for line in v.lines)
    # a reference without a forget error: only the test error is compared, and said so
    methods["retrain"] = _entry(float("nan"), 10.7)
    v = judge(methods)
    assert v.compared == ("test_error",) and "over test error:" in v.lines[0]


def test_the_verdict_says_when_means_rest_on_different_seeds_and_flags_a_wrecked_retain_set():
    from ppu_fast.report import judge

    methods = {"original": _entry(0.0, 1.0, n=3), "retrain": _entry(100.0, 10.7, seconds=35.0, n=3),
               "ppu": _entry(100.0, 11.5, n=1), "broken": _entry(100.0, 11.0, retain=90.0, n=1)}
    v = judge(methods)
    assert v.closest == "broken"
    assert "(means over 1 seed for broken, 3 for Retrain)" in v.lines[0]
    assert any("retain error, 90.0 %, is 90 points above Retrain's" in line for line in v.lines)
    assert any(line.startswith("Time:") and "(means over 1 seed" in line for line in v.lines)


def test_attack_luck_follows_the_seeds_on_each_side():
    from ppu_fast.report import attack_size, judge

    base = {"original": _entry(0.0, 1.0, mia=62.5), "retrain": _entry(100.0, 10.7, mia=47.5)}
    base["original"]["n"], base["retrain"]["n"] = {"mia": 1}, {"mia": 3}
    one_seed_chance = 7.9
    v = judge(base, chance=one_seed_chance / 3 ** 0.5, n=36)
    # two standard deviations of (mean of 1) - (mean of 3): 2 * 7.9 * sqrt(1 + 1/3) = 18.2 > 15
    assert v.luck == pytest.approx(2 * one_seed_chance * (1 + 1 / 3) ** 0.5) and not v.attack_informative
    assert attack_size([{"retrain": {"mia_chance": 7.9, "mia_n": None}}]) == (7.9, None)


def test_merged_runs_keep_a_verdict(tmp_path):
    folders = [_run(tmp_path / f"s{s}", [s], [{"original": _row(5.0), "retrain": _row(80.0 + s),
                                              "ppu": _row(70.0 + s)}]) for s in range(2)]
    assert tables.main([*map(str, folders), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["verdict"]["closest"] == "ppu" and "## Verdict" in (tmp_path / "m" / "results.md").read_text()


def test_the_verdict_says_when_retrains_time_came_from_the_cache():
    from ppu_fast.report import judge, summarize

    def run(cached):
        return {"original": {"forget_error": 0.0, "test_error": 1.0, "seconds": 30.0},
                "retrain": {"forget_error": 100.0, "test_error": 10.7, "seconds": 35.0, "cached": cached},
                "ppu": {"forget_error": 99.0, "test_error": 11.0, "seconds": 3.5}}

    time_line = lambda v: next(line for line in v.lines if line.startswith("Time:"))  # noqa: E731
    fresh = summarize([run(False), run(False)])
    assert "cached" not in fresh["retrain"]
    assert "cache" not in time_line(judge(fresh))
    some = summarize([run(True), run(False)])
    assert some["retrain"]["cached"] == 1
    assert ("Retrain's time came from the model cache in 1 of 2 seeds: it was measured by the run "
            "that trained it") in time_line(judge(some))
    every = time_line(judge(summarize([run(True), run(True)])))
    assert "came from the model cache: it was measured" in every and "10.0x faster" in every


# ---- a probe of 2026-12-05 (a researcher's misuses, /tmp/probe26): each failed on commit bf7c79b


def test_metrics_read_a_loader_as_the_examples_its_sampler_visits(labelled):
    from torch.utils.data import DataLoader, Subset

    model, x, y = labelled
    ds = TensorDataset(x, y)
    forget_idx = [i for i in range(40) if y[i] == y[0]]
    test_idx = list(range(40, 80))
    subsets = (Subset(ds, forget_idx), Subset(ds, test_idx))
    loaders = (DataLoader(ds, batch_size=8, sampler=forget_idx), DataLoader(ds, batch_size=8, sampler=test_idx))
    # the loaders' datasets hold every class and the forget rows: read whole, both attacks scored
    # other examples than the rows the samplers pick
    assert lira(model, *loaders) == lira(model, *subsets)
    assert len(forget_idx) >= 6 and mia(model, *loaders) == mia(model, *subsets)
    whole = DataLoader(Subset(ds, test_idx), batch_size=16, drop_last=True)  # 40 rows, batches of 16
    assert error(model, whole) == error(model, subsets[1])  # drop_last drops no example of the set
    shuffled = [mia_from_losses(metrics.losses(model, DataLoader(Subset(ds, range(80)), batch_size=8,
                                                                 shuffle=True)), [0.5] * 40) for _ in range(3)]
    assert len(set(shuffled)) == 1  # the order a shuffled loader visits does not change the score


def test_targets_kept_as_a_column_are_read_as_labels(labelled):
    from ppu_fast.data import dataset_targets

    model, x, y = labelled

    class Column(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.targets = x, y.view(-1, 1).numpy()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], int(self.targets[i, 0])

    col = Column(x, y)
    assert torch.equal(dataset_targets(col), y)
    assert lira(model, torch.utils.data.Subset(col, range(20)), torch.utils.data.Subset(col, range(20, 80))) \
        == lira(model, TensorDataset(x[:20], y[:20]), TensorDataset(x[20:], y[20:]))


def test_metric_inputs_are_named(labelled):
    model, x, y = labelled
    with pytest.raises(TypeError, match=r"data must be a torch Dataset or DataLoader .* got tuple .*"
                                        r"TensorDataset\(X, y\)"):
        error(model, (x, y))
    with pytest.raises(ValueError, match=r"model: its forward pass on data \(a batch of float64 inputs"):
        error(model, TensorDataset(x.double(), y))
    with pytest.raises(ValueError, match=r"seed=-1: expected None or an integer in \[0, 2\*\*32 - 1\]"):
        mia_from_losses([0.1] * 10, [0.2] * 10, seed=-1)
    with pytest.raises(ValueError, match="a NaN or infinite logit"):
        mia_from_losses([float("nan")] * 10, [0.2] * 10)


def test_tables_refuse_to_overwrite_an_input_and_name_hand_edits(tmp_path, capsys):
    a = _run(tmp_path / "a", [0, 1], [{"retrain": _row(80.0), "ppu": _row(10.0)},
                                      {"retrain": _row(81.0), "ppu": _row(12.0)}])
    b = _run(tmp_path / "b", [2], [{"retrain": _row(82.0), "ppu": _row(11.0)}])
    before = (a / "results.json").read_text()
    assert tables.main([str(a), str(b), "--out", str(a)]) == 2
    assert "--out: " in capsys.readouterr().err and (a / "results.json").read_text() == before
    for edit, message in (
            (lambda r: r["config"].__setitem__("seeds", ["0", "1"]), "config.seeds is ['0', '1'], not a list of integers"),
            (lambda r: r["methods"]["ppu"].__setitem__("forget_error", "11.0"),
             "methods.ppu.forget_error is '11.0', not a number or null"),
            (lambda r: r["methods"]["ppu"].__setitem__("sem", None), "methods.ppu.sem is None, not an object"),
            (lambda r: r["per_seed"][0].__setitem__("ppu", None), "per_seed[0].ppu is None, not an object")):
        res = json.loads(before)
        edit(res)
        (a / "results.json").write_text(json.dumps(res))
        with pytest.raises(ValueError, match=re.escape(f"results.json': {message}")):
            tables.load_results(a)


def test_a_file_without_standard_errors_gets_them_from_its_per_seed_rows(tmp_path):
    per_seed = [{"retrain": _row(80.0 + s), "ppu": _row(10.0 + s), "scrub": _row(40.0 + s, test_error=30.0)}
                | ({"finetune": _row(60.0)} if s else {}) for s in range(3)]
    a = _run(tmp_path / "a", [0, 1, 2], per_seed)
    res = json.loads((a / "results.json").read_text())
    for entry in res["methods"].values():  # as results.json files written before "sem" and "n"
        entry.pop("sem")
        entry.pop("n")
    (a / "results.json").write_text(json.dumps(res))
    assert tables.main([str(a)]) == 0
    md = (a / "tables.md").read_text()
    assert "standard error over 3 seeds" in md and "†" in md and "(n=2)" in md


def test_the_attacks_name_the_set_whose_labels_are_wrong(labelled):
    # Both sets went through predict, whose messages said "data" whichever set was wrong. (The
    # requires_grad check: the helper that now names the set must keep predict's no_grad.)
    model, x, y = labelled
    forget, test = TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])
    for attack in (mia, lira):
        with pytest.raises(ValueError, match="^forget: labels are float32; expected integer"):
            attack(model, TensorDataset(x[:40], y[:40].float()), test)
        with pytest.raises(ValueError, match="^test: labels are float32; expected integer"):
            attack(model, forget, TensorDataset(x[40:], y[40:].float()))
    with pytest.raises(ValueError, match="^data: labels are float32"):
        metrics.losses(model, TensorDataset(x, y.float()))
    assert not metrics.predict(model, test)[0].requires_grad
    from torch.utils.data import DataLoader
    odd = DataLoader(TensorDataset(x[:40], y[:40]), collate_fn=lambda b: b)
    for attack in (mia, lira):
        with pytest.raises(ValueError, match="^forget: .*collate_fn"):
            attack(model, odd, test)
        with pytest.raises(ValueError, match="^test: .*collate_fn"):
            attack(model, forget, odd)


def test_the_error_of_no_examples_is_refused(labelled):
    # It was NaN, which a caller's table or mean carried on silently (finetune, unlearn and
    # make_split refuse empty sets; scikit-learn's accuracy_score too).
    model, x, y = labelled
    with pytest.raises(ValueError, match="^data: empty; expected at least one"):
        error(model, TensorDataset(x[:0], y[:0]))
    assert metrics.losses(model, TensorDataset(x[:0], y[:0])).shape == (0,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
@pytest.mark.parametrize("call", ["error", "mia", "lira", "predict", "losses"])
def test_a_device_this_machine_lacks_is_named(labelled, call):
    model, x, y = labelled
    data = TensorDataset(x, y)
    fn = getattr(metrics, call)
    args = (model, data, data) if call in ("mia", "lira") else (model, data)
    with pytest.raises(ValueError, match=r"^device: 'cuda' but torch finds no CUDA device here"):
        fn(*args, device="cuda")
    with pytest.raises(ValueError, match=r"^device: 'tpu' is not a torch device \(Expected one of"):
        fn(*args, device="tpu")


def test_a_device_other_than_the_models_is_refused_by_name():
    """The metrics run the model where its parameters are and never move it: a ``device=``
    elsewhere (a CPU model with device="cuda") could only fail inside the forward pass, under a
    message blaming the inputs; it is refused by name, for every metric. (A model on the meta
    device stands in for "elsewhere" on a machine without a GPU.)"""
    data = TensorDataset(torch.randn(10, 6), torch.arange(10) % 3)
    model = nn.Linear(6, 3, device="meta")
    for fn in (lambda: metrics.error(model, data, device="cpu"),
               lambda: metrics.predict(model, data, device="cpu"),
               lambda: metrics.losses(model, data, device="cpu"),
               lambda: metrics.mia(model, data, data, device="cpu")):
        with pytest.raises(ValueError, match=r"device: 'cpu', but the model's parameters are on "
                                             r"meta; .*\(model\.to\('cpu'\)\)"):
            fn()
    here = nn.Linear(6, 3)
    assert metrics.error(here, data, device="cpu") == metrics.error(here, data)


def test_numpy_integer_seeds_and_float_labels():
    f, t = np.random.default_rng(0).random(20), np.random.default_rng(1).random(30)
    # random.Random refuses np.int64 on Python >= 3.11; the attack's own check accepted it.
    assert mia_from_losses(f, t, seed=np.int64(3)) == mia_from_losses(f, t, seed=3)
    logits = torch.randn(2, 3)
    with pytest.raises(ValueError, match="labels are float64; expected integer class indices"):
        metrics.true_class_features(logits, np.array([0.9, 1.7]))  # was read as [0, 1]


def test_seeds_as_a_numpy_array_reach_the_seed_checks():
    from ppu_fast.unlearn.experiment import run_experiment
    kw = dict(dataset="digits5", model="smallcnn", methods=["original"], cache=False,
              progress=False, log=None)
    with pytest.raises(ValueError, match=r"seeds: \[0, 0\] repeats a seed"):
        run_experiment(seeds=np.array([0, 0]), **kw)  # was numpy's "truth value ... ambiguous"
    with pytest.raises(ValueError, match="seeds must name at least one seed"):
        run_experiment(seeds=np.array([], dtype=np.int64), **kw)
    with pytest.raises(TypeError, match="seeds: expected a sequence of integers"):
        run_experiment(seeds=3, **kw)


def test_items_torch_cannot_batch_are_named():
    from PIL import Image

    class Pictures(torch.utils.data.Dataset):
        """A torchvision dataset without its ToTensor: PIL images."""

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return Image.fromarray(np.zeros((8, 8), np.uint8)), i % 2

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(TypeError, match=r"^data: its items cannot be batched .*ToTensor"):
        error(model, Pictures())
    with pytest.raises(TypeError, match=r"^forget: its items cannot be batched"):
        mia(model, Pictures(), TensorDataset(torch.randn(4, 64), torch.arange(4) % 2))


def test_a_second_reviews_misuses_are_named(labelled, tmp_path):
    """Each gave a silent wrong number or another library's error before: an output with another
    row count than its batch, attack inputs that are not datasets of pairs, mixed label kinds in
    either order and string labels, a split seed or model sizes of the wrong kind, a table
    without a metric in the plots, attack losses that are not numbers, float labels in
    ArrayDataset, float classes, a negative chance spread."""
    from torch.utils.data import Dataset

    from ppu_fast.data import ArrayDataset, make_split
    from ppu_fast.models import build_model
    from ppu_fast.report import judge

    model, x, y = labelled
    ds = TensorDataset(x, y)

    class Doubled(nn.Module):  # view(-1, 2) on 4 features: twice the rows of its batch
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, v):
            return self.fc(v.reshape(-1, 2))

    for call in (lambda: metrics.predict(Doubled(), ds), lambda: error(Doubled(), ds),
                 lambda: mia(Doubled(), ds, ds)):
        with pytest.raises(ValueError, match=r"model: its output for a batch of \d+ input\(s\) "
                                             r"has \d+ rows; expected one row of logits per"):
            call()

    class Dicts(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"image": x[i], "label": y[i]}

    with pytest.raises(TypeError, match="forget must be a torch Dataset or DataLoader"):
        mia(model, (x, y), ds)
    with pytest.raises(ValueError, match="forget: an item is a dict of 2 items; expected"):
        lira(model, Dicts(), ds)
    with pytest.raises(TypeError, match="test must be a torch Dataset or DataLoader"):
        metrics.mia_detail(model, ds, None)

    class Items(Dataset):
        def __init__(self, labels):
            self.labels = labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return x[i], self.labels[i]

    want = error(model, TensorDataset(x[:4], y[:4]))
    ints = [int(v) for v in y[:4]]
    for labels in ([torch.tensor([ints[0]]), *ints[1:]], [torch.tensor(ints[0]), *ints[1:]],
                   [ints[0], torch.tensor(ints[1]), np.int32(ints[2]), ints[3]]):
        assert error(model, Items(labels)) == want
    with pytest.raises(ValueError, match="data: labels of type str; expected integer class"):
        error(model, Items(["cat", "dog", "cat", "dog"]))

    for seed in (None, -1, "1", True):
        with pytest.raises(ValueError, match=rf"seed={re.escape(repr(seed))}: expected a "
                                             rf"non-negative integer"):
            make_split("digits", seed=seed)
    assert json.loads(json.dumps(make_split("digits", seed=np.int64(1)).describe()))["seed"] == 1
    for channels in (0, -1, None, 1.0):
        with pytest.raises(ValueError, match="in_channels must be a positive int"):
            build_model("smallcnn", 10, channels)
    for k in (1, True, 2.0):
        with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
            build_model("smallcnn", k, 1)
    assert build_model("smallcnn", np.int64(10), np.int64(1)).classifier.out_features == 10

    paths = write_results(tmp_path / "r", {}, {"retrain": {"test_error": 1.0, "forget_error": 5.0},
                                                "ppu": {"test_error": None}}, story=True)
    assert paths["png"].is_file()
    write_results(tmp_path / "r2", {}, {"retrain": {"test_error": 1.0}})
    assert (tmp_path / "r2" / "results.png").is_file()

    for losses, what in ((None, "NoneType"), (["a"] * 10, "dtype <U1"),
                         (np.ones((10, 2)), r"shape \(10, 2\)")):
        with pytest.raises(TypeError, match=f"forget_losses: expected a 1-D sequence of numbers "
                                            f".*{what}"):
            mia_from_losses(losses, [0.3] * 10)

    with pytest.raises(ValueError, match="targets: float64 values; expected integer class"):
        ArrayDataset(np.zeros((2, 8, 8, 3), np.uint8), [0.5, 1.7])
    with pytest.raises(ValueError, match="mean: 2 values for 3-channel images"):
        ArrayDataset(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], mean=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"classes: \[0.5\]; expected integer class labels"):
        metrics.restrict_to_classes(ds, [0.5])
    with pytest.raises(TypeError, match="classes: expected a sequence of integer class labels"):
        metrics.restrict_to_classes(ds, None)
    n0 = int((y == 0).sum())
    for classes in (torch.tensor([0]), np.array([0]), [np.int64(0)]):
        assert len(metrics.restrict_to_classes(ds, classes)) == n0
    for chance in (-5, "x", True):
        with pytest.raises(ValueError, match="chance: expected the attack's chance spread"):
            judge({"retrain": {"mia": 50.0}}, chance=chance)


def test_a_complex_output_and_a_string_fpr_are_named(labelled):
    """A complex model output was cast to float by the metrics (the imaginary part dropped, a
    ComplexWarning only); an fpr given as a string or a bool was read as its number."""
    model, x, y = labelled
    ds = TensorDataset(x, y)

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, v):
            return self.inner(v).to(torch.complex64) * (1 + 1j)

    for call in (lambda: metrics.predict(Complex(), ds), lambda: error(Complex(), ds),
                 lambda: mia(Complex(), ds, ds)):
        with pytest.raises(ValueError, match="model: its output is complex64; expected real "
                                             r"\(B, k\) logits"):
            call()
    assert 0.0 <= error(model, ds) <= 100.0
    for fpr in ("0.1", True, None, float("nan")):
        with pytest.raises(ValueError, match=rf"fpr must be a fraction in \[0, 1\], got "
                                             rf"{re.escape(repr(fpr))}"):
            metrics.tpr_at_fpr([1.0, 2.0], [0.0, 3.0], fpr)
    assert metrics.tpr_at_fpr([1.0, 2.0], [0.0, 3.0], np.float32(0.5)) == 1.0


def test_a_refused_merge_writes_nothing_and_an_unwritable_out_is_named(tmp_path, capsys):
    """python -m ppu_fast.tables: a merge refused for its inputs leaves no --out folder behind
    (it was made first), and an --out that cannot be written is exit 2 with its name, not an
    OSError traceback."""
    a = _run(tmp_path / "a", [0], [{"retrain": _row(100.0), "ppu": _row(90.0)}])
    b = _run(tmp_path / "b", [1], [{"retrain": _row(100.0), "ppu": _row(95.0)}],
             train={"epochs": 5})
    assert tables.main([str(a), str(b), "--out", str(tmp_path / "m" / "deep")]) == 2
    assert "a different experiment" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{\n")
    assert tables.main([str(a), str(bad), "--out", str(tmp_path / "o1")]) == 2
    assert not (tmp_path / "o1").exists()
    assert tables.main([str(a), str(a.parent / "a"), "--out", "/proc/ppu-fast-no"]) == 2
    assert "--out: cannot write a folder at '/proc/ppu-fast-no'" in capsys.readouterr().err


def test_info_says_an_environment_every_refine_would_refuse(monkeypatch):
    from ppu_fast.info import report
    monkeypatch.setenv("PPU_FAST_BACKEND", "bogus")
    text = "\n".join(report())
    assert "environment: invalid, every refine refuses it: PPU_FAST_BACKEND: unknown backend " \
           "name 'bogus'" in text and "PPU_FAST_BACKEND=bogus (overrides" not in text
    monkeypatch.setenv("PPU_FAST_BACKEND", "cuda")  # valid for CUDA tensors, wherever it runs
    text = "\n".join(report())
    assert "PPU_FAST_BACKEND=cuda (overrides" in text and "environment: invalid" not in text
    # The host cache's limit is read once per process: a fresh one, as the command runs.
    import os
    import subprocess
    import sys
    env = {**os.environ, "PPU_FAST_HOST_CACHE_MB": "abc"}
    env.pop("PPU_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-m", "ppu_fast.info"], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout
    assert "environment: invalid, every refine refuses it: PPU_FAST_HOST_CACHE_MB" in out


def test_an_interrupted_write_leaves_the_previous_results_whole(tmp_path, monkeypatch):
    """results.json / .md / .png and tables.md were written in place: an interrupt (or a full
    disk) in the middle left a truncated file, and the tables tool's merge then failed on its
    JSON. Now each goes through a file beside it, renamed onto it."""
    from pathlib import Path

    methods = {"retrain": {"test_error": 1.0, "forget_error": 5.0}}
    write_results(tmp_path, {}, methods)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = Path.write_text

    def half_then_interrupt(self, data, *a, **kw):
        real(self, data[: len(data) // 2], *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_results(tmp_path, {}, {"retrain": {"test_error": 2.0, "forget_error": 6.0}})
    monkeypatch.setattr(Path, "write_text", real)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no hidden leftovers
    assert json.loads((tmp_path / "results.json").read_text())["methods"] == methods
