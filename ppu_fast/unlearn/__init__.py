"""Machine unlearning: PPU and baselines behind one entry point, :func:`unlearn`.

Methods live in a registry, one module each in this package; a module adds itself with
``@register("name")`` on a function ``fn(model, forget, retain, *, val, seed, device, inplace,
progress, **options) -> UnlearnResult``. :func:`unlearn` validates the common arguments, checks the
options against the method's signature and times the call.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ..callable_module import make_callable
from ..caller_state import (check_finite_options, check_flag, check_seed, is_int, is_real,
                            keeps_caller_state)
from ..data import check_map_style, loader_examples
from ..torch_defaults import training_grad_mode
from ..training import resolve_device

_METHODS: dict[str, Callable[..., "UnlearnResult"]] = {}
_COMMON = ("val", "seed", "device", "inplace", "progress")
_CHECKS: dict[str, Callable[..., Any]] = {}


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned model (eval mode).
        method: the registered method that ran: the one asked for, or the variant its options
            chose (``unlearn(method="scrub", select="val")`` runs SCRUB+R: ``"scrub+r"``).
        targets: (N_forget + N_retain, k) fine-tuning targets, forget rows first, each part in the
            order of its dataset (a loader's: by index) (PPU only), on CPU.
        refine_info: the solver's ``RefineInfo`` (PPU privacy mode only).
        history: one dict per fine-tuning epoch (epoch 0 = the starting model), with ``epoch``
            and what the method records: PPU ``loss`` and ``wall_seconds``, and where the history
            is evaluated (``val`` given, or ``history=True``) ``forget_error``, ``val_error`` (on
            the forget classes, with ``val``) and ``retain_error`` (unless ``history_retain=0``,
            which the default "fast" schedule sets when no history is asked for); errors in %.
        selected_epoch: the epoch whose weights ``model`` holds: the last one trained where the
            method selects none, the one its rule chose (PPU, SCRUB+R), 0 where there are no
            epochs (Original, Fisher, NTK); a fraction such as 2.5 when PPU evaluated between
            epochs (``evals_per_epoch``). The returned model holds no gradients (``.grad`` None
            on the parameters trained), as after ``zero_grad(set_to_none=True)``.
        timings: seconds per phase (e.g. ``probabilities``, ``refine``, ``finetune``, ``train``) and
            ``total`` (the whole call, evaluation included).
        options: the method's options as used.
    """

    model: nn.Module
    method: str
    targets: torch.Tensor | None = None
    refine_info: Any = None
    history: list[dict] = field(default_factory=list)
    selected_epoch: float = 0
    timings: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def register(name: str, check: Callable[..., Any] | None = None
             ) -> Callable[[Callable[..., UnlearnResult]], Callable[..., UnlearnResult]]:
    """Decorator that adds an unlearning method to the registry under ``name``; ``check``, called
    as ``check(forget, retain, val, model, **options)`` with every option (defaults filled in)
    and ``model`` an untrained model of the architecture that will be unlearned (or None when
    the caller has none), makes the method's checks of its options before any work: those that
    need no model always, those that read the architecture (module names) when ``model`` is
    given. The method makes them too, first."""
    def deco(fn: Callable[..., UnlearnResult]) -> Callable[..., UnlearnResult]:
        if name in _METHODS:
            raise ValueError(f"unlearning method '{name}' is registered twice")
        _METHODS[name] = fn
        if check is not None:
            _CHECKS[name] = check
        return fn
    return deco


def check_plan(method: str, options: dict[str, Any], forget: Dataset, retain: Dataset,
               val: Dataset | None, model: nn.Module | None = None) -> None:
    """What ``unlearn(model, forget, retain, method=method, val=val, **options)`` would refuse
    before it trained anything: the option checks of :func:`check_option_values`, the ``setting``
    name (``"auto"`` read from the data's labels) and the method's own ``check``; with ``model``
    (its architecture: untrained weights do) also what depends on it, such as the module names
    CF-k and EU-k train and reset. The experiment runner makes them before any training."""
    from ._loop import resolve_setting

    check_option_values(method, options)
    full = {**method_options(method), **options}
    if "setting" in full:
        resolve_setting(full["setting"], forget, retain)
    if method in _CHECKS:
        _CHECKS[method](forget, retain, val, model, **full)


def methods() -> list[str]:
    """Names of the registered unlearning methods."""
    return sorted(_METHODS)


