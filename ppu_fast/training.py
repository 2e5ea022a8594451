"""The one standard supervised training loop (cross-entropy, SGD) for original and retrained models and
for the fine-tuning baseline, with an on-disk cache so that a second run does not retrain.

The cache lives in ``$PPU_FAST_CACHE``, else ``$XDG_CACHE_HOME/ppu_fast``, else ``~/.cache/ppu_fast``.
A cached model is keyed by a hash of everything that determines it: the architecture, its initial
weights, the training data (bytes and labels), the :class:`TrainConfig` and a format version.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import numbers
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from .caller_state import (available_device, caller_stacklevel, forked_rng, frozen_modules, is_real,
                           manual_seed, non_finite_weights)
from .data import ArrayDataset, CpuDrawLoader, _label, collate_pairs
from .torch_defaults import training_grad_mode

_CACHE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`fit`. ``schedule`` is ``"cosine"`` (annealed to 0 over the run) or
    ``"constant"``; ``augment`` applies random crops (padding 4) and horizontal flips, for 32x32 images.
    The crop pads the normalised image with zeros, i.e. with the dataset's mean colour (torchvision's
    ``RandomCrop(32, padding=4)`` before ``Normalize`` pads black)."""

    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    schedule: str = "cosine"
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        # numpy scalars as Python ones: the config is hashed as JSON (the cache key) and seeds torch.
        for f, kind, cast in (("epochs", numbers.Integral, int), ("batch_size", numbers.Integral, int),
                              ("seed", numbers.Integral, int), ("lr", numbers.Real, float),
                              ("momentum", numbers.Real, float), ("weight_decay", numbers.Real, float)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, kind):
                raise ValueError(f"{f} must be {'an integer' if cast is int else 'a number'}, got {v!r}")
            object.__setattr__(self, f, cast(v))
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        # NaN / inf / momentum 1.5 trained to the end and failed there (FloatingPointError).
        check_optimizer_options(self.lr, self.momentum, self.weight_decay)
        if not isinstance(self.augment, (bool, np.bool_)):
            # "no" is truthy: it cropped and flipped while the record said "no".
            raise ValueError(f"augment must be True or False, got {self.augment!r}")
        object.__setattr__(self, "augment", bool(self.augment))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


