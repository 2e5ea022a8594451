"""Building the refinement problem: the forget mask, pseudo-probabilities, row weights and targets M.

Every check here raises a ValueError / TypeError naming the argument, what was wrong (with the
first offending row or class) and what is expected. Nothing passed in is modified. The per-row
checks of the N x k input run inside the backends' ``prepare`` pass (one pass, no N x k
temporaries); :func:`raise_row_error` words what a backend reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .backends.base import (ERR_ALL_NEG_INF, ERR_NEGATIVE, ERR_NONFINITE, ERR_ROWSUM,
                            ROW_SUM_TOL, SUPPORTED_DTYPES, compute_dtype)
from .backends.cpu import empty_buffer

PSEUDO_NAMES = ("uniform", "random", "random-simplex", "prior")
MARGINAL_NAMES = ("retain", "original", "pseudo")
MARGINAL_RTOL = 1e-6

ArrayLike = Union[torch.Tensor, np.ndarray]
# What the public calls accept, as their docstrings describe: the forget rows as a bool mask or
# integer indices; pseudo-probabilities by name, as an (N_forget, k) matrix, or None; the class
# totals by name or as a (k,) vector; the per-row KL weights as an (N,) vector.
ForgetSpec = Union[ArrayLike, Sequence[bool], Sequence[int]]
PseudoSpec = Union[str, ArrayLike, None]
MarginalsSpec = Union[str, ArrayLike, Sequence[float]]
WeightsSpec = Optional[Union[ArrayLike, Sequence[float]]]


def to_tensor(x, name: str, sequence: bool = False) -> Tuple[torch.Tensor, bool]:
    """(tensor, came_from_numpy). Numpy arrays are wrapped without copying; tensors are detached
    (``refine`` produces targets, not a differentiable layer). ``sequence``: also accept a list
    or tuple of numbers (the vector arguments), read as float64."""
    if isinstance(x, torch.Tensor):
        check_dense(x, name)
        return x.detach(), False
    if isinstance(x, np.ndarray):
        return _from_numpy(x, name), True
    if sequence and isinstance(x, (list, tuple)):
        try:
            arr = np.asarray(x)
            # numpy would read '2.5' as 2.5 and drop a complex number's imaginary part.
            if arr.dtype.kind in "USc":
                raise TypeError(f"an entry of type {type(arr.flat[0]).__name__}" if arr.size
                                else "no numbers")
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: a sequence that is not all numbers ({exc})") from None
        except OverflowError:  # a Python int beyond float64, e.g. 10**400
            raise ValueError(f"{name}: an entry is too large for float64 (above ~1.8e308); "
                             f"expected finite numbers") from None
        return torch.from_numpy(arr), False
    what = ("a torch.Tensor, numpy.ndarray or list of numbers" if sequence
            else "a torch.Tensor or numpy.ndarray")
    raise TypeError(f"{name}: expected {what}, got {type(x).__name__}")


def check_dense(t: torch.Tensor, name: str) -> None:
    """Refuse a sparse or meta tensor, naming the argument: they failed later inside torch (for
    a sharded call on their rank alone, after the collective checks, and the other ranks waited
    in the next collective)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name}: a {str(t.layout).replace('torch.', '')} tensor; expected a "
                        f"dense (strided) tensor ({name}.to_dense())")
    if t.device.type == "meta":
        raise ValueError(f"{name}: a meta tensor holds no data; expected a tensor on the CPU or "
                         f"a CUDA device")


