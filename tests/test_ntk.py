"""NTK forgetting (ppu_fast/unlearn/ntk.py) against closed forms computed here independently: a linear
model's Jacobian written out by hand, the kernel ridge solved in its primal form with numpy in float64;
the network Jacobian against SCRUB's one-logit-at-a-time backward passes; the trapezium scale on
vectors with known angles; a run on digits5 and the memory cap."""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from ppu_fast.data import make_split
from ppu_fast.metrics import error
from ppu_fast.models import build_model
from ppu_fast.unlearn import method_options, unlearn
from ppu_fast.unlearn.ntk import JacobianTooLarge, output_jacobian, predicted_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_problem(n_retain=30, n_forget=6, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_retain + n_forget, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n_retain + n_forget,), generator=g)
    model = nn.Linear(d, k).double()
    init = copy.deepcopy(model)
    with torch.no_grad():
        model.weight.add_(torch.randn(k, d, generator=g, dtype=torch.float64))
        model.bias.add_(torch.randn(k, generator=g, dtype=torch.float64))
    retain = TensorDataset(x[:n_retain], y[:n_retain])
    forget = TensorDataset(x[n_retain:], y[n_retain:])
    return model, init, retain, forget


def closed_form_step(model, x_r, y_r, x_f, y_f, *, wd, loss):
    """w_retain - w_complete of the linearised (here: exact) model, primal ridge form, numpy float64:
    w = -(G^T G + n wd I)^-1 G^T r with G's row (i, c) = d f_c(x_i) / d(W, b) written out by hand."""
    W = model.weight.detach().numpy()
    b = model.bias.detach().numpy()
    k, d = W.shape

    def design(x):
        rows = []
        for xi in x:
            for c in range(k):
                dW = np.zeros((k, d))
                dW[c] = xi
                db = np.zeros(k)
                db[c] = 1.0
                rows.append(np.concatenate([dW.ravel(), db]))
        return np.array(rows)

    def resid(x, y):
        f = x @ W.T + b
        if loss == "ce":
            f = np.exp(f - f.max(axis=1, keepdims=True))
            f /= f.sum(axis=1, keepdims=True)
        return (f - np.eye(k)[y]).ravel()

    def ridge(G, r, n):
        return -np.linalg.solve(G.T @ G + n * wd * np.eye(G.shape[1]), G.T @ r)

    x_all, y_all = np.concatenate([x_r, x_f]), np.concatenate([y_r, y_f])
    w_complete = ridge(design(x_all), resid(x_all, y_all), len(x_all))
    w_retain = ridge(design(x_r), resid(x_r, y_r), len(x_r))
    return w_retain - w_complete, w_retain


