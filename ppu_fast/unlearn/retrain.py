"""The Retrain baseline, the gold standard: the same architecture trained from scratch on the retain
set alone. Results are cached on disk (see :mod:`ppu_fast.training`)."""
from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from ..models import init_state, require_reset, reset_parameters
from ..training import TrainConfig, fit_cached
from . import UnlearnResult, register
from ._common import resolve_device


def _check(forget: Dataset, retain: Dataset, val: Dataset | None, model: nn.Module | None, *,
           config: TrainConfig | None, init: nn.Module | dict | None, cache: bool) -> None:
    """The registry's check of :func:`retrain`'s options (with ``model``: that its architecture
    can be re-initialised when no ``init`` is given)."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a ppu_fast.training.TrainConfig, got {type(config).__name__}")
    if init is None and model is not None:
        require_reset(model, "Retrain")


@register("retrain", check=_check)
def retrain(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
            seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
            progress: bool = True, config: TrainConfig | None = None,
            init: nn.Module | dict | None = None,
            cache: bool = True) -> UnlearnResult:
    """Train from scratch on ``retain`` with ``config`` (default :class:`TrainConfig` with ``seed``).
    ``timings["train"]`` is the training time even when the model comes from the cache.
    The starting weights are ``init``'s if given (e.g. the original model's initialisation; a model
    or a state dict of ``model``'s architecture, refused otherwise), else
    ``model``'s architecture re-initialised with ``seed``: parameters with ``requires_grad=False``
    keep their values (training does not train them, so neither does a retrain: a frozen
    pre-trained backbone stays as it is), and a trainable parameter that no ``reset_parameters()``
    can re-draw is refused (it would keep the weights that saw the forget set; pass ``init``).
    ``inplace`` loads the result into ``model``."""
    _check(forget, retain, val, model, config=config, init=init, cache=cache)
    if config is None:
        config = TrainConfig(seed=seed)
    start = copy.deepcopy(model)
    if init is not None:
        start.load_state_dict(init_state(init, model))
    else:
        reset_parameters(start, seed, keep_frozen=True)
    t0 = time.perf_counter()
    trained, meta = fit_cached(start, retain, config, device=resolve_device(model, device),
                               progress=progress, desc="retrain", cache=cache)
    timings = {"train": meta["train_seconds"], "load" if meta["cached"] else "fit": time.perf_counter() - t0}
    if inplace:
        model.load_state_dict(trained.state_dict())
        trained = model.eval()
    return UnlearnResult(trained, "retrain", selected_epoch=config.epochs, timings=timings,
                         options={"cached": meta["cached"], **dataclasses.asdict(config)})
