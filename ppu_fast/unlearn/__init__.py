"""Machine unlearning: PPU and baselines behind one entry point, :func:`unlearn`.

Methods live in a registry, one module each in this package; a module adds itself with
``@register("name")`` on a function ``fn(model, forget, retain, *, val, seed, device, inplace,
progress, **options) -> UnlearnResult``. :func:`unlearn` validates the common arguments, checks the
options against the method's signature and times the call.
"""
from __future__ import annotations

import inspect
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

_METHODS: dict[str, Callable[..., "UnlearnResult"]] = {}
_COMMON = ("val", "seed", "device", "inplace", "progress")


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned model (eval mode).
        method: the registry name that produced it.
        targets: (N_forget + N_retain, k) fine-tuning targets, forget rows first (PPU only), on CPU.
        refine_info: the solver's ``RefineInfo`` (PPU privacy mode only).
        history: one dict per fine-tuning epoch (epoch 0 = the starting model): ``loss``,
            ``forget_error``, ``retain_error`` and, with a validation set, ``val_error`` (on the forget
            classes), all in %.
        selected_epoch: the epoch whose weights ``model`` holds (0 where there are no epochs; a
            fraction such as 2.5 when PPU evaluated between epochs, ``evals_per_epoch``).
        timings: seconds per phase (e.g. ``probabilities``, ``refine``, ``finetune``, ``train``) and
            ``total`` (the whole call, evaluation included).
        options: the method's options as used.
    """

    model: nn.Module
    method: str
    targets: torch.Tensor | None = None
    refine_info: Any = None
    history: list[dict] = field(default_factory=list)
    selected_epoch: float = 0
    timings: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def register(name: str) -> Callable[[Callable[..., UnlearnResult]], Callable[..., UnlearnResult]]:
    """Decorator that adds an unlearning method to the registry under ``name``."""
    def deco(fn: Callable[..., UnlearnResult]) -> Callable[..., UnlearnResult]:
        if name in _METHODS:
            raise ValueError(f"unlearning method '{name}' is registered twice")
        _METHODS[name] = fn
        return fn
    return deco


def methods() -> list[str]:
    """Names of the registered unlearning methods."""
    return sorted(_METHODS)


def method_options(name: str) -> dict[str, Any]:
    """The options (keyword -> default) that method ``name`` accepts beyond the common ones."""
    fn = _get(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON}


def _get(name: str) -> Callable[..., UnlearnResult]:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; expected one of {', '.join(methods())}")
    return _METHODS[name]


def _as_dataset(data: object, arg: str, allow_none: bool = False) -> Dataset | None:
    if data is None and allow_none:
        return None
    if isinstance(data, DataLoader):
        data = data.dataset
    if not isinstance(data, Dataset):
        raise TypeError(f"{arg} must be a torch Dataset or DataLoader of (x, y) pairs, got "
                        f"{type(data).__name__}")
    return data


def _check_disjoint(forget: Dataset, retain: Dataset) -> None:
    # Only Subsets of one base dataset can be compared without looking at the data.
    if isinstance(forget, Subset) and isinstance(retain, Subset) and forget.dataset is retain.dataset:
        both = set(map(int, forget.indices)) & set(map(int, retain.indices))
        if both:
            raise ValueError(f"forget and retain overlap in {len(both)} examples (e.g. index "
                             f"{min(both)}); the forget set must lie outside the retain set")


def unlearn(model: nn.Module, forget: Dataset | DataLoader, retain: Dataset | DataLoader, *,
            method: str = "ppu", val: Dataset | DataLoader | None = None, seed: int = 0,
            device: str | torch.device | None = None, inplace: bool = False, progress: bool = True,
            **options: Any) -> UnlearnResult:
    """Make ``model`` forget ``forget`` while keeping what it learned from ``retain``.

    Args:
        model: a trained classifier, (B, C, H, W) -> (B, k) logits; any starting point works, so
            "SCRUB + PPU" is ``unlearn(scrubbed_model, ...)``.
        forget, retain: the two parts of the training set, datasets (or loaders) of ``(x, y)``.
        method: a registered method: ``ppu`` (privacy mode), ``ppu-bias`` (bias removal, uniform
            pseudo-probabilities), ``ppu-random`` (bias removal, random ones), ``finetune``,
            ``retrain``, ``original``; see :func:`methods`.
        val: held-out data; PPU's privacy mode selects its epoch with it (see ``select``).
        seed: fixes every random choice.
        device: where to run (default: the model's device).
        inplace: modify ``model`` itself; by default it is deep-copied and left untouched.
        progress: show tqdm progress bars.
        **options: the method's own options (``method_options(name)`` lists them), e.g. for PPU
            ``mode``, ``pseudo``, ``lam``, ``marginals``, ``epochs``, ``lr``, ``select``.

    Returns:
        :class:`UnlearnResult`.
    """
    fn = _get(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    forget = _as_dataset(forget, "forget")
    retain = _as_dataset(retain, "retain")
    val = _as_dataset(val, "val", allow_none=True)
    if len(forget) == 0:
        raise ValueError("forget is empty: there is nothing to unlearn")
    if len(retain) == 0:
        raise ValueError("retain is empty: unlearning needs the data the model should keep")
    _check_disjoint(forget, retain)
    accepted = method_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"unlearning method '{method}' got unknown option(s) {', '.join(unknown)}; it "
                        f"accepts {', '.join(sorted(accepted)) or 'none'}")
    t0 = time.perf_counter()
    result = fn(model, forget, retain, val=val, seed=seed, device=device, inplace=inplace,
                progress=progress, **options)
    result.timings["total"] = time.perf_counter() - t0
    result.method = method
    return result


class _CallableModule(types.ModuleType):
    """``ppu_fast.unlearn`` names both this package and the function :func:`unlearn`. Importing the
    package binds the package to ``ppu_fast.unlearn`` whatever ``ppu_fast`` exported before, so the
    package itself is made callable: ``ppu_fast.unlearn(model, forget, retain, ...)`` always works."""

    def __call__(self, *args: Any, **kwargs: Any) -> UnlearnResult:
        return unlearn(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

# The built-in methods register themselves on import.
from . import finetune, original, ppu, retrain  # noqa: E402,F401
from . import bad_teacher, cf_k, composite, eu_k, fisher, neggrad, ntk, scrub  # noqa: E402,F401

__all__ = ["unlearn", "UnlearnResult", "register", "methods", "method_options"]
