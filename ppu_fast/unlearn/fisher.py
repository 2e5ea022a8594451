"""Fisher forgetting (Golatkar et al. 2020a, as in SCRUB's code): estimate the diagonal Fisher
information of the retain loss and add Gaussian noise to every weight, large where the retain set
does not pin the weight down, small where it does. No training loop: one pass of per-example
gradients over the retain set."""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..caller_state import is_int
from ..data import dataset_targets
from . import UnlearnResult, register
from ._common import resolve_device, sample, working_copy
from ._loop import loader, pick, resolve_setting

# alpha: small_scale_unlearning.ipynb "Fisher Noise in Weights" (1e-6; the 1e-7 of the cell before
# only measures information), large_scale_unlearning.ipynb "Fisher" (1e-7).
PRESETS = {"small": {"alpha": 1e-6}, "selective": {"alpha": 1e-7}, "class": {"alpha": 1e-7}}
# Floats of per-example gradients held at once (about 800 MB in float32).
_GRAD_BUDGET = 200_000_000


def diagonal_fisher(model: nn.Module, data: Dataset, *, device: torch.device, progress: bool = False
                    ) -> dict[str, torch.Tensor]:
    """SCRUB's ``hessian``: for every example x and class y, the squared gradient of CE(f(x), y),
    weighted by the model's probability of y, averaged over the examples; eval mode. Per-example
    gradients come from ``torch.func`` in chunks rather than SCRUB's one-example backward passes
    (the same sums, many times faster)."""
    from torch.func import functional_call, grad, vmap
    from tqdm.auto import tqdm

    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    n_params = sum(v.numel() for v in params.values())
    chunk = max(1, min(64, _GRAD_BUDGET // max(n_params, 1)))

    def loss_one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    n = 0
    for x, _ in tqdm(loader(data, chunk, 0, shuffle=False), desc="fisher", disable=not progress,
                     leave=False):
        x = x.to(device)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)
        for c in range(probs.shape[1]):
            y = torch.full((len(x),), c, dtype=torch.long, device=device)
            grads = per_example(params, x, y)
            w = probs[:, c]
            for k, g in grads.items():
                fisher[k] += torch.einsum("b,b...->...", w, g.pow(2))
        n += len(x)
    return {k: v / n for k, v in fisher.items()}


def mean_var(p: torch.Tensor, fisher: torch.Tensor, *, alpha: float, is_head: bool,
             forget_rows: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """SCRUB's ``get_mean_var`` for one parameter tensor ``p`` with diagonal Fisher ``fisher``: the
    mean and variance of its Gaussian. ``var = alpha * min(1 / (F + 1e-8), 1e3)`` (cap 1e2 for the
    classifier), averaged over the input dimension of weight matrices and kernels, times 10 for the
    classifier and for 1-D parameters (BatchNorm, biases); ``mu = p``; the classifier rows
    ``forget_rows`` (class unlearning) get mean 0 and variance 1e-4 (times 10)."""
    var = (1.0 / (fisher + 1e-8)).clamp(max=1e3)
    if is_head:
        var = var.clamp(max=1e2)
    var = alpha * var
    if p.dim() > 1:
        var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
    mu = p.detach().clone()
    if is_head and len(forget_rows):
        mu[list(forget_rows)] = 0.0
        var[list(forget_rows)] = 1e-4
    if is_head or p.dim() == 1:
        var = var * 10
    return mu, var


def classifier_layer(model: nn.Module, data: Dataset, where: str) -> nn.Module:
    """The ``nn.Linear`` that produces the logits: the last one a forward pass on ``data[0]``
    calls (a model whose ``__init__`` registers its head before its encoder still gets its head,
    as :func:`ppu_fast.finetune` finds it), else the last one registered."""
    from ..caller_state import probe_forward

    _, called, _ = probe_forward(model, data[0][0], where)
    if called:
        return model.get_submodule(called[-1])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"fisher: {type(model).__name__} has no nn.Linear classifier layer")
    return linears[-1]


def _plan(forget: Dataset, retain: Dataset, setting: str, alpha: float | None,
          max_samples: int | None) -> tuple[str, float, int | None]:
    """(the setting, "auto" resolved from the labels; alpha, given or the setting's; the retain
    examples' cap), checked before any work. The class setting on a forget set whose classes
    retain still holds is refused: it zeroes the classifier rows of those classes, which the
    retain examples need."""
    setting = resolve_setting(setting, forget, retain)
    alpha = float(pick(alpha, PRESETS[setting], "alpha"))
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if max_samples is not None and (not is_int(max_samples) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if setting == "class":
        classes = dataset_targets(forget).unique()
        shared = int(torch.isin(dataset_targets(retain), classes).sum())
        if shared:
            raise ValueError(f"setting='class' zeroes the classifier rows of the forget set's classes "
                             f"{classes.tolist()}, but retain holds {shared} examples of them; "
                             f"expected setting='selective' (or 'auto') when part of a class is "
                             f"forgotten")
    return setting, alpha, None if max_samples is None else int(max_samples)


@register("fisher", check=lambda forget, retain, val, model, setting, alpha, max_samples: _plan(
    forget, retain, setting, alpha, max_samples))
def fisher_forgetting(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                      seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                      progress: bool = True, setting: str = "auto", alpha: float | None = None,
                      max_samples: int | None = None) -> UnlearnResult:
    """Fisher forgetting as SCRUB's code runs it (small_scale_unlearning.ipynb, "Fisher": ``hessian``
    and ``get_mean_var``, then "Fisher Noise in Weights" with alpha 1e-6; large_scale_unlearning.ipynb,
    "Fisher", alpha 1e-7): weights become ``mu + sqrt(var) * N(0, 1)`` (:func:`mean_var`) with the
    diagonal Fisher of the retain set (:func:`diagonal_fisher`). ``alpha`` defaults to the setting's.
    The classifier is the last ``nn.Linear`` the model's forward pass calls (SCRUB: the parameters whose first dimension is
    the number of classes, the same tensors for ALL-CNN and ResNet-18). ``max_samples`` caps the retain
    examples used for the Fisher estimate (None: all, as SCRUB).

    ``options["capped_fraction"]`` reports the share of weights whose variance sits at the cap
    (F < 1e-3): there the noise no longer depends on the data, and a model fitted to near-certainty
    gets isotropic noise of std ``sqrt(1e3 * alpha)`` on every weight (see docs/baselines.md)."""
    setting, alpha, max_samples = _plan(forget, retain, setting, alpha, max_samples)
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device).to(dev)
    probe = (retain, "retain[0]") if len(retain) else (forget, "forget[0]")
    head = {id(p) for p in classifier_layer(work, *probe).parameters()}
    forget_rows = dataset_targets(forget).unique().tolist() if setting == "class" else []

    t0 = time.perf_counter()
    fisher = diagonal_fisher(work, sample(retain, max_samples, seed), device=dev, progress=progress)
    gen = torch.Generator(device=dev).manual_seed(seed)
    capped, total = 0, 0
    with torch.no_grad():
        for name, p in work.named_parameters():
            is_head = id(p) in head
            mu, var = mean_var(p, fisher[name], alpha=alpha, is_head=is_head, forget_rows=forget_rows)
            capped += int((fisher[name] + 1e-8 <= (1e-2 if is_head else 1e-3)).sum())
            total += p.numel()
            noise = torch.randn(p.shape, generator=gen, device=dev, dtype=p.dtype)
            p.copy_(mu + var.sqrt() * noise)
    work.eval()
    return UnlearnResult(work, "fisher", timings={"train": time.perf_counter() - t0},
                         options={"setting": setting, "alpha": alpha, "max_samples": max_samples,
                                  "capped_fraction": capped / max(total, 1)})
