"""KL fine-tuning: move a model's weights toward target probabilities (the paper's §4.3)."""
from __future__ import annotations

import copy
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from .callable_module import make_callable
from .caller_state import (caller_stacklevel, check_flag, check_positive_int, check_seed,
                           frozen_modules, is_int, is_real, keeps_caller_state, manual_seed,
                           probe_forward)
from .data import CpuDrawLoader
from .metrics import check_logits
from .training import (FREEZE_BATCHNORM, check_optimizer_name, check_optimizer_options,
                       lone_last_batch, one_example_batchnorm_error, resolve_device)
from .torch_defaults import optimizer_step, training_grad_mode

SELECT_POLICIES = ("last", "val")
TRAINABLE = ("all", "last-block", "head")
RETAIN_SAMPLING = ("uniform", "weighted")


@dataclass
class FinetuneResult:
    """``model``: the selected model. ``history``: one dict per evaluation (epoch 0 is the starting
    model, never selected; with ``evals_per_epoch`` > 1 also fractional epochs such as 0.5) with the
    mean ``loss`` of the epoch's batches so far, ``wall_seconds`` (time since the call began,
    evaluation included) and whatever ``evaluate`` returned. ``selected_epoch``: the (possibly
    fractional) epoch whose weights ``model`` holds. ``seconds``: wall time of the training epochs
    (evaluation excluded). ``stopped_early``: ``early_stop`` or ``forget_kl`` ended the run before
    ``epochs``."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    selected_epoch: float = 0
    seconds: float = 0.0
    stopped_early: bool = False


class _Indexed(Dataset):
    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i][0], i


def select_val(history: Sequence[dict]) -> float:
    """ppu_fast's variant of SCRUB+R's rewinding rule (Kurmanji et al.), used in place of the
    paper's: the evaluated epoch (> 0, never the starting model; a fraction such as 0.25 with
    ``evals_per_epoch``) whose forget error is closest to the *same epoch's* validation error on
    the forget classes (SCRUB's code compares with the final model's: ``unlearn.scrub.scrub_rewind``);
    ties go to the earliest. The paper's rule (§5.5) is ambiguous as printed: "checkpoints
    are saved at each epoch, and the model closest to the original is selected", monitoring "both
    the training and retain accuracy at each epoch"; it does not match forget error to validation
    error (docs/unlearning.md)."""
    best, best_gap = None, math.inf
    for h in history:
        if h["epoch"] <= 0:
            continue
        if "forget_error" not in h or "val_error" not in h:
            raise ValueError("select='val' needs 'forget_error' and 'val_error' in every epoch's "
                             "evaluation (pass evaluate=... that returns both)")
        gap = abs(h["forget_error"] - h["val_error"])
        if gap < best_gap:
            best, best_gap = h["epoch"], gap
    if best is None:
        raise ValueError("select='val' needs at least one epoch")
    return best


def val_rule_is_settled(history: Sequence[dict]) -> bool:
    """Whether later epochs can no longer win the "val" rule (:func:`select_val`), assuming the forget
    error keeps moving the way it moved: the last epoch's forget error is on the far side of the
    target (the validation error) from where the starting model was, and its distance to the target
    grew since the epoch before; or the last epoch hit the target exactly (ties go to the earliest).

    The forget error of PPU's fine-tuning rises towards the pseudo-probabilities' error and stays
    there, so once it has overshot and moves away, every later gap is larger. A trajectory that
    turns back could still win later; ``early_stop`` trades that case for the epochs it saves."""
    rows = [h for h in history if "forget_error" in h and "val_error" in h]
    if len(rows) < 2 or rows[-1]["epoch"] <= 0:
        return False
    start, prev, last = rows[0], rows[-2], rows[-1]
    d_last = last["forget_error"] - last["val_error"]
    if d_last == 0:
        return True
    d_start = start["forget_error"] - start["val_error"]
    crossed = d_start == 0 or (d_last > 0) != (d_start > 0)
    return prev["epoch"] > 0 and crossed and abs(d_last) > abs(prev["forget_error"] - prev["val_error"])


def _module_params(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def trainable_modules(model: nn.Module, which: str, head: nn.Module | None = None,
                      order: Sequence[str] | None = None) -> list[nn.Module]:
    """The modules whose parameters ``trainable=which`` fine-tunes.

    ``"all"``: the model. ``"head"``: ``head``, the classifier layer; :func:`finetune` passes the
    last ``nn.Linear`` its probe forward pass called (a model whose ``__init__`` registers the
    classifier before the encoder still gets its classifier); without it, the last ``nn.Linear``
    registered (the classifier of every model in :mod:`ppu_fast.models`). ``"last-block"``: the head and the last block before it. Walking from
    the model down the modules that hold the head, the block is the last sibling with parameters
    that comes before the head's branch at the deepest level that has one (a wrapper holding the
    network as one child is looked through); when that sibling is an ``nn.Sequential`` (a stage of
    blocks, a feature stack), its last child with parameters (ResNet-18: ``layer4[1]``; ALL-CNN and
    SmallCNN: the last conv-BN block; a ``Sequential(Linear, ReLU, Linear)`` classifier: its hidden
    ``Linear``). A model with nothing before its head is refused.

    "Before" is the order ``__init__`` registered the modules in, or, with ``order`` (the names of
    the modules a forward pass called, in the order of their first call, as
    :func:`~ppu_fast.caller_state.probe_forward` gives them; :func:`finetune` passes it), the
    order the forward pass runs them in: a model that registers its classifier before its encoder
    gets the encoder's last block, and a module the pass never calls is no block.
    """
    if which not in TRAINABLE:
        raise ValueError(f"trainable: unknown value {which!r}; expected one of {TRAINABLE}")
    if which == "all":
        return [model]
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"trainable={which!r}: the model has no nn.Linear head; expected a "
                             f"classifier ending in nn.Linear (or pass trainable='all')")
        head = linears[-1]
    if which == "head":
        return [head]
    in_order = _in_call_order(model, order)
    block, level = None, model
    while level is not head:
        children = in_order(list(level.children()))
        branch = next(i for i, c in enumerate(children) if any(m is head for m in c.modules()))
        before = [c for c in children[:branch] if any(True for _ in c.parameters())]
        if before:
            block = before[-1]  # a deeper level's block, if any, is nearer the head
        level = children[branch]
    if block is None:
        raise ValueError("trainable='last-block': the model has no block with parameters before its "
                         "head; expected one (or pass trainable='head' or 'all')")
    if isinstance(block, nn.Sequential):
        inner = [c for c in in_order(list(block.children())) if any(True for _ in c.parameters())]
        block = inner[-1] if inner else block
    return [block, head]


def _in_call_order(model: nn.Module, order: Sequence[str] | None
                   ) -> Callable[[list[nn.Module]], list[nn.Module]]:
    """A function putting sibling modules in the order a forward pass first called them (a module
    counts as called when any module inside it was: a ModuleList is not called itself), leaving
    out the ones it never called; without ``order``, the identity (registration order)."""
    if order is None:
        return lambda children: children
    table = dict(model.named_modules())
    rank = {id(table[name]): i for i, name in enumerate(order) if name in table}

    def first_call(c: nn.Module) -> float:
        return min((rank[id(m)] for m in c.modules() if id(m) in rank), default=math.inf)

    def in_order(children: list[nn.Module]) -> list[nn.Module]:
        keyed = [(first_call(c), i, c) for i, c in enumerate(children)]
        return [c for key, _, c in sorted(keyed, key=lambda t: t[:2]) if key < math.inf]
    return in_order


def _first_input(data: Dataset) -> object:
    """``data[0]``'s input, the item the loop feeds the model (labels are unused)."""
    item = data[0]
    if not isinstance(item, (tuple, list)) or not item:
        kind = (f"a {type(item).__name__} of {len(item)} items" if isinstance(item, (tuple, list, dict))
                else f"a {type(item).__name__}")
        raise ValueError(f"data[0] is {kind}; expected an (x, y) pair whose x the model takes "
                         f"(labels are unused; wrap the dataset to return that pair)")
    return item[0]