def method_options(name: str) -> dict[str, Any]:
    """The options (keyword -> default) that method ``name`` accepts beyond the common ones: its
    parameters after (model, forget, retain) that a keyword can pass (a method registered without
    the bare ``*`` too)."""
    fn = _get(name)
    params = list(inspect.signature(fn).parameters.values())[3:]
    return {p.name: p.default for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _COMMON}


def check_option_values(method: str, options: dict[str, Any], where: str | None = None) -> None:
    """The checks of ``method``'s ``options`` values that need no data: NaN / inf (named in
    messages after ``where``, default ``unlearn(method=...)``) and the types the method declares.
    ``unlearn`` makes them before anything runs, the experiment runner before any training. An
    option the method does not take is refused first (TypeError)."""
    accepted = method_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"unlearning method '{method}' got unknown option(s) {', '.join(unknown)}; it "
                        f"accepts {', '.join(sorted(accepted)) or 'none'}")
    check_finite_options(options, where or f"unlearn(method={method!r})")
    _check_option_types(_get(method), options, method)


def _check_option_types(fn: Callable[..., UnlearnResult], options: dict[str, Any],
                        method: str) -> None:
    # An option declared ``int`` (epochs, batch sizes, step counts) given as 2.9 would be cut to 2
    # by the method's int() and recorded as 2.9; one declared ``float`` given as True or "0.1"
    # was read by float() as 1.0 or 0.1; one declared ``bool`` given as "no" was truthy: refuse.
    sig = inspect.signature(fn).parameters
    for name, v in options.items():
        ann = sig[name].annotation if name in sig else None
        if v is None:
            continue
        if ann in ("int", "int | None") and not is_int(v):
            raise ValueError(f"unlearn(method={method!r}): {name}={v!r}; expected an integer")
        if ann in ("float", "float | None") and not is_real(v):
            raise ValueError(f"unlearn(method={method!r}): {name}={v!r}; expected a number")
        if ann in ("bool", "bool | None") and not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"unlearn(method={method!r}): {name}={v!r}; expected True or False")


def _get(name: str) -> Callable[..., UnlearnResult]:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; expected one of {', '.join(methods())}")
    return _METHODS[name]


def _as_dataset(data: object, arg: str, allow_none: bool = False) -> Dataset | None:
    if data is None and allow_none:
        return None
    if isinstance(data, DataLoader):
        data = loader_examples(data, arg)
    if not isinstance(data, Dataset):
        raise TypeError(f"{arg} must be a torch Dataset or DataLoader of (x, y) pairs, got "
                        f"{type(data).__name__}")
    check_map_style(data, arg)
    if isinstance(data, (Subset, ConcatDataset)):
        try:
            _sources(data, arg)  # a Subset index out of range is named before data[0] reads it
        except TypeError:
            pass  # a wrapped dataset without len(): nothing to check its indices against
    if len(data) > 0:
        _check_pair(data[0], f"{arg}[0]")
    return data


def _check_output_fits(model: nn.Module, forget: Dataset, retain: Dataset, method: str,
                       val: Dataset | None = None) -> None:
    """One forward pass (eval mode, no grad) on forget's first example: the output must be (1, k)
    logits with k >= 2 and every label of forget and retain in [0, k). A one-output model or a
    label the model has no logit for would otherwise run silently (KL-based methods and PPU) or
    fail deep in torch. Then one pass on the first example of retain (and of val): a split the
    model cannot take (another dtype or shape) is named here, not by torch deep inside a method
    (for val only after the method's work). The model's buffers are put back afterwards, so a
    forward that updates them leaves no trace."""
    from ..caller_state import probe_forward
    from ..data import dataset_targets
    from ..metrics import check_logits
    from ._common import check_labels_fit

    out, _, _ = probe_forward(model, forget[0][0], "forget[0]")
    check_logits(out, 1, floating=True)
    labels = {}
    for data, name in ((forget, "forget"), (retain, "retain")):
        labels[name] = dataset_targets(data)
        _check_targets_match_items(data, labels[name], name)
    for data, where in ((retain, "retain[0]"), (val, "val[0]")):
        if data is not None and len(data) > 0:
            other, _, _ = probe_forward(model, data[0][0], where)
            if tuple(other.shape) != tuple(out.shape):
                raise ValueError(f"model: its output on {where} has shape {tuple(other.shape)} but "
                                 f"{tuple(out.shape)} on forget[0]; expected one (1, k) row of logits "
                                 f"for every example")
    check_labels_fit(torch.cat([labels["forget"], labels["retain"]]), out.shape[1], method)


