"""The KL fine-tuning loop."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ppu_fast.finetune import finetune, select_val


pytestmark = pytest.mark.usefixtures("one_thread")


def toy(n=64, d=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    targets = torch.softmax(2 * torch.randn(n, k, generator=g), dim=1)
    torch.manual_seed(seed)
    return nn.Linear(d, k), TensorDataset(x, torch.zeros(n, dtype=torch.long)), targets, x


def kl(model, x, targets):
    with torch.no_grad():
        return float(nn.functional.kl_div(model(x).log_softmax(1), targets, reduction="batchmean"))


def test_loss_falls_and_toy_model_reaches_targets():
    # A linear model on 6 features reaches targets that are themselves softmax(linear) outputs.
    model, data, _, x = toy()
    teacher = nn.Linear(6, 4)
    with torch.no_grad():
        targets = torch.softmax(teacher(x), dim=1)
    res = finetune(model, data, targets, epochs=60, lr=0.5, batch_size=16, progress=False)
    losses = [h["loss"] for h in res.history[1:]]
    assert losses[-1] < 0.05 * losses[0]
    assert kl(res.model, x, targets) < 1e-3
    assert res.selected_epoch == 60 and res.seconds > 0


def test_caller_model_untouched_unless_inplace():
    model, data, targets, _ = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune(model, data, targets, epochs=2, progress=False)
    assert res.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res = finetune(model, data, targets, epochs=2, progress=False, inplace=True)
    assert res.model is model and not torch.equal(before["weight"], model.weight)


def test_adam_and_seed_reproducible():
    model, data, targets, x = toy()
    a = finetune(model, data, targets, epochs=3, optimizer="adam", lr=0.01, seed=5, progress=False)
    b = finetune(model, data, targets, epochs=3, optimizer="adam", lr=0.01, seed=5, progress=False)
    assert torch.equal(a.model.weight, b.model.weight)


def test_retain_subsample_per_epoch_uses_forget_rows_and_some_retain():
    model, data, targets, _ = toy(n=40)
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, x):
            seen.append(len(x))
            return self.lin(x)

    mask = torch.zeros(40, dtype=torch.bool)
    mask[:5] = True
    finetune(Spy(), data, targets, epochs=2, batch_size=100, forget_mask=mask, retain_per_epoch=7,
             progress=False)
    assert seen == [1, 12, 12]  # the one-example probe of the output's shape, then two epochs
    # more than the 35 retain rows: all of them, and the caller is told (scikit-learn's convention)
    seen.clear()
    with pytest.warns(UserWarning, match="retain_per_epoch=50 is more than the 35 retain rows"):
        finetune(Spy(), data, targets, epochs=1, batch_size=100, forget_mask=mask,
                 retain_per_epoch=50, progress=False)
    assert seen == [1, 40]


def test_val_selection_and_custom_policy():
    model, data, targets, _ = toy()
    calls = iter([{"forget_error": 0.0, "val_error": 20.0},   # epoch 0 (never selected)
                  {"forget_error": 0.0, "val_error": 20.0},
                  {"forget_error": 18.0, "val_error": 20.0},  # closest
                  {"forget_error": 60.0, "val_error": 20.0}])
    res = finetune(model, data, targets, epochs=3, evaluate=lambda m: next(calls), select="val",
                   progress=False)
    assert res.selected_epoch == 2 and [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    # the model holds epoch 2's weights: re-running 2 epochs with the same seed gives them
    two = finetune(model, data, targets, epochs=2, progress=False)
    assert torch.allclose(res.model.weight, two.model.weight)
    res = finetune(model, data, targets, epochs=3, select=lambda h: 1, progress=False)
    assert res.selected_epoch == 1


def test_select_val_rule():
    hist = [{"epoch": 0, "forget_error": 5.0, "val_error": 5.0},
            {"epoch": 1, "forget_error": 30.0, "val_error": 10.0},
            {"epoch": 2, "forget_error": 12.0, "val_error": 10.0},
            {"epoch": 3, "forget_error": 8.0, "val_error": 10.0}]
    assert select_val(hist) == 2


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"targets": torch.full((10, 4), 0.25)}, ValueError, "rows but data has"),
    ({"targets": torch.randn(64, 4)}, ValueError, "non-negative|sum to 1"),
    ({"targets": torch.full((64,), 0.25)}, ValueError, "2-D"),
    ({"epochs": 0}, ValueError, "epochs"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"optimizer": "lbfgs"}, ValueError, "optimizer"),
    ({"select": "best"}, ValueError, "select"),
    ({"select": "val"}, ValueError, "evaluate"),
    ({"retain_per_epoch": 5}, ValueError, "forget_mask"),
    ({"model": "not a model"}, TypeError, "model"),
])
def test_bad_input(kwargs, exc, match):
    model, data, targets, _ = toy()
    args = {"model": model, "data": data, "targets": targets, **kwargs}
    with pytest.raises(exc, match=match):
        finetune(args.pop("model"), args.pop("data"), args.pop("targets"), progress=False, **args)
