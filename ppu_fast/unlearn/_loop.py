"""The one gradient loop that the baselines of issue 5 share (NegGrad+, CF-k, EU-k, Bad-T, SCRUB,
SCRUB+R), and the helpers they have in common: the paper's settings (small scale, large-scale
selective, class unlearning), freezing all but the last block, and seeded loaders.

Each baseline states *what* it optimises as a list of passes per epoch, ``(batches, loss_fn)``; this
module owns *how*: device moves, zero_grad / backward / step, the learning-rate schedule, frozen
modules kept in eval mode, per-epoch checkpoints and evaluation, timing. The Finetune baseline and the
training of the original and retrained models use :func:`ppu_fast.training.fit`, which is the same
cross-entropy SGD step without these hooks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..caller_state import check_positive_int, frozen_modules, is_int, is_real
from ..data import CpuDrawLoader, collate_pairs, dataset_targets
from ..torch_defaults import optimizer_step
from ..training import (check_optimizer_name, check_optimizer_options, lone_last_batch,
                        one_example_batchnorm, one_example_batchnorm_error)

SETTINGS = ("small", "selective", "class")
LossFn = Callable[[nn.Module, tuple], torch.Tensor]
Passes = Callable[[int], Sequence[tuple[Iterable, LossFn]]]
SMALL_SCALE_MAX_TRAIN = 1000


def infer_setting(forget: Dataset, retain: Dataset) -> str:
    """The paper's experimental setting that a forget / retain pair looks like.

    ``"class"`` when no retain example shares a class with the forget set (a whole class is
    forgotten); otherwise ``"small"`` when forget + retain hold at most ``SMALL_SCALE_MAX_TRAIN``
    examples (the paper's small scale, CIFAR-5 / Lacuna-5, trains on 500), else ``"selective"``.
    The command line passes the setting explicitly (:func:`setting_for`); this guess serves callers of
    the API who do not."""
    forget_classes = dataset_targets(forget).unique()
    if not bool(torch.isin(dataset_targets(retain), forget_classes).any()):
        return "class"
    return "small" if len(forget) + len(retain) <= SMALL_SCALE_MAX_TRAIN else "selective"


def setting_for(dataset: str, scenario: str) -> str:
    """The setting of a named experiment: the small-scale datasets (``digits5``, ``cifar5``) are
    ``"small"`` whatever the scenario; the others are their scenario (``"selective"``, ``"class"``)."""
    from ..data import SMALL_SCALE

    if dataset in SMALL_SCALE:
        return "small"
    if scenario not in ("selective", "class"):
        raise ValueError(f"scenario must be 'selective' or 'class', got {scenario!r}")
    return scenario


def resolve_setting(setting: str, forget: Dataset, retain: Dataset) -> str:
    """``setting`` checked, with ``"auto"`` replaced by :func:`infer_setting`."""
    if setting == "auto":
        return infer_setting(forget, retain)
    if setting not in SETTINGS:
        raise ValueError(f"setting must be 'auto' or one of {', '.join(SETTINGS)}, got {setting!r}")
    return setting


def pick(value: object, preset: dict, key: str) -> object:
    """An explicit option wins over the setting's preset (``None`` means "use the preset")."""
    return preset[key] if value is None else value


def plan_presets(presets: dict, setting: str, forget: Dataset, retain: Dataset, given: dict
                 ) -> tuple[str, dict]:
    """A baseline's options before any work: (the setting, ``"auto"`` resolved from the labels;
    each option of ``given`` or else the setting's preset, checked by
    :func:`check_training_options`)."""
    setting = resolve_setting(setting, forget, retain)
    hp = {k: pick(v, presets[setting], k) for k, v in given.items()}
    check_training_options(hp)
    return setting, hp


def check_l2_pull(weight: object) -> None:
    """Refuse an L2 pull weight (:func:`l2_pull`) that is not a number >= 0: a negative one
    pushes the weights away from where they started."""
    if not (is_real(weight) and weight >= 0):
        raise ValueError(f"l2_pull must be a number >= 0, got {weight!r}")


def loader(data: Dataset, batch_size: int, seed: int, shuffle: bool = True,
           model: nn.Module | None = None, arg: str = "batch_size") -> DataLoader:
    """A loader whose order is fixed by ``seed`` (its own generator, so other draws do not shift it);
    a shuffled loader for training ``model`` drops a last batch that ``model`` cannot train on
    (:func:`~ppu_fast.training.lone_last_batch`). ``arg`` names ``batch_size`` in errors."""
    check_positive_int(batch_size, arg)
    batch_size = int(batch_size)
    gen = torch.Generator().manual_seed(int(seed))
    drop = shuffle and model is not None and lone_last_batch(len(data), batch_size, model)
    return CpuDrawLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop,
                         collate_fn=collate_pairs)


