"""Streaming refine (``refine_file``) and sharded refine / solve over ``torch.distributed``:
both must give the in-memory single-process answer (docs/scaling.md).

Tolerances: float64 files give alpha within 1e-9 of the in-memory refine; float32 / float16 ones
within 1e-6 (the kernels keep float32 partial column sums over a few rows, so the chunking moves
the sums by float32 rounding, ~1e-7 relative), and Q within 1e-6 (float16 Q: one float16 ulp).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ppu_fast
from ppu_fast import refine, refine_file, solve
from ppu_fast.stream import NpyFile, parse_bytes

ALPHA_TOL = {np.float64: 1e-9, np.float32: 1e-6, np.float16: 1e-6}


def _probs(n: int, k: int, dtype, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 3, 1).numpy() \
        .astype(dtype)


def _mask(n: int, frac: float = 0.1, seed: int = 1) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[np.random.default_rng(seed).permutation(n)[: max(1, int(n * frac))]] = True
    return m


def _q_close(q: np.ndarray, q0: np.ndarray) -> None:
    atol = 1e-6 if q.dtype != np.float16 else float(np.finfo(np.float16).eps)
    np.testing.assert_allclose(q.astype(np.float64), q0.astype(np.float64), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("chunk", ["1", "7", "N-1", "N", "N+5", "budget"])
def test_streaming_equals_in_memory(tmp_path, dtype, chunk):
    n, k = 211, 10
    p = _probs(n, k, dtype)
    mask = _mask(n)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "f.npy", mask)
    q0, i0 = refine(p, mask, return_info=True)
    rows = {"1": 1, "7": 7, "N-1": n - 1, "N": n, "N+5": n + 5, "budget": None}[chunk]
    info = refine_file(tmp_path / "p.npy", tmp_path / "f.npy", tmp_path / "q.npy",
                       chunk_rows=rows, memory_budget=4096)
    q = np.load(tmp_path / "q.npy")
    assert q.dtype == p.dtype and q.shape == p.shape
    assert info.converged and info.iterations == i0.iterations
    assert float((info.alpha - i0.alpha).abs().max()) <= ALPHA_TOL[dtype]
    _q_close(q, q0)
    if chunk == "budget":  # 4 KiB: a handful of rows per chunk
        assert info.chunk_rows < n
    assert sorted(os.listdir(tmp_path)) == ["f.npy", "p.npy", "q.npy"]


@pytest.mark.parametrize("opts", [
    dict(pseudo="prior", marginals="original", lam=0.3),
    dict(pseudo="random", marginals="retain"),
    dict(pseudo=None, marginals="original"),
    dict(method="sinkhorn"),
])
def test_streaming_options_match(tmp_path, opts):
    """Every pseudo kind (prior: a second write pass; random: rows written per chunk; None: the
    input's own rows) and another method stream to the in-memory answer; logits too."""
    n, k = 300, 6
    p = _probs(n, k, np.float64, seed=3)
    mask = _mask(n, 0.2, seed=4)
    np.save(tmp_path / "p.npy", p)
    q0, i0 = refine(p, mask, return_info=True, generator=torch.Generator().manual_seed(7), **opts)
    info = refine_file(tmp_path / "p.npy", np.flatnonzero(mask), tmp_path / "q.npy",
                       chunk_rows=13, generator=torch.Generator().manual_seed(7), **opts)
    assert float((info.alpha - i0.alpha).abs().max()) <= 1e-9
    _q_close(np.load(tmp_path / "q.npy"), q0)
    lg = np.log(p) + 2.0
    np.save(tmp_path / "l.npy", lg)
    ql, il = refine(logits=lg, forget_mask=mask, return_info=True,
                    generator=torch.Generator().manual_seed(7), **opts)
    info = refine_file(tmp_path / "l.npy", mask, tmp_path / "ql.npy", logits=True, chunk_rows=50,
                       generator=torch.Generator().manual_seed(7), **opts)
    assert float((info.alpha - il.alpha).abs().max()) <= 1e-9
    _q_close(np.load(tmp_path / "ql.npy"), ql)


def test_streaming_sampled_hessian_is_global(tmp_path):
    """N large enough that Newton's Hessian samples every m-th 16-row block (m > 1): chunk edges
    that cut blocks must not change which rows are sampled (same passes, same alpha)."""
    from ppu_fast.backends.base import hessian_stride
    n, k = 20_000, 10
    assert hessian_stride(n, k) > 1
    p = _probs(n, k, np.float64, seed=5)
    mask = _mask(n, 0.05, seed=6)
    np.save(tmp_path / "p.npy", p)
    q0, i0 = refine(p, mask, return_info=True, marginals="original")
    for rows in (997, 4096):
        info = refine_file(tmp_path / "p.npy", mask, tmp_path / "q.npy", chunk_rows=rows,
                           marginals="original")
        assert info.history == pytest.approx(i0.history, rel=1e-6, abs=1e-12)
        assert float((info.alpha - i0.alpha).abs().max()) <= 1e-9
        _q_close(np.load(tmp_path / "q.npy"), q0)


def test_streaming_in_place_and_row_range(tmp_path):
    n, k = 120, 5
    p = _probs(n, k, np.float32, seed=8)
    mask = _mask(n, 0.1, seed=9)
    np.save(tmp_path / "p.npy", p)
    q0 = refine(p, mask)
    refine_file(tmp_path / "p.npy", mask, tmp_path / "p.npy", chunk_rows=16)
    _q_close(np.load(tmp_path / "p.npy"), q0)
    np.save(tmp_path / "p.npy", p)
    qr = refine(p[30:90], mask[30:90])
    refine_file(tmp_path / "p.npy", mask[30:90], tmp_path / "r.npy", rows=(30, 90), chunk_rows=7)
    _q_close(np.load(tmp_path / "r.npy"), qr)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_a_fortran_order_file_is_read_by_columns(tmp_path, dtype):
    # np.save of a transposed array writes Fortran order, and np.load reads it back: so does
    # refine_file (Q in C order).
    n, k = 203, 7
    p = _probs(n, k, dtype, seed=11)
    mask = _mask(n, 0.1, seed=12)
    np.save(tmp_path / "f.npy", np.asfortranarray(p))
    before = (tmp_path / "f.npy").read_bytes()
    for chunk in (1, 7, n):
        info = refine_file(tmp_path / "f.npy", mask, tmp_path / "q.npy", chunk_rows=chunk)
        q = np.load(tmp_path / "q.npy")
        assert q.flags.c_contiguous and q.dtype == dtype and info.converged
        _q_close(q, refine(p, mask))
    refine_file(tmp_path / "f.npy", mask[30:90], tmp_path / "r.npy", rows=(30, 90), chunk_rows=7)
    _q_close(np.load(tmp_path / "r.npy"), refine(p[30:90], mask[30:90]))
    lg = np.log(np.maximum(p, 1e-30)).astype(dtype)
    np.save(tmp_path / "lf.npy", np.asfortranarray(lg))
    refine_file(tmp_path / "lf.npy", mask, tmp_path / "q.npy", logits=True, chunk_rows=16)
    _q_close(np.load(tmp_path / "q.npy"), refine(logits=lg, forget_mask=mask))
    assert (tmp_path / "f.npy").read_bytes() == before
    # Written over itself, as a C-order file would be.
    refine_file(tmp_path / "f.npy", mask, tmp_path / "f.npy", chunk_rows=16)
    _q_close(np.load(tmp_path / "f.npy"), refine(p, mask))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm")
def test_fortran_rows_stay_a_range_in_memory(tmp_path):
    # A range of rows of a Fortran-order file is k scattered segments; mapped, they took in whole
    # page-cache folios (the whole file resident, here 32 MB, for a 0.4 MB range).
    from ppu_fast.stream import NpyFile
    n, k = 80_000, 100
    a = np.asfortranarray(np.random.default_rng(0).random((n, k), dtype=np.float32))
    np.save(tmp_path / "f.npy", a)

    def resident_mb():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    f = NpyFile(tmp_path / "f.npy")
    before = resident_mb()
    with f.rows(40_000, 41_000) as rows:
        assert np.array_equal(rows, a[40_000:41_000])
        grown = resident_mb() - before
    assert grown < 8, f"{grown:.1f} MB resident for a 0.4 MB range"


def test_two_threads_writing_one_out_path(tmp_path):
    # Their temporaries were named by the process id alone: one thread truncated the file the
    # other had mapped (SIGBUS), or returned normally with the other's half-written Q in place.
    import threading
    n, k = 6000, 10
    mask = _mask(n, 0.15, seed=2)
    refs = []
    for i in range(2):
        np.save(tmp_path / f"in{i}.npy", _probs(n, k, np.float32, seed=20 + i))
        refine_file(tmp_path / f"in{i}.npy", mask, tmp_path / f"ref{i}.npy", chunk_rows=500)
        refs.append(np.load(tmp_path / f"ref{i}.npy"))
    for _ in range(4):
        errors = []

        def run(i):
            try:
                refine_file(tmp_path / f"in{i}.npy", mask, tmp_path / "out.npy", chunk_rows=500)
            except Exception as exc:  # noqa: BLE001 - any error is the finding
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        out = np.load(tmp_path / "out.npy")
        assert any(np.array_equal(out, r) for r in refs)  # the last writer's, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_bytes_path_is_a_path(tmp_path):
    # As open() and np.load take it.
    p = _probs(40, 3, np.float32, seed=3)
    mask = _mask(40, 0.1, seed=4)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "f.npy", mask)
    refine_file(os.fsencode(tmp_path / "p.npy"), os.fsencode(tmp_path / "f.npy"),
                os.fsencode(tmp_path / "q.npy"))
    _q_close(np.load(tmp_path / "q.npy"), refine(p, mask))


