"""The compiled pricing pass of the sparse EMD solver agrees with brute-force numpy float64 pricing."""

from __future__ import annotations

import numpy as np
import pytest

import histoexpr as hx
from histoexpr.metrics._emd import GridSolver, _full_solve, _split
from histoexpr.metrics._emd_pricing import price_pairs


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


def _reduced_costs(xs, xd, phs, phd):
    return np.sqrt(((xs[:, None, :] - xd[None, :, :]) ** 2).sum(-1)) - phs[:, None] + phd[None, :]


@pytest.mark.parametrize("perturb", [0.0, 1e-7, 0.3])
def test_pricing_finds_the_exact_minimum_and_the_most_violated_pairs(perturb):
    diff, rc = _diff(30, 0)
    sol, phi, _ = _full_solve(diff, rc, 10**7)
    src, dst, _, _ = _split(diff)
    rng = np.random.default_rng(1)
    xs, xd = rc[src], rc[dst]
    phs = phi[src] + perturb * rng.normal(size=src.sum())
    phd = phi[dst]
    r = _reduced_costs(xs, xd, phs, phd)
    worst, rows, cols = price_pairs(xs, xd, phs, phd, thr=-1e-9, k=4, col_best=True)
    assert worst == pytest.approx(r.min(), abs=1e-13)
    violated_rows = np.flatnonzero((r < -1e-9).any(1))
    violated_cols = np.flatnonzero((r < -1e-9).any(0))
    if not violated_rows.size:
        assert rows is None
        return
    assert (r[rows, cols] < -1e-9).all()  # only true violators
    assert set(violated_rows) <= set(rows) and set(violated_cols) <= set(cols)  # every row and column represented
    for i in violated_rows[:50]:  # each row's pairs are its 4 most violated
        got = np.sort(r[i, np.unique(cols[rows == i])])[:4]
        assert np.allclose(got, np.sort(r[i])[: len(got)], atol=1e-13)
        assert len(got) == min(4, int((r[i] < -1e-9).sum()))


def test_pricing_without_threshold_returns_the_k_cheapest_pairs_of_every_row():
    diff, rc = _diff(20, 3)
    src, dst, _, _ = _split(diff)
    xs, xd = rc[src], rc[dst]
    phs, phd = np.zeros(len(xs)), np.zeros(len(xd))
    _, rows, cols = price_pairs(xs, xd, phs, phd, thr=np.inf, k=3, col_best=False)
    assert np.array_equal(np.bincount(rows, minlength=len(xs)), np.full(len(xs), 3))
    d = _reduced_costs(xs, xd, phs, phd)
    for i in range(len(xs)):
        assert np.allclose(np.sort(d[i, cols[rows == i]]), np.sort(d[i])[:3])


def test_sparse_solver_matches_the_dense_reference_on_a_multilevel_grid():
    diff, rc = _diff(40, 2)
    sparse = GridSolver(rc, min_cells=300).solve(diff, solver="sparse")
    full = GridSolver(rc).solve(diff, solver="full")
    assert sparse.solver == "sparse" and sparse.certified and full.certified
    assert abs(sparse.value - full.value) < 1e-9
