"""Starting weights for an experiment other than a fresh initialisation: a user's checkpoint
(``--init-checkpoint``) or a model pre-trained on the CIFAR-10 classes the experiment does not use
(``--pretrain cifar10-other``).

SCRUB and the paper start their small-scale models from CIFAR-100 pre-trained weights; those cannot
be fetched here, so ``cifar10-other`` pre-trains on CIFAR-10 classes 5-9 for cifar5 (classes 0-4) as
a stand-in: other images, other classes, the same kind of pictures, and far fewer of them (25,000
images of 5 classes instead of 50,000 of 100). In both cases the classifier head is re-initialised
for the experiment's classes unless the checkpoint's head already has their number of outputs, and
Original, Retrain and every method start from the same weights.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .caller_state import non_finite_weights
from .training import TrainConfig

PRETRAIN_CHOICES = ("cifar10-other",)


def pretrain_config(**overrides: object) -> TrainConfig:
    """Pre-training: 30 epochs of SGD, cosine schedule, batch 128, random crops and flips (many 32x32
    images, unlike the 500 of cifar5), seed 0: one pre-trained model serves every seed of an
    experiment, as one downloaded checkpoint would. ``overrides`` replace fields."""
    base = dict(epochs=30, lr=0.05, batch_size=128, augment=True, seed=0)
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


def classifier_head(model: nn.Module) -> str:
    """Name of the model's classifier head: its last ``nn.Linear`` (``classifier`` for the small CNN
    and ALL-CNN, ``fc`` for ResNet-18)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to serve as its classifier head")
    return names[-1]


def _head_keys(model: nn.Module) -> set[str]:
    head = classifier_head(model)
    return {f"{head}.{k}" for k, _ in model.get_submodule(head).named_parameters()}


def read_checkpoint(path: str | Path, arg: str = "init_checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ``path`` and the file's sha256 (hex). Accepts a plain state dict, a dict with
    a ``"state_dict"`` entry (ppu_fast's model cache, many training scripts) and keys prefixed
    ``module.`` (DataParallel). Errors name ``arg``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{arg}: no file at '{p}' (expected a state dict saved with torch.save)")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a checkpoint
        # torch's own message tells the user to retry with weights_only=False, which runs the
        # file's code; a whole pickled model (torch.save(model)) has a safe alternative.
        text = str(exc)
        globals_ = [ln.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
                    for ln in text.splitlines() if "Unsupported global:" in ln]
        if globals_:  # torch's advice that follows (unpickle it anyway) is left out
            raise ValueError(f"{arg}: '{p}' is not a torch checkpoint that loads with "
                             f"weights_only=True: it pickles Python objects ({globals_[0]}), e.g. "
                             f"a whole model saved with torch.save(model), which this run does "
                             f"not unpickle (that would run code from the file); save "
                             f"model.state_dict() instead") from None
        if "Weights only load failed" in text:
            # Its advice (weights_only=False, "file an issue") is wrong for a file that is just
            # not a checkpoint: keep the unpickler's own reason.
            why = [ln.strip() for ln in text.splitlines() if ln.strip()
                   and not ln.startswith(("Weights only", "Please file", "Check the documentation"))]
            text = "; ".join(why) or "not a pickle torch.load reads"
        raise ValueError(f"{arg}: '{p}' is not a torch checkpoint that loads with weights_only=True "
                         f"({type(exc).__name__}: {text}); expected a file written by "
                         f"torch.save(model.state_dict(), path)") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise TypeError(f"{arg}: '{p}' holds a {type(obj).__name__}, expected a state dict (parameter "
                        f"name -> tensor), e.g. torch.save(model.state_dict(), path)")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, digest


def _is_batch_counter(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is a BatchNorm layer's ``num_batches_tracked`` buffer in ``model``."""
    owner, _, leaf = key.rpartition(".")
    if leaf != "num_batches_tracked":
        return False
    try:
        return isinstance(model.get_submodule(owner), nn.modules.batchnorm._NormBase)
    except AttributeError:
        return False


def _listed(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def load_checkpoint_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str,
                         source: str, arg: str = "init_checkpoint") -> str:
    """Load ``state`` into ``model`` (in place) after checking that it is a state dict of the same
    architecture: the same keys and the same shapes, except the classifier head's, which may have
    another number of classes (then the model keeps its own, freshly initialised head). ``what``
    describes the architecture and ``source`` the checkpoint in the error, which lists the missing
    and unexpected keys and the shape mismatches. Returns ``"loaded"`` or ``"re-initialised"``: what
    happened to the head."""
    own = model.state_dict()
    head = _head_keys(model)
    # BatchNorm's batch counter is missing from older checkpoints; torch's own strict load keeps
    # the module's counter then, and so does this one (the counter only matters for momentum=None).
    missing = [k for k in own if k not in state and not _is_batch_counter(model, k)]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    wrong = [k for k in mismatched if k not in head]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        if wrong:
            parts.append("shape mismatches " + _listed(
                [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]))
        raise ValueError(f"{arg}: {source} is not a state dict of {what}: {'; '.join(parts)}")
    keep_head = bool(mismatched)
    load = {k: v for k, v in state.items() if not (keep_head and k in head)}
    model.load_state_dict({**own, **load})
    bad, total = non_finite_weights(model)
    if bad:
        # Found here, before any training: otherwise the first epoch's loss was NaN and the run
        # stopped blaming the learning rate.
        raise ValueError(f"{arg}: {source} holds {bad} NaN or infinite values among the {total} "
                         f"weights and buffer values it gives {what}; expected finite weights")
    return "re-initialised" if keep_head else "loaded"


def transfer_body(model: nn.Module, pretrained: Mapping[str, torch.Tensor]) -> None:
    """Load every weight of ``pretrained`` into ``model`` except the classifier head's, which stays as
    ``model`` initialised it: the pre-training classes are not the experiment's, even where their
    number is the same (cifar5's five against CIFAR-10's other five)."""
    head = _head_keys(model)
    own = model.state_dict()
    model.load_state_dict({**own, **{k: v for k, v in pretrained.items() if k not in head}})
