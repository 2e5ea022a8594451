"""An outside caller's misuses of the unlearning front end (``ppu_fast.unlearn``, ``ppu_fast.finetune``,
``ppu-fast run``), each of which used to give a silent wrong answer, change the caller's state or
end in an unclear error. Tiny: digits 0-4, a 64-32-5 MLP with BatchNorm, 1-2 epochs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset

import ppu_fast
from conftest import ItemsDataset
from ppu_fast.metrics import error

K = 5


@pytest.fixture(scope="module")
def tiny():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)[: 400] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)[: 400] % K
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, K))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(10):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    model.eval()
    fm = torch.zeros(len(y), dtype=torch.bool)
    fm[torch.nonzero(y == 0).view(-1)[:15]] = True
    return model, x, y, fm


def _sets(tiny):
    model, x, y, fm = tiny
    return model, TensorDataset(x[fm], y[fm]), TensorDataset(x[~fm], y[~fm])


def test_a_loader_stands_for_the_examples_its_sampler_visits(tiny):
    model, x, y, fm = tiny
    full = TensorDataset(x, y)
    fi, ri = torch.nonzero(fm).view(-1).tolist(), torch.nonzero(~fm).view(-1).tolist()
    res = ppu_fast.unlearn(model, DataLoader(full, batch_size=8, sampler=SubsetRandomSampler(fi)),
                           DataLoader(full, batch_size=8, sampler=SubsetRandomSampler(ri)),
                           method="ppu-bias", epochs=1, progress=False)
    assert res.targets.shape[0] == len(full)  # 15 forget + 385 retain rows, not 400 + 400
    assert torch.allclose(res.targets[:len(fi)], torch.full((len(fi), K), 1.0 / K))
    # the same rows through a plain Subset give the same targets
    ref = ppu_fast.unlearn(model, TensorDataset(x[fm], y[fm]), TensorDataset(x[~fm], y[~fm]),
                           method="ppu-bias", epochs=1, progress=False)
    torch.testing.assert_close(res.targets, ref.targets)
    # overlapping samplers over one dataset are caught like overlapping Subsets
    with pytest.raises(ValueError, match="overlap"):
        ppu_fast.unlearn(model, DataLoader(full, sampler=SubsetRandomSampler(fi)),
                         DataLoader(full, sampler=SubsetRandomSampler(fi[:3] + ri)),
                         method="ppu-bias", epochs=1, progress=False)
    with pytest.raises(ValueError, match="same dataset"):
        ppu_fast.unlearn(model, full, full, method="ppu-bias", epochs=1, progress=False)
    with pytest.raises(ValueError, match="forget is a Subset of retain itself"):
        ppu_fast.unlearn(model, torch.utils.data.Subset(full, fi), DataLoader(full, shuffle=True),
                         method="ppu-bias", epochs=1, progress=False)
    # a loader's drop_last drops batches of its own iteration, not examples of the set
    dropping = ppu_fast.unlearn(model, DataLoader(full, batch_size=4, drop_last=True,
                                                  sampler=SubsetRandomSampler(fi)),
                                DataLoader(full, batch_size=8, sampler=SubsetRandomSampler(ri)),
                                method="ppu-bias", epochs=1, progress=False)
    torch.testing.assert_close(dropping.targets, ref.targets)
    with pytest.raises(ValueError, match="collate_fn"):
        ppu_fast.unlearn(model, DataLoader(full, collate_fn=lambda b: b), full,
                         method="ppu-bias", epochs=1, progress=False)
    drawn_twice = torch.utils.data.WeightedRandomSampler(torch.ones(len(fi)), 50)
    with pytest.raises(ValueError, match="distinct|draws more than the dataset"):
        ppu_fast.unlearn(model, DataLoader(TensorDataset(x[fm], y[fm]), sampler=drawn_twice),
                         TensorDataset(x[~fm], y[~fm]), method="ppu-bias", epochs=1, progress=False)


@pytest.mark.parametrize("method,opts", [("finetune", {"lr": 1e3}),
                                         ("ppu", {"lr": 1e4, "epochs": 2}),
                                         ("neggrad+", {"lr": 1e4})])
def test_a_diverged_run_raises_instead_of_returning_nan_weights(tiny, method, opts):
    model, forget, retain = _sets(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=re.escape(f"method='{method}'") + ".*diverged.*lr="):
        ppu_fast.unlearn(model, forget, retain, method=method, progress=False, **opts)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_diverged_running_statistics_count_too(tiny):
    model, forget, retain = _sets(tiny)
    with pytest.raises(FloatingPointError, match="weights and buffer values"):
        ppu_fast.unlearn(model, forget, retain, method="ppu-bias", lr=1e5, epochs=2,
                         progress=False)


@pytest.mark.parametrize("method,opt,value", [("ppu", "lr", float("inf")),
                                              ("ppu", "momentum", float("nan")),
                                              ("scrub", "gamma", float("nan")),
                                              ("bad-t", "alpha", float("nan")),
                                              ("fisher", "alpha", float("inf"))])
def test_non_finite_options_are_refused_by_name(tiny, method, opt, value):
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match=f"{opt}=(nan|inf); expected a finite number"):
        ppu_fast.unlearn(model, forget, retain, method=method, progress=False, **{opt: value})


def test_momentum_and_weight_decay_checked_and_integers_not_truncated(tiny):
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match="momentum"):
        ppu_fast.unlearn(model, forget, retain, method="ppu", momentum=5.0, progress=False)
    with pytest.raises(ValueError, match="weight_decay"):
        ppu_fast.unlearn(model, forget, retain, method="ppu", weight_decay=-1.0, progress=False)
    with pytest.raises(ValueError, match=r"epochs=2.9; expected an integer"):
        ppu_fast.unlearn(model, forget, retain, method="finetune", epochs=2.9, progress=False)
    with pytest.raises(ValueError, match=r"batch_size=64.9; expected an integer"):
        ppu_fast.unlearn(model, forget, retain, method="finetune", batch_size=64.9, progress=False)


@pytest.mark.parametrize("method,opt,value,expected", [
    ("scrub", "gamma", "0.1", "a number"), ("finetune", "lr", True, "a number"),
    ("finetune", "l2_pull", True, "a number"), ("bad-t", "alpha", "1", "a number"),
    ("ppu", "history", "no", "True or False")])
def test_options_of_another_type_are_refused_by_name(tiny, method, opt, value, expected):
    """float() read True as 1.0 and "0.1" as 0.1, and "no" is a truthy history (a runner hunt's
    finds); refused before anything runs."""
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match=rf"{opt}={value!r}; expected {expected}"):
        ppu_fast.unlearn(model, forget, retain, method=method, progress=False, **{opt: value})


@pytest.mark.parametrize("method", ["ppu", "ppu-bias", "ppu-random"])
@pytest.mark.parametrize("value", [2.5, "3", "nope", -1])
def test_history_retain_must_be_a_count_none_or_auto(tiny, method, value):
    """The bias modes took 2.5, "3" and "nope" as they came (a runner hunt's find)."""
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match=r"history_retain must be an int >= 0, None or 'auto'"):
        ppu_fast.unlearn(model, forget, retain, method=method, history_retain=value, progress=False)


@pytest.mark.parametrize("method,opt,value,message", [
    ("scrub", "lr_milestones", [2.5], r"lr_milestones: 2.5 is not an epoch"),
    ("scrub", "lr_milestones", [-1], r"lr_milestones: -1 is not an epoch"),
    ("scrub", "lr_decay", -1.0, r"lr_decay must be a positive finite number, got -1.0"),
    ("scrub", "gamma", -1.0, r"gamma must be >= 0 \(a loss weight\), got -1.0"),
    ("scrub", "alpha", -0.5, r"alpha must be >= 0 \(a loss weight\), got -0.5"),
    ("bad-t", "beta", -1.0, r"beta must be >= 0 \(a loss weight\), got -1.0")])