def _listing(d: Path):
    return sorted(os.listdir(d))


def test_streaming_errors_name_file_and_row(tmp_path):
    n, k = 50, 4
    p = _probs(n, k, np.float32)
    mask = _mask(n)
    with pytest.raises(FileNotFoundError, match=r"probs_path: no such file .*missing\.npy"):
        refine_file(tmp_path / "missing.npy", mask, tmp_path / "q.npy")
    for args, name in [((3, mask, tmp_path / "q.npy"), "probs_path"),
                       ((tmp_path / "missing.npy", mask, None), "out_path")]:
        with pytest.raises(TypeError, match=rf"^{name}: expected a file path .*got (int|NoneType)"):
            refine_file(*args)
    np.save(tmp_path / "v.npy", p[0])
    with pytest.raises(ValueError, match=r"v\.npy' holds an array of shape \(4,\); expected 2-D"):
        refine_file(tmp_path / "v.npy", mask, tmp_path / "q.npy")
    np.save(tmp_path / "i.npy", (p * 100).astype(np.int64))
    with pytest.raises(TypeError, match=r"i\.npy' has dtype int64"):
        refine_file(tmp_path / "i.npy", mask, tmp_path / "q.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="is not a .npy file"):
        refine_file(tmp_path / "junk.npy", mask, tmp_path / "q.npy")
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "short.npy", mask[:-1])
    with pytest.raises(ValueError, match=r"forget: .*short\.npy' has shape \(49,\); expected"):
        refine_file(tmp_path / "p.npy", tmp_path / "short.npy", tmp_path / "q.npy")
    with pytest.raises(ValueError, match="forget: bool mask has length 49; expected N = 50"):
        refine_file(tmp_path / "p.npy", mask[:-1], tmp_path / "q.npy")
    bad = p.copy()
    bad[37, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    before = _listing(tmp_path)
    for rows in (5, 50):
        with pytest.raises(ValueError, match=r"probs \(file '.*nan\.npy'\): row 37 contains NaN"):
            refine_file(tmp_path / "nan.npy", mask, tmp_path / "q.npy", chunk_rows=rows)
        assert _listing(tmp_path) == before  # no partial output, no temporary left behind
    with pytest.raises(ValueError, match=r"probs \(file .*\): row 37 contains NaN"):  # file row
        refine_file(tmp_path / "nan.npy", mask[30:], tmp_path / "q.npy", rows=(30, 50))
    with pytest.raises(ValueError, match="out_path: .* must end in .npy"):
        refine_file(tmp_path / "p.npy", mask, tmp_path / "q.pt")
    with pytest.raises(ValueError, match=r"rows: \(40, 60\) is not a range"):
        refine_file(tmp_path / "p.npy", mask, tmp_path / "q.npy", rows=(40, 60))
    with pytest.raises(ValueError, match="memory_budget: cannot read"):
        refine_file(tmp_path / "p.npy", mask, tmp_path / "q.npy", memory_budget="lots")
    assert not (tmp_path / "q.npy").exists()
    p.tofile(tmp_path / "raw.bin")
    with open(tmp_path / "trunc.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (n, k)})
        f.write(p[:10].tobytes())
    with pytest.raises(ValueError, match="is truncated"):
        NpyFile(tmp_path / "trunc.npy")


def _assert_durations(info) -> None:
    assert info.timings, "no phases timed"
    for phase, v in info.timings.items():
        assert type(v) is float and v >= 0.0 and np.isfinite(v), (phase, v)
    assert sum(info.timings.values()) <= info.seconds * (1 + 1e-9) + 1e-6


def test_timings_hold_durations_only(tmp_path):
    """RefineInfo.timings is seconds per phase; refine_file put its rows per chunk there too
    ('chunk_rows': 8.0), so summing or plotting the phases mixed a row count with seconds. The
    row count is info.chunk_rows; the in-memory calls report None there."""
    n, k = 120, 6
    p = _probs(n, k, np.float32, seed=4)
    mask = _mask(n)
    np.save(tmp_path / "p.npy", p)
    _, info = refine(p, mask, return_info=True)
    _assert_durations(info)
    assert info.chunk_rows is None
    _, info = solve(np.log(p.astype(np.float64)), np.ones(n), p.sum(0, dtype=np.float64))
    for phase, v in info.timings.items():  # solve times no phases of its own today
        assert type(v) is float and v >= 0.0, (phase, v)
    assert info.chunk_rows is None
    for rows, budget in ((8, None), (None, 2048)):
        kw = {"chunk_rows": rows} if rows else {"memory_budget": budget}
        info = refine_file(tmp_path / "p.npy", mask, tmp_path / "q.npy", **kw)
        _assert_durations(info)
        assert "chunk_rows" not in info.timings
        assert type(info.chunk_rows) is int
        if rows:
            assert info.chunk_rows == 8
        else:
            assert 1 <= info.chunk_rows < n
    # The rows a chunk held, not the cap: a budget or chunk_rows above the file's rows says n.
    for kw in ({"chunk_rows": 10 * n}, {"memory_budget": "1GiB"}):
        assert refine_file(tmp_path / "p.npy", mask, tmp_path / "q.npy", **kw).chunk_rows == n


def test_parse_bytes():
    assert parse_bytes("1GiB") == 1 << 30 and parse_bytes("512MiB") == 1 << 29
    assert parse_bytes("2GB") == 2 * 10 ** 9 and parse_bytes(4096) == 4096
    assert parse_bytes("1.5K") == 1536
    for bad in ("0", "-3MiB", "GiB", "3 parsecs", "1e400", "1e309B", "inf", "nan"):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_bytes(bad)


def _unreadable_npys(d: Path) -> dict:
    """Files a user might pass where a .npy is expected, none of them a readable .npy."""
    d.mkdir(exist_ok=True)
    files = {"garbage": d / "garbage.npy", "npz": d / "m.npz", "pt": d / "m.pt",
             "object": d / "obj.npy", "truncated": d / "tr.npy"}
    files["garbage"].write_bytes(b"not an array at all" * 8)
    np.savez(files["npz"], m=np.zeros(10, dtype=bool))
    torch.save(torch.zeros(10, dtype=torch.bool), files["pt"])
    np.save(files["object"], np.array([True, None] * 5, dtype=object), allow_pickle=True)
    np.save(files["truncated"], np.zeros(10, dtype=bool))
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:-3])
    return files


