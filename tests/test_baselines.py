"""The baselines of issue 5 (NegGrad+, CF-k, EU-k, Fisher, Bad-T, SCRUB, SCRUB+R) and PPU after
another method, on digits5 with a small CNN: each runs, changes the model, leaves the caller's model
alone, respects frozen layers and is deterministic under a seed."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ppu_fast.data import make_split
from ppu_fast.metrics import error, losses
from ppu_fast.models import build_model
from ppu_fast.training import TrainConfig, fit
from ppu_fast.unlearn import method_options, methods, unlearn
from ppu_fast.unlearn import bad_teacher, cf_k, composite, eu_k, fisher, neggrad, scrub  # noqa: F401
from ppu_fast.unlearn._loop import infer_setting, last_block, milestone_lr, setting_for
from ppu_fast.unlearn.fisher import diagonal_fisher
from ppu_fast.unlearn.scrub import distill_kl
from conftest import same, state

# Tiny versions of each method: one or two epochs, so the whole file stays fast.
TINY = {
    "neggrad+": {"epochs": 1},
    "cf-k": {"epochs": 1},
    "eu-k": {"epochs": 1},
    "fisher": {"max_samples": 64},
    "bad-t": {"batch_size": 64},
    "scrub": {"epochs": 2, "msteps": 1},
    "scrub+r": {"epochs": 2, "msteps": 1},
    "scrub+ppu": {"scrub_options": {"epochs": 1, "msteps": 1}, "ppu_options": {"epochs": 1}},
    "finetune+ppu": {"finetune_options": {"epochs": 1}, "ppu_options": {"epochs": 1}},
}
BASELINES = sorted(TINY)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    split = make_split("digits5", seed=0)
    torch.manual_seed(0)
    model = fit(build_model("smallcnn", 5, 1, width=0.5), split.train,
                TrainConfig(epochs=5, lr=0.05, batch_size=32), progress=False)
    return split, model


def run(model, split, name, seed=0, **extra):
    return unlearn(model, split.forget, split.retain, method=name, val=split.val, seed=seed,
                   progress=False, **{**TINY[name], **extra})


def test_registered_with_the_issues_names():
    assert set(BASELINES) <= set(methods())
    # every hyper-parameter is an option of the method
    assert {"alpha", "epochs", "lr", "setting"} <= set(method_options("neggrad+"))
    assert {"optimizer", "lr", "epochs", "msteps", "temperature", "gamma", "alpha", "lr_milestones",
            "weight_decay", "batch_size", "forget_batch_size"} <= set(method_options("scrub"))
    assert "select" not in method_options("scrub+r")
    assert {"layers", "epochs", "lr"} <= set(method_options("cf-k"))


@pytest.mark.parametrize("name", BASELINES)
def test_runs_changes_model_and_is_deterministic(setup, name):
    split, model = setup
    before = state(model)
    a = run(model, split, name, seed=1)
    assert same(before, state(model)), "the caller's model must not change"
    assert a.model is not model and not a.model.training
    assert not same(before, state(a.model)), f"{name} left the model unchanged"
    assert a.timings["total"] > 0
    b = run(model, split, name, seed=1)
    assert same(state(a.model), state(b.model)), f"{name} is not deterministic under a seed"
    assert 0 <= error(a.model, split.test) <= 100


@pytest.mark.parametrize("name", ["neggrad+", "eu-k", "fisher", "bad-t", "scrub"])
def test_seed_matters(setup, name):
    split, model = setup
    a, b = run(model, split, name, seed=1), run(model, split, name, seed=2)
    assert not same(state(a.model), state(b.model))


@pytest.mark.parametrize("name", ["cf-k", "eu-k"])
def test_frozen_layers_stay_bit_identical(setup, name):
    split, model = setup
    trained = last_block(model)
    assert trained == ["features.2"]
    res = run(model, split, name, epochs=2)
    before, after = state(model), state(res.model)
    inside = [k for k in before if any(k.startswith(t + ".") for t in trained)]
    # EU-k also puts the classifier back to its initial weights (SCRUB's ALL-CNN rule), untrained
    reset = [k for k in before if k.startswith("classifier.")] if name == "eu-k" else []
    outside = [k for k in before if k not in inside and k not in reset]
    assert inside and outside
    # parameters and BatchNorm statistics outside the block: untouched
    assert same(before, after, outside)
    assert not same(before, after, inside)
    # the returned model is trainable again
    assert all(p.requires_grad for p in res.model.parameters())


def test_layers_option_and_its_errors(setup):
    split, model = setup
    res = run(model, split, "cf-k", layers=["classifier"])
    before, after = state(model), state(res.model)
    assert not same(before, after, ["classifier.weight"])
    assert same(before, after, [k for k in before if not k.startswith("classifier.")])
    with pytest.raises(ValueError, match="layers.*'head'"):
        run(model, split, "cf-k", layers=["head"])
    with pytest.raises(ValueError, match="last block"):
        last_block(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)))


def test_eu_k_reinitialises_the_block(setup):
    split, model = setup
    res = unlearn(model, split.forget, split.retain, method="eu-k", epochs=1, lr=1e-12, progress=False)
    # at a vanishing lr, the block holds (nearly) its fresh initialisation, far from the trained one
    w0 = model.features[2][0].weight
    w1 = res.model.features[2][0].weight
    assert (w0 - w1).abs().mean() > 0.1 * w0.abs().mean()


def test_settings(setup):
    split, _ = setup
    assert infer_setting(split.forget, split.retain) == "small"
    big = make_split("digits", scenario="selective", seed=0)
    assert infer_setting(big.forget, big.retain) == "selective"
    cls = make_split("digits", scenario="class", seed=0)
    assert infer_setting(cls.forget, cls.retain) == "class"
    assert setting_for("cifar5", "class") == "small" and setting_for("cifar10", "class") == "class"
    res = unlearn(build_model("smallcnn", 10, 1, 0.25), cls.forget,
                  Subset(cls.train, cls.retain_idx[:200].tolist()), method="neggrad+", epochs=1,
                  progress=False)
    assert res.options["setting"] == "class" and res.options["alpha"] == 0.9999
    with pytest.raises(ValueError, match="setting"):
        unlearn(build_model("smallcnn", 5, 1, 0.25), split.forget, split.retain, method="scrub",
                setting="huge")


def test_milestone_lr_matches_scrub():
    lr = milestone_lr(5e-4, [5, 8, 9], 0.1)
    assert [lr(e) for e in (1, 5)] == [5e-4, 5e-4]
    assert lr(6) == pytest.approx(5e-5) and lr(9) == pytest.approx(5e-6) and lr(10) == pytest.approx(5e-7)


def test_distill_kl_is_scrubs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    p_t = torch.softmax(t / 4, 1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / 4, 1))).sum() * 16 / 8
    assert distill_kl(s, t, 4.0) == pytest.approx(float(manual), rel=1e-5)
    assert distill_kl(t, t, 2.0) == pytest.approx(0.0, abs=1e-6)


def test_scrub_r_keeps_the_closest_epoch_rule_as_an_option(setup):
    split, model = setup
    res = run(model, split, "scrub+r", epochs=3, rewind="closest")
    assert res.options["rewind"] == "closest"
    gaps = {h["epoch"]: abs(h["forget_error"] - h["val_error"]) for h in res.history[1:]}
    assert res.selected_epoch == min(gaps, key=lambda e: (gaps[e], e))
    assert error(res.model, split.forget) == pytest.approx(res.history[res.selected_epoch]["forget_error"])
    with pytest.raises(ValueError, match="val"):
        unlearn(model, split.forget, split.retain, method="scrub+r", progress=False)


def test_result_names_the_method_that_ran(setup):
    """``result.method`` is the name asked for, but SCRUB with ``select="val"`` is SCRUB+R, and says
    so: the same run as ``method="scrub+r"``, labelled alike (it said "scrub" before)."""
    split, model = setup
    plain = run(model, split, "scrub", seed=4)
    rewound = run(model, split, "scrub", seed=4, select="val")
    direct = run(model, split, "scrub+r", seed=4)
    assert plain.method == "scrub" and rewound.method == direct.method == "scrub+r"
    assert rewound.options["select"] == "val" and same(state(rewound.model), state(direct.model))
    for name in ("ppu-bias", "ppu-random"):  # presets of ppu's function: their own names
        res = unlearn(model, split.forget, split.retain, method=name, seed=0, progress=False, epochs=1)
        assert res.method == name


def test_neggrad_ascends_on_the_forget_set(setup):
    split, model = setup
    # SCRUB's small-scale steps are gentle (no momentum, 4 batches an epoch): the mechanism is checked
    # with our earlier options
    res = run(model, split, "neggrad+", alpha=0.5, epochs=2, momentum=0.9, weight_decay=5e-4,
              batch_size=64, forget_batch_size=64, l2_pull=0.0, mode="train")
    assert losses(res.model, split.forget).mean() > losses(model, split.forget).mean() + 1.0


def test_fisher_matches_scrubs_one_example_loop(setup):
    split, model = setup
    data = Subset(split.retain, list(range(6)))
    fast = diagonal_fisher(copy.deepcopy(model), data, device=torch.device("cpu"))
    m = copy.deepcopy(model).eval()
    slow = {k: torch.zeros_like(v) for k, v in m.named_parameters()}
    for i in range(len(data)):
        x, _ = data[i]
        out = m(x[None])
        prob = torch.softmax(out, 1).detach()
        for c in range(out.shape[1]):
            m.zero_grad()
            F.cross_entropy(out, torch.tensor([c])).backward(retain_graph=True)
            for k, p in m.named_parameters():
                slow[k] += prob[0, c] * p.grad.pow(2)
    for k in slow:
        assert torch.allclose(fast[k], slow[k] / len(data), rtol=1e-4, atol=1e-10), k


def test_fisher_noise_and_class_rows(setup):
    split, model = setup
    zero = run(model, split, "fisher", alpha=0.0)
    assert same(state(model), state(zero.model)), "alpha 0 adds no noise"
    # The class setting forgets whole classes: class 0's training examples, none left in retain.
    train = split.train
    zero_class = [i for i in range(len(train)) if int(train[i][1]) == 0]
    rest = [i for i in range(len(train)) if int(train[i][1]) != 0]
    cls = unlearn(model, Subset(train, zero_class), Subset(train, rest), method="fisher", alpha=0.0,
                  setting="class", progress=False)
    w = cls.model.classifier.weight
    assert w[0].abs().max() < 0.2 and torch.equal(w[1:], model.classifier.weight[1:])
    # On a split that keeps part of class 0 in retain, the class setting would zero the row the
    # retained examples need: refused.
    with pytest.raises(ValueError, match=r"setting='class' zeroes the classifier rows of the forget "
                                         r"set's classes \[0\], but retain holds \d+ examples"):
        run(model, split, "fisher", alpha=0.0, setting="class")


def test_bad_teacher_moves_forget_predictions(setup):
    split, model = setup
    res = run(model, split, "bad-t", epochs=3, lr=3e-3)
    p0 = torch.softmax(torch.stack([model(x[None])[0] for x, _ in split.forget]), 1)[:, 0].mean()
    p1 = torch.softmax(torch.stack([res.model(x[None])[0] for x, _ in split.forget]), 1)[:, 0].mean()
    assert p1 < p0 - 0.1


def test_bad_teacher_mode(setup):
    split, model = setup
    with pytest.raises(ValueError, match="mode must be one of"):
        run(model, split, "bad-t", mode="frozen")

    def bn_stats(m):
        return [b.running_mean.clone() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]

    before = bn_stats(model)
    kept = run(model, split, "bad-t", mode="eval")
    moved = run(model, split, "bad-t")
    assert kept.options["mode"] == "eval" and moved.options["mode"] == "train"
    assert all(torch.equal(a, b) for a, b in zip(before, bn_stats(kept.model)))
    assert not all(torch.equal(a, b) for a, b in zip(before, bn_stats(moved.model)))
    assert not same(state(model), state(kept.model)), "eval mode still trains the weights"


def test_composite_is_ppu_after_the_method(setup):
    split, model = setup
    combo = run(model, split, "scrub+ppu", seed=3)
    first = unlearn(model, split.forget, split.retain, method="scrub", val=split.val, seed=3, progress=False,
                    **TINY["scrub+ppu"]["scrub_options"])
    then = unlearn(first.model, split.forget, split.retain, method="ppu-bias", val=split.val, seed=3,
                   progress=False, **TINY["scrub+ppu"]["ppu_options"])
    assert same(state(combo.model), state(then.model))
    assert combo.method == "scrub+ppu" and {"scrub", "finetune"} <= set(combo.timings)
    with pytest.raises(ValueError, match="ppu_method"):
        run(model, split, "finetune+ppu", ppu_method="scrub")
    with pytest.raises(TypeError, match="unknown option"):
        run(model, split, "finetune+ppu", finetune_options={"epoch": 1})