def test_learning_rate_schedules_and_loss_weights_are_checked(tiny, method, opt, value, message):
    """2.5 was cut to epoch 2, -1 decayed from the start, a negative decay made the learning rate
    negative after the first milestone, a negative loss weight maximised its term (a runner
    hunt's finds)."""
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match=message):
        ppu_fast.unlearn(model, forget, retain, method=method, progress=False, **{opt: value})


def test_nan_logits_count_as_errors():
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    data = TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    assert error(model, data) == 100.0  # argmax of NaN logits is 0, the label: not a hit


def test_the_callers_random_stream_is_left_alone(tiny):
    model, forget, retain = _sets(tiny)
    for method, opts in (("ppu-bias", {}), ("finetune", {}), ("scrub", {"msteps": 1})):
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        ppu_fast.unlearn(model, forget, retain, method=method, epochs=1, seed=7, progress=False,
                         **opts)
        assert torch.equal(torch.rand(3), expected), method


def test_frozen_parameters_stay_frozen(tiny):
    model, forget, retain = _sets(tiny)
    work = ppu_fast.unlearn(model, forget, retain, method="original", progress=False).model
    work[1].weight.requires_grad_(False)
    for method, opts in (("ppu", {"trainable": "head", "epochs": 1}),
                         ("cf-k", {"layers": ["4"], "epochs": 1})):
        for inplace in (False, True):
            res = ppu_fast.unlearn(work, forget, retain, method=method, inplace=inplace,
                                   progress=False, **opts)
            assert not work[1].weight.requires_grad and not res.model[1].weight.requires_grad
            assert res.model[4].weight.requires_grad
    targets = torch.full((len(forget) + len(retain), K), 1.0 / K)
    data = torch.utils.data.ConcatDataset([forget, retain])
    res = ppu_fast.finetune(work, data, targets, epochs=1, trainable="head", inplace=True,
                            progress=False)
    assert not work[1].weight.requires_grad
    zero_one = torch.zeros(len(data), dtype=torch.long)
    zero_one[:len(forget)] = 1
    ppu_fast.finetune(work, data, targets, epochs=1, forget_mask=zero_one, retain_fraction=0.5,
                      progress=False)
    with pytest.raises(ValueError, match="forget_mask: expected an .N,. = .400,. bool .or 0/1. mask"):
        ppu_fast.finetune(work, data, targets, epochs=1, forget_mask=torch.arange(len(forget)),
                          retain_fraction=0.5, progress=False)


def test_finetune_is_callable_every_time():
    import importlib

    import ppu_fast.unlearn  # noqa: F401  (imports the module that shadowed the function)
    importlib.import_module("ppu_fast.finetune")
    assert callable(ppu_fast.finetune)
    from ppu_fast import finetune
    assert callable(finetune)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "0"])
def test_finetune_refuses_a_seed_unlearn_refuses(tiny, seed):
    model, x, y, _ = tiny
    data, targets = TensorDataset(x, y), torch.full((len(y), K), 1.0 / K)
    with pytest.raises(ValueError, match=r"seed=.*expected a non-negative integer below 2\*\*63"):
        ppu_fast.finetune(model, data, targets, epochs=1, seed=seed, progress=False)

class _Triples(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def test_labels_and_outputs_must_fit_each_other(tiny):
    model, forget, retain = _sets(tiny)
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"model outputs k = 3 logits; expected labels in \[0, 3\)"):
        ppu_fast.unlearn(three, forget, retain, method="ppu", epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"k = 3 logits"):
        ppu_fast.unlearn(three, forget, retain, method="fisher", setting="class", progress=False)
    with pytest.raises(ValueError, match=r"k = 3 logits"):
        ppu_fast.unlearn(three, forget, retain, method="bad-t", epochs=1, progress=False)
    one = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    for method in ("finetune", "scrub"):
        with pytest.raises(ValueError, match="k >= 2"):
            ppu_fast.unlearn(one, forget, retain, method=method, epochs=1, progress=False)
    two = TensorDataset(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="k >= 2"):
        ppu_fast.unlearn(one, two, TensorDataset(torch.randn(6, 1, 8, 8),
                                                 torch.zeros(6, dtype=torch.long)),
                         method="ppu", epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"forget\[0\] is a tuple of 3 items; expected an \(x, y\)"):
        ppu_fast.unlearn(model, _Triples(forget.tensors[0], forget.tensors[1]), retain,
                         method="ppu", progress=False)
    with pytest.raises(ValueError, match="expected an integer class label"):
        ppu_fast.unlearn(model, TensorDataset(forget.tensors[0], forget.tensors[1].float()),
                         retain, method="ppu", progress=False)
    numpy_labels = [(x_, np.int64(y_)) for x_, y_ in zip(*forget.tensors)]
    numpy_labels[0] = (numpy_labels[0][0], np.array(int(forget.tensors[1][0])))  # 0-d array
    ppu_fast.unlearn(model, ItemsDataset(numpy_labels), retain, method="ppu-bias", epochs=1,
                     progress=False)
    boxed = nn.Sequential(model, nn.Unflatten(1, (K, 1)))
    with pytest.raises(ValueError, match=r"expected \(B, k\) logits"):
        ppu_fast.unlearn(boxed, forget, retain, method="ppu", progress=False)
    for seed in (1.5, True, -1, "0"):
        with pytest.raises(ValueError, match="seed="):
            ppu_fast.unlearn(model, forget, retain, method="ppu", seed=seed, progress=False)


def test_a_last_batch_of_one_does_not_break_batchnorm(tiny):
    model, x, y, fm = tiny
    keep = torch.nonzero(~fm).view(-1)[:129]  # 129 = 2 * 64 + 1 = 4 * 32 + 1
    retain = TensorDataset(x[keep], y[keep])
    forget = TensorDataset(x[fm], y[fm])
    for method in ("finetune", "scrub", "bad-t", "retrain"):
        opts = {} if method == "retrain" else {"epochs": 1}
        if method == "scrub":
            opts["msteps"] = 1
        if method == "finetune":
            opts["batch_size"] = 64
        res = ppu_fast.unlearn(model, forget, retain, method=method, progress=False, **opts)
        assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_batchnorm_models_drop_a_lone_last_batch():
    from ppu_fast.models import build_model
    from ppu_fast.training import lone_last_batch
    conv = build_model("smallcnn", num_classes=5, in_channels=1)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    for model in (conv, mlp):
        assert lone_last_batch(129, 64, model) and not lone_last_batch(128, 64, model)
    assert not lone_last_batch(129, 64, plain)


def test_a_lone_last_batch_on_a_one_pixel_batchnorm2d_map(tiny):
    # As a torchvision ResNet-18 on 32 x 32 images (1 x 1 maps in its last block): 65 examples at
    # batch size 64 failed with "a batch of one example cannot train the model's BatchNorm".
    _, x, y, fm = tiny
    torch.manual_seed(0)
    from ppu_fast.training import TrainConfig
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Linear(4, K))
    keep = torch.nonzero(~fm).view(-1)[:57]
    retain = TensorDataset(x[keep], y[keep])
    forget = TensorDataset(x[fm][:8], y[fm][:8])
    # PPU trains on 8 + 57 = 64 + 1 rows, Finetune and Retrain on 57 = 56 + 1.
    for method, opts in (("ppu", {"epochs": 1, "batch_size": 64}),
                         ("finetune", {"epochs": 1, "batch_size": 56}),
                         ("retrain", {"config": TrainConfig(epochs=1, batch_size=56),
                                      "cache": False})):
        res = ppu_fast.unlearn(model, forget, retain, method=method, progress=False, **opts)
        assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_one_module_name_is_not_split_into_characters(tiny):
    model, forget, retain = _sets(tiny)
    res = ppu_fast.unlearn(model, forget, retain, method="cf-k", layers="4", epochs=1,
                           progress=False)
    assert res.model is not model
    with pytest.raises(ValueError, match=r"no module 'classifier'"):
        ppu_fast.unlearn(model, forget, retain, method="cf-k", layers="classifier", epochs=1,
                         progress=False)


