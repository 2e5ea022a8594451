"""The collectives of a sharded solve (``ppu_fast.sharded``) over a ``torch.distributed``
process group, and their single-process stand-ins (``group=None``)."""

from __future__ import annotations

import builtins
from typing import Callable, Dict, Optional, Tuple

import torch


class Comm:
    """The collectives a sharded solve needs, over a ``torch.distributed`` process group, or
    trivial ones for a single process (``group=None``). Sums travel as one float64 tensor per
    call: on the current CUDA device for an NCCL group, on the CPU otherwise."""

    def __init__(self, group=None) -> None:
        self.group = group
        self.rank, self.size = 0, 1
        self.device = torch.device("cpu")
        if group is not None:
            import torch.distributed as dist
            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("process_group: torch.distributed is not initialised; call "
                                 "torch.distributed.init_process_group first (or pass None)")
            if not isinstance(group, dist.ProcessGroup):
                raise TypeError(f"process_group: expected a torch.distributed ProcessGroup "
                                f"(e.g. torch.distributed.group.WORLD) or None, got "
                                f"{type(group).__name__} {group!r}")
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)
            if dist.get_backend(group) == "nccl":
                self.device = torch.device("cuda", torch.cuda.current_device())

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if self.group is None:
            return t.cpu()
        import torch.distributed as dist
        buf = t.to(self.device, torch.float64).contiguous()
        dist.all_reduce(buf, op=getattr(dist.ReduceOp, op), group=self.group)
        return buf.cpu()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks (float64, on the CPU)."""
        return self._reduce(t, "SUM")

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the ranks (float64, on the CPU)."""
        return self._reduce(t, "MAX")

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.group is None:
            return [obj]
        import torch.distributed as dist
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def where(self) -> str:
        """' on rank r' in a sharded solve, '' otherwise (for error messages)."""
        return "" if self.group is None else f" on rank {self.rank}"

def global_rows(comm: Comm, n_local: int, k: int, name: str) -> Tuple[int, int]:
    """(global N, this rank's first global row); checks that every rank has the same k."""
    counts = comm.gather((int(n_local), int(k)))
    ks = sorted({kk for _, kk in counts})
    if len(ks) > 1:
        per = ", ".join(f"rank {r}: k = {kk}" for r, (_, kk) in enumerate(counts))
        raise ValueError(f"{name}: the ranks disagree on the number of classes ({per}); expected "
                         f"the same k on every rank")
    rows = [c for c, _ in counts]
    return sum(rows), sum(rows[:comm.rank])


def collective_checks(comm: Comm, fn: Callable[[], object],
                      agree: Optional[Callable[[object], Dict[str, object]]] = None):
    """Run ``fn`` (input checks of this rank) and raise on every rank if it failed on any, so that
    a bad argument on one rank never leaves the others waiting in a collective. Any exception
    counts (a PermissionError or an OverflowError as much as a ValueError); the error keeps its
    type where that is a built-in one (RuntimeError otherwise) and names the rank it came from.

    ``agree``: a function of ``fn``'s result giving ``{argument: value}`` for the options every
    rank must pass alike (compared with ``==``, in the same collective); a difference raises a
    ValueError on every rank naming the argument and each rank's value. Keys starting with "_"
    are gathered, not compared. With ``agree``, returns ``(result, [every rank's dict])``.
    """
    if comm.group is None:
        result = fn()
        return (result, [agree(result)]) if agree is not None else result
    msg, result, mine = None, None, None
    try:
        result = fn()
        mine = agree(result) if agree is not None else None
    except Exception as exc:  # whatever it is, the other ranks must hear of it
        msg = (f"{exc} [on rank {comm.rank}]", type(exc).__name__)
    got = comm.gather((msg, mine))
    for m, _ in got:
        if m is not None:
            raise _builtin_exception(m[1], m[0])
    if agree is None:
        return result
    every = [d for _, d in got]
    for key in mine:
        if key.startswith("_"):
            continue
        values = [d.get(key) for d in every]
        if any(v != values[0] for v in values[1:]):
            per = ", ".join(f"rank {r}: {_show(v)}" for r, v in enumerate(values))
            raise ValueError(f"{key}: the ranks disagree ({per}); expected the same value on "
                             f"every rank")
    return result, every


def _builtin_exception(name: str, message: str) -> Exception:
    """``message`` as the built-in exception called ``name``, or a RuntimeError where there is
    none (a library's class may not be importable, or constructible from a message, on every
    rank) or it takes other arguments (UnicodeDecodeError)."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:
            pass
    return RuntimeError(message)


def _show(value) -> str:
    """A short printable form of an option's value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
