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
                "onto the predicted tiles first (hx.tl.map_measured_to_tiles)."
            )
        common = kp.intersection(kt, sort=False)
        if len(common) > 0:
            return kp.get_indexer(common), kt.get_indexer(common)
    raise ValueError(
        "The predicted and measured maps share no tile: neither obs_names nor obs['row'/'col'] match. "
        "Map the measured spots onto the predicted tile grid first (hx.tl.map_measured_to_tiles)."
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


def median_filter_grid(values: np.ndarray, coords: np.ndarray, *, size: int = 3, chunk: int = 512) -> np.ndarray:
    """``size`` × ``size`` median filter of per-tile values on an integer grid, ignoring absent tiles and NaNs."""
    rc = np.rint(coords).astype(np.int64)
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
            out[:, start : start + chunk] = np.nanmedian(stacked, axis=0)
    out[np.isnan(values)] = np.nan
    return out


def _to_mass(values: np.ndarray) -> np.ndarray:
    """Percentile scores, shifted to ≥ 0 and normalised to sum 1 (one column = one map)."""
    pct = percentile_scores(values)
    pct = pct - np.minimum(np.nanmin(pct, axis=0, keepdims=True), 0.0)
    return pct / np.nansum(pct, axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------


def _exact_emd(a: np.ndarray, b: np.ndarray, coords: np.ndarray, num_itermax: int) -> tuple[float, int]:
    """Exact EMD of two mass vectors on points ``coords`` (Euclidean ground distance).

    With a metric ground distance the optimal cost depends only on ``a - b`` (Kantorovich–Rubinstein),
    so mass shared by a cell stays in place and only the surplus cells (a > b) ship to the deficit
    cells (a < b): a bipartite problem about a quarter of the size, solved exactly by POT's network
    simplex. Returns (cost, POT result code; 1 = optimal).
    """
    import ot

    diff = a - b
    src, dst = diff > 0, diff < 0
    if not src.any():
        return 0.0, 1
    supply, demand = diff[src], -diff[dst]
    demand *= supply.sum() / demand.sum()  # exact balance despite rounding
    cost = np.sqrt(((coords[src][:, None, :] - coords[dst][None, :, :]) ** 2).sum(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the result code is reported by the caller, per gene
        value, log = ot.emd2(supply, demand, cost, numItermax=num_itermax, log=True, check_marginals=False)
    return float(value), int(log["result_code"])


def _cv2_emd(a: np.ndarray, b: np.ndarray, coords: np.ndarray) -> float:
    """OpenCV's ``cv2.EMD`` on full signatures (weight, x, y), as in the published SEQUOIA evaluation."""
    import cv2

    sig_a = np.column_stack([a, coords]).astype(np.float32)
    sig_b = np.column_stack([b, coords]).astype(np.float32)
    return float(cv2.EMD(sig_a, sig_b, cv2.DIST_L2)[0])


def _solve_block(
    masses_a: np.ndarray, masses_b: np.ndarray, coords: np.ndarray, num_itermax: int | None, want_cv2: bool
) -> list[tuple[float, int, float]]:
    out = []
    for j in range(masses_a.shape[1]):
        a, b = masses_a[:, j], masses_b[:, j]
        keep = ~(np.isnan(a) | np.isnan(b))
        a, b, xy = a[keep], b[keep], coords[keep]
        itermax = num_itermax if num_itermax is not None else max(100_000, 50 * len(a) ** 2)
        value, code = _exact_emd(a, b, xy, itermax)
        out.append((value, code, _cv2_emd(a, b, xy) if want_cv2 else np.nan))
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def emd(
    pred,
    truth,
    *,
    genes: Sequence[str] | str | None = None,
    median_filter: bool = False,
    min_unique: int = 10,
    solver: str = "exact",
    return_cv2: bool = False,
    n_jobs: int | None = None,
    coords: np.ndarray | None = None,
    slide_key: str = "slide_id",
    layer_pred: str | None = None,
    layer_truth: str | None = None,
    num_itermax: int | None = None,
) -> pd.DataFrame:
    """Earth mover's distance between predicted and measured maps, per gene (SEQUOIA protocol, exact).

    Preprocessing follows SEQUOIA (Pizurica et al. 2024): genes with fewer than ``min_unique`` unique
    measured values are skipped; optionally a 3 × 3 median filter smooths the measured map on the tile
    grid; both maps are converted to percentile scores (0–100, ``scipy.stats.percentileofscore``
    semantics) within the slide, shifted to ≥ 0 and normalised to sum 1; the ground distance is the
    Euclidean distance between tile centres in tile units. The transport problem is solved exactly
    (POT network simplex); OpenCV's ``cv2.EMD``, used in the paper, stops short of the optimum on
    grids of more than a few hundred tiles, so its values are larger there.

    Parameters
    ----------
    pred, truth
        Predicted and measured maps on the same tile grid: two AnnData (tiles × genes, matched by
        ``obs_names`` or by ``obs[slide_key, "row", "col"]``; measured spots mapped onto the tiles with
        :func:`histoexpr.tl.map_measured_to_tiles`), or two arrays (n_tiles, n_genes) with ``coords``.
    genes
        Genes to compare (default: all genes in both). Requested genes missing on one side get NaN.
    median_filter
        Apply the 3 × 3 median filter to the measured map (SEQUOIA did).
    min_unique
        Minimum number of unique measured values of a gene (per slide).
    solver
        ``"exact"`` (POT network simplex) or ``"cv2"`` (OpenCV ``cv2.EMD``; only to reproduce published
        numbers, needs opencv).
    return_cv2
        Also return ``emd_cv2``, the value of ``cv2.EMD`` on the full signatures (slow on large grids).
    n_jobs
        Worker processes for many genes (``None``: all cores, used only when the work is large enough;
        ``1``: no parallelism).
    coords
        Grid coordinates (n_tiles, 2) in tile units; default ``obs[["row", "col"]]``.
    slide_key
        ``obs`` column with slide ids; percentiles are computed per slide.
    layer_pred, layer_truth
        Layers to read instead of ``X``.
    num_itermax
        Network-simplex iteration limit (default ``max(1e5, 50 · n_tiles²)``); a warning names the genes
        that hit it.

    Returns
    -------
    DataFrame indexed by gene (``(slide, gene)`` when there are several slides) with columns ``emd``,
    ``n_tiles``, ``n_unique_measured``, ``note`` (why a value is NaN) and, with ``return_cv2``, ``emd_cv2``.

    Example
    -------
    >>> res = hx.metrics.emd(pred_tiles, measured_tiles, median_filter=True)  # doctest: +SKIP
    >>> res["emd"].median()  # doctest: +SKIP
    """
    if solver not in ("exact", "cv2"):
        raise ValueError(f"solver must be 'exact' or 'cv2', got {solver!r}.")
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
    slide_ids = list(dict.fromkeys(maps.slides))
    frames = []
    reasons: dict[str, list[str]] = defaultdict(list)
    for slide in slide_ids:
        rows = maps.slides == slide
        frame = _emd_one_slide(
            maps.pred[rows],
            maps.truth[rows],
            maps.coords[rows],
            maps.genes,
            median_filter=median_filter,
            min_unique=min_unique,
            solver=solver,
            return_cv2=return_cv2,
            n_jobs=n_jobs,
            num_itermax=num_itermax,
        )
        for gene, why in maps.missing.items():
            frame.loc[gene, ["emd", "n_tiles", "n_unique_measured", "note"]] = [np.nan, 0, 0, why]
        for gene, note in frame["note"].items():
            if note:
                reasons[note].append(f"{gene}" if len(slide_ids) == 1 else f"{slide}:{gene}")
        frame.insert(0, "slide_id", slide)
        frames.append(frame)
    for note, which in reasons.items():
        warnings.warn(
            f"EMD is NaN for {len(which)} gene(s): {note} (e.g. {which[:5]}).", UserWarning, stacklevel=2
        )
    out = pd.concat(frames)
    out.index.name = "gene"
    if len(slide_ids) > 1:
        out = out.set_index("slide_id", append=True).swaplevel(0, 1)
    else:
        out = out.drop(columns="slide_id")
    out["n_tiles"] = out["n_tiles"].astype(int)
    out["n_unique_measured"] = out["n_unique_measured"].astype(int)
    return out


def _emd_one_slide(
    P: np.ndarray,
    T: np.ndarray,
    coords: np.ndarray,
    genes: list[str],
    *,
    median_filter: bool,
    min_unique: int,
    solver: str,
    return_cv2: bool,
    n_jobs: int | None,
    num_itermax: int | None,
) -> pd.DataFrame:
    n_genes = len(genes)
    emd_val = np.full(n_genes, np.nan)
    cv2_val = np.full(n_genes, np.nan)
    notes = np.full(n_genes, "", dtype=object)
    n_unique = np.array([np.unique(T[~np.isnan(T[:, j]), j]).size for j in range(n_genes)], dtype=int)
    if median_filter and n_genes:
        T = median_filter_grid(T, coords)
    both = ~(np.isnan(P) | np.isnan(T))
    n_tiles = both.sum(0)
    P = np.where(both, P, np.nan)
    T = np.where(both, T, np.nan)
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
    if todo.size:
        A = _to_mass(P[:, todo])
        B = _to_mass(T[:, todo])
        if solver == "cv2":
            for k, j in enumerate(todo):
                keep = both[:, j]
                emd_val[j] = _cv2_emd(A[keep, k], B[keep, k], coords[keep])
            if return_cv2:
                cv2_val[todo] = emd_val[todo]
        else:
            results = _run_blocks(A, B, coords, n_jobs=n_jobs, num_itermax=num_itermax, want_cv2=return_cv2)
            for k, (value, code, value_cv2) in zip(todo, results):
                if code == 1:
                    emd_val[k] = value
                else:
                    notes[k] = (
                        "network simplex hit its iteration limit; raise num_itermax"
                        if code == 3
                        else f"network simplex failed (POT result code {code})"
                    )
                cv2_val[k] = value_cv2
    frame = pd.DataFrame(
        {"emd": emd_val, "n_tiles": n_tiles, "n_unique_measured": n_unique, "note": notes},
        index=pd.Index(genes, name="gene"),
    )
    if return_cv2:
        frame.insert(1, "emd_cv2", cv2_val)
    return frame


def _run_blocks(
    A: np.ndarray, B: np.ndarray, coords: np.ndarray, *, n_jobs: int | None, num_itermax: int | None, want_cv2: bool
) -> list[tuple[float, int, float]]:
    n_tiles, n_genes = A.shape
    cores = os.cpu_count() or 1
    workers = cores if n_jobs is None or n_jobs < 0 else n_jobs
    # process start-up (~0.5 s) pays off only for many genes on large grids
    if n_jobs is None and n_genes * n_tiles**2 < 2e7:
        workers = 1
    workers = max(1, min(workers, n_genes))
    if workers == 1:
        return _solve_block(A, B, coords, num_itermax, want_cv2)
    chunks = [c for c in np.array_split(np.arange(n_genes), min(n_genes, 4 * workers)) if c.size]
    args = [(A[:, c], B[:, c], coords, num_itermax, want_cv2) for c in chunks]
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods():
        # forked workers inherit the imported solver (POT's import alone takes seconds)
        from concurrent.futures import ProcessPoolExecutor

        import ot  # noqa: F401

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            parts = list(pool.map(_solve_block, *zip(*args)))
    else:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=workers, backend="loky")(delayed(_solve_block)(*a) for a in args)
    return [r for part in parts for r in part]
