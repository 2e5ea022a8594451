"""The paper's measurements: error (%) on a set and the membership-inference attack of SCRUB
(Kurmanji et al. 2024), which the paper follows (§5.5); beside it, an attack with signal at low false
positive rates (a population / offline LiRA-style score, :func:`lira`) reported as ROC AUC and TPR at a
fixed FPR; and the retrain gap (:func:`retrain_gap`), the mean distance to Retrain's numbers."""
from __future__ import annotations

import math
import random
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .caller_state import _dtype_name, eval_mode, forward_failed, is_int, is_real
from .data import (check_map_style, dataset_targets, host_array, loader_examples, make_loader,
                   named_batches)
from .training import resolve_device


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_logits(out: object, n_inputs: int, floating: bool = False) -> None:
    """Refuse a model output that is not (B, k) logits for a batch of ``n_inputs`` inputs;
    ``floating``: also one that is not floating-point (training takes its log_softmax and
    gradient; the metrics here widen integer scores to float32 and only rank them)."""
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: its output for a batch of {n_inputs} input(s) is {shape}; "
                         f"expected (B, k) logits")
    if out.shape[0] != n_inputs:
        # e.g. a flatten by view(-1, features) of the wrong size: the rows no longer match the
        # labels, and predict returned them side by side.
        raise ValueError(f"model: its output for a batch of {n_inputs} input(s) has "
                         f"{out.shape[0]} rows; expected one row of logits per input, (B, k)")
    if out.is_complex():
        # The metrics' float cast dropped the imaginary part (numpy's ComplexWarning only).
        raise ValueError(f"model: its output is {str(out.dtype).split('.')[-1]}; expected real "
                         f"(B, k) logits")
    if floating and not out.is_floating_point():
        # An integer or complex output failed deep inside log_softmax, or in backward.
        raise ValueError(f"model: its output is {str(out.dtype).split('.')[-1]}; expected "
                         f"floating-point (B, k) logits")


