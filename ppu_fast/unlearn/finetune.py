"""The Finetune baseline: keep training the original model on the retain set alone (cross-entropy,
SGD), with no forgetting mechanism; forgetting comes only from catastrophic drift."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..caller_state import manual_seed
from . import UnlearnResult, register
from ._common import resolve_device, working_copy
from ._loop import loader, make_optimizer, plan_presets, run_loop
from ._loop import l2_pull as make_l2_pull

# SCRUB's code. Small scale: small_scale_unlearning.ipynb, cells "Finetune and Fisher Helper"
# (``finetune``: SGD without momentum or weight decay, ``run_train_epoch`` in eval mode with
# ``l2_penalty(model, model_init, args.weight_decay)``, args.weight_decay = 0.1 from "Train the original
# model") and "Finetune" (10 epochs, lr 0.01, retain batches of args.batch_size = 128). Large scale:
# large_scale_unlearning.ipynb, ``finetune`` (``train_vanilla``: train mode, no penalty) and "Finetune"
# (class forgetting); selective: MIA_experiments.ipynb's per-seed cell (ft_lr 0.04, ft_epochs 10, on
# its retain loader of retain_bs = 32).
_SMALL = {"epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.1,
          "batch_size": 128, "mode": "eval"}
_LARGE = {**_SMALL, "l2_pull": 0.0, "mode": "train"}
PRESETS = {"small": _SMALL, "selective": {**_LARGE, "lr": 0.04, "batch_size": 32}, "class": _LARGE}


@register("finetune", check=lambda forget, retain, val, model, setting, **given: plan_presets(
    PRESETS, setting, forget, retain, given))
def finetune_retain(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                    seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                    progress: bool = True, setting: str = "auto", epochs: int | None = None,
                    lr: float | None = None, momentum: float | None = None,
                    weight_decay: float | None = None, batch_size: int | None = None,
                    l2_pull: float | None = None, mode: str | None = None) -> UnlearnResult:
    """Cross-entropy SGD on ``retain`` at a constant ``lr``, as SCRUB's ``finetune``
    (small_scale_unlearning.ipynb "Finetune and Fisher Helper" / "Finetune";
    large_scale_unlearning.ipynb ``finetune`` / "Finetune").

    ``setting`` (``"small"``, ``"selective"``, ``"class"`` or ``"auto"``, see
    :func:`ppu_fast.unlearn._loop.infer_setting`) fills the options left at None: 10 epochs, lr 0.01,
    no momentum, no weight decay, batches of 128 (selective: lr 0.04, batches of 32, as
    MIA_experiments.ipynb); at small scale an L2 pull of weight 0.1 toward the
    starting weights (``l2_pull``, SCRUB's ``l2_penalty``) and eval mode (``mode``, see
    :func:`ppu_fast.unlearn._loop.run_loop`), at large scale no pull and train mode. Our earlier
    defaults (momentum 0.9, weight decay 5e-4, batches of 64, train mode) remain available as options.
    ``forget`` and ``val`` are not used beyond the common checks."""
    setting, hp = plan_presets(PRESETS, setting, forget, retain, {
        "epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
        "batch_size": batch_size, "l2_pull": l2_pull, "mode": mode})
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device).to(dev)
    manual_seed(seed)
    batches = loader(retain, int(hp["batch_size"]), seed, model=work)
    penalty = make_l2_pull(work, float(hp["l2_pull"]))

    def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(m(x), y) + penalty(m)

    opt = make_optimizer(work.parameters(), "sgd", float(hp["lr"]), float(hp["momentum"]),
                         float(hp["weight_decay"]))
    t0 = time.perf_counter()
    run_loop(work, lambda epoch: [(batches, loss_fn)], opt, epochs=int(hp["epochs"]), device=dev,
             progress=progress, desc="finetune", mode=str(hp["mode"]))
    return UnlearnResult(work, "finetune", selected_epoch=int(hp["epochs"]),
                         timings={"train": time.perf_counter() - t0},
                         options={"setting": setting, **hp})