def test_options_a_mode_would_ignore_are_refused(tiny):
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match=r"mode='bias'.*lam=1000000.0"):
        ppu_fast.unlearn(model, forget, retain, method="ppu", mode="bias", lam=1e6,
                         progress=False)
    ppu_fast.unlearn(model, forget, retain, method="ppu", mode="bias", lam=1, epochs=1,
                     progress=False)  # the default value, as an int: nothing ignored
    with pytest.raises(ValueError, match="variant='scrub' only"):
        ppu_fast.unlearn(model, forget, retain, method="bad-t", variant="chundawat", beta=123.0,
                         progress=False)
    with pytest.raises(ValueError, match="select='val'"):
        ppu_fast.unlearn(model, forget, retain, method="scrub", rewind="closest", progress=False)
    with pytest.raises(ValueError, match="history_retain"):
        ppu_fast.unlearn(model, forget, retain, method="ppu", history=True, history_retain=-5,
                         progress=False)


def _cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from ppu_fast.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


@pytest.mark.parametrize("flags,message", [
    (["--seeds", "0,0"], "argument --seeds: expected distinct"),
    (["--seeds", "-1"], "argument --seeds: expected distinct integers in [0, 2**32 - 1]"),
    (["--threads", "0"], "argument --threads: expected a thread count from 1 to 1024"),
    (["--device", "bogus"], "device: 'bogus' is not a torch device"),
    (["--unlearn-lr", "inf"], "argument --unlearn-lr: expected a finite number"),
    (["--methods", ","], "argument --methods: expected comma-separated names without empty"),
    (["--methods", " "], "--methods: no method named"),
    (["--methods", "original,ppu-bias", "--lam", "5"], "--lam: only PPU's privacy mode"),
])
def test_cli_refuses_before_any_training(tmp_path, flags, message):
    code, err = _cli("run", "--dataset", "digits5", "--model", "smallcnn", "--no-progress",
                     "--out", str(tmp_path / "o"), *flags)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_cli_out_must_be_a_folder(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for cmd in (["run", "--dataset", "digits5", "--model", "smallcnn"], ["demo"]):
        code, err = _cli(*cmd, "--out", str(f))
        assert code == 2 and "is a file; expected a folder" in err, err


def test_experiment_refuses_repeated_seeds():
    from ppu_fast.unlearn.experiment import run_experiment
    with pytest.raises(ValueError, match="repeats a seed"):
        run_experiment(seeds=[0, 0], methods=("original",), log=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_experiment_refuses_a_missing_device_before_training():
    from ppu_fast.unlearn.experiment import run_experiment
    with pytest.raises(ValueError, match="device: 'cuda' but torch finds no CUDA device"):
        run_experiment(seeds=[0], methods=("original",), device="cuda", log=None)


def test_experiment_refuses_repeated_methods():
    from ppu_fast.unlearn.experiment import run_experiment
    with pytest.raises(ValueError, match=r"methods: \['original', 'ppu', 'original'\] repeats 'original'"):
        run_experiment(seeds=[0], methods=("original", "ppu", "original"), log=None)


def test_class_scenario_refuses_num_forget():
    from ppu_fast.data import make_split
    with pytest.raises(ValueError, match="num_forget=5: the class scenario"):
        make_split("digits", scenario="class", num_forget=5)


def test_last_block_is_found_through_wrappers_and_in_mlp_heads():
    from ppu_fast.finetune import trainable_modules
    from ppu_fast.models import build_model

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build_model("smallcnn", 5, 1, 0.5)

        def forward(self, x):
            return self.net(x)

    w = Wrapped()
    got, direct = trainable_modules(w, "last-block"), trainable_modules(w.net, "last-block")
    assert len(got) == 2 and all(a is b for a, b in zip(got, direct))
    mlp = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(),
                        nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    assert trainable_modules(mlp, "last-block") == [mlp[2][0], mlp[2][2]]
    with pytest.raises(ValueError, match="no block with parameters before its head"):
        trainable_modules(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "last-block")


def test_last_block_follows_the_forward_order_of_a_classifier_first_model():
    """A model whose __init__ registers its classifier before its encoder had no block "before"
    its head in registration order: trainable='last-block' was refused. finetune now walks the
    order the forward pass runs the modules in; a module it never calls is no block."""
    from torch.utils.data import TensorDataset

    from ppu_fast import finetune
    from ppu_fast.finetune import trainable_modules

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)
            self.unused = nn.Linear(4, 6)  # registered between, never called
            self.enc = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6),
                                     nn.ReLU())

        def forward(self, x):
            return self.fc(self.enc(x))

    torch.manual_seed(0)
    model = HeadFirst()
    with pytest.raises(ValueError, match="no block with parameters before its head"):
        trainable_modules(model, "last-block", model.fc)
    order = ["", "enc", "enc.0", "enc.1", "enc.2", "enc.3", "enc.4", "fc"]
    assert trainable_modules(model, "last-block", model.fc, order) == [model.enc[3], model.fc]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 1, 2, 2, generator=g)
    targets = torch.softmax(torch.randn(30, 3, generator=g), 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune(model, TensorDataset(x, torch.zeros(30, dtype=torch.long)), targets, epochs=2,
                   lr=0.5, trainable="last-block", progress=False)
    moved = {k for k, v in res.model.state_dict().items() if not torch.equal(before[k], v)}
    assert moved == {"enc.3.weight", "enc.3.bias", "fc.weight", "fc.bias"}, moved


def test_a_torchscript_model_gets_a_clear_error_or_trains_in_place():
    """finetune's copy of a scripted model had non-leaf parameters: torch's optimizer raised
    "can't optimize a non-leaf Tensor"; the hooks of the probe pass must not break it either."""
    import warnings

    from torch.utils.data import TensorDataset

    from ppu_fast import finetune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        model = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    data = TensorDataset(torch.randn(8, 1, 2, 2), torch.zeros(8, dtype=torch.long))
    targets = torch.full((8, 3), 1 / 3)
    with pytest.raises(ValueError, match="model: the copy finetune trains .* not leaf tensors.*"
                                         "pass inplace=True"):
        finetune(model, data, targets, epochs=1, progress=False)
    before = model[1].weight.detach().clone()
    res = finetune(model, data, targets, epochs=1, lr=0.5, progress=False, inplace=True)
    assert res.model is model and not torch.equal(before, model[1].weight.detach())


def test_weighted_retain_sampling_needs_a_refine(tiny):
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match="retain_sampling='weighted'.*mode='bias' does not refine"):
        ppu_fast.unlearn(model, forget, retain, method="ppu-bias", retain_sampling="weighted",
                         epochs=1, progress=False)


def test_ppu_records_every_option_it_ran_with(tiny):
    model, forget, retain = _sets(tiny)
    res = ppu_fast.unlearn(model, forget, retain, method="ppu", select="last", epochs=1,
                           retain_per_epoch=20, momentum=0.5, weight_decay=1e-4, progress=False)
    o = res.options
    assert (o["retain_per_epoch"], o["momentum"], o["weight_decay"], o["retain_fraction"]) == \
        (20, 0.5, 1e-4, None)
    assert {"tol", "backend", "history"} <= set(o)


