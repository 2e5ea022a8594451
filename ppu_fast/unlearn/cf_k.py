"""CF-k (Goel et al. 2022, "catastrophic forgetting of the last k layers"): freeze everything but the
last block and fine-tune that block on the retain set, as SCRUB's ``fk_fientune`` runs it."""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..caller_state import manual_seed
from . import UnlearnResult, register
from ._common import resolve_device, working_copy
from ._loop import (as_names, fk_lr, freeze_all_but, last_block, loader, make_optimizer,
                    modules_with_parameters, plan_presets, run_loop)
from ._loop import l2_pull as make_l2_pull

# SCRUB's code. Small scale: small_scale_unlearning.ipynb, cells "Catastrophic Forgetting k layers"
# (cfk_lr 0.01, cfk_epochs 10, lr_decay_epochs [10, 15, 20]) and "Finetune and Fisher Helper"
# (``fk_fientune``: SGD without momentum or weight decay, ``sgda_adjust_learning_rate`` each epoch,
# ``run_train_epoch``: eval mode plus ``l2_penalty`` of weight args.weight_decay = 0.1 over the
# trainable parameters), retain batches of 128 ("Finetune"). Large scale: BadT_experiments.ipynb
# ``cfk_unlearn`` (cfk_bs 64; its ``fk_fientune`` calls loops.py ``train_vanilla``: the whole model in
# train mode, frozen blocks' BatchNorm statistics included, no penalty). The decayed lr's base is
# args.sgda_learning_rate: 5e-4 at small scale, where the SCRUB cell has set it before; at large scale
# each seed re-parses args (``%run main_merged.py``, whose --sgda-learning-rate defaults to 0.01) and
# runs CF-k / EU-k before ``scrub`` sets 5e-4 (MIA_experiments.ipynb; BadT_experiments.ipynb runs
# ``train.py``, not in the repository, the same way): 0.01, i.e. the CF-k / EU-k lr itself.
_SMALL = {"epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.1,
          "batch_size": 128, "mode": "eval", "lr_milestones": (10, 15, 20), "lr_decay": 0.1,
          "lr_decayed_base": 5e-4}
_LARGE = {**_SMALL, "l2_pull": 0.0, "batch_size": 64, "mode": "train-all", "lr_decayed_base": 0.01}
PRESETS = {"small": _SMALL, "selective": _LARGE, "class": _LARGE}


def resolve_block_options(presets: dict, setting: str, forget: Dataset, retain: Dataset,
                          given: dict) -> tuple[str, dict]:
    """CF-k / EU-k's :func:`~ppu_fast.unlearn._loop.plan_presets`, the milestones as a list of
    ints (so that ``UnlearnResult.options`` reads like the presets)."""
    setting, hp = plan_presets(presets, setting, forget, retain, given)
    hp["lr_milestones"] = [int(m) for m in hp["lr_milestones"]]
    return setting, hp


def block_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """The modules CF-k / EU-k train: ``layers`` (names) or else :func:`last_block`, each a
    module of ``model``, together holding parameters."""
    names = as_names(layers) if layers is not None else last_block(model)
    modules_with_parameters(model, names)
    return names


def _plan(forget: Dataset, retain: Dataset, model: nn.Module | None, setting: str,
          layers: Sequence[str] | None, given: dict) -> tuple[str, list[str] | None, dict]:
    """(the setting, "auto" resolved from the labels; the layers trained, None without a model;
    the hyper-parameters), checked before any work."""
    setting, hp = resolve_block_options(PRESETS, setting, forget, retain, given)
    names = as_names(layers) if layers is not None else None
    return setting, (block_layers(model, names) if model is not None else None), hp


