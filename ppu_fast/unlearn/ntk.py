"""NTK forgetting (Golatkar, Achille, Soatto 2020, "Forgetting Outside the Box"), as SCRUB's code runs
it at small scale: linearise the trained network around its weights, solve the two kernel ridge
regressions (all data, retain data only) in closed form and move the weights by the difference of
their solutions, rescaled by the "trapezium trick". Small scale only: it holds the full Jacobian of
the outputs over the training set, (N * k) x P numbers, and refuses when that exceeds a memory cap.

SCRUB's small_scale_unlearning.ipynb, section "NTK based Forgetting":

- ``delta_w_utils`` ("NTK Update"): per example and class the gradient of the output logit, in eval
  mode, at the *trained* model (the cell passes ``model``, not the ``model_init`` it loads just
  before), and the residual ``softmax(f(x)) - onehot(y)`` (``lossfn == 'ce'``) or ``f(x) - y``
  (``'mse'``);
- "w_lin(D)" and "w_lin(D_r)": ``w = -G (G^T G + n * weight_decay * I)^-1 (f0 - y)`` over all
  training data and over the retain data, with ``n`` the number of examples in each and
  ``weight_decay`` the original's training weight decay (0.1 at small scale);
- "Scrubbing Direction": ``delta_w = w_retain - w_complete``;
- "Trapezium Trick": the scale from the angle between ``delta_w`` and
  ``w(D) - w_init - w_retain`` (:func:`predicted_scale`);
- "Scrub using NTK": ``w(D) + scale * delta_w``. This is the notebook's "NTK" row; the notebook
  estimates the Fisher of a copy of it (``model_scrubf``) but never adds Fisher noise to it, so
  there is no NTK-Fisher combination in the numbers SCRUB reports, and none here.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..caller_state import check_positive_int, is_real
from ..models import matching_entry
from . import UnlearnResult, register
from ._common import resolve_device, working_copy
from ._loop import loader

LOSSES = ("ce", "mse")


class JacobianTooLarge(ValueError):
    """NTK forgetting refused: its Jacobian and kernel would exceed ``max_jacobian_gib``. A
    ``ValueError``, so callers may catch either; the experiment runner catches this one to skip the
    method with a logged reason rather than lose a whole run."""
# Rows of the (float64) kernel computed at once: a block is (rows x P) doubles on each side.
_BLOCK = 1024


def jacobian_gib(n_examples: int, n_classes: int, n_params: int, itemsize: int = 4) -> float:
    """GiB that NTK forgetting holds at once: the Jacobian of ``n_classes`` outputs over ``n_examples``
    examples with respect to ``n_params`` parameters at ``itemsize`` bytes a number, plus its
    (N * k) x (N * k) float64 kernel twice (the kernel and the copy that the solve factorises)."""
    rows = n_examples * n_classes
    return (rows * n_params * itemsize + 2 * rows * rows * 8) / 2**30


def output_jacobian(model: nn.Module, data: Dataset, *, device: torch.device, chunk: int = 16,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SCRUB's ``delta_w_utils`` without its one-example loop: the Jacobian of the logits with respect
    to every parameter (``model.named_parameters()`` order, each flattened), in eval mode.

    Returns ``(J, logits, labels)``: ``J`` (N * k, P), row ``i * k + c`` the gradient of example i's
    logit c (SCRUB's column order of ``G``), in the parameters' dtype; ``logits`` (N, k); ``labels``
    (N,). Per-example Jacobians come from ``torch.func`` (``vmap`` over ``jacrev``) in chunks of
    ``chunk`` examples."""
    from torch.func import functional_call, jacrev, vmap
    from tqdm.auto import tqdm

    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    n_params = sum(v.numel() for v in params.values())

    def logits_one(p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)

    per_example = vmap(jacrev(logits_one), in_dims=(None, 0))
    blocks, outs, labels = [], [], []
    for x, y in tqdm(loader(data, chunk, 0, shuffle=False), desc="ntk jacobian", disable=not progress,
                     leave=False):
        x = x.to(device)
        with torch.no_grad():
            out = model(x)
        jac = per_example(params, x)
        b, k = out.shape
        blocks.append(torch.cat([jac[name].reshape(b, k, -1) for name in params], dim=2)
                      .reshape(b * k, n_params))
        outs.append(out)
        labels.append(torch.as_tensor(y, device="cpu").to(device))
    return torch.cat(blocks), torch.cat(outs), torch.cat(labels)


