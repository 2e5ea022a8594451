"""``ppu_fast.finetune`` handed what its users hand it: the forms of targets, data, models and
options a hostile review tried, each of which ran silently wrong or failed deep in torch."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import ppu_fast
from ppu_fast.finetune import finetune

from conftest import ItemsDataset, same, state
from test_finetune import toy as _toy

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(n=32, d=6, k=3, seed=0):
    """test_finetune's toy problem, its data and targets only (3 classes by default)."""
    _, data, targets, _ = _toy(n=n, d=d, k=k, seed=seed)
    torch.manual_seed(seed)
    return data, targets


class ClassifierFirst(nn.Module):
    """Registers its classifier before its encoder: registration order is not call order."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(8, 3)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.ReLU())

    def forward(self, x):
        return self.classifier(self.encoder(x))


def test_targets_must_have_the_models_number_of_classes():
    data, targets = toy()
    with pytest.raises(ValueError, match=r"targets: 1 columns, but the model outputs 3 logits"):
        finetune(nn.Linear(6, 3), data, torch.ones(32, 1), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"targets: 3 columns, but the model outputs 1 logits"):
        finetune(nn.Linear(6, 1), data, targets, epochs=1, progress=False)


def test_numpy_and_half_precision_targets_are_probabilities_too():
    data, targets = toy()
    model = nn.Linear(6, 3)
    a = finetune(model, data, targets.numpy().astype(np.float64), epochs=1, progress=False)
    b = finetune(model, data, targets, epochs=1, progress=False)
    assert torch.allclose(a.model.weight, b.model.weight, atol=1e-6)
    # A softmax taken in bfloat16: each entry rounded, rows off 1 by up to an ulp of bfloat16.
    bf = torch.softmax((4 * torch.randn(32, 3)).bfloat16(), dim=1)
    assert float((bf.double().sum(1) - 1).abs().max()) > 1e-3
    finetune(nn.Linear(6, 3), data, bf, epochs=1, progress=False)
    with pytest.raises(ValueError, match="sum to 1"):
        finetune(nn.Linear(6, 3), data, (bf.float() * 1.05).bfloat16(), epochs=1, progress=False)


def test_evaluate_cannot_overwrite_the_historys_own_keys():
    data, targets = toy()
    for key in ("loss", "epoch", "wall_seconds"):
        with pytest.raises(ValueError, match=rf"evaluate: returned \['{key}'\]"):
            finetune(nn.Linear(6, 3), data, targets, epochs=1, progress=False,
                     evaluate=lambda m, key=key: {key: 0.5})
    with pytest.raises(TypeError, match="evaluate: returned a float; expected a dict"):
        finetune(nn.Linear(6, 3), data, targets, epochs=1, progress=False, evaluate=lambda m: 0.9)
    res = finetune(nn.Linear(6, 3), data, targets, epochs=2, progress=False,
                   evaluate=lambda m: {"val_loss": 0.5, "forget_loss": 0.1})
    assert [h["epoch"] for h in res.history] == [0, 1, 2] and math.isnan(res.history[0]["loss"])
    # forget_loss is the history's own only when forget_kl writes it
    with pytest.raises(ValueError, match=r"evaluate: returned \['forget_loss'\]"):
        finetune(nn.Linear(6, 3), data, targets, epochs=1, progress=False, forget_kl=0.1,
                 forget_mask=torch.zeros(32, dtype=torch.bool), evaluate=lambda m: {"forget_loss": 1})


def test_select_val_checks_its_numbers_before_training():
    data, targets = toy()
    calls = []

    def missing(m):
        calls.append(1)
        return {"forget_error": 0.1, "valid_error": 0.2}

    with pytest.raises(ValueError, match=r"epoch 0 has no 'val_error'"):
        finetune(nn.Linear(6, 3), data, targets, epochs=5, select="val", evaluate=missing,
                 progress=False)
    assert len(calls) == 1  # refused at the evaluation before training, not after five epochs
    with pytest.raises(ValueError, match=r"epoch 1 has 'forget_error': nan"):
        finetune(nn.Linear(6, 3), data, targets, epochs=2, select="val", progress=False,
                 evaluate=lambda m: {"forget_error": math.nan, "val_error": 0.2})
    # the starting model's values may be NaN (the rule never picks it); tensors and numpy
    # scalars are numbers
    values = iter([math.nan, 0.3, 0.1])
    res = finetune(nn.Linear(6, 3), data, targets, epochs=2, select="val", progress=False,
                   evaluate=lambda m: {"forget_error": torch.tensor(next(values)),
                                       "val_error": np.float32(0.1)})
    assert res.selected_epoch == 2


def test_head_is_the_layer_that_makes_the_logits():
    data, targets = toy()
    torch.manual_seed(0)
    model = ClassifierFirst()
    before = state(model)
    res = finetune(model, data, targets, epochs=2, lr=0.5, trainable="head", progress=False)
    after = state(res.model)
    assert not same(before, after, ["classifier.weight"])
    assert same(before, after, ["encoder.0.weight", "encoder.0.bias"])


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_frozen_batchnorm_keeps_its_statistics_a_merely_eval_one_trains():
    # PyTorch's convention: training sets model.train() on every module, so a module the caller
    # left in eval mode trains (a pretrained net put in eval, then wrapped in a train-mode
    # Sequential, must not be silently frozen); freezing its parameters is how to fix it.
    data, targets = toy()
    stats = ["body.1.running_mean", "body.1.running_var"]
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    model.body[1].eval()
    before = state(model)
    res = finetune(model, data, targets, epochs=2, progress=False)
    assert not same(before, state(res.model), stats)
    model.body[1].requires_grad_(False)
    res = finetune(model, data, targets, epochs=2, progress=False)
    assert same(before, state(res.model), stats)
    assert not same(before, state(res.model), ["body.0.weight"])


class Replicating(nn.Module):
    """nn.DataParallel on several GPUs, on the CPU: each forward calls a replica of the module,
    which shares its forward hooks (Module._replicate_for_data_parallel copies __dict__)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    @staticmethod
    def _replica(m):
        r = m._replicate_for_data_parallel()
        for name, child in m._modules.items():
            if child is not None:
                r._modules[name] = Replicating._replica(child)
        for name, p in m._parameters.items():  # replicate() hands the replicas the tensors
            if p is not None:
                r._parameters[name] = p
        return r

    def forward(self, x):
        return self._replica(self.module)(x)


