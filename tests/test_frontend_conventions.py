"""Front-end conventions an outside review found broken (2026-12-06): the layer Fisher treats as
the classifier, labels read past a shortened dataset, Retrain and frozen BatchNorm, the
Retrain cache key on accepted inputs, numpy integers as sizes, ``selected_epoch`` and the
gradients a returned model holds."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ppu_fast import metrics
from ppu_fast.data import dataset_targets
from ppu_fast.training import TrainConfig, cache_key
from ppu_fast.unlearn import unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


def digits(n=300, k=5):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target[:n], dtype=torch.long) % k
    return x, y


def trained(model, x, y, epochs=8):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def encoder():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())


class HeadLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = encoder()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.f(x))


class HeadFirst(nn.Module):
    """The same function, the classifier registered before the encoder."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 5)
        self.f = encoder()

    def forward(self, x):
        return self.head(self.f(x))


class BNNet(nn.Module):
    def __init__(self, bn=nn.BatchNorm2d, c=4):
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c * 64, 5)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    forget = y == 2
    return x, y, TensorDataset(x[forget], y[forget]), TensorDataset(x[~forget], y[~forget])


def test_fisher_finds_the_classifier_whatever_order_init_registers_it(data):
    x, y, forget, retain = data
    a = trained(HeadLast(), x, y)
    b = HeadFirst()
    b.load_state_dict(a.state_dict())
    ra = unlearn(a, forget, retain, method="fisher", setting="class", max_samples=np.int64(64),
                 progress=False)
    rb = unlearn(b, forget, retain, method="fisher", setting="class", max_samples=64,
                 progress=False)
    # Class unlearning zeroes the forgotten class's row of the classifier (mean 0, tiny noise),
    # and the encoder's hidden unit 2 keeps its weights up to the encoder's noise.
    for r in (ra, rb):
        norm = lambda w: float(w.detach().norm())  # noqa: E731
        assert norm(r.model.head.weight[2]) < 0.1 * norm(a.head.weight[2])
        assert norm(r.model.f[3].weight[2]) > 0.5 * norm(a.f[3].weight[2])
    assert ra.options["max_samples"] == 64 and type(ra.options["max_samples"]) is int


class Truncated(Dataset):
    """The first n examples; keeps the whole ``targets`` of the data it wraps."""

    def __init__(self, x, y, n):
        self.x, self.targets, self.n = x, y, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return self.x[i], self.targets[i]


def test_targets_longer_than_the_dataset_are_not_read(data):
    x, y, _, _ = data
    t = Truncated(x, y, 40)
    assert torch.equal(dataset_targets(t), y[:40])
    full = Truncated(x, y, len(y))  # targets of its length: read without the items
    assert torch.equal(dataset_targets(full), y)


def test_retrain_keeps_a_frozen_batchnorm_and_its_statistics(data, tmp_path, monkeypatch):
    x, y, forget, retain = data
    model = trained(BNNet(), x, y)
    for p in [*model.conv.parameters(), *model.bn.parameters()]:
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    res = unlearn(model, forget, retain, method="retrain", progress=False, cache=False,
                  config=TrainConfig(epochs=2, batch_size=32))
    for k, v in res.model.bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(res.model.conv.weight, model.conv.weight)
    assert not torch.equal(res.model.head.weight, model.head.weight)
    assert res.selected_epoch == 2


class FrozenBackbone(nn.Module):
    """A backbone of a convolution and a parameter-free BatchNorm (affine=False), then a head."""

    def __init__(self, c=4):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c, affine=False),
                               nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(c * 64, 5)

    def forward(self, x):
        return self.head(self.f(x))


@pytest.mark.parametrize("method", ["retrain", "finetune", "ppu"])
def test_a_parameter_free_batchnorm_in_a_frozen_backbone_stays(data, method):
    """BatchNorm(affine=False) owns no parameters, so it was no "frozen module": Retrain reset its
    statistics and the loops trained them, under a backbone the caller froze."""
    x, y, forget, retain = data
    model = trained(FrozenBackbone(), x, y)
    for p in model.f.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.f[1].state_dict().items()}
    options = {"cache": False, "config": TrainConfig(epochs=1, batch_size=32)} \
        if method == "retrain" else {"epochs": 1}
    res = unlearn(model, forget, retain, method=method, progress=False, **options)
    for k, v in res.model.f[1].state_dict().items():
        assert torch.equal(v, before[k]), (method, k)
    assert not torch.equal(res.model.head.weight, model.head.weight)


def test_retrain_on_one_example_names_the_batchnorm_problem(data):
    x, y, _, _ = data
    mlp = trained(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                nn.Linear(16, 5)), x, y)
    with pytest.raises(ValueError, match="retrain: a batch of one example cannot train"):
        unlearn(mlp, TensorDataset(x[1:], y[1:]), TensorDataset(x[:1], y[:1]), method="retrain",
                progress=False, cache=False, config=TrainConfig(epochs=1))


