"""CF-k (Goel et al. 2022, "catastrophic forgetting of the last k layers"): freeze everything but the
last block and fine-tune that block on the retain set. Nothing outside the block changes, BatchNorm
statistics included (frozen modules stay in eval mode)."""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from . import UnlearnResult, register
from ._common import resolve_device, working_copy
from ._loop import freeze_all_but, last_block, loader, make_optimizer, run_loop


def _cross_entropy(m: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(m(x), y)


def train_block(work: nn.Module, retain: Dataset, layers: Sequence[str], *, epochs: int, lr: float,
                momentum: float, weight_decay: float, batch_size: int, seed: int, device: torch.device,
                progress: bool, desc: str) -> float:
    """Cross-entropy SGD on ``retain`` of the modules ``layers`` of ``work`` alone (in place); the
    shared part of CF-k and EU-k. Returns the training seconds. Gradients are switched back on
    afterwards, so the returned model is an ordinary trainable model."""
    freeze_all_but(work, layers)
    try:
        torch.manual_seed(seed)
        opt = make_optimizer(work.parameters(), "sgd", lr, momentum, weight_decay)
        batches = loader(retain, batch_size, seed)
        t0 = time.perf_counter()
        run_loop(work, lambda epoch: [(batches, _cross_entropy)], opt, epochs=epochs, device=device,
                 progress=progress, desc=desc)
        return time.perf_counter() - t0
    finally:
        for p in work.parameters():
            p.requires_grad_(True)


@register("cf-k")
def cf_k(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None, seed: int = 0,
         device: str | torch.device | None = None, inplace: bool = False, progress: bool = True,
         layers: Sequence[str] | None = None, epochs: int = 10, lr: float = 0.01, momentum: float = 0.9,
         weight_decay: float = 5e-4, batch_size: int = 64) -> UnlearnResult:
    """Fine-tune only ``layers`` (module names; default :func:`~ppu_fast.unlearn._loop.last_block`:
    ALL-CNN's 1x1 conv block, ResNet-18's ``layer4``) on ``retain`` with SGD (SCRUB: 10 epochs,
    lr 0.01). ``forget`` and ``val`` are not used beyond the common checks."""
    work = working_copy(model, inplace, device)
    layers = list(layers) if layers is not None else last_block(work)
    seconds = train_block(work, retain, layers, epochs=epochs, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                          device=resolve_device(model, device), progress=progress, desc="cf-k")
    return UnlearnResult(work, "cf-k", timings={"train": seconds},
                         options={"layers": layers, "epochs": epochs, "lr": lr, "batch_size": batch_size})
