"""The Finetune baseline: keep training the original model on the retain set alone (cross-entropy,
SGD), with no forgetting mechanism; forgetting comes only from catastrophic drift."""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset

from ..training import TrainConfig, fit
from . import UnlearnResult, register
from ._common import resolve_device, working_copy


@register("finetune")
def finetune_retain(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                    seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                    progress: bool = True, epochs: int = 10, lr: float = 0.01, momentum: float = 0.9,
                    weight_decay: float = 5e-4, batch_size: int = 64) -> UnlearnResult:
    """SGD on ``retain`` at a constant ``lr`` (SCRUB's small-scale setting: 10 epochs, lr 0.01)."""
    work = working_copy(model, inplace, device)
    config = TrainConfig(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         batch_size=batch_size, schedule="constant", seed=seed)
    t0 = time.perf_counter()
    fit(work, retain, config, device=resolve_device(model, device), progress=progress, desc="finetune")
    return UnlearnResult(work, "finetune", timings={"train": time.perf_counter() - t0},
                         options={"epochs": epochs, "lr": lr, "batch_size": batch_size})
