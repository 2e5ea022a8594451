"""``refine_file``: refine an N x k ``.npy`` file chunk by chunk, in O(chunk) memory
(docs/scaling.md).

The input is read once (validation, log P^ and the column sums), the output file holds log P^
while the solver runs (as ``refine``'s output buffer does in memory) and is read once per solver
pass, then overwritten with Q once. Each chunk is an ``mmap`` of its rows only, unmapped before the
next one is mapped, so the resident memory is one chunk of input and one of output (plus a few
bytes per row, see ``refine_file``'s ``memory_budget``) whatever N is; the page cache keeps what
the machine has room for. The output is written to a temporary file next to ``out_path`` and
renamed onto it when the refine succeeds: an error leaves no partial output behind.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np
import numpy.lib.format as npformat
import torch

from . import problem as pb
from .caller_state import available_device
from .problem import ForgetSpec, WeightsSpec
from .sharded import Comm, RowStore, collective_checks, refine_rows
from .solver import RefineInfo
from .torch_defaults import cpu_default_device

PathLike = Union[str, os.PathLike]
FILE_DTYPES = (np.float16, np.float32, np.float64)
DEFAULT_MEMORY_BUDGET = 1 << 30
_GRAN = mmap.ALLOCATIONGRANULARITY
# madvise(MADV_POPULATE_WRITE) (Linux 5.14): map a chunk's pages writable up front. Without it
# every 4 KiB page of an output chunk takes its own write fault, which tripled the time of the
# materialising pass of a 500,000 x 1,000 refine.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def parse_bytes(text: Union[str, int], name: str = "memory_budget") -> int:
    """Bytes from an int or a size such as '1GiB', '512MiB', '2GB', '300M' (binary for 'iB' and
    single letters, decimal for 'B' with a prefix)."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        s = str(text).strip().replace(" ", "")
        units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
                 "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                 "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "b": 1, "": 1}
        i = len(s)
        while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
            i -= 1
        num, unit = s[:i], s[i:].lower()
        try:
            value = int(float(num) * units[unit])
        except (KeyError, ValueError, OverflowError):
            raise ValueError(f"{name}: cannot read {text!r} as a size; expected bytes or e.g. "
                             f"'1GiB', '512MiB', '2GB'") from None
    if value <= 0:
        raise ValueError(f"{name}: expected a positive size, got {text!r}")
    return value


def as_path(value: Any, name: str) -> Path:
    """``value`` (str, bytes or os.PathLike) as a Path; anything else is a TypeError that names
    the argument (pathlib's own names neither it nor what is expected)."""
    if isinstance(value, (str, bytes, os.PathLike)):
        path = os.fspath(value)
        return Path(os.fsdecode(path))
    raise TypeError(f"{name}: expected a file path (str or os.PathLike), got "
                    f"{type(value).__name__}")


