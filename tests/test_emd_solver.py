"""EMD solvers: sparse multiscale column generation vs the dense reference, certificate, inf input, Dask."""

from __future__ import annotations

import numpy as np
import pytest

import histoexpr as hx
from histoexpr.metrics._emd import GridSolver, _full_solve


def _smooth_pair(n: int, seed: int, holes: bool = False):
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rc = np.c_[r.ravel(), c.ravel()].astype(float)

    def field():
        f = np.zeros(n * n)
        for _ in range(5):
            cen, s = rng.uniform(0, n, 2), rng.uniform(n / 10, n / 3)
            f += rng.normal() * np.exp(-((rc - cen) ** 2).sum(1) / (2 * s * s))
        return f

    truth = field()
    pred = truth + 0.5 * field() + 0.3 * truth.std() * rng.normal(size=n * n)
    if holes:
        keep = (rc[:, 0] - n / 2) ** 2 + (rc[:, 1] - n / 2) ** 2 < (0.45 * n) ** 2  # a round "tissue"
        return pred[keep, None], truth[keep, None], rc[keep]
    return pred[:, None], truth[:, None], rc


@pytest.mark.parametrize(("n", "seed", "holes"), [(36, 0, False), (40, 1, True), (44, 2, False)])
def test_sparse_equals_full_and_is_certified(n, seed, holes):
    pred, truth, rc = _smooth_pair(n, seed, holes)
    a = hx.metrics.percentile_scores(pred)[:, 0]
    b = hx.metrics.percentile_scores(truth)[:, 0]
    diff = a / a.sum() - b / b.sum()
    grid = GridSolver(rc, min_cells=200)  # force >= 2 levels on these small grids
    sparse = grid.solve(diff, solver="sparse")
    full = grid.solve(diff, solver="full")
    assert sparse.solver == "sparse" and sparse.rounds >= 2
    assert sparse.certified and full.certified
    assert abs(sparse.value - full.value) < 1e-9
    assert 0 <= sparse.gap <= 1e-9 and sparse.violation <= 1e-9


def test_certificate_detects_a_wrong_dual():
    pred, truth, rc = _smooth_pair(20, 3)
    a = hx.metrics.percentile_scores(pred)[:, 0]
    b = hx.metrics.percentile_scores(truth)[:, 0]
    diff = a / a.sum() - b / b.sum()
    sol, phi, _ = _full_solve(diff, rc, 10**7)
    from histoexpr.metrics._emd import _certificate, _split

    src, dst, s, d = _split(diff)
    viol, gap, _, _ = _certificate(s, d, rc[src], rc[dst], phi[src], phi[dst], sol.value)
    assert viol < 1e-9 and gap < 1e-9
    # a uniform shift of the potentials is no error (the bound corrects for it) ...
    viol, gap, _, _ = _certificate(s, d, rc[src], rc[dst], phi[src] + 0.5, phi[dst], sol.value)
    assert viol == pytest.approx(0.5, abs=1e-9) and gap < 1e-9
    # ... a wrong potential is: the violation is found and the proven gap opens
    bad = phi[src].copy()
    bad[0] += 0.5
    viol, gap, rows, cols = _certificate(s, d, rc[src], rc[dst], bad, phi[dst], sol.value, per_row=4)
    assert viol > 0.1 and gap > 1e-3 and 0 in rows


def test_emd_reports_certificate_columns_and_solver_choice():
    pred, truth, rc = _smooth_pair(24, 4)
    genes = ["g"]
    full = hx.metrics.emd(pred, truth, coords=rc, genes=genes, solver="full", n_jobs=1)
    sparse = hx.metrics.emd(pred, truth, coords=rc, genes=genes, solver="sparse", n_jobs=1)
    for res in (full, sparse):
        assert res["certified"].all()
        assert (res["gap"] <= 1e-9).all() and (res["max_reduced_cost_violation"] <= 1e-9).all()
    assert full["solver"].iloc[0] == "full"
    assert abs(full["emd"].iloc[0] - sparse["emd"].iloc[0]) < 1e-9
    auto = hx.metrics.emd(pred, truth, coords=rc, genes=genes, n_jobs=1)  # 576 cells: the dense reference
    assert auto["solver"].iloc[0] == "full"
    with pytest.raises(ValueError, match="solver must be"):
        hx.metrics.emd(pred, truth, coords=rc, solver="nope")


def test_inf_raises_naming_the_gene_or_is_dropped_with_a_warning():
    pred, truth, rc = _smooth_pair(12, 5)
    pred = np.c_[pred, pred * 2]
    truth = np.c_[truth, truth]
    pred[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"inf.*geneB: 1 predicted tile"):
        hx.metrics.emd(pred, truth, coords=rc, genes=["geneA", "geneB"], n_jobs=1)
    with pytest.warns(UserWarning, match="geneB"):
        res = hx.metrics.emd(pred, truth, coords=rc, genes=["geneA", "geneB"], on_inf="drop", n_jobs=1)
    assert res.loc["geneB", "n_tiles"] == len(rc) - 1
    ok = np.ones(len(rc), bool)
    ok[3] = False
    sub = hx.metrics.emd(pred[ok, 1:], truth[ok, 1:], coords=rc[ok], genes=["geneB"], n_jobs=1)
    assert res.loc["geneB", "emd"] == pytest.approx(sub["emd"].iloc[0], abs=1e-12)


@pytest.mark.parametrize("n", [20, 42])  # 42² = 1,764 cells: the sparse solver (kernel compiled before forking)
def test_processes_equal_serial(n):
    rng = np.random.default_rng(6)
    pred, truth, rc = _smooth_pair(n, 6)
    P = pred + rng.normal(size=(len(rc), 4))
    T = np.repeat(truth, 4, axis=1)
    serial = hx.metrics.emd(P, T, coords=rc, n_jobs=1)
    parallel = hx.metrics.emd(P, T, coords=rc, n_jobs=2)
    np.testing.assert_array_equal(serial["emd"].to_numpy(), parallel["emd"].to_numpy())
    assert parallel["certified"].all()
    assert set(parallel["solver"]) == {"sparse" if n * n > 1500 else "full"}


@pytest.mark.slow
def test_dask_local_cluster_equals_local():
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(7)
    pred, truth, rc = _smooth_pair(24, 7)
    P = pred + rng.normal(size=(len(rc), 8))
    T = np.repeat(truth, 8, axis=1)
    local = hx.metrics.emd(P, T, coords=rc, n_jobs=1)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        remote = hx.metrics.emd(P, T, coords=rc, client=client)
    np.testing.assert_array_equal(local["emd"].to_numpy(), remote["emd"].to_numpy())
    assert remote["certified"].all()
