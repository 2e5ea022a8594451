"""Fisher forgetting (Golatkar et al. 2020a, as in SCRUB's code): estimate the diagonal Fisher
information of the retain loss and add Gaussian noise to every weight, large where the retain set
does not pin the weight down, small where it does. No training loop: one pass of per-example
gradients over the retain set."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import dataset_targets
from . import UnlearnResult, register
from ._common import resolve_device, sample, working_copy
from ._loop import loader, pick, resolve_setting

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


@register("fisher")
def fisher_forgetting(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                      seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                      progress: bool = True, setting: str = "auto", alpha: float | None = None,
                      max_samples: int | None = None) -> UnlearnResult:
    """Weights become ``mu + sqrt(var) * N(0, 1)`` with, per parameter tensor (SCRUB's
    ``get_mean_var``): ``var = alpha / (F + 1e-8)`` clamped to 1e3 (1e2 for the classifier),
    averaged over the input dimension of weight matrices and kernels, times 10 for the classifier and
    for 1-D parameters (BatchNorm, biases); ``mu`` the current weights. In class unlearning the
    classifier rows of the forgotten classes get mean 0 and variance 1e-4. ``alpha`` defaults to
    the setting's (1e-6 small scale, 1e-7 large scale). ``max_samples`` caps the retain examples
    used for the Fisher estimate (None: all, as SCRUB)."""
    setting = resolve_setting(setting, forget, retain)
    alpha = float(pick(alpha, PRESETS[setting], "alpha"))
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device).to(dev)
    linears = [m for m in work.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"fisher: {type(work).__name__} has no nn.Linear classifier layer")
    head = {id(p) for p in linears[-1].parameters()}
    forget_classes = dataset_targets(forget).unique().tolist()

    t0 = time.perf_counter()
    fisher = diagonal_fisher(work, sample(retain, max_samples, seed), device=dev, progress=progress)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in work.named_parameters():
            is_head = id(p) in head
            var = (1.0 / (fisher[name] + 1e-8)).clamp(max=1e3)
            if is_head:
                var = var.clamp(max=1e2)
            var = alpha * var
            if p.dim() > 1:
                var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
            mu = p.detach().clone()
            if is_head and setting == "class":
                mu[forget_classes] = 0.0
                var[forget_classes] = 1e-4
            if is_head or p.dim() == 1:
                var = var * 10
            noise = torch.randn(p.shape, generator=gen, device=dev, dtype=p.dtype)
            p.copy_(mu + var.sqrt() * noise)
    work.eval()
    return UnlearnResult(work, "fisher", timings={"train": time.perf_counter() - t0},
                         options={"setting": setting, "alpha": alpha, "max_samples": max_samples})