def cache_dir() -> Path:
    """The user's cache folder for ppu_fast (not created here)."""
    if os.environ.get("PPU_FAST_CACHE"):
        return Path(os.environ["PPU_FAST_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ppu_fast"
    return Path.home() / ".cache" / "ppu_fast"


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


OPTIMIZERS = ("sgd", "adam")


def check_optimizer_name(name: object) -> None:
    """Refuse an ``optimizer=`` other than "sgd" or "adam" (finetune, SCRUB, the baselines)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def check_optimizer_options(lr: float, momentum: float, weight_decay: float) -> None:
    """Refuse an SGD / Adam setting that cannot train: lr positive and finite (at most float32's
    largest: beyond it the first step of a float32 model overflows inside torch's optimizer),
    momentum in [0, 1), weight_decay finite and >= 0 (the one check of
    :func:`ppu_fast.finetune`, the baselines' optimizer and :class:`TrainConfig`)."""
    # Any one number float() reads (numpy scalars and 0-d arrays, Decimal, a 0-d tensor: torch's
    # own option), but not a string or a bool that float() would also read.
    try:
        value = None if isinstance(lr, (str, bytes, bool)) or getattr(lr, "ndim", 0) else float(lr)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0 < value <= _FLOAT32_MAX:
        raise ValueError(f"lr must be a positive finite number (at most {_FLOAT32_MAX:.3g}), "
                         f"got {lr!r}")
    if not (is_real(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (is_real(weight_decay) and 0 <= weight_decay < math.inf):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


def lone_last_batch(n: int, batch_size: int, model: nn.Module) -> bool:
    """Whether a shuffled training pass over ``n`` examples should drop its last batch: when it
    would hold a single example and ``model`` has a BatchNorm (1d, 2d, 3d or Sync), which cannot
    normalise a single value per channel in train mode (it raises): a (B, C) row, and also a
    convolutional map reduced to 1 x 1 (a torchvision ResNet-18's last block on 32 x 32
    images). As ``drop_last=True`` does; the shuffle leaves out a different example each epoch."""
    return (n > 1 and n % batch_size == 1
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()))


def one_example_batchnorm(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's refusal to train a BatchNorm on a batch of one example (the
    case :func:`lone_last_batch` avoids for a last batch; a set of one example still meets it)."""
    return isinstance(exc, ValueError) and "Expected more than 1 value per channel" in str(exc)


# What a frozen BatchNorm needs, said by every loop that meets a one-example batch.
FREEZE_BATCHNORM = ("freeze the BatchNorm: requires_grad=False on its parameters keeps it in eval "
                    "mode")


def one_example_batchnorm_error(exc: BaseException, who: str, advice: str) -> Optional[ValueError]:
    """The error to raise instead of ``exc`` when it is torch's one-example BatchNorm refusal
    (:func:`one_example_batchnorm`; None otherwise): it names ``who`` (the argument or the
    method), keeps torch's words and ends with ``advice`` (what the caller can change)."""
    if not one_example_batchnorm(exc):
        return None
    return ValueError(f"{who}: a batch of one example cannot train the model's BatchNorm in train "
                      f"mode (torch: {exc}); {advice}")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` checked by :func:`available_device`, or ``model``'s own device when it is None."""
    return model_device(model) if device is None else available_device(device)


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding 4 and random horizontal flip, per example. x: (B, C, H, W)."""
    b, _, h, w = x.shape
    # Drawn on the CPU in float32 whatever the caller's torch defaults: a seed gives the same
    # crops and flips under torch.set_default_dtype(torch.float64) or a GPU default device.
    flip = torch.rand(b, generator=generator, dtype=torch.float32, device="cpu") < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator, device="cpu").tolist()
    dx = torch.randint(0, 9, (b,), generator=generator, device="cpu").tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])



@training_grad_mode
def fit(model: nn.Module, data: Dataset, config: TrainConfig = TrainConfig(), *,
        device: str | torch.device | None = None, progress: bool = True, desc: str = "train") -> nn.Module:
    """Train ``model`` in place with cross-entropy and SGD (momentum, weight decay) on ``data``, whose
    items are ``(x (C, H, W), y)``; returns ``model``. ``config.seed`` fixes the shuffling, the
    augmentation and the model's own randomness (dropout); the caller's global torch random state is
    restored afterwards, so what the caller draws next does not depend on whether a model was
    trained or loaded from the cache. A training that ends with NaN or infinite weights raises
    ``FloatingPointError`` (the model holds them)."""
    if len(data) == 0:
        raise ValueError("data is empty: nothing to train on")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{desc}: no trainable parameters: every parameter of the model is frozen "
                         f"(requires_grad=False); unfreeze those to train")
    device = resolve_device(model, device)
    with forked_rng(model, device):
        _fit(model, data, config, device, progress, desc)
    bad, total = non_finite_weights(model)
    if bad:
        # Raised before fit_cached caches it: a NaN model would be loaded as trained next time.
        raise FloatingPointError(f"{desc}: the training diverged: {bad} of the {total} weights and "
                                 f"buffer values it ended with are NaN or infinite; lower the "
                                 f"learning rate (lr={config.lr!r})")
    return model


def _fit(model: nn.Module, data: Dataset, config: TrainConfig, device: torch.device, progress: bool,
         desc: str) -> nn.Module:
    from tqdm.auto import tqdm

    model.to(device)
    manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    loader = CpuDrawLoader(data, batch_size=config.batch_size, shuffle=True, generator=gen,
                           drop_last=lone_last_batch(len(data), config.batch_size, model),
                           collate_fn=collate_pairs)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = None
    if config.schedule == "cosine" and config.epochs > 0:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * len(loader))
    # Modules whose parameters are all frozen stay in eval mode: their BatchNorm statistics do
    # not move either (as the unlearning loops keep them).
    frozen = frozen_modules(model)
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        model.train()
        for m in frozen:
            m.eval()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in loader:
            if config.augment:
                x = augment_batch(x, gen)
            x, y = x.to(device), y.to(device)
            try:
                out = model(x)
            except ValueError as exc:
                err = one_example_batchnorm_error(
                    exc, desc, f"expected a training set of at least two examples (or "
                               f"{FREEZE_BATCHNORM})")
                if err is None:
                    raise
                raise err from None
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += len(y)
            correct += int((out.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.1f}")
    opt.zero_grad(set_to_none=True)  # the last step's gradients are no part of the model
    model.eval()
    return model


def _data_digest(h: "hashlib._Hash", data: Dataset) -> None:
    if isinstance(data, Subset):
        _data_digest(h, data.dataset)
        h.update(torch.as_tensor(list(data.indices), dtype=torch.long, device="cpu").numpy().tobytes())
    elif isinstance(data, ArrayDataset):
        if type(data) is not ArrayDataset:
            # A subclass may transform what the arrays hold; its name keys it apart from the plain
            # dataset (which hashes as before).
            h.update(f"{type(data).__module__}.{type(data).__qualname__}".encode())
        for part in data.fingerprint_bytes():
            h.update(part)
    else:
        # Any other dataset: hash what it yields (slower, but exact).
        for i in range(len(data)):
            x, y = data[i]
            h.update(_tensor_bytes(torch.as_tensor(x, device="cpu")))
            h.update(str(_label(y)).encode())


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of ``t``'s elements in order (what ``t.numpy().tobytes()`` gives for the dtypes
    numpy has; bfloat16 and the other dtypes numpy lacks through an integer view)."""
    t = t.detach().cpu().contiguous()
    try:
        return t.numpy().tobytes()
    except TypeError:  # "unsupported ScalarType BFloat16"
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _code_digest(model: nn.Module) -> str:
    """What the training computes beyond the weights and the data: the source of this module's
    training loop (and of ``caller_state.frozen_modules``, which it calls) and of every model
    class outside torch (a ``forward`` edited under the same
    class name and layers would otherwise return the old model from the cache). torch's own
    classes are left out, so a torch upgrade alone does not retrain every cached model."""
    import inspect
    import sys

    h = hashlib.sha256()
    h.update(inspect.getsource(sys.modules[__name__]).encode())
    # Which modules the loop keeps in eval mode is decided outside this module.
    h.update(inspect.getsource(frozen_modules).encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: (c.__module__, c.__qualname__)):
        if cls.__module__.split(".")[0] == "torch":
            continue
        h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        try:
            h.update(inspect.getsource(cls).encode())
        except (OSError, TypeError):
            pass  # defined interactively: its name and repr(model) are all there is
    return h.hexdigest()


def _plain_attribute(v: object) -> object:
    # A JSON-able stand-in for an attribute's value: scalars and strings as they are, containers of
    # them element by element, tensors and arrays by content, functions and classes by name; other
    # objects by their type alone (their repr may hold a memory address that differs per process).
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return [_plain_attribute(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain_attribute(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(v, device="cpu")
        return {"tensor": str(t.dtype), "shape": list(t.shape),
                "sha": hashlib.sha256(_tensor_bytes(t)).hexdigest()}
    if callable(v) and hasattr(v, "__qualname__"):
        return f"{getattr(v, '__module__', '')}.{v.__qualname__}"
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


def _attributes(model: nn.Module) -> dict:
    """The plain attributes of the modules whose classes are not torch's (``self.temperature =
    2.0``): a forward that reads them computes something else when they differ, which neither
    ``repr`` nor the weights show. torch's own layers keep their settings in ``repr``. None is left
    out: it is mostly an optional submodule left out (``self.downsample = None``), which ``repr``
    shows by its absence."""
    out = {}
    for name, m in model.named_modules():
        if type(m).__module__.split(".")[0] == "torch":
            continue
        attrs = {k: _plain_attribute(v) for k, v in sorted(vars(m).items())
                 if not k.startswith("_") and k != "training" and v is not None}
        if attrs:
            out[name] = attrs
    return out


def cache_key(model: nn.Module, data: Dataset, config: TrainConfig,
              device: str | torch.device | None = None) -> str:
    """Hex digest identifying the result of ``fit(model, data, config, device=device)``: the
    config, the architecture (``repr``, the plain attributes of non-torch modules and the code of
    its classes and of the training loop), the starting weights, which parameters are frozen, the
    data and the device type (None: the model's); on the CPU, torch's thread count."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": _CACHE_VERSION, "config": dataclasses.asdict(config),
                         "arch": repr(model), "code": _code_digest(model)}, sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(_tensor_bytes(t))
    # Frozen parameters do not train, so they change the result (a fully trainable model, every
    # model the experiments train, adds nothing here).
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        h.update(json.dumps({"frozen": frozen}).encode())
    # Added only where there are some, so that the keys of models without them stay as they were.
    attrs = _attributes(model)
    if attrs:
        h.update(json.dumps({"attributes": attrs}, sort_keys=True).encode())
    # A model trained on a GPU is another model (other kernels, other rounding) and its recorded
    # train_seconds, which the experiments report as Retrain's cost, are a GPU's. Added only off
    # the CPU, like the attributes above.
    kind = (torch.device(device) if device is not None else model_device(model)).type
    if kind != "cpu":
        h.update(json.dumps({"device": kind}).encode())
    # So is one trained on the CPU with another number of torch threads (the reductions split
    # otherwise: the demo's small CNN, 3 epochs of digits, gave other weights at 1, 2 and 3
    # threads). Added only above one thread, so that the demo's keys (one thread) stay.
    elif torch.get_num_threads() != 1:
        h.update(json.dumps({"threads": torch.get_num_threads()}).encode())
    _data_digest(h, data)
    return h.hexdigest()[:32]


def fit_cached(model: nn.Module, data: Dataset, config: TrainConfig = TrainConfig(), *,
               device: str | torch.device | None = None, progress: bool = True, desc: str = "train",
               cache: bool = True) -> tuple[nn.Module, dict]:
    """:func:`fit` on a copy of ``model`` (the argument is not modified), loading the result from the
    cache when the same model, data and config were trained before.

    Returns ``(trained, meta)`` with ``meta = {"cached": bool, "train_seconds": float, "path": str}``;
    ``train_seconds`` is the training time when the model was trained (so a cached result still
    reports what training costs)."""
    import time

    trained = copy.deepcopy(model)
    device = resolve_device(model, device)
    path = cache_dir() / "models" / f"{cache_key(model, data, config, device)}.pt" if cache else None
    if path is not None and path.is_file():
        # Loaded into a copy of its own: load_state_dict copies every matching tensor before it
        # raises on a foreign key, and the training below must start from ``model``'s weights.
        loaded = copy.deepcopy(model)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            loaded.load_state_dict(state["state_dict"])
            seconds = float(state["seconds"])
            return loaded.to(device).eval(), {"cached": True, "train_seconds": seconds,
                                              "path": str(path)}
        except (RuntimeError, KeyError, EOFError, OSError, ValueError, TypeError,
                pickle.UnpicklingError):
            pass  # a truncated or foreign file: retrain and overwrite it
    t0 = time.perf_counter()
    fit(trained, data, config, device=device, progress=progress, desc=desc)
    seconds = time.perf_counter() - t0
    if path is not None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": {k: v.cpu() for k, v in trained.state_dict().items()},
                        "config": dataclasses.asdict(config), "seconds": seconds}, tmp)
            # rename is atomic, so a concurrent run never reads a half-written file.
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            # The model is trained: an unwritable cache must not throw it away (as pip goes on
            # without its cache), but say so, once per model. torch.save's own file writer
            # raises RuntimeError (a read-only models/ folder, a full disk), not OSError.
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            warnings.warn(f"ppu_fast: the trained model was not cached ({type(exc).__name__}: "
                          f"{exc}); the next run trains it again. Set PPU_FAST_CACHE to a "
                          f"writable folder, or pass cache=False (--no-cache)",
                          stacklevel=caller_stacklevel())
            path = None
    return trained, {"cached": False, "train_seconds": seconds, "path": str(path) if path else None}