def predict(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256,
            device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, k) and labels (N,) of ``model`` on ``data`` in eval mode, on CPU: float32
    logits (16-bit outputs widened), float64 for a model that outputs float64. Each module's
    train/eval mode is restored afterwards. ``device``: where the model runs, which is where its
    parameters are (None: there; another device is refused, as for every metric here: they never
    move the caller's model)."""
    return _predict(model, data, batch_size, device, "data")


def _check_model_on(model: nn.Module, device: torch.device, asked: object) -> None:
    """Refuse a ``device`` other than the one ``model``'s parameters are on: the metrics run the
    model where it is (moving a caller's model is a side effect an evaluation must not have), so
    inputs sent elsewhere could only fail inside the forward pass, under a misleading message."""
    p = next(iter(model.parameters()), None)
    if p is None or asked is None:
        return
    here = p.device

    def index(d: torch.device):
        if d.type == "cpu":  # torch's CPU tensors carry no index: "cpu:1" is the CPU
            return None
        return d.index if d.index is not None or d.type != "cuda" else torch.cuda.current_device()

    if here.type != device.type or index(here) != index(device):
        raise ValueError(f"device: {str(asked)!r}, but the model's parameters are on {here}; the "
                         f"metrics run the model where it is and never move it: move the model "
                         f"first (model.to({str(asked)!r})) or leave device=None")


@torch.no_grad()
def _predict(model: nn.Module, data: Dataset | DataLoader, batch_size: int,
             device: str | torch.device | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    # ``name``: the caller's argument that ``data`` is, for the error messages (mia's "forget").
    _check_model(model)
    _check_data(data, name)
    asked = device
    device = resolve_device(model, device)
    _check_model_on(model, device, asked)
    logits, labels = [], []
    with eval_mode(model):
        for batch in named_batches(make_loader(data, batch_size, name=name), name):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"{name}: a batch is a {type(batch).__name__}"
                                 f"{f' of {len(batch)} items' if hasattr(batch, '__len__') else ''}"
                                 f"; expected (x, y) pairs of an input and an integer label")
            x, y = batch
            try:
                out = model(x.to(device))
            except (RuntimeError, TypeError) as exc:
                raise forward_failed(model, name, f"a batch of {_dtype_name(x)} "
                                                    f"inputs of shape {tuple(x.shape[1:])}", exc) from None
            check_logits(out, len(x))
            # A float64 model keeps its precision (PPU solves its targets in float64 then).
            logits.append((out if out.dtype == torch.float64 else out.float()).cpu())
            labels.append(_batch_labels(y, len(x), name))
    if not logits:
        return torch.zeros(0, 0, device="cpu"), torch.zeros(0, dtype=torch.long, device="cpu")
    logits_all, labels_all = torch.cat(logits), torch.cat(labels)
    k = logits_all.shape[1]
    if k < 2:
        raise ValueError(f"model: its output has {k} logit per example; expected (B, k) logits of a "
                         f"classifier with k >= 2 classes (argmax over one column names class 0 always)")
    if len(labels_all) and (int(labels_all.min()) < 0 or int(labels_all.max()) >= k):
        raise ValueError(f"{name}: labels must lie in [0, {k}) for a model with {k} logits; got values in "
                         f"[{int(labels_all.min())}, {int(labels_all.max())}]")
    return logits_all, labels_all


def _batch_labels(y: object, n: int, name: str) -> torch.Tensor:
    # One batch's labels as a (B,) long tensor. (B, 1) is flattened (a common TensorDataset layout,
    # which broadcasting against (B,) predictions would silently turn into B x B comparisons).
    try:
        t = torch.as_tensor(y, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        kinds = sorted({type(v).__name__ for v in y}) if isinstance(y, (list, tuple)) else [
            type(y).__name__]
        raise ValueError(f"{name}: labels of type {', '.join(kinds)}; expected integer class "
                         f"indices") from None
    if t.ndim == 2 and t.shape[1] == 1:
        t = t.reshape(-1)
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"{name}: a batch of {n} input(s) has labels of shape {tuple(t.shape)}; expected "
                         f"({n},) integer class indices")
    return _integer_labels(t, f"{name}: ")


def _integer_labels(t: torch.Tensor, who: str) -> torch.Tensor:
    """Labels as int64, refused when not integers (a cast would truncate 1.7 to class 1); ``who``
    prefixes the message (the argument)."""
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{who}labels are {str(t.dtype).replace('torch.', '')}; expected integer "
                         f"class indices")
    return t.long()


def error(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256,
          device: str | torch.device | None = None) -> float:
    """Classification error of ``model`` on ``data`` in percent (0-100). An example with a NaN
    logit counts as an error (it has no prediction; argmax of NaN logits would name class 0). An
    empty ``data`` is refused (ValueError), as scikit-learn's ``accuracy_score`` refuses it: an
    error rate over no examples is no number, and a NaN would travel into tables unnoticed."""
    logits, labels = predict(model, data, batch_size=batch_size, device=device)
    if len(labels) == 0:
        raise ValueError("data: empty; expected at least one (x, y) example to score")
    right = (logits.argmax(1) == labels) & ~torch.isnan(logits).any(1)
    return 100.0 * float((~right).float().mean())


def losses(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256,
           device: str | torch.device | None = None) -> np.ndarray:
    """Per-example cross-entropy losses (N,) of ``model`` on ``data`` in eval mode."""
    return _losses(model, data, batch_size, device, "data")


def _losses(model: nn.Module, data: Dataset | DataLoader, batch_size: int,
            device: str | torch.device | None, name: str) -> np.ndarray:
    logits, labels = _predict(model, data, batch_size, device, name)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.float32)
    return F.cross_entropy(logits, labels, reduction="none").numpy()


# StratifiedShuffleSplit(test_size=0.1) must put one example of each side in a split's test part:
# ceil(0.1 * 2n) >= 2 needs n >= 6.
MIA_MIN_PER_SIDE = 6