def test_streaming_forget_file_errors_name_forget(tmp_path):
    """A forget path that is no readable bool .npy (other bytes, an .npz, a .pt, object dtype,
    truncated) is refused naming forget and the file (numpy's own messages named neither, and an
    .npz failed with an AttributeError); nothing is written."""
    np.save(tmp_path / "p.npy", _probs(10, 3, np.float32, seed=1))
    for kind, path in _unreadable_npys(tmp_path / "bad").items():
        with pytest.raises(ValueError, match=r"^forget: '.*" + path.name) as exc:
            refine_file(tmp_path / "p.npy", path, tmp_path / "q.npy")
        assert "expected" in str(exc.value) or "cannot be read" in str(exc.value), kind
        assert sorted(f.name for f in tmp_path.iterdir()) == ["bad", "p.npy"]


def test_streaming_out_path_is_a_directory(tmp_path):
    """out_path naming a directory is refused up front (it ran the whole refine, then failed
    renaming onto it)."""
    np.save(tmp_path / "p.npy", _probs(10, 3, np.float32, seed=1))
    (tmp_path / "q.npy").mkdir()
    with pytest.raises(ValueError, match="out_path: .* is a directory"):
        refine_file(tmp_path / "p.npy", np.zeros(10, dtype=bool), tmp_path / "q.npy")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.npy", "q.npy"]


