"""The host cache of CPU solver buffers (csrc/cpu/host_cache.cpp via
``ppu_fast.backends.cpu.empty_buffer``): aligned, huge-page-advised blocks that return to the
cache only when the last tensor on them is freed, bounded by a limit, released by
``ppu_fast.empty_cache``, and never visible in a result (a block's stale contents included)."""

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
    """Each test starts from an empty cache with the default limit and leaves it so."""
    limit = ppu_fast.host_cache_stats()["limit_bytes"]
    ppu_fast.empty_cache()
    yield
    ppu_fast.set_host_cache_limit(limit)
    ppu_fast.empty_cache()


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
    ppu_fast.empty_cache()
    assert _stats()["cached_blocks"] == 0 and _stats()["cached_bytes"] == 0


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1024", None])
def test_a_bad_limit_is_refused(bad) -> None:
    with pytest.raises(ValueError, match=r"nbytes: expected an integer number of bytes >= 0"):
        ppu_fast.set_host_cache_limit(bad)


def test_the_environment_sets_the_limit(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "_host_limit_read", False)
    monkeypatch.setenv(cpu.HOST_CACHE_ENV, "lots")
    with pytest.raises(ValueError, match=r"PPU_FAST_HOST_CACHE_MB: expected a number of MiB "
                                         r">= 0 .*got 'lots'"):
        cpu.empty_buffer((2 * MIB,), torch.uint8, "cpu")
    monkeypatch.setenv(cpu.HOST_CACHE_ENV, "3")
    assert ppu_fast.host_cache_stats()["limit_bytes"] == 3 * MIB
    monkeypatch.setattr(cpu, "_host_limit_read", False)
    monkeypatch.setenv(cpu.HOST_CACHE_ENV, "-2")
    with pytest.raises(ValueError, match="PPU_FAST_HOST_CACHE_MB"):
        ppu_fast.host_cache_stats()


@pytest.mark.parametrize("numpy_in", [False, True])
def test_a_refine_never_sees_a_cached_blocks_stale_contents(numpy_in: bool) -> None:
    """A refine into a block that held NaN, inf and garbage gives, bit for bit, the refine into
    fresh zeroed pages (cache off): every value is written before it is read."""
    g = torch.Generator().manual_seed(3)
    n, k = 30_000, 20
    p = torch.softmax(4 * torch.randn(n, k, generator=g), dim=1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[::7] = True
    x, m = (p.numpy(), mask.numpy()) if numpy_in else (p, mask)
    ppu_fast.set_host_cache_limit(0)
    want = ppu_fast.refine(x, m, backend="cpu")
    ppu_fast.set_host_cache_limit(64 * MIB)
    junk = cpu.empty_buffer((n, k), torch.float32, "cpu")
    junk.view(torch.int32).copy_(torch.randint(-2**31, 2**31 - 1, (n, k), generator=g,
                                               dtype=torch.int32))
    junk[::3] = float("nan")
    junk[1::5] = float("inf")
    del junk
    hits = _stats()["hits"]
    got = ppu_fast.refine(x, m, backend="cpu")
    assert _stats()["hits"] == hits + 1  # it did reuse the block
    assert type(got) is type(want)
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))


def _child(q) -> None:
    # numpy, not torch ops: torch's OpenMP pool does not survive a fork of a process that used it.
    t = cpu.empty_buffer((1000, 1000), torch.float32, "cpu")
    a = t.numpy()
    a.fill(2.0)
    total = float(a.sum(dtype=np.float64))
    del a, t
    q.put((total, ppu_fast.host_cache_stats()["cached_blocks"]))


def test_a_forked_child_uses_its_own_cache() -> None:
    t = cpu.empty_buffer((1000, 1000), torch.float32, "cpu")
    del t  # the parent caches a block, which the child inherits
    assert _stats()["cached_blocks"] == 1
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q,))
    proc.start()
    try:
        total, blocks = q.get(timeout=60)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    # The child took the inherited block (a hit, no fault-in of the parent's pages needed) and
    # gave it back to its own cache.
    assert total == 2.0 * 1e6 and blocks == 1
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