def test_replicas_of_data_parallel_find_the_head_by_name():
    data, targets = toy()
    torch.manual_seed(0)
    model = Replicating(ClassifierFirst())
    before = state(model)
    res = finetune(model, data, targets, epochs=2, lr=0.5, trainable="head", progress=False)
    assert not same(before, state(res.model), ["module.classifier.weight"])
    assert same(before, state(res.model), ["module.encoder.0.weight"])


def test_frozen_batchnorm_stays_fixed_in_ppu_the_baselines_and_the_composites(tiny_split):
    model, forget, retain = tiny_split
    model[2].requires_grad_(False)
    stats = ["2.running_mean", "2.running_var"]
    before = state(model)
    for method, extra in (("ppu", {"epochs": 1}), ("finetune", {"setting": "class", "epochs": 1}),
                          ("finetune+ppu", {"finetune_options": {"epochs": 1},
                                            "ppu_options": {"epochs": 1}})):
        res = ppu_fast.unlearn(model, forget, retain, method=method, progress=False, **extra)
        assert same(before, state(res.model), stats), method
    model[2].requires_grad_(True)


def _split():
    torch.manual_seed(0)
    x = torch.randn(80, 6)
    y = torch.arange(80) % 3
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))
    return model, TensorDataset(x[:10], y[:10]), TensorDataset(x[10:], y[10:])


@pytest.fixture
def tiny_split():
    return _split()