def residuals(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """SCRUB's ``f0_minus_y`` flattened to (N * k,) float64: ``softmax(logits) - onehot(labels)``
    for ``"ce"``, ``logits - onehot(labels)`` for ``"mse"`` (SCRUB's mse branch subtracts
    ``2 * y - 1`` from its single binary output; one-hot is the k-output analogue)."""
    k = logits.shape[1]
    onehot = F.one_hot(labels.long(), k).to(torch.float64)
    out = logits.to(torch.float64)
    pred = torch.softmax(out, dim=1) if loss == "ce" else out
    return (pred - onehot).reshape(-1)


def _gram(J: torch.Tensor) -> torch.Tensor:
    """``J J^T`` in float64, by blocks, so that only a block of J is ever held in float64."""
    m = J.shape[0]
    K = torch.empty(m, m, dtype=torch.float64, device=J.device)
    for i in range(0, m, _BLOCK):
        a = J[i:i + _BLOCK].to(torch.float64)
        for j in range(0, m, _BLOCK):
            K[i:i + _BLOCK, j:j + _BLOCK] = a @ J[j:j + _BLOCK].to(torch.float64).T
    return K


def _transpose_times(J: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``J^T a`` (P,) in float64, by blocks of rows."""
    out = torch.zeros(J.shape[1], dtype=torch.float64, device=J.device)
    for i in range(0, J.shape[0], _BLOCK):
        out += J[i:i + _BLOCK].to(torch.float64).T @ a[i:i + _BLOCK]
    return out


def ntk_directions(J: torch.Tensor, r: torch.Tensor, n_retain_rows: int, *, n_total: int, n_retain: int,
                   weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SCRUB's "w_lin(D)" and "w_lin(D_r)" cells: with ``J`` (M, P) the Jacobian rows, retain rows
    first (``n_retain_rows`` of them), and ``r`` (M,) the residuals,

        w_complete = -J^T   (J J^T     + n_total  * weight_decay * I)^-1 r
        w_retain   = -J_r^T (J_r J_r^T + n_retain * weight_decay * I)^-1 r_r

    both (P,) float64: the minimisers of the linearised squared residual plus ``n * weight_decay *
    ||w||^2`` on all data and on the retain data. SCRUB inverts the kernel with ``np.linalg.inv``; a
    linear solve gives the same vectors with less rounding."""
    K = _gram(J)
    eye = torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
    a = torch.linalg.solve(K + n_total * weight_decay * eye, r)
    w_complete = -_transpose_times(J, a)
    m = n_retain_rows
    a_r = torch.linalg.solve(K[:m, :m] + n_retain * weight_decay * eye[:m, :m], r[:m])
    w_retain = -_transpose_times(J[:m], a_r)
    return w_complete, w_retain


def predicted_scale(delta_w: torch.Tensor, m_pred_error: torch.Tensor) -> float:
    """SCRUB's "Trapezium Trick": with ``c`` the cosine between ``delta_w`` and ``m_pred_error``
    (``w(D) - w_init - w_retain``, how far the linear prediction of the retained model is from the
    trained weights), the predicted length of the real scrubbing step is ``|delta_w| + 2 cos(a) |m|``
    with ``a = arccos(c)`` when ``c >= 0`` and ``|delta_w| + 2 sin(a) |m|`` with
    ``a = arccos(c) - pi / 2`` when ``c < 0``; the scale is that length over ``|delta_w|``
    (1 when ``delta_w`` is zero)."""
    nd, nm = float(delta_w.norm()), float(m_pred_error.norm())
    if nd == 0.0:
        return 1.0
    if nm == 0.0:
        return 1.0
    inner = float(torch.dot(delta_w / nd, m_pred_error / nm).clamp(-1.0, 1.0))
    if inner < 0:
        length = nd + 2 * math.sin(math.acos(inner) - math.pi / 2) * nm
    else:
        length = nd + 2 * math.cos(math.acos(inner)) * nm
    return length / nd


def _flat(model_or_state: nn.Module | dict, names: list[str], like: dict[str, torch.Tensor]) -> torch.Tensor:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out = []
    for name in names:
        v = matching_entry(state, name, like[name])
        out.append(v.detach().reshape(-1).to(like[name].device, torch.float64))
    return torch.cat(out)


def _check_options(*, weight_decay: object, loss: object, scale: object, init: object,
                   max_jacobian_gib: object, chunk: object, need_init: bool = True,
                   model: nn.Module | None = None) -> None:
    """NTK forgetting's option checks (``need_init``: whether a predicted scale without ``init``
    is refused; the experiment runner passes ``init`` itself). With ``model``: that it has
    parameters, and that a predicted scale's ``init`` is of its architecture (checked here, not
    after the Jacobian, which is nearly all of the method's work)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not (is_real(weight_decay) and weight_decay > 0):
        raise ValueError(f"weight_decay must be a positive number (the kernel ridge's weight), got "
                         f"{weight_decay!r}")
    if not (is_real(max_jacobian_gib) and max_jacobian_gib > 0):
        raise ValueError(f"max_jacobian_gib must be a positive number, got {max_jacobian_gib!r}")
    check_positive_int(chunk, "chunk")
    if isinstance(scale, str):
        if scale != "predicted":
            raise ValueError(f"scale must be 'predicted' or a number, got {scale!r}")
        if init is None and need_init:
            raise ValueError("scale='predicted' (SCRUB's trapezium trick) needs init, the weights the "
                             "original's training started from; pass init=... or a numeric scale")
    elif not (is_real(scale) and math.isfinite(scale) and scale >= 0):
        # A negative scale steps against the scrubbing direction (0 is the original model).
        raise ValueError(f"scale must be 'predicted' or a finite number >= 0, got {scale!r}")
    if init is not None and not isinstance(init, (nn.Module, dict)):
        raise TypeError(f"init must be a torch.nn.Module, a state dict or None, got {type(init).__name__}")
    if model is None:
        return
    params = dict(model.named_parameters())
    if not params:
        raise ValueError(f"model: the {type(model).__name__} has no parameters; NTK forgetting "
                         f"moves a model's weights (expected a model with parameters)")
    if scale == "predicted" and init is not None:
        _flat(init, list(params), params)


@register("ntk", check=lambda forget, retain, val, model, **o: _check_options(**o, need_init=False,
                                                                              model=model))
def ntk_forgetting(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                   seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                   progress: bool = True, weight_decay: float = 0.1, loss: str = "ce",
                   scale: float | str = "predicted", init: nn.Module | dict | None = None,
                   max_jacobian_gib: float = 4.0, chunk: int = 16) -> UnlearnResult:
    """NTK forgetting as SCRUB's small_scale_unlearning.ipynb runs it ("NTK based Forgetting": cells
    "NTK Update" ``delta_w_utils``, "w_lin(D)", "w_lin(D_r)", "Scrubbing Direction", "Trapezium
    Trick", "Scrub using NTK"; see the module docstring).

    The Jacobian ``J`` ((N_retain + N_forget) * k, P) of the logits of the trained ``model`` over
    retain and forget sets (:func:`output_jacobian`) and the residuals (:func:`residuals`, ``loss``
    "ce" as SCRUB's runs) give the two kernel ridge solutions of :func:`ntk_directions`; the weights
    move by ``scale * (w_retain - w_complete)``.

    Args:
        weight_decay: the ridge weight per example, SCRUB's ``args.weight_decay``: the original
            model's training weight decay, 0.1 at small scale ("Train the original model").
        loss: "ce" (default, SCRUB's small-scale runs) or "mse".
        scale: "predicted" (SCRUB: :func:`predicted_scale`, which needs ``init``) or a number.
        init: the weights the original model's training started from (a model or state dict of the
            same architecture; SCRUB's ``init_checkpoint``); ``ppu-fast run`` passes them. Only the
            predicted scale uses them.
        max_jacobian_gib: refuse (ValueError) when ``J`` would take more GiB than this: NTK
            forgetting is for small scale.
        chunk: examples per ``torch.func`` Jacobian batch.

    Returns:
        :class:`UnlearnResult`; ``options`` records the scale used, ``jacobian_gib``, ``n_params``
        and ``delta_norm`` (the norm of the unscaled step)."""
    _check_options(weight_decay=weight_decay, loss=loss, scale=scale, init=init,
                   max_jacobian_gib=max_jacobian_gib, chunk=chunk, model=model)
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device).to(dev).eval()
    names = [n for n, _ in work.named_parameters()]
    params = dict(work.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    itemsize = next(iter(params.values())).element_size()
    with torch.no_grad():
        x0 = retain[0][0]
        k = int(work(torch.as_tensor(x0, device="cpu").unsqueeze(0).to(dev)).shape[1])
    n_r, n_f = len(retain), len(forget)
    gib = jacobian_gib(n_r + n_f, k, n_params, itemsize)
    if gib > max_jacobian_gib:
        size = (f"the Jacobian of {n_r + n_f} examples ({n_r} retain + {n_f} forget) x {k} "
                f"classes x {n_params} parameters and its kernel would take {gib:.2f} GiB")
        exc = JacobianTooLarge(
            f"ntk: {size}, over max_jacobian_gib={max_jacobian_gib:g}; NTK forgetting is for small "
            f"scale: use fewer examples or a smaller model, or raise max_jacobian_gib")
        exc.size = size  # the experiment runner, whose callers cannot pass max_jacobian_gib
        exc.limit = float(max_jacobian_gib)
        raise exc

    t0 = time.perf_counter()
    # Retain rows first, as SCRUB's G = [G_r, G_f].
    J, logits, labels = output_jacobian(work, ConcatDataset([retain, forget]), device=dev, chunk=chunk,
                                        progress=progress)
    r = residuals(logits, labels, loss)
    w_complete, w_retain = ntk_directions(J, r, n_r * k, n_total=n_r + n_f, n_retain=n_r,
                                          weight_decay=float(weight_decay))
    del J
    delta_w = w_retain - w_complete
    if scale == "predicted":
        now = torch.cat([params[n].detach().reshape(-1).to(torch.float64) for n in names])
        used = predicted_scale(delta_w, now - _flat(init, names, params) - w_retain)
    else:
        used = float(scale)
    with torch.no_grad():
        offset = 0
        for name in names:
            p = params[name]
            step = delta_w[offset:offset + p.numel()].reshape(p.shape)
            p.add_((used * step).to(p.dtype))
            offset += p.numel()
    work.eval()
    options: dict[str, Any] = {"weight_decay": float(weight_decay), "loss": loss,
                               "scale_rule": "predicted" if scale == "predicted" else "given",
                               "scale": used, "init": "given" if init is not None else None,
                               "max_jacobian_gib": float(max_jacobian_gib), "jacobian_gib": gib,
                               "n_params": n_params, "delta_norm": float(delta_w.norm())}
    return UnlearnResult(work, "ntk", timings={"train": time.perf_counter() - t0}, options=options)
