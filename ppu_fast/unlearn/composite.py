"""PPU applied after another method (the paper's §5.7 and Appendix A.1): ``scrub+ppu`` and
``finetune+ppu`` run the registered method, then a registered PPU variant on its result. The paper
reports these for the bias-removal task, so the PPU step defaults to ``ppu-bias`` (uniform
pseudo-probabilities, no refine); ``ppu_method="ppu"`` gives the privacy variant."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import UnlearnResult, check_plan, register, unlearn

PPU_STEPS = ("ppu", "ppu-bias", "ppu-random")


def _check_steps(ppu_method: str, first_options: object, ppu_options: object) -> None:
    if ppu_method not in PPU_STEPS:
        raise ValueError(f"ppu_method must be one of {', '.join(PPU_STEPS)}, got {ppu_method!r}")
    for arg, value in (("first_options", first_options), ("ppu_options", ppu_options)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"{arg} must be a dict of options, got {type(value).__name__}")


def _check(first: str, forget: Dataset, retain: Dataset, val: Dataset | None,
           model: nn.Module | None, *, first_options: dict | None, ppu_method: str,
           ppu_options: dict | None) -> None:
    """Both steps' options checked as :func:`ppu_fast.unlearn.check_plan` checks a method's (the
    first step's own checks would otherwise wait for it to start, and the PPU step's for the
    first step to finish)."""
    _check_steps(ppu_method, first_options, ppu_options)
    for method, opts, arg in ((first, first_options, f"{first}_options"),
                              (ppu_method, ppu_options, "ppu_options")):
        try:
            check_plan(method, opts or {}, forget, retain, val, model)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{arg}: {exc}") from None


def then_ppu(first: str, model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None,
             seed: int, device: str | torch.device | None, inplace: bool, progress: bool,
             first_options: dict | None, ppu_method: str, ppu_options: dict | None) -> UnlearnResult:
    """``first`` (with ``first_options``), then ``ppu_method`` (with ``ppu_options``) on its model.
    Both steps go through :func:`ppu_fast.unlearn.unlearn`, so their options are checked by name.
    Timings: ``first`` (its whole call) plus the PPU step's phases; ``history`` is the PPU step's.
    Both steps' options are checked before the first runs (a PPU option refused after it had
    trained cost its epochs, and with ``inplace`` left the caller's model changed)."""
    _check(first, forget, retain, val, model, first_options=first_options, ppu_method=ppu_method,
           ppu_options=ppu_options)
    a = unlearn(model, forget, retain, method=first, val=val, seed=seed, device=device, inplace=inplace,
                progress=progress, **(first_options or {}))
    # The first step's model is already a private copy (or the caller's, with inplace): continue on it.
    b = unlearn(a.model, forget, retain, method=ppu_method, val=val, seed=seed, device=device,
                inplace=True, progress=progress, **(ppu_options or {}))
    timings: dict[str, float] = {first: a.timings["total"]}
    timings.update({k: v for k, v in b.timings.items() if k != "total"})
    options: dict[str, Any] = {"first": first, first: a.options, "ppu_method": ppu_method,
                               ppu_method: b.options}
    return UnlearnResult(b.model, f"{first}+ppu", b.targets, b.refine_info, b.history, b.selected_epoch,
                         timings, options)


@register("scrub+ppu", check=lambda forget, retain, val, model, scrub_options, **o: _check(
    "scrub", forget, retain, val, model, first_options=scrub_options, **o))
def scrub_ppu(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
              seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
              progress: bool = True, scrub_options: dict | None = None, ppu_method: str = "ppu-bias",
              ppu_options: dict | None = None) -> UnlearnResult:
    """SCRUB (options ``scrub_options``, e.g. ``{"setting": "small"}``), then PPU (``ppu_method``,
    default ``ppu-bias``, with ``ppu_options``, e.g. ``{"epochs": 30}``)."""
    return then_ppu("scrub", model, forget, retain, val=val, seed=seed, device=device, inplace=inplace,
                    progress=progress, first_options=scrub_options, ppu_method=ppu_method,
                    ppu_options=ppu_options)


@register("finetune+ppu", check=lambda forget, retain, val, model, finetune_options, **o: _check(
    "finetune", forget, retain, val, model, first_options=finetune_options, **o))
def finetune_ppu(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                 seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                 progress: bool = True, finetune_options: dict | None = None,
                 ppu_method: str = "ppu-bias", ppu_options: dict | None = None) -> UnlearnResult:
    """Finetune (options ``finetune_options``), then PPU (``ppu_method``, default ``ppu-bias``, with
    ``ppu_options``): the paper's §5.7 "PPU after fine-tuning"."""
    return then_ppu("finetune", model, forget, retain, val=val, seed=seed, device=device, inplace=inplace,
                    progress=progress, first_options=finetune_options, ppu_method=ppu_method,
                    ppu_options=ppu_options)