def test_a_long_out_path_name_is_written_or_refused_up_front(tmp_path, capsys):
    """An out_path whose name is valid but within ~30 bytes of the file system's limit failed
    creating the temporaries beside it (their names add a tag), with chained OSErrors naming a
    hidden file; ppu-fast refine failed so after the whole solve. A name past the limit is
    refused before any work, naming the argument."""
    from ppu_fast.cli import main
    p = _probs(40, 3, np.float64, seed=2)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "p16.npy", p.astype(np.float16))  # float16: a scratch buffer file too
    mask = np.arange(40) < 5
    np.save(tmp_path / "f.npy", mask)
    want = refine(p, mask)
    for src, tol in (("p.npy", 1e-12), ("p16.npy", 2e-3)):
        long = tmp_path / ("a" * 226 + ".npy")  # 230 bytes: np.save takes it
        refine_file(tmp_path / src, mask, long)
        np.testing.assert_allclose(np.load(long).astype(np.float64), want, rtol=0, atol=tol)
        long.unlink()
        for stream in ([], ["--chunk-rows", "8"]):
            assert main(["refine", "--probs", str(tmp_path / src), "--forget",
                         str(tmp_path / "f.npy"), "--out", str(long), *stream]) == 0
            capsys.readouterr()
            np.testing.assert_allclose(np.load(long).astype(np.float64), want, rtol=0, atol=tol)
            long.unlink()
    too_long = tmp_path / ("b" * 252 + ".npy")
    with pytest.raises(ValueError, match=r"out_path: the file name 'b+\.\.\.' is 256 bytes; "
                                         r"expected at most 255"):
        refine_file(tmp_path / "p.npy", mask, too_long)
    assert main(["refine", "--probs", str(tmp_path / "p.npy"), "--forget",
                 str(tmp_path / "f.npy"), "--out", str(too_long)]) == 2
    assert "--out: the file name" in capsys.readouterr().err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["f.npy", "p.npy", "p16.npy"]


def test_cli_refine_unreadable_inputs_exit_2(tmp_path, capsys):
    """Unreadable --probs / --forget / --weights files exit 2 naming the flag (numpy's and
    torch's own errors named neither; a corrupt .pt exited 1 with a traceback); --out naming a
    directory exits 2; a streamed refine that fails leaves none of --out's folders it made."""
    from ppu_fast.cli import main
    n, k = 10, 3
    np.save(tmp_path / "p.npy", _probs(n, k, np.float32, seed=1))
    np.save(tmp_path / "f.npy", np.arange(n) < 2)
    bad = _unreadable_npys(tmp_path / "bad")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02 not a pickle")
    ok = {"--probs": str(tmp_path / "p.npy"), "--forget": str(tmp_path / "f.npy")}
    cases = [("--probs", bad["garbage"]), ("--probs", bad["truncated"]),
             ("--forget", bad["garbage"]), ("--forget", bad["object"]),
             ("--forget", tmp_path / "garbage.pt"), ("--weights", bad["object"])]
    for stream in ([], ["--chunk-rows", "4"]):
        for flag, path in cases:
            if stream and flag == "--probs":
                continue  # the streamed reader's own errors (test_streaming_errors_name_file_...)
            args = {**ok, flag: str(path)}
            argv = ["refine", "--out", str(tmp_path / "q.npy"), *stream]
            for f, v in args.items():
                argv += [f, v]
            assert main(argv) == 2, (flag, path, stream)
            err = capsys.readouterr().err
            assert f"error: {flag}: '{path}'" in err, err
    (tmp_path / "outdir.npy").mkdir()
    assert main(["refine", "--probs", ok["--probs"], "--forget", ok["--forget"],
                 "--out", str(tmp_path / "outdir.npy")]) == 2
    assert "--out: " in capsys.readouterr().err
    deep = tmp_path / "a" / "b" / "c" / "q.npy"
    np.save(tmp_path / "far.npy", np.array([10 ** 6]))  # a row index past N: refused inside
    assert main(["refine", "--probs", ok["--probs"], "--forget", str(tmp_path / "far.npy"),
                 "--out", str(deep), "--chunk-rows", "4"]) == 2
    assert "--forget: " in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_python_m_ppu_fast_runs_the_cli(tmp_path, capsys):
    """`python -m ppu_fast refine ...` is the ppu-fast command (argparse read --forget as a prefix
    of the demo's --forget-class and failed)."""
    from ppu_fast.__main__ import main
    n, k = 40, 3
    p = _probs(n, k, np.float32, seed=3)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "f.npy", np.arange(n) < 4)
    assert main(["refine", "--probs", str(tmp_path / "p.npy"), "--forget",
                 str(tmp_path / "f.npy"), "--out", str(tmp_path / "q.npy")]) == 0
    _q_close(np.load(tmp_path / "q.npy"), refine(p, np.arange(n) < 4))
    with pytest.raises(SystemExit):
        main(["--forget", "3"])  # the demo's own flags are not abbreviated


def test_cli_refine_streams(tmp_path, capsys):
    from ppu_fast.cli import main
    n, k = 400, 5
    p = _probs(n, k, np.float32, seed=2)
    mask = _mask(n)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "f.npy", mask)
    np.save(tmp_path / "i.npy", np.flatnonzero(mask))
    q0 = refine(p, mask)
    assert main(["refine", "--probs", str(tmp_path / "p.npy"), "--forget", str(tmp_path / "f.npy"),
                 "--out", str(tmp_path / "q.npy"), "--chunk-rows", "33"]) == 0
    assert "in chunks of 33 rows" in capsys.readouterr().out
    _q_close(np.load(tmp_path / "q.npy"), q0)
    assert main(["refine", "--probs", str(tmp_path / "p.npy"), "--forget", str(tmp_path / "i.npy"),
                 "--out", str(tmp_path / "q2.npy"), "--memory-budget", "2KiB"]) == 0
    assert "in chunks of" in capsys.readouterr().out
    _q_close(np.load(tmp_path / "q2.npy"), q0)
    # Under the budget: the in-memory refine, same answer.
    assert main(["refine", "--probs", str(tmp_path / "p.npy"), "--forget", str(tmp_path / "f.npy"),
                 "--out", str(tmp_path / "q3.npy")]) == 0
    assert "in chunks" not in capsys.readouterr().out
    _q_close(np.load(tmp_path / "q3.npy"), q0)
    assert main(["refine", "--probs", str(tmp_path / "p.npy"), "--forget", str(tmp_path / "f.npy"),
                 "--out", str(tmp_path / "q4.npy"), "--memory-budget", "lots"]) == 2
    assert "--memory-budget: cannot read 'lots'" in capsys.readouterr().err