class NpyFile:
    """A 2-D ``.npy`` file of float16 / float32 / float64 whose rows are mapped a range at a time.
    In Fortran order (columns contiguous) a range of rows is k segments, one per column, read into
    a buffer of the range's size; files created here are in C order."""

    def __init__(self, path: PathLike, name: str = "probs_path") -> None:
        self.path, self.name = as_path(path, name), name
        if self.path.is_dir():
            raise ValueError(f"{name}: '{self.path}' is a directory; expected a .npy file")
        if not self.path.is_file():
            raise FileNotFoundError(f"{name}: no such file '{self.path}'")
        with open(self.path, "rb") as f:
            try:
                version = npformat.read_magic(f)
                reader = (npformat.read_array_header_1_0 if version == (1, 0)
                          else npformat.read_array_header_2_0)
                shape, fortran, dtype = reader(f)
            except ValueError as exc:
                raise ValueError(f"{name}: '{self.path}' is not a .npy file ({exc})") from None
            self.offset = f.tell()
        self._check(shape, dtype)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.fortran = bool(fortran) and self.shape[0] > 1 and self.shape[1] > 1
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        size = self.path.stat().st_size
        if size < self.offset + self.shape[0] * self.row_bytes:
            raise ValueError(f"{name}: '{self.path}' is truncated ({size} bytes; its header "
                             f"announces {self.offset + self.shape[0] * self.row_bytes})")

    def _check(self, shape, dtype) -> None:
        if len(shape) != 2:
            raise ValueError(f"{self.name}: '{self.path}' holds an array of shape {tuple(shape)}; "
                             f"expected 2-D (N x k)")
        if np.dtype(dtype).newbyteorder("=") not in [np.dtype(d) for d in FILE_DTYPES] or \
                not np.dtype(dtype).isnative:
            raise TypeError(f"{self.name}: '{self.path}' has dtype {np.dtype(dtype)}; expected "
                            f"native float16, float32 or float64")
        if shape[1] == 0:
            raise ValueError(f"{self.name}: '{self.path}' has k == 0 classes; expected at least "
                             f"one column")

    @staticmethod
    def create(path: PathLike, shape: Tuple[int, int], dtype: np.dtype) -> "NpyFile":
        """A new file of ``shape`` and ``dtype`` (its data a sparse hole until written)."""
        header = {"descr": npformat.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(shape)}
        with open(path, "wb") as f:
            npformat.write_array_header_2_0(f, header)
            f.truncate(f.tell() + int(shape[0]) * int(shape[1]) * np.dtype(dtype).itemsize)
        return NpyFile(path, "out_path")

    @contextmanager
    def rows(self, start: int, stop: int, write: bool = False) -> Iterator[np.ndarray]:
        """Rows [start, stop) as an array backed by a mapping of those rows only (writes go to
        the file); unmapped when the block exits."""
        n_rows = stop - start
        k = self.shape[1]
        if n_rows <= 0:
            yield np.empty((0, k), dtype=self.dtype)
            return
        if self.fortran:
            with self._fortran_rows(start, stop, write) as arr:
                yield arr
            return
        lo = self.offset + start * self.row_bytes
        hi = lo + n_rows * self.row_bytes
        base = lo - lo % _GRAN
        flags = mmap.MAP_SHARED | (0 if write else getattr(mmap, "MAP_POPULATE", 0))
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        with open(self.path, "r+b" if write else "rb") as f:
            mm = mmap.mmap(f.fileno(), hi - base, flags=flags, prot=prot, offset=base)
        if write:
            try:
                mm.madvise(_MADV_POPULATE_WRITE)
            except OSError:  # an older kernel: pages fault in one by one
                pass
        arr = np.frombuffer(mm, dtype=self.dtype, count=n_rows * k, offset=lo - base)
        try:
            yield arr.reshape(n_rows, k)
        finally:
            del arr
            # Drop the chunk's pages from this process now (they stay in the page cache, dirty
            # ones are written back as usual): a caller may still hold a tensor over them, which
            # would keep the mapping, and its pages resident, until it is collected.
            mm.madvise(mmap.MADV_DONTNEED)
            try:
                mm.close()
            except BufferError:
                pass

    @contextmanager
    def _fortran_rows(self, start: int, stop: int, write: bool) -> Iterator[np.ndarray]:
        """Rows [start, stop) of a Fortran-order file (element (i, j) at ``i + j * N``): its k
        column segments read into a (k, rows) buffer, handed out transposed. Not mapped: a
        mapping of the file, touched in k places, took in whole large page-cache folios (the
        whole of a 200 MB file resident for a 4 MB range)."""
        if write:
            raise ValueError(f"{self.name}: '{self.path}' is in Fortran order; only C-order "
                             f"files are written")
        n, k = self.shape
        item = self.dtype.itemsize
        buf = np.empty((k, stop - start), dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            for j in range(k):
                view = memoryview(buf[j]).cast("B")
                pos, got = self.offset + (j * n + start) * item, 0
                while got < len(view):
                    r = os.preadv(f.fileno(), [view[got:]], pos + got)
                    if r <= 0:
                        raise ValueError(f"{self.name}: '{self.path}' ended while reading it")
                    got += r
        yield buf.T

    def prefetch(self, start: int, stop: int) -> None:
        """Ask the OS to read rows [start, stop) into the page cache in the background (C-order
        files; a Fortran-order file's rows are k segments, left to the kernel's read-ahead)."""
        if stop <= start or not hasattr(os, "posix_fadvise") or self.fortran:
            return
        with open(self.path, "rb") as f:
            os.posix_fadvise(f.fileno(), self.offset + start * self.row_bytes,
                             (stop - start) * self.row_bytes, os.POSIX_FADV_WILLNEED)


class FileStore(RowStore):
    """Rows ``[r0, r1)`` of an input ``.npy`` and the solver's buffer in the output ``.npy``
    (or, with ``result``, in a file of its own, and Q in ``result``), visited ``chunk_rows``
    rows at a time. On a CUDA ``device`` each chunk is copied through a pinned host buffer to one
    of two device buffers on a side stream, so the next chunk's copy overlaps the current
    chunk's kernels."""

    def __init__(self, src: NpyFile, r0: int, r1: int, buf: NpyFile, chunk_rows: int,
                 device: torch.device, dtype: torch.dtype,
                 result: Optional[NpyFile] = None) -> None:
        self.src, self.r0, self.r1, self.buf_file, self.result = src, r0, r1, buf, result
        self.shape = (r1 - r0, src.shape[1])
        self.dtype, self.device = dtype, device
        self.chunk_rows = max(1, int(chunk_rows))
        self.cuda = device.type == "cuda"
        if self.cuda:
            rows = min(self.chunk_rows, max(self.shape[0], 1))
            self.pinned = [torch.empty((rows, self.shape[1]), dtype=dtype, pin_memory=True)
                           for _ in range(2)]
            self.dbuf = [torch.empty((rows, self.shape[1]), dtype=dtype, device=device)
                         for _ in range(2)]
            self.copy_stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(2)]
            self.used = [torch.cuda.Event() for _ in range(2)]

    def _ranges(self):
        n = self.shape[0]
        for s in range(0, n, self.chunk_rows):
            yield s, min(n, s + self.chunk_rows)

    def _to_device(self, host: np.ndarray, j: int) -> torch.Tensor:
        rows = host.shape[0]
        self.copied[j].synchronize()  # the pinned buffer's previous copy has left it
        self.pinned[j][:rows].copy_(pb.from_numpy_readonly(host))
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.used[j])  # the device buffer's last reader is done
            self.dbuf[j][:rows].copy_(self.pinned[j][:rows], non_blocking=True)
            self.copied[j].record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(self.copied[j])
        return self.dbuf[j][:rows]

    def _release(self, j: int) -> None:
        self.used[j].record(torch.cuda.current_stream(self.device))

    def input_chunks(self):
        for i, (s, e) in enumerate(self._ranges()):
            self.src.prefetch(self.r0 + e, self.r0 + min(self.shape[0], e + self.chunk_rows))
            with self.src.rows(self.r0 + s, self.r0 + e) as x, \
                    self.buf_file.rows(s, e, write=True) as o:
                if not self.cuda:
                    yield s, e, pb.from_numpy_readonly(x), torch.from_numpy(o)
                    continue
                j = i % 2
                xd = torch.empty(x.shape, dtype=_torch_dtype(x.dtype), device=self.device)
                xd.copy_(pb.from_numpy_readonly(x).pin_memory(), non_blocking=True)
                od = self.dbuf[j][: e - s]
                yield s, e, xd, od
                o[...] = od.cpu().numpy()
                self._release(j)

    def buffer_chunks(self, want=None):
        for i, (s, e) in enumerate(self._ranges()):
            if want is not None and not want(s, e):
                continue
            self.buf_file.prefetch(e, min(self.shape[0], e + self.chunk_rows))
            with self.buf_file.rows(s, e) as b:
                if not self.cuda:
                    yield s, e, pb.from_numpy_readonly(b)
                    continue
                j = i % 2
                yield s, e, self._to_device(b, j)
                self._release(j)

    def update_chunks(self, want=None):
        for i, (s, e) in enumerate(self._ranges()):
            if want is not None and not want(s, e):
                continue
            with self.buf_file.rows(s, e, write=True) as b:
                if not self.cuda:
                    yield s, e, torch.from_numpy(b)
                    continue
                j = i % 2
                d = self._to_device(b, j)
                yield s, e, d
                b[...] = d.cpu().numpy()
                self._release(j)

    def result_chunks(self, want=None):
        if self.result is None:
            yield from super().result_chunks(want)
            return
        # The buffer's chunks as buffer_chunks reads them (the device buffer released when it
        # moves on), each beside its rows of the result file.
        for s, e, b in self.buffer_chunks(want):
            with self.result.rows(s, e, write=True) as o:
                if not self.cuda:
                    yield s, e, b, torch.from_numpy(o)
                    continue
                od = torch.empty(o.shape, dtype=_torch_dtype(o.dtype), device=self.device)
                yield s, e, b, od
                o[...] = od.cpu().numpy()


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64}[np.dtype(dt)]


