"""Error and the membership-inference attack, on constructed models and losses."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ppu_fast import metrics
from ppu_fast.metrics import error, losses, mia, mia_detail, mia_from_losses
from conftest import LogitsAreInputs


def test_error_in_percent():
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    y = torch.tensor([0, 0, 0, 1])
    assert error(LogitsAreInputs(), TensorDataset(x, y)) == pytest.approx(25.0)
    assert np.allclose(losses(LogitsAreInputs(), TensorDataset(x, y)),
                       torch.nn.functional.cross_entropy(x, y, reduction="none").numpy())


def test_error_restores_training_mode():
    m = LogitsAreInputs().train()
    error(m, TensorDataset(torch.randn(3, 2), torch.zeros(3, dtype=torch.long)))
    assert m.training


def test_mia_separable_losses_near_100():
    rng = np.random.default_rng(0)
    forget = rng.uniform(0.0, 0.1, 200)
    test = rng.uniform(2.0, 3.0, 200)
    assert mia_from_losses(forget, test, seed=1) > 97


def test_mia_identical_distributions_near_50():
    rng = np.random.default_rng(1)
    scores = [mia_from_losses(rng.exponential(1.0, 400), rng.exponential(1.0, 400), seed=s) for s in range(4)]
    assert 40 < np.mean(scores) < 60


def test_mia_balances_and_is_deterministic():
    rng = np.random.default_rng(2)
    forget, test = rng.exponential(0.5, 30), rng.exponential(1.0, 300)
    assert mia_from_losses(forget, test, seed=3) == mia_from_losses(forget, test, seed=3)
    # heavily unbalanced sides would give ~91 % by always answering "test"; balancing removes that
    assert mia_from_losses(rng.exponential(1.0, 30), rng.exponential(1.0, 300), seed=0) < 75


def test_mia_clips_extreme_losses():
    forget = np.r_[np.full(50, 0.01), [1e9]]
    test = np.r_[np.full(50, 5.0), [np.float64(1e12)]]
    assert 90 < mia_from_losses(forget, test, seed=0) <= 100


def test_mia_needs_enough_examples():
    with pytest.raises(ValueError, match="at least 6"):
        mia_from_losses([0.1, 0.2], [0.3] * 10)


def test_mia_restricts_test_to_forget_classes():
    g = torch.Generator().manual_seed(0)
    def confident(n, cls, k=3):  # correct and confident: loss near 0, with noise
        x = torch.randn(n, k, generator=g)
        x[:, cls] += 8
        return x
    forget = TensorDataset(confident(60, 0), torch.zeros(60, dtype=torch.long))
    same = TensorDataset(confident(60, 0), torch.zeros(60, dtype=torch.long))
    # other classes: confidently wrong (huge loss); included, they would make the attack easy
    wrong = TensorDataset(confident(60, 2), torch.ones(60, dtype=torch.long))
    test = torch.utils.data.ConcatDataset([same, wrong])
    score = mia(LogitsAreInputs(), forget, test, seed=0)
    assert 30 < score < 70
    with pytest.raises(ValueError, match="forget classes"):
        mia(LogitsAreInputs(), forget, wrong)


def test_mia_detail_is_mia_with_its_sample_size():
    g = torch.Generator().manual_seed(0)
    forget = TensorDataset(torch.randn(60, 3, generator=g), torch.zeros(60, dtype=torch.long))
    test = TensorDataset(torch.randn(80, 3, generator=g) + torch.tensor([1.0, 0, 0]),
                         torch.zeros(80, dtype=torch.long))
    d = mia_detail(LogitsAreInputs(), forget, test, seed=2)
    assert d["mia"] == mia(LogitsAreInputs(), forget, test, seed=2)
    assert d["mia"] == pytest.approx(np.mean(d["splits"])) and len(d["splits"]) == 5
    # 60 a side after balancing; each of the 5 splits tests 10 % of the 120 examples
    assert d["n"] == 60 and d["scored"] == 60
    # The spread of the same attack on these losses dealt at random: above the 50 / sqrt(60) of
    # independent coin flips (the splits share examples and a threshold), deterministic per seed.
    assert 50 / math.sqrt(60) <= d["chance"] < 2 * 50 / math.sqrt(60)
    assert mia_detail(LogitsAreInputs(), forget, test, seed=2)["chance"] == d["chance"]


@pytest.mark.parametrize("n,losses", [(36, "halfnormal"), (12, "halfnormal"), (36, "exponential")])
def test_the_attacks_chance_is_its_spread_on_null_losses(n: int, losses: str) -> None:
    """``chance`` is the standard deviation of the score of an attacker that knows nothing: on
    losses drawn alike for both sides, scikit-learn's attack itself (fresh losses each draw)
    spreads as ``chance`` says. It was 50 / sqrt(scored), as if its 5 overlapping splits were
    independent coin flips: 7.9 at 36 a side against a spread of ~10, and the verdict called a
    gap "real" in 10-15 % of null tables instead of ~5 %."""
    rng = np.random.default_rng(n)
    draw = ((lambda: list(np.abs(rng.normal(size=n)) * 2)) if losses == "halfnormal"
            else (lambda: list(rng.exponential(size=n) * 0.5)))
    scores, chances = [], []
    for r in range(150):
        sc, _, scored, (x, y, splits) = metrics._attack(draw(), draw(), r)
        scores.append(100 * float(np.mean(sc)))
        if r < 30:
            chances.append(metrics._null_spread(x, y, splits, r))
    spread, chance = float(np.std(scores, ddof=1)), float(np.mean(chances))
    assert abs(chance / spread - 1) < 0.15, (chance, spread, 50 / math.sqrt(scored))
    assert spread > 1.15 * 50 / math.sqrt(scored)  # the coin flips' figure misses it


def test_the_attacks_chance_never_falls_below_coin_flips():
    """Losses of ~1e-3 stop scikit-learn's solver at its start and the deals hardly vary the
    score: a spread of 0 would have made any gap between two scores "real"."""
    rng = np.random.default_rng(3)
    _, _, scored, (x, y, splits) = metrics._attack(list(rng.exponential(size=36) * 1e-3),
                                                   list(rng.exponential(size=36) * 1e-3), 0)
    assert metrics._null_spread(x, y, splits, 0) == pytest.approx(50 / math.sqrt(scored))
    _, _, scored, (x, y, splits) = metrics._attack([0.5] * 36, [0.5] * 36, 0)  # constant losses
    assert metrics._null_spread(x, y, splits, 0) == pytest.approx(50 / math.sqrt(scored))
