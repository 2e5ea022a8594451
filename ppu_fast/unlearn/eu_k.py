"""EU-k (Goel et al. 2022, "exact unlearning of the last k layers"): re-initialise the last block and
train it from scratch on the retain set, everything else frozen (as CF-k, whose training it reuses)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from . import UnlearnResult, register
from ._common import resolve_device, working_copy
from ._loop import last_block, modules_named, pick, resolve_setting
from .cf_k import train_block

PRESETS = {"small": {"epochs": 30}, "selective": {"epochs": 25}, "class": {"epochs": 25}}


@register("eu-k")
def eu_k(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None, seed: int = 0,
         device: str | torch.device | None = None, inplace: bool = False, progress: bool = True,
         setting: str = "auto", layers: Sequence[str] | None = None, epochs: int | None = None,
         lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
         batch_size: int = 64) -> UnlearnResult:
    """Re-initialise ``layers`` (default: the last block, as CF-k) with ``seed`` and train them on
    ``retain`` with SGD at ``lr``; ``epochs`` defaults to the setting's (SCRUB: 30 small scale, 25
    large scale)."""
    setting = resolve_setting(setting, forget, retain)
    epochs = int(pick(epochs, PRESETS[setting], "epochs"))
    work = working_copy(model, inplace, device)
    layers = list(layers) if layers is not None else last_block(work)
    # Seeded here, so that the seed alone fixes the new weights.
    torch.manual_seed(seed)
    for block in modules_named(work, layers):
        for m in block.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    seconds = train_block(work, retain, layers, epochs=epochs, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                          device=resolve_device(model, device), progress=progress, desc="eu-k")
    return UnlearnResult(work, "eu-k", timings={"train": seconds},
                         options={"setting": setting, "layers": layers, "epochs": epochs, "lr": lr,
                                  "batch_size": batch_size})
