"""NegGrad+ (Kurmanji et al. 2024's strengthened negative gradient): descend on the retain set and
ascend on the forget set at once, ``loss = alpha * CE(retain) - (1 - alpha) * CE(forget)``, each retain
batch paired with the next batch of a cycled forget loader (SCRUB's ``negative_grad``)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from . import UnlearnResult, register
from ._common import resolve_device, working_copy
from ._loop import loader, make_optimizer, paired, pick, resolve_setting, run_loop

# SCRUB's settings: small scale (CIFAR-5 / Lacuna-5) and large scale (CIFAR-10 / Lacuna-10).
PRESETS = {"small": {"alpha": 0.95, "epochs": 10},
           "selective": {"alpha": 0.9999, "epochs": 5},
           "class": {"alpha": 0.9999, "epochs": 5}}


@register("neggrad+")
def neggrad_plus(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                 seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                 progress: bool = True, setting: str = "auto", alpha: float | None = None,
                 epochs: int | None = None, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 5e-4, batch_size: int = 64,
                 forget_batch_size: int | None = None) -> UnlearnResult:
    """NegGrad+ with SGD. ``setting`` (``"small"``, ``"selective"``, ``"class"`` or ``"auto"``, see
    :func:`ppu_fast.unlearn._loop.infer_setting`) picks ``alpha`` (0.95 small, 0.9999 large) and
    ``epochs`` (10 small, 5 large) unless they are given. ``forget_batch_size`` defaults to
    ``batch_size``. ``val`` is not used."""
    setting = resolve_setting(setting, forget, retain)
    alpha = float(pick(alpha, PRESETS[setting], "alpha"))
    epochs = int(pick(epochs, PRESETS[setting], "epochs"))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    fbs = batch_size if forget_batch_size is None else forget_batch_size
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device)
    torch.manual_seed(seed)
    retain_batches = loader(retain, batch_size, seed)
    forget_batches = loader(forget, fbs, seed + 1)

    def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
        xr, yr, xf, yf = batch
        # Two forward passes, as SCRUB's code: each half keeps its own BatchNorm batch statistics.
        return alpha * F.cross_entropy(m(xr), yr) - (1.0 - alpha) * F.cross_entropy(m(xf), yf)

    opt = make_optimizer(work.parameters(), "sgd", lr, momentum, weight_decay)
    t0 = time.perf_counter()
    run_loop(work, lambda epoch: [(paired(retain_batches, forget_batches), loss_fn)], opt, epochs=epochs,
             device=dev, progress=progress, desc="neggrad+")
    return UnlearnResult(work, "neggrad+", timings={"train": time.perf_counter() - t0},
                         options={"setting": setting, "alpha": alpha, "epochs": epochs, "lr": lr,
                                  "batch_size": batch_size, "forget_batch_size": fbs})
