"""The paper's architectures: ALL-CNN (as in SCRUB), ResNet-18 for 32x32 inputs, and a small CNN for
scikit-learn's 8x8 digits. Every model maps (B, C, H, W) images to (B, num_classes) logits."""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Mapping, Sequence

import torch
from torch import nn

from .caller_state import (forked_rng, frozen_modules, inside_forked_rng, is_int, is_real,
                           manual_seed)

MODELS = ("smallcnn", "allcnn", "resnet18")


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    # bias is redundant before BatchNorm (its shift absorbs it), as in SCRUB's Conv block.
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _scaled(channels: int, width: float) -> int:
    return max(1, int(channels * width))


class SmallCNN(nn.Module):
    """Three Conv-BN-ReLU blocks (16, 32, 64 channels x width; the last two stride 2), global average
    pooling and a linear layer: a few thousand parameters, enough for 8x8 digits in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (_scaled(c, width) for c in (16, 32, 64))
        self.features = nn.Sequential(_conv_bn(in_channels, c1), _conv_bn(c1, c2, stride=2),
                                      _conv_bn(c2, c3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AllCNN(nn.Module):
    """ALL-CNN (Springenberg et al. 2014) as SCRUB uses it: Conv-BN-ReLU blocks
    3->96->96->192 (stride 2)->192->192->192 (stride 2)->192 (3x3)->192 (1x1), average pooling, linear.
    ``width`` scales the channel counts (SCRUB's ``filters_percentage``)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        a, b = _scaled(96, width), _scaled(192, width)
        self.features = nn.Sequential(
            _conv_bn(in_channels, a), _conv_bn(a, a), _conv_bn(a, b, stride=2),
            _conv_bn(b, b), _conv_bn(b, b), _conv_bn(b, b, stride=2),
            _conv_bn(b, b), _conv_bn(b, b, kernel=1),
            # Adaptive pooling equals SCRUB's AvgPool2d(8) on 32x32 inputs and also accepts other sizes.
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(b, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout for 32x32 inputs: a 3x3 stride-1 stem and no max-pool, then four
    stages of two basic blocks (64, 128, 256, 512 channels x ``width``). At ``width=1`` it has exactly
    the parameters of ``torchvision.models.resnet18`` with that stem. (torchvision's own class cannot
    scale the width of basic blocks, hence this copy of its layout.)"""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(cin, w, stride), _BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def check_model(name: str, width: float = 1.0) -> None:
    """Refuse an unknown model name or a width that is not a positive finite number."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; expected one of {', '.join(MODELS)}")
    if not (is_real(width) and 0 < width < math.inf):
        # inf overflowed in int(), "1" failed in a comparison, NaN passed `not width > 0` late.
        raise ValueError(f"width must be a positive finite number, got {width!r}")


def build_model(name: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Construct ``smallcnn``, ``allcnn`` or ``resnet18`` for ``num_classes`` classes."""
    check_model(name, width)
    if not is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (a classifier's k: the metrics and "
                         f"unlearning need two classes at least), got {num_classes!r}")
    if not is_int(in_channels) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int (1 for greyscale, 3 for RGB), got "
                         f"{in_channels!r}")
    cls = {"smallcnn": SmallCNN, "allcnn": AllCNN, "resnet18": ResNet18}[name]
    return cls(num_classes=int(num_classes), in_channels=int(in_channels), width=width)


def _reset_method(m: nn.Module):
    # torch's own layers name it reset_parameters; MultiheadAttention and Transformer keep the
    # private _reset_parameters that their __init__ calls (someone else's private method of that
    # name may want arguments: theirs are not called).
    fn = getattr(m, "reset_parameters", None)
    if not callable(fn) and type(m).__module__.split(".")[0] == "torch":
        fn = getattr(m, "_reset_parameters", None)
    return fn if callable(fn) else None


def reset_parameters(model: nn.Module, seed: int | None = None, *, keep_frozen: bool = False) -> nn.Module:
    """Re-initialise every submodule that can (in place; returns ``model``), for retraining a copy of
    an arbitrary model from scratch. ``keep_frozen``: parameters with ``requires_grad=False`` keep
    their values, and frozen modules (``caller_state.frozen_modules``) their running statistics
    (a frozen pre-trained backbone is not what training trained, and a retrain that re-drew it
    would train around random features it never updates).

    ``seed``: the weights that ``torch.manual_seed(seed)`` followed by the modules' own
    ``reset_parameters()`` draw, and the caller's global random state (CPU, and the model's GPUs)
    is afterwards as it was before the call, as scikit-learn's ``random_state`` leaves numpy's
    (it was reseeded: the caller's later draws followed ``seed``); for a model on a device other
    than the CPU and CUDA (mps, xpu, ...) it is still reseeded, as by ``torch.manual_seed``.
    ``seed=None`` draws from the global stream, as torch's ``reset_parameters()`` does."""
    kept = ({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
            if keep_frozen else {})
    # A frozen module's buffers (BatchNorm's running statistics) stay too: training keeps it in
    # eval mode. (BatchNorm's reset_parameters() resets them as well.)
    kept_buffers = ([(b, b.detach().clone()) for m in frozen_modules(model)
                     for b in m.buffers(recurse=False)] if keep_frozen else [])
    # Inside a method's forked_rng (unlearn's methods) the seeding is left as it was: the method's
    # later draws follow the seed, as they always have, and its fork restores the caller's state.
    # A model on another device type (mps, xpu, ...) keeps torch.manual_seed's semantics: the fork
    # covers the CPU and CUDA only, and seeding those alone would draw its weights unseeded.
    other = any(t.device.type not in ("cpu", "cuda")
                for t in itertools.chain(model.parameters(), model.buffers()))
    fork = seed is not None and not inside_forked_rng() and not other
    with forked_rng(model, None) if fork else contextlib.nullcontext():
        if seed is not None:
            manual_seed(seed)
        for m in model.modules():
            fn = _reset_method(m)
            if fn is not None:
                fn()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in kept:
                p.copy_(kept[n])
        for b, value in kept_buffers:
            b.copy_(value)
    return model


def matching_entry(state: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """``state[key]`` of an ``init=`` model or state dict, refused (naming ``init`` and the key)
    when it is missing or has another shape than the model's ``like``."""
    if key not in state:
        raise ValueError(f"init has no entry {key!r}: it must be a model or state dict of the same "
                         f"architecture as model")
    v = state[key]
    if tuple(v.shape) != tuple(like.shape):
        raise ValueError(f"init[{key!r}] has shape {tuple(v.shape)}, the model's parameter "
                         f"{tuple(like.shape)}: init must be of the same architecture")
    return v


def init_state(init: nn.Module | Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """The state dict of an ``init=`` option (a model or a state dict), refused when its entries
    differ from ``model``'s in name or shape (it is not of the same architecture)."""
    if isinstance(init, nn.Module):
        state = init.state_dict()
    elif isinstance(init, Mapping):
        state = init
    else:
        raise TypeError(f"init: expected a model (nn.Module) or a state dict of the same "
                        f"architecture as model, got {type(init).__name__}")
    mine = model.state_dict()
    extra = sorted(set(state) - set(mine))
    if extra:
        raise ValueError(f"init has entries the model lacks ({', '.join(map(repr, extra[:3]))}): "
                         f"it must be a model or state dict of the same architecture as model")
    return {key: matching_entry(state, key, like) for key, like in mine.items()}


def not_reset(model: nn.Module, prefixes: Sequence[str] | None = None) -> list[str]:
    """Names of the trainable parameters that :func:`reset_parameters` cannot re-initialise: owned
    by a module with no ``reset_parameters`` (e.g. a hand-written layer holding ``nn.Parameter``
    s), so a "from scratch" copy would keep the trained values. Only names under ``prefixes``
    (module names) when given."""
    out = []
    for mname, m in model.named_modules():
        if _reset_method(m) is not None:
            continue
        for pname, p in m.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if p.requires_grad and (prefixes is None or any(
                    name == pre or name.startswith(pre + ".") for pre in prefixes)):
                out.append(name)
    return out


def require_reset(model: nn.Module, who: str, prefixes: Sequence[str] | None = None) -> None:
    """Refuse a model that :func:`reset_parameters` cannot fully re-initialise (:func:`not_reset`),
    naming the parameters and what to do instead."""
    missing = not_reset(model, prefixes)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"model: {who} needs fresh weights, but {shown} belong to modules without "
                         f"reset_parameters(), so they would keep the trained values (which saw the "
                         f"forget set); expected init= with the starting weights, or a "
                         f"reset_parameters() method on those modules")
