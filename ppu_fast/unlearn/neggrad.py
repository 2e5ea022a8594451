"""NegGrad+ (Kurmanji et al. 2024's strengthened negative gradient): descend on the retain set and
ascend on the forget set at once, ``loss = alpha * CE(retain) - (1 - alpha) * CE(forget)``, each retain
batch paired with the next batch of a cycled forget loader (SCRUB's ``negative_grad``)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..caller_state import manual_seed
from . import UnlearnResult, register
from ._common import resolve_device, working_copy
from ._loop import loader, make_optimizer, paired, plan_presets, run_loop
from ._loop import l2_pull as make_l2_pull

# SCRUB's code. Small scale: small_scale_unlearning.ipynb, cells "Negative Gradient" (alpha 0.95,
# 10 epochs, lr 0.01), "Finetune and Fisher Helper" (``negative_grad``: SGD without momentum or weight
# decay; ``run_neggrad_epoch``: eval mode, loss alpha * (CE_r + l2_penalty(wd 0.1)) - (1 - alpha) * CE_f),
# "Finetune" (retain batches of 128) and "Data Loader" (forget batches of args.forget_bs = 64).
# Large scale: BadT_experiments.ipynb, the per-seed cell (ng_alpha 0.9999, ng_epochs 5, ng_lr 0.01,
# retain_bs 128, forget_bs 512; class forgetting) and ``negative_grad`` ->
# thirdparty/repdistiller/helper/loops.py ``train_negrad`` (train mode, no penalty); selective:
# MIA_experiments.ipynb's per-seed cell, the same but retain_bs 32, forget_bs 16.
_SMALL = {"alpha": 0.95, "epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
          "l2_pull": 0.1, "batch_size": 128, "forget_batch_size": 64, "mode": "eval"}
_LARGE = {**_SMALL, "alpha": 0.9999, "epochs": 5, "l2_pull": 0.0, "forget_batch_size": 512,
          "mode": "train"}
PRESETS = {"small": _SMALL, "selective": {**_LARGE, "batch_size": 32, "forget_batch_size": 16},
           "class": _LARGE}


def _plan(forget: Dataset, retain: Dataset, setting: str, given: dict) -> tuple[str, dict]:
    """(the setting, "auto" resolved from the labels; the hyper-parameters, each given one or
    else the preset's), checked before any work."""
    setting, hp = plan_presets(PRESETS, setting, forget, retain, given)
    if not 0.0 <= float(hp["alpha"]) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {hp['alpha']}")
    return setting, hp


@register("neggrad+", check=lambda forget, retain, val, model, setting, **given: _plan(
    forget, retain, setting, given))
def neggrad_plus(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                 seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                 progress: bool = True, setting: str = "auto", alpha: float | None = None,
                 epochs: int | None = None, lr: float | None = None, momentum: float | None = None,
                 weight_decay: float | None = None, batch_size: int | None = None,
                 forget_batch_size: int | None = None, l2_pull: float | None = None,
                 mode: str | None = None) -> UnlearnResult:
    """NegGrad+ with SGD, as SCRUB's ``negative_grad`` (small_scale_unlearning.ipynb, "Finetune and
    Fisher Helper" / "Negative Gradient"; large scale: BadT_experiments.ipynb and loops.py
    ``train_negrad``).

    ``setting`` (``"small"``, ``"selective"``, ``"class"`` or ``"auto"``, see
    :func:`ppu_fast.unlearn._loop.infer_setting`) fills the options left at None. Small scale:
    ``alpha`` 0.95, 10 epochs, lr 0.01, no momentum, no weight decay, retain / forget batches 128 / 64,
    eval mode and an L2 pull of weight 0.1 toward the starting weights inside the retain term
    (``alpha * (CE_r + pull) - (1 - alpha) * CE_f``). Large scale: ``alpha`` 0.9999, 5 epochs, lr
    0.01, batches 128 / 512 (selective: 32 / 16, as MIA_experiments.ipynb), train mode, no pull.
    ``val`` is not used."""
    setting, hp = _plan(forget, retain, setting, {
        "alpha": alpha, "epochs": epochs, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "batch_size": batch_size,
        "forget_batch_size": forget_batch_size, "l2_pull": l2_pull, "mode": mode})
    a = float(hp["alpha"])
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device).to(dev)
    manual_seed(seed)
    retain_batches = loader(retain, int(hp["batch_size"]), seed, model=work)
    forget_batches = loader(forget, int(hp["forget_batch_size"]), seed + 1, model=work,
                            arg="forget_batch_size")
    penalty = make_l2_pull(work, float(hp["l2_pull"]))

    def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
        xr, yr, xf, yf = batch
        # Two forward passes, as SCRUB's code: in train mode each half keeps its own BatchNorm
        # batch statistics.
        return a * (F.cross_entropy(m(xr), yr) + penalty(m)) - (1.0 - a) * F.cross_entropy(m(xf), yf)

    opt = make_optimizer(work.parameters(), "sgd", float(hp["lr"]), float(hp["momentum"]),
                         float(hp["weight_decay"]))
    t0 = time.perf_counter()
    run_loop(work, lambda epoch: [(paired(retain_batches, forget_batches), loss_fn)], opt,
             epochs=int(hp["epochs"]), device=dev, progress=progress, desc="neggrad+",
             mode=str(hp["mode"]))
    return UnlearnResult(work, "neggrad+", selected_epoch=int(hp["epochs"]),
                         timings={"train": time.perf_counter() - t0},
                         options={"setting": setting, **hp})
