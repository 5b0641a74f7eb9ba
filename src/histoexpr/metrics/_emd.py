"""Earth mover's distance between predicted and measured spatial maps (SEQUOIA protocol, exact solver)."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

# ---------------------------------------------------------------------------------------------
# Pairing predicted and measured maps on one tile grid
# ---------------------------------------------------------------------------------------------


@dataclass
class PairedMaps:
    """Predicted and measured values of the same tiles and genes (private container)."""

    pred: np.ndarray  # (n_tiles, n_genes) float64, NaN = no value
    truth: np.ndarray  # (n_tiles, n_genes)
    coords: np.ndarray | None  # (n_tiles, 2) grid coordinates in tile units (row, col)
    slides: np.ndarray  # (n_tiles,) slide labels
    genes: list[str]  # genes present in both
    missing: dict[str, str]  # requested gene -> why it has no value
    rows_pred: np.ndarray  # positions of the paired tiles in ``pred`` (its obs order)


def _is_anndata(x) -> bool:
    return hasattr(x, "obs") and hasattr(x, "var_names") and hasattr(x, "X")


def _dense_columns(adata, genes: Sequence[str], layer: str | None) -> np.ndarray:
    from scipy import sparse

    idx = adata.var_names.get_indexer(list(genes))
    mat = adata.layers[layer] if layer is not None else adata.X
    if mat is None:
        raise ValueError("The AnnData has no X; pass layer= naming the layer that holds the values.")
    identity = len(idx) == mat.shape[1] and np.array_equal(idx, np.arange(len(idx)))
    sub = mat if identity else mat[:, idx]  # a view when all genes are used in order
    sub = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)
    return sub if sub.dtype.kind == "f" else sub.astype(np.float64)


def _take_rows(mat: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if len(rows) == mat.shape[0] and np.array_equal(rows, np.arange(len(rows))):
        return mat
    return mat[rows]


def _grid_keys(adata, slide_key: str) -> pd.Index | None:
    if not {"row", "col"} <= set(adata.obs.columns):
        return None
    slide = adata.obs[slide_key].astype(str).to_numpy() if slide_key in adata.obs else np.full(adata.n_obs, "")
    return pd.Index(
        [f"{s}|{int(r)}|{int(c)}" for s, r, c in zip(slide, adata.obs["row"], adata.obs["col"])]
    )


def _match_tiles(pred, truth, slide_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer positions (into pred, into truth) of the tiles the two AnnData share."""
    if pred.obs_names.is_unique and truth.obs_names.is_unique:
        common = pred.obs_names.intersection(truth.obs_names, sort=False)
        if len(common) > 0:
            return pred.obs_names.get_indexer(common), truth.obs_names.get_indexer(common)
    kp, kt = _grid_keys(pred, slide_key), _grid_keys(truth, slide_key)
    if kp is not None and kt is not None:
        if not (kp.is_unique and kt.is_unique):
            raise ValueError(
                "Several tiles share one (slide, row, col): the grids are not tile grids. Map the measured spots "
                "onto the predicted tiles first (hx.pp.map_measured_to_tiles)."
            )
        common = kp.intersection(kt, sort=False)
        if len(common) > 0:
            return kp.get_indexer(common), kt.get_indexer(common)
    raise ValueError(
        "The predicted and measured maps share no tile: neither obs_names nor obs['row'/'col'] match. "
        "Map the measured spots onto the predicted tile grid first (hx.pp.map_measured_to_tiles)."
    )


def pair_maps(
    pred,
    truth,
    *,
    genes: Sequence[str] | None = None,
    coords: np.ndarray | None = None,
    slide_key: str = "slide_id",
    layer_pred: str | None = None,
    layer_truth: str | None = None,
    need_coords: bool = False,
) -> PairedMaps:
    """Align two AnnData (or two arrays) on their shared tiles and genes."""
    missing: dict[str, str] = {}
    if _is_anndata(pred) and _is_anndata(truth):
        for what, a in (("predicted", pred), ("measured", truth)):
            if not a.var_names.is_unique:
                dup = a.var_names[a.var_names.duplicated()].unique()[:5].tolist()
                raise ValueError(f"The {what} AnnData has duplicated gene names {dup}; call .var_names_make_unique().")
        ip, it = _match_tiles(pred, truth, slide_key)
        if len(ip) < max(pred.n_obs, truth.n_obs):
            warnings.warn(
                f"The maps share {len(ip)} tiles (predicted: {pred.n_obs}, measured: {truth.n_obs}); "
                "only the shared tiles are compared.",
                UserWarning,
                stacklevel=3,
            )
        pg, tg = pd.Index(pred.var_names), pd.Index(truth.var_names)
        if genes is None:
            truth_genes = set(tg)
            use = [g for g in pg if g in truth_genes]
            only_one = pg.symmetric_difference(tg)
            if len(use) == 0:
                raise ValueError(
                    "The predicted and measured maps share no gene (var_names). Check the gene identifiers "
                    "(symbols vs Ensembl ids) of both objects."
                )
            if len(only_one):
                warnings.warn(
                    f"{len(only_one)} genes are in only one of the two maps and are skipped "
                    f"(e.g. {list(only_one[:5])}); {len(use)} shared genes are compared.",
                    UserWarning,
                    stacklevel=3,
                )
        else:
            genes = [genes] if isinstance(genes, str) else list(genes)
            use = []
            for g in dict.fromkeys(genes):
                where = [name for name, idx in (("prediction", pg), ("measured map", tg)) if g not in idx]
                if where:
                    missing[g] = f"missing from the {' and '.join(where)}"
                else:
                    use.append(g)
        P = _take_rows(_dense_columns(pred, use, layer_pred), ip)
        T = _take_rows(_dense_columns(truth, use, layer_truth), it)
        obs = pred.obs.iloc[ip]
        slides = obs[slide_key].astype(str).to_numpy() if slide_key in obs else np.full(len(ip), "")
        rows_pred = np.asarray(ip)
        if coords is None and {"row", "col"} <= set(obs.columns):
            coords = obs[["row", "col"]].to_numpy(dtype=np.float64)
        elif coords is not None:
            coords = np.asarray(coords, dtype=np.float64)[ip]
    else:
        if _is_anndata(pred) or _is_anndata(truth):
            raise TypeError("Pass two AnnData objects or two arrays, not one of each.")
        P = np.asarray(pred, dtype=np.float64)
        T = np.asarray(truth, dtype=np.float64)
        if P.ndim == 1:
            P, T = P[:, None], T.reshape(-1, 1) if T.ndim == 1 else T
        if P.shape != T.shape:
            raise ValueError(
                f"Predicted {P.shape} and measured {T.shape} arrays differ in shape; both must be (n_tiles, n_genes) "
                "on the same tiles."
            )
        if genes is None:
            use = [f"gene_{i}" for i in range(P.shape[1])]
        else:
            use = [genes] if isinstance(genes, str) else [str(g) for g in genes]
            if len(use) != P.shape[1]:
                raise ValueError(f"genes has {len(use)} names but the arrays have {P.shape[1]} columns.")
        slides = np.full(P.shape[0], "")
        rows_pred = np.arange(P.shape[0])
        if coords is not None:
            coords = np.asarray(coords, dtype=np.float64)
    if coords is not None and coords.shape != (P.shape[0], 2):
        raise ValueError(f"coords must have shape (n_tiles, 2) = ({P.shape[0]}, 2), got {coords.shape}.")
    if coords is not None and not np.isfinite(coords).all():
        bad = int((~np.isfinite(coords)).any(1).sum())
        raise ValueError(
            f"{bad} tile(s) have NaN or inf grid coordinates; the transport distances would be undefined. "
            "Drop those tiles or fix obs['row']/obs['col'] (or coords=)."
        )
    if need_coords and coords is None:
        raise ValueError(
            "EMD needs the tile grid: obs['row'] and obs['col'] (integer tile indices) in the AnnData, or coords= "
            "(n_tiles, 2) grid coordinates in tile units for arrays."
        )
    return PairedMaps(P, T, coords, slides, list(use), missing, rows_pred)