def test_weighted_sampling_needs_a_share_of_the_retain_rows(tiny_split):
    data, targets = toy()
    mask = torch.zeros(32, dtype=torch.bool)
    mask[:4] = True
    with pytest.raises(ValueError, match="retain_sampling='weighted' weighs which retain rows"):
        finetune(nn.Linear(6, 3), data, targets, epochs=1, forget_mask=mask, progress=False,
                 retain_sampling="weighted", retain_weights=torch.rand(32))
    finetune(nn.Linear(6, 3), data, targets, epochs=1, forget_mask=mask, progress=False,
             retain_sampling="weighted", retain_weights=torch.rand(32), retain_fraction=0.5)
    model, forget, retain = tiny_split
    with pytest.raises(ValueError, match=r"retain_fraction=1.0 \(schedule 'fast', mode 'privacy'\)"):
        ppu_fast.unlearn(model, forget, retain, method="ppu", retain_sampling="weighted",
                         progress=False)


def test_numpy_scalars_are_numbers_and_bools_are_not():
    data, targets = toy()
    mask = torch.zeros(32, dtype=torch.bool)
    mask[:4] = True
    finetune(nn.Linear(6, 3), data, targets, epochs=np.int64(1), batch_size=np.int64(8),
             evals_per_epoch=np.int64(2), forget_mask=mask, retain_fraction=np.float32(0.5),
             forget_kl=np.float32(0.1), forget_repeats=np.int32(2), lr=np.float32(0.01),
             progress=False)
    with pytest.raises(ValueError, match="retain_per_epoch must be a positive int, got True"):
        finetune(nn.Linear(6, 3), data, targets, epochs=1, forget_mask=mask,
                 retain_per_epoch=True, progress=False)
    for lr in ("0.01", None):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            finetune(nn.Linear(6, 3), data, targets, epochs=1, lr=lr, progress=False)


def test_data_forms_are_named():
    data, targets = toy()
    x = data.tensors[0]
    with pytest.raises(ValueError, match=r"data\[0\] is a Tensor; expected an \(x, y\) pair"):
        finetune(nn.Linear(6, 3), ItemsDataset(x), targets, epochs=1, progress=False)
    with pytest.raises(ValueError, match="data: empty"):
        finetune(nn.Linear(6, 3), TensorDataset(x[:0]), targets[:0], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"model: its forward pass on data\[0\] \(a float64"):
        finetune(nn.Linear(6, 3), TensorDataset(x.double()), targets, epochs=1, progress=False)
    # (x,) items: the labels are unused.
    finetune(nn.Linear(6, 3), TensorDataset(x), targets, epochs=1, progress=False)


def test_nothing_left_to_train_is_named():
    data, targets = toy()
    model = nn.Linear(6, 3)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"trainable='all' selects 2 parameters and the caller froze"):
        finetune(model, data, targets, epochs=1, progress=False)


def test_non_finite_inputs_are_named_not_blamed_on_the_step_size():
    data, targets = toy()
    x = data.tensors[0].clone()
    x[7, 2] = math.nan
    with pytest.raises(ValueError, match="data: example 7 holds NaN"):
        finetune(nn.Linear(6, 3), TensorDataset(x), targets, epochs=1, lr=1e-5, progress=False)


def test_a_lone_example_with_batchnorm1d_is_named():
    x = torch.randn(1, 6)
    with pytest.raises(ValueError, match="data: a batch of one example cannot train"):
        finetune(BNNet(), TensorDataset(x), torch.full((1, 3), 1 / 3), epochs=1, progress=False)


def test_mid_epoch_evaluations_are_labelled_with_the_share_trained():
    data, targets = toy(n=16)
    res = finetune(nn.Linear(6, 3), data, targets, epochs=1, batch_size=8, evals_per_epoch=3,
                   evaluate=lambda m: {}, progress=False)
    assert [h["epoch"] for h in res.history] == [0, 0.5, 1]  # 1 of 2 batches, not "0.666667"
    data, targets = toy(n=24)
    res = finetune(nn.Linear(6, 3), data, targets, epochs=1, batch_size=8, evals_per_epoch=2,
                   evaluate=lambda m: {}, progress=False)
    assert [h["epoch"] for h in res.history] == [0, 0.666667, 1]  # 2 of 3 batches


