"""EU-k (Goel et al. 2022, "exact unlearning of the last k layers"): put the last block back to its
initial weights and train it on the retain set, everything else frozen (as CF-k, whose training it
reuses), as SCRUB's code runs it."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..models import AllCNN, SmallCNN, matching_entry, require_reset, reset_parameters
from . import UnlearnResult, register
from ._common import resolve_device, working_copy
from ._loop import as_names, last_block, modules_named, modules_with_parameters
from .cf_k import block_layers, resolve_block_options, train_block

# SCRUB's code: as CF-k (see cf_k.py) with euk_epochs = training_epochs, 30 at small scale
# (small_scale_unlearning.ipynb "Exact Unlearning k layers", "Logs") and 25 at large scale
# (BadT_experiments.ipynb ``euk_unlearn``, euk_bs 64). The schedule matters here: SCRUB's
# ``adjust_learning_rate`` drops the lr to args.sgda_learning_rate * 0.1 after epoch 10: 5e-5 at
# small scale, 1e-3 at large scale (args.sgda_learning_rate 0.01 there; see cf_k.py).
_SMALL = {"epochs": 30, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "l2_pull": 0.1,
          "batch_size": 128, "mode": "eval", "lr_milestones": (10, 15, 20), "lr_decay": 0.1,
          "lr_decayed_base": 5e-4}
_LARGE = {**_SMALL, "epochs": 25, "l2_pull": 0.0, "batch_size": 64, "mode": "train-all",
          "lr_decayed_base": 0.01}
PRESETS = {"small": _SMALL, "selective": _LARGE, "class": _LARGE}


def default_reset(model: nn.Module) -> list[str]:
    """The modules whose weights SCRUB's EU-k puts back to their initial values: the last block and,
    for ALL-CNN, the classifier (which then stays frozen: SCRUB trains the block alone); ResNet-18's
    ``layer4`` alone. Our small CNN has ALL-CNN's layout and follows its rule."""
    block = last_block(model)
    if isinstance(model, (AllCNN, SmallCNN)):
        return block + ["classifier"]
    return block


def copy_initial(work: nn.Module, init_state: dict[str, torch.Tensor], names: Sequence[str]) -> None:
    """Copy the parameters (not the BatchNorm statistics, as SCRUB copies only ``weight`` and
    ``bias``) of the modules ``names`` from ``init_state`` into ``work``."""
    with torch.no_grad():
        for name, module in zip(names, modules_named(work, names, arg="reset")):
            for pname, p in module.named_parameters():
                src = matching_entry(init_state, f"{name}.{pname}", p)
                p.copy_(src.to(p.device, p.dtype))


def _plan(forget: Dataset, retain: Dataset, model: nn.Module | None, setting: str,
          layers: Sequence[str] | None, reset: Sequence[str] | None, init: object, given: dict
          ) -> tuple[str, list[str] | None, list[str] | None, dict]:
    """(the setting, "auto" resolved from the labels; the layers trained and the modules reset,
    None without a model; the hyper-parameters), checked before any work. A ``reset`` whose
    modules hold no parameter is refused: nothing would be put back (CF-k under EU-k's name)."""
    setting, hp = resolve_block_options(PRESETS, setting, forget, retain, given)
    if init is not None and not isinstance(init, (nn.Module, dict)):
        raise TypeError(f"init must be a torch.nn.Module, a state dict or None, got {type(init).__name__}")
    names = as_names(layers) if layers is not None else None
    reset = as_names(reset, "reset") if reset is not None else None
    if model is None:
        return setting, None, None, hp
    trained = block_layers(model, names)
    if reset is None:
        try:
            reset = default_reset(model)
        except ValueError:
            if names is None:
                raise
            reset = list(trained)  # a model SCRUB has no rule for: put back the block it trains
    modules_with_parameters(model, reset, "reset", "to put back")
    if init is None:
        require_reset(model, "EU-k without init=", prefixes=reset)
    return setting, trained, reset, hp


@register("eu-k", check=lambda forget, retain, val, model, setting, layers, reset, init, **given:
          _plan(forget, retain, model, setting, layers, reset, init, given))
def eu_k(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None, seed: int = 0,
         device: str | torch.device | None = None, inplace: bool = False, progress: bool = True,
         setting: str = "auto", layers: Sequence[str] | None = None, epochs: int | None = None,
         lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
         batch_size: int | None = None, init: nn.Module | dict | None = None,
         reset: Sequence[str] | None = None, l2_pull: float | None = None, mode: str | None = None,
         lr_milestones: Sequence[int] | None = None, lr_decay: float | None = None,
         lr_decayed_base: float | None = None) -> UnlearnResult:
    """EU-k as SCRUB's code runs it (small_scale_unlearning.ipynb "Exact Unlearning k layers" with
    ``fk_fientune`` from "Finetune and Fisher Helper"; large scale BadT_experiments.ipynb
    ``euk_unlearn``): the parameters of the modules ``reset`` (default :func:`default_reset`; for a
    model it has no rule for, the ``layers`` given) are
    copied from ``init``, the weights the original model's training started from (a model or state
    dict of the same architecture; ``ppu-fast run`` passes them), then ``layers`` (default the last
    block, as CF-k) are trained on ``retain`` with an L2 pull toward those initial weights at small
    scale. Without ``init`` the copied weights are a fresh initialisation drawn with ``seed``
    (``options["init"] == "random"``), our earlier behaviour.

    ``setting`` (see :func:`ppu_fast.unlearn._loop.infer_setting`) fills the options left at None:
    SGD at lr 0.01 without momentum or weight decay, 30 epochs at small scale (batches of 128, eval
    mode, pull 0.1) and 25 at large scale (batches of 64, ``mode="train-all"``, no pull); after epoch
    10 the lr follows SCRUB's ``adjust_learning_rate`` (see :func:`~ppu_fast.unlearn._loop.fk_lr`):
    at small scale 5e-5, then 5e-6 after 15, 5e-7 after 20; at large scale 1e-3, 1e-4, 1e-5."""
    setting, layers, reset, hp = _plan(forget, retain, model, setting, layers, reset, init, {
        "epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
        "batch_size": batch_size, "l2_pull": l2_pull, "mode": mode, "lr_milestones": lr_milestones,
        "lr_decay": lr_decay, "lr_decayed_base": lr_decayed_base})
    work = working_copy(model, inplace, device)
    if isinstance(init, nn.Module):
        init_state, source = init.state_dict(), "given"
    elif isinstance(init, dict):
        init_state, source = init, "given"
    else:
        # Seeded, so that the seed alone fixes the new weights.
        init_state, source = reset_parameters(copy.deepcopy(work), seed).state_dict(), "random"
    copy_initial(work, init_state, reset)
    seconds = train_block(work, retain, layers, seed=seed, device=resolve_device(model, device),
                          progress=progress, desc="eu-k", **hp)
    return UnlearnResult(work, "eu-k", selected_epoch=int(hp["epochs"]), timings={"train": seconds},
                         options={"setting": setting, "layers": layers, "reset": reset, "init": source,
                                  **hp})
