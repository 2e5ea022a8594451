"""What a training entry point (:func:`ppu_fast.unlearn`, :func:`ppu_fast.finetune`) owes its caller
beyond the result: the global random streams as they were, the caller's frozen parameters still
frozen, and never a model of NaN weights handed back as if training had worked."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import os
import sys
import threading
from typing import Any, Callable, Iterator, Mapping, TypeVar

import numpy as np
import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the function calling this one that
    names the first frame outside ppu_fast: the caller's line, however many of the package's
    calls and wrappers lie between (a fixed stacklevel named a wrapper's line once one was
    added, and every call site then shared one warning location)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def available_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has.

    A device torch cannot parse, or an accelerator whose torch module says it is not here
    (``"cuda"`` without a CUDA device, ``"cuda:3"`` on a one-GPU machine, ``"mps"`` off a Mac;
    likewise xpu and the others torch has a module with ``is_available`` for), is refused by name
    before anything runs; torch's own errors for them come from deep inside the first forward
    pass. A device type torch leaves to a plugin (xla, hpu) is passed on as it is."""
    if not (isinstance(device, (str, torch.device)) or is_int(device)):
        raise TypeError(f"device: got a {type(device).__name__} ({device!r}); expected a str, "
                        f"torch.device or CUDA index such as 'cpu', 'cuda', 'cuda:0' or 0")
    try:
        dev = torch.device(int(device) if is_int(device) else device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({str(exc).splitlines()[0]}); "
                         f"expected e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if dev.type in ("cpu", "meta"):
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    available = getattr(torch.backends.mps if dev.type == "mps" else backend, "is_available", None)
    if available is not None and not available():
        raise ValueError(f"device: {device!r} but torch finds no {dev.type.upper()} device here; "
                         f"expected 'cpu' or a device this machine has")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ValueError(f"device: {device!r} but this machine has {count()} {dev.type.upper()} "
                         f"device(s); expected {dev.type}:0 .. {dev.type}:{count() - 1}")
    return dev


def cuda_devices_to_fork(model: nn.Module, device: Any) -> list[int]:
    """The CUDA devices whose random state a call training ``model`` on ``device`` must fork:
    every initialised GPU (torch.manual_seed reseeds all of them, not only the model's), else the
    model's and ``device``'s."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    devs = {p.device.index or 0 for p in model.parameters() if p.is_cuda}
    if device is not None:
        d = available_device(device)
        if d.type == "cuda":
            devs.add(d.index if d.index is not None else torch.cuda.current_device())
    return sorted(devs)


# The CUDA devices whose random state the innermost forked_rng restores (None: outside one).
_FORKED_GPUS: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "ppu_fast_forked_gpus", default=None)


@contextlib.contextmanager
def forked_rng(model: nn.Module, device: Any) -> Iterator[None]:
    """``torch.random.fork_rng`` over the CPU and :func:`cuda_devices_to_fork`: the caller's random
    state is as it was after the block; :func:`manual_seed` inside seeds only what is restored."""
    devices = cuda_devices_to_fork(model, device)
    token = _FORKED_GPUS.set(tuple(devices))
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        _FORKED_GPUS.reset(token)


def inside_forked_rng() -> bool:
    """Whether a :func:`forked_rng` block is running (in this context): its seeding is undone
    when the block ends."""
    return _FORKED_GPUS.get() is not None


def manual_seed(seed: int) -> None:
    """``torch.manual_seed(seed)`` for the library's own draws. Inside :func:`forked_rng` it seeds
    the CPU and the forked GPUs only: torch.manual_seed also reseeds every other GPU and queues the
    seed for GPUs CUDA has not started yet, which the fork cannot restore, so the caller's first
    draws on them after the call followed the library's seed, not the caller's."""
    devices = _FORKED_GPUS.get()
    if devices is None:
        torch.manual_seed(seed)
        return
    seed = int(seed)
    torch.default_generator.manual_seed(seed)
    for d in devices:
        torch.cuda.default_generators[d].manual_seed(seed)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then every module back in its own mode: a caller's
    mix (a training model with frozen BatchNorm, a wrapper built in train mode around an eval-mode
    model) survives, where ``model.train(was)`` would set every module alike."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def _dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).replace("torch.", "")


def forward_failed(model: nn.Module, where: str, what: str, exc: BaseException) -> ValueError:
    """The error for a forward pass of ``model`` that torch refused on ``where`` (``what``
    describes the input it got), naming the parameters' dtypes the inputs must match."""
    dts = sorted({_dtype_name(p) for p in model.parameters()})
    return ValueError(f"model: its forward pass on {where} ({what}) failed: {exc}; expected inputs "
                      f"the model takes (its parameters are {'/'.join(dts) or 'none'})")


def probe_forward(model: nn.Module, x: object,
                  where: str) -> tuple[torch.Tensor, list[str], list[str]]:
    """One forward pass of ``model`` on the single example ``x`` (batched to 1; eval mode, no grad,
    the model's buffers put back afterwards, so a forward that updates them leaves no trace).
    Returns the output, the names (as ``model.named_modules()`` gives them) of the
    ``nn.Linear`` modules in the order the pass called them (the last one is the layer that
    produced the logits of a classifier, whatever order ``__init__`` registered them in), and the
    names of all the modules the pass called, in the order of their first call. Names, not
    modules: ``nn.DataParallel`` on several GPUs calls replicas that share the hooks. An input
    torch cannot take, or a forward that fails on it, is a ValueError naming ``where`` (e.g.
    ``forget[0]``)."""
    from .training import model_device

    try:
        x = (x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device="cpu")).unsqueeze(0)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{where}: its input is a {type(x).__name__}, which torch cannot turn "
                        f"into a tensor ({exc}); expected a tensor or array the model takes "
                        f"(e.g. apply torchvision's ToTensor)") from None
    called: list[str] = []
    started: dict[str, None] = {}  # an ordered set: first calls only
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: called.append(name))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    # ScriptModules refuse hooks (and their Linears are no nn.Linear above either).
    hooks += [m.register_forward_pre_hook(lambda m, i, name=name: started.setdefault(name))
              for name, m in model.named_modules() if not isinstance(m, torch.jit.ScriptModule)]
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x.to(model_device(model)))
    except (RuntimeError, TypeError) as exc:
        raise forward_failed(model, where, f"a {_dtype_name(x)} tensor of shape {tuple(x.shape[1:])}, "
                                           f"batched", exc) from None
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
    return out, called, list(started)


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that own parameters, none of them trainable, and stateful leaves without
    parameters (``BatchNorm(affine=False)``: buffers, no parameters, no children) inside frozen
    blocks only: the smallest module around each of its uses that holds parameters has none
    trainable. Training loops keep them in eval mode, so a frozen block's BatchNorm statistics
    stay as they were: "frozen" means bit-identical. (A parameter-free module with children is
    left to its children: its eval() would switch off a Dropout below it too.)"""
    blocks: dict[int, list[bool]] = {}  # a stateful leaf: whether each block around a use is frozen
    visited: set[tuple[int, bool]] = set()

    def visit(m: nn.Module, block_frozen: bool) -> None:
        if (id(m), block_frozen) in visited:
            return
        visited.add((id(m), block_frozen))
        held = list(m.parameters())
        if held:  # m is the smallest block with parameters around its parameter-free children
            block_frozen = not any(p.requires_grad for p in held)
        elif next(m.children(), None) is None and next(m.buffers(recurse=False), None) is not None:
            blocks.setdefault(id(m), []).append(block_frozen)
        for child in m.children():
            visit(child, block_frozen)

    visit(model, False)
    out: list[nn.Module] = []
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if own:
            if not any(p.requires_grad for p in own):
                out.append(m)
        elif id(m) in blocks and all(blocks[id(m)]):
            out.append(m)
    return out


def non_finite_weights(model: nn.Module) -> tuple[int, int]:
    """(number of bad elements, number of elements) of ``model``'s parameters and floating
    buffers: non-finite parameters and running statistics (BatchNorm's diverge too, and poison
    eval-mode outputs), NaN in any other buffer. An infinity there can be meant: an additive
    attention mask holds -inf where attention is not allowed."""
    bad = total = 0
    with torch.no_grad():
        for p in model.parameters():
            total += p.numel()
            if p.is_floating_point() or p.is_complex():
                bad += int((~torch.isfinite(p)).sum())
        for name, b in model.named_buffers():
            if not b.is_floating_point():
                continue
            total += b.numel()
            stat = name.rsplit(".", 1)[-1].startswith("running_")
            bad += int((~torch.isfinite(b) if stat else torch.isnan(b)).sum())
    return bad, total


def is_int(v: object) -> bool:
    """An integer option's value: any ``numbers.Integral`` (numpy's included), never a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: object) -> bool:
    """A real option's value: any ``numbers.Real`` (numpy's included), never a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_flag(value: object, name: str) -> bool:
    """A True / False argument (numpy's bool too) as a bool, or a ValueError naming it: a string
    such as "False" is truthy, and ``inplace="False"`` trained the caller's own model."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r}: expected True or False")
    return bool(value)


def check_positive_int(value: object, name: str) -> None:
    """Refuse a count (epochs, a batch size, rows per epoch) that is not an integer >= 1."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_finite_options(options: Mapping[str, Any], where: str) -> None:
    """Refuse a NaN or infinite real-valued option, naming it (every option of the training entry
    points is a finite quantity: a learning rate, a weight, a temperature, a decay)."""
    for name, v in options.items():
        if (isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral))
                and not math.isfinite(float(v))):
            raise ValueError(f"{where}: {name}={v!r}; expected a finite number")


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or a ValueError naming it (torch's own message names no argument)."""
    if not is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer below 2**63")
    return int(seed)


def keeps_caller_state(name: Callable[[dict], str]) -> Callable[[F], F]:
    """Decorate ``fn(model, ...)`` returning an object with ``.model``:

    * the global CPU (and the model's CUDA) random state is restored afterwards
      (``torch.random.fork_rng``): the methods seed it for reproducible dropout and shuffling,
      which must not reseed the caller's own stream;
    * every parameter's ``requires_grad`` is, on the returned model and on the caller's, what it
      was on the caller's model before the call (methods unfreeze what they train);
    * a model with non-finite weights is refused before training, and a run that ends with
      non-finite weights raises ``FloatingPointError`` (naming ``name(kwargs)``, the method)
      instead of returning it.
    """
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(model, nn.Module):
                return fn(model, *args, **kwargs)  # fn raises its own TypeError
            what = name(kwargs)
            bad, total = non_finite_weights(model)
            if bad:
                raise ValueError(f"model: {bad} of its {total} weights and buffer values are NaN "
                                 f"or infinite; expected a model with finite weights")
            flags = {n: p.requires_grad for n, p in model.named_parameters()}
            try:
                with forked_rng(model, kwargs.get("device")):
                    result = fn(model, *args, **kwargs)
            finally:
                for n, p in model.named_parameters():
                    if n in flags:
                        p.requires_grad_(flags[n])
            for n, p in result.model.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
            bad, total = non_finite_weights(result.model)
            if bad:
                where = ("the caller's model (inplace=True) holds them now"
                         if kwargs.get("inplace") else "the caller's model is untouched")
                lr = f" (lr={kwargs['lr']!r})" if "lr" in kwargs else ""
                # float16 weights: Adam's eps (1e-8) is 0 there, so its first step divides by 0
                # at any learning rate.
                half = ("; its weights are float16, in which Adam's eps (1e-8) rounds to 0 and "
                        "small gradients vanish: train a float32 or bfloat16 copy instead"
                        if any(p.dtype == torch.float16 for p in model.parameters()) else "")
                raise FloatingPointError(
                    f"{what}: the run diverged: {bad} of the {total} weights and buffer values it "
                    f"ended with are NaN or infinite ({where}); lower the learning rate{lr} or the "
                    f"other step sizes{half}")
            return result
        return wrapper  # type: ignore[return-value]
    return deco


class Overlapping:
    """A process-wide setting changed for the duration of blocks that threads may overlap:
    ``apply()`` (returning what ``restore`` needs) runs when the first block enters,
    ``restore(saved)`` when the last one leaves. Saved and put back per block, two overlapping
    calls put back each other's value: the caller's float32 matmul precision stayed "highest"
    after two concurrent refines (and a block still running saw the caller's "medium")."""

    def __init__(self, apply: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._saved = self._apply()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    saved, self._saved = self._saved, None
                    self._restore(saved)
