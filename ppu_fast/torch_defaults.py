"""The torch state a caller may have set around a call, made harmless at the public entry points.

* ``torch.set_default_device("cuda")`` (common in LLM code) or ``"meta"``: the solver builds its
  CPU-side temporaries (the C++ kernels' result buffers, float64 totals) with torch's factories
  without naming a device, as torch code usually does. Under another default device they landed
  there: the CPU kernels wrote through a CUDA or a null pointer (a segmentation fault), other
  paths failed with "Cannot copy out of meta tensor". :func:`cpu_default_device` runs the solver
  calls (refine, solve, targets, refine_file), which run no code of the caller's, with the CPU as
  the default; tensors that belong on a GPU name their device. The training and evaluation calls
  are left under the caller's default: they run the caller's model and callbacks, whose own
  factory calls may rely on it, and the mode would intercept every op of theirs (twice the time
  of a small model's fine-tuning). Their data loaders push it only around each batch's drawing
  and collating (:class:`ppu_fast.data.CpuDrawLoader`), and the package's own tensors there name
  the CPU; so do their optimiser steps but SGD's (:func:`optimizer_step`): torch 2.11's Adam
  (the GPU machines' torch) made its step counter with the caller's default device, which failed
  under "meta" ("Tensor.item() cannot be called on meta tensors") and put it on the GPU under
  "cuda"; torch 2.14 names the CPU there itself.
* ``torch.no_grad()`` / ``torch.inference_mode()`` around a training call (a habit from
  evaluation code): every backward failed with "element 0 of tensors does not require grad".
  :func:`training_grad_mode` turns gradients back on for the call, as PyTorch Lightning's
  training loop does; inference tensors the caller made stay unusable for backward, and torch
  says so.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def cpu_default_device(fn: F) -> F:
    """Decorator: ``fn`` runs with torch's default device set to the CPU when the caller's is
    another (a thread-local torch function mode, pushed only then; the usual call pays one
    ``torch.get_default_device()``, about 3 us)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.get_default_device().type == "cpu":
            return fn(*args, **kwargs)
        with torch.device("cpu"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def optimizer_step(opt: torch.optim.Optimizer) -> Callable[[], object]:
    """``opt.step``, run with the CPU as torch's default device (:func:`cpu_default_device`)
    unless ``opt`` is plain SGD, whose step makes no tensor without naming a device (the mode,
    when pushed, intercepts every op of the step: SGD's took half as long again)."""
    return opt.step if type(opt) is torch.optim.SGD else cpu_default_device(opt.step)


def training_grad_mode(fn: F) -> F:
    """Decorator for the calls that train: ``fn`` runs with gradients on, outside any
    ``inference_mode`` and ``no_grad`` of the caller's, which are back when it returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            if torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
            if not torch.is_grad_enabled():
                stack.enter_context(torch.enable_grad())
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
