"""Spatial (tile-level) expression prediction, training and measured-to-tile alignment.

* :func:`predict_spatial` – a bulk model run in sliding windows over the tile grid (SEQUOIA's rule by
  default), or a direct per-tile model such as :class:`~histoexpr.models.HistoPrism`.
* :func:`train_spatial` – train the direct model on spot-level data (log1p counts, masked MSE).
* :func:`map_measured_to_tiles` – put measured spots on the tile grid (SEQUOIA's EMD protocol).

Tiles centred on measured spots (to predict exactly where expression was measured) come from
:func:`histoexpr.pp.tiles_from_centers`.
"""

from __future__ import annotations

import copy as _copy
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY, UNS_KEY
from .._docs import doc_params
from .._settings import progress_bar
from .._threads import threads_limited
from .._utils import check_finite, check_targets, iter_slides, renamed_kwargs, resolve_feature_key, warn
from .._utils import dense as _dense
from .._utils import grid_coords as _grid_coords
from ._runtime import (
    Patience,
    TrainResult,
    accepts_coords,
    fit,
    inference,
    load_models,
    model_id,
    model_info,
    resolve_device,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from anndata import AnnData

__all__ = [
    "predict_spatial",
    "train_spatial",
    "map_measured_to_tiles",
    "window_index",
]

_DEFAULT_BATCH_SIZE = 64


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _features(adata: AnnData, rep: str) -> np.ndarray:
    x = np.asarray(adata.obsm[rep], dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"obsm[{rep!r}] must be 2-D (tiles × features); got shape {x.shape}.")
    check_finite(x, what=f"obsm[{rep!r}]")
    return x


def _model_genes(model) -> list[str] | None:
    g = model_info(model, "genes")
    return [str(x) for x in g] if g is not None else None


def _model_num_outputs(model) -> int | None:
    n = model_info(model, "num_outputs")
    return int(n) if n is not None else None


def _select_genes(models: list, genes: Sequence[str] | None) -> tuple[list[str], np.ndarray | None]:
    """Output gene names and the model-output columns to keep (``None`` = all)."""
    model_genes = _model_genes(models[0])
    n_out = _model_num_outputs(models[0])
    for m in models[1:]:
        if _model_genes(m) != model_genes or _model_num_outputs(m) != n_out:
            raise ValueError("all fold models must have the same outputs (gene panel and size).")
    if model_genes is None:
        if genes is None:
            if n_out is None:
                raise ValueError("the model does not say how many genes it predicts; pass `genes=`.")
            return [f"gene_{i}" for i in range(n_out)], None
        genes = [str(g) for g in genes]
        if n_out is not None and len(genes) != n_out:
            raise ValueError(
                f"the model predicts {n_out} outputs but has no gene names, and `genes` has {len(genes)} "
                "entries: pass the model's full gene list in output order."
            )
        return genes, None
    if genes is None:
        return model_genes, None
    pos = {g: i for i, g in enumerate(model_genes)}
    wanted = [str(g) for g in genes]
    found = [g for g in wanted if g in pos]
    if not found:
        raise ValueError(
            f"none of the {len(wanted)} requested genes (e.g. {wanted[:5]}) is predicted by the model "
            f"(its panel: {len(model_genes)} genes, e.g. {model_genes[:5]}). Check gene naming "
            "(symbols vs Ensembl ids) or pass genes=None for the full panel."
        )
    if len(found) < len(wanted):
        missing = [g for g in wanted if g not in pos]
        warn(f"{len(missing)} requested genes are not in the model's panel and are skipped: {missing[:10]}")
    return found, np.array([pos[g] for g in found], dtype=np.int64)


def _model_units(model, method: str) -> str:
    units = model_info(model, "units")
    if units:
        return str(units)
    if method == "direct":
        return "log1p(counts)"
    return "log2(FPKM-UQ+1)"


# --------------------------------------------------------------------------------------------
# sliding windows
# --------------------------------------------------------------------------------------------
WINDOW_RULES = ("sequoia", "grid")


def _window_threshold(window: int, min_tissue_tiles: float | None) -> float:
    return window * window / 2 if min_tissue_tiles is None else float(min_tissue_tiles)


def window_index(
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    window: int = 10,
    stride: int = 1,
    min_tissue_tiles: float | None = None,
    windows: str = "sequoia",
    grid_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the tile grid as an index array into the tiles.

    Two rules place the ``window × window`` windows (``windows=``):

    ``"sequoia"`` (default)
        The published SEQUOIA rule (``spatial_vis/visualize.py``): corners run over
        ``min(col) + range(0, max(col) − min(col), stride)`` (outer loop) and
        ``min(row) + range(0, max(row) − min(row), stride)`` (inner loop), i.e. the lattice is
        anchored at the top-left of the tissue's bounding box, the last corner is one before the
        last tissue row/column and windows may overhang the tissue and the slide grid. A window's
        tiles fill its first slots in column-major order (by column, then row), as SEQUOIA's
        tile table is ordered. Windows are returned in SEQUOIA's call order (column corner outer).
    ``"grid"``
        Windows anchored at the slide's grid cell ``(0, 0)``, kept inside the slide grid of
        ``grid_shape = (n_rows, n_cols)`` cells (default: up to the last tile), slots filled in
        row-major order (by row, then column); windows in row-major corner order.

    In both, a window is used when it holds more than ``min_tissue_tiles`` tiles (default
    ``window² / 2``, SEQUOIA's ``> 50`` for 10 × 10), and the remaining slots point at the padding
    index ``n_tiles`` (a zero feature row).

    Parameters
    ----------
    rows, cols
        Non-negative integer grid indices of the ``n_tiles`` tiles (no duplicates).
    window
        Window side in tiles (SEQUOIA: 10, i.e. 100 slots).
    stride
        Step between windows in tiles.
    min_tissue_tiles
        A window is used when it holds more than this many tiles; ``None`` = ``window² / 2``.
    windows
        ``"sequoia"`` or ``"grid"`` (see above).
    grid_shape
        ``"grid"`` only: ``(n_rows, n_cols)`` of the slide's full tile grid. A grid smaller than the
        window gets one window at ``(0, 0)``.

    Returns
    -------
    index
        ``(n_windows, window**2)`` int64.
    corners
        ``(n_windows, 2)`` grid ``(row, col)`` of each window's top-left cell.

    Examples
    --------
    >>> import numpy as np
    >>> r, c = np.divmod(np.arange(144), 12)
    >>> idx, corners = window_index(r, c, window=10)
    >>> idx.shape, corners[:2].tolist()
    ((43, 100), [[0, 0], [1, 0]])
    >>> window_index(r, c, window=10, windows="grid")[0].shape
    (9, 100)
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    n = rows.size
    if windows not in WINDOW_RULES:
        raise ValueError(f"windows must be one of {WINDOW_RULES}; got {windows!r}.")
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be ≥ 1 (got window={window}, stride={stride}).")
    threshold = _window_threshold(window, min_tissue_tiles)
    if threshold >= window * window:
        raise ValueError(
            f"min_tissue_tiles={min_tissue_tiles} can never be exceeded by a {window}×{window} window."
        )
    if n == 0:
        raise ValueError("no tiles: tissue detection found no tissue or the tiles AnnData is empty.")
    if rows.min() < 0 or cols.min() < 0:
        raise ValueError("grid indices obs['row']/obs['col'] must be ≥ 0 (counted from the slide's top-left).")
    if np.unique(np.stack([rows, cols]), axis=1).shape[1] != n:
        raise ValueError("two tiles share the same (row, col) grid position: tiles of several slides mixed?")
    empty = np.zeros((0, window * window), dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    if windows == "sequoia":
        r_min, c_min = int(rows.min()), int(cols.min())
        r_corners = r_min + np.arange(0, int(rows.max()) - r_min, stride)
        c_corners = c_min + np.arange(0, int(cols.max()) - c_min, stride)
    else:
        height, width = int(rows.max()) + 1, int(cols.max()) + 1
        if grid_shape is not None:
            height, width = max(height, int(grid_shape[0])), max(width, int(grid_shape[1]))

        def corner_range(lo_tile: int, extent: int) -> np.ndarray:
            # on the stride lattice from 0, inside the grid, and able to reach a tile
            last = max(extent - window, 0)
            first = max(lo_tile - window + 1, 0)
            first = -(-first // stride) * stride
            return np.arange(first, last + 1, stride)

        r_corners = corner_range(int(rows.min()), height)
        c_corners = corner_range(int(cols.min()), width)
    if r_corners.size == 0 or c_corners.size == 0:
        return empty
    r_lo, c_lo = int(r_corners[0]), int(c_corners[0])
    grid = np.full((int(r_corners[-1]) - r_lo + window, int(c_corners[-1]) - c_lo + window), -1, dtype=np.int64)
    inside = (rows >= r_lo) & (cols >= c_lo) & (rows - r_lo < grid.shape[0]) & (cols - c_lo < grid.shape[1])
    grid[rows[inside] - r_lo, cols[inside] - c_lo] = np.flatnonzero(inside)
    # tiles per window from an integral image; only the windows kept are materialised
    occupied = np.pad((grid >= 0).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    if windows == "sequoia":  # column corner outer, row corner inner (SEQUOIA's loop order)
        cc, rr = np.meshgrid(c_corners - c_lo, r_corners - r_lo, indexing="ij")
    else:
        rr, cc = np.meshgrid(r_corners - r_lo, c_corners - c_lo, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    counts = occupied[rr + window, cc + window] - occupied[rr, cc + window] - occupied[rr + window, cc] + occupied[rr, cc]
    keep = np.flatnonzero(counts > threshold)
    views = np.lib.stride_tricks.sliding_window_view(grid, (window, window))[rr[keep], cc[keep]]
    if windows == "sequoia":  # slots in column-major order: by column, then row
        views = views.transpose(0, 2, 1)
    flat = views.reshape(keep.size, window * window)
    # stable sort on "is padding" moves the tiles to the front and keeps their order
    order = np.argsort(flat < 0, axis=1, kind="stable")
    index = np.take_along_axis(flat, order, axis=1)
    index[index < 0] = n
    corners = np.stack([rr[keep] + r_lo, cc[keep] + c_lo], axis=1)
    return index, corners


def _sliding_window_batched(
    features: np.ndarray,
    index: np.ndarray,
    models: list,
    *,
    columns: np.ndarray | None,
    batch_size: int,
    device: torch.device,
    progress: bool | None = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile mean over windows, mean over models. Returns ``(values (n, G), n_windows (n,))``."""
    import torch

    n, d = features.shape
    k = index.shape[1]
    feats = torch.zeros((n + 1, d), dtype=torch.float32, device=device)
    feats[:n] = torch.from_numpy(features).to(device)
    idx_all = torch.from_numpy(index).to(device)
    n_windows = torch.bincount(idx_all.reshape(-1), minlength=n + 1)[:n]
    total = None
    iterator = progress_bar(range(0, index.shape[0], batch_size), enabled=progress, desc="predict_spatial windows",
                            unit="batch")
    with inference(models, device):
        for start in iterator:
            idx = idx_all[start : start + batch_size]
            idx_t = idx.t().contiguous()
            x = feats[idx]  # (B, K, D); padding slots read the zero row
            for model in models:
                pred = model(x).float()
                if columns is not None:
                    pred = pred[:, torch.as_tensor(columns, device=device)]
                if total is None:
                    total = torch.zeros((n + 1, pred.shape[1]), dtype=torch.float64, device=device)
                pred = pred.double()
                # credit each window's prediction to every tile in it: one index_add_ per group of
                # slots, the repeated predictions bounded to ~4M values
                step = max(1, (1 << 22) // max(1, pred.numel()))
                for s0 in range(0, k, step):
                    slots = idx_t[s0 : s0 + step]
                    src = pred.unsqueeze(0).expand(slots.shape[0], -1, -1).reshape(-1, pred.shape[1])
                    total.index_add_(0, slots.reshape(-1), src)
    values = total[:n] / (n_windows.clamp(min=1).unsqueeze(1).double() * len(models))
    values[n_windows == 0] = float("nan")
    return values.float().cpu().numpy(), n_windows.cpu().numpy()


def _sliding_window_loop(
    features: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    model,
    *,
    window: int = 10,
    stride: int = 1,
    min_tissue_tiles: float | None = None,
    windows: str = "sequoia",
    grid_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Reference: the sliding window one window at a time (plain loops, batch axis added).

    Used in tests and benchmarks to check :func:`predict_spatial`; tiles in no window get NaN.
    """
    import torch

    models = model if isinstance(model, (list, tuple)) else [model]
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols))}
    n, d = features.shape
    threshold = _window_threshold(window, min_tissue_tiles)
    if windows == "sequoia":  # column corner outer, row corner inner; slots column-major
        r_min, c_min = int(min(rows)), int(min(cols))
        corners = [
            (r_min + y, c_min + x)
            for x in range(0, int(max(cols)) - c_min, stride)
            for y in range(0, int(max(rows)) - r_min, stride)
        ]
        cells = [(r, c) for c in range(window) for r in range(window)]
    else:
        height, width = int(max(rows)) + 1, int(max(cols)) + 1
        if grid_shape is not None:
            height, width = max(height, grid_shape[0]), max(width, grid_shape[1])
        corners = [
            (r0, c0)
            for r0 in range(0, max(height - window, 0) + 1, stride)
            for c0 in range(0, max(width - window, 0) + 1, stride)
        ]
        cells = [(r, c) for r in range(window) for c in range(window)]
    per_model = []
    for m in models:
        m.eval()
        sums: dict[int, Any] = {}
        counts = np.zeros(n, dtype=np.int64)
        with torch.inference_mode():
            for r0, c0 in corners:
                tiles = [where[(r0 + r, c0 + c)] for r, c in cells if (r0 + r, c0 + c) in where]
                if len(tiles) <= threshold:
                    continue
                x = torch.zeros((1, window * window, d), dtype=torch.float32)
                x[0, : len(tiles)] = torch.from_numpy(features[tiles])
                pred = m(x)[0].double().numpy()
                for t in tiles:
                    sums[t] = sums.get(t, 0.0) + pred
                    counts[t] += 1
        g = len(next(iter(sums.values()))) if sums else 0
        out = np.full((n, g), np.nan)
        for t, s in sums.items():
            out[t] = s / counts[t]
        per_model.append(out)
    return np.mean(per_model, axis=0)


def _slide_grid_shape(adata: AnnData) -> tuple[int, int] | None:
    """``(n_rows, n_cols)`` of the slide's full tile grid, when the tiles AnnData records it."""
    info = adata.uns.get(UNS_KEY, {})
    dims, side = info.get("level0_dimensions"), info.get("tile_size_level0")
    if dims is None or not side:
        return None
    return int(dims[1] // float(side)), int(dims[0] // float(side))


# --------------------------------------------------------------------------------------------
# predict_spatial
# --------------------------------------------------------------------------------------------
def _condition_index(model, condition, slide_id: str) -> int | None:
    n_cond = model_info(model, "num_conditions") or 0
    if not n_cond:
        return None
    if isinstance(condition, Mapping):
        condition = condition.get(slide_id)
    if condition is None:
        raise ValueError(
            f"the model is conditioned on {n_cond} conditions; pass `condition=` (a label or index, or a "
            "dict slide_id → label)."
        )
    labels = model_info(model, "conditions")
    if isinstance(condition, (int, np.integer)):
        return int(condition)
    if labels is None or str(condition) not in [str(c) for c in labels]:
        raise ValueError(f"unknown condition {condition!r}; the model knows {labels}.")
    return [str(c) for c in labels].index(str(condition))


def _predict_direct(features, coords, models, *, columns, device, condition_idx) -> np.ndarray:
    import torch

    x = torch.from_numpy(features).to(device)
    xy = torch.from_numpy(np.asarray(coords, dtype=np.float32)).to(device)
    total = None
    with inference(models, device):
        for model in models:
            cond = torch.tensor([condition_idx], device=device) if condition_idx is not None else None
            kwargs = {"coords": xy.unsqueeze(0)} if accepts_coords(model) else {}
            pred = model(x.unsqueeze(0), cond, **kwargs)[0].float()
            if columns is not None:
                pred = pred[:, torch.as_tensor(columns, device=device)]
            total = pred.double() if total is None else total + pred.double()
    return (total / len(models)).float().cpu().numpy()


@doc_params()
@renamed_kwargs(table_key="key_added")
@threads_limited(small=True)
def predict_spatial(
    adata_tiles: AnnData,
    model,
    *,
    method: str = "sliding_window",
    use_rep: str | None = None,
    window: int = 10,
    stride: int = 1,
    min_tissue_tiles: float | None = None,
    windows: str | None = None,
    batch_size: int = _DEFAULT_BATCH_SIZE,
    device: Any = None,
    genes: Sequence[str] | None = None,
    condition: Any = None,
    sdata=None,
    key_added: str | None = None,
    region: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> AnnData:
    """Predict expression for every tile: a new AnnData tiles × genes.

    ``method="sliding_window"`` runs a bulk model (e.g. :class:`~histoexpr.models.Sequoia`, input
    ``(B, window², D)``) over ``window × window`` windows of the tile grid. With the default
    ``windows="sequoia"`` the windows are those of the published SEQUOIA code
    (``spatial_vis/visualize.py``, with its missing batch axis added): a ``stride`` lattice anchored at
    the top-left of the tissue's bounding box, corners up to one before the last tissue row/column,
    windows allowed to overhang the tissue and the slide; its tiles fill the first slots in column-major
    order (by column, then row) and the rest are zero padding. ``windows="grid"`` is histoexpr's earlier
    rule: lattice anchored at the slide's grid cell ``(0, 0)``, windows inside the slide grid, slots in
    row-major order (see :func:`window_index` and the fidelity page of the docs). In both, a window is
    used when it holds more than ``min_tissue_tiles`` tiles; its prediction is credited to each of its
    tiles; a tile's value is the mean over its windows, then the mean over the fold models. Each tile is featurised once (features come from
    ``obsm``), windows are cut by indexing, and forwards are batched (CUDA with bf16 autocast when
    available). Tiles in no used window get NaN (``obs["n_windows"] == 0``).

    ``method="direct"`` runs a per-tile model such as :class:`~histoexpr.models.HistoPrism` on all
    tiles of each slide at once (``condition`` = the slide's condition label or index).

    Parameters
    ----------
    adata_tiles
        Tiles AnnData with features in ``obsm[use_rep]`` and grid ``obs["row"]``/``obs["col"]``.
        Several slides (``obs["slide_id"]``) are processed one by one.
    model
        A model, a checkpoint directory written by ``save_pretrained`` (or ``"hf-hub:owner/repo"``),
        or a list of those, e.g. fold models (their predictions are averaged).
    method
        ``"sliding_window"`` or ``"direct"``.
    {use_rep}
    window, stride, min_tissue_tiles
        Sliding-window geometry (SEQUOIA: 10, 1 and more than ``window² / 2`` = 50 tiles, the default
        when ``min_tissue_tiles`` is ``None``).
    windows
        Window placement and slot order: ``"sequoia"`` (default for ``method="sliding_window"``,
        reproduces the published code) or ``"grid"`` (see :func:`window_index`).
    batch_size
        Windows per forward pass.
    {device}
    genes
        Genes to return. When the model knows its gene names this selects a subset (unknown genes are
        skipped with a warning; none known is an error); otherwise it names the model's outputs.
    condition
        Condition of the slide(s) for conditioned direct models (label, index or dict slide → label).
    sdata, key_added, region, overwrite
        When ``sdata`` is given, the predictions are also written into it as table ``key_added``
        (default ``"predictions"``; old name of the argument: ``table_key``) annotating the tile shapes
        ``region`` (default ``uns['histoexpr']['shapes_key']``, else the only ``"*_tiles"`` shapes);
        an existing table of that name is replaced only with ``overwrite=True``.
    progress
        Show a progress bar over window batches; default ``histoexpr.settings.progress`` (on when
        interactive). Runs with ``histoexpr.settings.n_threads`` CPU threads (default 1: a small model).

    Returns
    -------
    AnnData with ``X`` = predictions (float32, tiles × genes), the input's ``obs`` (plus
    ``n_windows`` for the sliding window), ``obsm["spatial"]``, ``uns["spatial"]`` and
    ``uns["histoexpr"]`` extended with ``model``, ``method``, ``units`` and ``genes``.

    Examples
    --------
    A tiny random model on a 12 × 12 grid of random features (runs anywhere):

    >>> import anndata as ad, numpy as np, pandas as pd, histoexpr as hx
    >>> from histoexpr.models import Sequoia
    >>> rows, cols = np.divmod(np.arange(144), 12)
    >>> tiles = ad.AnnData(obs=pd.DataFrame({"row": rows, "col": cols}, index=[f"t{i}" for i in range(144)]))
    >>> tiles.obsm["X_enc"] = np.random.default_rng(0).normal(size=(144, 8)).astype(np.float32)
    >>> model = Sequoia(num_outputs=3, input_dim=8, depth=1, nheads=2, num_clusters=100, genes=["A", "B", "C"])
    >>> pred = hx.tl.predict_spatial(tiles, model, device="cpu")
    >>> pred.shape, pred.uns["histoexpr"]["units"]
    ((144, 3), 'log2(FPKM-UQ+1)')

    With the released SEQUOIA fold models (checkpoint directories) on UNI features:

    >>> pred = hx.tl.predict_spatial(tiles, sequoia_folds, use_rep="X_uni")  # doctest: +SKIP
    >>> sq.pl.spatial_scatter(pred, color="ERBB2", shape="square")  # doctest: +SKIP
    """
    import anndata as ad

    if method not in ("sliding_window", "direct"):
        raise ValueError(f"method must be 'sliding_window' or 'direct'; got {method!r}.")
    models = load_models(model)
    if adata_tiles.n_obs == 0:
        raise ValueError("the tiles AnnData is empty: no tissue tiles to predict.")
    rep = resolve_feature_key(adata_tiles, use_rep)
    features = _features(adata_tiles, rep)
    in_dim = model_info(models[0], "input_dim")
    if in_dim is not None and features.shape[1] != int(in_dim):
        raise ValueError(
            f"obsm[{rep!r}] has {features.shape[1]} features but the model expects input_dim={in_dim}: "
            "extract features with the encoder the model was trained on."
        )
    gene_names, columns = _select_genes(models, genes)
    dev = resolve_device(device)

    values = np.full((adata_tiles.n_obs, len(gene_names)), np.nan, dtype=np.float32)
    n_windows = np.zeros(adata_tiles.n_obs, dtype=np.int64)
    if method == "sliding_window":
        windows = "sequoia" if windows is None else windows
        if windows not in WINDOW_RULES:
            raise ValueError(f"windows must be one of {WINDOW_RULES}; got {windows!r}.")
        threshold = f"{_window_threshold(window, min_tissue_tiles):g}"
        rows, cols = _grid_coords(adata_tiles)
        slots = model_info(models[0], "num_clusters")
        if slots is not None and int(slots) != window * window:
            raise ValueError(
                f"the model takes {slots} tokens but a {window}×{window} window has {window * window} slots."
            )
        slides = iter_slides(adata_tiles)
        grid_shape = _slide_grid_shape(adata_tiles) if len(slides) == 1 else None
        for slide_id, pos in slides:
            index, _ = window_index(
                rows[pos], cols[pos], window=window, stride=stride, min_tissue_tiles=min_tissue_tiles,
                windows=windows, grid_shape=grid_shape,
            )
            if index.shape[0] == 0:
                raise ValueError(
                    f"slide {slide_id!r}: no {window}×{window} window holds more than {threshold} "
                    f"tissue tiles ({pos.size} tiles in all). Lower `min_tissue_tiles` or `window`, or check "
                    "that obs['row']/obs['col'] are grid indices (not pixels)."
                )
            vals, counts = _sliding_window_batched(
                features[pos], index, models, columns=columns, batch_size=batch_size, device=dev,
                progress=progress,
            )
            values[pos], n_windows[pos] = vals, counts
        uncovered = int((n_windows == 0).sum())
        if uncovered:
            warn(f"{uncovered} tiles lie in no window with > {threshold} tiles; their predictions are NaN.")
    else:
        if SPATIAL_KEY not in adata_tiles.obsm:
            raise ValueError("direct prediction needs tile centres in obsm['spatial'].")
        for slide_id, pos in iter_slides(adata_tiles):
            cond = _condition_index(models[0], condition, slide_id)
            values[pos] = _predict_direct(
                features[pos], adata_tiles.obsm[SPATIAL_KEY][pos], models, columns=columns, device=dev,
                condition_idx=cond,
            )

    obs = adata_tiles.obs.copy()
    if method == "sliding_window":
        obs["n_windows"] = n_windows
    out = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index(gene_names, name="gene")))
    if SPATIAL_KEY in adata_tiles.obsm:
        out.obsm[SPATIAL_KEY] = np.array(adata_tiles.obsm[SPATIAL_KEY], copy=True)
    if "spatial" in adata_tiles.uns:
        out.uns["spatial"] = _copy.deepcopy(adata_tiles.uns["spatial"])
    info = _copy.deepcopy(dict(adata_tiles.uns.get(UNS_KEY, {})))
    info.update(
        {
            "model": model_id(models[0]),
            "n_models": len(models),
            "method": method,
            "use_rep": rep,
            "units": _model_units(models[0], method),
            "genes": list(gene_names),
        }
    )
    if method == "sliding_window":
        info.update(
            {"window": window, "stride": stride, "min_tissue_tiles": float(threshold), "windows": windows}
        )
    out.uns[UNS_KEY] = info
    if sdata is not None:
        _write_to_sdata(out, sdata, table_key=key_added or "predictions", region=region, overwrite=overwrite)
    return out


def _write_to_sdata(pred: AnnData, sdata, *, table_key: str, region: str | None, overwrite: bool = False) -> None:
    from .. import io as hxio

    shapes = list(getattr(sdata, "shapes", {}))
    if region is None:
        info = pred.uns.get(UNS_KEY, {})
        region = info.get("shapes_key")
        if region is None:
            tiles_like = [k for k in shapes if k.endswith("_tiles")]
            region = tiles_like[0] if len(tiles_like) == 1 else None
    if region is None or region not in shapes:
        raise ValueError(
            f"cannot tell which tile shapes the predictions annotate (shapes in sdata: {shapes}); pass "
            "`region=` (the shapes element written by hx.pp.tile / hx.io.add_tiles_to_spatialdata)."
        )
    hxio.add_table(sdata, pred, name=table_key, region=region, instance_key="tile_id", overwrite=overwrite)


def map_measured_to_tiles(*args: Any, **kwargs: Any) -> AnnData:
    """Moved to :func:`histoexpr.pp.map_measured_to_tiles`; this alias warns and calls it, for one release."""

    warnings.warn("histoexpr.tl.map_measured_to_tiles moved to histoexpr.pp.map_measured_to_tiles",
                  DeprecationWarning, stacklevel=2)
    from ..pp import map_measured_to_tiles as moved

    return moved(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# train_spatial (HistoPrism-style direct model on spot-level data)
# --------------------------------------------------------------------------------------------
def _as_slide_dict(adatas) -> dict[str, AnnData]:
    from anndata import AnnData

    if isinstance(adatas, Mapping):
        return {str(k): v for k, v in adatas.items()}
    if isinstance(adatas, AnnData):
        if "slide_id" not in adatas.obs:
            raise ValueError("a single AnnData needs obs['slide_id'] to split it into slides.")
        sid = adatas.obs["slide_id"].astype(str)
        return {s: adatas[(sid == s).to_numpy()] for s in pd.unique(sid)}
    out: dict[str, AnnData] = {}
    for a in adatas:
        s = a.uns.get(UNS_KEY, {}).get("slide_id")
        if s is None and "slide_id" in a.obs:
            s = a.obs["slide_id"].iloc[0]
        if s is None:
            raise ValueError("each AnnData needs uns['histoexpr']['slide_id'] or obs['slide_id']; or pass a dict.")
        out[str(s)] = a
    return out


def _slide_condition(a: AnnData, key: str):
    if key in a.obs:
        vals = a.obs[key].astype(str).unique()
        if len(vals) != 1:
            raise ValueError(f"obs[{key!r}] must be constant within a slide; got {list(vals)[:5]}.")
        return vals[0]
    if key in a.uns.get(UNS_KEY, {}):
        return str(a.uns[UNS_KEY][key])
    if key in a.uns:
        return str(a.uns[key])
    raise KeyError(f"condition {key!r} not found in obs or uns of a slide.")


def _slide_tensors(a: AnnData, rep: str, genes: list[str], layer: str | None, log1p: bool):
    feats = _features(a, rep)
    present = pd.Index(a.var_names.astype(str))
    pos = present.get_indexer(genes)
    mask = pos >= 0
    y = np.zeros((a.n_obs, len(genes)), dtype=np.float32)
    if mask.any():
        src = _dense(a.layers[layer] if layer is not None else a.X)
        vals = src[:, pos[mask]]
        if log1p:
            if np.any(vals < 0):
                raise ValueError("targets have negative values: pass raw counts or set target_transform=None.")
            vals = np.log1p(vals)
        y[:, mask] = vals
    coords = np.asarray(a.obsm[SPATIAL_KEY], dtype=np.float32)[:, :2] if SPATIAL_KEY in a.obsm else None
    return feats, y, mask, coords


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, gene_mask: torch.Tensor) -> torch.Tensor:
    """MSE over the genes a slide measures (``gene_mask`` ``(G,)``, True = measured)."""
    m = gene_mask.to(pred.dtype).expand_as(pred)
    return ((pred - target) ** 2 * m).sum() / m.sum()


def _training_chunk(model, coords, n: int, max_tiles: int, rng: np.random.Generator):
    """Tiles of one training step on a slide of ``n`` tiles: ``None`` (all) or one attention chunk.

    The chunks are those the model attends over at inference (:func:`~histoexpr.models.histoprism.
    attention_chunks`, size ``attention_chunk_size``; ``max_tiles`` for a full-attention model), one
    drawn at random per step.
    """
    from ..models.histoprism import attention_chunks

    size = model_info(model, "attention_chunk_size") or max_tiles
    if n <= size:
        return None
    chunks = attention_chunks(n, int(size), coords)
    return chunks[int(rng.integers(len(chunks)))].cpu()


@doc_params()
@renamed_kwargs(epochs="max_epochs", seed="random_state")
@threads_limited(small=True)
def train_spatial(
    adatas,
    *,
    use_rep: str,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    target_transform: str | None = "log1p",
    condition_key: str | None = None,
    train: Sequence[str] | None = None,
    val: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    max_epochs: int = 300,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    patience: int = 30,
    max_tiles: int = 4096,
    random_state: int = 0,
    device: Any = None,
    checkpoint_dir: str | Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train the HistoPrism-style direct model on spot-level data.

    Each step sees one training slide (all its spots or, for a slide larger than the model's
    ``attention_chunk_size``, one of the Morton-contiguous chunks it attends over at inference): features
    ``obsm[use_rep]`` → ``log1p`` counts, masked MSE (genes a slide does not measure are left out of its
    loss), AdamW, gradient clipping. After every epoch the mean MSE on the validation slides decides
    early stopping (``patience`` epochs without improvement); the best weights are restored. Without
    validation slides it trains for ``max_epochs`` epochs and keeps the last weights.

    Parameters
    ----------
    adatas
        Slides: dict ``slide_id → AnnData``, a list of AnnData (slide id in ``uns['histoexpr']['slide_id']``
        or ``obs['slide_id']``) or one AnnData with ``obs['slide_id']``. Each holds counts in ``X`` (or
        ``layer``), features in ``obsm[use_rep]`` and centres in ``obsm['spatial']``.
    use_rep
        Feature key in ``obsm``.
    genes
        Gene panel (output order). Default: the union over the training slides.
    layer
        Layer with the counts instead of ``X``.
    target_transform
        ``"log1p"`` (default, raw counts in) or ``None`` (targets used as given).
    condition_key
        obs column / uns key with the slide condition (e.g. cancer type); ``None`` = unconditioned.
    train, val, test
        Slide ids of each split (slide-level splits; no slide may be in two). Default: all slides train,
        no validation (then training runs ``max_epochs`` epochs).
    max_epochs, lr, weight_decay, grad_clip, patience
        Optimisation (defaults: AdamW lr 5e-5, weight decay 0.01, clip 1.0).
    max_tiles
        Chunk size for a model with full attention (``attention_chunk_size=None``); a chunking model
        trains on its own inference chunks.
    {random_state}
    {device}
    checkpoint_dir
        If given, the best model is saved there (``config.json`` + ``model.safetensors``) whenever the
        validation loss improves (without validation: once, at the end); reload with
        :meth:`HistoPrism.from_pretrained`.
    model_kwargs
        Extra :class:`~histoexpr.models.HistoPrism` arguments (``hidden_dim``, ``depth``, ``dropout``...).
    {progress}

    Returns
    -------
    :class:`~histoexpr.tl.TrainResult`: ``model`` is the trained :class:`~histoexpr.models.HistoPrism`
    (best validation epoch, eval mode, with ``.genes``, ``.conditions``, ``.units``); ``history`` has one
    row per epoch (``train_loss``, ``val_loss``); ``best_epoch``, ``epochs_run``, ``test_loss``.
    (Until now the model itself was returned, with a ``.history`` dict; that dict is still set on
    ``model``, and model attributes on the result still work, with a ``DeprecationWarning``.)

    Examples
    --------
    >>> model = hx.tl.train_spatial({"C2": c2, "C3": c3, "C4": c4}, use_rep="X_hed_stats",
    ...                             train=["C2", "C3"], val=["C4"], max_epochs=300)  # doctest: +SKIP
    >>> pred = hx.tl.predict_spatial(tiles_b4, model, method="direct")  # doctest: +SKIP
    """
    import torch

    from ..models.histoprism import HistoPrism

    check_targets(adatas, layer=layer, genes=genes)  # a NaN target would make the whole model NaN
    slides = _as_slide_dict(adatas)
    train = list(slides) if train is None else [str(s) for s in train]
    val = [] if val is None else [str(s) for s in val]
    test = [] if test is None else [str(s) for s in test]
    unknown = [s for s in (*train, *val, *test) if s not in slides]
    if unknown:
        raise ValueError(f"unknown slide ids in the splits: {unknown} (slides: {list(slides)}).")
    overlap = (set(train) & set(val)) | (set(train) & set(test)) | (set(val) & set(test))
    if overlap:
        raise ValueError(f"slides in more than one split: {sorted(overlap)}.")
    if not train:
        raise ValueError("no training slides.")
    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be ≥ 1, got {max_epochs}.")
    if target_transform not in ("log1p", None):
        raise ValueError("target_transform must be 'log1p' or None.")
    for s in (*train, *val, *test):
        if use_rep not in slides[s].obsm:
            raise KeyError(f"slide {s!r} has no obsm[{use_rep!r}]; extract features first.")
    if genes is None:
        genes = list(dict.fromkeys(g for s in train for g in slides[s].var_names.astype(str)))
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        raise ValueError("`genes` has duplicates.")

    conditions: list[str] = []
    if condition_key is not None:
        conditions = sorted({_slide_condition(slides[s], condition_key) for s in (*train, *val, *test)})

    rng = np.random.default_rng(random_state)
    torch.manual_seed(random_state)
    dev = resolve_device(device)
    log1p = target_transform == "log1p"

    def tensors(s: str):
        feats, y, mask, coords = _slide_tensors(slides[s], use_rep, genes, layer, log1p)
        if not mask.any():
            raise ValueError(f"slide {s!r} measures none of the {len(genes)} panel genes.")
        cond = conditions.index(_slide_condition(slides[s], condition_key)) if conditions else None
        return {
            "x": torch.from_numpy(feats),
            "y": torch.from_numpy(y),
            "mask": torch.from_numpy(mask),
            "coords": None if coords is None else torch.from_numpy(coords),
            "cond": cond,
        }

    data = {s: tensors(s) for s in (*train, *val, *test)}
    dims = {d["x"].shape[1] for d in data.values()}
    if len(dims) != 1:
        raise ValueError(f"slides have different feature dimensions {sorted(dims)}: use one encoder.")
    units = "log1p(counts)" if log1p else "as given"
    model = HistoPrism(
        {**dict(model_kwargs or {}), "input_dim": dims.pop(), "num_outputs": len(genes),
         "conditions": conditions or None},
        genes=genes, units=units,
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def forward(d, take=None):
        x, coords = d["x"], d["coords"]
        y = d["y"]
        if take is not None:
            x, y = x[take], y[take]
            coords = coords[take] if coords is not None else None
        cond = torch.tensor([d["cond"]], device=dev) if d["cond"] is not None else None
        pred = model(
            x.to(dev).unsqueeze(0), cond, coords=None if coords is None else coords.to(dev).unsqueeze(0)
        )[0]
        return _masked_mse(pred, y.to(dev), d["mask"].to(dev))

    def evaluate(ids):
        if not ids:
            return None
        model.eval()
        with torch.no_grad():
            losses = [float(forward(data[s])) for s in ids]
        return float(np.mean(losses))

    meta = {"use_rep": use_rep, "train": train, "val": val, "test": test, "random_state": random_state}

    def train_epoch(epoch: int) -> dict:
        losses = []
        for s in rng.permutation(train):
            n = data[s]["x"].shape[0]
            take = _training_chunk(model, data[s]["coords"], n, max_tiles, rng)
            loss = forward(data[s], take)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        return {"train_loss": float(np.mean(losses))}

    def save(epoch: int, row: dict) -> None:
        model.save_pretrained(checkpoint_dir, metadata={**meta, "epoch": epoch, "val_loss": row["val_loss"]})

    t_start = time.perf_counter()
    # without validation slides every epoch is kept, i.e. the last weights
    log = fit(model, train_epoch, max_epochs=max_epochs, validate=(lambda: {"val_loss": evaluate(val)}) if val else None,
              stopper=Patience(patience, "val_loss") if val else None,
              on_save=save if (val and checkpoint_dir is not None) else None, progress=progress)
    if not val and checkpoint_dir is not None:
        model.save_pretrained(checkpoint_dir, metadata={**meta, "epoch": log.best_epoch,
                                                        "train_loss": log.rows[-1]["train_loss"]})
    history: dict[str, Any] = {
        "train_loss": [r["train_loss"] for r in log.rows], "val_loss": [r.get("val_loss") for r in log.rows],
        "train": train, "val": val, "test": test, "best_epoch": log.best_epoch, "epochs_run": len(log.rows),
        "test_loss": evaluate(test),
    }
    model.history = history  # the old record, kept on the model for one release
    best = log.best_row or {}
    return TrainResult(
        model=model, models=[model], history=pd.DataFrame(log.rows).drop(columns="saved"),
        best_epoch=log.best_epoch, best_score=best.get("val_loss", best.get("train_loss")),
        epochs_run=len(log.rows), test_loss=history["test_loss"], seconds=time.perf_counter() - t_start,
        device=str(dev),
    )
