"""KL fine-tuning: move a model's weights toward target probabilities (the paper's §4.3)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .training import model_device

SELECT_POLICIES = ("last", "val")


@dataclass
class FinetuneResult:
    """``model``: the selected model. ``history``: one dict per epoch (epoch 0 is the starting model,
    never selected) with the mean ``loss`` and whatever ``evaluate`` returned. ``selected_epoch``: the
    epoch whose weights ``model`` holds. ``seconds``: wall time of the training epochs (evaluation
    excluded)."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    selected_epoch: int = 0
    seconds: float = 0.0


class _Indexed(Dataset):
    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i][0], i


def select_val(history: Sequence[dict]) -> int:
    """SCRUB+R's rewinding rule, the paper's privacy protocol: the epoch (>= 1) whose forget error is
    closest to the validation error on the forget classes; ties go to the earliest."""
    best, best_gap = None, math.inf
    for h in history:
        if h["epoch"] < 1:
            continue
        if "forget_error" not in h or "val_error" not in h:
            raise ValueError("select='val' needs 'forget_error' and 'val_error' in every epoch's "
                             "evaluation (pass evaluate=... that returns both)")
        gap = abs(h["forget_error"] - h["val_error"])
        if gap < best_gap:
            best, best_gap = h["epoch"], gap
    if best is None:
        raise ValueError("select='val' needs at least one epoch")
    return best


def _check(model: object, data: object, targets: object, epochs: int, lr: float, batch_size: int,
           optimizer: str, select: object, forget_mask: object, retain_per_epoch: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a torch Dataset of (x, y) pairs, got {type(data).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError("targets must be a 2-D tensor (N, k) of probabilities")
    if targets.shape[0] != len(data):
        raise ValueError(f"targets has {targets.shape[0]} rows but data has {len(data)} examples")
    if not bool(torch.isfinite(targets).all()) or bool((targets < 0).any()):
        raise ValueError("targets must be finite and non-negative (probabilities)")
    if not bool(torch.allclose(targets.sum(1).double(), torch.ones(len(targets), dtype=torch.float64),
                               atol=1e-3)):
        raise ValueError("targets rows must sum to 1 (probabilities, not logits)")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if not (callable(select) or select in SELECT_POLICIES):
        raise ValueError(f"select must be one of {SELECT_POLICIES} or a callable(history) -> epoch, "
                         f"got {select!r}")
    if retain_per_epoch is not None:
        if forget_mask is None:
            raise ValueError("retain_per_epoch needs forget_mask (which rows are the forget set)")
        if not isinstance(retain_per_epoch, int) or retain_per_epoch < 1:
            raise ValueError(f"retain_per_epoch must be a positive int, got {retain_per_epoch!r}")


def finetune(model: nn.Module, data: Dataset, targets: torch.Tensor, *, epochs: int = 10, lr: float = 0.01,
             optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 64,
             forget_mask: torch.Tensor | np.ndarray | None = None, retain_per_epoch: int | None = None,
             evaluate: Callable[[nn.Module], dict] | None = None,
             select: str | Callable[[list[dict]], int] = "last", seed: int = 0,
             device: str | torch.device | None = None, inplace: bool = False,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` so that ``softmax(model(x_i))`` approaches ``targets[i]``.

    Args:
        model: any classifier mapping (B, C, H, W) to (B, k) logits.
        data: N examples ``(x, y)`` (labels unused), row i paired with ``targets[i]``.
        targets: (N, k) probabilities. Loss: KL(target || softmax(model(x))), mean over the batch.
        epochs, lr, optimizer ("sgd" with ``momentum`` or "adam"), weight_decay, batch_size: the loop.
        forget_mask: (N,) bool, the forget rows; only needed for ``retain_per_epoch``.
        retain_per_epoch: if given, each epoch uses every forget row and this many retain rows drawn
            afresh (a cheaper epoch on large retain sets).
        evaluate: called with the model (eval mode) after every epoch and before the first; the dicts
            it returns make up the history.
        select: ``"last"`` keeps the final weights; ``"val"`` (SCRUB+R's rule, see :func:`select_val`)
            and a callable (history -> epoch) choose among per-epoch checkpoints, kept in memory.
        seed: fixes the shuffling and retain subsampling.
        inplace: train ``model`` itself; by default a deep copy is trained and ``model`` is untouched.

    Returns:
        :class:`FinetuneResult`.
    """
    from tqdm.auto import tqdm

    _check(model, data, targets, epochs, lr, batch_size, optimizer, select, forget_mask, retain_per_epoch)
    if select == "val" and evaluate is None:
        raise ValueError("select='val' needs evaluate=... returning 'forget_error' and 'val_error'")
    work = model if inplace else copy.deepcopy(model)
    device = torch.device(device) if device is not None else model_device(model)
    work.to(device)
    targets = targets.detach().to(device=device, dtype=torch.float32)
    if optimizer == "sgd":
        opt = torch.optim.SGD(work.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(work.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    indexed = _Indexed(data)
    if retain_per_epoch is not None:
        fmask = torch.as_tensor(np.asarray(forget_mask), dtype=torch.bool).view(-1)
        if fmask.shape[0] != len(data):
            raise ValueError(f"forget_mask has {fmask.shape[0]} entries but data has {len(data)}")
        forget_rows, retain_rows = torch.nonzero(fmask).view(-1), torch.nonzero(~fmask).view(-1)

    def run_eval(epoch: int, loss: float) -> dict:
        row = {"epoch": epoch, "loss": loss}
        if evaluate is not None:
            work.eval()
            row.update(evaluate(work))
        return row

    history = [run_eval(0, float("nan"))]
    checkpoints: dict[int, dict] = {}
    seconds = 0.0
    bar = tqdm(range(1, epochs + 1), desc="finetune", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        subset = indexed
        if retain_per_epoch is not None:
            take = retain_rows[torch.randperm(len(retain_rows), generator=gen)[:retain_per_epoch]]
            subset = torch.utils.data.Subset(indexed, torch.cat([forget_rows, take]).tolist())
        work.train()
        loss_sum, n = 0.0, 0
        for x, i in DataLoader(subset, batch_size=batch_size, shuffle=True, generator=gen):
            out = work(x.to(device))
            loss = F.kl_div(F.log_softmax(out, dim=1), targets[i.to(device)], reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(i)
            n += len(i)
        seconds += time.perf_counter() - t0
        if select != "last":
            checkpoints[epoch] = {k: v.detach().clone() for k, v in work.state_dict().items()}
        history.append(run_eval(epoch, loss_sum / n))
        bar.set_postfix(loss=f"{loss_sum / n:.4f}")
    if select == "last":
        chosen = epochs
    else:
        chosen = select_val(history) if select == "val" else int(select(history))
    if chosen not in range(1, epochs + 1):
        raise ValueError(f"select returned epoch {chosen}; expected 1..{epochs}")
    if chosen != epochs:
        work.load_state_dict(checkpoints[chosen])
    work.eval()
    return FinetuneResult(work, history, chosen, seconds)