def _check(model: object, data: object, targets: object, epochs: int, lr: float, momentum: float,
           weight_decay: float, batch_size: int, optimizer: str, select: object, forget_mask: object, retain_per_epoch: object,
           retain_fraction: object, retain_sampling: object, retain_weights: object,
           forget_repeats: object, early_stop: object, forget_kl: object, trainable: object,
           evals_per_epoch: object = 1) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, Dataset) or isinstance(data, IterableDataset):
        raise TypeError(f"data must be a map-style torch Dataset of (x, y) pairs, got "
                        f"{type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data: empty; expected at least one (x, y) example")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError(f"targets must be a 2-D tensor or array (N, k) of probabilities, got "
                         f"{type(targets).__name__} of shape {tuple(getattr(targets, 'shape', ()))}")
    if targets.shape[0] != len(data):
        raise ValueError(f"targets has {targets.shape[0]} rows but data has {len(data)} examples")
    if not bool(torch.isfinite(targets).all()) or bool((targets < 0).any()):
        raise ValueError("targets must be finite and non-negative (probabilities)")
    # In float64 on the targets' own device; a half-precision row rounds each entry, so its sum
    # may miss 1 by about one of its ulps.
    tol = 1e-3
    if targets.dtype in (torch.float16, torch.bfloat16):
        tol = max(tol, 2 * torch.finfo(targets.dtype).eps)
    if not bool(((targets.double().sum(1) - 1).abs() <= tol).all()):
        raise ValueError(f"targets rows must sum to 1 within {tol:g} (probabilities, not logits)")
    check_finetune_options(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           batch_size=batch_size, optimizer=optimizer, select=select,
                           retain_per_epoch=retain_per_epoch,
                           has_forget_mask=forget_mask is not None,
                           retain_fraction=retain_fraction, retain_sampling=retain_sampling,
                           has_weights=retain_weights is not None, forget_repeats=forget_repeats,
                           early_stop=early_stop, forget_kl=forget_kl, trainable=trainable,
                           evals_per_epoch=evals_per_epoch)


