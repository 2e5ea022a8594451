"""SCRUB (Kurmanji et al. 2024) and SCRUB+R, as in the SCRUB code that the paper follows.

The student (a copy of the model) is trained against the frozen original (the teacher): for the first
``msteps`` epochs a max-step pass over the forget set pushes the student away from the teacher
(loss ``-KL``), then every epoch a min-step pass over the retain set pulls it back
(``gamma * CE + alpha * KL``), KL taken at temperature T and scaled by T^2 (SCRUB's ``DistillKL``);
thirdparty/repdistiller/helper/loops.py ``train_distill``, student in train mode.
SCRUB+R keeps a checkpoint per epoch and rewinds by SCRUB's rule for the setting
(:func:`scrub_rewind`): MIA_experiments.ipynb's for selective forgetting, BadT_experiments.ipynb's
for class forgetting (and at small scale, where SCRUB's code has no SCRUB+R).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..caller_state import is_int, manual_seed
from ..finetune import select_val
from ..training import check_optimizer_name
from . import UnlearnResult, register
from ._common import make_evaluator, resolve_device, working_copy
from ._loop import check_loss_weights, loader, make_optimizer, milestone_lr, plan_presets, run_loop

# SCRUB's hyper-parameters per setting. Small scale: small_scale_unlearning.ipynb, "SCRUB Forgetting"
# (Adam, args.sgda_* and lr_decay_epochs [5, 8, 9]) and "Data Loader" (retain_bs 32, forget_bs 64).
# "class": large_scale_unlearning.ipynb, "SCRUB Forgetting" (SGD momentum 0.9, 3 epochs, msteps 2,
# gamma 0.99, alpha 0.001, T 4, wd 5e-4, lr_decay_epochs [3, 5, 9]) and "Data Loader" (retain 256,
# forget 512); SCRUB+R from BadT_experiments.ipynb, whose ``scrub(teacher, student)`` has the same
# values and the rewinding, on its per-seed cell's retain batches of 128. "selective":
# MIA_experiments.ipynb (SCRUB's selective experiment, 100 examples of class 5), ``scrub(teacher,
# student)`` (SGD momentum 0.9, lr 5e-4, 5 epochs, msteps 3, gamma 1, alpha 0.5, T 4, wd 5e-4,
# lr_decay_epochs [3, 5, 9]) and its per-seed cell (retain_bs 32, forget_bs 16).
_SMALL = {"optimizer": "adam", "lr": 5e-4, "epochs": 10, "msteps": 3, "temperature": 2.0, "gamma": 1.0,
          "alpha": 0.5, "lr_milestones": (5, 8, 9), "weight_decay": 0.1, "batch_size": 32,
          "forget_batch_size": 64}
_SELECTIVE = {**_SMALL, "optimizer": "sgd", "lr": 5e-4, "epochs": 5, "msteps": 3, "temperature": 4.0,
              "weight_decay": 5e-4, "batch_size": 32, "forget_batch_size": 16, "lr_milestones": (3, 5, 9)}
_CLASS = {**_SELECTIVE, "epochs": 3, "msteps": 2, "gamma": 0.99, "alpha": 0.001, "batch_size": 256,
          "forget_batch_size": 512}
PRESETS = {"small": _SMALL, "selective": _SELECTIVE, "class": _CLASS}
# SCRUB+R's own (select="val"): at class scale its source notebook's retain batches.
PRESETS_R = {**PRESETS, "class": {**_CLASS, "batch_size": 128}}
# "scrub": SCRUB's rule for the setting (SCRUB_RULE); the others by name; "closest" is our earlier one.
REWIND_RULES = ("scrub", "first-above", "closest-final", "closest")
SCRUB_RULE = {"small": "first-above", "selective": "closest-final", "class": "first-above"}


def scrub_rewind(history: Sequence[dict], rule: str = "first-above") -> int:
    """SCRUB+R's rewinding as SCRUB's code has it, over the evaluated epochs (epoch 0, the original
    model, included) against the validation error on the forget classes of the *final* model:

    - ``"first-above"`` (BadT_experiments.ipynb, class forgetting): the first epoch whose forget
      error exceeds it; the last epoch when none does;
    - ``"closest-final"`` (MIA_experiments.ipynb, selective forgetting): the epoch whose forget
      error is closest to it, the earliest on ties.
    """
    if rule not in ("first-above", "closest-final"):
        raise ValueError(f"rule must be 'first-above' or 'closest-final', got {rule!r}")
    if not history:
        raise ValueError("the rewinding rule needs at least one evaluated epoch")
    for h in history:
        if "forget_error" not in h or "val_error" not in h:
            raise ValueError("the rewinding rule needs 'forget_error' and 'val_error' in every epoch")
    final = history[-1]["val_error"]
    if rule == "closest-final":
        return int(min(history, key=lambda h: abs(h["forget_error"] - final))["epoch"])
    for h in history:
        if h["forget_error"] > final:
            return int(h["epoch"])
    return int(history[-1]["epoch"])


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """SCRUB's ``DistillKL``: KL(softmax(t / T) || softmax(s / T)) summed, times T^2, per example."""
    log_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="sum") * temperature ** 2 / student.shape[0]