def _attack_losses_list(values: Sequence[float], name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        raw = np.asarray(values)
    except (TypeError, ValueError):  # ragged nested sequences
        raw = np.asarray(None)
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw.reshape(-1)  # a column of losses, as (B, 1) labels are read
    if raw.ndim != 1 or raw.dtype.kind not in "iuf":
        # None read as [nan] ("contains NaN"), strings failed in float(), a (10, 2) array was
        # flattened into 20 losses.
        what = (type(values).__name__ if raw.dtype == object
                else f"an array of shape {raw.shape} and dtype {raw.dtype}")
        raise TypeError(f"{name}: expected a 1-D sequence of numbers (one loss per example), got "
                        f"{what}")
    v = raw.astype(np.float64)
    if np.isnan(v).any():
        raise ValueError(f"{name} contains NaN at position {int(np.flatnonzero(np.isnan(v))[0])} (a NaN "
                         f"or infinite logit?); the attack needs a finite loss for every example")
    return [float(x) for x in v]


def _attack(forget_losses: Sequence[float], test_losses: Sequence[float],
            seed: int) -> tuple[np.ndarray, int, int]:
    # The split accuracies (fractions), the examples per side after balancing, and the predictions
    # the splits score in all: what the mean rests on.
    forget_losses = _attack_losses_list(forget_losses, "forget_losses")
    test_losses = _attack_losses_list(test_losses, "test_losses")
    if len(forget_losses) < MIA_MIN_PER_SIDE or len(test_losses) < MIA_MIN_PER_SIDE:
        raise ValueError(f"the attack needs at least {MIA_MIN_PER_SIDE} forget and {MIA_MIN_PER_SIDE} "
                         f"test losses (its splits test 10 % of the examples, at least one of each "
                         f"side); got {len(forget_losses)} forget and {len(test_losses)} test")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    if seed is not None and (not is_int(seed) or not 0 <= seed < 2 ** 32):
        raise ValueError(f"seed={seed!r}: expected None or an integer in [0, 2**32 - 1] (scikit-learn's "
                         f"random_state, which the attack's splits take)")
    # SCRUB seeds Python's global `random` before sampling; a private Random(seed) draws the same
    # sample without reseeding the caller's stream.
    rng = random.Random(None if seed is None else int(seed))  # not np.int64 (Python >= 3.11)
    if len(forget_losses) > len(test_losses):
        forget_losses = list(rng.sample(forget_losses, len(test_losses)))
    elif len(test_losses) > len(forget_losses):
        test_losses = list(rng.sample(test_losses, len(forget_losses)))
    labels = np.array([0] * len(test_losses) + [1] * len(forget_losses))
    features = np.clip(np.array(test_losses + forget_losses).reshape(-1, 1), -100, 100)
    cv = StratifiedShuffleSplit(n_splits=5, random_state=seed)
    scores = cross_val_score(LogisticRegression(), features, labels, cv=cv)
    splits = list(cv.split(features, labels))
    scored = sum(len(test) for _, test in splits)
    return (np.asarray(scores, dtype=np.float64), len(forget_losses), scored,
            (features[:, 0], labels, splits))


# Draws of the attack's null distribution (mia_detail's chance): the spread's relative standard
# error is about 1 / sqrt(2 * draws), 5 % at 200.
MIA_NULL_DRAWS = 200


def _logistic_1d(x: np.ndarray, y: np.ndarray, iters: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(w, b), each (P,), of scikit-learn's default ``LogisticRegression`` (L2 on w with C = 1,
    the intercept not penalised) fitted to each row of ``x`` (P, m) against labels ``y`` (m,) in
    {0, 1}: Newton's method on the P two-parameter problems at once, its step capped (the
    objective is strictly convex; the cap only guards the first steps on near-separable rows)."""
    s = 2.0 * y - 1.0
    w = np.zeros(x.shape[0])
    b = np.zeros(x.shape[0])
    span = np.maximum(x.max(1) - x.min(1), 1e-12)
    # scikit-learn's L-BFGS stops where its gradient (of the mean loss) is within tol = 1e-4 at
    # the start, and then predicts class 0 everywhere: losses of ~1e-3 (a model that fits both
    # sides) leave it there, and the null must do the same.
    stuck = np.maximum(np.abs((s * x).mean(1)), np.abs(s.mean())) * 0.5 <= 1e-4
    for _ in range(iters):
        z = s * (w[:, None] * x + b[:, None])
        p = 0.5 * (1.0 - np.tanh(0.5 * z))  # 1 - sigmoid(z), without overflow
        gw = -(s * p * x).sum(1) + w
        gb = -(s * p).sum(1)
        h = p * (1.0 - p)
        hww, hwb, hbb = (h * x * x).sum(1) + 1.0, (h * x).sum(1), h.sum(1) + 1e-12
        det = hww * hbb - hwb * hwb
        dw, db = (hbb * gw - hwb * gb) / det, (hww * gb - hwb * gw) / det
        move = np.abs(dw) * span + np.abs(db)
        cap = np.minimum(1.0, 10.0 / np.maximum(move, 1e-300))
        w, b = w - cap * dw, b - cap * db
        if not move.max() > 1e-9:  # every problem settled (NaN keeps going, to the limit)
            break
    return np.where(stuck, 0.0, w), np.where(stuck, 0.0, b)


def _null_spread(features: np.ndarray, labels: np.ndarray, splits: list, seed: int | None) -> float:
    """The standard deviation (% points) of the attack's mean split accuracy when the losses
    carry no membership at all: the same losses dealt to the examples at random
    (``MIA_NULL_DRAWS`` deals), the same labels and splits, the same classifier. Its 5 splits
    share examples and one threshold scores each split's test part, so it strays further from 50
    than ``scored`` independent coin flips would (on null losses at 36 a side 8.7-9.9 points
    against 50 / sqrt(40) = 7.9, and a gap "real" at 2 standard deviations of those in up to
    15 % of null tables: benchmarks/attack_null.py). Never below ``50 / sqrt(scored)``."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.permutation(features) for _ in range(MIA_NULL_DRAWS)])
    acc = np.zeros(MIA_NULL_DRAWS)
    for train, test in splits:
        w, b = _logistic_1d(x[:, train], labels[train])
        pred = (w[:, None] * x[:, test] + b[:, None]) > 0
        acc += (pred == (labels[test] == 1)).mean(1)
    spread = 100.0 * float(np.std(acc / len(splits), ddof=1))
    # Never below independent coin flips': where the deals hardly vary the score (losses that
    # all round alike, or that stop scikit-learn's solver at its start) a spread of ~0 would
    # call any gap real, and another model's losses need not be so tame.
    coin = 50.0 / math.sqrt(sum(len(test) for _, test in splits))
    return max(spread, coin)


