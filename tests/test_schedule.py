"""PPU's fine-tuning schedule (issue 12): retain sampling, forget repeats, early stopping at the
"val" rule, trainable layers, and the "paper" / "fast" presets."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ppu_fast
from ppu_fast.data import make_split
from ppu_fast.finetune import finetune, select_val, trainable_modules, val_rule_is_settled
from ppu_fast.models import build_model
from ppu_fast.unlearn.ppu import SCHEDULES
from conftest import same, state

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(n=60, d=6, k=4, n_forget=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    targets = torch.softmax(2 * torch.randn(n, k, generator=g), dim=1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:n_forget] = True
    torch.manual_seed(seed)
    return nn.Linear(d, k), TensorDataset(x, y), targets, mask


class Counter(nn.Module):
    """Counts the rows each epoch's forward passes see (train mode only)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        if self.training:
            self.seen.append(len(x))
        return self.inner(x)


@pytest.mark.parametrize("kwargs,match", [
    ({"retain_fraction": 0.0}, "retain_fraction must be a number in \\(0, 1\\]"),
    ({"retain_fraction": 1.5}, "retain_fraction must be a number in \\(0, 1\\]"),
    ({"retain_fraction": "half"}, "retain_fraction"),
    ({"retain_fraction": True}, "retain_fraction"),
    ({"retain_fraction": 0.5, "retain_per_epoch": 3}, "pass one of them"),
    ({"forget_repeats": 0}, "forget_repeats must be a positive int"),
    ({"forget_repeats": 1.5}, "forget_repeats"),
    ({"trainable": "encoder"}, "trainable: unknown value 'encoder'"),
    ({"early_stop": True}, "early_stop=True needs select='val'"),
    ({"early_stop": "yes"}, "early_stop must be a bool"),
    ({"retain_sampling": "kl"}, "retain_sampling: unknown value"),
    ({"retain_sampling": "weighted"}, "retain_weights"),
    ({"evals_per_epoch": 0}, "evals_per_epoch must be a positive int"),
    ({"evals_per_epoch": 2.0}, "evals_per_epoch must be a positive int"),
    ({"evals_per_epoch": True}, "evals_per_epoch"),
])
def test_schedule_options_are_checked(kwargs, match):
    model, data, targets, mask = toy()
    with pytest.raises(ValueError, match=match):
        finetune(model, data, targets, forget_mask=mask, progress=False, **kwargs)


def test_retain_fraction_needs_the_forget_mask():
    model, data, targets, _ = toy()
    with pytest.raises(ValueError, match="need forget_mask"):
        finetune(model, data, targets, retain_fraction=0.5, progress=False)


def test_ppu_schedule_options_are_checked():
    split = make_split("digits5", seed=0)
    model = build_model("smallcnn", 5, 1, width=0.25)
    with pytest.raises(ValueError, match="schedule: unknown value 'quick'"):
        ppu_fast.unlearn(model, split.forget, split.retain, method="ppu", schedule="quick", progress=False)
    with pytest.raises(ValueError, match="early_stop=True needs select='val'"):
        ppu_fast.unlearn(model, split.forget, split.retain, method="ppu-bias", early_stop=True,
                         progress=False)


@pytest.mark.parametrize("fraction,repeats", [(0.25, 1), (0.5, 3), (1.0, 2)])
def test_each_epoch_visits_the_forget_rows_and_a_share_of_the_retain_rows(fraction, repeats):
    model, data, targets, mask = toy()
    spy = Counter(model)
    finetune(spy, data, targets, epochs=3, batch_size=1000, forget_mask=mask, retain_fraction=fraction,
             forget_repeats=repeats, inplace=True, progress=False)
    assert spy.seen == [10 * repeats + round(fraction * 50)] * 3