def _plan(name: str, forget: Dataset, retain: Dataset, has_val: bool, setting: str, select: str,
          history_retain: int | None, rewind: str | None, given: dict[str, Any]
          ) -> tuple[str, dict[str, Any]]:
    """SCRUB's options checked before any work (the setting's presets read the data's labels
    only): (the setting, "auto" resolved; its hyper-parameters, each given one or else the
    preset's)."""
    setting, hp = plan_presets(PRESETS_R if select == "val" else PRESETS, setting, forget, retain,
                               given)
    if not 0 <= int(hp["msteps"]) <= int(hp["epochs"]):
        came = ("given" if given.get("msteps") is not None
                else f"the {setting!r} preset's, as msteps was not given")
        raise ValueError(f"msteps must be in [0, epochs={hp['epochs']}], got {hp['msteps']} ({came}); "
                         f"pass msteps <= epochs")
    if not hp["temperature"] > 0:
        raise ValueError(f"temperature must be positive, got {hp['temperature']}")
    check_loss_weights(gamma=hp["gamma"], alpha=hp["alpha"])
    if select not in ("last", "val"):
        raise ValueError(f"select must be 'last' or 'val', got {select!r}")
    if rewind is not None and rewind not in REWIND_RULES:
        raise ValueError(f"rewind must be None or one of {', '.join(REWIND_RULES)}, got {rewind!r}")
    if select == "last" and rewind not in (None, "scrub"):
        raise ValueError(f"rewind={rewind!r}: the rewinding rule applies to select='val' (SCRUB+R) only")
    if select == "val" and not has_val:
        raise ValueError(f"{name} rewinds by comparing forget errors with the validation error on the "
                         f"forget classes: pass val=...")
    if history_retain is not None and not (is_int(history_retain) and history_retain >= 0):
        raise ValueError(f"history_retain must be an int >= 0 or None, got {history_retain!r}")
    check_optimizer_name(hp["optimizer"])
    return setting, hp


def _check(forget: Dataset, retain: Dataset, val: Dataset | None, model: nn.Module | None, *,
           select: str = "last", **options: Any) -> None:
    """The registry's check of :func:`scrub` / :func:`scrub_r`'s options (:func:`_plan`)."""
    fixed = {k: options.pop(k) for k in ("setting", "history_retain", "rewind")}
    _plan("scrub", forget, retain, val is not None, fixed["setting"], select,
          fixed["history_retain"], fixed["rewind"], options)