def mia_from_losses(forget_losses: Sequence[float], test_losses: Sequence[float], seed: int = 0) -> float:
    """The attack of SCRUB on given losses: attacker accuracy in percent (50 is ideal).

    The larger side is cut to the smaller with ``random.Random(seed).sample`` (the sample SCRUB's
    ``random.seed(seed)``, ``random.sample`` draws; the caller's global ``random`` is left alone); labels are
    test 0, forget 1; features (n, 1) clipped to [-100, 100]; a default ``LogisticRegression`` is scored
    by ``cross_val_score`` over ``StratifiedShuffleSplit(n_splits=5, random_state=seed)``; the mean
    accuracy x 100 is returned. Needs at least 6 losses a side, none of them NaN.

    An attacker with no information scores 50 on average only when a split's test part (10 % of
    the 2n balanced examples, rounded up) is even: when it is odd, its extra example of one side
    leaves the train part's majority on the other, and on identically distributed losses the mean
    over 300 draws is 40.3 / 43.5 (uniform / normal losses, n = 15 a side), 45.4 / 48.9 (25) and
    47.2 / 48.0 (35) against 49.5 (36, both; standard errors 0.6-0.9); the offset shrinks as n
    grows and depends on the losses' distribution. Compare with Retrain's score, which carries
    the same offset.
    """
    scores = _attack(forget_losses, test_losses, seed)[0]
    return 100.0 * float(np.mean(scores))