# -- forms real callers have (a hostile review of the API's model and data forms) ----------------
def test_a_batch_sampler_loader_stands_for_the_rows_it_visits(tiny):
    """DataLoader(ds, batch_sampler=...) keeps a default SequentialSampler over the whole dataset
    as its .sampler: unlearn took all 400 rows for the 15 visited (PPU bias mode then pushed the
    whole dataset towards uniform); a sampler over other indices did the same."""
    from torch.utils.data import BatchSampler, SequentialSampler
    model, x, y, fm = tiny
    full = TensorDataset(x, y)
    fi = torch.nonzero(fm).view(-1).tolist()
    ri = torch.nonzero(~fm).view(-1).tolist()
    forget = DataLoader(full, batch_sampler=BatchSampler(SubsetRandomSampler(fi), 8, False))
    retain = DataLoader(full, batch_sampler=BatchSampler(SubsetRandomSampler(ri), 8, False))
    res = ppu_fast.unlearn(model, forget, retain, method="ppu-bias", epochs=1, progress=False)
    assert res.targets.shape[0] == len(y)  # forget + retain rows
    assert torch.allclose(res.targets[:len(fi)], torch.full((len(fi), K), 1.0 / K))
    seq = DataLoader(full, sampler=SequentialSampler(range(15)))
    res = ppu_fast.unlearn(model, seq, TensorDataset(x[15:], y[15:]), method="ppu-bias", epochs=1,
                           progress=False)
    assert res.targets.shape[0] == len(y)


def test_labels_follow_a_datasets_target_transform():
    """A dataset with .targets and a target_transform labels its items target_transform(targets[i])
    (torchvision): the forget class, the 'val' rule's class and the label check read .targets raw."""
    from ppu_fast.data import dataset_targets

    class Folder(Dataset):  # torchvision's layout: .targets, and items through target_transform
        def __init__(self, target_transform=None):
            self.targets = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
            self.target_transform = target_transform

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            t = self.targets[i]
            return torch.zeros(1), self.target_transform(t) if self.target_transform else t

    ds = Folder(target_transform=lambda t: (t * 3) % 5)
    assert dataset_targets(ds).tolist() == [ds[i][1] for i in range(len(ds))]
    assert dataset_targets(Folder()).tolist() == list(range(10))


def test_the_callers_module_modes_are_kept(tiny):
    """A training model with a BatchNorm frozen in eval mode (a common recipe), or a wrapper built
    in train mode around an eval-mode model: model.train(was) restored every module alike, so the
    caller's BatchNorm trained again and the wrapped model's dropout came on."""
    model, forget, retain = _sets(tiny)
    m = __import__("copy").deepcopy(model)
    m.train()
    m[2].eval()
    before = [mod.training for mod in m.modules()]
    for method, opts in (("ppu", {"epochs": 1}), ("finetune", {"epochs": 1}), ("original", {})):
        ppu_fast.unlearn(m, forget, retain, method=method, progress=False, **opts)
        assert [mod.training for mod in m.modules()] == before, method
    error(m, retain)
    assert [mod.training for mod in m.modules()] == before


def test_ppu_keeps_the_callers_frozen_batchnorm_statistics(tiny):
    """Modules whose parameters the caller froze keep their running statistics under PPU, as under
    the baselines' loop (they moved under PPU: a frozen backbone's features changed)."""
    model, forget, retain = _sets(tiny)
    m = __import__("copy").deepcopy(model)
    for p in [*m[1].parameters(), *m[2].parameters()]:
        p.requires_grad_(False)
    for method, opts in (("ppu", {"select": "last"}), ("ppu-bias", {})):
        res = ppu_fast.unlearn(m, forget, retain, method=method, epochs=2, progress=False, **opts)
        assert torch.equal(res.model[2].running_mean, m[2].running_mean), method
        assert torch.equal(res.model[2].running_var, m[2].running_var), method
        assert torch.equal(res.model[1].weight, m[1].weight)
        assert not torch.equal(res.model[4].weight, m[4].weight)  # the rest did train


def test_overlaps_through_nested_subsets_repeats_and_concatenations_are_refused(tiny):
    """Forget rows inside retain through a Subset of a Subset, a Subset with repeated indices, or a
    ConcatDataset holding the forget set ran silently (only a Subset of the same parent was
    traced)."""
    from torch.utils.data import ConcatDataset, Subset
    model, x, y, fm = tiny
    full = TensorDataset(x, y)
    fi = torch.nonzero(fm).view(-1).tolist()
    ri = torch.nonzero(~fm).view(-1).tolist()
    forget = Subset(full, fi)
    middle = Subset(full, list(range(200)))
    with pytest.raises(ValueError, match="forget and retain overlap in"):
        ppu_fast.unlearn(model, forget, Subset(middle, list(range(100))), epochs=1, progress=False)
    with pytest.raises(ValueError, match="forget holds an example more than once"):
        ppu_fast.unlearn(model, Subset(full, [fi[0], fi[0], fi[1]]), Subset(full, ri), epochs=1,
                         progress=False)
    with pytest.raises(ValueError, match="forget and retain overlap in 15 examples"):
        ppu_fast.unlearn(model, forget, ConcatDataset([Subset(full, fi), Subset(full, ri)]),
                         epochs=1, progress=False)
    # disjoint ones, however nested, still run
    ppu_fast.unlearn(model, Subset(Subset(full, fi), list(range(5))),
                     ConcatDataset([Subset(full, ri[:100]), Subset(full, ri[100:])]), epochs=1,
                     progress=False)


@pytest.mark.parametrize("form", ["int32", "column", "numpy (1,)", "mixed"])
def test_label_forms_the_entry_check_accepts_train_every_method(tiny, form):
    """int32 labels, (N, 1) columns and numpy (1,) labels passed unlearn's checks, then failed
    inside torch's loss in the baselines ("expected ... Long", "0D or 1D target tensor expected",
    "only 0-dimensional arrays")."""
    model, x, y, fm = tiny

    def Items(xs, ys):  # labels as numpy (1,) arrays
        return ItemsDataset([(xi, np.array([int(yi)])) for xi, yi in zip(xs, ys)])

    def make(rows):
        if form == "int32":
            return TensorDataset(x[rows], y[rows].int())
        if form == "column":
            return TensorDataset(x[rows], y[rows].view(-1, 1))
        return Items(x[rows], y[rows])

    forget, retain = make(fm), make(~fm)
    if form == "mixed":  # (1,) numpy labels beside scalar tensor ones (PPU collates both sets)
        forget, retain = Items(x[fm], y[fm]), TensorDataset(x[~fm], y[~fm])
    for method, opts in (("finetune", {"setting": "selective"}), ("neggrad+", {"setting": "selective"}),
                         ("scrub", {"msteps": 1, "epochs": 1}), ("ppu", {"epochs": 1})):
        res = ppu_fast.unlearn(model, forget, retain, method=method, progress=False, **opts)
        assert res.model is not model, method


def test_a_forget_set_of_one_says_why_a_baseline_cannot_train_on_it(tiny):
    """One example to forget (the commonest deletion request) gives forget batches of one, which a
    BatchNorm1d model cannot train on in train mode: torch's "Expected more than 1 value per
    channel" named no argument. PPU, which mixes forget and retain rows, runs."""
    model, x, y, fm = tiny
    one, rest = TensorDataset(x[:1], y[:1]), TensorDataset(x[1:], y[1:])
    with pytest.raises(ValueError, match=r"neggrad\+: a batch of one example .* mode='eval'"):
        ppu_fast.unlearn(model, one, rest, method="neggrad+", setting="selective", progress=False)
    with pytest.raises(ValueError, match=r"scrub: a batch of one example") as exc:
        ppu_fast.unlearn(model, one, rest, method="scrub", msteps=1, epochs=1, progress=False)
    assert "mode=" not in str(exc.value)  # SCRUB has no mode option
    ppu_fast.unlearn(model, one, rest, method="ppu", epochs=1, progress=False)


