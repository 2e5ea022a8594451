"""float16 / bfloat16 probabilities: only Q is rounded to 16 bits. log P^ was kept in the input's
dtype, which rounds log p ~ -20 by up to 0.06 (bfloat16): at lam = 1e-4 a converged Q was 0.115
(bfloat16) / 0.048 (float16) from the refine of the same numbers in float32, 50-200x the
rounding of Q itself, with no warning (an outside review's differential test, 2026-12-06)."""
import numpy as np
import pytest
import torch

import ppu_fast

BACKENDS = ["cpu", "torch"]
# The GPU backends on CUDA tensors (benchmarks/gpu/check.sh runs them; skipped without a device):
# a 16-bit input goes through their prepare into a float32 buffer and their last pass writes Q.
GPU_BACKENDS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("cuda", "triton")]
HALF = [torch.bfloat16, torch.float16]


def confident(n=3000, k=10, margin=20.0, seed=3):
    r = np.random.default_rng(seed)
    z = r.standard_normal((n, k))
    z[np.arange(n), r.integers(0, k, n)] += margin
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), r.random(n) < 0.5


OPTIONS = dict(lam=1e-4, pseudo="prior", marginals="original")


def float32_answer(x16):
    # The same numbers in float32 (rows renormalised in float64, as the solver reads them).
    x = x16.cpu().double()
    return ppu_fast.refine((x / x.sum(1, keepdim=True)).float(), MASK, tol=1e-7, **OPTIONS)


P, MASK = confident()


@pytest.mark.parametrize("backend", BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_a_16_bit_refine_is_the_float32_refine_rounded(dtype, backend):
    device = "cpu" if backend in BACKENDS else "cuda"
    x = torch.tensor(P, dtype=dtype, device=device)
    before = x.clone()
    q, info = ppu_fast.refine(x, MASK, backend=backend, return_info=True, **OPTIONS)
    assert q.dtype == dtype and q.device == x.device and info.converged
    assert info.backend == backend and torch.equal(x, before)
    want = float32_answer(x)
    # Q's own rounding is half an ulp (<= eps / 2 for entries <= 1); the solves differ by ~1e-6.
    assert float((q.cpu().float() - want).abs().max()) <= torch.finfo(dtype).eps / 2 + 1e-5
    assert info.output_residual < 1e-2
    out = torch.empty_like(x)
    assert ppu_fast.refine(x, MASK, backend=backend, out=out, **OPTIONS) is out
    assert torch.equal(out, q)
    x2 = x.clone()
    assert ppu_fast.refine(x2, MASK, backend=backend, out=x2, **OPTIONS) is x2
    assert torch.equal(x2, q)


def test_a_float16_file_is_refined_as_in_memory(tmp_path):
    from ppu_fast.stream import refine_file

    x = P.astype(np.float16)
    np.save(tmp_path / "p.npy", x)
    info = refine_file(tmp_path / "p.npy", MASK, tmp_path / "q.npy", chunk_rows=700,
                       progress=False, **OPTIONS)
    q = np.load(tmp_path / "q.npy")
    assert q.dtype == np.float16 and info.converged
    want = float32_answer(torch.from_numpy(x)).numpy()
    assert np.abs(q.astype(np.float32) - want).max() <= torch.finfo(torch.float16).eps / 2 + 1e-5
    # the float32 scratch file of log P^ is gone
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.npy", "q.npy"]


def test_a_bfloat16_refine_over_a_process_group(tmp_path):
    import torch.distributed as dist

    x = torch.tensor(P, dtype=torch.bfloat16)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        q = ppu_fast.refine(x, MASK, process_group=dist.group.WORLD, **OPTIONS)
    finally:
        dist.destroy_process_group()
    assert q.dtype == torch.bfloat16
    want = float32_answer(x)
    assert float((q.float() - want).abs().max()) <= torch.finfo(torch.bfloat16).eps / 2 + 1e-5


def test_an_empty_input_or_row_range_is_named(tmp_path):
    from ppu_fast.stream import refine_file

    np.save(tmp_path / "p.npy", P[:10].astype(np.float16))
    with pytest.raises(ValueError, match=r"rows: \(4, 4\) holds N == 0 rows"):
        refine_file(tmp_path / "p.npy", [], tmp_path / "q.npy", rows=(4, 4), progress=False)
    np.save(tmp_path / "e.npy", np.zeros((0, 10), np.float16))
    with pytest.raises(ValueError, match="probs_path: .* has N == 0 rows"):
        refine_file(tmp_path / "e.npy", [], tmp_path / "q.npy", progress=False)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["e.npy", "p.npy"]


@pytest.mark.parametrize("dtype", HALF + [torch.float32, torch.float64])
def test_column_sums64(dtype):
    from ppu_fast.problem import column_sums64

    t = torch.rand(3001, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = t.to(dtype)
    got = column_sums64(t, chunk_elems=1000)  # 142 rows a chunk, the last one partial
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, t.double().sum(0), rtol=1e-13, atol=0)