def test_weighted_sampling_prefers_heavy_rows_but_reaches_the_others():
    model, data, targets, mask = toy(n=210, n_forget=10)
    weights = torch.zeros(210)
    weights[10:20] = 100.0  # ten heavy retain rows; the other 190 weigh 0
    seen = []

    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            seen.append(x)
            return self.inner(x)

    finetune(Rows(), data, targets, epochs=20, batch_size=1000, forget_mask=mask, retain_fraction=0.05,
             retain_sampling="weighted", retain_weights=weights, progress=False)
    x = data.tensors[0]
    hits = torch.zeros(210)
    for batch in seen[::1]:
        if len(batch) != 20:  # the evaluation-free loop: only training batches of 10 + 10 rows
            continue
        eq = (batch[:, None, :] == x[None, :, :]).all(-1)
        hits += eq.float().sum(0)
    assert float(hits[:10].min()) == 20            # every forget row, every epoch
    assert float(hits[10:20].sum()) > 0.5 * float(hits[10:].sum())   # heavy rows dominate
    assert float(hits[20:].sum()) > 0              # the floor keeps weightless rows reachable


def test_retain_fraction_one_is_the_full_epoch():
    model, data, targets, mask = toy()
    a = finetune(model, data, targets, epochs=3, seed=4, progress=False)
    b = finetune(model, data, targets, epochs=3, seed=4, forget_mask=mask, retain_fraction=1.0,
                 progress=False)
    assert torch.equal(a.model.weight, b.model.weight)


def test_val_rule_is_settled_only_after_the_overshoot_grows():
    def h(*errors):
        return [{"epoch": e, "forget_error": f, "val_error": 20.0} for e, f in enumerate(errors)]

    assert not val_rule_is_settled(h(0.0, 5.0, 15.0))       # still below the target
    assert not val_rule_is_settled(h(0.0, 5.0, 25.0))       # crossed, but only once
    assert not val_rule_is_settled(h(0.0, 5.0, 30.0, 24.0))  # crossed and coming back
    assert val_rule_is_settled(h(0.0, 5.0, 30.0, 40.0))     # crossed and moving away
    assert val_rule_is_settled(h(0.0, 20.0))                # on target: ties go to the earliest
    assert not val_rule_is_settled(h(0.0))


def scripted(errors):
    calls = iter([{"forget_error": e, "val_error": 20.0} for e in errors])
    return lambda m: next(calls)


@pytest.mark.parametrize("errors", [
    [0.0, 4.0, 12.0, 26.0, 35.0, 50.0, 60.0, 60.0, 61.0],
    [0.0, 30.0, 45.0, 50.0, 52.0, 55.0, 58.0, 60.0, 61.0],
    [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0],      # never reaches the target: no stop
])
def test_early_stop_selects_what_the_full_run_selects(errors):
    model, data, targets, mask = toy()
    full = finetune(model, data, targets, epochs=8, evaluate=scripted(errors), select="val",
                    seed=1, progress=False)
    early = finetune(model, data, targets, epochs=8, evaluate=scripted(errors), select="val",
                     early_stop=True, seed=1, progress=False)
    assert early.selected_epoch == full.selected_epoch == select_val(full.history)
    assert torch.equal(early.model.weight, full.model.weight)
    stopped = len(early.history) - 1
    assert early.stopped_early == (stopped < 8)
    if errors[-1] < 20.0:
        assert stopped == 8
    else:
        assert stopped <= full.selected_epoch + 2


def test_early_stop_on_a_real_trajectory():
    # Forget rows, each with a feature of its own, pulled towards a wrong class: their error rises
    # epoch by epoch through the target (50 %), and the early run must keep the full run's choice.
    g = torch.Generator().manual_seed(3)
    n, k, nf = 120, 4, 30
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.cat([torch.randn(n, k, generator=g) + 3 * nn.functional.one_hot(y, k).float(),
                   torch.zeros(n, nf)], 1)
    x[torch.arange(nf), k + torch.arange(nf)] = 4.0
    data = TensorDataset(x, y)
    model = nn.Linear(k + nf, k)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[:, :k] = 2.0 * torch.eye(k)
        model.bias.zero_()
    targets = torch.softmax(model(x), 1).detach()
    targets[:nf] = 0.1
    targets[torch.arange(nf), (y[:nf] + 1) % k] = 0.7

    def evaluate(m):
        with torch.no_grad():
            wrong = (m(x[:nf]).argmax(1) != y[:nf]).float().mean()
        return {"forget_error": 100 * float(wrong), "val_error": 50.0}

    common = dict(epochs=20, lr=0.6, momentum=0.0, batch_size=30, evaluate=evaluate, select="val", seed=2,
                  progress=False)
    full = finetune(model, data, targets, **common)
    errors = [h["forget_error"] for h in full.history]
    assert errors[0] < 50.0 < max(errors)  # the trajectory crosses the target
    early = finetune(model, data, targets, early_stop=True, **common)
    assert early.selected_epoch == full.selected_epoch
    assert early.stopped_early and len(early.history) < len(full.history) - 5
    assert torch.equal(early.model.weight, full.model.weight)


