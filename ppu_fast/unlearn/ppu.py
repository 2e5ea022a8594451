"""PPU (the paper's §4-5): the original model's probabilities on forget and retain, targets from them
(refined by the solver in privacy mode, P^ itself in bias mode), then KL fine-tuning toward them."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..finetune import finetune
from ..metrics import predict
from . import UnlearnResult, register
from ._common import make_evaluator, resolve_device, working_copy

MODES = ("privacy", "bias")


def pseudo_rows(pseudo: str | torch.Tensor, retain_probs: torch.Tensor, n_forget: int, k: int,
                generator: torch.Generator) -> torch.Tensor:
    """Pseudo-probabilities (N_forget, k) for bias mode, drawn as the solver draws them: ``uniform``,
    ``random`` (softmax of standard normals from ``generator``), ``prior`` (the retain rows' mean) or
    a given (N_forget, k) tensor."""
    if isinstance(pseudo, torch.Tensor):
        if pseudo.shape != (n_forget, k):
            raise ValueError(f"pseudo: shape {tuple(pseudo.shape)}; expected (N_forget, k) = "
                             f"({n_forget}, {k})")
        if bool((pseudo < 0).any()) or not torch.allclose(pseudo.sum(1).double(),
                                                          torch.ones(n_forget, dtype=torch.float64),
                                                          atol=1e-4):
            raise ValueError("pseudo: rows must be probabilities (non-negative, summing to 1)")
        return pseudo.detach().float().cpu()
    if pseudo == "uniform":
        return torch.full((n_forget, k), 1.0 / k)
    if pseudo == "random":
        return torch.softmax(torch.randn(n_forget, k, generator=generator), dim=1)
    if pseudo == "prior":
        return retain_probs.float().mean(0).cpu().expand(n_forget, k).clone()
    raise ValueError(f"pseudo: unknown name {pseudo!r}; expected 'uniform', 'random', 'prior' or a "
                     f"(N_forget, k) tensor")


@register("ppu")
def ppu(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None, seed: int = 0,
        device: str | torch.device | None = None, inplace: bool = False, progress: bool = True,
        mode: str = "privacy", pseudo: str | torch.Tensor = "uniform", lam: float = 1.0,
        marginals: str | torch.Tensor = "retain", refine_method: str = "newton", tol: float = 1e-6,
        backend: str = "auto", epochs: int = 10, lr: float = 0.01, optimizer: str = "sgd",
        momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 64,
        retain_per_epoch: int | None = None, select: str | Callable[[list[dict]], int] | None = None,
        history: bool | None = None, history_retain: int | None = 1000) -> UnlearnResult:
    """PPU. ``mode="privacy"`` refines P^ with :func:`ppu_fast.refine` (``pseudo``, ``lam``,
    ``marginals``, ``refine_method``, ``tol``, ``backend`` pass through); ``mode="bias"`` (§5.4) uses
    P^ itself. Then :func:`ppu_fast.finetune` (``epochs``, ``lr``, ``optimizer``, ``momentum``,
    ``weight_decay``, ``batch_size``, ``retain_per_epoch``) with selection ``select``: by default
    ``"val"`` in privacy mode when ``val`` is given, else ``"last"``. ``history``: evaluate forget,
    retain and validation error after every epoch; by default only when ``select`` chooses among
    epochs, because that evaluation is part of the unlearning time. ``history_retain`` caps the
    retain examples evaluated per epoch (None: all)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if select is None:
        select = "val" if (mode == "privacy" and val is not None) else "last"
    if select == "val" and val is None:
        raise ValueError("select='val' needs a validation set: pass val=...")
    if history is None:
        history = select != "last"
    if select == "val" and not history:
        raise ValueError("history=False with select='val': the selection reads the per-epoch "
                         "forget and validation errors; pass history=True or select='last'")
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    both = ConcatDataset([forget, retain])
    logits, _ = predict(work, both, device=dev)
    probs = torch.softmax(logits.to(dev), dim=1)
    n_forget, (n, k) = len(forget), probs.shape
    forget_mask = torch.zeros(n, dtype=torch.bool)
    forget_mask[:n_forget] = True
    timings["probabilities"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # CPU generator: the solver draws random pseudo-probabilities on the CPU.
    gen = torch.Generator().manual_seed(seed)
    info = None
    if mode == "privacy":
        from .. import refine

        # Logits, not probabilities: log_softmax keeps the log-probabilities that softmax would
        # underflow to 0 for a very confident model.
        targets, info = refine(logits=logits.to(dev), forget_mask=forget_mask.to(dev), lam=lam,
                               pseudo=pseudo, marginals=marginals, method=refine_method, tol=tol,
                               backend=backend, generator=gen, return_info=True)
    else:
        targets = probs.clone()
        targets[:n_forget] = pseudo_rows(pseudo, probs[n_forget:], n_forget, k, gen).to(targets)
    timings["refine"] = time.perf_counter() - t0

    evaluate = make_evaluator(forget, retain, val, retain_limit=history_retain, seed=seed,
                              device=dev) if history else None
    ft = finetune(work, both, targets, epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum,
                  weight_decay=weight_decay, batch_size=batch_size, forget_mask=forget_mask,
                  retain_per_epoch=retain_per_epoch, evaluate=evaluate, select=select, seed=seed,
                  device=dev, inplace=True, progress=progress)
    timings["finetune"] = ft.seconds
    options: dict[str, Any] = dict(mode=mode, pseudo=pseudo if isinstance(pseudo, str) else "tensor",
                                   lam=lam, marginals=marginals if isinstance(marginals, str) else "tensor",
                                   refine_method=refine_method, epochs=epochs, lr=lr, optimizer=optimizer,
                                   batch_size=batch_size,
                                   select=select if isinstance(select, str) else "custom")
    return UnlearnResult(ft.model, "ppu", targets.detach().cpu(), info, ft.history, ft.selected_epoch,
                         timings, options)


@register("ppu-bias")
def ppu_bias(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
             seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
             progress: bool = True, pseudo: str | torch.Tensor = "uniform", epochs: int = 10,
             lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
             batch_size: int = 64, retain_per_epoch: int | None = None,
             select: str | Callable[[list[dict]], int] = "last", history: bool | None = None,
             history_retain: int | None = 1000) -> UnlearnResult:
    """PPU for bias removal (§5.4, "PPU w/ uniform"): targets are P^ (uniform forget rows), no solve."""
    return ppu(model, forget, retain, val=val, seed=seed, device=device, inplace=inplace,
               progress=progress, mode="bias", pseudo=pseudo, epochs=epochs, lr=lr, optimizer=optimizer,
               momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
               retain_per_epoch=retain_per_epoch, select=select, history=history,
               history_retain=history_retain)


@register("ppu-random")
def ppu_random(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
               seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
               progress: bool = True, epochs: int = 10, lr: float = 0.01, optimizer: str = "sgd",
               momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 64,
               retain_per_epoch: int | None = None, select: str | Callable[[list[dict]], int] = "last",
               history: bool | None = None, history_retain: int | None = 1000) -> UnlearnResult:
    """PPU for bias removal with random pseudo-probabilities (§5.4, "PPU w/ random")."""
    return ppu(model, forget, retain, val=val, seed=seed, device=device, inplace=inplace,
               progress=progress, mode="bias", pseudo="random", epochs=epochs, lr=lr, optimizer=optimizer,
               momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
               retain_per_epoch=retain_per_epoch, select=select, history=history,
               history_retain=history_retain)