def chunk_rows_for(k: int, in_itemsize: int, buf_itemsize: int, budget: int,
                   cuda: bool = False) -> int:
    """Rows per chunk so that what a chunk keeps resident fits ``budget`` bytes: a mapped input
    chunk and a mapped output chunk (the input pass), or on CUDA two pinned buffers beside them."""
    per_row = k * (in_itemsize + buf_itemsize + (2 * buf_itemsize if cuda else 0)) + 16
    return max(1, budget // per_row)


def load_npy(path: PathLike, name: str) -> np.ndarray:
    """The whole array of a ``.npy`` file (no pickled objects), with errors that name the
    argument ``name``: a missing file, a file that is not a ``.npy`` (an ``.npz``, a ``.pt``,
    other bytes) or a truncated / unreadable one."""
    path = as_path(path, name)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file '{path}'")
    with open(path, "rb") as f:
        magic = f.read(len(npformat.MAGIC_PREFIX))
    if magic != npformat.MAGIC_PREFIX:
        raise ValueError(f"{name}: '{path}' is not a .npy file (no .npy header); expected an "
                         f"array saved with numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{name}: '{path}' cannot be read as a .npy array ({exc})") from None


def _forget_arg(forget, n: int, rows_given: bool = False):
    """A forget argument of refine_file: a path to a bool .npy, or what ``refine`` takes."""
    if isinstance(forget, (str, bytes, os.PathLike)):
        path = as_path(forget, "forget")
        arr = load_npy(path, "forget")
        if arr.dtype != np.bool_:
            raise TypeError(f"forget: '{path}' holds {arr.dtype}; expected a bool mask (N,) "
                            f"(pass integer row indices as an array, not a file)")
        if arr.ndim != 1 or arr.size != n:
            over = "of rows=(start, stop)" if rows_given else "of the probabilities file"
            raise ValueError(f"forget: '{path}' has shape {arr.shape}; expected ({n},), one bool "
                             f"per row {over}")
        return arr
    if rows_given:
        dt = getattr(forget, "dtype", None)
        if dt in (np.bool_, torch.bool) and getattr(forget, "ndim", 1) == 1 and len(forget) != n:
            raise ValueError(f"forget: a bool mask of length {len(forget)}; expected {n}, one bool "
                             f"per row of rows=(start, stop) (integer indices count from start too)")
    return forget


@cpu_default_device
def refine_file(probs_path: PathLike, forget: Union[PathLike, ForgetSpec], out_path: PathLike, *,
                logits: bool = False,
                chunk_rows: Optional[int] = None,
                memory_budget: Union[int, str] = DEFAULT_MEMORY_BUDGET,
                device: Union[str, torch.device] = "cpu", rows: Optional[Tuple[int, int]] = None,
                process_group: Optional["torch.distributed.ProcessGroup"] = None,
                progress: Optional[bool] = None, weights: WeightsSpec = None,
                generator: Optional[torch.Generator] = None, **options: Any) -> RefineInfo:
    """Refine the N x k probabilities (or logits) in a ``.npy`` file into ``out_path``, chunk by
    chunk, without holding or mapping the file whole.

    Args:
        probs_path: a 2-D ``.npy`` of float16, float32 or float64 (N x k), in C order (rows
            contiguous) or Fortran order (read by column segments: a slower input pass).
        forget: the rows to forget: a path to a bool ``.npy`` (N,), a bool array (N,) or integer
            row indices (as ``refine``'s ``forget_mask``; with ``rows``, over those rows).
        out_path: where Q goes (``.npy``, N x k, the input's dtype); written to a temporary file
            beside it and renamed onto it on success (nothing is left behind on an error). It
            may be ``probs_path`` itself.
        logits: the file holds logits (log-softmax is taken inside).
        chunk_rows: rows per chunk; None: as many as ``memory_budget`` allows.
        memory_budget: bytes (or e.g. "1GiB") that a chunk may keep resident (default 1 GiB);
            the peak resident memory is about this plus the interpreter, torch and what the
            call keeps per row: 5 bytes (a bool forget mask and float32 inverse row weights; 9
            for a float64 file, whose inverse weights are float64), 8 more for ``weights``
            when they are copied (below), and at setup, briefly, 16 more (the float64 sums of
            the inverse weights).
        device: where the kernels run ("cpu" or a CUDA device: chunks are copied there through
            pinned buffers, the next copy overlapping the current kernels).
        rows: (start, stop): refine only these rows of the file (with ``process_group``: this
            rank's share); ``out_path`` then holds those rows only.
        process_group: a ``torch.distributed`` process group; each rank streams its own file
            or row range and writes its own ``out_path``; every rank gets the same alpha.
        progress: a tqdm bar per pass (default: when stderr is a terminal).
        weights: (N,) row weights c_i, as ``refine``'s (with ``rows``, over those rows:
            (stop - start,)); kept as float64 for the call: a
            float64 CPU array or tensor is used as it is, any other is copied (8 bytes per
            row).
        generator, **options: ``refine``'s other options (lam, pseudo, marginals, method, tol,
            max_iter, backend, step_size).

    Returns:
        :class:`RefineInfo` (``info.timings`` seconds per phase; ``info.seconds`` the whole
        call; ``info.chunk_rows`` the rows per chunk).
    """
    t0 = time.perf_counter()
    comm = Comm(process_group)
    name = "logits" if logits else "probs"
    out_path = as_path(out_path, "out_path")

    def open_input():
        # Every check of this rank's arguments, in one collective (collective_checks).
        unknown = sorted(set(options) - set(REFINE_OPTIONS))
        if unknown:
            raise TypeError(f"refine_file: unexpected keyword argument {unknown[0]!r}; expected "
                            f"refine_file's own or refine's options {list(REFINE_OPTIONS)} (Q "
                            f"goes to out_path and the info is always returned)")
        dev = check_device(device)
        budget = parse_bytes(memory_budget)
        src = NpyFile(probs_path, "probs_path")
        n_file, k = src.shape
        r0, r1 = (0, n_file) if rows is None else _check_rows(rows, n_file)
        if r1 == r0 and comm.group is None:  # (with several ranks, N is checked over all)
            raise ValueError(f"probs_path: '{src.path}' has N == 0 rows to refine; expected at "
                             f"least one row" if rows is None else
                             f"rows: ({r0}, {r1}) holds N == 0 rows of '{src.path}'; expected a "
                             f"range of at least one row")
        mask, pseudo = pb.forget_and_pseudo(_forget_arg(forget, r1 - r0, rows is not None),
                                            r1 - r0, options.get("pseudo"), name="forget")
        if pseudo is not None:
            options["pseudo"] = pseudo
        c = None
        if weights is not None:
            c = pb.check_weights(weights, r1 - r0).numpy()
        if out_path.suffix != ".npy":
            raise ValueError(f"out_path: '{out_path}' must end in .npy")
        if not out_path.parent.is_dir():
            raise FileNotFoundError(f"out_path: no such directory '{out_path.parent}'")
        check_name_length(out_path, "out_path")  # before a stat of it fails (ENAMETOOLONG)
        if out_path.is_dir():
            raise ValueError(f"out_path: '{out_path}' is a directory; expected a .npy file path")
        if not os.access(out_path.parent, os.W_OK | os.X_OK):
            raise PermissionError(f"out_path: cannot create files in '{out_path.parent}' (no "
                                  f"write permission); expected a writable directory")
        if (out_path.exists() and not out_path.is_symlink()
                and not os.access(out_path, os.W_OK)):
            raise PermissionError(f"out_path: '{out_path}' is write-protected (refine_file "
                                  f"replaces it, where np.save would refuse); make it writable "
                                  f"or pass another out_path")
        # The input is lost only where out_path's directory entry is the input's file.
        if (r0, r1) != (0, n_file) and _dir_entry(out_path) == Path(os.path.realpath(src.path)):
            raise ValueError(f"out_path: is probs_path itself, and rows=({r0}, {r1}) covers "
                             f"{r1 - r0} of its {n_file} rows: those rows of Q would replace the "
                             f"whole file; expected another out_path, or rows covering the file")
        if chunk_rows is not None and (pb.as_int(chunk_rows, "chunk_rows") < 1):
            raise ValueError(f"chunk_rows: expected an integer >= 1, got {chunk_rows!r}")
        # Created here, inside the collective checks: a rank that cannot create it (a full disk)
        # raises on every rank instead of leaving the others in the solver's collectives.
        in_dt = _torch_dtype(src.dtype)
        sdt = pb.buffer_dtype(in_dt)
        out_file = NpyFile.create(tmp, (r1 - r0, k), src.dtype)
        if sdt == in_dt:  # Q replaces log P^ in the output file
            return src, r0, r1, mask, c, dev, budget, out_file, None, in_dt, sdt
        # A float16 file: log P^ in a float32 file of its own beside the output (refine's
        # reason, api.refine), removed at the end; Q is written from it into the output.
        buf = NpyFile.create(scratch, (r1 - r0, k), np.dtype(np.float32))
        return src, r0, r1, mask, c, dev, budget, buf, out_file, in_dt, sdt

    def outputs(result) -> dict:
        # Gathered to find ranks of one machine writing one file (the last rename would win)
        # or reading the same rows of one file (they would count twice).
        src, r0, r1 = result[:3]
        return {"_out": (socket.gethostname(), str(_dir_entry(out_path))),
                "_in": (socket.gethostname(), os.path.realpath(src.path), r0, r1)}

    # From here on the temporary output may exist: every error removes it.
    scratch = temporary_beside(out_path, "buffer", ".npy")
    try:
        with written_beside(out_path) as tmp:
            (src, r0, r1, mask, c, dev, budget, buf, result, in_dt, sdt), every = \
                collective_checks(comm, open_input, outputs)
            _check_disjoint(every)
            k = src.shape[1]
            rows_per = (int(chunk_rows) if chunk_rows is not None
                        else chunk_rows_for(k, src.dtype.itemsize, torch.finfo(sdt).bits // 8,
                                            budget, dev.type == "cuda"))
            show = (sys.stderr is not None and sys.stderr.isatty()) if progress is None \
                else bool(progress)
            bar = _bar(show, max(1, -(-(r1 - r0) // rows_per)), src.path.name)
            where = f" (file '{src.path}'{comm.where()})"
            store = FileStore(src, r0, r1, buf, rows_per, dev, sdt, result=result)
            info, _ = refine_rows(store, mask, mode=name, name=name, in_dtype=in_dt, weights=c,
                                  generator=generator, comm=comm, where=where, progress=bar,
                                  first_row=r0, **options)
            del store
    finally:
        _unlink(scratch)
    # The rows a chunk held: the cap, or all of this rank's rows when they are fewer (0: none).
    info.chunk_rows = int(min(rows_per, r1 - r0))
    info.seconds = time.perf_counter() - t0
    return info


# refine's options that refine_file passes on (refine_rows's keywords).
REFINE_OPTIONS = ("lam", "pseudo", "marginals", "method", "tol", "max_iter", "backend",
                  "step_size")


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device where chunks can run: the CPU or an available CUDA device."""
    try:
        dev = available_device(device)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r}; expected 'cpu' or 'cuda' (or 'cuda:N')")
    return dev


def _dir_entry(path: Path) -> Path:
    """The directory entry ``path`` names, its folder resolved: what the final rename replaces
    (a link there, not the link's target)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _call_tag() -> str:
    """A name part unique to this call: the process and a random token. With the process id
    alone, two threads writing one out_path shared their temporaries, truncated each other's
    mapped file (SIGBUS) or returned normally over the other's half-written Q."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def temporary_beside(path: Path, part: str, suffix: str = "") -> Path:
    """A hidden name beside ``path`` for one call's temporary file: ``.<name>.<part>-<tag>
    <suffix>``, with the name cut and a hash of it added where the whole would pass the 255 bytes
    of a file name (a long but valid out_path failed in the temporary's creation, after the
    solve for ``ppu-fast refine``)."""
    tail = f".{part}-{_call_tag()}{suffix}"
    name = path.name
    if len(os.fsencode(f".{name}{tail}")) > _NAME_MAX:
        digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:8]
        keep = _NAME_MAX - len(os.fsencode(tail)) - len(digest) - 2  # the leading '.' and '~'
        name = os.fsencode(name)[:keep].decode("utf-8", errors="ignore") + "~" + digest
    return path.with_name(f".{name}{tail}")


# The longest file name most file systems take (bytes): ext4, XFS, btrfs, tmpfs, NTFS (in UTF-16
# units), APFS.
_NAME_MAX = 255


def check_name_length(path: Path, arg: str) -> None:
    """Refuse an output path whose file name its folder's file system cannot hold, before the
    work whose result it would take (``os.pathconf``'s limit where it says one)."""
    limit = _NAME_MAX
    try:
        limit = os.pathconf(path.parent if str(path.parent) else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        pass
    size = len(os.fsencode(path.name))
    if size > limit:
        raise ValueError(f"{arg}: the file name '{path.name[:40]}...' is {size} bytes; expected "
                         f"at most {limit}, the longest name its folder's file system takes")


@contextmanager
def written_beside(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` (``suffix`` appended: np.save adds ".npy" to a name
    without it) that is renamed onto ``path`` when the block succeeds and removed when it fails:
    an error leaves no partial output behind."""
    tmp = temporary_beside(path, "partial", suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _check_disjoint(every: list) -> None:
    """Raise (on every rank: the same gathered values) where two ranks write one file on one
    machine, or read overlapping rows of one file (those rows would count twice in N and in
    every class total)."""
    outs = [d["_out"] for d in every]
    for r, o in enumerate(outs):
        if o in outs[:r]:
            raise ValueError(f"out_path: ranks {outs.index(o)} and {r} both write '{o[1]}' on "
                             f"{o[0]}; expected a different out_path on each rank (each writes "
                             f"its own rows of Q)")
    ins = [d["_in"] for d in every]
    for r, (host, path, a0, a1) in enumerate(ins):
        for q in range(r):
            h2, p2, b0, b1 = ins[q]
            if (host, path) == (h2, p2) and max(a0, b0) < min(a1, b1):
                raise ValueError(f"rows: ranks {q} and {r} both read rows [{max(a0, b0)}, "
                                 f"{min(a1, b1)}) of '{path}' on {host} (rows=({b0}, {b1}) and "
                                 f"({a0}, {a1})); expected disjoint ranges, one share of the "
                                 f"rows per rank")


def _check_rows(rows, n_file: int) -> Tuple[int, int]:
    try:
        r0, r1 = (pb.as_int(v, "rows") for v in rows)
    except (TypeError, ValueError):
        raise TypeError(f"rows: expected (start, stop) integers, got {rows!r}") from None
    if not 0 <= r0 <= r1 <= n_file:
        raise ValueError(f"rows: ({r0}, {r1}) is not a range of the file's {n_file} rows; "
                         f"expected 0 <= start <= stop <= {n_file}")
    return r0, r1


def _bar(show: bool, chunks: int, label: str):
    """A function wrapping a pass's chunk iterator in a tqdm bar (one bar per pass)."""
    if not show:
        return lambda it, desc: it
    from tqdm.auto import tqdm

    return lambda it, desc: tqdm(it, total=chunks, desc=f"{label} {desc}", unit="chunk",
                                 leave=False)