@pytest.mark.parametrize("arch,expect", [
    ("resnet18", ["layer4.1", "fc"]), ("allcnn", ["features.7", "classifier"]),
    ("smallcnn", ["features.2", "classifier"]),
])
def test_trainable_last_block_names(arch, expect):
    model = build_model(arch, 5, 3, width=0.25)
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(m)] for m in trainable_modules(model, "last-block")] == expect
    assert [names[id(m)] for m in trainable_modules(model, "head")] == [expect[-1]]


def test_trainable_head_changes_only_the_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 8, 8, generator=g)
    data = TensorDataset(x, torch.zeros(40, dtype=torch.long))
    model = build_model("smallcnn", 4, 3, width=0.25)
    targets = torch.softmax(torch.randn(40, 4, generator=g), 1)
    before = state(model)
    res = finetune(model, data, targets, epochs=2, lr=0.1, trainable="head", progress=False)
    after = state(res.model)
    head = [k for k in after if k.startswith("classifier.")]
    body = [k for k in after if not k.startswith("classifier.")]
    assert same(before, after, body), "frozen layers (and their BatchNorm statistics) must not move"
    assert not same(before, after, head)
    assert all(p.requires_grad for p in res.model.parameters())
    last = finetune(model, data, targets, epochs=2, lr=0.1, trainable="last-block", progress=False)
    moved = [k for k in body if not torch.equal(before[k], state(last.model)[k])]
    assert moved and all(k.startswith("features.2.") for k in moved)


def test_history_records_the_wall_time_of_each_epoch():
    model, data, targets, mask = toy()
    res = finetune(model, data, targets, epochs=3, evaluate=lambda m: {"forget_error": 1.0},
                   progress=False)
    walls = [h["wall_seconds"] for h in res.history]
    assert walls == sorted(walls) and walls[-1] > 0


@pytest.fixture(scope="module")
def digits(digits5_trained):
    split, _, model = digits5_trained
    return split, model


@pytest.mark.parametrize("method", ["ppu", "ppu-bias"])
def test_fast_schedule_with_full_retain_and_no_stop_reproduces_the_paper_schedule(digits, method):
    split, model = digits
    common = dict(val=split.val, epochs=3, lr=0.02, seed=7, progress=False)
    paper = ppu_fast.unlearn(model, split.forget, split.retain, method=method, schedule="paper", **common)
    fast = ppu_fast.unlearn(model, split.forget, split.retain, method=method, schedule="fast",
                            retain_fraction=1.0, early_stop=False, forget_kl=0, forget_repeats=1,
                            trainable="all", history_retain=1000, **common)
    assert same(state(paper.model), state(fast.model))
    assert paper.selected_epoch == fast.selected_epoch
    assert fast.options["schedule"] == "fast" and fast.options["retain_fraction"] == 1.0


def test_fast_schedule_is_the_default_and_records_its_plan(digits):
    split, model = digits
    res = ppu_fast.unlearn(model, split.forget, split.retain, method="ppu", val=split.val, epochs=3,
                           lr=0.02, progress=False)
    assert res.options["schedule"] == "fast"
    for key, value in SCHEDULES["fast"]["privacy"].items():
        assert res.options[key] == value
    # the selection reads forget and validation error only: no retain evaluation per epoch
    assert "retain_error" not in res.history[-1] and "val_error" in res.history[-1]
    assert res.options["epochs_run"] == len(res.history) - 1
    walls = [h["wall_seconds"] for h in res.history]
    assert walls[0] >= res.timings["probabilities"] + res.timings["refine"]