def cycle(batches: Iterable) -> Iterator:
    """Endless iteration over a loader, reshuffling on every pass (``itertools.cycle`` would replay
    the first pass's order and keep every batch in memory)."""
    while True:
        yield from batches


def paired(first: Iterable, second: Iterable) -> Iterator[tuple]:
    """One pass over ``first``, each batch joined with the next batch of ``second`` (cycled): the
    retain / forget pairing of NegGrad+. Yields ``(*batch_first, *batch_second)``."""
    for a, b in zip(first, cycle(second)):
        yield (*a, *b)


# ----------------------------------------------------------------------------------------- freezing
def last_block(model: nn.Module) -> list[str]:
    """Names of the modules that CF-k and EU-k train, after SCRUB: ALL-CNN's last (1x1) conv block,
    ResNet-18's ``layer4``, the small CNN's last conv block. Other models must name theirs."""
    from ..models import AllCNN, ResNet18, SmallCNN

    if isinstance(model, AllCNN):
        convs = [name for name, m in model.features.named_children() if isinstance(m, nn.Sequential)]
        return [f"features.{convs[-1]}"]
    if isinstance(model, SmallCNN):
        convs = [name for name, m in model.features.named_children() if isinstance(m, nn.Sequential)]
        return [f"features.{convs[-1]}"]
    if isinstance(model, ResNet18) or isinstance(getattr(model, "layer4", None), nn.Module):
        return ["layer4"]
    raise ValueError(f"cannot tell the last block of a {type(model).__name__}: pass layers=[...] with "
                     f"module names from model.named_modules()")


def as_names(names: str | Sequence[str], arg: str = "layers") -> list[str]:
    """A module name or a sequence of them, as a list (a single string is one name, not its
    characters); ``arg`` names the option in errors."""
    if isinstance(names, str):
        return [names]
    if not isinstance(names, Iterable) or isinstance(names, (bytes, dict)):
        raise TypeError(f"{arg}: expected a module name or a list of them, as "
                        f"model.named_modules() gives them (e.g. ['layer4']), got {names!r} "
                        f"({type(names).__name__})")
    out = list(names)
    other = [n for n in out if not isinstance(n, str)]
    if other:
        raise TypeError(f"{arg}: module names are strings, as model.named_modules() gives them "
                        f"(e.g. '2', 'layer4.1'), got {other[0]!r} ({type(other[0]).__name__})")
    if not out:
        raise ValueError(f"{arg} must be a non-empty list of module names, got {names!r}")
    return out


def modules_named(model: nn.Module, names: Sequence[str], arg: str = "layers") -> list[nn.Module]:
    """The submodules of ``model`` called ``names``; a clear error for a name it lacks."""
    table = dict(model.named_modules())
    if isinstance(names, str) or not names:
        raise ValueError(f"{arg} must be a non-empty list of module names, got {names!r}")
    other = [n for n in names if not isinstance(n, str)]
    if other:
        raise TypeError(f"{arg}: module names are strings, as model.named_modules() gives them "
                        f"(e.g. '2', 'layer4.1'), got {other[0]!r} ({type(other[0]).__name__})")
    missing = [n for n in names if n not in table or n == ""]
    if missing:
        some = ", ".join(n for n in list(table)[1:12])
        raise ValueError(f"{arg}: the model has no module {', '.join(map(repr, missing))} (it has e.g. "
                         f"{some}, ...)")
    return [table[n] for n in names]


def modules_with_parameters(model: nn.Module, names: Sequence[str], arg: str = "layers",
                            purpose: str = "to train") -> list[nn.Module]:
    """:func:`modules_named`, refusing names that together hold no parameter (an activation or a
    pooling module): nothing would be trained (``layers``) or put back (EU-k's ``reset``)."""
    keep = modules_named(model, names, arg)
    if not any(True for m in keep for _ in m.parameters()):
        raise ValueError(f"{arg}: {', '.join(map(repr, names))} hold no parameters (e.g. an "
                         f"activation or pooling module); expected modules with weights {purpose}")
    return keep