def check_finetune_options(*, epochs: object, lr: object, momentum: object, weight_decay: object,
                           batch_size: object, optimizer: object, select: object,
                           retain_per_epoch: object, has_forget_mask: bool,
                           retain_fraction: object, retain_sampling: object, has_weights: bool,
                           forget_repeats: object, early_stop: object, forget_kl: object,
                           trainable: object, evals_per_epoch: object = 1) -> None:
    """:func:`finetune`'s checks of its options, which need no model or data (``has_forget_mask``,
    ``has_weights``: whether ``forget_mask`` / ``retain_weights`` are given); PPU's runner makes
    them before the model's probabilities."""
    check_positive_int(epochs, "epochs")
    check_optimizer_options(lr, momentum, weight_decay)
    check_positive_int(batch_size, "batch_size")
    check_optimizer_name(optimizer)
    if not (callable(select) or select in SELECT_POLICIES):
        raise ValueError(f"select must be one of {SELECT_POLICIES} or a callable(history) -> epoch, "
                         f"got {select!r}")
    if retain_per_epoch is not None and not has_forget_mask:
        raise ValueError("retain_per_epoch needs forget_mask (which rows are the forget set)")
    check_epoch_rows(retain_fraction, retain_per_epoch)
    if (retain_fraction is not None or forget_repeats != 1 or retain_sampling != "uniform") \
            and not has_forget_mask:
        raise ValueError("retain_fraction / forget_repeats / retain_sampling need forget_mask (which "
                         "rows are the forget set)")
    if retain_sampling not in RETAIN_SAMPLING:
        raise ValueError(f"retain_sampling: unknown value {retain_sampling!r}; expected one of "
                         f"{RETAIN_SAMPLING}")
    if (retain_sampling == "weighted") != has_weights:
        raise ValueError("retain_sampling='weighted' and retain_weights go together: pass "
                         "retain_weights (N,) non-negative with retain_sampling='weighted'")
    if retain_sampling == "weighted" and retain_per_epoch is None and (
            retain_fraction is None or float(retain_fraction) >= 1.0):
        raise ValueError("retain_sampling='weighted' weighs which retain rows an epoch draws, but "
                         "every epoch uses all of them; expected retain_fraction < 1 or "
                         "retain_per_epoch with it")
    if not is_int(forget_repeats) or forget_repeats < 1:
        raise ValueError(f"forget_repeats must be a positive int (how many times an epoch visits each "
                         f"forget row), got {forget_repeats!r}")
    if not isinstance(early_stop, bool):
        raise ValueError(f"early_stop must be a bool, got {early_stop!r}")
    if early_stop and select != "val":
        raise ValueError(f"early_stop=True needs select='val' (it stops when that rule is settled), "
                         f"got select={select!r}")
    if forget_kl is not None:
        if not is_real(forget_kl) or not float(forget_kl) >= 0.0:
            raise ValueError(f"forget_kl must be a non-negative number of nats, got {forget_kl!r}")
        if not has_forget_mask:
            raise ValueError("forget_kl needs forget_mask (which rows are the forget set)")
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable: unknown value {trainable!r}; expected one of {TRAINABLE}")
    if not is_int(evals_per_epoch) or evals_per_epoch < 1:
        raise ValueError(f"evals_per_epoch must be a positive int (evaluations, and checkpoints to "
                         f"select from, per epoch), got {evals_per_epoch!r}")