# -- torch.distributed (Gloo on localhost, spawned processes) -----------------------------------

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path, scenario: str, world: int) -> list:
    """Run ``dist_worker.py SCENARIO`` on ``world`` Gloo processes; each writes its results to
    ``tmp_path/rank{r}.npz``; returns them in rank order (a hang fails after 240 s)."""
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(tmp_path)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: a rank hung")
        outs.append(out)
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    return [dict(np.load(tmp_path / f"rank{r}.npz", allow_pickle=False)) for r in range(world)]


@pytest.fixture(scope="module")
def problem():
    from dist_worker import problem as make
    return make()


def test_distributed_two_ranks(tmp_path, problem):
    """2 ranks, uneven split: alpha as the single process's, each rank its own rows of Q; the
    same for solve() and for refine_file over row ranges of one file; errors on one rank raise
    on every rank, naming it."""
    p, mask = problem
    res = _run_ranks(tmp_path, "two", 2)
    splits = [0, 1234, len(p)]
    for name, kw in (("uniform", {}), ("prior", dict(pseudo="prior", lam=0.5)),
                     ("f32", dict(dtype=np.float32))):
        x = p.astype(kw.pop("dtype", np.float64))
        q0, i0 = refine(x, mask, return_info=True, **kw)
        tol = 1e-9 if x.dtype == np.float64 else 1e-6
        for r in range(2):
            assert float(np.abs(res[r][f"{name}_alpha"] - i0.alpha.numpy()).max()) <= tol
            _q_close(res[r][f"{name}_q"], q0[splits[r]:splits[r + 1]])
            assert int(res[r][f"{name}_iters"]) == i0.iterations
    np.testing.assert_array_equal(res[0]["uniform_alpha"], res[1]["uniform_alpha"])
    q0, i0 = refine(p, mask, tol=1e-11, return_info=True)  # the exact Hessian, all-reduced
    assert i0.converged
    for r in range(2):
        assert float(np.abs(res[r]["tight_alpha"] - i0.alpha.numpy()).max()) <= 1e-9
        _q_close(res[r]["tight_q"], q0[splits[r]:splits[r + 1]])
    qb, ib = refine(torch.from_numpy(p).to(torch.bfloat16), torch.from_numpy(mask),
                    return_info=True)
    for r in range(2):
        assert float(np.abs(res[r]["bf16_alpha"] - ib.alpha.numpy()).max()) <= 1e-6
        np.testing.assert_allclose(res[r]["bf16_q"], qb[splits[r]:splits[r + 1]].float().numpy(),
                                   rtol=2 ** -7, atol=1e-6)
    from dist_worker import weights
    q0, i0 = refine(p, mask, weights=weights(mask), return_info=True)
    for r in range(2):
        assert float(np.abs(res[r]["weights_alpha"] - i0.alpha.numpy()).max()) <= 1e-9
        _q_close(res[r]["weights_q"], q0[splits[r]:splits[r + 1]])
    # solve() on log P^ shards
    lp = np.log(p)
    c = np.where(mask, 1.0, 0.5)
    a0, _ = solve(lp, c, p.sum(0))
    for r in range(2):
        assert float(np.abs(res[r]["solve_alpha"] - a0).max()) <= 1e-9
    q0 = refine(p, mask)
    for r in range(2):
        _q_close(res[r]["file_q"], q0[splits[r]:splits[r + 1]])
    for r in range(2):
        msg = str(res[r]["nan_error"])
        assert "on rank 1" in msg and "row 17 contains NaN" in msg, msg
        assert "forget_mask" in str(res[r]["mask_error"]) and "rank 0" in str(res[r]["mask_error"])
        msg = str(res[r]["labels_error"])
        assert "forget_mask: an integer vector of length N = 1266 that repeats row 0" in msg, msg
        assert "looks like per-row labels" in msg and "rank 1" in msg, msg
        # info.timings of a sharded refine_file: seconds per phase (allreduce included), the
        # rows per chunk apart
        assert int(res[r]["file_chunk_rows"]) == 100
        phases = set(res[r]["file_phases"].tolist())
        assert {"prepare", "solve", "materialize", "allreduce"} <= phases
        assert "chunk_rows" not in phases
        assert (res[r]["file_seconds"] >= 0.0).all()


def test_distributed_three_ranks_edge_shards(tmp_path, problem):
    """3 ranks: one with zero rows; then every forget row on one rank."""
    p, mask = problem
    res = _run_ranks(tmp_path, "three", 3)
    q0, i0 = refine(p, mask, return_info=True)
    splits = [0, 0, 1500, len(p)]
    for r in range(3):
        assert float(np.abs(res[r]["empty_alpha"] - i0.alpha.numpy()).max()) <= 1e-9
        _q_close(res[r]["empty_q"], q0[splits[r]:splits[r + 1]])
    # float16: no first evaluation from prepare on any rank, the empty one included
    q16, i16 = refine(p.astype(np.float16), mask, return_info=True)
    for r in range(3):
        assert float(np.abs(res[r]["empty16_alpha"] - i16.alpha.numpy()).max()) <= 1e-6
        _q_close(res[r]["empty16_q"], q16[splits[r]:splits[r + 1]])
    m2 = np.zeros(len(p), dtype=bool)
    m2[2100:2300] = True  # all on rank 2 of the split [0, 700, 2000, N]
    q1, i1 = refine(p, m2, return_info=True, marginals="original")
    splits = [0, 700, 2000, len(p)]
    for r in range(3):
        assert float(np.abs(res[r]["onerank_alpha"] - i1.alpha.numpy()).max()) <= 1e-9
        _q_close(res[r]["onerank_q"], q1[splits[r]:splits[r + 1]])