# ---------------------------------------------------------------------------------------------
# SEQUOIA preprocessing
# ---------------------------------------------------------------------------------------------


def percentile_scores(values: np.ndarray) -> np.ndarray:
    """Percentile of each value within its column, like ``scipy.stats.percentileofscore(col, v)`` (kind="rank").

    NaNs stay NaN. Vectorised over columns: ``100 * average_rank / n``.
    """
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=np.float64)
    ranks = rankdata(values, method="average", axis=0, nan_policy="omit")
    n = np.sum(~np.isnan(values), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * ranks / n


def median_filter_grid(
    values: np.ndarray, coords: np.ndarray, *, size: int = 3, rule: str = "present", chunk: int = 512
) -> np.ndarray:
    """``size`` × ``size`` median filter of per-tile values on an integer grid.

    Tiles absent from the grid and NaN values are not neighbours; a NaN value stays NaN.

    Parameters
    ----------
    values
        (n_tiles, n_genes) values; NaN = no value.
    coords
        (n_tiles, 2) grid coordinates in tile units (rounded to integers).
    size
        Window side (odd).
    rule
        ``"present"``: the median of whatever neighbours are present (histoexpr's rule).
        ``"sequoia"``: SEQUOIA's rule (``spatial_vis/get_emd.py``): the median only when *more than half*
        of the window's cells hold a value (≥ 5 of 9 for 3 × 3), otherwise the tile keeps its own value.
        Both filter every tile from the unfiltered values.
    chunk
        Genes processed at once (memory ``size² × n_tiles × chunk`` floats).

    Example
    -------
    >>> smooth = hx.metrics.median_filter_grid(values, obs[["row", "col"]].to_numpy(), rule="sequoia")  # doctest: +SKIP
    """
    if rule not in ("present", "sequoia"):
        raise ValueError(f"rule must be 'present' or 'sequoia', got {rule!r}.")
    values = np.asarray(values, dtype=np.float64)
    squeeze = values.ndim == 1
    if squeeze:
        values = values[:, None]
    rc = np.rint(np.asarray(coords, dtype=np.float64)).astype(np.int64)
    rc -= rc.min(0)
    h, w = rc.max(0) + 1
    grid = np.full((h, w), -1, dtype=np.int64)
    grid[rc[:, 0], rc[:, 1]] = np.arange(len(rc))
    half = size // 2
    padded = np.pad(grid, half, constant_values=-1)
    neigh = np.stack(
        [
            padded[rc[:, 0] + half + dr, rc[:, 1] + half + dc]
            for dr in range(-half, half + 1)
            for dc in range(-half, half + 1)
        ]
    )  # (size², n_tiles)
    absent = neigh < 0
    out = np.empty_like(values, dtype=np.float64)
    for start in range(0, values.shape[1], chunk):
        block = values[:, start : start + chunk]
        stacked = block[np.where(absent, 0, neigh)]  # (size², n_tiles, genes)
        stacked[absent] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods stay NaN
            med = np.nanmedian(stacked, axis=0)
        if rule == "sequoia":
            present = (~np.isnan(stacked)).sum(0)
            med = np.where(present > size * size / 2, med, block)
        out[:, start : start + chunk] = med
    out[np.isnan(values)] = np.nan
    return out[:, 0] if squeeze else out


def _to_mass(values: np.ndarray) -> np.ndarray:
    """Percentile scores, shifted to ≥ 0 and normalised to sum 1 (one column = one map)."""
    pct = percentile_scores(values)
    pct = pct - np.minimum(np.nanmin(pct, axis=0, keepdims=True), 0.0)
    return pct / np.nansum(pct, axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------

#: grids with more cells than this are solved by the sparse multiscale solver under ``solver="auto"``
AUTO_SPARSE_MIN_CELLS = 1500
#: a certified optimum: the certified gap (primal cost minus a valid dual lower bound) is at most this
CERT_TOL = 1e-9


@dataclass
class Solution:
    """Result of one exact transport solve (private): value and its optimality certificate."""

    value: float
    code: int  # 1 = optimal (POT result code), 3 = iteration limit, other = failure
    violation: float = np.nan  # max over ALL surplus/deficit pairs of max(0, -(c_ij - phi_i + phi_j))
    gap: float = np.nan  # value minus a valid lower bound (dual objective corrected by the violation)
    solver: str = "full"
    rounds: int = 0  # pricing rounds of the sparse solver
    n_arcs: int = 0  # arcs in the final sparse problem

    @property
    def certified(self) -> bool:
        return self.code == 1 and np.isfinite(self.gap) and self.gap <= CERT_TOL


def _dist_block(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(xa), len(xb)) without a (n, m, 2) temporary."""
    dr = np.subtract.outer(xa[:, 0], xb[:, 0])
    dc = np.subtract.outer(xa[:, 1], xb[:, 1])
    dr *= dr
    dc *= dc
    dr += dc
    return np.sqrt(dr, out=dr)


def _split(diff: np.ndarray):
    src, dst = diff > 0, diff < 0
    supply, demand = diff[src], -diff[dst]
    if supply.size:
        demand = demand * (supply.sum() / demand.sum())  # exact balance despite rounding
    return src, dst, supply, demand


def _lower_bound_gap(supply, demand, phs, phd, value, violation) -> float:
    """Gap between ``value`` and a proven lower bound on the optimum, from potentials violated by ``violation``.

    With v = ``violation`` = max(0, -min r) over all pairs, (phs - v, phd) is dual feasible, so
    ``sum(s·phs) - sum(d·phd) - v·sum(s)`` is a lower bound on the optimum.
    """
    lower = float(supply @ phs - demand @ phd) - violation * float(supply.sum())
    return max(0.0, float(value) - lower)


def _certificate(supply, demand, xs, xd, phs, phd, value, *, thr=-CERT_TOL, per_row=0):
    """Price every surplus/deficit pair with potentials ``phs``/``phd`` (r_ij = c_ij - phs_i + phd_j).

    Returns (violation, gap, rows, cols): the largest negative part of r, the certified gap of ``value``
    (:func:`_lower_bound_gap`), and up to ``per_row`` pairs of smallest r per row plus the smallest of
    each column, among those with r < ``thr`` (None when there is none or ``per_row`` is 0).
    """
    from ._emd_pricing import price_pairs

    worst, rows, cols = price_pairs(xs, xd, phs, phd, thr=thr, k=per_row, col_best=per_row > 0)
    violation = max(0.0, -worst)
    return violation, _lower_bound_gap(supply, demand, phs, phd, value, violation), rows, cols


def _full_solve(diff: np.ndarray, coords: np.ndarray, num_itermax: int, certify: bool = True):
    """Exact EMD of the surplus/deficit problem with POT's dense network simplex (reference solver).

    With a metric ground distance the optimal cost depends only on ``a - b`` (Kantorovich–Rubinstein),
    so mass shared by a cell stays in place and only the surplus cells (a > b) ship to the deficit
    cells (a < b). Returns (Solution, potentials phi per cell, plan arcs as cell-index pairs).
    """
    import ot

    src, dst, supply, demand = _split(diff)
    phi = np.zeros(len(diff))
    if not supply.size:
        return Solution(0.0, 1, 0.0, 0.0, "full"), phi, (np.empty(0, int), np.empty(0, int))
    xs, xd = coords[src], coords[dst]
    cost = _dist_block(xs, xd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the result code is reported by the caller, per gene
        plan, log = ot.emd(supply, demand, cost, numItermax=num_itermax, log=True, center_dual=False,
                           check_marginals=False)
    value = float(log["cost"])
    code = int(log["result_code"])
    u, v = np.asarray(log["u"]), np.asarray(log["v"])  # u_i + v_j <= c_ij
    phi[src], phi[dst] = u, -v
    sol = Solution(value, code, solver="full")
    if certify and code == 1:
        r = cost
        r -= u[:, None]
        r -= v[None, :]
        sol.violation = max(0.0, -float(r.min()))
        sol.gap = _lower_bound_gap(supply, demand, u, -v, value, sol.violation)
    gi, gj = np.nonzero(plan > 0)
    return sol, phi, (np.flatnonzero(src)[gi], np.flatnonzero(dst)[gj])


class GridSolver:
    """Exact EMD on one set of cells, with the per-grid work shared by every gene (private).

    Holds the cell coordinates and a coarse-to-fine hierarchy (2 × 2 blocks per level, block centre =
    mean of its cells) built once. :meth:`solve` returns the exact optimum of one mass difference:

    * ``"full"``: POT's dense network simplex on the surplus × deficit problem (memory n_s · n_d);
    * ``"sparse"``: multiscale column generation. The coarsest level is solved densely; on each finer
      level the candidate arcs are the fine pairs under the coarse plan's arcs, each cell's nearest
      cells of the opposite sign, the cheapest pairs by reduced cost under the coarse potentials, and
      a north-west-corner plan (which keeps the sparse problem feasible). POT's sparse network simplex
      solves it; then **every** surplus/deficit pair is priced with its potentials (a compiled pass,
      float64, memory linear in the cells) and the pairs of smallest reduced cost per row and column
      are added until no pair is violated. The final pricing is the certificate.
    """

    def __init__(self, coords: np.ndarray, *, min_cells: int = 1000):
        self.coords = np.ascontiguousarray(coords, dtype=np.float64)
        self.min_cells = min_cells
        self._levels: list[dict] | None = None

    @property
    def n(self) -> int:
        return len(self.coords)

    def _hierarchy(self) -> list[dict]:
        if self._levels is not None:
            return self._levels
        coords = self.coords
        ib = np.floor(coords - coords.min(0)).astype(np.int64)
        weight = np.ones(len(coords))
        levels = [{"coords": coords}]
        while len(coords) > self.min_cells:
            uniq, parent = np.unique(ib // 2, axis=0, return_inverse=True)
            parent = np.asarray(parent).ravel()
            nb = len(uniq)
            if nb >= len(coords):
                break
            cnt = np.bincount(parent, minlength=nb)
            order = np.argsort(parent, kind="stable")
            slot = np.arange(len(parent)) - np.r_[0, np.cumsum(cnt)][parent[order]]
            children = np.full((nb, int(cnt.max())), -1, dtype=np.int64)
            children[parent[order], slot] = order
            wsum = np.bincount(parent, weight, nb)
            xy = np.c_[np.bincount(parent, weight * coords[:, 0], nb), np.bincount(parent, weight * coords[:, 1], nb)]
            levels[-1]["parent"], levels[-1]["children"] = parent, children
            coords, ib, weight = xy / wsum[:, None], uniq, wsum
            levels.append({"coords": coords})
        self._levels = levels
        return levels

    def solve(self, diff: np.ndarray, *, solver: str = "sparse", num_itermax: int | None = None) -> Solution:
        itermax = num_itermax if num_itermax is not None else max(100_000, 50 * self.n**2)
        if solver == "full":
            return _full_solve(diff, self.coords, itermax)[0]
        levels = self._hierarchy()
        if len(levels) == 1:
            return _full_solve(diff, self.coords, itermax)[0]
        diffs = [np.asarray(diff, dtype=np.float64)]
        for li in range(len(levels) - 1):
            diffs.append(np.bincount(levels[li]["parent"], diffs[-1], len(levels[li + 1]["coords"])))
        sol, phi, plan = _full_solve(diffs[-1], levels[-1]["coords"], itermax, certify=False)
        if sol.code != 1:
            return sol
        rounds = 0
        for li in range(len(levels) - 2, -1, -1):
            lev = levels[li]
            final = li == 0
            sol, phi, plan, r = _sparse_level(
                diffs[li], lev["coords"], phi[lev["parent"]], plan, lev["children"],
                itermax=itermax, final=final,
            )
            rounds += r
            if sol.code != 1:
                return sol
        sol.solver = "sparse"
        sol.rounds = rounds
        return sol


def _unique_sorted(keys: np.ndarray) -> np.ndarray:
    keys = np.sort(keys)
    return keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.size else keys


def _new_keys(key, add_i, add_j, nd):
    """The pair keys ``i · nd + j`` of (add_i, add_j) not yet in the sorted ``key``."""
    if add_i is None or not len(add_i):
        return np.empty(0, dtype=np.int64)
    new = _unique_sorted(add_i * nd + add_j)
    pos = np.minimum(np.searchsorted(key, new), len(key) - 1)
    return new[key[pos] != new]


def _nearest_pairs(xs: np.ndarray, xd: np.ndarray, k: int) -> np.ndarray:
    """Pair keys ``i · nd + j`` of every surplus cell's and every deficit cell's ``k`` nearest opposite cells."""
    from scipy.spatial import cKDTree

    ns, nd = len(xs), len(xd)
    _, near_d = cKDTree(xd).query(xs, k=min(k, nd))
    _, near_s = cKDTree(xs).query(xd, k=min(k, ns))
    near_d, near_s = np.asarray(near_d).reshape(ns, -1), np.asarray(near_s).reshape(nd, -1)
    return np.concatenate([
        np.repeat(np.arange(ns), near_d.shape[1]) * nd + near_d.ravel(),
        near_s.ravel() * nd + np.repeat(np.arange(nd), near_s.shape[1]),
    ])


def _sparse_level(diff, coords, phi0, coarse_plan, children, *, itermax, final, per_row=64, init_k=8, n_near=4,
                  anticipate=0.05, max_rounds=100):
    """One level of the multiscale column generation; returns (Solution, phi, plan arcs, rounds).

    Candidates: the fine pairs under the coarse plan's arcs; each cell's ``n_near`` nearest cells of the
    opposite sign (where mass cancels locally; the coarse plan cannot see it inside one block); per surplus
    cell the ``init_k`` pairs of smallest reduced cost under the coarse potentials and the smallest of every
    deficit cell; and a north-west-corner plan (which keeps the sparse problem feasible). Each round solves the
    sparse problem with POT's network simplex, then prices **every** surplus/deficit pair with its potentials
    and adds, per row and per column, the pairs of smallest reduced cost below a threshold: below zero in the
    first round, then below ``anticipate`` × the last violation (pairs about to become violated, which saves
    rounds). It stops when no pair is violated; on the finest level that last pricing is the certificate.
    """
    from ot.lp.emd_wrap import emd_c_sparse

    from ._emd_pricing import price_pairs

    tol = CERT_TOL if final else 1e-7
    src, dst, supply, demand = _split(diff)
    n = len(diff)
    phi = phi0.copy()
    if not supply.size:
        return Solution(0.0, 1, 0.0, 0.0, "sparse"), phi, (np.empty(0, int), np.empty(0, int)), 0
    ns, nd = len(supply), len(demand)
    xs, xd = coords[src], coords[dst]
    cell_s, cell_d = np.flatnonzero(src), np.flatnonzero(dst)
    pos_s = np.full(n, -1, dtype=np.int64)
    pos_s[src] = np.arange(ns)
    pos_d = np.full(n, -1, dtype=np.int64)
    pos_d[dst] = np.arange(nd)
    keys = []
    # 1. fine pairs under the coarse plan's arcs
    pi, pj = coarse_plan
    if len(pi):
        ci = np.where(children[pi] >= 0, pos_s[np.maximum(children[pi], 0)], -1)
        cj = np.where(children[pj] >= 0, pos_d[np.maximum(children[pj], 0)], -1)
        ii = np.broadcast_to(ci[:, :, None], (len(pi), ci.shape[1], cj.shape[1])).ravel()
        jj = np.broadcast_to(cj[:, None, :], (len(pi), ci.shape[1], cj.shape[1])).ravel()
        ok = (ii >= 0) & (jj >= 0)
        keys.append(ii[ok] * nd + jj[ok])
    # 2. local cancellation: nearest cells of the opposite sign
    keys.append(_nearest_pairs(xs, xd, n_near))
    # 3. cheapest pairs by reduced cost under the coarse potentials
    phs, phd = phi0[src], phi0[dst]
    _, bi, bj = price_pairs(xs, xd, phs, phd, thr=np.inf, k=init_k, col_best=True)
    keys.append(bi * nd + bj)
    # 4. a north-west-corner plan along row-major order: a feasible plan, so the sparse problem is feasible
    os_, od = np.lexsort((xs[:, 1], xs[:, 0])), np.lexsort((xd[:, 1], xd[:, 0]))
    cs, cd = np.cumsum(supply[os_]), np.cumsum(demand[od])
    cs[-1] = cd[-1] = max(cs[-1], cd[-1])
    brk = np.union1d(cs, cd)
    ia = np.minimum(np.searchsorted(cs, brk), ns - 1)
    ja = np.minimum(np.searchsorted(cd, brk), nd - 1)
    keys.append(os_[ia] * nd + od[ja])
    key = _unique_sorted(np.concatenate(keys))
    rounds = 0
    thr = -tol
    while True:
        rounds += 1
        ai, aj = key // nd, key % nd
        d = xs[ai] - xd[aj]
        cost = np.sqrt(np.einsum("ij,ij->i", d, d))
        # warm start from the current potentials (the coarse level's, then the previous round's)
        fs, ft, fv, value, u, v, code = emd_c_sparse(
            supply, demand, ai.astype(np.uint64), aj.astype(np.uint64), cost, itermax,
            np.ascontiguousarray(phs), np.ascontiguousarray(-phd),
        )
        code = int(code)
        if code != 1:
            return Solution(np.nan, code, solver="sparse"), phi, (np.empty(0, int), np.empty(0, int)), rounds
        phs, phd = np.asarray(u), -np.asarray(v)
        violation, gap, add_i, add_j = _certificate(supply, demand, xs, xd, phs, phd, value, thr=thr,
                                                    per_row=per_row)
        if violation <= tol or rounds >= max_rounds:
            break
        new = _new_keys(key, add_i, add_j, nd)
        if new.size == 0:  # violated pairs already in the problem: only rounding in the simplex can do this
            break
        key = np.sort(np.concatenate([key, new]))
        thr = max(-tol, anticipate * violation)
    phi[src], phi[dst] = phs, phd
    fs, ft, fv = np.asarray(fs, dtype=np.int64), np.asarray(ft, dtype=np.int64), np.asarray(fv)
    on = fv > 0
    plan = (cell_s[fs[on]], cell_d[ft[on]])
    sol = Solution(float(value), 1, violation, gap, "sparse", rounds, len(key))
    return sol, phi, plan, rounds


def _exact_emd(a: np.ndarray, b: np.ndarray, coords: np.ndarray, num_itermax: int) -> tuple[float, int]:
    """Exact EMD of two mass vectors on points ``coords`` with the reference (dense) solver: (cost, code)."""
    sol = _full_solve(np.asarray(a, float) - np.asarray(b, float), np.asarray(coords, float), num_itermax)[0]
    return sol.value, sol.code


def _cv2_emd(a: np.ndarray, b: np.ndarray, coords: np.ndarray) -> float:
    """OpenCV's ``cv2.EMD`` on full signatures (weight, x, y), as in the published SEQUOIA evaluation."""
    import cv2

    sig_a = np.column_stack([a, coords]).astype(np.float32)
    sig_b = np.column_stack([b, coords]).astype(np.float32)
    return float(cv2.EMD(sig_a, sig_b, cv2.DIST_L2)[0])


_RESULT_FIELDS = ("value", "code", "violation", "gap", "solver", "rounds", "cv2")


def _resolve_solver(solver: str, n_cells: int) -> str:
    """The solver ``solver`` stands for on ``n_cells`` cells: ``"auto"`` is sparse above ``AUTO_SPARSE_MIN_CELLS``."""
    if solver == "auto":
        return "sparse" if n_cells > AUTO_SPARSE_MIN_CELLS else "full"
    return solver


def _solve_block(
    masses_a: np.ndarray, masses_b: np.ndarray, coords: np.ndarray, solver: str, num_itermax: int | None,
    want_cv2: bool,
) -> list[tuple]:
    """Solve the genes (columns) of one cell set; the grid work (hierarchy) is shared by all of them."""
    grid = GridSolver(coords)
    kind = _resolve_solver(solver, len(coords))
    out = []
    for j in range(masses_a.shape[1]):
        a, b = masses_a[:, j], masses_b[:, j]
        sol = grid.solve(a - b, solver=kind, num_itermax=num_itermax)
        value_cv2 = _cv2_emd(a, b, coords) if want_cv2 else np.nan
        out.append((sol.value, sol.code, sol.violation, sol.gap, sol.solver, sol.rounds, value_cv2))
    return out


def _chunks(n: int, parts: int) -> list[np.ndarray]:
    return [c for c in np.array_split(np.arange(n), max(1, min(n, parts))) if c.size]


def _run_tasks(tasks: list[tuple], *, n_jobs: int | None, client, solver: str, num_itermax, want_cv2) -> list:
    """tasks: (A, B, coords) per cell set -> per task a list of per-gene result tuples."""
    work = sum(a.shape[1] * a.shape[0] ** 2 for a, _, _ in tasks)
    genes = sum(a.shape[1] for a, _, _ in tasks)
    if client is not None:
        try:
            workers = max(1, sum(client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a client-like object without nthreads
            workers = 1
        futures = []
        for a, b, xy in tasks:
            xy_remote = client.scatter(xy, broadcast=False) if len(tasks) == 1 else xy
            parts = _chunks(a.shape[1], 4 * workers if a.shape[1] > workers else a.shape[1])
            futures.append(
                [client.submit(_solve_block, a[:, c], b[:, c], xy_remote, solver, num_itermax, want_cv2, pure=False)
                 for c in parts]
            )
        return [[r for part in client.gather(fs) for r in part] for fs in futures]
    cores = os.cpu_count() or 1
    workers = cores if n_jobs is None or n_jobs < 0 else n_jobs
    # process start-up (~0.5 s) pays off only for many genes on large grids
    if n_jobs is None and work < 2e7:
        workers = 1
    workers = max(1, min(workers, genes))
    if workers == 1:
        return [_solve_block(a, b, xy, solver, num_itermax, want_cv2) for a, b, xy in tasks]
    args, owner = [], []
    for t, (a, b, xy) in enumerate(tasks):
        for c in _chunks(a.shape[1], 4 * workers):
            args.append((a[:, c], b[:, c], xy, solver, num_itermax, want_cv2))
            owner.append(t)
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods():
        # forked workers inherit the imported solver (POT's import alone takes seconds)
        from concurrent.futures import ProcessPoolExecutor

        import ot  # noqa: F401

        if any(_resolve_solver(solver, len(xy)) == "sparse" for _, _, xy in tasks):
            from ._emd_pricing import warm_up

            warm_up()  # compiled once here, inherited by every worker
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            parts = list(pool.map(_solve_block, *zip(*args)))
    else:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=workers, backend="loky")(delayed(_solve_block)(*a) for a in args)
    out: list[list] = [[] for _ in tasks]
    for t, part in zip(owner, parts):
        out[t].extend(part)
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

_FILTERS = {False: None, None: None, "none": None, True: "present", "present": "present", "sequoia": "sequoia"}
_VALUES = {"percentile": "percentile", "raw": "raw", "zscore": "raw"}
_NORMALIZE = {False: None, None: None, "none": None, True: "sequoia", "sequoia": "sequoia", "diagonal": "diagonal"}
UNITS = {
    None: "tile pitch (grid units)",
    "sequoia": "grid x-extent (SEQUOIA norm: tile-pitch EMD / number of grid cells along coords[:, 0])",
    "diagonal": "grid diagonal (tile-pitch EMD / diagonal length of the grid's bounding box; in [0, 1])",
}


def _check_finite(maps: PairedMaps, on_inf: str) -> PairedMaps:
    bad = {}
    for what, X in (("predicted", maps.pred), ("measured", maps.truth)):
        n_inf = np.isinf(X).sum(0)
        for j in np.flatnonzero(n_inf):
            bad.setdefault(maps.genes[j], []).append(f"{int(n_inf[j])} {what} tile(s)")
    if not bad:
        return maps
    desc = "; ".join(f"{g}: {', '.join(v)}" for g, v in list(bad.items())[:5])
    msg = (
        f"{len(bad)} gene(s) hold inf values ({desc}{'; ...' if len(bad) > 5 else ''}). Percentiles would rank an "
        "inf as the highest value and the EMD would be silently wrong."
    )
    if on_inf == "raise":
        raise ValueError(msg + " Replace inf by NaN or a finite value, or pass on_inf='drop' to drop those tiles.")
    warnings.warn(msg + " Those tiles are dropped for those genes (on_inf='drop').", UserWarning, stacklevel=3)
    maps.pred = np.where(np.isinf(maps.pred), np.nan, maps.pred)
    maps.truth = np.where(np.isinf(maps.truth), np.nan, maps.truth)
    return maps


def emd(
    pred,
    truth,
    *,
    genes: Sequence[str] | str | None = None,
    median_filter: bool | str = False,
    values: str = "percentile",
    normalize: bool | str = False,
    shift: str | None = None,
    min_unique: int = 10,
    solver: str = "auto",
    return_cv2: bool = False,
    n_jobs: int | None = None,
    client=None,
    coords: np.ndarray | None = None,
    slide_key: str = "slide_id",
    layer_pred: str | None = None,
    layer_truth: str | None = None,
    num_itermax: int | None = None,
    on_inf: str = "raise",
) -> pd.DataFrame:
    """Earth mover's distance between predicted and measured maps, per gene (SEQUOIA protocol, exact, certified).

    Preprocessing follows SEQUOIA (Pizurica et al. 2024): genes with fewer than ``min_unique`` unique
    measured values are skipped; optionally a 3 × 3 median filter smooths the measured map on the tile
    grid; both maps are converted to percentile scores (0–100, ``scipy.stats.percentileofscore``
    semantics) within the slide (or used as they are, ``values="raw"``), shifted to ≥ 0 and normalised
    to sum 1; the ground distance is the Euclidean distance between tile centres in tile units. The
    transport problem is solved exactly and every value carries an optimality certificate (columns
    ``certified``, ``max_reduced_cost_violation``, ``gap``). OpenCV's ``cv2.EMD``, used in the paper,
    stops short of the optimum on grids of more than a few hundred tiles, so its values are larger there.

    Parameters
    ----------
    pred, truth
        Predicted and measured maps on the same tile grid: two AnnData (tiles × genes, matched by
        ``obs_names`` or by ``obs[slide_key, "row", "col"]``; measured spots mapped onto the tiles with
        :func:`histoexpr.pp.map_measured_to_tiles`), or two arrays (n_tiles, n_genes) with ``coords``.
    genes
        Genes to compare (default: all genes in both). Requested genes missing on one side get NaN.
    median_filter
        3 × 3 median filter of the measured map. ``False``: none. ``"present"`` (or ``True``): median of
        the present neighbours, computed on every tile with a measured value, before tiles without a
        prediction are dropped. ``"sequoia"``: SEQUOIA's rule and order: tiles without a prediction are
        dropped first (they are no neighbours), and a tile takes the median only when ≥ 5 of the 9 cells
        hold a tile, otherwise it keeps its value.
    values
        ``"percentile"`` (default, SEQUOIA's ``emd_filt``) or ``"raw"`` (alias ``"zscore"``): the values as
        given, SEQUOIA's raw ``emd`` column (upstream passes z-scored measured values and raw predictions).
    normalize
        ``False``: EMD in tile-pitch units. ``"sequoia"`` (or ``True``): divided by the number of grid cells
        along the first coordinate axis of the grid's bounding box (upstream's ``norm=True`` divides by
        ``sqrt(arr1.shape[0] * arr2.shape[0])``, which is that extent). ``"diagonal"``: divided by the
        length of the bounding box's diagonal, the largest possible distance, so the value lies in [0, 1].
        The bounding box starts at the smallest coordinate of the slide's tiles and ends at the largest
        coordinate of the tiles compared for the gene.
    shift
        How a map with negative values is made non-negative. ``"sequoia"``: add ``|min|`` with the
        minimum taken over the whole bounding box, empty cells (value 0) included, so with a negative
        minimum every cell, empty ones too, carries mass (upstream's rule; the default for raw values).
        ``"nonnegative"``: subtract a negative minimum of the tiles only (the default for percentiles,
        which are > 0 and so unchanged).
    min_unique
        Minimum number of unique measured values of a gene (per slide, on the compared tiles).
    solver
        ``"auto"`` (default): the dense reference solver up to ``AUTO_SPARSE_MIN_CELLS`` cells, the sparse
        multiscale solver above; ``"full"``: POT's dense network simplex on the surplus × deficit problem
        (memory n_surplus · n_deficit); ``"sparse"``: multiscale column generation (memory linear in
        the number of cells); ``"cv2"``: OpenCV's ``cv2.EMD`` only (published numbers; needs opencv).
        ``"exact"`` is accepted as ``"auto"``.
    return_cv2
        Also return ``emd_cv2``, the value of ``cv2.EMD`` on the full signatures (slow on large grids).
    n_jobs
        Worker processes for many genes (``None``: all cores, used only when the work is large enough;
        ``1``: no parallelism).
    client
        A ``dask.distributed.Client``: genes are spread over its workers (results identical to local).
    coords
        Grid coordinates (n_tiles, 2) in tile units; default ``obs[["row", "col"]]``.
    slide_key
        ``obs`` column with slide ids; percentiles are computed per slide.
    layer_pred, layer_truth
        Layers to read instead of ``X``.
    num_itermax
        Network-simplex iteration limit (default ``max(1e5, 50 · n_tiles²)``); a warning names the genes
        that hit it.
    on_inf
        ``"raise"`` (default): a ``ValueError`` naming the genes with ±inf values. ``"drop"``: warn and drop
        those tiles for those genes.

    Returns
    -------
    DataFrame indexed by gene (``(slide, gene)`` when there are several slides) with columns ``emd`` (in
    the unit given by ``attrs["unit"]`` and the ``unit`` column), ``n_tiles``, ``n_unique_measured``,
    ``note`` (why a value is NaN), ``n_unique_measured_filtered``, ``certified`` (the value is the optimum
    within 1e-9), ``max_reduced_cost_violation`` and ``gap`` (value minus a proven lower bound, in tile
    units), ``solver``, ``unit`` and, with ``return_cv2``, ``emd_cv2``.

    Example
    -------
    >>> res = hx.metrics.emd(pred_tiles, measured_tiles, median_filter="sequoia")  # doctest: +SKIP
    >>> res["emd"].median(), res.attrs["unit"]  # doctest: +SKIP
    """
    if solver == "exact":
        solver = "auto"
    if solver not in ("auto", "full", "sparse", "cv2"):
        raise ValueError(f"solver must be 'auto', 'full', 'sparse' or 'cv2', got {solver!r}.")
    if isinstance(median_filter, str) and median_filter not in _FILTERS or not isinstance(median_filter, (bool, str)) and median_filter is not None:
        raise ValueError(f"median_filter must be False, 'present' (or True) or 'sequoia', got {median_filter!r}.")
    if values not in _VALUES:
        raise ValueError(f"values must be 'percentile' or 'raw' (alias 'zscore'), got {values!r}.")
    if isinstance(normalize, str) and normalize not in _NORMALIZE or not isinstance(normalize, (bool, str)) and normalize is not None:
        raise ValueError(f"normalize must be False, 'sequoia' (or True) or 'diagonal', got {normalize!r}.")
    if on_inf not in ("raise", "drop"):
        raise ValueError(f"on_inf must be 'raise' or 'drop', got {on_inf!r}.")
    filt, vals, norm = _FILTERS[median_filter], _VALUES[values], _NORMALIZE[normalize]
    if shift is None:
        shift = "sequoia" if vals == "raw" else "nonnegative"
    if shift not in ("sequoia", "nonnegative"):
        raise ValueError(f"shift must be 'sequoia' or 'nonnegative', got {shift!r}.")
    if return_cv2 or solver == "cv2":
        try:
            import cv2  # noqa: F401
        except ImportError as err:
            raise ImportError("cv2-compatible EMD needs OpenCV: pip install opencv-python-headless") from err
    maps = pair_maps(
        pred,
        truth,
        genes=genes,
        coords=coords,
        slide_key=slide_key,
        layer_pred=layer_pred,
        layer_truth=layer_truth,
        need_coords=True,
    )
    maps = _check_finite(maps, on_inf)
    slide_ids = list(dict.fromkeys(maps.slides))
    frames = []
    reasons: dict[str, list[str]] = defaultdict(list)
    uncertified: list[str] = []
    for slide in slide_ids:
        rows = maps.slides == slide
        frame = _emd_one_slide(
            maps.pred[rows],
            maps.truth[rows],
            maps.coords[rows],
            maps.genes,
            median_filter=filt,
            values=vals,
            normalize=norm,
            shift=shift,
            min_unique=min_unique,
            solver=solver,
            return_cv2=return_cv2,
            n_jobs=n_jobs,
            client=client,
            num_itermax=num_itermax,
        )
        for gene, why in maps.missing.items():
            frame.loc[gene, ["emd", "n_tiles", "n_unique_measured", "note"]] = [np.nan, 0, 0, why]
        for gene, note in frame["note"].items():
            if note:
                reasons[note].append(f"{gene}" if len(slide_ids) == 1 else f"{slide}:{gene}")
        bad = frame.index[frame["emd"].notna() & ~frame["certified"].astype(bool) & (frame["solver"] != "cv2")]
        uncertified += [f"{g}" if len(slide_ids) == 1 else f"{slide}:{g}" for g in bad]
        frame.insert(0, "slide_id", slide)
        frames.append(frame)
    for note, which in reasons.items():
        warnings.warn(
            f"EMD is NaN for {len(which)} gene(s): {note} (e.g. {which[:5]}).", UserWarning, stacklevel=2
        )
    if uncertified:
        warnings.warn(
            f"The EMD of {len(uncertified)} gene(s) could not be certified optimal within {CERT_TOL:g} "
            f"(see columns 'gap' and 'max_reduced_cost_violation'; e.g. {uncertified[:5]}). Try solver='full'.",
            UserWarning,
            stacklevel=2,
        )
    out = pd.concat(frames)
    out.index.name = "gene"
    if len(slide_ids) > 1:
        out = out.set_index("slide_id", append=True).swaplevel(0, 1)
    else:
        out = out.drop(columns="slide_id")
    for col in ("n_tiles", "n_unique_measured", "n_unique_measured_filtered"):
        out[col] = out[col].fillna(0).astype(int)
    out["certified"] = out["certified"].fillna(False).astype(bool)
    out["unit"] = UNITS[norm]
    out.attrs["unit"] = UNITS[norm]
    out.attrs["options"] = {"median_filter": filt, "values": vals, "normalize": norm, "shift": shift, "solver": solver}
    return out


def _bounding_box(coords_all: np.ndarray, coords_kept: np.ndarray):
    """Integer bounding box: origin = min over the slide's tiles, far corner = max over the compared tiles."""
    lo = np.rint(coords_all.min(0)).astype(np.int64)
    hi = np.rint(coords_kept.max(0)).astype(np.int64)
    return lo, hi


def _emd_one_slide(
    P: np.ndarray,
    T: np.ndarray,
    coords: np.ndarray,
    genes: list[str],
    *,
    median_filter: str | None,
    values: str,
    normalize: str | None,
    shift: str,
    min_unique: int,
    solver: str,
    return_cv2: bool,
    n_jobs: int | None,
    client,
    num_itermax: int | None,
) -> pd.DataFrame:
    n_genes = len(genes)
    emd_val = np.full(n_genes, np.nan)
    cv2_val = np.full(n_genes, np.nan)
    violation = np.full(n_genes, np.nan)
    gap = np.full(n_genes, np.nan)
    used = np.full(n_genes, "", dtype=object)
    certified = np.zeros(n_genes, dtype=bool)
    notes = np.full(n_genes, "", dtype=object)
    if median_filter == "present" and n_genes:
        T_f = median_filter_grid(T, coords, rule="present")  # filter first, then drop (histoexpr's order)
    else:
        T_f = T
    both = ~(np.isnan(P) | np.isnan(T))
    T_kept = np.where(both, T, np.nan)
    n_unique = np.array([np.unique(T_kept[both[:, j], j]).size for j in range(n_genes)], dtype=int)
    if median_filter == "sequoia" and n_genes:
        T_f = median_filter_grid(T_kept, coords, rule="sequoia")  # drop first, then filter (SEQUOIA's order)
    both = both & ~np.isnan(T_f)
    n_tiles = both.sum(0)
    P = np.where(both, P, np.nan)
    T = np.where(both, T_f, np.nan)
    n_unique_f = np.array([np.unique(T[both[:, j], j]).size for j in range(n_genes)], dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pred_const = np.nanmax(P, axis=0) == np.nanmin(P, axis=0)
        truth_const = np.nanmax(T, axis=0) == np.nanmin(T, axis=0)
    for j in range(n_genes):
        if n_tiles[j] < 2:
            notes[j] = "fewer than 2 tiles with both a predicted and a measured value (all NaN?)"
        elif n_unique[j] < min_unique:
            notes[j] = f"fewer than min_unique={min_unique} unique measured values"
        elif pred_const[j]:
            notes[j] = "constant prediction"
        elif truth_const[j]:
            notes[j] = "constant measured map after median filtering"
    todo = np.flatnonzero(notes == "")
    scale = np.ones(n_genes)
    if todo.size:
        if values == "percentile":
            XA, XB = percentile_scores(P[:, todo]), percentile_scores(T[:, todo])
        else:
            XA, XB = P[:, todo], T[:, todo]
        # group genes by the cells of their transport problem (usually one group per slide)
        groups: dict[bytes, list[int]] = defaultdict(list)
        cells: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        rc = np.rint(coords).astype(np.int64)
        for k, j in enumerate(todo):
            keep = both[:, j]
            lo, hi = _bounding_box(coords, coords[keep])
            ext = hi - lo + 1
            if normalize == "sequoia":
                scale[j] = float(ext[0])
            elif normalize == "diagonal":
                scale[j] = max(float(np.hypot(*(ext - 1))), 1.0)
            n_box = int(np.prod(ext))
            occupied = np.unique((rc[keep] - lo) @ np.array([ext[1], 1]))
            full_box = occupied.size >= n_box
            key = keep.tobytes() + lo.tobytes() + hi.tobytes()
            groups[key].append(k)
            if key not in cells:
                empty = None
                if not full_box:
                    flat = np.setdiff1d(np.arange(n_box), occupied)
                    empty = np.c_[flat // ext[1], flat % ext[1]] + lo
                cells[key] = (keep, empty)
        tasks, order = [], []
        for key, ks in groups.items():
            keep, empty = cells[key]
            cols = np.asarray(ks)
            A, B = XA[keep][:, cols], XB[keep][:, cols]
            xy = coords[keep]
            for M in (A, B):
                lowest = M.min(0)
                if shift == "sequoia":
                    if empty is not None:
                        lowest = np.minimum(lowest, 0.0)
                    M += np.abs(lowest)[None, :]
                else:
                    M -= np.minimum(lowest, 0.0)[None, :]
            if shift == "sequoia" and empty is not None:
                # empty cells carry the shift as mass; keep them only where some gene needs them
                fill_a = np.abs(np.minimum(XA[keep][:, cols].min(0), 0.0))
                fill_b = np.abs(np.minimum(XB[keep][:, cols].min(0), 0.0))
                if (fill_a > 0).any() or (fill_b > 0).any():
                    A = np.vstack([A, np.broadcast_to(fill_a, (len(empty), len(cols)))])
                    B = np.vstack([B, np.broadcast_to(fill_b, (len(empty), len(cols)))])
                    xy = np.vstack([xy, empty.astype(np.float64)])
            A = A / A.sum(0, keepdims=True)
            B = B / B.sum(0, keepdims=True)
            tasks.append((A, B, np.ascontiguousarray(xy, dtype=np.float64)))
            order.append(todo[cols])
        if solver == "cv2":
            for (A, B, xy), js in zip(tasks, order):
                for k, j in enumerate(js):
                    emd_val[j] = cv2_val[j] = _cv2_emd(A[:, k], B[:, k], xy)
                    used[j] = "cv2"
        else:
            results = _run_tasks(tasks, n_jobs=n_jobs, client=client, solver=solver, num_itermax=num_itermax,
                                 want_cv2=return_cv2)
            for js, res in zip(order, results):
                for j, (value, code, viol, g, kind, _rounds, value_cv2) in zip(js, res):
                    used[j] = kind
                    if code == 1:
                        emd_val[j], violation[j], gap[j] = value, viol, g
                        certified[j] = np.isfinite(g) and g <= CERT_TOL
                    else:
                        notes[j] = (
                            "network simplex hit its iteration limit; raise num_itermax"
                            if code == 3
                            else f"network simplex failed (POT result code {code})"
                        )
                    cv2_val[j] = value_cv2
    frame = pd.DataFrame(
        {
            "emd": emd_val / scale,
            "n_tiles": n_tiles,
            "n_unique_measured": n_unique,
            "note": notes,
            "n_unique_measured_filtered": n_unique_f,
            "certified": certified,
            "max_reduced_cost_violation": violation,
            "gap": gap,
            "solver": used,
        },
        index=pd.Index(genes, name="gene"),
    )
    if return_cv2:
        frame.insert(1, "emd_cv2", cv2_val / scale)
    return frame