def test_inputs_the_model_cannot_take_are_named(tiny):
    """float64 inputs to a float32 model, a PIL-like object or a dict as x: torch's "mat1 and mat2
    must have the same dtype" / "Could not infer dtype of dict" named no argument."""
    model, x, y, fm = tiny
    with pytest.raises(ValueError, match=r"model: its forward pass on forget\[0\] \(a float64 tensor"
                                         r".*its parameters are float32"):
        ppu_fast.unlearn(model, TensorDataset(x[fm].double(), y[fm]), TensorDataset(x[~fm], y[~fm]),
                         progress=False)

    class Dicts(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"pixels": x[i]}, int(y[i])

    with pytest.raises(TypeError, match=r"forget\[0\]: its input is a dict"):
        ppu_fast.unlearn(model, Dicts(), TensorDataset(x[~fm], y[~fm]), progress=False)


# ---- a probe of 2026-12-05 (hostile caller, /tmp/probe25): each failed on commit bf7c79b


def test_retrain_keeps_frozen_parameters_and_refuses_weights_it_cannot_redraw(tiny):
    from ppu_fast.training import TrainConfig

    model, forget, retain = _sets(tiny)
    frozen = __import__("copy").deepcopy(model)
    frozen[1].requires_grad_(False)  # a "pre-trained" first layer, frozen by the caller
    res = ppu_fast.unlearn(frozen, forget, retain, method="retrain", cache=False, progress=False,
                           config=TrainConfig(epochs=1, batch_size=64))
    # (it used to be re-drawn, then never trained: random features under a trained head)
    assert torch.equal(res.model[1].weight, frozen[1].weight)
    assert not torch.equal(res.model[4].weight, frozen[4].weight)  # the head was retrained

    class Hand(nn.Module):  # a layer that holds its Parameters itself, with no reset_parameters()
        def __init__(self, k=K):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, k) / 8)

        def forward(self, x):
            return x.flatten(1) @ self.w

    hand = nn.Sequential(Hand())
    with pytest.raises(ValueError, match=r"model: Retrain needs fresh weights, but 0\.w belong to "
                                         r"modules without reset_parameters\(\).*expected init="):
        ppu_fast.unlearn(hand, forget, retain, method="retrain", cache=False, progress=False)
    # init= gives the starting weights: accepted
    ppu_fast.unlearn(hand, forget, retain, method="retrain", cache=False, progress=False,
                     init=nn.Sequential(Hand()), config=TrainConfig(epochs=1, batch_size=64))
    with pytest.raises(ValueError, match="EU-k without init= needs fresh weights, but 0.w"):
        ppu_fast.unlearn(hand, forget, retain, method="eu-k", layers=["0"], epochs=1, progress=False)
    # Bad-T's incompetent teacher is a re-drawn copy: it would have kept Hand's trained weights
    with pytest.raises(ValueError, match=r"model: Bad-T's incompetent teacher needs fresh weights, but "
                                         r"0\.w belong to modules without reset_parameters"):
        ppu_fast.unlearn(hand, forget, retain, method="bad-t", progress=False)
    fresh = nn.Sequential(Hand())
    before = fresh[0].w.detach().clone()
    res = ppu_fast.unlearn(hand, forget, retain, method="bad-t", init=fresh, progress=False)
    assert res.options["teacher"] == "init" and torch.equal(fresh[0].w, before)  # init not trained
    with pytest.raises(ValueError, match=r"init\['0\.w'\] has shape \(64, 3\), the model's parameter "
                                         r"\(64, 5\): init must be of the same architecture"):
        ppu_fast.unlearn(hand, forget, retain, method="bad-t", progress=False, init=nn.Sequential(Hand(3)))
    res = ppu_fast.unlearn(hand, forget, retain, method="bad-t", progress=False,
                           init=nn.Sequential(Hand()).state_dict())  # a state dict, as EU-k takes
    assert res.options["teacher"] == "init"


def test_the_training_cache_tells_apart_models_that_differ_in_a_plain_attribute(tmp_path, monkeypatch):
    from ppu_fast.training import cache_key, TrainConfig
    from ppu_fast.models import build_model

    class Tempered(nn.Module):
        def __init__(self, temperature):
            super().__init__()
            self.fc, self.temperature = nn.Linear(4, 3), temperature

        def forward(self, x):
            return self.fc(x) / self.temperature

    data = TensorDataset(torch.randn(8, 4), torch.arange(8) % 3)
    torch.manual_seed(0)
    a = Tempered(1.0)
    b = __import__("copy").deepcopy(a)
    b.temperature = 50.0
    cfg = TrainConfig(epochs=1)
    assert cache_key(a, data, cfg) != cache_key(b, data, cfg)
    b.temperature = 1.0
    assert cache_key(a, data, cfg) == cache_key(b, data, cfg)
    # a function attribute is keyed by its name, not by a per-process address
    a.act, b.act = torch.relu, torch.tanh
    assert cache_key(a, data, cfg) != cache_key(b, data, cfg)
    # the package's models have no such attributes: their keys (and cached models) stay as they were
    from ppu_fast.training import _attributes
    assert all(_attributes(build_model(n, 10, 3, 0.5)) == {} for n in ("smallcnn", "allcnn", "resnet18"))


def test_unlearn_refuses_pseudo_none_and_takes_a_numpy_pseudo_in_bias_mode(tiny):
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match="pseudo=None: unlearn takes every row's probabilities from "
                                         "the model"):
        ppu_fast.unlearn(model, forget, retain, pseudo=None, epochs=1, progress=False)
    with pytest.raises(TypeError, match="pseudo: expected a name .* got list"):
        ppu_fast.unlearn(model, forget, retain, pseudo=[0.2] * K, epochs=1, progress=False)
    given = np.full((len(forget), K), 1.0 / K, dtype=np.float32)
    res = ppu_fast.unlearn(model, forget, retain, method="ppu-bias", pseudo=given, epochs=1,
                           progress=False)
    assert torch.allclose(res.targets[:len(forget)], torch.full((len(forget), K), 1.0 / K))


def test_a_retain_or_val_the_model_cannot_take_is_named_before_any_work(tiny):
    model, x, y, fm = tiny
    forget = TensorDataset(x[fm], y[fm])
    as_bytes = TensorDataset((x[~fm] * 16).to(torch.uint8), y[~fm])
    with pytest.raises(ValueError, match=r"model: its forward pass on retain\[0\] \(a uint8 tensor"):
        ppu_fast.unlearn(model, forget, as_bytes, method="finetune", progress=False)
    retain = TensorDataset(x[~fm], y[~fm])
    with pytest.raises(ValueError, match=r"model: its forward pass on val\[0\] \(a float64 tensor"):
        ppu_fast.unlearn(model, forget, retain, val=TensorDataset(x[:20].double(), y[:20]),
                         epochs=1, progress=False)


def test_targets_that_disagree_with_the_items_are_refused(tiny):
    model, x, y, fm = tiny

    class Remapped(Dataset):  # keeps the original labels in .targets, returns others
        def __init__(self, x, y):
            self.x, self.targets = x, (y + 5).tolist()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.targets[i] - 5

    with pytest.raises(ValueError, match=r"forget: its targets say class 5 for example 0 but the "
                                         r"example's label is 0"):
        ppu_fast.unlearn(model, Remapped(x[fm], y[fm]), TensorDataset(x[~fm], y[~fm]), epochs=1,
                         progress=False)