def test_distributed_ranks_must_agree(tmp_path, problem):
    """Options that differ between the ranks raise on every rank, naming the option and each
    rank's value (they silently mixed two problems, or hung / aborted Gloo in a mismatched
    collective); an argument bad on one rank raises on both; float16 and float64 ranks solve one
    problem and leave the caller's next collective intact; two ranks writing one out_path are
    refused."""
    p, mask = problem
    res = _run_ranks(tmp_path, "disagree", 2)
    for r in range(2):
        for tag in ("lam", "method", "tol", "max_iter", "marginals", "pseudo", "weights"):
            msg = str(res[r][f"{tag}_error"])
            assert msg.startswith(f"{tag}: the ranks disagree (rank 0: "), (tag, msg)
            assert "expected the same value on every rank" in msg
        assert "0.5" in str(res[r]["lam_error"]) and "'sinkhorn'" in str(res[r]["method_error"])
        msg = str(res[r]["bad_method_error"])
        assert "method: unknown 'bogus'" in msg and "[on rank 1]" in msg, msg
        assert str(res[r]["solve_error"]).startswith("marginals: the ranks disagree")
        msg = str(res[r]["budget_error"])
        assert "memory_budget: cannot read 'abc'" in msg and "[on rank 1]" in msg, msg
        msg = str(res[r]["same_out_error"])
        assert msg.startswith("out_path: ranks 0 and 1 both write"), msg
        assert list(res[r]["leftovers"]) == []
        np.testing.assert_array_equal(res[r]["after"], [3000.0] * 3)
    np.testing.assert_array_equal(res[0]["mixed_alpha"], res[1]["mixed_alpha"])
    x = np.concatenate([p[:1234], p[1234:].astype(np.float16).astype(np.float64)])
    q0, i0 = refine(x, mask, return_info=True)
    # The float16 rank evaluates in float32: alpha as far from the float64 solve as float32
    # evaluation allows at tol 1e-6, Q within float16 rounding.
    assert float(np.abs(res[0]["mixed_alpha"] - i0.alpha.numpy()).max()) <= 1e-4
    q_all = np.concatenate([res[0]["mixed_q"], res[1]["mixed_q"]])
    assert float(np.abs(q_all - q0).max()) <= 1e-3
    assert float(res[0]["mixed_residual"]) == float(res[1]["mixed_residual"])
    assert "rounded to 16 bits on some" in str(res[0]["mixed_message"])
    assert "Q rounded to torch.float16" in str(res[1]["mixed_message"])
    # output_residual is that of the whole Q the ranks hold (q0's column sums are the target
    # within the float64 solve's tol)
    resid = float(np.abs(q_all.sum(0) - q0.sum(0)).sum()) / len(p)
    assert abs(float(res[0]["mixed_residual"]) - resid) <= 1e-5


def test_sharded_hostile_cases(tmp_path):
    """A hostile review's cases: ranks of different dtypes (float32 or float16 beside float64)
    made their solver decisions for their own dtype, stopped a pass apart and hung or aborted
    Gloo (2 of 6 seeds); now they decide for the coarsest rank and agree on alpha, near the
    whole problem's float64 solve. An error of another type than the four the collective checks
    caught (an OverflowError, a PermissionError) left the other rank waiting: now every rank
    raises it. Overlapping file ranges counted rows twice; a rank holding no rows could not
    pass a numpy out= (strides (0, 0)); a process_group that is not one got torch's raw error;
    with out= the input on every rank, a bad row on rank 1 was reported on rank 0 without saying
    that rank 0's input was overwritten too; a sparse or meta matrix on rank 1 failed there
    alone, inside torch, and rank 0 waited."""
    from dist_worker import mixed_problem, problem as dist_problem

    res = _run_ranks(tmp_path, "hostile", 2)
    for seed in range(1, 7):
        pm, mm = mixed_problem(seed)
        for low in (np.float32, np.float16):
            tag = f"mixed{seed}_{np.dtype(low).name}"
            np.testing.assert_array_equal(res[0][f"{tag}_alpha"], res[1][f"{tag}_alpha"])
            assert bool(res[0][f"{tag}_converged"]) and bool(res[1][f"{tag}_converged"])
            x = np.concatenate([pm[:1300].astype(low).astype(np.float64), pm[1300:]])
            q0, i0 = refine(x, mm, return_info=True)
            assert float(np.abs(res[0][f"{tag}_alpha"] - i0.alpha.numpy()).max()) <= 1e-4, tag
            q_all = np.concatenate([res[0][f"{tag}_q"], res[1][f"{tag}_q"]])
            assert float(np.abs(q_all - q0).max()) <= (1e-5 if low == np.float32 else 1e-3), tag
    for key in ("prior_alpha", "prior_passes", "prior_residual"):
        np.testing.assert_array_equal(res[0][key], res[1][key])
    assert float(res[0]["prior_residual"]) <= 1e-6
    for r in range(2):
        msg = str(res[r]["empty_weights_error"])
        assert msg.startswith("weights: shape (3,); expected (0,)") and "[on rank 1]" in msg, msg
        msg = str(res[r]["overflow_error"])
        assert msg.startswith("weights: an entry is too large for float64") and "[on rank 1]" in msg
        msg = str(res[r]["readonly_error"])
        assert msg.startswith("PermissionError: out_path: cannot create files in") and \
            "rodir" in msg and "[on rank 1]" in msg, msg
        msg = str(res[r]["overlap_error"])
        assert msg.startswith("rows: ranks 0 and 1 both read rows [1000, 1234)"), msg
        assert list(res[r]["leftovers"]) == []
        msg = str(res[r]["group_error"])
        assert msg.startswith("process_group: expected a torch.distributed ProcessGroup"), msg
        msg = str(res[r]["sparse_error"])
        assert msg.startswith("probs: a sparse_coo tensor; expected a dense (strided) tensor") \
            and "[on rank 1]" in msg, msg
        msg = str(res[r]["meta_error"])
        assert msg.startswith("probs: a meta tensor holds no data") and "[on rank 1]" in msg, msg
        msg = str(res[r]["in_place_error"])
        assert msg.startswith("probs on rank 1: row 2 contains NaN or Inf (out= is the input"), msg
        assert msg.endswith("out= is the input on rank 0 too: the pass has overwritten its rows "
                            "with log P^ (up to a bad row of its own)"), msg
        assert bool(res[r]["in_place_changed"]), r
    p, mask = dist_problem()
    assert res[0]["empty_out_q"].shape == (0, p.shape[1])
    np.testing.assert_allclose(res[1]["empty_out_q"], refine(p, mask), rtol=0, atol=1e-12)


