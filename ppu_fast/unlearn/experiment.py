"""One unlearning experiment as in the paper: build the split, train (or load) the original model,
run each method, measure it. ``ppu-fast demo`` and ``ppu-fast run`` are thin wrappers around
:func:`run_experiment`."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import Split, check_reduction, dataset_channels, make_split
from ..metrics import (MIA_MIN_PER_SIDE, add_retrain_gaps, error, lira, mia_detail,
                       restrict_to_classes)
from ..data import check_other_classes, other_classes_dataset
from ..finetune import check_epoch_rows
from ..models import build_model, check_model
from ..report import label
from ..pretrain import (PRETRAIN_CHOICES, load_checkpoint_into, pretrain_config, read_checkpoint,
                        transfer_body)
from ..backends import check_environment
from ..caller_state import available_device, check_flag, is_int
from ..torch_defaults import cpu_default_device
from ..training import TrainConfig, check_optimizer_options, fit_cached
from ._loop import check_decay, epochs_list
from . import check_option_values, check_plan, methods as registered, method_options, unlearn
from .ntk import JacobianTooLarge

PPU_METHODS = ("ppu", "ppu-bias", "ppu-random")


def _refines(method: str) -> bool:
    """Whether ``method`` calls ``ppu_fast.refine`` (the PPU methods and the +ppu ones)."""
    return method in PPU_METHODS or "+ppu" in method


def _check_method_options(method: str, name: str, kw: dict) -> None:
    """The checks ``unlearn`` makes of ``method``'s options ``kw`` (row ``name``) that need no data,
    before any training: names, NaN / inf, the declared types (int, float, bool), the optimizer's
    lr / momentum / weight_decay, the retain rows per epoch, the lr schedule's milestones and
    decay. (Each was refused only when the method ran, after the Original, Retrain and the
    methods before it had trained.)"""
    bad = sorted(set(kw) - set(method_options(method)))
    if bad:
        raise TypeError(f"method '{name}' does not accept option(s) {', '.join(bad)}")
    where = f"method '{name}'"
    check_option_values(method, kw, where)
    if any(kw.get(o) is not None for o in ("lr", "momentum", "weight_decay")):
        try:
            # The options not given take valid stand-ins: only those given are judged here.
            check_optimizer_options(*(kw[o] if kw.get(o) is not None else d
                                      for o, d in (("lr", 0.1), ("momentum", 0.0),
                                                   ("weight_decay", 0.0))))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    check_epoch_rows(kw.get("retain_fraction"), kw.get("retain_per_epoch"))
    if kw.get("lr_milestones") is not None:
        epochs_list(kw["lr_milestones"], "lr_milestones")
    if kw.get("lr_decay") is not None:
        check_decay(kw["lr_decay"])


@cpu_default_device  # its Adam's step counter (torch_defaults)
def warm_up() -> None:
    """Pay a process's one-time torch costs before anything is timed: the first optimizer a process
    builds imports ``torch._dynamo`` (0.8-1 s here), which otherwise lands in whichever method
    builds it first (measured: PPU at 1.0 s instead of 0.1 s when Original and Retrain came from the
    cache, so its speed-up over Retrain read 1.7x instead of 23x)."""
    p = torch.nn.Parameter(torch.zeros(1, device="cpu"))
    p.grad = torch.zeros(1, device="cpu")
    for opt in (torch.optim.SGD([p], lr=0.0, momentum=0.9), torch.optim.Adam([p], lr=0.0)):
        opt.step()


def default_train_config(dataset: str, seed: int) -> TrainConfig:
    """Training of the original and retrained models: 30 epochs of SGD with a cosine schedule. Random
    crops and flips only for the large 32x32 sets: on the 500 images of cifar5 they kept ALL-CNN at
    16 % training error after 30 epochs, while the paper's original models fit their training set
    (0 % retain error), and crops would cut the 8x8 digits."""
    if dataset.startswith("digits"):
        return TrainConfig(epochs=30, lr=0.05, batch_size=32, augment=False, seed=seed)
    return TrainConfig(epochs=30, lr=0.05, batch_size=64, augment=dataset not in ("cifar5",), seed=seed)


def evaluate(model: nn.Module, split: Split, *, seed: int, device: torch.device | None = None) -> dict:
    """The paper's measurements of one model on a split: test / retain / forget error (%), the
    validation error on the forget classes (%) and the membership-inference attack (%), with what the
    attack rests on (:func:`ppu_fast.metrics.mia_detail`): ``mia_splits``, ``mia_n`` (examples per
    side) and ``mia_chance`` (how far luck alone moves its score at this size, % points); beside it the
    offline LiRA-style attack (:func:`ppu_fast.metrics.lira`, members: forget set, non-members: test
    examples of the forget classes): ``mia_auc``, ``mia_tpr_at_1fpr`` and ``mia_tpr_at_5fpr`` (%),
    with ``lira_n_members`` / ``lira_n_nonmembers``."""
    val_forget = restrict_to_classes(split.val, split.forget_classes)
    attack = mia_detail(model, split.forget, split.test, seed=seed, device=device)
    roc = lira(model, split.forget, split.test, device=device)
    return {"test_error": error(model, split.test, device=device),
            "retain_error": error(model, split.retain, device=device),
            "forget_error": error(model, split.forget, device=device),
            "val_error": error(model, val_forget, device=device) if len(val_forget) else float("nan"),
            "mia": attack["mia"], "mia_splits": attack["splits"], "mia_n": attack["n"],
            "mia_chance": attack["chance"], "mia_auc": roc["auc"], "mia_tpr_at_1fpr": roc["tpr_at_1fpr"],
            "mia_tpr_at_5fpr": roc["tpr_at_5fpr"], "lira_n_members": roc["n_members"],
            "lira_n_nonmembers": roc["n_nonmembers"]}


def lam_variants(lams: Sequence[float], options: dict | None = None) -> dict[str, tuple[str, dict]]:
    """The λ sweep as :func:`run_experiment` variants: PPU (privacy) once per ``lams`` value, each row
    named ``ppu[lam=<value>]`` (the value as ``%g`` prints it), with ``options`` (PPU's other options)
    beside its ``lam``. Raises on a non-positive or repeated λ."""
    out: dict[str, tuple[str, dict]] = {}
    for lam in lams:
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam sweep: every λ must be a positive number, got {lam!r}")
        name = f"ppu[lam={lam:g}]"
        if name in out:
            first = out[name][1]["lam"]
            if first == float(lam):
                raise ValueError(f"lam sweep: λ = {lam:g} is listed twice")
            raise ValueError(f"lam sweep: λ = {first!r} and {float(lam)!r} both name the row "
                             f"'{name}' (rows print λ to 6 significant digits); expected values "
                             f"that differ there")
        out[name] = ("ppu", {**(options or {}), "lam": float(lam)})
    if not out:
        raise ValueError("lam sweep: name at least one λ")
    return out


def run_experiment(*, dataset: str = "digits5", model: str = "smallcnn", scenario: str = "selective",
                   forget_class: int | None = None, num_forget: int | None = None,
                   methods: Sequence[str] = ("original", "retrain", "finetune", "ppu", "ppu-bias"),
                   seeds: Sequence[int] = (0,), data_root: str | Path | None = None,
                   device: str | None = None, width: float = 1.0, train: dict | None = None,
                   method_kwargs: dict[str, dict] | None = None, cache: bool = True,
                   progress: bool = True, log: Any = print, init_checkpoint: str | Path | None = None,
                   pretrain: str | None = None, pretrain_train: dict | None = None,
                   pretrain_per_class: int | None = None, train_per_class: int | None = None,
                   test_per_class: int | None = None,
                   variants: dict[str, tuple[str, dict]] | None = None) -> dict:
    """Run ``methods`` on ``dataset`` with ``model`` for each seed.

    Starting weights (Original's and Retrain's; every other method starts from Original): a fresh
    initialisation per seed by default; ``init_checkpoint``, a state dict of the chosen architecture
    (see :func:`ppu_fast.pretrain.load_checkpoint_into`; a head for another number of classes is
    re-initialised); or ``pretrain="cifar10-other"``, a model pre-trained on the CIFAR-10 classes the
    dataset does not use (:func:`ppu_fast.data.other_classes_dataset`; ``pretrain_per_class`` images
    per class, default all; ``pretrain_train`` overrides fields of
    :func:`ppu_fast.pretrain.pretrain_config`), cached like the other trained models, with a fresh
    head per seed. ``config["init"]`` records which: ``"scratch"``, ``"cifar10-other"`` or
    ``"sha256:<hex>"`` of the checkpoint file.

    ``train_per_class`` / ``test_per_class`` reduce a large-scale dataset to that many training /
    test images per class (:func:`ppu_fast.data.make_split`; recorded in ``config["split"]``).

    ``train`` overrides fields of :func:`default_train_config`; ``method_kwargs`` maps a method name
    to extra options for :func:`ppu_fast.unlearn`. ``variants`` maps further row names to
    ``(registered method, options)``, so that one method runs several times on the same original
    model under names of its own, e.g. ``{"ppu[lam=0.5]": ("ppu", {"lam": 0.5})}`` (the λ sweep,
    :func:`lam_variants`); list those names in ``methods``. ``log`` receives one line per step (None: silent).
    Returns ``{"config": ..., "per_seed": [{method: metrics}], "history": {method: epochs of the
    first seed}, "histories": {method: [{"seed", "selected_epoch", "history"} per seed]}}``, metrics as
    in :func:`evaluate` plus ``seconds`` and ``retrain_gap`` (:func:`ppu_fast.metrics.retrain_gap`
    against the same seed's Retrain; NaN without one). ``histories`` lists only the seeds where the
    method kept a per-epoch history (PPU's bias mode keeps each epoch's loss and wall time, its
    errors only with ``history=True``), and those
    may differ in length (PPU's "fast" schedule stops early).
    """
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Iterable):
        raise TypeError(f"methods: expected a sequence of method names (e.g. ['retrain', 'ppu']), "
                        f"got {methods!r}")
    methods = list(methods)
    cache, progress = check_flag(cache, "cache"), check_flag(progress, "progress")
    variants = dict(variants or {})
    for name, spec in variants.items():
        if name in registered():
            raise ValueError(f"variants: '{name}' is a registered method's name; give the variant its own")
        if not (isinstance(spec, tuple) and len(spec) == 2 and spec[0] in registered()
                and isinstance(spec[1], dict)):
            raise ValueError(f"variants['{name}'] must be (registered method, options dict), got {spec!r}")
    repeated = sorted({m for m in methods if list(methods).count(m) > 1})
    if repeated:
        # A repeat would run the method twice and keep only the second row, with two histories
        # for one seed (the command line drops repeats itself, as it expands "all").
        raise ValueError(f"methods: {list(methods)} repeats {', '.join(map(repr, repeated))}; "
                         f"expected distinct method names")
    method_of = {m: variants[m][0] if m in variants else m for m in methods}
    unknown = [m for m in methods if method_of[m] not in registered()]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(registered())}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds: expected a sequence of integers (e.g. [0, 1, 2] or "
                        f"np.arange(3)), got {seeds!r}")
    seeds = list(seeds)  # a numpy array, a range or a generator too
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    bad = [s for s in seeds if isinstance(s, (bool, np.bool_))
           or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < 2 ** 32]
    if bad:
        raise ValueError(f"seeds: {bad[0]!r} is not a seed; expected integers in [0, 2**32 - 1] "
                         f"(what torch.manual_seed and numpy accept)")
    seeds = [int(s) for s in seeds]  # np.int64 seeds reach random.Random, which refuses them
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: {list(seeds)} repeats a seed; expected distinct seeds (each is one "
                         f"independent run: a repeat would count one run twice in the standard error)")
    if not methods:
        raise ValueError("methods: none named; expected at least one method name")
    method_kwargs = dict(method_kwargs or {})
    idle = sorted(set(method_kwargs) - set(methods))
    if idle:
        # They would be dropped, yet recorded in config["method_options"].
        raise ValueError(f"method_kwargs: {', '.join(map(repr, idle))} not in methods "
                         f"{list(methods)}; expected options for listed methods only")
    idle = sorted(set(variants) - set(methods))
    if idle:
        # A variant runs only as a listed row: one left out would be dropped without a word.
        raise ValueError(f"variants: {', '.join(map(repr, idle))} not in methods {list(methods)}; "
                         f"list the variants to run in methods")
    for name, kw in method_kwargs.items():
        if not isinstance(kw, dict):
            raise TypeError(f"method_kwargs['{name}']: expected a dict of the method's options "
                            f"(e.g. {{'epochs': 5}}), got {type(kw).__name__}")
    for name, kw in [*method_kwargs.items(), *((n, v[1]) for n, v in variants.items())]:
        _check_method_options(variants[name][0] if name in variants else name, name, kw)
    if log is not None and not callable(log):
        raise TypeError(f"log: expected a callable taking one line (e.g. print) or None, got "
                        f"{type(log).__name__}")
    if pretrain is None:
        for arg, value in (("pretrain_train", pretrain_train), ("pretrain_per_class", pretrain_per_class)):
            if value is not None:
                raise ValueError(f"{arg}: only with pretrain (it sets how the pre-training runs)")
    if train is not None and "seed" in train:
        raise ValueError("train: 'seed' is set per run by seeds (a fixed one would shuffle every seed "
                         "alike); expected the other fields of TrainConfig")
    # The training configurations before any work (a bad field cost the pre-training first).
    try:
        # The first seed's: the methods' checks below take Retrain's recipe from it.
        tcfg = dataclasses.replace(default_train_config(dataset, seeds[0]), **(train or {}))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"train: {exc}") from None
    try:
        pcfg = pretrain_config(**(pretrain_train or {})) if pretrain is not None else None
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"pretrain_train: {exc}") from None
    check_model(model, width)
    if pretrain in PRETRAIN_CHOICES:
        check_other_classes(dataset)
    if pretrain_per_class is not None and (not is_int(pretrain_per_class) or pretrain_per_class < 1):
        raise ValueError(f"pretrain_per_class: expected a positive integer, got {pretrain_per_class!r}")
    say = log or (lambda *_: None)
    dev = available_device(device) if device else torch.device("cpu")
    if any(_refines(method_of[m]) for m in methods):
        check_environment(dev)  # read by PPU's refine, after the methods before it trained
    # Before any pre-training: a refused reduction should not cost its minutes first.
    check_reduction(dataset, train_per_class, test_per_class)
    if init_checkpoint is not None and pretrain is not None:
        raise ValueError("init_checkpoint, pretrain: pass one of them (both set the starting weights)")
    if pretrain is not None and pretrain not in PRETRAIN_CHOICES:
        raise ValueError(f"pretrain: unknown '{pretrain}'; expected one of {', '.join(PRETRAIN_CHOICES)}")
    init_name, init_info, checkpoint, pretrained = "scratch", {}, None, None
    if init_checkpoint is not None:
        checkpoint, digest = read_checkpoint(init_checkpoint, arg="init_checkpoint (--init-checkpoint)")
        # Another architecture is refused here, before a split's images are decoded (a minute for
        # CIFAR-10): everything but the head must match, which any class count shows (the head
        # may differ; the per-seed load below settles it).
        channels = dataset_channels(dataset)
        load_checkpoint_into(build_model(model, 2, channels, width), checkpoint,
                             arg="init_checkpoint (--init-checkpoint)", source=f"'{init_checkpoint}'",
                             what=f"{model} (width {width:g}, {channels} input channel(s))")
        init_name = f"sha256:{digest}"
        init_info = {"init_checkpoint": str(init_checkpoint)}

    def split_of(seed: int) -> Split:
        split = make_split(dataset, data_root=data_root, scenario=scenario, forget_class=forget_class,
                           num_forget=num_forget, seed=seed, progress=progress,
                           train_per_class=train_per_class, test_per_class=test_per_class)
        # Every method's row ends in the membership attack: refuse a split it cannot score. Its
        # non-members are the test images of the forget set's classes.
        test_same = restrict_to_classes(split.test, split.forget_classes)
        if min(len(split.forget), len(test_same)) < MIA_MIN_PER_SIDE:
            raise ValueError(f"the split: {len(split.forget)} forget and {len(test_same)} test "
                             f"examples of the forget classes; the membership attack every row "
                             f"reports needs at least {MIA_MIN_PER_SIDE} of each (num_forget / "
                             f"--num-forget, or more images of the forget class: train_per_class / "
                             f"--train-per-class, test_per_class / --test-per-class)")
        return split

    # The first seed's split before any pre-training: its refusals (forget_class, num_forget, the
    # attack's minimum) should not cost the pre-training's minutes first.
    first_split = split_of(seeds[0])
    # What each method would refuse when it ran (its setting, presets and option combinations, a
    # composite's steps, the module names it trains or resets), before any training: with the
    # options the loop below passes it and the architecture, untrained, that it will get.
    with torch.random.fork_rng(devices=[]):
        probe = build_model(model, first_split.num_classes, first_split.in_channels, width)
    for name in methods:
        kw = runner_options(method_of[name], {**(variants[name][1] if name in variants else {}),
                                              **method_kwargs.get(name, {})},
                            config=tcfg, init=probe, cache=cache)
        try:
            check_plan(method_of[name], kw, first_split.forget, first_split.retain,
                       first_split.val, probe)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"method '{name}': {exc}") from None
    if pretrain is not None:
        other, classes = other_classes_dataset(dataset, data_root=data_root, per_class=pretrain_per_class,
                                               progress=progress)
        torch.manual_seed(pcfg.seed)
        base = build_model(model, len(classes), other.num_channels, width).to(dev)
        net, meta = fit_cached(base, other, pcfg, device=dev, progress=progress, desc="pretrain", cache=cache)
        pretrained = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        init_name = pretrain
        init_info = {"pretrain": {"classes": classes, "images": len(other), "per_class": pretrain_per_class,
                                  "train": dataclasses.asdict(pcfg),
                                  "train_seconds": round(meta["train_seconds"], 2)}}
        say(f"pre-trained on CIFAR-10 classes {classes} ({len(other)} images): "
            f"{'loaded from cache' if meta['cached'] else 'trained'} ({meta['train_seconds']:.1f} s to train)")
    warm_up()
    per_seed, history = [], {}
    histories: dict[str, list[dict]] = {}
    used: dict[str, dict] = {}  # each method's options as it ran them, defaults included
    config: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for seed in seeds:
        split = first_split if seed == seeds[0] else split_of(seed)
        first_split = None  # the loop holds it now
        tcfg = dataclasses.replace(default_train_config(dataset, seed), **(train or {}))
        torch.manual_seed(seed)
        init = build_model(model, split.num_classes, split.in_channels, width)
        if checkpoint is not None:
            init_info["init_head"] = load_checkpoint_into(
                init, checkpoint, arg="init_checkpoint (--init-checkpoint)", source=f"'{init_checkpoint}'",
                what=f"{model} (width {width:g}, {split.in_channels} input channel(s), "
                     f"{split.num_classes} classes)")
        elif pretrained is not None:
            transfer_body(init, pretrained)
            init_info["init_head"] = "re-initialised"
        init = init.to(dev)
        original, meta = fit_cached(init, split.train, tcfg, device=dev, progress=progress,
                                    desc="original", cache=cache)
        say(f"[seed {seed}] original model: {'loaded from cache' if meta['cached'] else 'trained'} "
            f"({meta['train_seconds']:.1f} s to train)")
        config = {"dataset": dataset, "model": model, "width": width, "scenario": split.scenario,
                  "seeds": list(seeds), "num_seeds": len(seeds), "init": init_name, **init_info,
                  "methods": list(methods), "device": str(dev),
                  "split": {k: v for k, v in split.describe().items() if k != "seed"},
                  "train": {k: v for k, v in dataclasses.asdict(tcfg).items() if k != "seed"},
                  "method_options": {k: {o: str(v) for o, v in kw.items()}
                                     for k, kw in method_kwargs.items()}}
        if variants:
            config["variants"] = {k: {"method": m, **{o: str(v) for o, v in kw.items()}}
                                  for k, (m, kw) in variants.items() if k in methods}
        rows = {}
        # The tables' and the verdict's names here too (ids are what --methods takes).
        width_of_label = max([10] + [len(label(n)) for n in methods])
        for name in methods:
            method = method_of[name]
            kw = {**(variants[name][1] if name in variants else {}), **method_kwargs.get(name, {})}
            given = dict(kw)
            kw = runner_options(method, kw, config=tcfg, init=init, cache=cache)
            # Every method gets val: PPU and SCRUB+R select epochs with it, the others ignore it.
            val = split.val
            t0 = time.perf_counter()
            try:
                res = unlearn(original, split.forget, split.retain, method=method, val=val, seed=seed,
                              device=dev, progress=progress, **kw)
            except JacobianTooLarge as exc:
                # A size refusal (NTK on a model too large for its Jacobian) should not cost the
                # other methods' results: the method is left out of this seed, and config says why.
                # The method's advice names its own option; a run passes it in method_kwargs,
                # and from the command line only the run's sizes can change.
                reason = (f"{exc.size}, over max_jacobian_gib={exc.limit:g}; NTK forgetting is "
                          f"for small scale: fewer training examples (--train-per-class) or a "
                          f"narrower model (--width), or method_kwargs={{'ntk': "
                          f"{{'max_jacobian_gib': ...}}}}" if hasattr(exc, "size") else str(exc))
                skipped[name] = reason
                say(f"[seed {seed}] {label(name):<{width_of_label}} skipped: {reason}")
                continue
            seconds = res.timings.get("train", time.perf_counter() - t0) if method == "retrain" \
                else res.timings["total"]
            row = evaluate(res.model, split, seed=seed, device=dev)
            row["seconds"] = seconds
            if method == "retrain":
                # Its seconds then are the time recorded when it was trained, by another run.
                row["cached"] = bool(res.options.get("cached"))
            if res.history:
                row["selected_epoch"] = res.selected_epoch
                if seed == seeds[0]:
                    history[name] = res.history
                histories.setdefault(name, []).append(
                    {"seed": seed, "selected_epoch": res.selected_epoch, "history": res.history})
            rows[name] = row
            used.setdefault(name, options_record(method, given, res.options))
            say(f"[seed {seed}] {label(name):<{width_of_label}} test {row['test_error']:6.2f}  retain {row['retain_error']:6.2f}  "
                f"forget {row['forget_error']:6.2f}  MIA {row['mia']:6.2f}  AUC {row['mia_auc']:6.2f}  "
                f"TPR@1%FPR {row['mia_tpr_at_1fpr']:6.2f}  ({seconds:.1f} s)")
        # Per seed, against this seed's Retrain: the same split and starting weights on both sides.
        rows = add_retrain_gaps(rows)
        if "retrain" in rows:
            say(f"[seed {seed}] retrain gap (mean |difference| to Retrain over test, retain, forget error "
                f"and MIA): " + ", ".join(f"{label(n)} {r['retrain_gap']:.2f}" for n, r in rows.items()))
        per_seed.append(rows)
    if skipped:
        config["skipped"] = skipped
    config["method_options_used"] = used
    return {"config": config, "per_seed": per_seed, "history": history, "histories": histories}


def runner_options(method: str, kw: dict, *, config: TrainConfig, init: nn.Module,
                   cache: bool) -> dict:
    """``kw`` with what the runner passes ``method`` besides: Retrain the original's recipe
    ``config``, starting weights ``init`` and ``cache``; EU-k and NTK ``init`` (SCRUB's EU-k puts
    the block back to the weights the original's training started from; its NTK scale, the
    trapezium trick, measures the distance from them). The caller's options win."""
    if method == "retrain":
        # Same initial weights and recipe as the original: only the data differs.
        return {"config": config, "init": init, "cache": cache, **kw}
    if method in ("eu-k", "ntk"):
        return {"init": init, **kw}
    return dict(kw)


def options_record(method: str, given: dict, reported: dict | None = None) -> dict:
    """The options ``method`` ran with, as results.json records them (``method_options_used``):
    each option of ``method_options(method)`` as given, else its default, and where that is None
    (resolved at run time, e.g. from SCRUB's presets for the ``setting``) the value the method
    reports having used (``UnlearnResult.options``, whose other entries are outcomes, such as the
    epochs PPU ran, and are left out). As short strings (a tensor as its shape). Two runs whose
    records differ ran different methods under one name, e.g. across a version that changed a
    default or a preset, even when both were given the same flags."""
    def short(v):
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}"
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        return str(v)
    reported = reported or {}
    out = {}
    for k, default in method_options(method).items():
        v = given.get(k, default)
        # SCRUB+R's rewind="scrub" is an alias, resolved per setting: the rule that ran is recorded.
        if (v is None or k == "rewind") and k in reported:
            v = reported[k]
        out[k] = short(v)
    return out
