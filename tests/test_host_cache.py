"""The host cache of CPU solver buffers (csrc/cpu/host_cache.cpp via
``ppu_fast.backends.cpu.empty_buffer``): aligned, huge-page-advised blocks that return to the
cache only when the last tensor on them is freed, bounded by a limit, released by
``ppu_fast.empty_host_cache``, and never visible in a result (a block's stale contents included)."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

_C = pytest.importorskip("ppu_fast._C", reason="ppu_fast._C is not built (pip install -e .)")

import ppu_fast  # noqa: E402
from ppu_fast.backends import cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not _C.host_cache_available(),
                                reason="the host cache maps memory on Linux only")

MIB = 1 << 20
HUGE = 2 * MIB


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts from an empty cache with a known limit (whatever PPU_FAST_HOST_CACHE_MB
    says) and leaves the limit it found."""
    limit = ppu_fast.host_cache_stats()["limit_bytes"]
    ppu_fast.empty_host_cache()
    ppu_fast.set_host_cache_limit(256 * MIB)
    yield
    ppu_fast.set_host_cache_limit(limit)
    ppu_fast.empty_host_cache()


def _stats() -> dict:
    return ppu_fast.host_cache_stats()


def test_a_large_buffer_is_an_aligned_writable_block() -> None:
    before = _stats()
    buf = cpu.empty_buffer((50_000, 10), torch.float32, "cpu")
    assert buf.shape == (50_000, 10) and buf.dtype == torch.float32 and buf.is_contiguous()
    assert buf.data_ptr() % HUGE == 0
    buf.fill_(0.25)
    assert float(buf.double().sum()) == 0.25 * 50_000 * 10
    assert _stats()["misses"] == before["misses"] + 1
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        t = cpu.empty_buffer([700, 1000], dt, torch.device("cpu"))
        assert t.shape == (700, 1000) and t.dtype == dt
    # Small buffers are torch's own (a 2 MiB-granular block would waste more than it saves).
    small = cpu.empty_buffer((5, 3), torch.float16, "cpu")
    assert small.shape == (5, 3) and small.dtype == torch.float16
    small.untyped_storage().resize_(64)  # torch's storage: resizable
    assert _stats()["misses"] == before["misses"] + 4


def test_a_block_returns_only_when_its_last_view_is_freed() -> None:
    buf = cpu.empty_buffer((1000, 1000), torch.float32, "cpu")
    ptr = buf.data_ptr()
    view = buf[10:20].view(torch.int32)
    arr = buf.numpy()[5:]
    del buf
    assert _stats()["cached_blocks"] == 0  # views still use it
    view.fill_(7)
    assert int(view[0, 0]) == 7
    del view
    assert _stats()["cached_blocks"] == 0
    arr[:] = 1.5
    del arr
    s = _stats()
    assert s["cached_blocks"] == 1 and s["cached_bytes"] == 2 * HUGE
    hits = s["hits"]
    again = cpu.empty_buffer((1000, 1000), torch.float32, "cpu")
    assert again.data_ptr() == ptr and _stats()["hits"] == hits + 1
    assert _stats()["cached_blocks"] == 0


def test_a_cached_block_serves_only_close_sizes() -> None:
    big = cpu.empty_buffer((6 * MIB,), torch.uint8, "cpu")  # 6 MiB: a 6 MiB block
    del big
    hits = _stats()["hits"]
    small = cpu.empty_buffer((2 * MIB,), torch.uint8, "cpu")  # would waste 4 MiB of 6
    assert _stats()["hits"] == hits and _stats()["cached_blocks"] == 1
    near = cpu.empty_buffer((5 * MIB,), torch.uint8, "cpu")  # rounds to 6 MiB: the block
    assert _stats()["hits"] == hits + 1 and _stats()["cached_blocks"] == 0
    del small, near