def test_refine_file_refuses_what_it_would_overwrite_or_lose(tmp_path, monkeypatch):
    """Writing a row range onto its own input file would cut the file to that range; a
    write-protected out_path (or input, in place) was replaced; an unwritable folder raised a
    raw PermissionError naming the hidden temporary file; a folder as probs_path was 'no such
    file'; refine_file's forget argument was called forget_mask in its errors."""
    import ppu_fast.stream as stream
    from dist_worker import problem as dist_problem

    p, mask = dist_problem()
    path = tmp_path / "p.npy"
    np.save(path, p[:100])
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"out_path: is probs_path itself, and rows=\(10, 20\) "
                                         r"covers 10 of its 100 rows"):
        refine_file(path, mask[10:20], path, rows=(10, 20))
    assert path.read_bytes() == before
    refine_file(path, mask[:100], path, rows=(0, 100))  # the whole file in place is fine
    assert np.load(path).shape == (100, p.shape[1])
    real = os.access
    monkeypatch.setattr(stream.os, "access",
                        lambda f, m, **kw: "locked" not in str(f) and real(f, m, **kw))
    (tmp_path / "locked.npy").write_bytes(before)
    with pytest.raises(PermissionError, match=r"out_path: '.*locked\.npy' is write-protected"):
        refine_file(path, mask[:100], tmp_path / "locked.npy")
    assert (tmp_path / "locked.npy").read_bytes() == before
    (tmp_path / "locked_dir").mkdir()
    with pytest.raises(PermissionError, match=r"out_path: cannot create files in '.*locked_dir'"):
        refine_file(path, mask[:100], tmp_path / "locked_dir" / "q.npy")
    monkeypatch.setattr(stream.os, "access", real)
    with pytest.raises(ValueError, match=r"probs_path: '.*' is a directory; expected a \.npy"):
        refine_file(tmp_path, mask[:100], tmp_path / "q.npy")
    with pytest.raises(ValueError, match=r"^forget: "):
        refine_file(path, mask[:99], tmp_path / "q.npy")
    np.save(tmp_path / "f.npy", mask[:10])
    with pytest.raises(ValueError, match=r"one bool per row of rows=\(start, stop\)"):
        refine_file(path, tmp_path / "f.npy", tmp_path / "q.npy", rows=(0, 20))
    # a link to the input as out_path: the rename replaces the link, the input stays whole
    (tmp_path / "link.npy").symlink_to(path)
    whole = path.read_bytes()
    refine_file(path, mask[10:20], tmp_path / "link.npy", rows=(10, 20))
    assert path.read_bytes() == whole
    assert not (tmp_path / "link.npy").is_symlink()
    assert np.load(tmp_path / "link.npy").shape == (10, p.shape[1])
    # an error after the checks (here the progress bar) leaves no temporary file
    monkeypatch.setattr(stream, "_bar", lambda *a: (_ for _ in ()).throw(RuntimeError("bar")))
    with pytest.raises(RuntimeError, match="bar"):
        refine_file(path, mask[:100], tmp_path / "q.npy")
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []


def test_a_compiled_module_of_other_sources_is_refused_not_half_used():
    """An editable checkout pulled without rebuilding keeps an old ppu_fast._C, whose prepare
    packs the sampled weights where this code reads the assembled Hessian (a wrong first Newton
    step) and whose newton_direction has another signature (without the check every refine
    failed, the torch backend's too): the cpu backend is unavailable with a reason that says to
    rebuild, and the solver takes numpy."""
    code = (
        "import importlib, warnings, numpy as np, ppu_fast\n"
        "from ppu_fast import _C\n"
        "_C.INTERFACE = 1\n"
        "import ppu_fast.backends.cpu as cpu, ppu_fast.solver as solver\n"
        "importlib.reload(cpu); importlib.reload(solver)\n"
        "assert cpu._C is None and solver._C is None\n"
        "print(cpu.CpuBackend().available_reasons()[0])\n"
        "x = np.random.default_rng(0).dirichlet(np.ones(4), 300)\n"
        "q, info = ppu_fast.refine(x, np.arange(300) < 30, backend='torch', return_info=True)\n"
        "print('converged', info.converged)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    from ppu_fast.backends.cpu import _C_INTERFACE
    assert (f"was built from other sources (interface 1, this code needs {_C_INTERFACE}); "
            "rebuild") in out.stdout
    assert "converged True" in out.stdout


def test_process_group_documented():
    assert "process_group" in ppu_fast.refine.__doc__ and "process_group" in solve.__doc__


def test_documented_torchrun_example(tmp_path):
    """docs/examples/distributed_refine.py under torchrun, 2 Gloo processes, streaming each
    rank's row range: the ranks' outputs, concatenated, are the single-process Q."""
    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "distributed_refine.py"
    if not example.is_file():
        pytest.skip("docs/examples is not shipped with this copy")
    p = _probs(900, 5, np.float32, seed=21)
    mask = _mask(900, 0.1, seed=22)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "f.npy", mask)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), str(example),
                        str(tmp_path / "p.npy"), str(tmp_path / "f.npy"), str(tmp_path / "out"),
                        "--stream", "--chunk-rows", "64"],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ranks, N = 900" in r.stdout and "converged True" in r.stdout
    q = np.concatenate([np.load(tmp_path / "out" / f"q-rank{i}.npy") for i in range(2)])
    _q_close(q, refine(p, mask))


