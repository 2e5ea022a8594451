"""The Original baseline: the model as trained on everything, unchanged (the reference that
unlearning starts from)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from . import UnlearnResult, register
from ._common import working_copy


@register("original")
def original(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
             seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
             progress: bool = True) -> UnlearnResult:
    """Return the model (a copy unless ``inplace``) in eval mode."""
    return UnlearnResult(working_copy(model, inplace, device).eval(), "original")