@pytest.mark.parametrize("value,match", [(-0.1, "forget_kl must be a non-negative number"),
                                         ("low", "forget_kl must be"), (True, "forget_kl must be")])
def test_forget_kl_is_checked(value, match):
    model, data, targets, mask = toy()
    with pytest.raises(ValueError, match=match):
        finetune(model, data, targets, forget_mask=mask, forget_kl=value, progress=False)
    with pytest.raises(ValueError, match="forget_kl needs forget_mask"):
        finetune(model, data, targets, forget_kl=0.1, progress=False)


def test_forget_loss_is_the_forget_rows_mean_kl():
    # lr = 0: the model does not move, so the epoch's forget loss is exactly the forget rows'
    # KL(target || model) computed directly.
    model, data, targets, mask = toy()
    res = finetune(model, data, targets, epochs=2, lr=1e-30, forget_mask=mask, forget_kl=1e-12,
                   progress=False)
    x = data.tensors[0][:10]
    with torch.no_grad():
        logq = model(x).log_softmax(1).double()
    t = targets[:10].double()
    direct = float((t * (t.log() - logq)).sum(1).mean())
    assert res.history[1]["forget_loss"] == pytest.approx(direct, rel=1e-5)
    assert len(res.history) == 3 and not res.stopped_early


def test_forget_kl_stops_at_the_first_epoch_that_reaches_it():
    model, data, targets, mask = toy()
    targets = targets.clone()
    targets[:10] = 0.25  # uniform forget rows: a linear model gets there quickly
    full = finetune(model, data, targets, epochs=30, lr=0.5, forget_mask=mask, forget_kl=1e-12, seed=3,
                    progress=False)
    losses = [h["forget_loss"] for h in full.history[1:]]
    kl = sorted(losses)[len(losses) // 2]  # reached part-way through
    first = next(e for e, v in enumerate(losses, 1) if v <= kl)
    early = finetune(model, data, targets, epochs=30, lr=0.5, forget_mask=mask, forget_kl=kl, seed=3,
                     progress=False)
    assert early.stopped_early and len(early.history) - 1 == first == early.selected_epoch
    assert [h["forget_loss"] for h in early.history[1:]] == losses[:first]


def _weights_sum(m):
    # (Not the plain sum: the softmax KL gradient of a linear model sums to zero over classes.)
    return {"w": float((m.weight.detach().double() ** 2).sum()), "forget_error": 0.0,
            "val_error": 0.0}


def test_evals_per_epoch_evaluates_between_epochs_without_changing_the_training():
    model, data, targets, mask = toy()  # 60 rows, batch 8: 8 batches per epoch
    one = finetune(model, data, targets, epochs=3, batch_size=8, evaluate=_weights_sum, seed=4,
                   progress=False)
    four = finetune(model, data, targets, epochs=3, batch_size=8, evaluate=_weights_sum,
                    evals_per_epoch=4, seed=4, progress=False)
    assert [h["epoch"] for h in one.history] == [0, 1, 2, 3]
    assert [h["epoch"] for h in four.history] == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2,
                                                  2.25, 2.5, 2.75, 3]
    # Evaluating in between draws nothing and moves nothing: the same final weights, and the same
    # weights at every whole epoch.
    assert torch.equal(one.model.weight, four.model.weight)
    whole = {h["epoch"]: h["w"] for h in four.history if float(h["epoch"]).is_integer()}
    assert whole == {h["epoch"]: h["w"] for h in one.history}
    assert four.selected_epoch == 3 and isinstance(four.selected_epoch, int)
    ws = [h["w"] for h in four.history]
    assert len(set(ws)) == len(ws)  # every point saw different weights