@pytest.mark.gpu
def test_documented_torchrun_example_on_nccl(tmp_path):
    """The same example on GPUs: NCCL, one process per GPU (one process where the machine has a
    single GPU: NCCL refuses two ranks on one device), each rank refining its rows as CUDA
    tensors; the all-reduces then run on the GPU (comm.Comm). Concatenated, the ranks' rows are
    the single-process CPU Q, to float32 rounding of another kernel."""
    import torch
    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "distributed_refine.py"
    if not example.is_file():
        pytest.skip("docs/examples is not shipped with this copy")
    world = min(2, torch.cuda.device_count())
    p = _probs(3000, 10, np.float32, seed=23)
    mask = _mask(3000, 0.1, seed=24)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "f.npy", mask)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                        str(world), "--master-port", str(_free_port()), str(example),
                        str(tmp_path / "p.npy"), str(tmp_path / "f.npy"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{world} ranks, N = 3000" in r.stdout and "converged True" in r.stdout
    q = np.concatenate([np.load(tmp_path / "out" / f"q-rank{i}.npy") for i in range(world)])
    np.testing.assert_allclose(q.astype(np.float64), refine(p, mask).astype(np.float64), rtol=0,
                               atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streaming_on_cuda(tmp_path, dtype):
    """device="cuda": chunks go through the pinned buffers and the side stream (two buffers in
    turn, more chunks than buffers); the answer is the CPU in-memory refine's, to float32
    rounding of a different kernel."""
    n, k = 5000, 12
    p = _probs(n, k, dtype, seed=31)
    mask = _mask(n, 0.1, seed=32)
    np.save(tmp_path / "p.npy", p)
    q0, i0 = refine(p, mask, return_info=True)
    for opts in ({}, dict(pseudo="prior", marginals="original")):
        q0, i0 = refine(p, mask, return_info=True, **opts)
        info = refine_file(tmp_path / "p.npy", mask, tmp_path / "q.npy", device="cuda",
                           chunk_rows=777, **opts)
        assert info.converged and info.backend in ("triton", "cuda", "torch")
        assert float((info.alpha - i0.alpha).abs().max()) <= 1e-5
        q = np.load(tmp_path / "q.npy")
        atol = 1e-5 if dtype == np.float32 else float(np.finfo(np.float16).eps)
        np.testing.assert_allclose(q.astype(np.float64), q0.astype(np.float64), rtol=0, atol=atol)


def test_streaming_float64_against_oracle(tmp_path):
    """Independent float64 check of a streamed solve (numpy only, tests/oracle.py): the file Q
    has the optimum's form softmax(log P^ - alpha / c) for the returned alpha, rows on the
    simplex, and the "retain" class totals, to float64 accuracy."""
    from oracle import oracle_q
    n, k, lam = 500, 9, 0.5
    p = _probs(n, k, np.float64, seed=41)
    mask = _mask(n, 0.1, seed=42)
    np.save(tmp_path / "p.npy", p)
    info = refine_file(tmp_path / "p.npy", mask, tmp_path / "q.npy", chunk_rows=37, lam=lam,
                       tol=1e-12)
    q = np.load(tmp_path / "q.npy")
    log_p_hat = np.log(p / p.sum(1, keepdims=True))
    log_p_hat[mask] = -np.log(k)  # uniform pseudo-probabilities
    inv_c = np.where(mask, 1.0, 1.0 / lam)
    np.testing.assert_allclose(q, oracle_q(log_p_hat, inv_c, info.alpha.numpy()), rtol=0,
                               atol=1e-12)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=0, atol=1e-12)
    m = p[~mask].sum(0) * n / (~mask).sum()
    assert np.abs(q.sum(0) - m).sum() / n <= 1e-11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("forget_share", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_scaled_weights_max_from_counts(dtype, lam, forget_share, weighted):
    # The sharded path derives max(1 / c) from global counts instead of a collective: it must be
    # the value the in-memory path reads off the scaled weights themselves.
    from ppu_fast import problem as pb
    from ppu_fast.comm import Comm
    from ppu_fast.sharded import _scaled_weights
    rng = np.random.default_rng(7)
    mask = rng.random(50) < forget_share
    weights = rng.uniform(0.5, 4.0, 50) if weighted else None
    inv_c, c_min, sums, n_forget = _scaled_weights(Comm(), mask, weights, lam, dtype)
    assert n_forget == int(mask.sum())
    assert inv_c.dtype == pb.inv_c_dtype(dtype)
    assert sums == pb.weight_sums(inv_c)


@pytest.mark.parametrize("weighted", [False, True])
def test_scaled_weights_extremes_agree_across_buffer_dtypes(weighted):
    # Ranks holding float64 and float32 buffers solve in the shared dtype, and take the solver's
    # choices from max and min inv_c: both must be that dtype's values on every rank. (A ratio
    # just under 100 in float64 rounds past it in float32: the log form's gate would differ.)
    from ppu_fast.comm import Comm
    from ppu_fast.sharded import _scaled_weights
    mask = np.zeros(4, bool)
    mask[0] = True
    weights = np.array([1.0, 1.0, 1.0, 1.0 / 0.0099999899988]) if weighted else None
    lam = 0.0099999899988
    _, _, sums32, _ = _scaled_weights(Comm(), mask, weights, lam, torch.float32)
    _, _, sums64, _ = _scaled_weights(Comm(), mask, weights, lam, torch.float64,
                                      solver_dtype=torch.float32)
    assert sums64[1] == sums32[1] and sums64[3] == sums32[3]