def _scrub(name: str, model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None,
           seed: int, device: str | torch.device | None, inplace: bool, progress: bool, setting: str,
           select: str, history_retain: int | None, rewind: str | None = None, **given: Any) -> UnlearnResult:
    setting, hp = _plan(name, forget, retain, val is not None, setting, select, history_retain,
                        rewind, given)
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device).to(dev)
    teacher = copy.deepcopy(work).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    T, gamma, alpha = float(hp["temperature"]), float(hp["gamma"]), float(hp["alpha"])

    def max_step(m: nn.Module, batch: tuple) -> torch.Tensor:
        x, _ = batch
        with torch.no_grad():
            t = teacher(x)
        return -distill_kl(m(x), t, T)

    def min_step(m: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            t = teacher(x)
        out = m(x)
        return gamma * F.cross_entropy(out, y) + alpha * distill_kl(out, t, T)

    manual_seed(seed)
    forget_batches = loader(forget, int(hp["forget_batch_size"]), seed + 1, model=work,
                            arg="forget_batch_size")
    retain_batches = loader(retain, int(hp["batch_size"]), seed, model=work)

    def passes(epoch: int) -> list:
        steps = [(retain_batches, min_step)]
        return [(forget_batches, max_step)] + steps if epoch <= int(hp["msteps"]) else steps

    opt = make_optimizer(work.parameters(), str(hp["optimizer"]), float(hp["lr"]), momentum=0.9,
                         weight_decay=float(hp["weight_decay"]))
    evaluate = None
    if select == "val":
        evaluate = make_evaluator(forget, retain, val, retain_limit=history_retain, seed=seed, device=dev)
    t0 = time.perf_counter()
    loop = run_loop(work, passes, opt, epochs=int(hp["epochs"]), device=dev,
                    lr_at=milestone_lr(float(hp["lr"]), hp["lr_milestones"], float(hp["lr_decay"])),
                    evaluate=evaluate, keep_checkpoints=select == "val", progress=progress, desc=name)
    chosen = int(hp["epochs"])
    if select == "val":
        rule = SCRUB_RULE[setting] if rewind in (None, "scrub") else rewind
        chosen = select_val(loop.history) if rule == "closest" else scrub_rewind(loop.history, rule)
        # Epoch 0 is the original model, the teacher's weights.
        work.load_state_dict(loop.checkpoints[chosen] if chosen > 0 else teacher.state_dict())
    work.eval()
    # The rule that ran, by name: runs under different rules do not merge as one method.
    options = {"setting": setting, "select": select, **({"rewind": rule} if select == "val" else {}),
               **{k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()}}
    return UnlearnResult(work, name, history=loop.history if select == "val" else [],
                         selected_epoch=chosen, timings={"train": time.perf_counter() - t0},
                         options=options)


@register("scrub", check=_check)
def scrub(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None, seed: int = 0,
          device: str | torch.device | None = None, inplace: bool = False, progress: bool = True,
          setting: str = "auto", optimizer: str | None = None, lr: float | None = None,
          epochs: int | None = None, msteps: int | None = None, temperature: float | None = None,
          gamma: float | None = None, alpha: float | None = None,
          lr_milestones: Sequence[int] | None = None, lr_decay: float = 0.1,
          weight_decay: float | None = None, batch_size: int | None = None,
          forget_batch_size: int | None = None, select: str = "last",
          history_retain: int | None = 1000, rewind: str | None = "scrub") -> UnlearnResult:
    """SCRUB. ``setting`` (``"small"``, ``"selective"``, ``"class"``, or ``"auto"``: see
    :func:`ppu_fast.unlearn._loop.infer_setting`) fills every hyper-parameter left at None:

    - small (small_scale_unlearning.ipynb, "SCRUB Forgetting" and "Data Loader"): Adam lr 5e-4,
      10 epochs, msteps 3, T 2, gamma 1, alpha 0.5, lr x0.1 after epochs 5, 8 and 9, weight decay
      0.1, batch sizes 32 (retain) / 64 (forget);
    - selective (MIA_experiments.ipynb, ``scrub`` and the per-seed cell): SGD (momentum 0.9) lr
      5e-4, 5 epochs, msteps 3, T 4, weight decay 5e-4, lr x0.1 after epochs 3, 5 and 9, batch
      sizes 32 / 16, gamma 1 and alpha 0.5 as small;
    - class (large_scale_unlearning.ipynb, "SCRUB Forgetting" and "Data Loader"): as selective with
      3 epochs, msteps 2, gamma 0.99, alpha 0.001, batch sizes 256 / 512 (SCRUB+R: retain batches
      of 128, BadT_experiments.ipynb's per-seed cell).

    ``select="val"`` is SCRUB+R's rewinding (needs ``val``; ``history_retain`` caps the retain
    examples evaluated per epoch): ``rewind=None`` (or ``"scrub"``) is SCRUB's rule for the setting
    (:func:`scrub_rewind`: ``"closest-final"`` for selective, ``"first-above"`` for class and small
    scale), ``"first-above"`` / ``"closest-final"`` pick one, ``rewind="closest"`` is our earlier
    rule, the epoch >= 1 whose forget error is closest to the same epoch's validation error on the
    forget classes (:func:`ppu_fast.finetune.select_val`). ``options["rewind"]`` names the rule that
    ran."""
    return _scrub("scrub" if select == "last" else "scrub+r", model, forget, retain, val=val, seed=seed,
                  device=device, inplace=inplace, progress=progress, setting=setting, select=select,
                  history_retain=history_retain, optimizer=optimizer, lr=lr, epochs=epochs,
                  msteps=msteps, temperature=temperature, gamma=gamma, alpha=alpha,
                  lr_milestones=lr_milestones, lr_decay=lr_decay, weight_decay=weight_decay,
                  batch_size=batch_size, forget_batch_size=forget_batch_size, rewind=rewind)


@register("scrub+r", check=lambda forget, retain, val, model, **o: _check(
    forget, retain, val, model, select="val", **o))
def scrub_r(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
            seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
            progress: bool = True, setting: str = "auto", optimizer: str | None = None,
            lr: float | None = None, epochs: int | None = None, msteps: int | None = None,
            temperature: float | None = None, gamma: float | None = None, alpha: float | None = None,
            lr_milestones: Sequence[int] | None = None, lr_decay: float = 0.1,
            weight_decay: float | None = None, batch_size: int | None = None,
            forget_batch_size: int | None = None, history_retain: int | None = 1000,
            rewind: str | None = None) -> UnlearnResult:
    """SCRUB+R: :func:`scrub` with a checkpoint per epoch, rewound by SCRUB's rule for the setting
    (:func:`scrub_rewind`; ``val`` is required): selective forgetting takes the epoch, the original
    included, whose forget error is closest to the final model's validation error on the forget
    classes (MIA_experiments.ipynb); class forgetting and small scale the first epoch whose forget
    error exceeds it (BadT_experiments.ipynb). ``rewind`` picks another rule (see :func:`scrub`)."""
    return scrub(model, forget, retain, val=val, seed=seed, device=device, inplace=inplace,
                 progress=progress, setting=setting, optimizer=optimizer, lr=lr, epochs=epochs,
                 msteps=msteps, temperature=temperature, gamma=gamma, alpha=alpha,
                 lr_milestones=lr_milestones, lr_decay=lr_decay, weight_decay=weight_decay,
                 batch_size=batch_size, forget_batch_size=forget_batch_size, select="val",
                 history_retain=history_retain, rewind=rewind)