def test_a_fractional_epoch_can_be_selected_and_its_weights_are_returned():
    model, data, targets, mask = toy()
    pick = finetune(model, data, targets, epochs=2, batch_size=8, evaluate=_weights_sum,
                    evals_per_epoch=4, select=lambda hist: 1.25, seed=4, progress=False)
    assert pick.selected_epoch == 1.25
    recorded = [h["w"] for h in pick.history if h["epoch"] == 1.25][0]
    assert _weights_sum(pick.model)["w"] == recorded
    with pytest.raises(ValueError, match="select returned epoch 1.3; expected one of the evaluated"):
        finetune(model, data, targets, epochs=2, batch_size=8, evaluate=_weights_sum,
                 evals_per_epoch=4, select=lambda hist: 1.3, seed=4, progress=False)


def test_early_stop_between_epochs_selects_what_the_full_run_selects():
    # Scripted forget errors at quarter epochs: nearest the target (20 %) at 1.25, past it and
    # farther from it at 1.5, where the rule is settled.
    errors = [0.0, 3.0, 8.0, 14.0, 17.0, 19.0, 24.0, 30.0, 36.0, 40.0, 44.0, 47.0, 50.0]
    model, data, targets, mask = toy()
    full = finetune(model, data, targets, epochs=3, batch_size=8, evaluate=scripted(errors),
                    select="val", evals_per_epoch=4, seed=1, progress=False)
    early = finetune(model, data, targets, epochs=3, batch_size=8, evaluate=scripted(errors),
                     select="val", evals_per_epoch=4, early_stop=True, seed=1, progress=False)
    assert full.selected_epoch == early.selected_epoch == 1.25 == select_val(full.history)
    assert early.stopped_early and early.history[-1]["epoch"] == 1.5
    assert torch.equal(early.model.weight, full.model.weight)


def test_ppu_passes_evals_per_epoch_through(digits):
    split, original = digits
    res = ppu_fast.unlearn(original, split.forget, split.retain, method="ppu", val=split.val,
                           epochs=2, evals_per_epoch=2, early_stop=False, progress=False, seed=0)
    assert [h["epoch"] for h in res.history] == [0, 0.5, 1, 1.5, 2]
    assert res.options["evals_per_epoch"] == 2 and res.options["epochs_run"] == 2


def test_probe_pseudo_follows_the_classes_the_retain_rows_keep():
    """probe_pseudo: a class with no retain rows gets (almost) no probability on the forget rows,
    a class that keeps retain rows keeps its forgotten examples, and each row is a distribution."""
    from ppu_fast.unlearn.ppu import probe_pseudo
    g = torch.Generator().manual_seed(0)
    n, k = 600, 4
    y = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), y] += 5.0
    gone = y == 2  # class unlearning: every example of class 2
    q = probe_pseudo(logits, y, gone)
    assert q.shape == (int(gone.sum()), k)
    torch.testing.assert_close(q.sum(1).double(), torch.ones(q.shape[0], dtype=torch.float64))
    assert float(q[:, 2].max()) < 0.05 and float(logits[gone].softmax(1)[:, 2].min()) > 0.5
    some = gone & (torch.arange(n) % 3 == 0)  # selective: a third of class 2
    q = probe_pseudo(logits, y, some)
    assert float((q.argmax(1) == 2).float().mean()) > 0.9
    with pytest.raises(ValueError, match="needs retain rows"):
        probe_pseudo(logits, y, torch.ones(n, dtype=torch.bool))


def test_ppu_with_probe_pseudo_probabilities(digits):
    """pseudo="probe" in privacy mode: the forget rows' targets are the probe's rows (with P^'s own
    totals the refine keeps them), and the run records the name and the probe's time."""
    split, original = digits
    res = ppu_fast.unlearn(original, split.forget, split.retain, method="ppu", val=split.val,
                           epochs=2, pseudo="probe", marginals="pseudo", progress=False, seed=0)
    assert res.options["pseudo"] == "probe" and res.timings["probe"] >= 0.0
    n_forget = len(split.forget)
    from ppu_fast.metrics import predict
    from ppu_fast.unlearn.ppu import probe_pseudo
    from torch.utils.data import ConcatDataset
    logits, labels = predict(original, ConcatDataset([split.forget, split.retain]))
    mask = torch.arange(len(labels)) < n_forget
    torch.testing.assert_close(res.targets[:n_forget].float(), probe_pseudo(logits, labels, mask),
                               rtol=0, atol=1e-4)