def test_eu_k_and_cf_k_name_what_is_wrong_with_their_layers(tiny):
    model, forget, retain = _sets(tiny)
    # a model SCRUB has no rule for, with its block named: EU-k puts that block back
    res = ppu_fast.unlearn(model, forget, retain, method="eu-k", layers=["4"], epochs=1,
                           progress=False)
    assert res.options["reset"] == ["4"]
    with pytest.raises(ValueError, match=r"layers: '3' hold no parameters \(e\.g\. an activation"):
        ppu_fast.unlearn(model, forget, retain, method="cf-k", layers=["3"], epochs=1, progress=False)
    # a reset of modules without weights put nothing back: CF-k under EU-k's name
    with pytest.raises(ValueError, match=r"reset: '3' hold no parameters .* weights to put back"):
        ppu_fast.unlearn(model, forget, retain, method="eu-k", layers=["4"], reset=["3"], epochs=1,
                         progress=False)
    # a bare int: list(5) failed inside the method with "'int' object is not iterable"
    with pytest.raises(TypeError, match=r"layers: expected a module name or a list of them.*got 4 "
                                        r"\(int\)"):
        ppu_fast.unlearn(model, forget, retain, method="cf-k", layers=4, epochs=1, progress=False)
    with pytest.raises(TypeError, match=r"reset: expected a module name or a list of them"):
        ppu_fast.unlearn(model, forget, retain, method="eu-k", layers=["4"], reset=4, epochs=1,
                         progress=False)


def test_a_forget_batch_size_is_named_as_itself(tiny):
    model, forget, retain = _sets(tiny)
    for method in ("neggrad+", "scrub", "bad-t"):
        # it was refused as "batch_size must be a positive int"
        with pytest.raises(ValueError, match=r"^forget_batch_size must be a positive int, got 0"):
            ppu_fast.unlearn(model, forget, retain, method=method, forget_batch_size=0, epochs=1,
                             progress=False)


def test_a_float16_model_that_diverges_is_told_why(tiny):
    model, forget, retain = _sets(tiny)
    half = nn.Sequential(nn.Flatten(), nn.Linear(64, K)).half()
    with pytest.raises(FloatingPointError, match="its weights are float16, in which Adam's eps"):
        ppu_fast.unlearn(half, TensorDataset(forget.tensors[0].half(), forget.tensors[1]),
                         TensorDataset(retain.tensors[0].half(), retain.tensors[1]), method="scrub",
                         progress=False)


def test_scrub_says_where_an_out_of_range_msteps_came_from(tiny):
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match=r"got 3 \(the 'small' preset's, as msteps was not given\)"):
        ppu_fast.unlearn(model, forget, retain, method="scrub", epochs=2, progress=False)
    with pytest.raises(ValueError, match=r"got 5 \(given\)"):
        ppu_fast.unlearn(model, forget, retain, method="scrub", epochs=2, msteps=5, progress=False)


def test_reset_parameters_reaches_torchs_attention_and_only_torchs_private_resets():
    from ppu_fast.models import not_reset, reset_parameters

    mha = nn.MultiheadAttention(8, 2)
    before = mha.in_proj_weight.detach().clone()
    reset_parameters(mha, 1)  # MultiheadAttention has only the private _reset_parameters
    assert not torch.equal(before, mha.in_proj_weight) and not_reset(mha) == []

    class Theirs(nn.Module):  # someone else's private method may want arguments: not called
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def _reset_parameters(self, scale):
            raise AssertionError("called")

    assert not_reset(Theirs()) == ["w"]
    reset_parameters(Theirs())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_a_device_this_machine_lacks_is_named_before_any_work(tiny):
    # torch's own refusal came from the first forward pass ("Found no NVIDIA driver"), or for a
    # name torch does not know, from torch.device's list of device types.
    model, forget, retain = _sets(tiny)
    before = [p.detach().clone() for p in model.parameters()]
    for device, what in (("cuda", r"device: 'cuda' but torch finds no CUDA device here"),
                         ("cuda:1", r"device: 'cuda:1' but torch finds no CUDA device"),
                         ("tpu", r"device: 'tpu' is not a torch device")):
        for method in ("ppu", "finetune", "retrain"):
            with pytest.raises(ValueError, match=what):
                ppu_fast.unlearn(model, forget, retain, method=method, device=device, progress=False)
        with pytest.raises(ValueError, match=what):
            ppu_fast.finetune(model, retain, torch.full((len(retain), K), 1.0 / K), device=device,
                              progress=False)
    with pytest.raises(TypeError, match=r"device: got a float \(1.5\); expected a str, torch.device"):
        ppu_fast.unlearn(model, forget, retain, device=1.5, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert ppu_fast.unlearn(model, forget, retain, method="original", device=torch.device("cpu"),
                            progress=False).model is not model


def test_a_cuda_index_past_the_machines_devices_is_named(monkeypatch):
    # Runs everywhere: torch.cuda is told there is one device (nothing is put on it).
    from ppu_fast.caller_state import available_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert available_device("cuda") == torch.device("cuda")
    assert available_device(np.int64(0)) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"^device: 'cuda:3' but this machine has 1 CUDA device\(s\); "
                                         r"expected cuda:0 \.\. cuda:0"):
        available_device("cuda:3")


def test_scrub_refuses_a_negative_history_retain(tiny):
    # A slice [:limit] of the retain sample dropped that many examples; at -len(retain) the
    # history scored an empty set.
    model, forget, retain = _sets(tiny)
    with pytest.raises(ValueError, match=r"history_retain must be an int >= 0 or None, got -5"):
        ppu_fast.unlearn(model, forget, retain, method="scrub", history_retain=-5, progress=False)


def test_the_callable_modules_show_their_functions_signature():
    # Tools that read inspect.signature (IDEs, Jupyter's "?") saw (*args, **kwargs).
    import inspect

    import ppu_fast.finetune  # noqa: F401  (binds the module over the function)
    for name in ("unlearn", "finetune"):
        params = inspect.signature(getattr(ppu_fast, name)).parameters
        assert list(params)[:2] == ["model", "forget" if name == "unlearn" else "data"]
        assert "device" in params and "progress" in params


def test_retrain_checks_its_init_and_takes_a_state_dict(tiny):
    model, forget, retain = _sets(tiny)
    cfg = ppu_fast.training.TrainConfig(epochs=1)
    other_head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                               nn.Linear(32, K + 2))
    # Before: any init came back as the "Retrain" model (here with K + 2 outputs).
    with pytest.raises(ValueError, match=r"init\['4.weight'\] has shape .*same architecture"):
        ppu_fast.unlearn(model, forget, retain, method="retrain", init=other_head, config=cfg,
                         cache=False, progress=False)
    with pytest.raises(ValueError, match="init has entries the model lacks"):
        ppu_fast.unlearn(model, forget, retain, method="retrain", init=nn.Linear(64, K),
                         config=cfg, cache=False, progress=False)
    with pytest.raises(TypeError, match="init: expected a model"):
        ppu_fast.unlearn(model, forget, retain, method="retrain", init=[1], config=cfg,
                         cache=False, progress=False)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    res = ppu_fast.unlearn(model, forget, retain, method="retrain", init=init, config=cfg,
                           cache=False, progress=False)
    assert type(res.model) is type(model)


def test_retrain_of_a_frozen_model_names_the_problem(tiny):
    model, forget, retain = _sets(tiny)
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(64, K)).requires_grad_(False)
    with pytest.raises(ValueError, match="retrain: no trainable parameters"):
        ppu_fast.unlearn(frozen, forget, retain, method="retrain", cache=False, progress=False,
                         config=ppu_fast.training.TrainConfig(epochs=1))