def restrict_to_classes(data: Dataset | DataLoader, classes: Sequence[int]) -> Subset:
    """The examples of ``data`` whose label is in ``classes`` (of a loader: of the examples its
    sampler visits, as everywhere in the package)."""
    if isinstance(data, DataLoader):
        data = loader_examples(data, "data")
    targets = dataset_targets(data)
    if isinstance(classes, (torch.Tensor, np.ndarray)):
        classes = classes.tolist()  # elements as Python numbers (0-d tensors are not is_int)
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise TypeError(f"classes: expected a sequence of integer class labels, got {classes!r}")
    classes = list(classes)
    if not all(is_int(c) for c in classes):
        # A float class was truncated (0.5 kept class 0).
        raise ValueError(f"classes: {classes!r}; expected integer class labels")
    wanted = torch.as_tensor([int(c) for c in classes], dtype=torch.long, device="cpu")
    keep = torch.isin(targets, wanted)
    return Subset(data, torch.nonzero(keep).view(-1).tolist())


def _check_data(data: object, name: str) -> None:
    if not isinstance(data, (Dataset, DataLoader)):
        raise TypeError(f"{name} must be a torch Dataset or DataLoader of (x, y) pairs, got "
                        f"{type(data).__name__} (tensors X, y: pass TensorDataset(X, y))")


def _examples(data: Dataset | DataLoader, name: str) -> Dataset | DataLoader:
    # A loader read once, up front, so that what is wrong with it is said of ``name``; and what
    # the batches would be refused for (not a dataset, items that are not pairs) said before the
    # labels are read (they failed there with numpy's, torch's or a KeyError's words).
    _check_data(data, name)
    data = loader_examples(data, name) if isinstance(data, DataLoader) else data
    check_map_style(data, name)
    if hasattr(data, "__len__") and len(data) > 0:
        item = data[0]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            size = f" of {len(item)} items" if hasattr(item, "__len__") else ""
            raise ValueError(f"{name}: an item is a {type(item).__name__}{size}; expected (x, y) "
                             f"pairs of an input and an integer label")
    return data


def _attack_losses(model: nn.Module, forget: Dataset | DataLoader, test: Dataset | DataLoader,
                   batch_size: int, device: str | torch.device | None) -> tuple[np.ndarray, np.ndarray]:
    forget, test = _examples(forget, "forget"), _examples(test, "test")
    classes = dataset_targets(forget).unique().tolist()
    if not classes:
        raise ValueError("forget is empty: the attack needs forget examples")
    test_same = restrict_to_classes(test, classes)
    if len(test_same) == 0:
        raise ValueError(f"test has no examples of the forget classes {classes}")
    return (_losses(model, forget, batch_size, device, "forget"),
            _losses(model, test_same, batch_size, device, "test"))


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
    standard deviation (% points) of the score of an attacker that knows nothing}``. ``chance`` is
    how far such a score strays from its mean by luck at this size: the attack run on these
    losses dealt to the examples at random (:func:`_null_spread`; ``seed`` seeds the deals too);
    it exceeds the ``50 / sqrt(scored)`` of independent coin flips, which the splits are not."""
    f, t = _attack_losses(model, forget, test, batch_size, device)
    scores, n, scored, (x, y, splits) = _attack(f, t, seed)
    return {"mia": 100.0 * float(np.mean(scores)), "splits": [100.0 * float(s) for s in scores], "n": int(n),
            "scored": int(scored), "chance": _null_spread(x, y, splits, seed)}


# ------------------------------------------------------------------------------------------------------
# An attack with signal: per-class calibrated confidence, judged by ROC (Carlini et al. 2022, "Membership
# inference attacks from first principles": report TPR at low FPR, not balanced accuracy).

def true_class_features(logits: torch.Tensor | np.ndarray,
                        labels: torch.Tensor | np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Per-example features of the true class from ``logits`` (N, k) and ``labels`` (N,).

    Returns float64 arrays (N,): ``loss`` (cross-entropy, -log p_y), ``confidence`` (p_y) and
    ``logit_confidence``, log(p_y / (1 - p_y)), computed as ``z_y - logsumexp_{j != y} z_j`` so that it
    stays finite and ordered where p_y rounds to 1 (a well-fit training example's usual case, exactly
    where members and non-members must be told apart)."""
    z = torch.as_tensor(logits, device="cpu").double()
    y = _integer_labels(torch.as_tensor(host_array(labels), device="cpu").reshape(-1), "")
    if z.dim() != 2:
        raise ValueError(f"logits must be (N, k), got shape {tuple(z.shape)}")
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"logits and labels disagree on N: {z.shape[0]} != {y.shape[0]}")
    if z.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes for a confidence ratio, got k = {z.shape[1]}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got values in [{int(y.min())}, {int(y.max())}]")
    rows = torch.arange(len(y), device="cpu")
    true = z[rows, y]
    others = z.clone()
    others[rows, y] = -math.inf
    rest = torch.logsumexp(others, dim=1)
    loss = torch.logsumexp(z, dim=1) - true
    return {"loss": loss.numpy(), "confidence": torch.exp(-loss).numpy(), "logit_confidence": (true - rest).numpy()}