def from_numpy_readonly(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` (no copy) without torch's warning for a read-only array
    (np.load(mmap_mode="r")) that writes to it would be undefined: nothing here writes an input.

    A read-only array goes through DLPack, which carries it without the warning. Silencing the
    warning instead (warnings.catch_warnings) swaps the process's warning filters, which every
    thread shares, for the length of the call: that is left for what DLPack refuses (a dtype it
    cannot carry, or a numpy before 2.1 / torch before DLPack 1.0, which cannot mark a
    read-only export), so that torch.from_numpy still views it, or refuses it in its words."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    try:
        return torch.from_dlpack(a)
    except (BufferError, TypeError, ValueError, RuntimeError):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(a)


def unmasked(a: np.ndarray, name: str) -> np.ndarray:
    """A numpy masked array's data when nothing is masked; one with masked entries is refused
    (their values are whatever the data holds, which np.asarray and torch would read silently)."""
    if not isinstance(a, np.ma.MaskedArray):
        return a
    if np.ma.is_masked(a):
        first = np.argwhere(np.ma.getmaskarray(a))[0]
        raise ValueError(f"{name}: a masked array with masked entries (the first at "
                         f"{tuple(int(i) for i in first)}); expected values for every entry "
                         f"({name}.filled(...))")
    return a.data


def _from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    """``torch.from_numpy`` (no copy), its refusals reworded to name the argument."""
    if any(s < 0 for s in a.strides):
        raise ValueError(f"{name}: negative strides (a reversed view such as a[::-1]) are not "
                         f"supported; expected non-negative strides (np.ascontiguousarray({name}))")
    if not a.dtype.isnative:
        raise TypeError(f"{name}: byte order of {a.dtype.str} is not this machine's; expected "
                        f"native byte order ({name}.astype('{a.dtype.newbyteorder('=').name}'))")
    if any(s % a.itemsize for s in a.strides):
        raise ValueError(f"{name}: strides {a.strides} are not multiples of the element size "
                         f"{a.itemsize} (e.g. a field of a structured array); expected an array "
                         f"of whole elements (np.ascontiguousarray({name}))")
    a = unmasked(a, name)
    try:
        return from_numpy_readonly(a)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: numpy dtype {a.dtype} cannot be read ({exc}); expected "
                        f"float16, float32 or float64") from None


INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matrix(x: torch.Tensor, name: str, allow_empty: bool = False) -> Tuple[int, int]:
    """Shape and dtype checks shared by probs, logits and log_p; returns (N, k).
    ``allow_empty``: N == 0 is accepted (one rank's rows of a sharded solve). ``x`` as
    :func:`to_tensor` returned it (which refused a sparse or meta tensor)."""
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D array (N x k), got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point dtype (float16, bfloat16, float32 "
                        f"or float64), got {x.dtype}")
    n, k = x.shape
    if n == 0 and not allow_empty:
        raise ValueError(f"{name}: N == 0 rows; expected at least one row")
    if k == 0:
        raise ValueError(f"{name}: k == 0 classes; expected at least one column")
    return n, k


MASK_HELP = ("pass a bool mask (e.g. mask.bool()) or integer row indices (e.g. "
             "mask.nonzero()[0] / torch.nonzero(mask).flatten())")


def forget_rows(forget_mask, n: int) -> np.ndarray:
    """A bool mask (N,) (numpy) from what a user passes as the rows to forget.

    The rule, chosen so that it cannot be misread: bool tensors / arrays and sequences of bools
    are masks (length N); integer tensors / arrays / sequences are row indices, negative ones
    counting from the end as in Python ([-N, N)); an integer vector whose values are all 0 or 1
    is ambiguous when its length is N or it repeats a value (a 0/1 mask, perhaps of another
    length, or row indices?) and raises a ValueError; so does an integer vector of
    length N that repeats any index (per-row labels, not row indices). Shorter index lists may
    repeat an index (the row is forgotten once), unless ``pseudo`` gives a row per index.
    Built with numpy: torch's CPU ops on N-sized data wake its thread pool.
    """
    return forget_spec(forget_mask, n)[0]


def forget_spec(forget_mask, n: int, name: str = "forget_mask"
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(the bool mask (N,) of :func:`forget_rows`, the row indices as given (int64, negative
    ones made positive) or None when a mask was given); errors name the argument ``name``."""
    if forget_mask is None:
        raise ValueError(f"{name}: required; pass a bool mask (N,) or row indices "
                         "(an empty index list forgets nothing)")
    if isinstance(forget_mask, torch.Tensor):
        check_dense(forget_mask, name)
        fm = forget_mask.detach().cpu().numpy()
    elif isinstance(forget_mask, np.ndarray):
        fm = unmasked(forget_mask, name)
    elif (isinstance(forget_mask, (str, bytes, Mapping))
          or not hasattr(forget_mask, "__len__")):
        # A mapping would be read by its keys alone ({0: False, 3: True} forgot rows 0 and 3).
        raise TypeError(f"{name}: expected a bool mask (N,) or integer row indices (tensor, "
                        f"array or sequence), got {type(forget_mask).__name__}")
    else:
        items = list(forget_mask)
        # bool is an int: one test names an element that is neither (pd.NA, None, 0.5).
        bad = [v for v in items if not isinstance(v, (bool, np.bool_, int, np.integer))][:1]
        if bad:
            raise TypeError(f"{name}: a sequence element is {type(bad[0]).__name__} "
                            f"({bad[0]!r}); " + MASK_HELP)
        if items and all(isinstance(v, (bool, np.bool_)) for v in items):
            fm = np.asarray(items, dtype=bool)
        elif any(isinstance(v, (bool, np.bool_)) for v in items):
            raise TypeError(f"{name}: a sequence mixing bools and integers; " + MASK_HELP)
        else:
            try:
                fm = np.asarray(items, dtype=np.int64)
            except OverflowError:  # a Python int beyond int64 (2**64 - 1, 10**30)
                raise _index_out_of_range(next(int(v) for v in items if not -n <= int(v) < n),
                                          n, name) from None
    if fm.ndim != 1:
        raise ValueError(f"{name}: expected 1-D (a bool mask (N,) or row indices), got shape "
                         f"{tuple(fm.shape)}")
    if fm.dtype == np.bool_:
        if fm.size != n:
            raise ValueError(f"{name}: bool mask has length {fm.size}; expected N = {n}")
        return fm.copy(), None
    if not np.issubdtype(fm.dtype, np.integer):
        raise TypeError(f"{name}: expected bool or integer dtype, got "
                        f"{getattr(forget_mask, 'dtype', fm.dtype)}; " + MASK_HELP)
    if fm.dtype.kind == "u" and fm.size and int(fm.max()) >= n:
        # Checked before the cast to int64, which would wrap 2**64 - 1 to -1 (the last row).
        raise _index_out_of_range(int(fm.max()), n, name)
    fm = fm.astype(np.int64, copy=False)
    if fm.size and int(fm.min()) >= 0 and int(fm.max()) <= 1 and (
            fm.size == n or fm.size > np.unique(fm).size):
        what = (f"of length N = {n}" if fm.size == n else
                f"of length {fm.size} (N = {n}) repeating its values")
        raise ValueError(f"{name}: an integer vector {what} holding only 0 and 1 is "
                         f"ambiguous (a 0/1 mask, or row indices?); " + MASK_HELP)
    if fm.size and (int(fm.min()) < -n or int(fm.max()) >= n):
        raise _index_out_of_range(int(fm[(fm < -n) | (fm >= n)][0]), n, name)
    idx = np.where(fm < 0, fm + n, fm)
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    if fm.size == n and np.count_nonzero(mask) < n:
        # N indices that repeat one are per-row data passed by mistake (class labels, a 0/1/2
        # mask): read as indices, labels 0..k-1 would forget rows 0..k-1 and nothing else. A
        # shorter list may repeat an index (it forgets the row once): that one is unambiguous.
        counts = np.bincount(idx, minlength=n)
        r = int(np.flatnonzero(counts > 1)[0])
        raise ValueError(f"{name}: an integer vector of length N = {n} that repeats row "
                         f"{r} ({int(counts[r])} times) looks like per-row labels or a mask, not "
                         f"row indices; expected a bool mask of length N (e.g. labels == c) or "
                         f"distinct row indices (e.g. np.flatnonzero(labels == c))")
    return mask, idx


def _index_out_of_range(index: int, n: int, name: str = "forget_mask") -> ValueError:
    return ValueError(f"{name}: row index {index} is out of range; expected indices in "
                      f"[-{n}, {n}) (negative ones count from the end, as in Python)")


def check_lam_weights(lam, weights_given: bool) -> float:
    """``lam`` as :func:`check_lam` returns it, refused unless 1 when row weights are given
    (they set every row's c_i; ``lam`` would set the retain rows')."""
    lam = check_lam(lam)
    if weights_given and lam != 1.0:
        raise ValueError(f"weights, lam: pass one of them (weights give every row's c_i; "
                         f"lam = {lam!r} would set the retain rows' weight)")
    return lam


def forget_and_pseudo(forget_mask, n: int, pseudo, name: str = "forget_mask"):
    """(the bool forget mask (N,), ``pseudo``): rows given as a tensor / array follow the order
    of the indices in ``forget_mask`` (``pseudo[j]`` replaces row ``forget_mask[j]``) and are
    returned in row order, the order the solver fills them in; with a bool mask they are in row
    order already. Repeated indices cannot each have their own row and are refused. Errors name
    the argument ``name`` (refine_file's is ``forget``)."""
    if isinstance(forget_mask, (set, frozenset, dict)) and isinstance(pseudo, (torch.Tensor,
                                                                             np.ndarray)):
        raise TypeError(f"{name}: a {type(forget_mask).__name__} has no order to match "
                        f"pseudo's rows to; expected a sequence, tensor or array of row indices "
                        f"(e.g. sorted({name})) or a bool mask")
    mask, idx = forget_spec(forget_mask, n, name)
    if idx is None or not isinstance(pseudo, (torch.Tensor, np.ndarray)) or idx.size < 2:
        return mask, pseudo
    if np.any(idx[1:] <= idx[:-1]):
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        dup = np.flatnonzero(srt[1:] == srt[:-1])
        if dup.size:
            raise ValueError(f"{name}: row {int(srt[dup[0]])} is listed more than once, while "
                             f"pseudo gives one row per index; expected distinct row indices")
        if pseudo.shape[:1] == (idx.size,):
            pseudo = pseudo[torch.from_numpy(order) if isinstance(pseudo, torch.Tensor)
                            else order]
    return mask, pseudo


def as_float(value, name: str) -> float:
    """A Python float from a number a user may pass: int, float, numpy scalar or 0-d tensor
    (bools are refused: ``lam=True`` is a mistake, not 1.0)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype == torch.bool:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} "
                        f"({value!r})")
    return float(value)


def as_int(value, name: str) -> int:
    """A Python int from int, numpy integer or 0-d integer tensor (bools and floats refused)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} ({value!r})")
    return int(value)


# The solver scales the row weights so that the largest 1 / c is 1 (the dual variable then
# shifts the most movable rows by O(1) and the others by less); the smallest 1 / c must then
# stay a normal float32. Weight ratios (and lam) beyond this range are refused.
WEIGHT_RATIO_MAX = 1e30
# Each weight lies within [1 / this, this]: alpha is returned as alpha_solver * min(c), which
# overflowed to -inf at weights of 1e308 and kept only a few digits at 1e-320 (subnormal); within
# 1e+-250 it and the dual value keep float64's range with room for any ratio up to 1e30 (weights
# of 1e+-200 solve as at 1: tests/test_hostile.py).
WEIGHT_ABS_MAX = 1e250


def check_lam(lam) -> float:
    """``lam`` as a float in [1 / WEIGHT_RATIO_MAX, WEIGHT_RATIO_MAX]."""
    lam = as_float(lam, "lam")
    if not (np.isfinite(lam) and 1.0 / WEIGHT_RATIO_MAX <= lam <= WEIGHT_RATIO_MAX):
        raise ValueError(f"lam: expected a finite number in [{1 / WEIGHT_RATIO_MAX:g}, "
                         f"{WEIGHT_RATIO_MAX:g}] (the weight of retain rows relative to forget "
                         f"rows), got {lam!r}")
    return lam


def inv_c_dtype(dtype: torch.dtype) -> type:
    """The numpy dtype of the solver's inverse weights for a buffer of ``dtype``: float32, or
    float64 for a float64 solve (1 / c rounded to float32 would move Q by ~1e-7 |alpha / c|)."""
    return np.float64 if compute_dtype(dtype) == torch.float64 else np.float32


def scaled_inv_weights(c: np.ndarray, dtype: torch.dtype = torch.float32
                       ) -> Tuple[np.ndarray, float]:
    """(1 / c scaled to a largest value of 1, in ``inv_c_dtype(dtype)``; the scale c_min): the
    solver runs on these and its alpha times c_min is the caller's alpha (Q depends on
    alpha_j / c_i only)."""
    c_min = float(c.min())
    return (c_min / c).astype(inv_c_dtype(dtype)), c_min


def row_sum_tol(dtype: torch.dtype) -> float:
    """Tolerance on a probability row's sum: ROW_SUM_TOL, or two ulps of 1 for half dtypes (whose
    rounding alone moves a row sum by more than 1e-3)."""
    return max(ROW_SUM_TOL, 2 * torch.finfo(dtype).eps)


def raise_row_error(error: Optional[Tuple[int, int]], x: torch.Tensor, mode: str, name: str,
                    tol: float, row_offset: int = 0, overwritten: bool = False) -> None:
    """Raise the ValueError for a fault ``(kind, row)`` that ``prepare`` reported (no-op: None).

    ``x`` holds the rows ``prepare`` read; the message names row ``row + row_offset`` (a chunk's
    or a shard's rows are numbered from ``row_offset`` in what the caller passed).
    ``overwritten``: the pass wrote over ``x`` (``out=`` the input), so the message cannot quote
    the offending values and says that the input was partly overwritten."""
    if error is None:
        return
    kind, i0 = error
    i = i0 + row_offset
    lost = ""
    if overwritten:
        x = None
        lost = (f" (out= is the input: the pass has already overwritten part of {name}, this "
                f"row's values included)")
    if kind == ERR_NONFINITE:
        if mode == "log_p":
            raise ValueError(f"{name}: row {i} contains NaN or +Inf{lost}; expected "
                             f"log-probabilities (finite or -inf)")
        what = "probabilities" if mode == "probs" else "logits"
        raise ValueError(f"{name}: row {i} contains NaN or Inf{lost}; expected finite {what}")
    if kind == ERR_NEGATIVE:
        if x is None:
            raise ValueError(f"{name}: row {i} has a negative entry{lost}; expected "
                             f"probabilities >= 0")
        raise ValueError(f"{name}: row {i} has a negative entry ({float(x[i0].min()):.3g}); "
                         f"expected probabilities >= 0")
    if kind == ERR_ROWSUM:
        if x is None:
            raise ValueError(f"{name}: row {i} does not sum to 1{lost}; expected rows on the "
                             f"simplex (sum 1 within {tol:.3g})")
        s = float(x[i0].double().sum())
        raise ValueError(f"{name}: row {i} sums to {s:.6g}; expected rows on the simplex (sum 1 "
                         f"within {tol:.3g})")
    if kind == ERR_ALL_NEG_INF:
        raise ValueError(f"{name}: row {i} is entirely -inf (all probabilities zero){lost}; "
                         f"expected at least one finite entry per row")
    raise RuntimeError(f"{name}: a backend reported unknown fault kind {kind} at row {i}")


def pseudo_log(pseudo, n_forget: int, k: int, generator: Optional[torch.Generator],
               dtype: torch.dtype = torch.float32) -> Tuple[str, Optional[torch.Tensor]]:
    """What the forget rows of log P^ hold, on the CPU in float32 (probabilities passed as a
    tensor: in ``dtype``, the solver's, so that a float64 solve keeps them in float64):

    ("vector", log v (k,)) for "uniform"; ("prior", None) for "prior" (known only after the input
    pass); ("given", None) for None (the input's forget rows already hold P^); ("rows", log rows
    (N_forget x k), each row normalised) for "random" (softmax of standard-normal draws: the
    paper, §5.4, says softmax of "randomly generated numbers" without a distribution; the standard
    normal is ppu_fast's choice), "random-simplex" (uniform(0, 1) draws divided by their sum, as
    the official PPU code does; not uniform on the simplex, which would be Dirichlet(1)) or a
    tensor, which is validated like probabilities.
    """
    if generator is not None and (not isinstance(generator, torch.Generator)
                                  or generator.device.type != "cpu"):
        got = (f"a generator on {generator.device}" if isinstance(generator, torch.Generator)
               else type(generator).__name__)
        raise TypeError(f"generator: expected a CPU torch.Generator (e.g. "
                        f"torch.Generator().manual_seed(0); the pseudo draws are made on the CPU) "
                        f"or None, got {got}")
    if pseudo is None:
        return "given", None
    if isinstance(pseudo, str):
        if pseudo == "uniform":
            return "vector", torch.full((k,), -float(np.log(k)), dtype=torch.float32)
        if pseudo == "random":
            # dtype and device pinned: a caller's torch.set_default_dtype(torch.float64) drew
            # other numbers from the same generator (and bfloat16 quantised them).
            z = torch.randn(n_forget, k, generator=generator, dtype=torch.float32, device="cpu")
            return "rows", torch.log_softmax(z, dim=1)
        if pseudo == "random-simplex":
            u = torch.rand(n_forget, k, generator=generator, dtype=torch.float64, device="cpu")
            return "rows", torch.log(u / u.sum(dim=1, keepdim=True)).float()
        if pseudo == "prior":
            return "prior", None
        raise ValueError(f"pseudo: unknown name {pseudo!r}; expected one of {list(PSEUDO_NAMES)}, "
                         f"None (the input's forget rows are already pseudo-probabilities) or a "
                         f"tensor (N_forget x k) of probabilities")
    t, _ = to_tensor(pseudo, "pseudo")
    if t.shape != (n_forget, k):
        raise ValueError(f"pseudo: shape {tuple(t.shape)}; expected (N_forget, k) = "
                         f"({n_forget}, {k})")
    if not t.is_floating_point():
        raise TypeError(f"pseudo: expected a floating-point dtype, got {t.dtype}")
    t = t.cpu()
    out = torch.empty((n_forget, k), dtype=dtype)
    if n_forget:
        from .backends.torch_ref import reference_prepare
        tol = row_sum_tol(t.dtype)
        got = reference_prepare(t, "probs", None, None, out, tol=tol)
        raise_row_error(got.error, t, "probs", "pseudo", tol)
    return "rows", out


def normalised_row_sums(rows: torch.Tensor, mode: str) -> torch.Tensor:
    """Column sums (k,) float64 on the CPU of ``rows`` (M x k, already validated) as the solver
    reads them: probabilities divided by their row sum, or the softmax of logits."""
    r = rows.double()
    r = torch.softmax(r, dim=1) if mode == "logits" else r / r.sum(dim=1, keepdim=True)
    return r.sum(dim=0).cpu()


def given_row_sums(x: torch.Tensor, mask: torch.Tensor, mode: str
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``pseudo=None`` (the forget rows already hold P^, and prepare sums every row as retained):
    the forget rows' column sums (k,), and the retain rows' too when they are the fewer, else
    None (then the retained share is prepare's total minus the forget rows'). Both float64 on
    the CPU, from a gather of those rows (call before prepare, which may overwrite ``x``).

    A total minus nearly all of it would keep the rounding of the kernels' float32 partial sums
    (about 1e-4 at N = 20,000) against a retained share that may be near 1: with one retained
    row of 20,000 the "retain" targets came out 65 % off, silently."""
    n_forget = int(mask.sum())
    forget = normalised_row_sums(x[mask], mode)
    retain = (normalised_row_sums(x[~mask], mode) if mask.numel() - n_forget < n_forget else None)
    return forget, retain


def column_sums64(t: torch.Tensor, chunk_elems: int = 1 << 20) -> torch.Tensor:
    """Column sums (k,) float64 of ``t`` (N x k, any float dtype), by chunks of rows converted to
    float32 (exactly, from 16 bits): torch's float64 reduction of a bfloat16 matrix took 267 ms
    at 1,000,000 x 100 against 33 ms so, more than the solve of the refine it checked."""
    n, k = t.shape
    rows = max(1, chunk_elems // max(k, 1))
    col = torch.zeros(k, dtype=torch.float64, device=t.device)
    for i in range(0, n, rows):
        c = t[i:i + rows]
        col += (c if c.dtype == torch.float64 else c.float()).sum(0, dtype=torch.float64)
    return col


def retained_share(total: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
    """The retain rows' column sums (k,) as every row's ``total`` minus the forget rows' (a
    gather's exact float64 sums): never below 0. The kernels' float32 partial sums leave the
    total ~1e-7 from exact, and a class the retain rows barely cover came out about -2.6e-7,
    then refused as an infeasible target (cpu, 200 x 100, half of the rows forgotten)."""
    return (total - forget).clamp_min(0.0)


def target_marginals(marginals, colsum_retain: torch.Tensor, colsum_forget: torch.Tensor,
                     n: int, k: int, p_hat_colsum: torch.Tensor) -> torch.Tensor:
    """The class totals M (k,) float64 on the CPU, summing to N (docs/design.md §2).

    ``colsum_retain`` / ``colsum_forget``: column sums of P over the retain / forget rows;
    ``p_hat_colsum``: column sums of P^'s forget rows (the pseudo-probabilities): "pseudo" is P^'s
    own totals, and "retain" falls back to them when nothing is retained. Every kind is scaled
    to sum to N exactly: the rows' sums carry their evaluation's rounding (float32 at k = 5,000
    put "original" 6.8e-5 off N = 200, and a refine at tol 2e-7, above that dtype's floor,
    was refused as infeasible: Q's totals sum to N, so no Q came closer than that gap).
    """
    if isinstance(marginals, str):
        if marginals == "original":
            return _summing_to(colsum_retain + colsum_forget, n)
        if marginals == "pseudo":
            return _summing_to(colsum_retain + p_hat_colsum, n)
        if marginals == "retain":
            n_retain = float(colsum_retain.sum())
            if n_retain < 0.5:
                # Nothing is retained: the retain mix is undefined; keep P^'s own totals.
                return _summing_to(colsum_retain + p_hat_colsum, n)
            return colsum_retain * (n / n_retain)
        check_marginals_arg(marginals, n, k)  # raises: the name is unknown
    return check_marginals(marginals, n, k)


def _summing_to(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (k,) float64 scaled to sum to ``n`` (left as it is when it sums to 0)."""
    s = float(t.sum())
    return t * (n / s) if s > 0 else t


def check_marginals_arg(marginals, n: int, k: int) -> None:
    """Validate ``refine``'s ``marginals`` before any pass over the data: one of MARGINAL_NAMES,
    or class totals as :func:`check_marginals` accepts them."""
    if not isinstance(marginals, str):
        check_marginals(marginals, n, k)
    elif marginals not in MARGINAL_NAMES:
        raise ValueError(f"marginals: unknown name {marginals!r}; expected one of "
                         f"{list(MARGINAL_NAMES)} or a tensor (k,) summing to N")


def real_vector(x, name: str, hint: str = "") -> torch.Tensor:
    """A vector argument (tensor, array or list of numbers) as a CPU tensor, refusing complex
    values (casting would silently drop their imaginary part) and bools (read as 1 / 0: most
    likely a mask passed where numbers belong; ``hint`` says where it goes)."""
    # One bool among numbers too: torch reads [2.0, True] as [2.0, 1.0].
    if isinstance(x, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in x):
        raise TypeError(f"{name}: bool values; expected real numbers{hint}")
    t, _ = to_tensor(x, name, sequence=True)
    if t.is_complex():
        raise TypeError(f"{name}: complex dtype {t.dtype}; expected real numbers")
    if t.dtype == torch.bool:
        raise TypeError(f"{name}: bool values; expected real numbers{hint}")
    return t.detach().cpu()


def check_marginals(marginals, n: int, k: int) -> torch.Tensor:
    """Validate user marginals: (k,), finite, >= 0, summing to N (relative tolerance 1e-6).
    Returns them scaled to sum to N exactly: Q's rows sum to 1, so its column totals sum to N,
    and totals off by the accepted 1e-6 would leave the solver a residual floor of that size."""
    t = real_vector(marginals, "marginals")
    if t.shape != (k,):
        raise ValueError(f"marginals: shape {tuple(t.shape)}; expected ({k},), one total per class")
    t = t.double()
    if not torch.isfinite(t).all():
        i = int(torch.nonzero(~torch.isfinite(t))[0, 0])
        raise ValueError(f"marginals: class {i} is NaN or Inf; expected finite class totals")
    if (t < 0).any():
        i = int(torch.nonzero(t < 0)[0, 0])
        raise ValueError(f"marginals: class {i} is negative ({float(t[i]):.6g}); expected >= 0")
    s = float(t.sum())
    if abs(s - n) > MARGINAL_RTOL * n:
        raise ValueError(f"marginals: sum to {s:.10g}; expected N = {n} (relative tolerance "
                         f"{MARGINAL_RTOL})")
    return _summing_to(t, n)


def check_feasible(support: Union[torch.Tensor, np.ndarray], m: torch.Tensor,
                   name: str = "marginals") -> None:
    """A class with M_k > 0 needs at least one row of P^ with non-zero probability on it
    (``support`` (k,) bool, ``m`` (k,) the targets)."""
    # numpy: torch's dispatch on k-vectors cost more than the check itself in a small refine.
    bad = ~_host_array(support) & (_host_array(m) > 0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: infeasible: class {j} has target total {float(m[j]):.6g} > 0 "
                         f"but every row of P^ gives it probability 0; expected M_k == 0 for such "
                         f"a class, or pseudo-probabilities that give it mass")


def _host_array(t) -> np.ndarray:
    """A k-vector as a numpy array: CPU tensors without a copy, device ones copied."""
    return t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def check_weights(weights, n: int) -> torch.Tensor:
    """Row weights c (N,), positive and finite, with max / min <= WEIGHT_RATIO_MAX -> float64 on
    the CPU."""
    t = real_vector(weights, "weights", " > 0, one per row (the rows to forget go in forget_mask)")
    if t.shape != (n,):
        raise ValueError(f"weights: shape {tuple(t.shape)}; expected ({n},), one weight per row")
    t = t.double()
    bad = ~torch.isfinite(t) | (t <= 0)
    if bad.any():
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"weights: row {i} has weight {float(t[i]):.6g}; expected finite "
                         f"weights > 0")
    if n and not (1.0 / WEIGHT_ABS_MAX <= float(t.min()) and float(t.max()) <= WEIGHT_ABS_MAX):
        i = int(torch.argmin(t) if float(t.min()) < 1.0 / WEIGHT_ABS_MAX else torch.argmax(t))
        raise ValueError(f"weights: row {i} has weight {float(t[i]):.6g}; expected weights in "
                         f"[{1 / WEIGHT_ABS_MAX:g}, {WEIGHT_ABS_MAX:g}] (Q depends only on "
                         f"their ratios: divide them by a common scale, e.g. their largest)")
    ratio = float(t.max() / t.min()) if n else 1.0  # a process group's rank may hold no rows
    if ratio > WEIGHT_RATIO_MAX * (1 + 1e-6):  # slack: weights given in float32
        raise ValueError(f"weights: max / min = {ratio:.3g}; expected at most "
                         f"{WEIGHT_RATIO_MAX:g} (the solver represents 1 / c relative to the "
                         f"largest in float32)")
    return t


def check_capacity(log_p: torch.Tensor, m: torch.Tensor, name: str = "marginals",
                   chunk_elems: int = 1 << 22, tol: Optional[float] = None) -> None:
    """Raise "infeasible marginals" when a class total cannot be met by any Q on P^'s support.

    Each row of Q sums to 1 and puts mass only where P^ does (log P^ > -inf), so class j can
    receive at most the number of rows that give it probability, and must receive at least the
    number of rows that give probability to j alone. The general condition runs over every set
    of classes: with ``tol``, :func:`support_floor` then decides it exactly where the support is
    small enough, and a floor above ``tol`` is refused too. One pass over log P^ (N x k) for the
    counts: called only when the solver cannot converge, never on the normal path.
    """
    cap, only = capacity_counts(log_p, chunk_elems)
    raise_if_over_capacity(cap, only, m, log_p.shape[0], name)
    if tol is None:
        return
    floor = support_floor(log_p, m)
    if floor is not None and floor > tol:
        raise ValueError(f"{name}: infeasible marginals: no Q on P^'s support meets them: the "
                         f"smallest residual ||colsum(Q) - M||_1 / N that any Q with rows summing "
                         f"to 1 and mass only where P^ has probability reaches is {floor:.3g}, "
                         f"above tol {tol:g} (a set of classes needs more or less mass than the "
                         f"rows giving it probability can carry); expected class totals that the "
                         f"support can carry")


# support_floor's limits: the support's entries scanned (N x k), and the distinct row patterns'
# entries the linear program holds. Above them the exact check is skipped (the counts remain).
FLOOR_MAX_SCAN = 50_000_000
FLOOR_MAX_ENTRIES = 2_000_000


def support_floor(log_p: torch.Tensor, m: torch.Tensor) -> Optional[float]:
    """The smallest ``||colsum(Q) - M||_1 / N`` over every Q (N x k) whose rows sum to 1 and put
    mass only where ``log_p`` > -inf: 0 for marginals the support can carry, the solver's floor
    otherwise. A linear program over the support's distinct row patterns (rows of one pattern
    are interchangeable), solved by scipy's HiGHS; None when the support is too large to decide
    here (``FLOOR_MAX_SCAN``, ``FLOOR_MAX_ENTRIES``) or the solver gives no answer."""
    n, k = log_p.shape
    if n == 0 or n * k > FLOOR_MAX_SCAN:
        return None
    sup = (log_p > float("-inf")).cpu().numpy()
    packed, counts = np.unique(np.packbits(sup, axis=1), axis=0, return_counts=True)
    patterns = np.unpackbits(packed, axis=1, count=k).astype(bool)
    p_idx, j_idx = np.nonzero(patterns)
    nnz, n_pat = len(p_idx), len(patterns)
    if nnz > FLOOR_MAX_ENTRIES:
        return None
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    # Variables: the mass x of each (pattern, class) entry, then each class's excess and deficit.
    # Rows: each pattern's rows sum to their count; each class's mass minus its excess plus its
    # deficit is M_j.
    cls = np.arange(k)
    rows = np.concatenate([p_idx, n_pat + j_idx, n_pat + cls, n_pat + cls])
    cols = np.concatenate([np.arange(nnz), np.arange(nnz), nnz + cls, nnz + k + cls])
    vals = np.concatenate([np.ones(2 * nnz), -np.ones(k), np.ones(k)])
    a = csr_matrix((vals, (rows, cols)), shape=(n_pat + k, nnz + 2 * k))
    b = np.concatenate([counts.astype(np.float64), m.double().cpu().numpy()])
    cost = np.concatenate([np.zeros(nnz), np.ones(2 * k)])
    res = linprog(cost, A_eq=a, b_eq=b, bounds=(0, None), method="highs")
    return float(res.fun) / n if res.status == 0 else None


def capacity_counts(log_p: torch.Tensor, chunk_elems: int = 1 << 22
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cap, only): per class (k,) float64 on the CPU, the rows of ``log_p`` with a finite entry
    on it and the rows whose only finite entry it is (additive over row blocks)."""
    n, k = log_p.shape
    cap = torch.zeros(k, dtype=torch.float64)
    only = torch.zeros(k, dtype=torch.float64)
    rows = max(1, chunk_elems // max(k, 1))
    for i in range(0, n, rows):
        fin = log_p[i:i + rows] > float("-inf")
        cap += fin.sum(0, dtype=torch.float64).cpu()
        single = fin.sum(1) == 1
        only += fin[single].sum(0, dtype=torch.float64).cpu()
    return cap, only


def raise_if_over_capacity(cap: torch.Tensor, only: torch.Tensor, m: torch.Tensor, n: int,
                           name: str = "marginals") -> None:
    """The check of :func:`check_capacity` from its counts (N rows in all)."""
    m = m.double().cpu()
    slack = 1e-9 * max(n, 1)
    over = torch.nonzero(m > cap + slack).flatten()
    if over.numel():
        j = int(over[0])
        raise ValueError(f"{name}: infeasible marginals: class {j} has target total "
                         f"{float(m[j]):.6g} but only {int(cap[j])} rows of P^ give it "
                         f"probability (each row of Q adds at most 1 to a class); expected "
                         f"M_{j} <= {int(cap[j])}")
    under = torch.nonzero(m < only - slack).flatten()
    if under.numel():
        j = int(under[0])
        raise ValueError(f"{name}: infeasible marginals: class {j} has target total "
                         f"{float(m[j]):.6g} but {int(only[j])} rows of P^ give probability to "
                         f"class {j} alone (their rows of Q must be one-hot on it); expected "
                         f"M_{j} >= {int(only[j])}")


def check_out(out, x: torch.Tensor, from_numpy: bool) -> Optional[torch.Tensor]:
    """``refine``'s ``out=`` as a tensor (None when not given): the input's shape, dtype, device
    and kind (numpy array for numpy input), non-negative strides, and either the input itself or
    memory that does not overlap it."""
    if out is None:
        return None
    kind = "numpy.ndarray" if from_numpy else "torch.Tensor"
    if from_numpy != isinstance(out, np.ndarray) or not isinstance(out, (np.ndarray,
                                                                         torch.Tensor)):
        raise TypeError(f"out: expected a {kind} like the input, got {type(out).__name__}")
    if isinstance(out, torch.Tensor):
        check_dense(out, "out")
    if from_numpy and not out.flags.writeable:
        raise ValueError("out: the array is read-only (out.flags.writeable is False); expected a "
                         "writable array")
    o = _from_numpy(out, "out") if from_numpy else out
    if o.shape != x.shape or o.dtype != x.dtype or o.device != x.device:
        raise ValueError(f"out: expected shape {tuple(x.shape)}, dtype {x.dtype} on {x.device} "
                         f"(the input's), got {tuple(o.shape)}, {o.dtype} on {o.device}")
    if any(s < 0 for s in o.stride()):
        raise ValueError("out: negative strides are not supported")
    if o.requires_grad:
        raise ValueError("out: a tensor that requires grad cannot receive the targets")
    if o.is_inference() and not torch.is_inference_mode_enabled():
        # torch refuses in-place writes to these outside inference_mode; the kernels would not.
        raise ValueError("out: an inference tensor (made under torch.inference_mode) cannot be "
                         "written outside inference_mode; expected a normal tensor, or call "
                         "refine inside torch.inference_mode()")
    if o.numel() and _self_overlaps(o):  # numpy gives empty arrays strides (0, 0)
        raise ValueError(f"out: its elements share memory (strides {o.stride()} for shape "
                         f"{tuple(o.shape)}, e.g. from expand()); expected a buffer with one "
                         f"memory location per element")
    same = o.data_ptr() == x.data_ptr() and o.stride() == x.stride()
    if not same and _overlaps(o, x):
        raise ValueError("out: overlaps the input without being it; pass the input itself (to "
                         "overwrite it) or separate memory")
    return o


def result_tensor(buf: torch.Tensor, user_out: Optional[torch.Tensor], x: torch.Tensor
                  ) -> torch.Tensor:
    """Q as the caller gets it from ``buf`` (the solver's buffer, or the 16-bit result it was
    written into): in ``user_out`` (``out=``) when given, else in the input's dtype."""
    if user_out is not None:
        if user_out is not buf:
            user_out.copy_(buf)
        return user_out
    return buf if buf.dtype == x.dtype else buf.to(x.dtype)


def _self_overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: a stride of 0 on a dimension of size > 1,
    or strides too small for the sizes below them (conservative: such layouts are refused even
    where an unusual interleaving keeps the elements apart)."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return True
        span = st * sz
    return False


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:  # no element to share (and strides may be anything)
        return False
    def span(t):
        lo = t.data_ptr()
        hi = lo + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) * t.element_size()
        return lo, hi + t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def weight_sums(inv_c: np.ndarray) -> Tuple[float, float, float, float]:
    """(sum inv_c, max inv_c, sum 1 / inv_c, min inv_c) in float64: what the solver needs of the
    weights."""
    ic = inv_c.astype(np.float64)
    return (float(ic.sum()), float(ic.max()) if ic.size else 1.0, float((1.0 / ic).sum()),
            float(ic.min()) if ic.size else 1.0)


def two_levels(mask: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """(N,) array of ``levels``' dtype: ``levels[1]`` where the bool ``mask`` (N,) is set, else
    ``levels[0]``. Selected on the bit patterns, in two passes (mask times the levels' XOR, then
    XOR with ``levels[0]``): boolean-index assignment (``a[mask] = v``) took 1.6 ms per million
    rows, about 2 % of a 1,000,000 x 100 refine; five passes took 0.3 ms (22 us at 50,000 rows),
    these two 14 us at 50,000."""
    lv = np.ascontiguousarray(levels)
    it = np.int32 if lv.itemsize == 4 else np.int64
    bits = lv.view(it)
    out = np.multiply(mask, bits[0] ^ bits[1], dtype=it)  # 0, or the bits that differ
    out ^= bits[0]
    return out.view(lv.dtype)


def weight_sums_of_levels(levels: np.ndarray, counts) -> Tuple[float, float, float, float]:
    """:func:`weight_sums` of inverse weights that take the values ``levels`` (as stored, e.g.
    float32) ``counts`` times each: O(1) instead of three passes and two N-vectors (12 ms of a
    150 ms refine at N = 1,000,000)."""
    # Plain floats: two levels do not need numpy's per-call overhead.
    pairs = [(float(c), float(v)) for c, v in zip(counts, np.asarray(levels).tolist()) if c > 0]
    if not pairs:
        return 0.0, 1.0, 0.0, 1.0
    return (sum(c * v for c, v in pairs), max(v for _, v in pairs),
            sum(c / v for c, v in pairs), min(v for _, v in pairs))


def buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the buffer that holds log P^ for probabilities or logits of ``dtype``:
    float64 for float64, float32 otherwise. A 16-bit log P^ would round log p by up to 2^-4
    (bfloat16) or 2^-7 (float16) at log p ~ -20, p by up to 6 %, and move Q far more than
    rounding Q to 16 bits does (0.1 against 0.002 at lam = 1e-4, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def refine_buffers(x: torch.Tensor, user_out: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(buf, result) of a refine of ``x``: the buffer that holds log P^ while solving
    (:func:`buffer_dtype`; ``out=`` itself when it has that dtype) and where Q goes: ``buf``
    itself, overwritten in place, so that a refine needs no N x k temporary besides its result;
    for a 16-bit input, ``out=`` or a new tensor of its dtype beside the float32 buffer."""
    sdt = buffer_dtype(x.dtype)
    buf = (user_out if user_out is not None and user_out.dtype == sdt
           else empty_buffer(x.shape, sdt, x.device))
    if x.dtype == sdt:
        return buf, buf
    return buf, user_out if user_out is not None else empty_buffer(x.shape, x.dtype, x.device)


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the solver's buffer for a log P^ of ``dtype`` (``solve`` / ``targets``): the
    input's own (float64 is solved in float64, float16 / bfloat16 are stored as such and
    evaluated in float32; the caller's log values are already rounded). Probabilities and
    logits: :func:`buffer_dtype`."""
    return dtype if dtype in SUPPORTED_DTYPES else torch.float32


def pseudo_totals(kind: str, pseudo_t: Optional[torch.Tensor], colsum_retain: torch.Tensor,
                  colsum_forget: torch.Tensor, n_retain: int, n_forget: int, k: int,
                  dtype: torch.dtype, rows_colsum: Optional[torch.Tensor] = None
                  ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(the pseudo rows' log values, their column sums (k,) float64 as Q sees them) once the
    input's column sums are known; ``kind`` / ``pseudo_t`` as :func:`pseudo_log` returned them.

    "prior" becomes the retain rows' mean (the uninformative prior when none is retained), in the
    solver's compute dtype. Totals are softmaxes of the stored log rows: exp of float32-rounded
    logs sums to 1 only within 1e-7, which a float64 solve would have to chase.
    ``rows_colsum``: the "rows" kind's totals when the caller summed them (a sharded refine sums
    them over every process); otherwise they are summed from ``pseudo_t``.
    """
    if kind == "vector":
        v = pseudo_t.numpy().astype(np.float64)  # numpy: cheaper than torch on a k-vector
        e = np.exp(v - v.max())
        return pseudo_t, torch.from_numpy(e * (n_forget / e.sum()))
    if kind == "prior":
        prior = (colsum_retain / n_retain if n_retain
                 else torch.full((k,), 1.0 / k, dtype=torch.float64))
        pseudo_t = torch.log(prior.to(compute_dtype(dtype)))
        return pseudo_t, torch.softmax(pseudo_t.double(), dim=0) * n_forget
    if kind == "given":
        return pseudo_t, colsum_forget
    if rows_colsum is not None:
        return pseudo_t, rows_colsum
    return pseudo_t, torch.softmax(pseudo_t.double(), dim=1).sum(dim=0)