def test_the_limit_bounds_what_the_cache_keeps() -> None:
    ppu_fast.set_host_cache_limit(0)
    a = cpu.empty_buffer((3 * MIB,), torch.uint8, "cpu")
    del a
    assert _stats()["cached_bytes"] == 0
    ppu_fast.set_host_cache_limit(5 * MIB)  # room for one 4 MiB block
    a = cpu.empty_buffer((3 * MIB,), torch.uint8, "cpu")
    b = cpu.empty_buffer((3 * MIB,), torch.uint8, "cpu")
    b_ptr = b.data_ptr()
    del a, b  # b's block evicts a's, the older
    s = _stats()
    assert s["cached_blocks"] == 1 and s["cached_bytes"] == 4 * MIB
    c = cpu.empty_buffer((3 * MIB,), torch.uint8, "cpu")
    assert c.data_ptr() == b_ptr
    del c
    ppu_fast.set_host_cache_limit(MIB)  # below the cached block: released now
    assert _stats()["cached_bytes"] == 0
    ppu_fast.set_host_cache_limit(64 * MIB)
    d = cpu.empty_buffer((3 * MIB,), torch.uint8, "cpu")
    del d
    assert _stats()["cached_blocks"] == 1
    ppu_fast.empty_host_cache()
    assert _stats()["cached_blocks"] == 0 and _stats()["cached_bytes"] == 0


@pytest.mark.parametrize("bad", [True, 1.5, "1024", None])
def test_a_limit_of_another_type_is_refused(bad) -> None:
    with pytest.raises(TypeError, match=r"nbytes: expected an integer number of bytes, got"):
        ppu_fast.set_host_cache_limit(bad)


def test_a_negative_limit_is_refused_and_a_huge_one_means_none() -> None:
    with pytest.raises(ValueError, match=r"nbytes: expected a number of bytes >= 0, got -1"):
        ppu_fast.set_host_cache_limit(-1)
    ppu_fast.set_host_cache_limit(2**64)
    assert _stats()["limit_bytes"] == 2**63 - 1
    ppu_fast.set_host_cache_limit(np.int64(3 * MIB))
    assert _stats()["limit_bytes"] == 3 * MIB


@pytest.mark.parametrize("value", ["lots", "-2", "nan", ""])
def test_a_bad_environment_limit_names_the_variable(monkeypatch, value: str) -> None:
    monkeypatch.setattr(cpu, "_host_limit_read", False)
    monkeypatch.setenv(cpu.HOST_CACHE_ENV, value)
    if value == "":  # unset in effect: the limit stays
        cpu.check_host_cache_env()
        assert _stats()["limit_bytes"] == 256 * MIB
        return
    with pytest.raises(ValueError, match=r"PPU_FAST_HOST_CACHE_MB: expected a number of MiB "
                                         rf">= 0 .*got '{value}'"):
        cpu.empty_buffer((2 * MIB,), torch.uint8, "cpu")
    with pytest.raises(ValueError, match="PPU_FAST_HOST_CACHE_MB"):
        cpu.check_host_cache_env()


