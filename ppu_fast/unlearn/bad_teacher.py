"""Bad-T (Chundawat et al. 2023, "bad teaching"): distil into the model from two teachers, the original
model on retain examples and a randomly initialised copy (the incompetent teacher) on forget
examples, with KL at temperature T."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..models import reset_parameters
from . import UnlearnResult, register
from ._common import resolve_device, sample, working_copy
from ._loop import loader, make_optimizer, run_loop


class _Flagged(Dataset):
    """``(x, y, flag)`` items: flag 1 for forget examples, 0 for retain ones."""

    def __init__(self, data: Dataset, flag: int) -> None:
        self.data, self.flag = data, torch.tensor(flag, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple:
        x, y = self.data[i]
        return x, y, self.flag


@register("bad-t")
def bad_teacher(model: nn.Module, forget: Dataset, retain: Dataset, *, val: Dataset | None = None,
                seed: int = 0, device: str | torch.device | None = None, inplace: bool = False,
                progress: bool = True, epochs: int = 1, lr: float = 1e-3, temperature: float = 4.0,
                batch_size: int = 256, retain_fraction: float = 0.3) -> UnlearnResult:
    """Adam at ``lr`` for ``epochs`` over forget plus a seeded ``retain_fraction`` of retain
    (Chundawat et al. distil on 30 % of it); the target of each example is the softmax at
    ``temperature`` of the bad teacher (forget) or of the original model (retain); the loss is
    KL(target || softmax(student / T)), mean over the batch."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 < retain_fraction <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
    dev = resolve_device(model, device)
    work = working_copy(model, inplace, device).to(dev)
    good = copy.deepcopy(work).eval()
    bad = reset_parameters(copy.deepcopy(work), seed).to(dev).eval()
    kept = sample(retain, max(1, int(round(retain_fraction * len(retain)))), seed)
    data = ConcatDataset([_Flagged(forget, 1), _Flagged(kept, 0)])
    batches = loader(data, batch_size, seed)

    def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
        x, _, flag = batch
        with torch.no_grad():
            good_p = F.softmax(good(x) / temperature, dim=1)
            bad_p = F.softmax(bad(x) / temperature, dim=1)
            target = flag[:, None] * bad_p + (1.0 - flag[:, None]) * good_p
        return F.kl_div(F.log_softmax(m(x) / temperature, dim=1), target, reduction="batchmean")

    torch.manual_seed(seed)
    opt = make_optimizer(work.parameters(), "adam", lr)
    t0 = time.perf_counter()
    run_loop(work, lambda epoch: [(batches, loss_fn)], opt, epochs=epochs, device=dev, progress=progress,
             desc="bad-t")
    return UnlearnResult(work, "bad-t", timings={"train": time.perf_counter() - t0},
                         options={"epochs": epochs, "lr": lr, "temperature": temperature,
                                  "batch_size": batch_size, "retain_fraction": retain_fraction})
