"""ppu_fast.unlearn: PPU (privacy and bias), the baselines and the registry, on digits5."""
import copy

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import ppu_fast
from ppu_fast.metrics import error, predict
from ppu_fast.training import TrainConfig, fit, fit_cached
from ppu_fast.unlearn import UnlearnResult, method_options, methods, register, unlearn
from conftest import same, state


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(digits5_trained):
    return digits5_trained


def test_registry_lists_the_methods():
    assert {"ppu", "ppu-bias", "ppu-random", "finetune", "retrain", "original"} <= set(methods())
    assert {"mode", "pseudo", "lam", "marginals", "epochs", "lr", "select"} <= set(method_options("ppu"))
    with pytest.raises(ValueError, match="registered twice"):
        register("ppu")(lambda *a, **k: None)


def test_package_attribute_is_callable():
    # ppu_fast.unlearn is both the subpackage and the function
    assert callable(ppu_fast.unlearn) and ppu_fast.UnlearnResult is UnlearnResult


def test_ppu_privacy_end_to_end(setup):
    split, _, model = setup
    before = state(model)
    # The paper's schedule runs every epoch and records retain error per epoch (tests/test_schedule.py
    # covers the fast default).
    res = ppu_fast.unlearn(model, split.forget, split.retain, method="ppu", val=split.val, epochs=3,
                           lr=0.02, progress=False, schedule="paper")
    assert isinstance(res, UnlearnResult) and res.method == "ppu"
    assert same(before, state(model)), "the caller's model must not change"
    assert res.model is not model
    # targets are the solver's refinement of the original probabilities (forget rows first)
    logits, _ = predict(model, torch.utils.data.ConcatDataset([split.forget, split.retain]))
    mask = torch.zeros(500, dtype=torch.bool)
    mask[:25] = True
    expected = ppu_fast.refine(torch.softmax(logits, 1), mask)
    assert res.targets.shape == (500, 5)
    assert torch.allclose(res.targets, expected, atol=1e-5)
    assert res.refine_info is not None and res.refine_info.converged
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert {"loss", "forget_error", "retain_error", "val_error"} <= set(res.history[1])
    # default selection with a val set in privacy mode: SCRUB+R's rule
    gaps = {h["epoch"]: abs(h["forget_error"] - h["val_error"]) for h in res.history[1:]}
    assert gaps[res.selected_epoch] == min(gaps.values())
    assert error(res.model, split.forget) == pytest.approx(res.history[res.selected_epoch]["forget_error"])
    assert {"probabilities", "refine", "finetune", "total"} <= set(res.timings)


def test_ppu_without_val_keeps_last_epoch(setup):
    split, _, model = setup
    res = unlearn(model, split.forget, split.retain, epochs=2, progress=False)
    assert res.selected_epoch == 2 and "val_error" not in res.history[0]


def test_ppu_bias_targets_are_p_hat(setup):
    split, _, model = setup
    res = unlearn(model, split.forget, split.retain, method="ppu-bias", epochs=1, progress=False)
    logits, _ = predict(model, split.retain)
    assert torch.allclose(res.targets[:25], torch.full((25, 5), 0.2))
    assert torch.allclose(res.targets[25:], torch.softmax(logits, 1), atol=1e-6)
    assert res.refine_info is None


def test_ppu_history_only_when_selection_needs_it(setup):
    # Keeping the last epoch needs no per-epoch evaluation, and that evaluation counts as
    # unlearning time: bias mode skips it unless asked, privacy mode with val must keep it.
    split, _, model = setup
    quiet = unlearn(model, split.forget, split.retain, method="ppu-bias", val=split.val, epochs=2,
                    progress=False)
    assert [set(h) for h in quiet.history] == [{"epoch", "loss", "wall_seconds"}] * 3
    asked = unlearn(model, split.forget, split.retain, method="ppu-bias", val=split.val, epochs=2,
                    history=True, progress=False)
    assert {"forget_error", "retain_error", "val_error"} <= set(asked.history[2])
    assert same(state(quiet.model), state(asked.model)), "evaluating must not change the training"
    with pytest.raises(ValueError, match="history=False with select='val'"):
        unlearn(model, split.forget, split.retain, method="ppu", val=split.val, epochs=1, history=False,
                progress=False)


def test_ppu_random_is_seeded(setup):
    split, _, model = setup
    a = unlearn(model, split.forget, split.retain, method="ppu-random", epochs=1, seed=3, progress=False)
    b = unlearn(model, split.forget, split.retain, method="ppu-random", epochs=1, seed=3, progress=False)
    c = unlearn(model, split.forget, split.retain, method="ppu-random", epochs=1, seed=4, progress=False)
    assert torch.equal(a.targets, b.targets) and not torch.equal(a.targets[:25], c.targets[:25])
    assert torch.allclose(a.targets[:25].sum(1), torch.ones(25)) and a.targets[:25].std() > 0.01
    assert same(state(a.model), state(b.model))


def test_bias_mode_raises_forget_error_more_than_finetune(setup):
    # The paper's bias-removal claim, measured: fitting uniform targets on the forget rows moves
    # their predictions away from the label, plain fine-tuning on the retain set does not.
    split, _, model = setup
    bias = unlearn(model, split.forget, split.retain, method="ppu-bias", epochs=30, lr=0.05, progress=False)
    ft = unlearn(model, split.forget, split.retain, method="finetune", epochs=5, progress=False)
    p_bias = torch.softmax(predict(bias.model, split.forget)[0], 1)[:, 0].mean()
    p_ft = torch.softmax(predict(ft.model, split.forget)[0], 1)[:, 0].mean()
    assert p_bias < p_ft - 0.2
    assert error(bias.model, split.retain) < 5