HISTORY_KEYS = ("epoch", "loss", "wall_seconds")
FORGET_KL_KEYS = ("forget_loss", "retain_loss")  # the history's too when forget_kl is set


def _evaluation(row: object, epoch: float, select: object, forget_kl: object) -> dict:
    """``evaluate``'s result at ``epoch``, checked: a mapping that leaves the history's own keys
    alone, and the two numbers the "val" rule reads when ``select="val"``: present from the
    evaluation before training on (a missing key fails then, not after the last epoch), numbers
    (0-d tensors and numpy scalars too) and, from epoch 1 on, the epochs the rule can pick,
    finite."""
    if not isinstance(row, Mapping):
        raise TypeError(f"evaluate: returned a {type(row).__name__}; expected a dict of named "
                        f"values (e.g. {{'forget_error': ..., 'val_error': ...}})")
    own = HISTORY_KEYS + (FORGET_KL_KEYS if forget_kl is not None else ())
    clash = sorted(set(row) & set(own))
    if clash:
        raise ValueError(f"evaluate: returned {clash}, which the history keeps for finetune's own "
                         f"values; expected other names (e.g. 'val_loss')")
    if select == "val":
        for key in ("forget_error", "val_error"):
            if key not in row:
                raise ValueError(f"select='val': evaluate's result at epoch {epoch} has no "
                                 f"{key!r}; expected 'forget_error' and 'val_error' in every "
                                 f"evaluation")
            try:
                v = float(row[key])
            except (TypeError, ValueError):
                v = None
            if v is None or isinstance(row[key], (bool, str)) or (epoch > 0 and not math.isfinite(v)):
                raise ValueError(f"select='val': evaluate's result at epoch {epoch} has {key!r}: "
                                 f"{row[key]!r}; expected a finite number")
    return dict(row)


def _check_inputs_finite(x: torch.Tensor, rows: torch.Tensor) -> None:
    """A non-finite loss from non-finite inputs is the data's fault, not the step size's: name
    the example (the divergence message would advise a lower learning rate)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
        if bool(bad.any()):
            row = int(rows[int(bad.nonzero()[0, 0])])
            raise ValueError(f"data: example {row} holds NaN or infinite values; expected finite "
                             f"inputs")


def check_epoch_rows(retain_fraction: float | None, retain_per_epoch: int | None) -> None:
    """Refuse a bad ``retain_fraction`` / ``retain_per_epoch`` (how many retain rows an epoch
    uses) before any work: ``unlearn``'s experiment runner checks them before its training."""
    if retain_per_epoch is not None:
        check_positive_int(retain_per_epoch, "retain_per_epoch")
    if retain_fraction is not None:
        if not is_real(retain_fraction) or not 0.0 < float(retain_fraction) <= 1.0:
            raise ValueError(f"retain_fraction must be a number in (0, 1] (the share of retain rows "
                             f"each epoch uses), got {retain_fraction!r}")
        if retain_per_epoch is not None:
            raise ValueError("retain_fraction, retain_per_epoch: pass one of them (both set how many "
                             "retain rows an epoch uses)")