def _cross_entropy(m: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(m(x), y)


def train_block(work: nn.Module, retain: Dataset, layers: Sequence[str], *, epochs: int, lr: float,
                momentum: float, weight_decay: float, batch_size: int, seed: int, device: torch.device,
                progress: bool, desc: str, l2_pull: float = 0.0, mode: str = "train",
                lr_milestones: Sequence[int] = (), lr_decay: float = 0.1,
                lr_decayed_base: float | None = None) -> float:
    """Cross-entropy SGD on ``retain`` of the modules ``layers`` of ``work`` alone (in place), plus
    an L2 pull of weight ``l2_pull`` toward the block's weights at the start; the shared part of CF-k
    and EU-k. The schedule is :func:`~ppu_fast.unlearn._loop.fk_lr`, ``mode`` that of
    :func:`~ppu_fast.unlearn._loop.run_loop`. Returns the training seconds. Gradients are switched
    back on afterwards, so the returned model is an ordinary trainable model."""
    freeze_all_but(work, layers)
    try:
        manual_seed(seed)
        opt = make_optimizer(work.parameters(), "sgd", lr, momentum, weight_decay)
        batches = loader(retain, batch_size, seed, model=work)
        penalty = make_l2_pull(work, l2_pull)

        def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
            return _cross_entropy(m, batch) + penalty(m)

        t0 = time.perf_counter()
        run_loop(work, lambda epoch: [(batches, loss_fn)], opt, epochs=epochs, device=device,
                 lr_at=fk_lr(lr, lr_milestones, lr_decay, lr_decayed_base), progress=progress,
                 desc=desc, mode=mode)
        return time.perf_counter() - t0
    finally:
        for p in work.parameters():
            p.requires_grad_(True)


@register("cf-k", check=lambda forget, retain, val, model, setting, layers, **given: _plan(
    forget, retain, model, setting, layers, given))
def cf_k(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None, seed: int = 0,
         device: str | torch.device | None = None, inplace: bool = False, progress: bool = True,
         layers: Sequence[str] | None = None, setting: str = "auto", epochs: int | None = None,
         lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
         batch_size: int | None = None, l2_pull: float | None = None, mode: str | None = None,
         lr_milestones: Sequence[int] | None = None, lr_decay: float | None = None,
         lr_decayed_base: float | None = None) -> UnlearnResult:
    """Fine-tune only ``layers`` (module names; default :func:`~ppu_fast.unlearn._loop.last_block`:
    ALL-CNN's 1x1 conv block, ResNet-18's ``layer4``; the classifier stays frozen, as in SCRUB) on
    ``retain``, as SCRUB's CF-k (small_scale_unlearning.ipynb "Catastrophic Forgetting k layers" with
    ``fk_fientune`` from "Finetune and Fisher Helper"; large scale BadT_experiments.ipynb
    ``cfk_unlearn``).

    ``setting`` (see :func:`ppu_fast.unlearn._loop.infer_setting`) fills the options left at None:
    10 epochs of SGD at lr 0.01, no momentum, no weight decay, SCRUB's milestones [10, 15, 20] (which
    10 epochs never pass); small scale: batches of 128, eval mode and an L2 pull of weight 0.1 toward
    the starting weights; large scale: batches of 64, ``mode="train-all"`` (the frozen blocks'
    BatchNorm statistics move, as in SCRUB's ``train_vanilla``; ``mode="train"`` keeps everything
    outside ``layers`` bit-identical), no pull. ``forget`` and ``val`` are not used beyond the common
    checks."""
    setting, layers, hp = _plan(forget, retain, model, setting, layers, {
        "epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
        "batch_size": batch_size, "l2_pull": l2_pull, "mode": mode, "lr_milestones": lr_milestones,
        "lr_decay": lr_decay, "lr_decayed_base": lr_decayed_base})
    work = working_copy(model, inplace, device)
    seconds = train_block(work, retain, layers, seed=seed, device=resolve_device(model, device),
                          progress=progress, desc="cf-k", **hp)
    return UnlearnResult(work, "cf-k", selected_epoch=int(hp["epochs"]), timings={"train": seconds},
                         options={"setting": setting, "layers": layers, **hp})