def logit_confidence_from_losses(losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) with p = exp(-loss), for losses (N,) >= 0 (the cross-entropy of the true class):
    ``-loss - log(-expm1(-loss))``. A loss of exactly 0 maps to +inf. Shape (N,), float64."""
    loss = np.asarray(losses, dtype=np.float64).reshape(-1)
    if np.any(np.isnan(loss)) or np.any(loss < 0):
        raise ValueError("losses must be >= 0 and not NaN (cross-entropy of the true class)")
    with np.errstate(divide="ignore"):
        return -loss - np.log(-np.expm1(-loss))


def _scores(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{name} is empty: the ROC needs at least one score per side")
    if np.any(np.isnan(v)):
        raise ValueError(f"{name} contains NaN at position {int(np.flatnonzero(np.isnan(v))[0])}")
    return v


def roc_curve(member_scores: Sequence[float] | np.ndarray,
              nonmember_scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The attack's ROC: ``(fpr, tpr)``, each (T + 1,), for "member when score >= t" over every distinct
    score t from high to low, starting at (0, 0) and ending at (1, 1). Higher scores mean "member"."""
    pos = np.sort(_scores(member_scores, "member_scores"))
    neg = np.sort(_scores(nonmember_scores, "nonmember_scores"))
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    # Count of scores >= t: everything from the first index where t would be inserted on the left.
    tpr = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / len(pos)
    fpr = (len(neg) - np.searchsorted(neg, thresholds, side="left")) / len(neg)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def roc_auc(member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC in [0, 1] (0.5: chance), as the Mann-Whitney statistic: the probability that
    a random member outscores a random non-member, ties counting one half."""
    pos = _scores(member_scores, "member_scores")
    neg = _scores(nonmember_scores, "nonmember_scores")
    both = np.concatenate([pos, neg])
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each distinct value: the ranks its tied copies share.
    below = np.cumsum(counts) - counts
    ranks = (below + (counts + 1) / 2.0)[inverse.reshape(-1)]
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray,
               fpr: float) -> float:
    """The largest true positive rate (fraction) of a threshold whose false positive rate is at most
    ``fpr`` (a fraction in [0, 1]); no interpolation between thresholds. With fewer than 1 / ``fpr``
    non-members this is the TPR at zero false positives."""
    # A string was read as its number and a bool as 0 / 1: say so instead.
    if not is_real(fpr) or not 0.0 <= float(fpr) <= 1.0:
        raise ValueError(f"fpr must be a fraction in [0, 1], got {fpr!r}")
    f, t = roc_curve(member_scores, nonmember_scores)
    # The small slack keeps an FPR of exactly fpr (e.g. 1 of 100) from failing on rounding.
    return float(t[f <= float(fpr) + 1e-12].max())


def offline_lira_scores(member_values: Sequence[float] | np.ndarray,
                        member_labels: Sequence[int] | np.ndarray,
                        nonmember_values: Sequence[float] | np.ndarray,
                        nonmember_labels: Sequence[int] | np.ndarray, *,
                        min_std: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Offline LiRA-style membership scores without shadow models (the "population" reference).

    For each class c the non-members of c (test examples never trained on) give an "out" Gaussian
    N(mu_c, sigma_c^2) of the feature (use the logit-scaled confidence of
    :func:`true_class_features`); an example's score is its z-score ``(value - mu_c) / sigma_c``,
    which ranks examples of one class as offline LiRA's one-sided likelihood test does and puts classes
    of unlike difficulty on one scale. Each non-member is scored against the Gaussian of the *other*
    non-members of its class (leave one out), so it is not judged by a fit that contains it.

    Shapes: member_values, member_labels (M,); nonmember_values, nonmember_labels (N,). Every class of
    a member needs at least 3 non-members. ``sigma_c`` is floored at ``min_std``. Returns float64
    ``(member_scores (M,), nonmember_scores (N,))``; higher means "member"."""
    mv = np.asarray(member_values, dtype=np.float64).reshape(-1)
    nv = np.asarray(nonmember_values, dtype=np.float64).reshape(-1)
    ml = np.asarray(member_labels).reshape(-1)
    nl = np.asarray(nonmember_labels).reshape(-1)
    if len(mv) != len(ml):
        raise ValueError(f"member_values and member_labels disagree on length: {len(mv)} != {len(ml)}")
    if len(nv) != len(nl):
        raise ValueError(f"nonmember_values and nonmember_labels disagree on length: {len(nv)} != {len(nl)}")
    if not min_std > 0:
        raise ValueError(f"min_std must be positive, got {min_std}")
    for name, v in (("member_values", mv), ("nonmember_values", nv)):
        if np.isnan(v).any():
            raise ValueError(f"{name} contains NaN at position {int(np.flatnonzero(np.isnan(v))[0])} (a "
                             f"NaN logit?); every example needs a feature value")
    for name, lab in (("member_labels", ml), ("nonmember_labels", nl)):
        if lab.size and not (np.issubdtype(lab.dtype, np.integer)
                             or (np.issubdtype(lab.dtype, np.floating) and np.all(np.isfinite(lab))
                                 and np.all(lab == np.round(lab)))):
            raise ValueError(f"{name}: expected integer class labels, got {lab.dtype} values "
                             f"{lab[:5].tolist()}...")
    # +inf (a loss of exactly 0, from logit_confidence_from_losses) would make every statistic NaN;
    # the cap is far beyond any logit gap a network produces, so it changes no ranking in practice.
    mv, nv = np.clip(mv, -1e4, 1e4), np.clip(nv, -1e4, 1e4)
    m_scores = np.empty_like(mv)
    n_scores = np.full_like(nv, np.nan)
    for c in np.unique(np.concatenate([ml, nl])):
        out = nv[nl == c]
        ins = ml == c
        if ins.any() and len(out) < 3:
            raise ValueError(f"class {c}: {len(out)} non-member(s), the out Gaussian needs at least 3")
        if len(out) < 3:
            continue  # a class with no members needs no scores; its few non-members get them below
        n = len(out)
        mu, sd = out.mean(), out.std(ddof=1)
        m_scores[ins] = (mv[ins] - mu) / max(sd, min_std)
        # Leave-one-out mean and sample variance of the other n - 1, in closed form.
        mu_loo = (n * mu - out) / (n - 1)
        ss_loo = np.maximum((n - 1) * sd ** 2 - (out - mu) ** 2 * n / (n - 1), 0.0)
        sd_loo = np.sqrt(ss_loo / (n - 2))
        n_scores[nl == c] = (out - mu_loo) / np.maximum(sd_loo, min_std)
    if np.isnan(n_scores).any():
        c = nl[np.isnan(n_scores)][0]
        raise ValueError(f"class {c}: fewer than 3 non-members, too few to score them")
    return m_scores, n_scores


ATTACK_FPRS = (0.01, 0.05)


def attack_from_features(member_values: Sequence[float] | np.ndarray, member_labels: Sequence[int] | np.ndarray,
                         nonmember_values: Sequence[float] | np.ndarray,
                         nonmember_labels: Sequence[int] | np.ndarray) -> dict[str, float | int]:
    """:func:`offline_lira_scores` judged by ROC: ``{"auc", "tpr_at_1fpr", "tpr_at_5fpr"}`` in percent
    (AUC 50: chance; TPR@x%FPR is near x at chance only with many non-members, see
    docs/unlearning.md) and ``n_members`` / ``n_nonmembers``. Members are the forget set,
    non-members the test examples of the forget set's classes."""
    ms, ns = offline_lira_scores(member_values, member_labels, nonmember_values, nonmember_labels)
    return {"auc": 100.0 * roc_auc(ms, ns),
            "tpr_at_1fpr": 100.0 * tpr_at_fpr(ms, ns, ATTACK_FPRS[0]),
            "tpr_at_5fpr": 100.0 * tpr_at_fpr(ms, ns, ATTACK_FPRS[1]),
            "n_members": int(len(ms)), "n_nonmembers": int(len(ns))}


def lira(model: nn.Module, forget: Dataset | DataLoader, test: Dataset | DataLoader, *, batch_size: int = 256,
         device: str | torch.device | None = None) -> dict[str, float | int]:
    """The offline LiRA-style attack on ``model``: members are ``forget``, non-members the examples of
    ``test`` of the classes present in ``forget`` (as SCRUB's attack restricts them); the feature is the
    logit-scaled confidence of the true class. Returns :func:`attack_from_features`'s dict."""
    forget, test = _examples(forget, "forget"), _examples(test, "test")
    classes = dataset_targets(forget).unique().tolist()
    if not classes:
        raise ValueError("forget is empty: the attack needs forget examples")
    test_same = restrict_to_classes(test, classes)
    fl, fy = _predict(model, forget, batch_size, device, "forget")
    tl, ty = _predict(model, test_same, batch_size, device, "test")
    if len(ty) == 0:
        raise ValueError(f"test has no examples of the forget classes {classes}")
    f = true_class_features(fl, fy)["logit_confidence"]
    t = true_class_features(tl, ty)["logit_confidence"]
    return attack_from_features(f, fy.numpy(), t, ty.numpy())


# The metrics the retrain gap averages: the paper's four columns.
RETRAIN_GAP_METRICS = ("test_error", "retain_error", "forget_error", "mia")


def retrain_gap(row: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Mean absolute difference (percent points) between one model's metrics and Retrain's, over test,
    retain and forget error and SCRUB's MIA (:data:`RETRAIN_GAP_METRICS`), the average-gap summary of
    recent unlearning benchmarks; measured on one seed, so both rows must come from the same split.
    Retrain's own gap is 0. NaN when any of the four is missing or NaN on either side."""
    diffs = []
    for m in RETRAIN_GAP_METRICS:
        a, b = row.get(m), reference.get(m)
        if a is None or b is None or math.isnan(float(a)) or math.isnan(float(b)):
            return float("nan")
        diffs.append(abs(float(a) - float(b)))
    return sum(diffs) / len(diffs)


def add_retrain_gaps(rows: Mapping[str, Mapping[str, Any]], reference: str = "retrain") -> dict[str, dict]:
    """One seed's rows (method -> metrics) with ``retrain_gap`` set on each: against ``reference``'s row
    of the same seed, NaN for every method where the reference did not run. Returns new dicts."""
    ref = rows.get(reference)
    return {name: {**row, "retrain_gap": retrain_gap(row, ref) if ref is not None else float("nan")}
            for name, row in rows.items()}