def test_inplace_modifies_the_callers_model(setup):
    split, _, model = setup
    mine = copy.deepcopy(model)
    before = state(mine)
    res = unlearn(mine, split.forget, split.retain, epochs=1, inplace=True, progress=False)
    assert res.model is mine and not same(before, state(mine))


def test_baselines(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path))
    split, init, model = setup
    before = state(model)
    orig = unlearn(model, split.forget, split.retain, method="original", progress=False)
    assert orig.model is not model and same(before, state(orig.model))
    ft = unlearn(model, split.forget, split.retain, method="finetune", epochs=1, progress=False)
    assert not same(before, state(ft.model)) and same(before, state(model))
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=64)
    r1 = unlearn(model, split.forget, split.retain, method="retrain", config=cfg, init=init, progress=False)
    r2 = unlearn(model, split.forget, split.retain, method="retrain", config=cfg, init=init, progress=False)
    assert r1.options["cached"] is False and r2.options["cached"] is True
    assert same(state(r1.model), state(r2.model))
    assert r2.timings["train"] == pytest.approx(r1.timings["train"])
    assert len(list((tmp_path / "models").glob("*.pt"))) == 1
    # retraining really starts from scratch on the retain set only
    direct = fit(copy.deepcopy(init), split.retain, cfg, progress=False)
    assert same(state(direct), state(r1.model))


def test_cache_key_changes_with_data_and_config(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path))
    split, init, _ = setup
    cfg = TrainConfig(epochs=1, batch_size=128)
    _, m1 = fit_cached(init, split.retain, cfg, progress=False)
    _, m2 = fit_cached(init, split.train, cfg, progress=False)
    _, m3 = fit_cached(init, split.retain, TrainConfig(epochs=1, batch_size=128, lr=0.01), progress=False)
    _, m4 = fit_cached(init, split.retain, cfg, progress=False)
    assert len({m1["path"], m2["path"], m3["path"]}) == 3 and m4["cached"] and m4["path"] == m1["path"]


def test_cache_key_covers_the_device_type(setup):
    # A GPU-trained model (and its GPU train_seconds) is not served to a CPU run, nor the reverse.
    from ppu_fast.training import cache_key
    split, init, _ = setup
    cfg = TrainConfig(epochs=1, batch_size=128)
    cpu = cache_key(init, split.retain, cfg)
    assert cache_key(init, split.retain, cfg, "cpu") == cpu
    assert cache_key(init, split.retain, cfg, torch.device("cpu")) == cpu
    assert cache_key(init, split.retain, cfg, "cuda") != cpu
    assert cache_key(init, split.retain, cfg, "cuda:1") == cache_key(init, split.retain, cfg, "cuda")


def test_cache_key_covers_the_cpu_thread_count(setup):
    # fit's weights depend on torch's thread count on the CPU (the demo's small CNN, 3 epochs of
    # digits: three different models at 1, 2 and 3 threads), and a model trained at one count was
    # served to runs at another. One thread keeps the keys it had (the demo's cache).
    from ppu_fast.training import cache_key
    split, init, _ = setup
    cfg = TrainConfig(epochs=1, batch_size=128)
    before = torch.get_num_threads()
    try:
        keys = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            keys[n] = (cache_key(init, split.retain, cfg), cache_key(init, split.retain, cfg, "cuda"))
    finally:
        torch.set_num_threads(before)
    assert len({keys[n][0] for n in keys}) == 3
    assert len({keys[n][1] for n in keys}) == 1  # a GPU's result does not depend on them


def test_cache_dir_resolution(monkeypatch, tmp_path):
    from ppu_fast.training import cache_dir
    monkeypatch.delenv("PPU_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "ppu_fast"
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_bad_input(setup):
    split, _, model = setup
    empty = Subset(split.train, [])
    with pytest.raises(ValueError, match="unknown unlearning method 'forget-all'"):
        unlearn(model, split.forget, split.retain, method="forget-all")
    with pytest.raises(TypeError, match="unknown option.*epoch\\b"):
        unlearn(model, split.forget, split.retain, epoch=3)
    with pytest.raises(ValueError, match="forget is empty"):
        unlearn(model, empty, split.retain)
    with pytest.raises(ValueError, match="retain is empty"):
        unlearn(model, split.forget, empty)
    overlapping = Subset(split.train, split.retain_idx[:10].tolist())
    with pytest.raises(ValueError, match="overlap"):
        unlearn(model, overlapping, split.retain)
    with pytest.raises(TypeError, match="model must be"):
        unlearn("model", split.forget, split.retain)
    with pytest.raises(TypeError, match="forget must be"):
        unlearn(model, [1, 2, 3], split.retain)
    with pytest.raises(ValueError, match="mode"):
        unlearn(model, split.forget, split.retain, mode="fast")
    with pytest.raises(ValueError, match="pseudo"):
        unlearn(model, split.forget, split.retain, mode="bias", pseudo="gaussian")
    with pytest.raises(ValueError, match="needs a validation set"):
        unlearn(model, split.forget, split.retain, select="val")
    no_zeros = Subset(split.val, [i for i in range(len(split.val)) if int(split.val.targets[i]) != 0])
    with pytest.raises(ValueError, match="forget classes"):
        unlearn(model, split.forget, split.retain, val=no_zeros)


def test_accepts_loaders_and_tensor_datasets(setup):
    split, _, model = setup
    x = torch.stack([split.train[i][0] for i in range(60)])
    y = split.train.targets[:60]
    forget = torch.utils.data.DataLoader(TensorDataset(x[:10], y[:10]), batch_size=4)
    res = unlearn(model, forget, TensorDataset(x[10:], y[10:]), method="ppu", epochs=1, progress=False)
    assert res.targets.shape == (60, 5)