def test_a_side_with_no_rows_has_no_loss():
    data, targets = toy()
    res = finetune(nn.Linear(6, 3), data, targets, epochs=1, progress=False, forget_kl=0.1,
                   forget_mask=torch.zeros(32, dtype=torch.bool))
    assert math.isnan(res.history[-1]["forget_loss"]) and res.history[-1]["retain_loss"] > 0
    res = finetune(nn.Linear(6, 3), data, targets, epochs=1, progress=False, forget_kl=0.1,
                   forget_mask=torch.ones(32, dtype=torch.bool))
    assert math.isnan(res.history[-1]["retain_loss"]) and res.history[-1]["forget_loss"] > 0


class SlowFirst(Dataset):
    """Its first read takes 0.3 s: time the call spends before training."""

    def __init__(self, data):
        self.data, self.slept = data, False

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if not self.slept:
            self.slept = True
            time.sleep(0.3)
        return self.data[i]


def test_wall_seconds_count_from_the_call():
    data, targets = toy()
    res = finetune(nn.Linear(6, 3), SlowFirst(data), targets, epochs=1, progress=False)
    assert res.history[0]["wall_seconds"] >= 0.3


def test_adam_records_no_momentum(tiny_split):
    model, forget, retain = tiny_split
    res = ppu_fast.unlearn(model, forget, retain, method="ppu", optimizer="adam", lr=1e-3,
                           epochs=1, progress=False)
    assert res.options["momentum"] is None
    res = ppu_fast.unlearn(model, forget, retain, method="ppu", epochs=1, progress=False)
    assert res.options["momentum"] == 0.9


@pytest.mark.gpu
def test_labels_and_images_kept_on_the_gpu():
    """Labels and images that live on the GPU (GPU-resident pipelines keep them there): the
    metrics, ArrayDataset, its cache key and the label reader take them as the CPU copies (numpy
    cannot read a GPU tensor), and a baseline run on the CPU over GPU batches trains on the
    batches' values (their copies to the CPU were asynchronous, and could be read before they
    arrived)."""
    from ppu_fast import metrics
    from ppu_fast.data import ArrayDataset, dataset_targets

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    want = metrics.true_class_features(logits, labels)
    got = metrics.true_class_features(logits.cuda(), labels.cuda())
    assert all(np.array_equal(got[key], want[key]) for key in want)
    pixels = torch.randint(0, 256, (20, 8, 8, 3), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, 4, (20,), generator=g)
    on_cpu, on_gpu = ArrayDataset(pixels, targets), ArrayDataset(pixels.cuda(), targets.cuda())
    assert torch.equal(dataset_targets(on_gpu), targets)
    assert on_gpu.fingerprint_bytes() == on_cpu.fingerprint_bytes()
    _, forget, retain = _split()
    gpu_data = [TensorDataset(*(t.cuda() for t in ds.tensors)) for ds in (forget, retain)]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    runs = [ppu_fast.unlearn(net, f, r, method="neggrad+", epochs=2, device="cpu", progress=False)
            for f, r in ((forget, retain), gpu_data)]
    assert same(state(runs[0].model), state(runs[1].model))


@pytest.mark.gpu
def test_targets_on_the_gpu():
    data, targets = toy()
    model = nn.Linear(6, 3).cuda()
    res = finetune(model, data, targets.cuda(), epochs=1, progress=False)
    assert res.model.weight.is_cuda
    _, forget, retain = _split()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).cuda()
    for method in ("ppu", "ppu-bias"):
        res = ppu_fast.unlearn(net, forget, retain, method=method, epochs=1, progress=False)
        assert next(res.model.parameters()).is_cuda
