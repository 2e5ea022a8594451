"""Bad-T (Chundawat et al. 2023, "bad teaching"): distil into the model from two teachers, the original
model on retain examples and a randomly initialised copy (the incompetent teacher) on forget
examples, with KL at temperature T; by default as SCRUB's code runs it."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..caller_state import manual_seed
from ..models import init_state as init_state_of, require_reset, reset_parameters
from . import UnlearnResult, register
from ._common import resolve_device, sample, working_copy
from ._loop import (check_loss_weights, check_training_options, loader, make_optimizer, paired,
                    run_loop)
from .scrub import distill_kl

VARIANTS = ("scrub", "chundawat")
# variant "scrub": BadT_experiments.ipynb, ``badt(gteacher, bteacher, student)`` (Adam, bt_learning_rate
# 1e-3, bt_weight_decay 5e-4, bt_kd_T 4, bt_alpha = bt_beta = 1, one epoch) with the loaders of its
# per-seed cell (retain_bs 128, forget_bs 512, the whole retain set) and loops.py ``train_bad_teacher``.
# SCRUB has Bad-T at large scale only; the same values serve every setting.
# variant "chundawat": our earlier reading of Chundawat et al. (30 % of retain mixed with forget in
# batches of 256, KL without the T^2 factor, no weight decay).
PRESETS = {"scrub": {"batch_size": 128, "forget_batch_size": 512, "retain_fraction": 1.0,
                     "weight_decay": 5e-4},
           "chundawat": {"batch_size": 256, "forget_batch_size": None, "retain_fraction": 0.3,
                         "weight_decay": 0.0}}


class _Flagged(Dataset):
    """``(x, y, flag)`` items: flag 1 for forget examples, 0 for retain ones."""

    def __init__(self, data: Dataset, flag: int) -> None:
        self.data, self.flag = data, torch.tensor(flag, dtype=torch.float32, device="cpu")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple:
        x, y = self.data[i]
        return x, y, self.flag


def _plan(model: nn.Module | None, *, epochs: int, lr: float, temperature: float,
          batch_size: int | None, retain_fraction: float | None, variant: str,
          forget_batch_size: int | None, weight_decay: float | None, alpha: float, beta: float,
          mode: str, init: object) -> dict:
    """The options, those left at None filled from the variant's preset, checked before any work
    (with ``model``: that a default incompetent teacher can be drawn for it)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    preset = PRESETS[variant]
    if variant == "chundawat" and forget_batch_size is not None:
        raise ValueError("forget_batch_size applies to variant='scrub' only (the chundawat variant mixes "
                         "forget and retain examples in one batch)")
    if variant == "chundawat" and (alpha != 1.0 or beta != 1.0):
        raise ValueError(f"alpha={alpha!r}, beta={beta!r}: the loss weights apply to variant='scrub' only "
                         f"(the chundawat variant's one loss has none)")
    hp = {"epochs": epochs, "lr": lr, "mode": mode,
          **{k: preset[k] if v is None else v for k, v in
             (("batch_size", batch_size), ("retain_fraction", retain_fraction),
              ("weight_decay", weight_decay), ("forget_batch_size", forget_batch_size))}}
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    check_loss_weights(alpha=alpha, beta=beta)
    check_training_options(hp)
    if not 0.0 < hp["retain_fraction"] <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {hp['retain_fraction']}")
    if init is not None and not isinstance(init, (nn.Module, dict)):
        raise TypeError(f"init must be a torch.nn.Module, a state dict or None (the incompetent "
                        f"teacher), got {type(init).__name__}")
    if init is None and model is not None:
        require_reset(model, "Bad-T's incompetent teacher")
    return hp