def flat(model):
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_linear_model_step_equals_the_closed_form(loss):
    model, init, retain, forget = linear_problem()
    x_r, y_r = (t.numpy() for t in retain.tensors)
    x_f, y_f = (t.numpy() for t in forget.tensors)
    delta, _ = closed_form_step(model, x_r, y_r, x_f, y_f, wd=0.1, loss=loss)
    res = unlearn(model, forget, retain, method="ntk", scale=1.0, loss=loss, progress=False)
    got = flat(res.model) - flat(model)
    assert np.linalg.norm(delta) > 1e-3  # a step that a wrong formula could miss
    np.testing.assert_allclose(got, delta, rtol=1e-9, atol=1e-11)
    assert res.options["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-9)


def test_linear_model_predicted_scale_follows_the_trapezium_rule():
    model, init, retain, forget = linear_problem(seed=1)
    x_r, y_r = (t.numpy() for t in retain.tensors)
    x_f, y_f = (t.numpy() for t in forget.tensors)
    delta, w_retain = closed_form_step(model, x_r, y_r, x_f, y_f, wd=0.1, loss="ce")
    m = flat(model) - flat(init) - w_retain
    c = float(np.dot(delta, m) / np.linalg.norm(delta) / np.linalg.norm(m))
    angle = math.acos(c)
    length = np.linalg.norm(delta) + (2 * math.cos(angle) * np.linalg.norm(m) if c >= 0 else
                                      2 * math.sin(angle - math.pi / 2) * np.linalg.norm(m))
    scale = length / np.linalg.norm(delta)
    res = unlearn(model, forget, retain, method="ntk", init=init, progress=False)
    assert res.options["scale"] == pytest.approx(scale, rel=1e-9)
    np.testing.assert_allclose(flat(res.model) - flat(model), scale * delta, rtol=1e-8, atol=1e-10)


def test_predicted_scale_on_known_angles():
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert predicted_scale(e1, 2 * e1) == pytest.approx(1 + 2 * 2)          # parallel: |d| + 2|m|
    assert predicted_scale(e1, e2) == pytest.approx(1.0)                    # orthogonal: cos = 0
    # 135 degrees: angle - 90 = 45 degrees, |d| + 2 sin(45) |m|
    assert predicted_scale(e1, 2 * (e2 - e1) / math.sqrt(2)) == pytest.approx(1 + 2 * math.sqrt(2))
    assert predicted_scale(0 * e1, e2) == 1.0


def test_network_jacobian_equals_scrubs_backward_passes():
    torch.manual_seed(0)
    model = build_model("smallcnn", 5, 1, width=0.25).eval()
    x = torch.randn(3, 1, 8, 8)
    data = TensorDataset(x, torch.tensor([0, 1, 2]))
    J, logits, labels = output_jacobian(model, data, device=torch.device("cpu"), chunk=2)
    # SCRUB's delta_w_utils: one example at a time, one backward pass per logit
    rows = []
    for i in range(3):
        out = model(x[i:i + 1])
        for c in range(5):
            grads = torch.autograd.grad(out[0, c], list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    expected = torch.stack(rows)
    assert J.shape == expected.shape == (15, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(J, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, model(x).detach())
    assert labels.tolist() == [0, 1, 2]


@pytest.fixture(scope="module")
def digits_model():
    torch.set_num_threads(1)
    split = make_split("digits5", seed=0)
    torch.manual_seed(0)
    init = build_model("smallcnn", 5, 1, width=0.25)
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        for x, y in torch.utils.data.DataLoader(split.train, batch_size=32, shuffle=True,
                                                generator=torch.Generator().manual_seed(0)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return split, init, model.eval()


def test_runs_on_digits5_in_seconds(digits_model):
    split, init, model = digits_model
    before = error(model, split.retain)
    t0 = time.perf_counter()
    res = unlearn(model, split.forget, split.retain, method="ntk", init=init, progress=False)
    seconds = time.perf_counter() - t0
    assert seconds < 30, f"ntk took {seconds:.1f} s on digits5 (500 examples, small CNN width 0.25)"
    assert res.method == "ntk" and res.options["scale_rule"] == "predicted"
    assert math.isfinite(res.options["scale"]) and res.options["delta_norm"] > 0
    moved = flat(res.model) - flat(model)
    assert np.all(np.isfinite(moved)) and np.linalg.norm(moved) > 0
    # a small step along the retain-only ridge direction: the retain set stays fitted
    assert error(res.model, split.retain) <= before + 10


def test_memory_cap_refuses_clearly(digits_model):
    split, init, model = digits_model
    t0 = time.perf_counter()
    with pytest.raises(JacobianTooLarge, match=r"475 retain \+ 25 forget\) x 5 classes x \d+ parameters.*"
                                               r"max_jacobian_gib=1e-05"):
        unlearn(model, split.forget, split.retain, method="ntk", init=init, max_jacobian_gib=1e-5,
                progress=False)
    assert time.perf_counter() - t0 < 5  # refused before any Jacobian was computed
    assert issubclass(JacobianTooLarge, ValueError)


def test_bad_options_are_named():
    model, init, retain, forget = linear_problem()
    with pytest.raises(ValueError, match="needs init"):
        unlearn(model, forget, retain, method="ntk", progress=False)
    with pytest.raises(ValueError, match="loss must be one of ce, mse"):
        unlearn(model, forget, retain, method="ntk", scale=1.0, loss="hinge", progress=False)
    with pytest.raises(ValueError, match="max_jacobian_gib must be a positive number"):
        unlearn(model, forget, retain, method="ntk", scale=1.0, max_jacobian_gib=0, progress=False)
    with pytest.raises(ValueError, match="init.*shape"):
        unlearn(model, forget, retain, method="ntk", init=nn.Linear(5, 3).double(), progress=False)
    assert method_options("ntk")["weight_decay"] == 0.1


def test_the_runner_skips_a_refused_ntk(tmp_path, monkeypatch):
    from ppu_fast.unlearn.experiment import run_experiment

    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path / "cache"))
    res = run_experiment(dataset="digits5", model="smallcnn", width=0.25, methods=["original", "ntk"],
                         seeds=[0], train={"epochs": 1}, method_kwargs={"ntk": {"max_jacobian_gib": 1e-6}},
                         progress=False, log=None)
    assert list(res["per_seed"][0]) == ["original"]
    assert "max_jacobian_gib=1e-06" in res["config"]["skipped"]["ntk"]