def test_option_types_are_named(tiny):
    model, forget, retain = _sets(tiny)
    with pytest.raises(TypeError, match=r"layers: module names are strings.*got 4 \(int\)"):
        ppu_fast.unlearn(model, forget, retain, method="cf-k", layers=[4], epochs=1,
                         progress=False)
    with pytest.raises(TypeError, match=r"lr_milestones: expected a list of epochs .*got 5"):
        ppu_fast.unlearn(model, forget, retain, method="scrub", lr_milestones=5, msteps=1,
                         epochs=1, progress=False)


class _Masked(nn.Module):
    """An additive attention-style mask buffer: -inf where a logit is not allowed."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, K + 1))
        mask = torch.zeros(K + 1)
        mask[-1] = float("-inf")
        self.register_buffer("mask", mask)

    def forward(self, x):
        return (self.body(x) + self.mask)[:, :K]


def test_an_infinite_mask_buffer_is_not_a_bad_weight(tiny):
    _, forget, retain = _sets(tiny)
    torch.manual_seed(0)
    model = _Masked()
    res = ppu_fast.unlearn(model, forget, retain, method="ppu", epochs=1, progress=False)
    assert torch.equal(res.model.mask, model.mask)
    ppu_fast.unlearn(model, forget, retain, method="finetune", epochs=1, progress=False)
    broken = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, K))
    broken[2].running_var[0] = float("inf")  # a diverged statistic is still refused
    with pytest.raises(ValueError, match="model: 1 of its .* are NaN or infinite"):
        ppu_fast.unlearn(broken, forget, retain, method="ppu", epochs=1, progress=False)
    broken[2].running_var[0] = 1.0
    model.mask[0] = float("nan")  # so is a NaN in any buffer
    with pytest.raises(ValueError, match="model: 1 of its"):
        ppu_fast.unlearn(model, forget, retain, method="ppu", epochs=1, progress=False)


def test_a_method_registered_without_the_bare_star(tiny):
    from ppu_fast.unlearn import UnlearnResult, _METHODS, method_options, register

    @register("test-noise")
    def noise(model, forget, retain, val=None, seed=0, device=None, inplace=False,
              progress=True, scale=0.01):
        return UnlearnResult(model, "test-noise", options={"scale": scale})

    @register("test-bare")
    def bare(model, forget, retain, *, val=None, seed=0, device=None, inplace=False,
             progress=True):
        return model

    try:
        model, forget, retain = _sets(tiny)
        assert method_options("test-noise") == {"scale": 0.01}  # was {}: "it accepts none"
        res = ppu_fast.unlearn(model, forget, retain, method="test-noise", scale=0.5,
                               progress=False)
        assert res.options == {"scale": 0.5}
        with pytest.raises(TypeError, match="'test-bare' returned Sequential; a registered "
                                            "method must return an UnlearnResult"):
            ppu_fast.unlearn(model, forget, retain, method="test-bare", progress=False)
    finally:
        _METHODS.pop("test-noise", None)
        _METHODS.pop("test-bare", None)


def test_an_endless_sampler_is_refused_not_listed(tiny):
    from torch.utils.data import Sampler
    from ppu_fast.metrics import error as error_of

    class Endless(Sampler):
        """An iteration-based loop's InfiniteSampler (stops here after 10 laps: listing every draw
        used to run forever)."""

        def __init__(self, n):
            self.n = n

        def __iter__(self):
            for lap in range(10):
                yield from torch.randperm(self.n).tolist()
            raise RuntimeError("drawn 10 laps: the reader does not stop")

    model, forget, retain = _sets(tiny)
    for call in (lambda: error_of(model, DataLoader(retain, batch_size=8,
                                                     sampler=Endless(len(retain)))),
                 lambda: ppu_fast.unlearn(model, DataLoader(forget, sampler=Endless(len(forget))),
                                          retain, method="ppu", epochs=1, progress=False)):
        with pytest.raises(ValueError, match=r"sampler draws more than the dataset's \d+ examples"):
            call()


@pytest.mark.parametrize("value", ["False", "no", 0, None])
def test_inplace_and_progress_must_be_booleans(tiny, value):
    """A string is truthy: ``inplace="False"`` trained the caller's own model. unlearn and finetune
    refuse anything but True / False (numpy's bool included) before any work."""
    model, forget, retain = _sets(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for arg in ("inplace", "progress"):
        with pytest.raises(ValueError, match=rf"{arg}={re.escape(repr(value))}: expected True or "
                                             rf"False"):
            ppu_fast.unlearn(model, forget, retain, method="finetune", epochs=1,
                             **{"progress": False, arg: value})
        with pytest.raises(ValueError, match=rf"{arg}={re.escape(repr(value))}: expected True"):
            ppu_fast.finetune(model, forget, torch.full((len(forget), K), 1.0 / K),
                              **{"progress": False, arg: value})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ppu_fast.unlearn(model, forget, retain, method="finetune", epochs=1, inplace=np.bool_(False),
                     progress=np.bool_(False))


def test_a_composites_ppu_options_are_checked_before_its_first_step(tiny):
    """finetune+ppu / scrub+ppu refuse a bad PPU-step option before the first step trains (it
    was found after it, and with inplace=True the caller's model had been changed)."""
    model, forget, retain = _sets(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for opts, exc, message in (({"epoch": 3}, TypeError, "ppu_options: unlearning method "
                                                          "'ppu-bias' got unknown option"),
                               ({"epochs": 0}, ValueError, "ppu_options: epochs must be a "
                                                           "positive int")):
        with pytest.raises(exc, match=message):
            ppu_fast.unlearn(model, forget, retain, method="finetune+ppu", inplace=True,
                             finetune_options={"epochs": 3}, ppu_options=opts, progress=False)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class NoParams(nn.Module):
    """A (B, K) 'classifier' with no parameters: its first K pixels."""

    def forward(self, x):
        return x.flatten(1)[:, :K]


def test_ntk_checks_its_options_and_init_before_the_jacobian(tiny, monkeypatch):
    """NTK takes numpy scalars as every method does, refuses a bool scale, and refuses an init of
    another architecture, or a model without parameters, before the Jacobian (nearly all of its
    work) is computed."""
    import ppu_fast.unlearn.ntk as ntk
    model, forget, retain = _sets(tiny)

    def no_jacobian(*a, **k):
        raise AssertionError("the Jacobian was computed before the check")

    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 3))
    with monkeypatch.context() as mp:
        mp.setattr(ntk, "output_jacobian", no_jacobian)
        with pytest.raises(ValueError, match=r"init\['4.weight'\] has shape \(3, 32\)"):
            ppu_fast.unlearn(model, forget, retain, method="ntk", init=other, progress=False)
        with pytest.raises(ValueError, match="scale must be 'predicted' or a finite number"):
            ppu_fast.unlearn(model, forget, retain, method="ntk", scale=True, progress=False)
        with pytest.raises(ValueError, match="model: the NoParams has no parameters"):
            ppu_fast.unlearn(NoParams(), forget, retain, method="ntk", scale=1.0, progress=False)
    res = ppu_fast.unlearn(model, forget, retain, method="ntk", scale=np.float32(0.5),
                           weight_decay=np.float64(0.1), max_jacobian_gib=np.float32(1.0),
                           chunk=np.int64(16), progress=False)
    assert res.options["scale"] == 0.5


def test_outputs_indices_and_option_types_named_before_any_work(tiny):
    """An integer output, a Subset index outside its dataset (first or later, forget or retain),
    a schedule that is not a name, a pseudo name the mode does not take, and a model without
    parameters: each is refused naming what is wrong, not by torch or numpy deep inside."""
    from torch.utils.data import Subset
    model, forget, retain = _sets(tiny)

    class IntOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, K)

        def forward(self, x):
            return self.lin(x.flatten(1)).long()

    with pytest.raises(ValueError, match="model: its output is int64; expected floating-point"):
        ppu_fast.unlearn(IntOut(), forget, retain, epochs=1, progress=False)
    with pytest.raises(ValueError, match="model: its output is int64; expected floating-point"):
        ppu_fast.finetune(IntOut(), forget, torch.full((len(forget), K), 1.0 / K),
                          progress=False)
    assert 0.0 <= error(IntOut(), retain) <= 100.0  # the metrics rank integer scores as before
    n = len(retain)
    for f, r, name, bad in ((Subset(forget, [10**6, 0]), retain, "forget", 10**6),
                            (forget, Subset(retain, [0, 1, -n - 1]), "retain", -n - 1)):
        with pytest.raises(IndexError, match=rf"{name}: a Subset's index {bad} is out of range"):
            ppu_fast.unlearn(model, f, r, method="ppu-bias", epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"schedule: unknown value \['fast'\]"):
        ppu_fast.unlearn(model, forget, retain, schedule=["fast"], progress=False)
    with pytest.raises(ValueError, match="pseudo: unknown name 'random-simplex'; expected one of "
                                         "'uniform', 'random', 'prior', 'probe' .mode='bias'."):
        ppu_fast.unlearn(model, forget, retain, method="ppu", mode="bias", pseudo="random-simplex",
                         progress=False)
    with pytest.raises(ValueError, match="pseudo: unknown name 'uniformm'; expected one of "
                                         "'uniform', 'random', 'random-simplex', 'prior', 'probe'"):
        ppu_fast.unlearn(model, forget, retain, pseudo="uniformm", progress=False)
    with pytest.raises(ValueError, match="model: trainable='all' selects no parameters"):
        ppu_fast.finetune(NoParams(), forget, torch.full((len(forget), K), 1.0 / K),
                          progress=False)
    res = ppu_fast.unlearn(model, forget, retain, pseudo="random-simplex", epochs=1,
                           progress=False)  # privacy mode takes refine's name
    assert res.options["pseudo"] == "random-simplex"

    class NoLen(Dataset):
        """A map-style dataset without len(): a Subset of it can still be val."""

        def __getitem__(self, i):
            return retain[i]

    ppu_fast.unlearn(model, forget, retain, method="finetune", val=Subset(NoLen(), range(20)),
                     epochs=1, progress=False)


