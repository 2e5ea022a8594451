"""Helpers shared by the unlearning methods: evaluation during fine-tuning and device handling."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import dataset_targets
from ..metrics import error, restrict_to_classes
from ..training import resolve_device


def working_copy(model: nn.Module, inplace: bool, device: str | torch.device | None) -> nn.Module:
    """``model`` itself when ``inplace``, else a deep copy; moved to ``device`` if given."""
    dev = resolve_device(model, device) if device is not None else None
    work = model if inplace else copy.deepcopy(model)
    return work.to(dev) if dev is not None else work


def check_labels_fit(labels: torch.Tensor, k: int, method: str) -> None:
    """Refuse labels outside the model's k outputs, and a model of fewer than 2 outputs: both run
    silently wrong (a class the model has no logit for cannot be unlearned; softmax of one logit
    is 1 whatever the weights)."""
    if k < 2:
        raise ValueError(f"model: it outputs {k} logit(s) per example; {method} needs a classifier's "
                         f"(B, k) logits with k >= 2")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels: forget / retain hold classes {int(labels.min())} to "
                         f"{int(labels.max())} but the model outputs k = {k} logits; expected "
                         f"labels in [0, {k})")


def sample(data: Dataset, limit: int | None, seed: int) -> Dataset:
    """At most ``limit`` (>= 0, the callers check it) examples of ``data``, drawn once with
    ``seed`` (all of them if fewer)."""
    if limit is None or len(data) <= limit:
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed),
                        device="cpu")[:limit]
    return Subset(data, sorted(idx.tolist()))


def make_evaluator(forget: Dataset, retain: Dataset, val: Dataset | None, *, retain_limit: int | None,
                   seed: int, device: torch.device) -> Callable[[nn.Module], dict]:
    """The per-epoch evaluation of PPU's history: forget error, retain error (on at most
    ``retain_limit`` retain examples, drawn once; 0: none, no retain error) and the validation error
    on the forget classes."""
    retain_eval = sample(retain, retain_limit, seed) if retain_limit != 0 else None
    val_forget = None
    if val is not None:
        classes = dataset_targets(forget).unique().tolist()
        val_forget = restrict_to_classes(val, classes)
        if len(val_forget) == 0:
            raise ValueError(f"val has no examples of the forget classes {classes}; the 'val' selection "
                             f"policy compares against them")

    def evaluate(model: nn.Module) -> dict:
        row = {"forget_error": error(model, forget, device=device)}
        if retain_eval is not None:
            row["retain_error"] = error(model, retain_eval, device=device)
        if val_forget is not None:
            row["val_error"] = error(model, val_forget, device=device)
        return row

    return evaluate
