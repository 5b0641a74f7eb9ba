"""The float32-screened exact pricing of the sparse EMD solver agrees with plain float64 pricing."""

from __future__ import annotations

import numpy as np
import pytest

import histoexpr as hx
from histoexpr.metrics import _emd
from histoexpr.metrics._emd import GridSolver, _certificate, _full_solve, _Pricer, _split


def _diff(n: int, seed: int):
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rc = np.c_[r.ravel(), c.ravel()].astype(float)
    f = np.zeros((n * n, 2))
    for _ in range(4):
        cen, s = rng.uniform(0, n, 2), rng.uniform(n / 8, n / 3)
        f += rng.normal(size=2) * np.exp(-((rc - cen) ** 2).sum(1) / (2 * s * s))[:, None]
    a = hx.metrics.percentile_scores(f)
    a /= a.sum(0)
    return a[:, 0] - a[:, 1], rc


@pytest.mark.parametrize("perturb", [0.0, 1e-7, 0.3])
def test_screened_pricing_is_exact(perturb):
    diff, rc = _diff(30, 0)
    sol, phi, _ = _full_solve(diff, rc, 10**7)
    src, dst, s, d = _split(diff)
    rng = np.random.default_rng(1)
    phs = phi[src] + perturb * rng.normal(size=src.sum())
    phd = phi[dst]
    pricer = _Pricer(rc[src], rc[dst])
    assert pricer.D is not None
    v_ref, g_ref, i_ref, _ = _certificate(s, d, rc[src], rc[dst], phs, phd, sol.value, per_row=4)
    v, g, i, j = pricer.certificate(s, d, phs, phd, sol.value, tol=1e-9, per_row=4)
    assert v == pytest.approx(v_ref, abs=1e-13) and g == pytest.approx(g_ref, abs=1e-13)
    if i_ref is None:
        assert i is None
    else:  # every returned pair is a true violator, and every violated row is represented
        r = np.hypot(*(rc[src][i] - rc[dst][j]).T) - phs[i] + phd[j]
        assert (r < -1e-9).all()
        assert set(np.unique(i_ref)) <= set(np.unique(i))


def test_sparse_solver_same_with_and_without_distance_cache(monkeypatch):
    diff, rc = _diff(40, 2)
    cached = GridSolver(rc, min_cells=300).solve(diff, solver="sparse")
    monkeypatch.setattr(_emd, "_CACHE_BYTES", 0)
    plain = GridSolver(rc, min_cells=300).solve(diff, solver="sparse")
    full = GridSolver(rc).solve(diff, solver="full")
    assert cached.certified and plain.certified
    assert abs(cached.value - full.value) < 1e-9 and abs(plain.value - full.value) < 1e-9