def freeze_all_but(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Turn off gradients of every parameter outside the modules ``names``; returns those modules."""
    keep = modules_with_parameters(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in keep:
        for p in m.parameters():
            p.requires_grad_(True)
    return keep


# -------------------------------------------------------------------------------------------- loop
def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or Adam over ``params``."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: every parameter is frozen")
    check_optimizer_options(lr, momentum, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    check_optimizer_name(name)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@dataclass
class LoopResult:
    """``history``: one row per epoch (epoch 0 = the starting model) with the mean loss of each pass
    and what ``evaluate`` returned; ``checkpoints``: state dicts per epoch (only when asked for);
    ``seconds``: time spent in the training steps (evaluation excluded)."""

    history: list[dict] = field(default_factory=list)
    checkpoints: dict[int, dict] = field(default_factory=dict)
    seconds: float = 0.0


MODES = ("train", "train-all", "eval")


def check_mode(mode: str) -> str:
    """``mode`` checked against :data:`MODES` (see :func:`run_loop`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def set_mode(model: nn.Module, mode: str, frozen: Sequence[nn.Module] = ()) -> None:
    """Put ``model`` in the training-time ``mode`` of :func:`run_loop`."""
    if mode == "eval":
        model.eval()
        return
    model.train()
    if mode == "train":
        for m in frozen:
            m.eval()


def run_loop(model: nn.Module, passes: Passes, optimizer: torch.optim.Optimizer, *, epochs: int,
             device: torch.device, lr_at: Callable[[int], float] | None = None,
             evaluate: Callable[[nn.Module], dict] | None = None, keep_checkpoints: bool = False,
             progress: bool = True, desc: str = "unlearn", mode: str = "train") -> LoopResult:
    """Train ``model`` in place for ``epochs`` epochs.

    Each epoch (1-based) sets the learning rate to ``lr_at(epoch)`` when given, then runs the passes
    that ``passes(epoch)`` lists, in order: for every batch (a tuple of tensors, moved to ``device``)
    ``loss = loss_fn(model, batch)``, backward, optimiser step. ``mode`` is the module mode during the
    steps: ``"train"`` (frozen modules, ``caller_state.frozen_modules``, stay in eval mode, so
    their BatchNorm statistics do not move), ``"train-all"`` (every module in train mode, frozen
    ones included, as SCRUB's ``train_vanilla``), ``"eval"`` (BatchNorm uses and keeps its running statistics, as
    SCRUB's small-scale ``run_train_epoch``). ``evaluate`` (eval mode, before the first epoch and after
    each) and ``keep_checkpoints`` serve the rewinding of SCRUB+R."""
    from tqdm.auto import tqdm

    check_positive_int(epochs, "epochs")
    epochs = int(epochs)
    check_mode(mode)
    model.to(device)
    # Asynchronous copies to a GPU only: one from a GPU to the CPU returns before its data has
    # arrived, and the loss would read it.
    to_gpu = torch.device(device).type == "cuda"
    frozen = frozen_modules(model)
    result = LoopResult()

    def record(epoch: int, losses: dict) -> None:
        row = {"epoch": epoch, **losses}
        if evaluate is not None:
            model.eval()
            row.update(evaluate(model))
        result.history.append(row)

    record(0, {})
    step = optimizer_step(optimizer)  # see torch_defaults: Adam's step counters
    bar = tqdm(range(1, epochs + 1), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch)
        set_mode(model, mode, frozen)
        losses: dict[str, float] = {}
        for j, (batches, loss_fn) in enumerate(passes(epoch)):
            total, count = 0.0, 0
            for batch in batches:
                batch = tuple(t.to(device, non_blocking=to_gpu) for t in batch)
                try:
                    loss = loss_fn(model, batch)
                except ValueError as exc:
                    if not one_example_batchnorm(exc):
                        raise
                    # A one-example set (the commonest deletion request) gives one-example batches.
                    from . import method_options
                    try:
                        takes_mode = "mode" in method_options(desc)
                    except (KeyError, ValueError, TypeError):
                        takes_mode = False
                    hint = ("pass mode='eval' (BatchNorm on its running statistics), or "
                            if takes_mode else "")
                    raise one_example_batchnorm_error(
                        exc, desc, f"a set behind it (e.g. a forget set of one) is smaller than a "
                                   f"trainable batch: {hint}use method='ppu', which trains on "
                                   f"forget and retain rows together") from None
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                step()
                total += float(loss.detach())
                count += 1
            losses[f"loss_{j}"] = total / max(count, 1)
        result.seconds += time.perf_counter() - t0
        if keep_checkpoints:
            result.checkpoints[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record(epoch, losses)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
    optimizer.zero_grad(set_to_none=True)  # the last step's gradients are no part of the model
    model.eval()
    return result


def epochs_list(milestones: Sequence[int], arg: str) -> list:
    """``milestones`` as a list of epoch numbers; a clear error for a bare number or a string, or
    an entry that is not an epoch (2.5 was cut to 2, -1 decayed from the start)."""
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
        raise TypeError(f"{arg}: expected a list of epochs (e.g. [5, 10]), got {milestones!r}")
    marks = list(milestones)
    bad = [m for m in marks if not (is_int(m) and m >= 0)]
    if bad:
        raise ValueError(f"{arg}: {bad[0]!r} is not an epoch; expected integers >= 0 (e.g. [5, 10])")
    return marks


def check_loss_weights(**weights: float) -> None:
    """Refuse a negative loss weight: it turns the term it weighs from minimised to maximised."""
    for name, w in weights.items():
        if not float(w) >= 0:
            raise ValueError(f"{name} must be >= 0 (a loss weight), got {w!r}")


def check_decay(decay: float) -> None:
    """Refuse a learning-rate decay factor that is not a positive finite number."""
    if not (is_real(decay) and 0 < decay < math.inf):
        # A negative decay made the learning rate negative after the first milestone.
        raise ValueError(f"lr_decay must be a positive finite number, got {decay!r}")


def milestone_lr(base: float, milestones: Sequence[int], decay: float) -> Callable[[int], float]:
    """SCRUB's ``adjust_learning_rate``: ``base * decay ** (number of milestones below epoch)``."""
    check_decay(decay)
    marks = sorted(int(m) for m in epochs_list(milestones, "lr_milestones"))
    return lambda epoch: base * decay ** sum(epoch > m for m in marks)


def fk_lr(lr: float, milestones: Sequence[int], decay: float,
          decayed_base: float | None) -> Callable[[int], float]:
    """The schedule of SCRUB's ``fk_fientune`` (CF-k, EU-k; small_scale_unlearning.ipynb, "Finetune
    and Fisher Helper"), 1-based epochs: ``lr`` until an epoch passes a milestone, then
    ``decayed_base * decay ** (milestones passed)``. SCRUB's loop counts epochs from 0 and its
    ``adjust_learning_rate`` decays ``args.sgda_learning_rate``, not the CF-k / EU-k lr: at small
    scale SCRUB's own lr, 5e-4, so with milestones [10, 15, 20] EU-k's 30 epochs run 11 at 0.01, then
    5e-5, 5e-6, 5e-7; at large scale main_merged.py's default, 0.01 (see cf_k.py).
    ``decayed_base=None`` decays ``lr`` itself instead."""
    check_decay(decay)
    marks = sorted(int(m) for m in epochs_list(milestones, "lr_milestones"))
    base = lr if decayed_base is None else decayed_base

    def at(epoch: int) -> float:
        steps = sum(epoch - 1 > m for m in marks)
        return lr if steps == 0 else base * decay ** steps

    return at


def check_training_options(hp: dict) -> None:
    """The baselines' training options that ``hp`` holds (after their presets filled them),
    checked before any work, as the loop, its loaders, optimizer, schedule and pull would check
    them when the method ran: ``epochs``, ``batch_size`` and ``forget_batch_size`` (None: not
    used) positive ints; ``lr`` / ``momentum`` / ``weight_decay``; ``mode``; ``l2_pull`` >= 0;
    ``lr_milestones``, ``lr_decay`` and ``lr_decayed_base`` (positive or None)."""
    for name in ("epochs", "batch_size", "forget_batch_size"):
        if name in hp and (hp[name] is not None or name != "forget_batch_size"):
            check_positive_int(hp[name], name)
    if "lr" in hp:
        check_optimizer_options(hp["lr"], hp.get("momentum", 0.0), hp.get("weight_decay", 0.0))
    if "mode" in hp:
        check_mode(hp["mode"])
    if "l2_pull" in hp:
        check_l2_pull(hp["l2_pull"])
    if "lr_milestones" in hp:
        epochs_list(hp["lr_milestones"], "lr_milestones")
    if "lr_decay" in hp:
        check_decay(hp["lr_decay"])
    base = hp.get("lr_decayed_base")
    if base is not None and not (is_real(base) and 0 < base < math.inf):
        raise ValueError(f"lr_decayed_base must be a positive finite number or None, got {base!r}")


def l2_pull(model: nn.Module, weight: float) -> Callable[[nn.Module], torch.Tensor]:
    """SCRUB's ``l2_penalty`` as a closure: ``weight / 2 * sum ||p - p0||^2`` over the parameters
    that are trainable now, ``p0`` their values now. SCRUB's small-scale baselines add it to the loss
    with ``weight = args.weight_decay = 0.1`` (small_scale_unlearning.ipynb, "Finetune and Fisher
    Helper"), which pulls them back toward the model they started from, where plain weight decay would
    pull toward zero."""
    check_l2_pull(weight)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def penalty(m: nn.Module) -> torch.Tensor:
        terms = [(p - anchor[n].to(p.device)).pow(2).sum() for n, p in m.named_parameters()
                 if n in anchor and p.requires_grad]
        if weight == 0 or not terms:
            return torch.zeros((), device=next(m.parameters()).device)
        return weight / 2.0 * torch.stack(terms).sum()

    return penalty


# ------------------------------------------------------------------------------ experiment presets
# ``--methods all``: every registered method of the paper's comparison, in the paper's row order.
ALL_METHODS = ("original", "retrain", "finetune", "neggrad+", "cf-k", "eu-k", "fisher", "bad-t", "scrub",
               "scrub+r", "ppu", "ppu-bias", "ppu-random", "scrub+ppu", "finetune+ppu")
# Methods of the paper's small-scale tables only (Tables 1 and 6), each with the method it follows in
# their row order. NTK forgetting holds the Jacobian over the whole training set: small scale only.
SMALL_SCALE_ONLY = {"ntk": "fisher"}
COMPOSITES = {"scrub+ppu": "scrub_options", "finetune+ppu": "finetune_options"}


def all_methods(dataset: str | None = None) -> tuple[str, ...]:
    """What ``--methods all`` runs on ``dataset``: :data:`ALL_METHODS`, and on the small-scale
    datasets (``digits5``, ``cifar5``) also :data:`SMALL_SCALE_ONLY` in the paper's row order."""
    from ..data import SMALL_SCALE

    out = list(ALL_METHODS)
    if dataset in SMALL_SCALE:
        for name, after in SMALL_SCALE_ONLY.items():
            out.insert(out.index(after) + 1, name)
    return tuple(out)


def expand_methods(names: Sequence[str], dataset: str | None = None) -> list[str]:
    """``names`` with ``all`` replaced by :func:`all_methods` of ``dataset`` (duplicates dropped, order
    kept)."""
    out: list[str] = []
    for name in names:
        for n in (all_methods(dataset) if name == "all" else (name,)):
            if n not in out:
                out.append(n)
    return out


def baseline_kwargs(dataset: str, scenario: str, methods: Sequence[str],
                    ppu_step: dict | None = None) -> dict[str, dict]:
    """Options that an experiment on ``dataset`` / ``scenario`` gives the baselines: the setting of
    SCRUB's hyper-parameters (:func:`setting_for`) to every method with a ``setting`` option
    (and to SCRUB inside ``scrub+ppu``), and ``ppu_step`` (e.g. the command line's PPU epochs and lr)
    to the PPU step of the composites. Methods without such options are left out."""
    from . import method_options

    setting = setting_for(dataset, scenario)
    out: dict[str, dict] = {}
    for name in methods:
        accepted = method_options(name)
        kw: dict = {}
        if "setting" in accepted:
            kw["setting"] = setting
        if name in COMPOSITES:
            first = COMPOSITES[name]
            if "setting" in method_options(first.split("_")[0]):
                kw[first] = {"setting": setting}
            if ppu_step:
                kw["ppu_options"] = dict(ppu_step)
        if kw:
            out[name] = kw
    return out
