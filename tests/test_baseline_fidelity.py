"""The baselines run as SCRUB's code (github.com/meghdadk/SCRUB) runs them (issue 13).

A table, one row per (method, setting, option): the value that SCRUB's code uses and the file / cell
it comes from. Each method is run once per setting on a few digits with its defaults, and the options
it reports having used (``UnlearnResult.options``) must equal the table. Behavioural tests follow for
what options alone cannot show: the L2 pull, the train / eval mode, SCRUB+R's rewinding rule, EU-k's
copy of the initial weights and the CF-k / EU-k schedule."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Subset

from ppu_fast.data import dataset_targets, make_split
from ppu_fast.models import build_model
from ppu_fast.unlearn import method_options, unlearn
from ppu_fast.unlearn import scrub as scrub_module
from ppu_fast.unlearn._loop import fk_lr, l2_pull
from ppu_fast.unlearn.eu_k import copy_initial, default_reset
from ppu_fast.unlearn.scrub import scrub_rewind
from conftest import same, state

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_NB = "small_scale_unlearning.ipynb"
LARGE_NB = "large_scale_unlearning.ipynb"
BADT_NB = "BadT_experiments.ipynb"
MIA_NB = "MIA_experiments.ipynb"
HELPER = (f"{SMALL_NB} 'Finetune and Fisher Helper' (finetune / negative_grad / fk_fientune, "
          f"run_train_epoch, l2_penalty)")
LARGE = ("selective", "class")

# (method, settings, {option: SCRUB's value}, source)
TABLE = [
    ("finetune", ("small",),
     {"epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.1,
      "batch_size": 128, "mode": "eval"},
     f"{SMALL_NB} 'Finetune' + {HELPER}; wd 0.1 and batch 128 from 'Train the original model'"),
    ("finetune", ("class",),
     {"epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.0,
      "batch_size": 128, "mode": "train"},
     f"{LARGE_NB} finetune (loops.py train_vanilla) + 'Finetune'"),
    ("finetune", ("selective",),
     {"epochs": 10, "lr": 0.04, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.0,
      "batch_size": 32, "mode": "train"},
     f"{MIA_NB} per-seed cell (ft_lr 0.04, ft_epochs 10, retain_bs 32) + finetune (train_vanilla)"),
    ("neggrad+", ("small",),
     {"alpha": 0.95, "epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.1,
      "batch_size": 128, "forget_batch_size": 64, "mode": "eval"},
     f"{SMALL_NB} 'Negative Gradient' + {HELPER} (run_neggrad_epoch); forget_bs in 'Data Loader'"),
    ("neggrad+", ("class",),
     {"alpha": 0.9999, "epochs": 5, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.0,
      "batch_size": 128, "forget_batch_size": 512, "mode": "train"},
     f"{BADT_NB} per-seed cell (ng_*, retain_bs, forget_bs) + negative_grad (loops.py train_negrad)"),
    ("neggrad+", ("selective",),
     {"alpha": 0.9999, "epochs": 5, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.0,
      "batch_size": 32, "forget_batch_size": 16, "mode": "train"},
     f"{MIA_NB} per-seed cell (ng_*, retain_bs 32, forget_bs 16) + negative_grad (train_negrad)"),
    ("cf-k", ("small",),
     {"epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.1,
      "batch_size": 128, "mode": "eval", "lr_milestones": [10, 15, 20], "lr_decay": 0.1,
      "lr_decayed_base": 5e-4, "layers": ["features.2"]},
     f"{SMALL_NB} 'Catastrophic Forgetting k layers' + {HELPER}"),
    ("cf-k", LARGE,
     {"epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.0,
      "batch_size": 64, "mode": "train-all", "lr_milestones": [10, 15, 20], "lr_decay": 0.1,
      "lr_decayed_base": 0.01},
     f"{MIA_NB} / {BADT_NB} cfk_unlearn + fk_fientune (loops.py train_vanilla); decayed base: "
     f"args.sgda_learning_rate as main_merged.py parses it (0.01) before scrub() sets 5e-4"),
    ("eu-k", ("small",),
     {"epochs": 30, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.1,
      "batch_size": 128, "mode": "eval", "lr_milestones": [10, 15, 20], "lr_decay": 0.1,
      "lr_decayed_base": 5e-4, "layers": ["features.2"], "reset": ["features.2", "classifier"],
      "init": "given"},
     f"{SMALL_NB} 'Exact Unlearning k layers' (euk_epochs = training_epochs = 30) + {HELPER}"),
    ("eu-k", LARGE,
     {"epochs": 25, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.0,
      "batch_size": 64, "mode": "train-all", "lr_milestones": [10, 15, 20], "lr_decay": 0.1,
      "lr_decayed_base": 0.01, "reset": ["features.2", "classifier"], "init": "given"},
     f"{MIA_NB} / {BADT_NB} euk_unlearn (training_epochs = 25, euk_bs 64) + fk_fientune "
     f"(train_vanilla); decayed base as CF-k's"),
    ("fisher", ("small",), {"alpha": 1e-6}, f"{SMALL_NB} 'Fisher Noise in Weights' (alpha = 1e-6)"),
    ("fisher", LARGE, {"alpha": 1e-7}, f"{LARGE_NB} 'Fisher' noise cell (alpha = 1e-7)"),
    ("bad-t", ("small",) + LARGE,
     {"variant": "scrub", "optimizer": "adam", "epochs": 1, "lr": 1e-3, "weight_decay": 5e-4,
      "temperature": 4.0, "alpha": 1.0, "beta": 1.0, "batch_size": 128, "forget_batch_size": 512,
      "retain_fraction": 1.0, "mode": "train"},
     f"{BADT_NB} badt (bt_*) + per-seed cell (retain_bs 128, forget_bs 512) + loops.py train_bad_teacher"),
    ("scrub", ("small",),
     {"optimizer": "adam", "lr": 5e-4, "epochs": 10, "msteps": 3, "temperature": 2.0, "gamma": 1.0,
      "alpha": 0.5, "lr_milestones": [5, 8, 9], "lr_decay": 0.1, "weight_decay": 0.1,
      "batch_size": 32, "forget_batch_size": 64},
     f"{SMALL_NB} 'SCRUB Forgetting' (args.*) + 'Data Loader' (retain_bs 32, forget_bs 64)"),
    ("scrub", ("class",),
     {"optimizer": "sgd", "lr": 5e-4, "epochs": 3, "msteps": 2, "temperature": 4.0, "gamma": 0.99,
      "alpha": 0.001, "lr_milestones": [3, 5, 9], "lr_decay": 0.1, "weight_decay": 5e-4,
      "batch_size": 256, "forget_batch_size": 512},
     f"{LARGE_NB} 'SCRUB Forgetting' (args.*) + 'Data Loader' (retain 256, forget 512)"),
    ("scrub", ("selective",),
     {"optimizer": "sgd", "lr": 5e-4, "epochs": 5, "msteps": 3, "temperature": 4.0, "gamma": 1.0,
      "alpha": 0.5, "lr_milestones": [3, 5, 9], "lr_decay": 0.1, "weight_decay": 5e-4,
      "batch_size": 32, "forget_batch_size": 16},
     f"{MIA_NB} scrub(teacher, student) (args.*) + per-seed cell (retain_bs 32, forget_bs 16)"),
    ("scrub+r", ("small", "class"), {"rewind": "first-above", "select": "val"},
     f"{BADT_NB} scrub(teacher, student): selected_idx = first epoch above the final val error"),
    ("scrub+r", ("selective",), {"rewind": "closest-final", "select": "val",
                                 "batch_size": 32, "forget_batch_size": 16, "epochs": 5},
     f"{MIA_NB} scrub(teacher, student): selected_idx = epoch closest to the final val error"),
    ("scrub+r", ("class",), {"batch_size": 128, "forget_batch_size": 512, "epochs": 3, "msteps": 2},
     f"{BADT_NB} scrub(teacher, student) on the per-seed cell's loaders (retain_bs 128, forget_bs 512)"),
    ("ntk", ("small",), {"weight_decay": 0.1, "loss": "ce", "scale_rule": "predicted", "init": "given"},
     f"{SMALL_NB} 'NTK based Forgetting' (delta_w_utils, w_lin(D) / w_lin(D_r) with args.weight_decay "
     f"0.1 from 'Train the original model', 'Trapezium Trick' scale from init_checkpoint)"),
]
ROWS = [(method, setting, option, value, source)
        for method, settings, values, source in TABLE for setting in settings
        for option, value in values.items()]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    split = make_split("digits5", seed=0)
    forget = Subset(split.forget, list(range(6)))
    retain = Subset(split.retain, list(range(0, len(split.retain), 12)))
    torch.manual_seed(0)
    init = build_model("smallcnn", 5, 1, width=0.25)
    model = copy.deepcopy(init)
    # a few SGD steps, so that the model differs from its initial weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in torch.utils.data.DataLoader(split.train, batch_size=64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return split, forget, retain, init, model.eval()


@pytest.fixture(scope="module")
def used(tiny):
    """``UnlearnResult.options`` of each method at each setting, its defaults otherwise."""
    split, forget, retain, init, model = tiny
    cache: dict = {}

    def get(method: str, setting: str) -> dict:
        if (method, setting) not in cache:
            extra = {"init": init} if method in ("eu-k", "ntk") else {}
            if "setting" in method_options(method):
                extra["setting"] = setting
            keep = retain
            if method == "fisher" and setting == "class":
                # Fisher's class setting needs a whole class forgotten (it zeroes that class's
                # classifier row): retain without the forget set's class.
                gone = set(dataset_targets(forget).tolist())
                keep = Subset(retain, [i for i in range(len(retain)) if int(retain[i][1]) not in gone])
            res = unlearn(model, forget, keep, method=method, val=split.val, seed=0, progress=False,
                          **extra)
            cache[method, setting] = res.options
        return cache[method, setting]

    return get


@pytest.mark.parametrize("method,setting,option,value,source", ROWS,
                         ids=[f"{m}-{s}-{o}" for m, s, o, _, _ in ROWS])
def test_option_equals_scrubs(used, method, setting, option, value, source):
    got = used(method, setting)
    assert option in got, f"{method} does not report {option!r} (SCRUB: {value}, {source})"
    assert got[option] == value, \
        f"{method} [{setting}] {option} = {got[option]!r}, SCRUB's {value!r} ({source})"


def test_every_baseline_has_rows():
    assert {m for m, *_ in TABLE} == {"finetune", "neggrad+", "cf-k", "eu-k", "fisher", "bad-t", "scrub",
                                      "scrub+r", "ntk"}


# ------------------------------------------------------------------------------------------ L2 pull
def test_l2_pull_is_zero_at_the_start_and_grows_away(tiny):
    *_, model = tiny
    work = copy.deepcopy(model)
    for p in work.features.parameters():
        p.requires_grad_(False)
    pull = l2_pull(work, 0.1)
    assert float(pull(work).detach()) == 0.0
    step = {}
    for scale in (0.01, 0.1):
        moved = copy.deepcopy(work)
        with torch.no_grad():
            for p in moved.parameters():
                p.add_(scale)
        n_trainable = sum(p.numel() for p in work.classifier.parameters())
        step[scale] = float(pull(moved).detach())
        # SCRUB's l2_penalty: wd / 2 * sum of squares, over the trainable parameters only
        assert step[scale] == pytest.approx(0.1 / 2 * scale ** 2 * n_trainable, rel=1e-4)
    assert step[0.1] > step[0.01] > 0
    assert float(l2_pull(work, 0.0)(moved).detach()) == 0.0


def test_small_scale_finetune_is_pulled_back(tiny):
    split, forget, retain, _, model = tiny
    far = {}
    for pull in (0.0, 10.0):
        res = unlearn(model, forget, retain, method="finetune", setting="small", epochs=3, lr=0.05,
                      l2_pull=pull, progress=False)
        far[pull] = sum(float((a - b).detach().pow(2).sum()) for a, b in
                        zip(res.model.parameters(), model.parameters()))
    assert far[10.0] < 0.5 * far[0.0]


# --------------------------------------------------------------------------------- train / eval mode
def running_stats(model) -> dict:
    return {k: v for k, v in state(model).items() if "running" in k}


def test_small_scale_runs_in_eval_mode_large_in_train_mode(tiny):
    _, forget, retain, _, model = tiny
    small = unlearn(model, forget, retain, method="finetune", setting="small", epochs=1, progress=False)
    large = unlearn(model, forget, retain, method="finetune", setting="class", epochs=1, progress=False)
    before = running_stats(model)
    # eval mode (SCRUB's run_train_epoch): BatchNorm statistics stay; train mode: they move
    assert same(before, running_stats(small.model))
    assert not same(before, running_stats(large.model))


def test_large_scale_cf_k_moves_frozen_batchnorm_statistics_as_scrubs_train_vanilla(tiny):
    _, forget, retain, _, model = tiny
    outside = [k for k in running_stats(model) if not k.startswith("features.2.")]
    scrub_way = unlearn(model, forget, retain, method="cf-k", setting="class", epochs=1, progress=False)
    frozen = unlearn(model, forget, retain, method="cf-k", setting="class", epochs=1, mode="train",
                     progress=False)
    assert not same(state(model), state(scrub_way.model), outside)
    assert same(state(model), state(frozen.model), outside)


# ------------------------------------------------------------------------------------------ SCRUB+R
def rows(forget, val):
    return [{"epoch": e, "forget_error": f, "val_error": v} for e, (f, v) in enumerate(zip(forget, val))]


def test_scrub_r_rule_compares_with_the_final_models_validation_error():
    # the final model's forget-class validation error (20) is the bar for every epoch
    assert scrub_rewind(rows([5, 10, 25, 40], [90, 90, 90, 20])) == 2
    # epoch 0 (the original) is a candidate
    assert scrub_rewind(rows([30, 10, 25, 40], [0, 0, 0, 20])) == 0
    # none exceeds the bar: the last epoch; equal is not above
    assert scrub_rewind(rows([5, 10, 20], [0, 0, 20])) == 2
    with pytest.raises(ValueError, match="val_error"):
        scrub_rewind([{"epoch": 0, "forget_error": 1.0}])


def test_scrub_r_selective_rule_is_the_closest_to_the_final_validation_error():
    # MIA_experiments.ipynb: min(enumerate(acc_fs), key=abs(x - acc_fvs[-1])), epoch 0 included
    assert scrub_rewind(rows([0, 2, 12, 30, 45, 50], [0] * 5 + [20]), "closest-final") == 2
    assert scrub_rewind(rows([0, 2, 12, 30, 45, 50], [0] * 5 + [20]), "first-above") == 3
    assert scrub_rewind(rows([19, 10, 21, 40], [0, 0, 0, 20]), "closest-final") == 0  # tie: earliest
    with pytest.raises(ValueError, match="rule must be"):
        scrub_rewind(rows([1], [1]), "closest")


def test_scrub_r_rewound_to_epoch_0_is_the_original(tiny, monkeypatch):
    split, forget, retain, _, model = tiny
    res = unlearn(model, forget, retain, method="scrub+r", val=split.val, setting="small", epochs=2,
                  msteps=1, progress=False)
    assert res.selected_epoch == scrub_rewind(res.history, res.options["rewind"])
    monkeypatch.setattr(scrub_module, "scrub_rewind", lambda history, rule: 0)
    back = unlearn(model, forget, retain, method="scrub+r", val=split.val, setting="small", epochs=2,
                   msteps=1, progress=False)
    assert back.selected_epoch == 0 and same(state(model), state(back.model))


# --------------------------------------------------------------------------------------------- EU-k
def test_eu_k_copies_the_initial_weights_of_the_block_and_classifier(tiny):
    _, forget, retain, init, model = tiny
    work = copy.deepcopy(model)
    names = default_reset(work)
    assert names == ["features.2", "classifier"]
    copy_initial(work, init.state_dict(), names)
    after, start, first = state(work), state(model), state(init)
    for k in after:
        if any(k.startswith(n + ".") for n in names) and "running" not in k and "num_batches" not in k:
            assert torch.equal(after[k], first[k]), k
        else:
            # everything else, BatchNorm statistics included (SCRUB copies weight and bias only)
            assert torch.equal(after[k], start[k]), k
    # a run: the classifier keeps its initial weights (SCRUB trains the block alone). seed=3: the
    # fallback without init (a fresh draw under the seed) would equal init at seed 0
    res = unlearn(model, forget, retain, method="eu-k", init=init, setting="small", epochs=1,
                  seed=3, progress=False)
    assert same(first, state(res.model), ["classifier.weight", "classifier.bias"])
    with pytest.raises(ValueError, match="same architecture"):
        unlearn(model, forget, retain, method="eu-k", init=build_model("smallcnn", 5, 1, width=0.5),
                epochs=1, progress=False)


def test_fk_schedule_is_scrubs_adjust_learning_rate():
    # SCRUB's loop is 0-based, its decay base args.sgda_learning_rate = 5e-4 at small scale (at large
    # scale 0.01, main_merged.py's default: the lr itself, as decayed_base=None below)
    lr = fk_lr(0.01, [10, 15, 20], 0.1, 5e-4)
    got = [lr(e) for e in range(1, 31)]
    assert got[:11] == [0.01] * 11
    assert got[11:16] == pytest.approx([5e-5] * 5)
    assert got[16:21] == pytest.approx([5e-6] * 5)
    assert got[21:] == pytest.approx([5e-7] * 9)
    assert fk_lr(0.01, [10, 15, 20], 0.1, None)(12) == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------------- Fisher
def test_fisher_variance_is_scrubs_get_mean_var():
    from ppu_fast.unlearn.fisher import mean_var

    alpha = 1e-6
    # a kernel (2 output rows): 1 / F capped at 1e3, then averaged over the input dimension
    p = torch.ones(2, 3)
    F = torch.tensor([[1e-9, 1e-2, 1.0], [1e-1, 1e-1, 1e-1]])
    mu, var = mean_var(p, F, alpha=alpha, is_head=False)
    row0 = alpha * (1e3 + 1 / (1e-2 + 1e-8) + 1 / (1 + 1e-8)) / 3
    row1 = alpha / (1e-1 + 1e-8)
    assert torch.equal(mu, p)
    assert torch.allclose(var, torch.tensor([[row0] * 3, [row1] * 3]), rtol=1e-5)
    # 1-D parameters (BatchNorm, biases): times 10
    _, var1 = mean_var(torch.ones(2), torch.tensor([1e-9, 1.0]), alpha=alpha, is_head=False)
    assert torch.allclose(var1, torch.tensor([10 * alpha * 1e3, 10 * alpha / (1 + 1e-8)]), rtol=1e-5)
    # the classifier: cap 1e2, times 10; forgotten class rows: mean 0, variance 1e-4 times 10
    mu_h, var_h = mean_var(torch.ones(3, 2), torch.full((3, 2), 1e-9), alpha=alpha, is_head=True,
                           forget_rows=[1])
    assert torch.allclose(var_h[0], torch.full((2,), 10 * alpha * 1e2), rtol=1e-5)
    assert torch.equal(mu_h[1], torch.zeros(2)) and torch.allclose(var_h[1], torch.full((2,), 1e-3))


def test_fisher_reports_the_share_of_capped_weights(tiny):
    _, forget, retain, _, model = tiny
    from ppu_fast.unlearn.fisher import diagonal_fisher

    res = unlearn(model, forget, retain, method="fisher", setting="small", progress=False)
    fisher = diagonal_fisher(copy.deepcopy(model), retain, device=torch.device("cpu"))
    cap = {k: (1e-2 if k.startswith("classifier.") else 1e-3) for k in fisher}
    capped = sum(int((f + 1e-8 <= cap[k]).sum()) for k, f in fisher.items())
    total = sum(f.numel() for f in fisher.values())
    assert 0 < capped < total
    assert res.options["capped_fraction"] == pytest.approx(capped / total)


def test_results_record_the_rewinding_rule_that_ran():
    from ppu_fast.unlearn.experiment import options_record

    # rewind="scrub" is an alias resolved per setting: the record names the rule that ran
    assert options_record("scrub+r", {"rewind": "scrub"}, {"rewind": "closest-final"})["rewind"] \
        == "closest-final"
    assert options_record("scrub+r", {}, {"rewind": "first-above"})["rewind"] == "first-above"
    # plain SCRUB uses no rule and records its default, as before the rules had names
    assert options_record("scrub", {}, {})["rewind"] == "scrub"