@pytest.mark.parametrize("value, want", [("3", 3 * MIB), ("0.5", MIB // 2), ("0", 0),
                                         ("inf", 2**63 - 1), ("1e300", 2**63 - 1)])
def test_the_environment_sets_the_limit(monkeypatch, value: str, want: int) -> None:
    monkeypatch.setattr(cpu, "_host_limit_read", False)
    monkeypatch.setenv(cpu.HOST_CACHE_ENV, value)
    assert ppu_fast.host_cache_stats()["limit_bytes"] == want


def test_the_command_line_checks_the_environment_limit_first(monkeypatch) -> None:
    from ppu_fast.cli import _check_backend_environment
    monkeypatch.setattr(cpu, "_host_limit_read", False)
    monkeypatch.setenv(cpu.HOST_CACHE_ENV, "many")
    with pytest.raises(ValueError, match="PPU_FAST_HOST_CACHE_MB"):
        _check_backend_environment("cpu")


def test_impossible_sizes_raise_memory_errors() -> None:
    with pytest.raises(MemoryError):
        _C.HostBuffer(2**64 - 1)
    with pytest.raises(MemoryError, match=r"cannot allocate a \(2147483647, 2147483649\) "
                                          r"torch.float32 buffer"):
        cpu.empty_buffer((2147483647, 2147483649), torch.float32, "cpu")
    assert _stats()["cached_blocks"] == 0


def test_a_failed_mapping_releases_the_cache_and_retries() -> None:
    """Under an address-space limit that the cached blocks fill, a request they cannot serve
    succeeds after the cache is released (in a child process, which the limit then binds)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import resource, torch, ppu_fast
        from ppu_fast.backends import cpu
        MIB = 1 << 20
        ppu_fast.set_host_cache_limit(1 << 40)
        keep = [cpu.empty_buffer((400 * MIB,), torch.uint8, "cpu") for _ in range(2)]
        del keep  # 800 MiB cached
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * MIB, resource.RLIM_INFINITY))
        t = cpu.empty_buffer((300 * MIB,), torch.uint8, "cpu")  # a 400 MiB block is too large
        t[::4096] = 1
        print(ppu_fast.host_cache_stats()["cached_blocks"], int(t[::4096].sum()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    blocks, total = (int(v) for v in out.stdout.split())
    assert blocks == 0 and total == 300 * MIB // 4096


@pytest.mark.parametrize("case", ["float32", "numpy", "float16"])
def test_a_refine_never_sees_a_cached_blocks_stale_contents(case: str) -> None:
    """A refine into blocks that held NaN, inf and garbage gives, bit for bit, the refine into
    fresh zeroed pages (cache off): every value is written before it is read. float16: both
    the float32 working buffer and the float16 result come from such blocks."""
    g = torch.Generator().manual_seed(3)
    n, k = 30_000, 20
    p = torch.softmax(4 * torch.randn(n, k, generator=g), dim=1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[::7] = True
    if case == "float16":
        p = p.half()
    x, m = (p.numpy(), mask.numpy()) if case == "numpy" else (p, mask)
    ppu_fast.set_host_cache_limit(0)
    want = ppu_fast.refine(x, m, backend="cpu")
    ppu_fast.set_host_cache_limit(64 * MIB)
    dtypes = [torch.float32] + ([torch.float16] if case == "float16" else [])
    junk = [cpu.empty_buffer((n, k), dt, "cpu") for dt in dtypes]
    for j in junk:
        raw = j.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
        j[::3] = float("nan")
        j[1::5] = float("inf")
    del junk, j, raw
    hits = _stats()["hits"]
    got = ppu_fast.refine(x, m, backend="cpu")
    assert _stats()["hits"] == hits + len(dtypes)  # it did reuse the blocks
    assert type(got) is type(want)
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))


def _child(q) -> None:
    # numpy, not torch ops: torch's OpenMP pool does not survive a fork of a process that used it.
    t = cpu.empty_buffer((1000, 1000), torch.float32, "cpu")
    a = t.numpy()
    a.fill(2.0)
    total = float(a.sum(dtype=np.float64))
    del a, t
    s = ppu_fast.host_cache_stats()
    q.put((total, s["cached_blocks"], s["hits"]))


def test_a_forked_child_uses_its_own_cache() -> None:
    t = cpu.empty_buffer((1000, 1000), torch.float32, "cpu")
    del t  # the parent caches a block, which the child inherits
    assert _stats()["cached_blocks"] == 1
    hits = _stats()["hits"]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q,))
    proc.start()
    try:
        total, blocks, child_hits = q.get(timeout=60)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    # The child took the inherited block (a hit, no fault-in of the parent's pages needed) and
    # gave it back to its own cache.
    assert total == 2.0 * 1e6 and blocks == 1 and child_hits == hits + 1
    assert _stats()["cached_blocks"] == 1  # the parent's block is still its own


def test_solver_buffers_go_back_to_the_cache() -> None:
    """A refine's result and a float16 input's float32 working buffer both come from the cache
    (two misses on an empty cache), and both return to it once freed."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(60_000, 10, generator=g), dim=1).half()
    mask = torch.arange(60_000) % 10 == 0
    before = _stats()
    q = ppu_fast.refine(p, mask, backend="cpu")
    s = _stats()
    assert s["misses"] == before["misses"] + 2
    assert s["cached_blocks"] == 1  # the float32 buffer, freed on return
    assert q.dtype == torch.float16 and q.data_ptr() % HUGE == 0
    del q
    assert _stats()["cached_blocks"] == 2
    assert _stats()["cached_bytes"] == HUGE + 4 * MIB