@register("bad-t", check=lambda forget, retain, val, model, **o: _plan(model, **o))
def bad_teacher(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                progress: bool = True, epochs: int = 1, lr: float = 1e-3, temperature: float = 4.0,
                batch_size: int | None = None, retain_fraction: float | None = None,
                variant: str = "scrub", forget_batch_size: int | None = None,
                weight_decay: float | None = None, alpha: float = 1.0,
                beta: float = 1.0, mode: str = "train", init: nn.Module | dict | None = None
                ) -> UnlearnResult:
    """Adam at ``lr`` for ``epochs``, the student in ``mode`` (train), teachers in eval mode.

    ``variant="scrub"`` (default) follows SCRUB's BadT_experiments.ipynb ``badt`` and loops.py
    ``train_bad_teacher``: each retain batch (``batch_size`` 128) is paired with the next batch of a
    cycled forget loader (``forget_batch_size`` 512); the loss is ``alpha * KL_T(student, original)``
    on the retain batch plus ``beta * KL_T(student, bad teacher)`` on the forget batch, SCRUB's
    ``DistillKL`` (scaled by T^2); Adam with ``weight_decay`` 5e-4; the whole retain set
    (``retain_fraction`` 1). ``variant="chundawat"`` is our earlier layout: forget plus a seeded
    ``retain_fraction`` (0.3) of retain, shuffled together in batches of 256, each example's target the
    softmax at ``temperature`` of its teacher, KL mean over the batch, no weight decay.
    ``mode``: the student's module mode during the steps (:func:`ppu_fast.unlearn._loop.run_loop`):
    ``"train"`` as SCRUB's ``train_bad_teacher``; ``"eval"`` keeps BatchNorm on its running
    statistics (see docs/baselines.md for what that changes on small data).
    ``init``: the incompetent teacher, a model (or state dict) of the same architecture with
    untrained weights; by default a copy of ``model`` re-initialised with ``seed``, refused when a trainable
    parameter has no ``reset_parameters()`` to re-draw it (that part of the teacher would keep
    the trained weights, which saw the forget set).
    Options left at None take the variant's value."""
    hp = _plan(model, epochs=epochs, lr=lr, temperature=temperature, batch_size=batch_size,
               retain_fraction=retain_fraction, variant=variant, forget_batch_size=forget_batch_size,
               weight_decay=weight_decay, alpha=alpha, beta=beta, mode=mode, init=init)
    batch_size, retain_fraction = hp["batch_size"], hp["retain_fraction"]
    weight_decay, forget_batch_size = hp["weight_decay"], hp["forget_batch_size"]
    if init is not None:
        init_state = init_state_of(init, model)
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device).to(dev)
    good = copy.deepcopy(work).eval()
    bad = copy.deepcopy(work)
    if init is None:
        reset_parameters(bad, seed)
    else:
        bad.load_state_dict(init_state)
    bad = bad.to(dev).eval()
    for p in list(good.parameters()) + list(bad.parameters()):
        p.requires_grad_(False)
    kept = sample(retain, max(1, int(round(retain_fraction * len(retain)))), seed)
    T = float(temperature)

    if variant == "scrub":
        retain_batches = loader(kept, batch_size, seed, model=work)
        forget_batches = loader(forget, forget_batch_size, seed + 1, model=work,
                                arg="forget_batch_size")
        batches = None

        def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
            xr, _, xf, _ = batch
            with torch.no_grad():
                t_good, t_bad = good(xr), bad(xf)
            return alpha * distill_kl(m(xr), t_good, T) + beta * distill_kl(m(xf), t_bad, T)

        def passes(epoch: int) -> list:
            return [(paired(retain_batches, forget_batches), loss_fn)]
    else:
        batches = loader(ConcatDataset([_Flagged(forget, 1), _Flagged(kept, 0)]), batch_size, seed,
                         model=work)

        def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
            x, _, flag = batch
            with torch.no_grad():
                good_p = F.softmax(good(x) / T, dim=1)
                bad_p = F.softmax(bad(x) / T, dim=1)
                target = flag[:, None] * bad_p + (1.0 - flag[:, None]) * good_p
            return F.kl_div(F.log_softmax(m(x) / T, dim=1), target, reduction="batchmean")

        def passes(epoch: int) -> list:
            return [(batches, loss_fn)]

    manual_seed(seed)
    opt = make_optimizer(work.parameters(), "adam", lr, weight_decay=weight_decay)
    t0 = time.perf_counter()
    run_loop(work, passes, opt, epochs=epochs, device=dev, progress=progress, desc="bad-t", mode=mode)
    options = {"variant": variant, "epochs": int(epochs), "lr": lr, "temperature": temperature,
               "batch_size": batch_size, "retain_fraction": retain_fraction,
               "weight_decay": weight_decay, "optimizer": "adam", "mode": mode,
               "teacher": "init" if init is not None else "reset"}
    if variant == "scrub":
        options.update(forget_batch_size=forget_batch_size, alpha=alpha, beta=beta)
    return UnlearnResult(work, "bad-t", selected_epoch=int(epochs),
                         timings={"train": time.perf_counter() - t0}, options=options)
