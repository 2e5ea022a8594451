"""The paper's measurements: error (%) on a set and the membership-inference attack of SCRUB
(Kurmanji et al. 2024), which the paper follows (§5.5)."""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .data import dataset_targets, make_loader
from .training import model_device


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


@torch.no_grad()
def predict(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256,
            device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, k) and labels (N,) of ``model`` on ``data`` in eval mode, on CPU. The model's
    train/eval mode is restored afterwards."""
    _check_model(model)
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in make_loader(data, batch_size):
            logits.append(model(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def error(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256,
          device: str | torch.device | None = None) -> float:
    """Classification error of ``model`` on ``data`` in percent (0-100); NaN for an empty set."""
    logits, labels = predict(model, data, batch_size=batch_size, device=device)
    if len(labels) == 0:
        return float("nan")
    return 100.0 * float((logits.argmax(1) != labels).float().mean())


def losses(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256,
           device: str | torch.device | None = None) -> np.ndarray:
    """Per-example cross-entropy losses (N,) of ``model`` on ``data`` in eval mode."""
    logits, labels = predict(model, data, batch_size=batch_size, device=device)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.float32)
    return F.cross_entropy(logits, labels, reduction="none").numpy()


def _attack(forget_losses: Sequence[float], test_losses: Sequence[float],
            seed: int) -> tuple[np.ndarray, int, int]:
    # The split accuracies (fractions), the examples per side after balancing, and the predictions
    # the splits score in all: what the mean rests on.
    forget_losses = [float(v) for v in np.asarray(forget_losses, dtype=np.float64).reshape(-1)]
    test_losses = [float(v) for v in np.asarray(test_losses, dtype=np.float64).reshape(-1)]
    if len(forget_losses) < 5 or len(test_losses) < 5:
        raise ValueError(f"the attack needs at least 5 forget and 5 test losses (5 splits); got "
                         f"{len(forget_losses)} forget and {len(test_losses)} test")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    np.random.seed(seed)
    random.seed(seed)
    if len(forget_losses) > len(test_losses):
        forget_losses = list(random.sample(forget_losses, len(test_losses)))
    elif len(test_losses) > len(forget_losses):
        test_losses = list(random.sample(test_losses, len(forget_losses)))
    labels = np.array([0] * len(test_losses) + [1] * len(forget_losses))
    features = np.clip(np.array(test_losses + forget_losses).reshape(-1, 1), -100, 100)
    cv = StratifiedShuffleSplit(n_splits=5, random_state=seed)
    scores = cross_val_score(LogisticRegression(), features, labels, cv=cv)
    scored = sum(len(test) for _, test in cv.split(features, labels))
    return np.asarray(scores, dtype=np.float64), len(forget_losses), scored


def mia_from_losses(forget_losses: Sequence[float], test_losses: Sequence[float], seed: int = 0) -> float:
    """The attack of SCRUB on given losses: attacker accuracy in percent (50 is ideal).

    The larger side is cut to the smaller with ``random.sample`` after ``random.seed(seed)``; labels are
    test 0, forget 1; features (n, 1) clipped to [-100, 100]; a default ``LogisticRegression`` is scored
    by ``cross_val_score`` over ``StratifiedShuffleSplit(n_splits=5, random_state=seed)``; the mean
    accuracy x 100 is returned.
    """
    scores, _, _ = _attack(forget_losses, test_losses, seed)
    return 100.0 * float(np.mean(scores))


def restrict_to_classes(data: Dataset | DataLoader, classes: Sequence[int]) -> Subset:
    """The examples of ``data`` whose label is in ``classes``."""
    if isinstance(data, DataLoader):
        data = data.dataset
    targets = dataset_targets(data)
    keep = torch.isin(targets, torch.as_tensor(list(classes), dtype=torch.long))
    return Subset(data, torch.nonzero(keep).view(-1).tolist())


def _attack_losses(model: nn.Module, forget: Dataset | DataLoader, test: Dataset | DataLoader,
                   batch_size: int, device: str | torch.device | None) -> tuple[np.ndarray, np.ndarray]:
    classes = dataset_targets(forget).unique().tolist()
    if not classes:
        raise ValueError("forget is empty: the attack needs forget examples")
    test_same = restrict_to_classes(test, classes)
    if len(test_same) == 0:
        raise ValueError(f"test has no examples of the forget classes {classes}")
    return (losses(model, forget, batch_size=batch_size, device=device),
            losses(model, test_same, batch_size=batch_size, device=device))


def mia(model: nn.Module, forget: Dataset | DataLoader, test: Dataset | DataLoader, *, seed: int = 0,
        batch_size: int = 256, device: str | torch.device | None = None) -> float:
    """Membership-inference attack accuracy in percent (50 is ideal: the attacker cannot tell the forget
    set from unseen data). Test examples are restricted to the classes present in ``forget``, as in
    SCRUB; see :func:`mia_from_losses` for the attack itself."""
    f, t = _attack_losses(model, forget, test, batch_size, device)
    return mia_from_losses(f, t, seed=seed)


def mia_detail(model: nn.Module, forget: Dataset | DataLoader, test: Dataset | DataLoader, *,
               seed: int = 0, batch_size: int = 256,
               device: str | torch.device | None = None) -> dict[str, float | int | list[float]]:
    """:func:`mia` with what it rests on: ``{"mia": mean accuracy (%), "splits": the 5 split
    accuracies (%), "n": examples per side, "scored": predictions scored in all, "chance": the
    standard error (% points) of an accuracy of 50 % over ``scored`` coin flips}``. ``chance`` is how
    far the score of an attacker that knows nothing strays from 50 by luck at this size."""
    f, t = _attack_losses(model, forget, test, batch_size, device)
    scores, n, scored = _attack(f, t, seed)
    return {"mia": 100.0 * float(np.mean(scores)), "splits": [100.0 * float(s) for s in scores], "n": int(n),
            "scored": int(scored), "chance": 50.0 / float(np.sqrt(scored))}