@keeps_caller_state(lambda kw: "finetune")
@training_grad_mode
def finetune(model: nn.Module, data: Dataset, targets: torch.Tensor | np.ndarray, *, epochs: int = 10, lr: float = 0.01,
             optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 64,
             forget_mask: torch.Tensor | np.ndarray | None = None, retain_per_epoch: int | None = None,
             retain_fraction: float | None = None, retain_sampling: str = "uniform",
             retain_weights: torch.Tensor | None = None, forget_repeats: int = 1,
             evaluate: Callable[[nn.Module], dict] | None = None,
             select: str | Callable[[list[dict]], int] = "last", early_stop: bool = False,
             forget_kl: float | None = None, trainable: str = "all", evals_per_epoch: int = 1,
             seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
             progress: bool = True, desc: str = "finetune") -> FinetuneResult:
    """Fine-tune ``model`` so that ``softmax(model(x_i))`` approaches ``targets[i]``.

    Args:
        model: any classifier mapping (B, C, H, W) to (B, k) logits, k >= 2. It trains as
            ``model.train()`` sets it, as PyTorch loops do, whatever modes its modules had; to
            keep a BatchNorm's statistics fixed, freeze its parameters (``requires_grad=False``):
            modules whose parameters are all frozen stay in eval mode (and a parameter-free
            ``BatchNorm(affine=False)`` inside a block whose parameters are all frozen).
        data: N examples ``(x, y)`` (labels unused; ``(x,)`` too), row i paired with ``targets[i]``.
        targets: (N, k) probabilities (a tensor or a numpy array, e.g. ``predict_proba``), k the
            model's number of outputs. Loss: KL(target || softmax(model(x))), mean over the batch.
            Used in float32 (float64 ones in float64 for a model whose logits are float64).
        epochs, lr, optimizer ("sgd" with ``momentum`` or "adam"), weight_decay, batch_size: the loop.
            ``momentum`` is SGD's; Adam ignores it (its betas play that part), as scikit-learn's
            MLP does with ``solver="adam"``.
        forget_mask: (N,) bool, the forget rows; needed by the options below that treat forget
            and retain rows apart.
        retain_per_epoch: if given, each epoch uses every forget row and this many retain rows drawn
            afresh (a cheaper epoch on large retain sets); above the number of retain rows, all
            of them, with a warning.
        retain_fraction: the same as a share in (0, 1] of the retain rows (at least one); 1 or None
            uses them all. A retained row's target is the model's own output up to the dual shift,
            so its gradient starts near 0: retain rows anchor the model rather than teach it.
        retain_sampling: ``"uniform"``, or ``"weighted"``: each epoch's retain rows (needs
            ``retain_fraction`` < 1 or ``retain_per_epoch``) drawn without replacement with
            probability proportional to ``retain_weights`` (N,) plus a floor of a tenth of their
            mean, so rows of weight 0 are drawn now and then (e.g. KL(q_i || p_i) at the start:
            the rows the targets moved most are drawn most often; an epoch still visits its
            rows in shuffled order).
        forget_repeats: each epoch visits every forget row this many times (in the same shuffled
            stream as the retain rows).
        evaluate: called with the model (eval mode) after every epoch and before the first; the dicts
            it returns make up the history (its keys must not be the history's own: ``epoch``,
            ``loss``, ``wall_seconds``, and with ``forget_kl`` ``forget_loss`` and
            ``retain_loss``).
        select: ``"last"`` keeps the final weights; ``"val"`` (after SCRUB+R's rule, see :func:`select_val`)
            and a callable (history -> epoch) choose among per-epoch checkpoints, kept in memory.
        evals_per_epoch: evaluate (and, when ``select`` chooses, checkpoint) this many times per
            epoch, after equal shares of its batches, labelled e - 1 + (batches done) / (batches
            in the epoch), which is e - 1 + j / evals_per_epoch when they divide evenly (fewer
            when an epoch has fewer batches); early stopping is tested at every evaluation. Each
            costs an ``evaluate`` call. With the "val" rule this did not help: on digits it locked
            onto transient states that whole epochs step over (docs/ppu_schedule.md).
        early_stop: with ``select="val"``, stop once :func:`val_rule_is_settled` says later epochs
            cannot win (saves the remaining epochs and their evaluations).
        forget_kl: stop after the first epoch in which the forget rows' mean KL(target || model),
            taken from the training batches themselves (no extra pass), is at most this many nats:
            the forget rows have reached their targets. Needs ``forget_mask``; each epoch's value
            is recorded as ``forget_loss`` in the history (and the retain rows' as
            ``retain_loss``). None: no such stop.
        trainable: ``"all"``, ``"last-block"`` or ``"head"`` (see :func:`trainable_modules`); the
            other parameters, and the BatchNorm statistics outside the trained modules, stay fixed.
        seed: fixes the shuffling and retain subsampling (a non-negative integer below 2**63,
            as ``ppu_fast.unlearn`` takes).
        device: where to train (the copy is moved there); None: ``model``'s own device.
        inplace: train ``model`` itself; by default a deep copy is trained and ``model`` is untouched.
        progress: show a tqdm bar over the epochs.
        desc: the progress bar's label (``ppu_fast.unlearn``'s PPU methods pass their name, so
            that PPU's bar is not read as the Finetune baseline's).

    Returns:
        :class:`FinetuneResult`.
    """
    from tqdm.auto import tqdm

    # What a caller has waited for (checks, copy and set-up included): history's wall_seconds.
    started = time.perf_counter()
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(np.ascontiguousarray(targets))
    _check(model, data, targets, epochs, lr, momentum, weight_decay, batch_size, optimizer, select,
           forget_mask, retain_per_epoch, retain_fraction, retain_sampling, retain_weights, forget_repeats, early_stop, forget_kl,
           trainable, evals_per_epoch)
    seed = check_seed(seed)
    inplace, progress = check_flag(inplace, "inplace"), check_flag(progress, "progress")
    if select == "val" and evaluate is None:
        raise ValueError("select='val' needs evaluate=... returning 'forget_error' and 'val_error'")
    epochs, batch_size, forget_repeats, evals_per_epoch = (int(epochs), int(batch_size),
                                                           int(forget_repeats), int(evals_per_epoch))
    if retain_per_epoch is not None:
        retain_per_epoch = int(retain_per_epoch)
    out, called, order = probe_forward(model, _first_input(data), "data[0]")
    check_logits(out, 1, floating=True)
    if out.shape[1] != targets.shape[1] or out.shape[1] < 2:
        raise ValueError(f"targets: {targets.shape[1]} columns, but the model outputs {out.shape[1]} "
                         f"logits per example (on data[0]); expected (N, k) probabilities over the "
                         f"model's k >= 2 classes")
    # The classifier layer by name: the same module of the working copy.
    head_name = called[-1] if called else None
    work = model if inplace else copy.deepcopy(model)
    if any(not p.is_leaf for p in work.parameters()):
        # A TorchScript module's deepcopy holds non-leaf parameters, which no optimizer takes.
        raise ValueError(f"model: the copy finetune trains (inplace=False) of this "
                         f"{type(model).__name__} has parameters that are not leaf tensors "
                         f"(copy.deepcopy of a TorchScript module does that); expected an eager "
                         f"nn.Module, or pass inplace=True to train this one")
    device = resolve_device(model, device)
    work.to(device)
    # Targets in float32, or float64 for a model whose logits are float64 (as predict keeps them)
    # given float64 targets (its PPU targets).
    wide = targets.dtype == torch.float64 and out.dtype == torch.float64
    targets = targets.detach().to(device=device, dtype=torch.float64 if wide else torch.float32)
    # The caller's frozen modules, before this call freezes what `trainable` leaves out.
    caller_frozen = frozen_modules(work)
    if trainable != "all" and head_name is None:
        raise ValueError(f"trainable={trainable!r}: no nn.Linear runs in the model's forward pass; "
                         f"expected a classifier ending in nn.Linear (or pass trainable='all')")
    trained = trainable_modules(work, trainable,
                                None if head_name is None else work.get_submodule(head_name),
                                order)
    params = _module_params(trained)
    if not params:
        raise ValueError(f"model: trainable={trainable!r} selects no parameters (the "
                         f"{type(model).__name__} has {sum(1 for _ in model.parameters())}); "
                         f"expected a model with at least one trainable parameter")
    if not any(p.requires_grad for p in params):
        raise ValueError(f"model: trainable={trainable!r} selects {len(params)} parameters and the "
                         f"caller froze all of them (requires_grad=False); expected at least one "
                         f"trainable parameter")
    ids = {id(p) for p in params}
    frozen = [p for p in work.parameters() if id(p) not in ids]
    for p in frozen:
        p.requires_grad_(False)
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    opt_step = optimizer_step(opt)  # see torch_defaults: Adam's step counters
    gen = torch.Generator().manual_seed(seed)
    manual_seed(seed)
    indexed = _Indexed(data)
    if retain_fraction is not None and float(retain_fraction) >= 1.0:
        retain_fraction = None
    split = retain_per_epoch is not None or retain_fraction is not None or forget_repeats != 1
    if split or retain_weights is not None or forget_kl is not None:
        raw = (forget_mask.detach().cpu().numpy() if isinstance(forget_mask, torch.Tensor)
               else np.asarray(forget_mask))
        zero_one = raw.dtype.kind in "iu" and raw.size == len(data) and bool(np.isin(raw, (0, 1)).all())
        if raw.dtype != np.bool_ and not zero_one:
            raise ValueError(f"forget_mask: expected an (N,) = ({len(data)},) bool (or 0/1) mask, got "
                             f"dtype {raw.dtype} with {raw.size} entries (for row indices, build the "
                             f"mask: mask = torch.zeros(N, dtype=torch.bool); mask[indices] = True)")
        fmask = torch.from_numpy(raw.astype(bool)).view(-1)
        if fmask.shape[0] != len(data):
            raise ValueError(f"forget_mask has {fmask.shape[0]} entries but data has {len(data)}")
        forget_rows, retain_rows = torch.nonzero(fmask).view(-1), torch.nonzero(~fmask).view(-1)
        n_take = len(retain_rows)
        if retain_per_epoch is not None:
            if retain_per_epoch > n_take:
                # scikit-learn's convention for a sample size above the data (IsolationForest's
                # max_samples): say so and use them all.
                warnings.warn(f"retain_per_epoch={retain_per_epoch} is more than the {n_take} "
                              f"retain rows; each epoch uses all {n_take}", UserWarning,
                              stacklevel=caller_stacklevel())
            n_take = min(retain_per_epoch, n_take)
        elif retain_fraction is not None:
            n_take = max(1, int(round(float(retain_fraction) * len(retain_rows))))
        draw_w = None
        if retain_weights is not None:
            w = torch.as_tensor(retain_weights, dtype=torch.float64, device="cpu").detach().view(-1)
            if w.shape[0] != len(data) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"retain_weights must be (N,) = ({len(data)},) finite and "
                                 f"non-negative, got shape {tuple(w.shape)}")
            draw_w = w[retain_rows]
            # A floor keeps every row reachable: rows whose targets did not move (weight 0) still
            # anchor the model now and then.
            draw_w = draw_w + max(float(draw_w.mean()), 1e-12) * 0.1

    def epoch_rows() -> list[int]:
        if n_take >= len(retain_rows) and retain_per_epoch is None:
            take = retain_rows
        elif draw_w is not None:
            take = retain_rows[torch.multinomial(draw_w, n_take, replacement=False, generator=gen)]
        else:
            take = retain_rows[torch.randperm(len(retain_rows), generator=gen, device="cpu")[:n_take]]
        return torch.cat([forget_rows] * forget_repeats + [take]).tolist()

    def set_train_mode() -> None:
        # Frozen parts stay in eval mode, so their BatchNorm statistics do not move either: the
        # ones `trainable` leaves out and the ones the caller froze (as the baselines' loop does).
        work.train(trainable == "all")
        for m in trained:
            m.train()
        for m in caller_frozen:
            m.eval()

    def run_eval(epoch: float, loss: float) -> dict:
        row = {"epoch": epoch, "loss": loss}
        if evaluate is not None:
            work.eval()
            row.update(_evaluation(evaluate(work), epoch, select, forget_kl))
        # What a caller has waited for so far (training and evaluation): the x axis of a
        # forget-error-versus-time trajectory.
        row["wall_seconds"] = time.perf_counter() - started
        return row

    history = [run_eval(0, float("nan"))]
    checkpoints: dict[float, dict] = {}
    seconds = 0.0
    stopped_early = False

    def settled() -> bool:
        return early_stop and val_rule_is_settled(history)

    def evaluate_at(point: float, loss: float) -> None:
        # Every evaluated point is a candidate for the selection, so its weights are kept.
        if select != "last":
            checkpoints[point] = {k: v.detach().clone() for k, v in work.state_dict().items()}
        history.append(run_eval(point, loss))

    bar = tqdm(range(1, epochs + 1), desc=str(desc), disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        subset = torch.utils.data.Subset(indexed, epoch_rows()) if split else indexed
        loader = CpuDrawLoader(subset, batch_size=batch_size, shuffle=True, generator=gen,
                               drop_last=lone_last_batch(len(subset), batch_size, work))
        # The batches after which a mid-epoch evaluation runs (the epoch's end is always one).
        cuts = {round(j * len(loader) / evals_per_epoch) for j in range(1, evals_per_epoch)}
        cuts -= {0, len(loader)}
        set_train_mode()
        loss_sum, n = 0.0, 0
        f_sum, f_n, r_sum = 0.0, 0, 0.0
        stop_mid = False
        for b, (x, i) in enumerate(loader, start=1):
            try:
                logq, t = F.log_softmax(work(x.to(device)), dim=1), targets[i.to(device)]
            except ValueError as exc:
                err = one_example_batchnorm_error(
                    exc, "data", f"expected at least two examples (or {FREEZE_BATCHNORM})")
                if err is None:
                    raise
                raise err from None
            if forget_kl is None:
                loss = F.kl_div(logq, t, reduction="batchmean")
            else:
                # Per row, to follow the forget rows' share for the stopping test.
                rows = F.kl_div(logq, t, reduction="none").sum(1)
                loss = rows.mean()
                is_f = fmask[i].to(device)
                f_sum += float(rows.detach()[is_f].sum())
                f_n += int(is_f.sum())
                r_sum += float(rows.detach()[~is_f].sum())
            value = float(loss.detach())
            if not math.isfinite(value):
                _check_inputs_finite(x, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt_step()
            loss_sum += value * len(i)
            n += len(i)
            if b in cuts:
                seconds += time.perf_counter() - t0
                # Labelled with the share of the epoch's batches done (several j / evals_per_epoch
                # can round to one batch when an epoch has few).
                evaluate_at(round(epoch - 1 + b / len(loader), 6), loss_sum / n)
                set_train_mode()
                t0 = time.perf_counter()
                if settled():
                    stop_mid = True
                    break
        seconds += time.perf_counter() - t0
        if stop_mid:
            stopped_early = True
            break
        evaluate_at(epoch, loss_sum / n)
        if forget_kl is not None:
            # NaN for a side with no rows: 0 would read as "at its targets".
            history[-1]["forget_loss"] = f_sum / f_n if f_n else math.nan
            history[-1]["retain_loss"] = r_sum / (n - f_n) if n > f_n else math.nan
        bar.set_postfix(loss=f"{loss_sum / n:.4f}")
        # forget_kl: the forget rows sit at their targets (within forget_kl nats on average,
        # measured while training through the epoch), which is what the fine-tuning aims at.
        if epoch < epochs and (settled() or
                               (forget_kl is not None and f_n and f_sum / f_n <= forget_kl)):
            stopped_early = True
            break
    for p in frozen:
        p.requires_grad_(True)
    last = history[-1]["epoch"]
    if select == "last":
        chosen = last
    else:
        chosen = select_val(history) if select == "val" else select(history)
    if isinstance(chosen, numbers.Real) and float(chosen).is_integer():
        chosen = int(chosen)  # whole epochs stay ints, as without evals_per_epoch
    if chosen != last and chosen not in checkpoints:
        points = [h["epoch"] for h in history[1:]]
        raise ValueError(f"select returned epoch {chosen!r}; expected one of the evaluated epochs "
                         f"{points}")
    if chosen != last:
        work.load_state_dict(checkpoints[chosen])
    opt.zero_grad(set_to_none=True)  # the last step's gradients are no part of the model
    work.eval()
    return FinetuneResult(work, history, chosen, seconds, stopped_early)


# ``ppu_fast.finetune(...)`` keeps working after this module shadows the function (see there).
make_callable(__name__)
