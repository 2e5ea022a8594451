"""The attack with signal (offline LiRA-style score, ROC AUC, TPR at low FPR) on synthetic losses and
constructed models whose separability is known, the retrain gap and the Welch test."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ppu_fast.metrics import (add_retrain_gaps, attack_from_features, lira, logit_confidence_from_losses,
                              offline_lira_scores, retrain_gap, roc_auc, roc_curve, tpr_at_fpr,
                              true_class_features)
from conftest import LogitsAreInputs


def _attack_on_losses(forget_losses, test_losses):
    # One class on both sides: the score is the z-scored logit confidence.
    f = logit_confidence_from_losses(forget_losses)
    t = logit_confidence_from_losses(test_losses)
    return attack_from_features(f, np.zeros(len(f), int), t, np.zeros(len(t), int))


def test_identical_loss_distributions_give_chance():
    rng = np.random.default_rng(0)
    aucs, tpr1, tpr5 = [], [], []
    for _ in range(20):
        r = _attack_on_losses(rng.exponential(0.5, 400), rng.exponential(0.5, 400))
        aucs.append(r["auc"]), tpr1.append(r["tpr_at_1fpr"]), tpr5.append(r["tpr_at_5fpr"])
    assert abs(np.mean(aucs) - 50) < 5 and all(abs(a - 50) < 10 for a in aucs)
    # an attack that knows nothing catches members at the rate it accuses non-members
    assert np.mean(tpr1) < 4 and 2 < np.mean(tpr5) < 9


def test_disjoint_loss_distributions_give_a_perfect_attack():
    rng = np.random.default_rng(1)
    r = _attack_on_losses(rng.uniform(0.001, 0.05, 200), rng.uniform(0.5, 3.0, 300))
    assert r["auc"] == 100.0 and r["tpr_at_1fpr"] == 100.0 and r["tpr_at_5fpr"] == 100.0
    assert r["n_members"] == 200 and r["n_nonmembers"] == 300
    # the other way round (members have the larger losses) the attack is perfectly wrong
    r = _attack_on_losses(rng.uniform(0.5, 3.0, 200), rng.uniform(0.001, 0.05, 300))
    assert r["auc"] == 0.0 and r["tpr_at_1fpr"] == 0.0


def test_partial_separation_sits_between():
    rng = np.random.default_rng(2)
    r = _attack_on_losses(rng.exponential(0.2, 500), rng.exponential(1.0, 500))
    assert 60 < r["auc"] < 95 and r["tpr_at_1fpr"] <= r["tpr_at_5fpr"] < 100


def test_roc_auc_counts_pairs_and_ties():
    # 2 members, 2 non-members: pairs (3>1, 3>2, 2=2 -> 1/2, 2>1) = 3.5 of 4
    assert roc_auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(3.5 / 4)
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    pos, neg = rng.integers(0, 20, 97).astype(float), rng.integers(3, 25, 61).astype(float)  # many ties
    expected = sklearn.roc_auc_score(np.r_[np.ones(97), np.zeros(61)], np.r_[pos, neg])
    assert roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_roc_curve_and_tpr_at_fpr_by_hand():
    members = [0.9, 0.8, 0.7, 0.3]
    nonmembers = [0.85, 0.5, 0.1, 0.05]
    fpr, tpr = roc_curve(members, nonmembers)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # threshold 0.9: 1 member, 0 non-members; 0.85 brings the first false positive
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.25
    assert tpr_at_fpr(members, nonmembers, 0.25) == 0.75  # down to 0.7 with one false positive
    assert tpr_at_fpr(members, nonmembers, 0.5) == 1.0
    assert tpr_at_fpr(members, nonmembers, 1.0) == 1.0
    # 1 false positive in 100 is allowed at 1 % FPR
    neg = np.r_[np.full(99, 0.0), 5.0]
    assert tpr_at_fpr([1.0, 2.0, 6.0], neg, 0.01) == 1.0
    assert tpr_at_fpr([1.0, 2.0, 6.0], neg, 0.0) == pytest.approx(1 / 3)


@pytest.mark.parametrize("call,match", [
    (lambda: roc_auc([], [1.0]), "member_scores is empty"),
    (lambda: roc_auc([1.0], [float("nan")]), "nonmember_scores contains NaN"),
    (lambda: tpr_at_fpr([1.0], [0.0], 5), "fpr must be a fraction"),
    (lambda: logit_confidence_from_losses([-1.0]), "losses must be >= 0"),
    (lambda: offline_lira_scores([1.0], [0], [1.0, 2.0], [0, 0]), "class 0: 2 non-member"),
    (lambda: offline_lira_scores([1.0], [0, 1], [1.0, 2.0, 3.0], [0, 0, 0]), "member_values and member_labels"),
    (lambda: true_class_features(torch.zeros(3, 2), [0, 2, 1]), "labels must lie in"),
])
def test_bad_attack_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_leave_one_out_scores_match_a_direct_fit():
    rng = np.random.default_rng(4)
    nv, nl = rng.normal(size=30), rng.integers(0, 3, 30)
    mv, ml = rng.normal(size=10) + 1, rng.integers(0, 3, 10)
    ms, ns = offline_lira_scores(mv, ml, nv, nl)
    for i in range(len(nv)):
        others = nv[(nl == nl[i]) & (np.arange(30) != i)]
        assert ns[i] == pytest.approx((nv[i] - others.mean()) / others.std(ddof=1))
    for j in range(len(mv)):
        out = nv[nl == ml[j]]
        assert ms[j] == pytest.approx((mv[j] - out.mean()) / out.std(ddof=1))


def test_per_class_calibration_beats_a_global_threshold():
    # Class 1 is hard (low confidence for everyone); members are a bit more confident than the
    # non-members of their own class. Pooled, the hard class's members look like non-members.
    rng = np.random.default_rng(5)
    easy_in, easy_out = rng.normal(6.5, 1, 200), rng.normal(6, 1, 200)
    hard_in, hard_out = rng.normal(0.5, 1, 200), rng.normal(0, 1, 200)
    labels_in = np.r_[np.zeros(200, int), np.ones(200, int)]
    mv, nv = np.r_[easy_in, hard_in], np.r_[easy_out, hard_out]
    calibrated = attack_from_features(mv, labels_in, nv, labels_in)["auc"]
    pooled = 100 * roc_auc(mv, nv)
    assert calibrated > pooled + 5


def test_true_class_features_stay_ordered_where_confidence_rounds_to_one():
    logits = torch.tensor([[40.0, 0.0], [50.0, 0.0], [0.0, 1.0]])
    f = true_class_features(logits, [0, 0, 0])
    assert f["confidence"][0] == f["confidence"][1] == 1.0  # float64 rounds both to 1
    assert f["logit_confidence"][:2] == pytest.approx([40.0, 50.0])  # still ordered
    assert f["loss"][2] == pytest.approx(math.log(1 + math.e)) and f["logit_confidence"][2] == pytest.approx(-1.0)
    loss = np.array([0.01, 0.5, 3.0])
    p = np.exp(-loss)
    assert logit_confidence_from_losses(loss) == pytest.approx(np.log(p / (1 - p)))


def test_lira_on_a_model_restricts_test_to_the_forget_classes():
    g = torch.Generator().manual_seed(0)

    def confident(n, cls, margin, k=3):
        x = torch.randn(n, k, generator=g)
        x[:, cls] += margin
        return x

    forget = TensorDataset(confident(50, 0, 8.0), torch.zeros(50, dtype=torch.long))
    same = TensorDataset(confident(80, 0, 1.0), torch.zeros(80, dtype=torch.long))
    other = TensorDataset(confident(40, 2, 8.0), torch.ones(40, dtype=torch.long))  # confidently wrong
    r = lira(LogitsAreInputs(), forget, torch.utils.data.ConcatDataset([same, other]))
    assert r["n_members"] == 50 and r["n_nonmembers"] == 80
    assert r["auc"] > 95 and r["tpr_at_5fpr"] > 50
    with pytest.raises(ValueError, match="forget classes"):
        lira(LogitsAreInputs(), forget, other)


def test_retrain_gap_of_retrain_is_zero_and_others_by_hand():
    ref = {"test_error": 10.0, "retain_error": 0.0, "forget_error": 100.0, "mia": 50.0, "val_error": 3.0}
    other = {"test_error": 12.0, "retain_error": 1.0, "forget_error": 60.0, "mia": 57.0, "val_error": 90.0}
    assert retrain_gap(ref, ref) == 0.0
    assert retrain_gap(other, ref) == pytest.approx((2 + 1 + 40 + 7) / 4)  # val_error is not averaged
    rows = add_retrain_gaps({"retrain": ref, "ppu": other})
    assert rows["retrain"]["retrain_gap"] == 0.0 and rows["ppu"]["retrain_gap"] == pytest.approx(12.5)
    assert "retrain_gap" not in other  # the input is left alone
    assert math.isnan(add_retrain_gaps({"ppu": other})["ppu"]["retrain_gap"])  # no Retrain this seed
    assert math.isnan(retrain_gap({**other, "mia": float("nan")}, ref))


def test_welch_test_by_hand():
    from ppu_fast.report import welch_samples, welch_test

    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [4.0, 6.0, 8.0, 10.0]
    # by hand: means 3 and 7; sample variances 2.5 and 20/3, so s^2/n = 0.5 and 5/3
    va, vb = 0.5, 5 / 3
    t, df, p = welch_samples(a, b)
    assert t == pytest.approx(-4 / math.sqrt(va + vb))  # -2.71746
    assert df == pytest.approx((va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 3))  # 4.74941
    assert p == pytest.approx(0.0442248, abs=1e-6)  # scipy.stats.ttest_ind(a, b, equal_var=False)
    assert welch_test(3.0, math.sqrt(va), 5, 7.0, math.sqrt(vb), 4) == pytest.approx((t, df, p))
    assert p < 0.05 < welch_samples(a, [2.0, 3.0, 4.0, 5.0])[2]
    assert all(math.isnan(v) for v in welch_samples([1.0], b))  # one sample: no test
    assert welch_samples([1.0, 1.0], [2.0, 2.0])[2] == 0.0 and welch_samples([1.0, 1.0], [1.0, 1.0])[2] == 1.0


def test_paired_test_and_holm_by_hand():
    from ppu_fast.report import holm, paired_samples, welch_samples

    a, b = [5.1, 7.3, 4.0, 6.2, 3.9], [6.0, 8.8, 6.1, 6.9, 5.5]
    # by hand: differences -0.9 -1.5 -2.1 -0.7 -1.6, mean -1.36, sample std 0.5639, sem 0.2522
    t, df, p = paired_samples(a, b)
    assert t == pytest.approx(-1.36 / 0.25219040, rel=1e-6) and df == 4
    assert p == pytest.approx(0.00571976, abs=1e-7)  # scipy.stats.ttest_rel(a, b)
    assert welch_samples(a, b)[2] > 0.1  # the seeds' common swing hides the difference from Welch
    nan = float("nan")
    t2, df2, p2 = paired_samples([*a, nan, 1.0], [*b, 2.0, nan])  # a pair with a NaN is dropped
    assert (t2, df2, p2) == (t, df, p)
    assert all(math.isnan(v) for v in paired_samples([1.0, nan], [2.0, 3.0]))  # one pair: no test
    assert paired_samples([1.0, 2.0], [2.0, 3.0])[2] == 0.0 and paired_samples([1.0, 2.0], [1.0, 2.0])[2] == 1.0
    with pytest.raises(ValueError, match="3 values against 2"):
        paired_samples([1.0, 2.0, 3.0], [1.0, 2.0])
    # Holm: sorted p 0.01, 0.02, 0.04 (one NaN not counted) times 3, 2, 1, kept non-decreasing
    assert holm([0.04, nan, 0.01, 0.02]) == pytest.approx([0.04, nan, 0.03, 0.04], nan_ok=True)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_summaries_carry_the_standard_error():
    from ppu_fast.report import summarize

    runs = [{"ppu": {"test_error": v, "mia_auc": float("nan") if i == 0 else 60.0 + i}}
            for i, v in enumerate([10.0, 12.0, 17.0])]
    e = summarize(runs)["ppu"]
    assert e["test_error"] == 13.0 and e["n"]["test_error"] == 3 and e["n"]["mia_auc"] == 2
    assert e["sem"]["test_error"] == pytest.approx(np.std([10, 12, 17], ddof=1) / math.sqrt(3))
    assert e["std"]["test_error"] == pytest.approx(np.std([10, 12, 17]))
    assert e["sem"]["mia_auc"] == pytest.approx(0.5) and math.isnan(summarize(runs[:1])["ppu"]["sem"]["test_error"])