class ArrayLabels(Dataset):
    """Items whose labels are (1,) numpy arrays (accepted by unlearn and the metrics)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], np.array([int(self.y[i])])


def test_cache_key_of_accepted_inputs(data):
    x, y, _, _ = data
    model = HeadLast()
    cfg = TrainConfig(epochs=1)
    k1 = cache_key(model, ArrayLabels(x[:20], y[:20]), cfg)
    assert k1 == cache_key(model, ArrayLabels(x[:20], y[:20]), cfg)
    assert k1 != cache_key(model, ArrayLabels(x[:20], (y[:20] + 1) % 5), cfg)
    bf = HeadLast().bfloat16()
    kb = cache_key(bf, TensorDataset(x[:20].bfloat16(), y[:20]), cfg)
    with torch.no_grad():
        bf.head.bias[0] += 1
    assert kb != cache_key(bf, TensorDataset(x[:20].bfloat16(), y[:20]), cfg)


def test_numpy_integers_as_sizes(data):
    x, y, forget, retain = data
    model = trained(HeadLast(), x, y, epochs=2)
    for method in ("bad-t", "cf-k", "eu-k"):
        extra = {} if method == "bad-t" else {"epochs": np.int64(1), "layers": ["f.3"]}
        res = unlearn(model, forget, retain, method=method, batch_size=np.int64(64),
                      progress=False, **extra)
        assert res.selected_epoch == 1
    assert metrics.error(model, retain, batch_size=np.int64(7)) == metrics.error(model, retain)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size: expected a positive int"):
            metrics.error(model, retain, batch_size=bad)


@pytest.mark.parametrize("method, options", [
    ("finetune", {"epochs": 3}), ("neggrad+", {"epochs": 3}), ("ppu", {"epochs": 3}),
    ("scrub", {"epochs": 3, "msteps": 1})])
def test_selected_epoch_and_no_stale_gradients(data, method, options):
    x, y, forget, retain = data
    model = trained(HeadLast(), x, y, epochs=2)
    res = unlearn(model, forget, retain, method=method, progress=False, **options)
    if method != "ppu":  # PPU stops where its schedule says (docs/ppu_schedule.md)
        assert res.selected_epoch == 3
    assert all(p.grad is None for p in res.model.parameters())


def test_a_float64_model_keeps_float64_logits_and_targets(data):
    """predict widened 16-bit outputs to float32 and also narrowed float64 ones to it, so a float64
    model's PPU targets were solved in float32."""
    x, y, forget, retain = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).double()
    xd = TensorDataset(x[:50].double(), y[:50])
    logits, _ = metrics.predict(model, xd)
    assert logits.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(logits, model(x[:50].double()))
    half, _ = metrics.predict(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).bfloat16(),
                              TensorDataset(x[:50].bfloat16(), y[:50]))
    assert half.dtype == torch.float32
    res = unlearn(model, TensorDataset(forget.tensors[0].double(), forget.tensors[1]),
                  TensorDataset(retain.tensors[0].double(), retain.tensors[1]), method="ppu",
                  epochs=1, progress=False)
    assert next(res.model.parameters()).dtype == torch.float64
    assert res.targets.dtype == torch.float64 and res.refine_info.converged
    # finetune trains a float64 model toward its float64 targets as given: targets that differ
    # below float32's resolution move the weights apart.
    from ppu_fast.finetune import finetune
    xs = TensorDataset(x[:40].double(), y[:40])
    t = torch.softmax(model(x[:40].double()).detach(), 1).float().double()
    t2 = t.clone()
    t2[:, 0] += 1e-10  # far below half a float32 ulp of these entries (~0.2)
    t2[:, 1] -= 1e-10
    assert torch.equal(t.float(), t2.float())
    runs = [finetune(model, xs, tt, epochs=1, lr=1.0, progress=False).model for tt in (t, t2)]
    assert not torch.equal(runs[0][1].weight, runs[1][1].weight)


def test_frozen_modules_take_stateful_leaves_only_and_shared_ones_consistently():
    """A parameter-free wrapper owning a buffer (a position-ids buffer beside a Dropout) is no
    frozen module: eval() on it switched off the Dropout below it. A parameter-free BatchNorm
    shared by a frozen and a trainable block is not frozen, whichever block comes first."""
    from ppu_fast.caller_state import frozen_modules

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("position_ids", torch.arange(3))
            self.lin, self.drop = nn.Linear(3, 3), nn.Dropout(0.5)

    model = nn.Sequential(Embeddings(), nn.Linear(3, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    assert frozen_modules(model) == [model[0].lin]
    bn = nn.BatchNorm1d(3, affine=False)
    frozen, trained = nn.Sequential(nn.Linear(3, 3), bn), nn.Sequential(nn.Linear(3, 3), bn)
    for p in frozen.parameters():
        p.requires_grad_(False)
    for order in ((frozen, trained), (trained, frozen)):
        assert frozen_modules(nn.Sequential(*order)) == [frozen[0]]
    assert frozen_modules(nn.Sequential(frozen)) == [frozen[0], bn]


class Float32ThenFloat64(nn.Module):
    """A float32 first layer, then a float64 head: float64 logits from a float32 input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 5).double()

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).double())


def test_finetune_keeps_float64_targets_for_float64_logits(data):
    """finetune chose float64 targets by the first parameter's dtype; a model whose logits are
    float64 behind a float32 first layer had its float64 targets rounded to float32."""
    from ppu_fast.finetune import finetune

    x, y, _, _ = data
    torch.manual_seed(0)
    model = Float32ThenFloat64()
    xs = TensorDataset(x[:40], y[:40])
    with torch.no_grad():
        t = torch.softmax(model(x[:40]), 1).float().double()
    t2 = t.clone()
    t2[:, 0] += 1e-10  # far below half a float32 ulp of these entries
    t2[:, 1] -= 1e-10
    runs = [finetune(model, xs, tt, epochs=1, lr=1.0, progress=False).model for tt in (t, t2)]
    assert not torch.equal(runs[0].head.weight, runs[1].head.weight)
