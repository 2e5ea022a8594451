"""Problem families the solver is checked on, shared by tests/test_solver.py and
benchmarks/solver_sets.py (plain numpy / torch, no test dependencies, so that a benchmark run
from a checkout can import it)."""

from __future__ import annotations

import numpy as np
import torch


def probe_classifier(n, k, margin, seed, rare=None):
    """Probe 31's synthetic classifiers: labels (optionally the first rare[0] classes rare[1]x
    rarer), float64 logits + margin on the true class, float32 probabilities."""
    g = torch.Generator().manual_seed(seed)
    if rare is None:
        y = torch.randint(0, k, (n,), generator=g)
    else:
        w = torch.ones(k, dtype=torch.float64)
        w[:rare[0]] = 1 / rare[1]
        y = torch.multinomial(w, n, replacement=True, generator=g)
    lg = torch.randn(n, k, generator=g, dtype=torch.float64)
    lg[torch.arange(n), y] += margin
    return y, torch.softmax(lg, 1).float()


def saturated_family(seed: int):
    """(probs (n x k) float64, forget, pseudo, M, log P^) of a random feasible problem on a
    confident model: n <= 20, k in {3, 10, 32, 50, 100}, logit scale 3-20 plus a margin of 0-60
    on one class per row; targets a mix of the rows' totals and the uniform ("mix"), one heavy
    class among light ones ("peaked"), or every row forgotten (uniform P^, "allforget")."""
    r = np.random.default_rng(seed)
    n, k = int(r.integers(1, 21)), int(r.choice([3, 10, 32, 50, 100]))
    z = r.standard_normal((n, k)) * float(r.choice([3.0, 8.0, 20.0]))
    z[np.arange(n), r.integers(0, k, n)] += float(r.choice([0.0, 30.0, 60.0]))
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    kind = r.choice(["mix", "peaked", "allforget"])
    if kind == "mix":
        w = float(r.uniform(0.1, 0.9))
        return p, [], None, (1 - w) * p.sum(0) + w * n / k, np.log(p)
    if kind == "peaked":
        m = np.full(k, float(r.choice([1e-3, 1e-2])))
        m[int(r.integers(0, k))] = 1.0
        return p, [], None, m * (n / m.sum()), np.log(p)
    return (p, np.ones(n, dtype=bool), "uniform", 0.5 * p.sum(0) + 0.5 * n / k,
            np.full((n, k), -np.log(k)))