def _check_targets_match_items(data: Dataset, targets: torch.Tensor, name: str) -> None:
    """A dataset's ``targets`` (:func:`ppu_fast.data.dataset_targets`: read without loading images
    where the dataset has them, for the label checks and the selection rules) against the labels
    its items return, at four spread examples: a wrapper that remaps labels in ``__getitem__`` but
    keeps the original ``targets`` would otherwise be checked and scored on labels it never trains
    on."""
    from ..data import _label

    n = len(data)
    for i in sorted({0, n // 3, (2 * n) // 3, n - 1}):
        item = _label(data[i][1])
        if int(targets[i]) != item:
            raise ValueError(f"{name}: its targets say class {int(targets[i])} for example {i} but the "
                             f"example's label is {item}; expected the dataset's targets attribute to "
                             f"hold the labels its items return")


def _check_pair(item: object, where: str) -> None:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        kind = (f"a {type(item).__name__} of {len(item)} items"
                if isinstance(item, (tuple, list, dict)) else f"a {type(item).__name__}")
        raise ValueError(f"{where} is {kind}; expected an (x, y) pair: the model's input and an "
                         f"integer class label (wrap the dataset to return that pair)")
    y = item[1]
    if isinstance(y, torch.Tensor):
        ok = (y.numel() == 1 and not y.is_floating_point() and not y.is_complex()
              and y.dtype != torch.bool)
    elif hasattr(y, "dtype") and hasattr(y, "size"):  # a numpy array or scalar
        ok = y.size == 1 and y.dtype.kind in "iu"
    else:
        ok = is_int(y)
    if not ok:
        raise ValueError(f"{where}: its label is {y!r}; expected an integer class label")


def _check_disjoint(forget: Dataset, retain: Dataset) -> None:
    # Only Subsets of one base dataset can be compared without looking at the data.
    if forget is retain:
        raise ValueError("forget and retain are the same dataset; the forget set must lie outside "
                         "the retain set")
    for part, whole, a, b in ((forget, retain, "forget", "retain"),
                              (retain, forget, "retain", "forget")):
        if isinstance(part, Subset) and part.dataset is whole and len(part) > 0:
            raise ValueError(f"{a} is a Subset of {b} itself, so they overlap in {len(part)} examples; "
                             f"the forget set must lie outside the retain set")
    if isinstance(forget, Subset) and isinstance(retain, Subset) and forget.dataset is retain.dataset:
        both = set(map(int, forget.indices)) & set(map(int, retain.indices))
        if both:
            raise ValueError(f"forget and retain overlap in {len(both)} examples (e.g. index "
                             f"{min(both)}); the forget set must lie outside the retain set")
    # The general case: Subsets of Subsets, ConcatDatasets, repeated indices, traced to the
    # datasets they index.
    fr, fi = _sources(forget, "forget")
    rr, ri = _sources(retain, "retain")
    for name, ds, roots, idx in (("forget", forget, fr, fi), ("retain", retain, rr, ri)):
        if not isinstance(ds, (Subset, ConcatDataset)):
            continue  # a plain dataset holds each of its examples once
        if len(roots) and roots.min() != roots.max():
            idx = np.unique(roots, return_inverse=True)[1].astype(np.int64) * (
                int(idx.max()) + 1) + idx
        key = np.sort(idx)
        if bool((key[1:] == key[:-1]).any()):
            raise ValueError(f"{name} holds an example more than once (a Subset with repeated "
                             f"indices, or one dataset twice in a ConcatDataset); expected each "
                             f"example once")
    for r in np.intersect1d(np.unique(fr), np.unique(rr), assume_unique=True):
        both = np.intersect1d(fi[fr == r], ri[rr == r], assume_unique=True)
        if both.size:
            raise ValueError(f"forget and retain overlap in {both.size} examples of one dataset "
                             f"they both draw from (e.g. its index {int(both[0])}); the forget set "
                             f"must lie outside the retain set")


def _sources(ds: Dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
    """For each example of ``ds`` in order: (an id of the dataset it is read from, its index
    there), following Subset and ConcatDataset down to the datasets they wrap. A Subset index
    outside its dataset is refused naming ``name`` (forget or retain)."""
    if isinstance(ds, Subset):
        roots, idx = _sources(ds.dataset, name)
        take = np.asarray(ds.indices, dtype=np.int64).reshape(-1)
        out = (take < -len(roots)) | (take >= len(roots))
        if out.any():
            raise IndexError(f"{name}: a Subset's index {int(take[out][0])} is out of range for "
                             f"the {len(roots)} examples of the dataset it indexes; expected "
                             f"indices in [-{len(roots)}, {len(roots)})")
        return roots[take], idx[take]
    if isinstance(ds, ConcatDataset):
        parts = [_sources(d, name) for d in ds.datasets]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    n = len(ds)
    return np.full(n, id(ds), dtype=np.int64), np.arange(n, dtype=np.int64)


@keeps_caller_state(lambda kw: f"unlearn(method={kw.get('method', 'ppu')!r})")
@training_grad_mode
def unlearn(model: nn.Module, forget: Dataset | DataLoader, retain: Dataset | DataLoader, *,
            method: str = "ppu", val: Dataset | DataLoader | None = None, seed: int = 0,
            device: str | torch.device | None = None, inplace: bool = False, progress: bool = True,
            **options: Any) -> UnlearnResult:
    """Make ``model`` forget ``forget`` while keeping what it learned from ``retain``.

    Args:
        model: a trained classifier, (B, C, H, W) -> (B, k) logits; any starting point works, so
            "SCRUB + PPU" is ``unlearn(scrubbed_model, ...)``.
        forget, retain: the two parts of the training set, datasets (or loaders) of ``(x, y)``
            pairs, labels in [0, k); a loader stands for the examples its sampler visits (each
            once), in the order of their indices in its dataset (a random sampler has no fixed
            order; pass a ``Subset`` to fix the order of the forget rows, e.g. for a ``pseudo``
            tensor), its batch size is not used.
        method: a registered method: ``ppu`` (privacy mode), ``ppu-bias`` (bias removal, uniform
            pseudo-probabilities), ``ppu-random`` (bias removal, random ones), ``finetune``,
            ``retrain``, ``original``; see :func:`methods`.
        val: held-out data; PPU's privacy mode selects its epoch with it (see ``select``).
        seed: fixes every random choice (the caller's global random state is restored after
            the call).
        device: where to run (default: the model's device).
        inplace: modify ``model`` itself; by default it is deep-copied and left untouched.
        progress: show tqdm progress bars.
        **options: the method's own options (``method_options(name)`` lists them), e.g. for PPU
            ``mode``, ``pseudo``, ``lam``, ``marginals``, ``epochs``, ``lr``, ``select``.

    Returns:
        :class:`UnlearnResult`. The returned model's parameters keep the caller's
        ``requires_grad`` flags.

    Raises:
        FloatingPointError: the run diverged (the model it ended with has NaN or infinite
            weights; nothing is returned).
    """
    fn = _get(method)
    seed = check_seed(seed)
    inplace, progress = check_flag(inplace, "inplace"), check_flag(progress, "progress")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    resolve_device(model, device)  # a device this machine lacks is refused before any work
    forget = _as_dataset(forget, "forget")
    retain = _as_dataset(retain, "retain")
    val = _as_dataset(val, "val", allow_none=True)
    if len(forget) == 0:
        raise ValueError("forget is empty: there is nothing to unlearn")
    if len(retain) == 0:
        raise ValueError("retain is empty: unlearning needs the data the model should keep")
    _check_disjoint(forget, retain)
    _check_output_fits(model, forget, retain, method, val)
    check_option_values(method, options)
    t0 = time.perf_counter()
    result = fn(model, forget, retain, val=val, seed=seed, device=device, inplace=inplace,
                progress=progress, **options)
    if not isinstance(result, UnlearnResult):
        raise TypeError(f"unlearning method '{method}' returned {type(result).__name__}; a "
                        f"registered method must return an UnlearnResult (e.g. "
                        f"UnlearnResult(model, {method!r}))")
    result.timings["total"] = time.perf_counter() - t0
    if result.method not in _METHODS:
        # A registered function's own label for what it ran stands where it names a registered
        # method (a variant its options chose); otherwise the name it was asked by is the label.
        result.method = method
    return result


# The package is callable as its function: ``ppu_fast.unlearn(model, forget, retain, ...)``
# always works, whatever ``ppu_fast`` exported before the package was imported.
make_callable(__name__)

# The built-in methods register themselves on import.
from . import finetune, original, ppu, retrain  # noqa: E402,F401
from . import bad_teacher, cf_k, composite, eu_k, fisher, neggrad, ntk, scrub  # noqa: E402,F401

__all__ = ["unlearn", "UnlearnResult", "register", "methods", "method_options"]