def test_the_runner_refuses_its_own_arguments_of_the_wrong_kind():
    """run_experiment: a string for methods (split into letters), options that are not a dict,
    a variant not listed in methods (dropped), a non-bool cache."""
    from ppu_fast.unlearn.experiment import lam_variants, run_experiment
    with pytest.raises(TypeError, match="methods: expected a sequence of method names"):
        run_experiment(methods="ppu", log=None)
    with pytest.raises(TypeError, match=r"method_kwargs\['ppu'\]: expected a dict"):
        run_experiment(methods=["original", "ppu"], method_kwargs={"ppu": 5}, log=None)
    with pytest.raises(ValueError, match=r"variants: 'ppu\[lam=2\]' not in methods"):
        run_experiment(methods=["original"], variants=lam_variants([2.0]), log=None)
    for arg in ("cache", "progress"):
        with pytest.raises(ValueError, match=f"{arg}='no': expected True or False"):
            run_experiment(methods=["original"], log=None, **{arg: "no"})


def test_cli_names_a_bad_tensor_file_and_a_non_finite_checkpoint(tmp_path):
    """ppu-fast refine: a .pt that is not a torch file is bad input (exit 2, naming --probs), not a
    traceback; ppu-fast run: a checkpoint with NaN weights is refused before training (it was
    blamed on the learning rate after it); an --out whose results.json is a folder, before the
    run."""
    from ppu_fast.models import build_model
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    np.save(tmp_path / "m.npy", np.array([True, False]))
    code, err = _cli("refine", "--probs", str(junk), "--forget", str(tmp_path / "m.npy"),
                     "--out", str(tmp_path / "q.npy"))
    assert code == 2 and f"--probs: '{junk}' cannot be read as a tensor" in err, err
    state = build_model("smallcnn", 5, 1, 1.0).state_dict()
    state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    code, err = _cli("run", "--dataset", "digits5", "--model", "smallcnn", "--seeds", "0",
                     "--methods", "original,ppu", "--init-checkpoint", str(tmp_path / "nan.pt"),
                     "--no-progress", "--out", str(tmp_path / "o"))
    assert code == 2 and "holds 1 NaN or infinite values" in err, err
    assert not (tmp_path / "o").exists()
    (tmp_path / "o2" / "results.json").mkdir(parents=True)
    code, err = _cli("demo", "--out", str(tmp_path / "o2"), "--no-progress")
    assert code == 2 and "results.json' exists and is not a file" in err, err


def test_the_verdict_prints_short_times_with_their_digits():
    from ppu_fast.report import _secs
    assert [_secs(x) for x in (5e-5, 0.0312, 0.0045, 0.94, 0.9995, 1.0, 23.456)] == [
        "< 0.001", "0.031", "0.0045", "0.94", "1.0", "1.0", "23.5"]


def test_ppus_tensor_options_are_checked_before_the_models_probabilities(tiny, monkeypatch):
    """pseudo (N_forget, k) and marginals (k,) summing to N are checked against the data and the
    model's classes before the pass over every example that computes P (they were read by
    refine, after it)."""
    import ppu_fast.unlearn.ppu as ppu_module
    model, forget, retain = _sets(tiny)

    def no_pass(*a, **k):
        raise AssertionError("the model's probabilities were computed before the check")

    monkeypatch.setattr(ppu_module, "predict", no_pass)
    nf, n = len(forget), len(forget) + len(retain)
    for opts, message in (({"pseudo": torch.full((nf, K - 1), 1.0 / (K - 1))},
                           rf"pseudo: shape \({nf}, {K - 1}\); expected \(N_forget, k\)"),
                          ({"pseudo": np.full((nf + 1, K), 1.0 / K)}, r"pseudo: shape"),
                          ({"pseudo": torch.full((nf, K), 0.3)}, "pseudo: row 0 sums to 1.5"),
                          ({"marginals": torch.full((K,), n / (K - 1))},
                           f"marginals: sum to {n * K / (K - 1):g}"),
                          ({"mode": "bias", "pseudo": torch.full((nf, K - 1), 1.0 / (K - 1))},
                           r"pseudo: shape")):
        with pytest.raises(ValueError, match=message):
            ppu_fast.unlearn(model, forget, retain, progress=False, **opts)


def test_cli_refine_checks_the_memory_budget_and_an_empty_out_for_every_input(tmp_path):
    """--memory-budget was parsed only for a .npy input (a .pt ignored -3GiB and wrote Q); an
    empty --out was reported as '.'."""
    p = torch.softmax(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), 1)
    torch.save(p, tmp_path / "p.pt")
    np.save(tmp_path / "m.npy", np.arange(20) < 3)
    base = ["refine", "--probs", str(tmp_path / "p.pt"), "--forget", str(tmp_path / "m.npy")]
    code, err = _cli(*base, "--out", str(tmp_path / "q.pt"), "--memory-budget=-3GiB")
    assert code == 2 and "--memory-budget" in err and not (tmp_path / "q.pt").exists(), err
    code, err = _cli(*base, "--out", "")
    assert code == 2 and "--out: empty; expected a file path" in err, err
