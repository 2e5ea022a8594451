"""What another PPU front end needs: P^ with its own weights in one call, the official code's
conventions by name, numpy in / numpy out, lists for vectors, and the CLI's --logits / --weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ppu_fast
from oracle import oracle_solve
from ppu_fast.cli import main


def _p_hat(n=2000, k=10, seed=0):
    """(P, forget mask, P^ with uniform-draw pseudo rows, 1 / entropy weights of P^)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, 1).float()
    mask = logits.argmax(1) == 2
    u = torch.rand(int(mask.sum()), k, generator=g, dtype=torch.float64)
    p_hat = p.clone()
    p_hat[mask] = (u / u.sum(1, keepdim=True)).float()
    p_hat = p_hat / p_hat.sum(1, keepdim=True)
    ent = -(p_hat.double() * torch.log(p_hat.double())).sum(1)
    return p, mask, p_hat, 1.0 / ent


@pytest.mark.parametrize("marginals", ["pseudo", "retain", "custom"])
def test_refine_with_p_hat_and_weights_equals_solve_and_targets(marginals):
    _, mask, p_hat, w = _p_hat()
    rows = p_hat.double() / p_hat.double().sum(1, keepdim=True)  # as refine reads them
    if marginals == "pseudo":
        m = rows.sum(0)
    elif marginals == "retain":
        m = rows[~mask].sum(0) * 2000 / int((~mask).sum())
    else:
        m = rows.sum(0) * 0.7 + 0.3 * 200.0
        m = m * 2000 / m.sum()
        marginals = m
    q, info = ppu_fast.refine(p_hat, mask, pseudo=None, weights=w, marginals=marginals, tol=1e-7,
                              return_info=True)
    alpha, info2 = ppu_fast.solve(torch.log(p_hat), w, m, tol=1e-7)
    q2 = ppu_fast.targets(torch.log(p_hat), w, alpha)
    assert info.converged and info2.converged
    assert torch.allclose(q, q2, atol=2e-6)
    _, q_ora = oracle_solve(torch.log(rows), w, m)
    assert np.abs(q.double().numpy() - q_ora).max() <= 2e-5


def test_pseudo_targets_are_p_hats_own_totals_so_q_is_p_hat():
    """The official code's target (P^'s own column sums) is met by P^ itself: Q = P^ at alpha 0."""
    _, mask, p_hat, w = _p_hat()
    q, info = ppu_fast.refine(p_hat, mask, pseudo=None, weights=w, marginals="pseudo",
                              return_info=True)
    assert info.iterations == 1 and torch.allclose(q, p_hat, atol=1e-6)


def test_pseudo_none_equals_passing_the_same_rows_as_pseudo():
    p, mask, p_hat, _ = _p_hat()
    for marginals in ("retain", "original", "pseudo"):
        a = ppu_fast.refine(p_hat, mask, pseudo=None, marginals=marginals)
        b = ppu_fast.refine(p, mask, pseudo=p_hat[mask], marginals=marginals)
        if marginals == "original":  # P^'s totals for pseudo=None, P's for the other call
            continue
        assert torch.allclose(a, b, atol=1e-6), marginals
    # "original" with pseudo=None means P^'s totals, which "pseudo" also names.
    assert torch.allclose(ppu_fast.refine(p_hat, mask, pseudo=None, marginals="original"),
                          ppu_fast.refine(p_hat, mask, pseudo=None, marginals="pseudo"), atol=1e-6)


def test_random_pseudo_names():
    p, mask, _, _ = _p_hat()
    n_f = int(mask.sum())
    g = torch.Generator().manual_seed(7)
    u = torch.rand(n_f, 10, generator=g, dtype=torch.float64)
    rows = (u / u.sum(1, keepdim=True)).float()
    got = ppu_fast.refine(p, mask, pseudo="random-simplex", generator=torch.Generator().manual_seed(7))
    assert torch.allclose(got, ppu_fast.refine(p, mask, pseudo=rows), atol=1e-6)
    z = torch.randn(n_f, 10, generator=torch.Generator().manual_seed(7))
    got = ppu_fast.refine(p, mask, pseudo="random", generator=torch.Generator().manual_seed(7))
    assert torch.allclose(got, ppu_fast.refine(p, mask, pseudo=torch.softmax(z, 1)), atol=1e-6)


def test_weights_and_lam_together_are_refused():
    p, mask, _, w = _p_hat()
    with pytest.raises(ValueError, match="weights, lam: pass one of them"):
        ppu_fast.refine(p, mask, lam=2.0, weights=w)
    with pytest.raises(ValueError, match=r"weights: shape \(3,\); expected \(2000,\)"):
        ppu_fast.refine(p, mask, weights=[1.0, 2.0, 3.0])


def test_numpy_in_numpy_out_and_lists_for_vectors():
    _, mask, p_hat, w = _p_hat(n=300, k=4)
    lp = np.log(p_hat.numpy())
    m = (p_hat.double().sum(0) * 0.5 + 0.5 * 75.0).tolist()
    alpha, info = ppu_fast.solve(lp, w.tolist(), m)
    assert isinstance(alpha, np.ndarray) and alpha.dtype == np.float64 and alpha.shape == (4,)
    q = ppu_fast.targets(lp, w.numpy(), alpha.tolist())
    assert isinstance(q, np.ndarray) and q.dtype == np.float32
    q2 = ppu_fast.refine(p_hat.numpy(), mask.numpy(), pseudo=None, weights=w.tolist(),
                         marginals=m)
    assert isinstance(q2, np.ndarray) and np.allclose(q, q2, atol=2e-6)


def test_cli_refine_with_logits_and_weights(tmp_path, capsys):
    p, mask, p_hat, w = _p_hat(n=400, k=5)
    logits = torch.log(p_hat) + 3.0  # any per-row shift: log-softmax is taken inside
    np.save(tmp_path / "lg.npy", logits.numpy())
    np.save(tmp_path / "m.npy", mask.numpy())
    np.save(tmp_path / "w.npy", w.numpy())
    out = tmp_path / "q.npy"
    assert main(["refine", "--logits", str(tmp_path / "lg.npy"), "--forget", str(tmp_path / "m.npy"),
                 "--weights", str(tmp_path / "w.npy"), "--pseudo", "none", "--marginals", "retain",
                 "--out", str(out)]) == 0
    expected = ppu_fast.refine(p_hat, mask, pseudo=None, weights=w, marginals="retain")
    assert np.allclose(np.load(out), expected.numpy(), atol=2e-6)
    assert "converged True" in capsys.readouterr().out
    assert main(["refine", "--logits", str(tmp_path / "lg.npy"), "--forget", str(tmp_path / "m.npy"),
                 "--weights", str(tmp_path / "w.npy"), "--lam", "2", "--out", str(out)]) == 2
    assert "--weights, --lam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["refine", "--probs", "a.npy", "--logits", "b.npy", "--forget", "m.npy",
              "--out", str(out)])
