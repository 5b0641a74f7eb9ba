"""Spatial (tile-level) expression prediction, training and measured-to-tile alignment.

* :func:`predict_spatial` – a bulk model run in sliding windows over the tile grid (SPEC §3.3), or a
  direct per-tile model such as :class:`~histoexpr.models.HistoPrism` (SPEC §3.4).
* :func:`train_spatial` – train the direct model on spot-level data (log1p counts, masked MSE).
* :func:`map_measured_to_tiles` – put measured spots on the tile grid (SEQUOIA's EMD protocol, SPEC §4).

Tiles centred on measured spots (to predict exactly where expression was measured) come from
:func:`histoexpr.pp.tiles_from_centers`.
"""

from __future__ import annotations

import copy as _copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY, UNS_KEY
from .._settings import progress_bar
from .._threads import threads_limited
from .._utils import bf16_autocast, check_finite, get_device, resolve_feature_key, warn

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


def _grid_coords(adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in ("row", "col") if c not in adata.obs]
    if missing:
        raise ValueError(
            f"tiles need integer grid coordinates obs['row'] and obs['col'] (missing: {missing}). "
            "Make tiles with `hx.pp.tile`, or add the grid indices of each tile to obs."
        )
    rows, cols = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
    for name, v in (("row", rows), ("col", cols)):
        if v.dtype.kind not in "iu":
            if v.dtype.kind != "f" or not np.all(np.isfinite(v)) or not np.all(v == np.round(v)):
                raise ValueError(f"obs[{name!r}] must hold integer grid indices; got dtype {v.dtype}.")
    return rows.astype(np.int64), cols.astype(np.int64)


def _split_slides(adata: AnnData) -> list[tuple[str, np.ndarray]]:
    """``(slide_id, positions)`` of each slide in a (possibly concatenated) tiles AnnData."""
    if "slide_id" in adata.obs and adata.obs["slide_id"].nunique() > 1:
        sid = adata.obs["slide_id"].astype(str).to_numpy()
        return [(s, np.flatnonzero(sid == s)) for s in pd.unique(sid)]
    slide = adata.obs["slide_id"].iloc[0] if "slide_id" in adata.obs and adata.n_obs else None
    if slide is None:
        slide = adata.uns.get(UNS_KEY, {}).get("slide_id", "slide")
    return [(str(slide), np.arange(adata.n_obs))]


def _model_config(model) -> dict:
    cfg = getattr(model, "config", None)
    return cfg if isinstance(cfg, dict) else {}


def _model_genes(model) -> list[str] | None:
    for attr in ("genes", "gene_names"):
        g = getattr(model, attr, None)
        if g is not None:
            return [str(x) for x in g]
    g = _model_config(model).get("genes")
    return [str(x) for x in g] if g is not None else None


def _model_num_outputs(model) -> int | None:
    n = _model_config(model).get("num_outputs")
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
    units = getattr(model, "units", None) or _model_config(model).get("units")
    if units:
        return str(units)
    if method == "direct":
        return "log1p(counts)"
    return "log2(FPKM-UQ+1)"


def _model_id(model) -> str:
    """The checkpoint a model was loaded from (as ``predict_bulk`` records), else its architecture."""
    cfg = _model_config(model)
    return str(getattr(model, "checkpoint", None) or cfg.get("name") or cfg.get("architecture") or type(model).__name__)


# --------------------------------------------------------------------------------------------
# sliding windows (SPEC §3.3)
# --------------------------------------------------------------------------------------------
def window_index(
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    window: int = 10,
    stride: int = 1,
    min_tissue_tiles: int = 50,
    grid_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the tile grid as an index array into the tiles (SPEC §3.3).

    As in SEQUOIA, a ``window × window`` window starts at the slide's top-left grid cell ``(0, 0)``
    and moves by ``stride`` to the right, then down, staying inside the slide's grid of
    ``grid_shape = (n_rows, n_cols)`` cells. A window is used when it holds more than
    ``min_tissue_tiles`` tiles. Its tiles fill its first slots in row-major order (by row, then
    column); the remaining slots point at the padding index ``n_tiles`` (a zero feature row).

    Parameters
    ----------
    rows, cols
        Non-negative integer grid indices of the ``n_tiles`` tiles (no duplicates).
    window
        Window side in tiles (SEQUOIA: 10, i.e. 100 slots).
    stride
        Step between windows in tiles.
    min_tissue_tiles
        A window is used when it holds more than this many tiles.
    grid_shape
        ``(n_rows, n_cols)`` of the slide's full tile grid; default: up to the last tile. A grid
        smaller than the window gets one window at ``(0, 0)``.

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
    >>> idx, corners = window_index(r, c, window=10, min_tissue_tiles=50)
    >>> idx.shape
    (9, 100)
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    n = rows.size
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be ≥ 1 (got window={window}, stride={stride}).")
    if min_tissue_tiles >= window * window:
        raise ValueError(
            f"min_tissue_tiles={min_tissue_tiles} can never be exceeded by a {window}×{window} window."
        )
    if n == 0:
        raise ValueError("no tiles: tissue detection found no tissue or the tiles AnnData is empty.")
    if rows.min() < 0 or cols.min() < 0:
        raise ValueError("grid indices obs['row']/obs['col'] must be ≥ 0 (counted from the slide's top-left).")
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    if grid_shape is not None:
        height, width = max(height, int(grid_shape[0])), max(width, int(grid_shape[1]))
    # window corners: on the stride lattice, inside the grid, and able to reach a tile
    def corner_range(lo_tile: int, extent: int) -> np.ndarray:
        last = max(extent - window, 0)
        first = max(lo_tile - window + 1, 0)
        first = -(-first // stride) * stride
        return np.arange(first, last + 1, stride)

    r_corners = corner_range(int(rows.min()), height)
    c_corners = corner_range(int(cols.min()), width)
    if r_corners.size == 0 or c_corners.size == 0:
        return np.zeros((0, window * window), dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    r_lo, c_lo = int(r_corners[0]), int(c_corners[0])
    grid = np.full((int(r_corners[-1]) - r_lo + window, int(c_corners[-1]) - c_lo + window), -1, dtype=np.int64)
    inside = (rows >= r_lo) & (cols >= c_lo) & (rows - r_lo < grid.shape[0]) & (cols - c_lo < grid.shape[1])
    if np.unique(np.stack([rows, cols]), axis=1).shape[1] != n:
        raise ValueError("two tiles share the same (row, col) grid position: tiles of several slides mixed?")
    grid[rows[inside] - r_lo, cols[inside] - c_lo] = np.flatnonzero(inside)
    # tiles per window from an integral image; only the windows kept are materialised
    occupied = np.pad((grid >= 0).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    rr, cc = np.meshgrid(r_corners - r_lo, c_corners - c_lo, indexing="ij")
    counts = occupied[rr + window, cc + window] - occupied[rr, cc + window] - occupied[rr + window, cc] + occupied[rr, cc]
    kr, kc = np.nonzero(counts > min_tissue_tiles)
    views = np.lib.stride_tricks.sliding_window_view(grid, (window, window))
    flat = views[rr[kr, kc], cc[kr, kc]].reshape(kr.size, window * window)
    # stable sort on "is padding" moves the tiles to the front and keeps their row-major order
    order = np.argsort(flat < 0, axis=1, kind="stable")
    index = np.take_along_axis(flat, order, axis=1)
    index[index < 0] = n
    corners = np.stack([r_corners[kr], c_corners[kc]], axis=1)
    return index, corners


def _in_eval_mode(models: list, device: torch.device):
    """Context: ``models`` in eval mode on ``device``; each model's mode and device are restored after."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        saved = []
        for m in models:
            param = next(m.parameters(), None)
            saved.append((m, m.training, param.device if param is not None else None))
        try:
            for m in models:
                m.eval().to(device)
            yield
        finally:
            for m, training, dev in saved:
                if dev is not None:
                    m.to(dev)
                m.train(training)

    return ctx()


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
    with _in_eval_mode(models, device), torch.inference_mode():
        for start in iterator:
            idx = idx_all[start : start + batch_size]
            idx_t = idx.t().contiguous()
            x = feats[idx]  # (B, K, D); padding slots read the zero row
            for model in models:
                with bf16_autocast(device):
                    pred = model(x)
                pred = pred.float()
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
    min_tissue_tiles: int = 50,
    grid_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Reference: SEQUOIA's procedure one window at a time (plain loops, batch axis added).

    Used in tests and benchmarks to check :func:`predict_spatial`; tiles in no window get NaN.
    """
    import torch

    models = model if isinstance(model, (list, tuple)) else [model]
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols))}
    n, d = features.shape
    height, width = int(max(rows)) + 1, int(max(cols)) + 1
    if grid_shape is not None:
        height, width = max(height, grid_shape[0]), max(width, grid_shape[1])
    per_model = []
    for m in models:
        m.eval()
        sums: dict[int, Any] = {}
        counts = np.zeros(n, dtype=np.int64)
        with torch.inference_mode():
            for r0 in range(0, max(height - window, 0) + 1, stride):
                for c0 in range(0, max(width - window, 0) + 1, stride):
                    tiles = [
                        where[(r, c)]
                        for r in range(r0, r0 + window)
                        for c in range(c0, c0 + window)
                        if (r, c) in where
                    ]
                    if len(tiles) <= min_tissue_tiles:
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
    n_cond = _model_config(model).get("num_conditions", 0)
    if not n_cond:
        return None
    if isinstance(condition, Mapping):
        condition = condition.get(slide_id)
    if condition is None:
        raise ValueError(
            f"the model is conditioned on {n_cond} conditions; pass `condition=` (a label or index, or a "
            "dict slide_id → label)."
        )
    labels = getattr(model, "conditions", None) or _model_config(model).get("conditions")
    if isinstance(condition, (int, np.integer)):
        return int(condition)
    if labels is None or str(condition) not in [str(c) for c in labels]:
        raise ValueError(f"unknown condition {condition!r}; the model knows {labels}.")
    return [str(c) for c in labels].index(str(condition))


def _accepts(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _predict_direct(features, coords, models, *, columns, device, condition_idx) -> np.ndarray:
    import torch

    x = torch.from_numpy(features).to(device)
    xy = torch.from_numpy(np.asarray(coords, dtype=np.float32)).to(device)
    total = None
    with _in_eval_mode(models, device), torch.inference_mode():
        for model in models:
            cond = torch.tensor([condition_idx], device=device) if condition_idx is not None else None
            kwargs = {"coords": xy.unsqueeze(0)} if _accepts(model, "coords") else {}
            with bf16_autocast(device):
                pred = model(x.unsqueeze(0), cond, **kwargs)[0]
            pred = pred.float()
            if columns is not None:
                pred = pred[:, torch.as_tensor(columns, device=device)]
            total = pred.double() if total is None else total + pred.double()
    return (total / len(models)).float().cpu().numpy()


@threads_limited(small=True)
def predict_spatial(
    adata_tiles: AnnData,
    model,
    *,
    method: str = "sliding_window",
    use_rep: str | None = None,
    window: int = 10,
    stride: int = 1,
    min_tissue_tiles: int = 50,
    batch_size: int = _DEFAULT_BATCH_SIZE,
    device: Any = None,
    genes: Sequence[str] | None = None,
    condition: Any = None,
    sdata=None,
    table_key: str | None = None,
    region: str | None = None,
    progress: bool | None = None,
) -> AnnData:
    """Predict expression for every tile: a new AnnData tiles × genes.

    ``method="sliding_window"`` runs a bulk model (e.g. :class:`~histoexpr.models.Sequoia`, input
    ``(B, window², D)``) over ``window × window`` windows of the tile grid, SPEC §3.3: windows sit on a
    ``stride`` lattice anchored at grid ``(0, 0)``; a window is used when it holds more than
    ``min_tissue_tiles`` tiles; its tiles fill the first slots in row-major order and the rest are zero
    padding; its prediction is credited to each of its tiles; a tile's value is the mean over its
    windows, then the mean over the fold models. Each tile is featurised once (features come from
    ``obsm``), windows are cut by indexing, and forwards are batched (CUDA with bf16 autocast when
    available). Tiles in no used window get NaN (``obs["n_windows"] == 0``).

    ``method="direct"`` runs a per-tile model such as :class:`~histoexpr.models.HistoPrism` on all
    tiles of each slide at once (``condition`` = the slide's condition label or index).

    Parameters
    ----------
    adata_tiles
        Tiles AnnData (SPEC §1) with features in ``obsm[use_rep]`` and grid ``obs["row"]``/``obs["col"]``.
        Several slides (``obs["slide_id"]``) are processed one by one.
    model
        A model or a list of fold models (their predictions are averaged).
    method
        ``"sliding_window"`` or ``"direct"``.
    use_rep
        Feature key in ``obsm``; default ``X_<uns['histoexpr']['encoder']>`` or the only ``X_*`` key.
    window, stride, min_tissue_tiles
        Sliding-window geometry (SEQUOIA: 10, 1, 50).
    batch_size
        Windows per forward pass.
    device
        Torch device; default CUDA when available, else CPU.
    genes
        Genes to return. When the model knows its gene names this selects a subset (unknown genes are
        skipped with a warning; none known is an error); otherwise it names the model's outputs.
    condition
        Condition of the slide(s) for conditioned direct models (label, index or dict slide → label).
    sdata, table_key, region
        When ``sdata`` is given, the predictions are also written into it as table ``table_key``
        (default ``"predictions"``) annotating the tile shapes ``region``
        (default ``uns['histoexpr']['shapes_key']``, else ``"<slide_id>_tiles"``).
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
    >>> pred = hx.tl.predict_spatial(tiles, sequoia_folds, use_rep="X_uni")  # doctest: +SKIP
    >>> sq.pl.spatial_scatter(pred, color="ERBB2", shape="square")  # doctest: +SKIP
    """
    import anndata as ad

    if method not in ("sliding_window", "direct"):
        raise ValueError(f"method must be 'sliding_window' or 'direct'; got {method!r}.")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("`model` is an empty list.")
    if adata_tiles.n_obs == 0:
        raise ValueError("the tiles AnnData is empty: no tissue tiles to predict.")
    rep = resolve_feature_key(adata_tiles, use_rep)
    features = _features(adata_tiles, rep)
    in_dim = _model_config(models[0]).get("input_dim")
    if in_dim is not None and features.shape[1] != int(in_dim):
        raise ValueError(
            f"obsm[{rep!r}] has {features.shape[1]} features but the model expects input_dim={in_dim}: "
            "extract features with the encoder the model was trained on."
        )
    gene_names, columns = _select_genes(models, genes)
    dev = get_device(device)

    values = np.full((adata_tiles.n_obs, len(gene_names)), np.nan, dtype=np.float32)
    n_windows = np.zeros(adata_tiles.n_obs, dtype=np.int64)
    if method == "sliding_window":
        rows, cols = _grid_coords(adata_tiles)
        slots = _model_config(models[0]).get("num_clusters")
        if slots is not None and int(slots) != window * window:
            raise ValueError(
                f"the model takes {slots} tokens but a {window}×{window} window has {window * window} slots."
            )
        slides = _split_slides(adata_tiles)
        grid_shape = _slide_grid_shape(adata_tiles) if len(slides) == 1 else None
        for slide_id, pos in slides:
            index, _ = window_index(
                rows[pos], cols[pos], window=window, stride=stride, min_tissue_tiles=min_tissue_tiles,
                grid_shape=grid_shape,
            )
            if index.shape[0] == 0:
                raise ValueError(
                    f"slide {slide_id!r}: no {window}×{window} window holds more than {min_tissue_tiles} "
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
            warn(f"{uncovered} tiles lie in no window with > {min_tissue_tiles} tiles; their predictions are NaN.")
    else:
        if SPATIAL_KEY not in adata_tiles.obsm:
            raise ValueError("direct prediction needs tile centres in obsm['spatial'].")
        for slide_id, pos in _split_slides(adata_tiles):
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
            "model": _model_id(models[0]),
            "n_models": len(models),
            "method": method,
            "use_rep": rep,
            "units": _model_units(models[0], method),
            "genes": list(gene_names),
        }
    )
    if method == "sliding_window":
        info.update({"window": window, "stride": stride, "min_tissue_tiles": min_tissue_tiles})
    out.uns[UNS_KEY] = info
    if sdata is not None:
        _write_to_sdata(out, sdata, table_key=table_key or "predictions", region=region)
    return out


def _write_to_sdata(pred: AnnData, sdata, *, table_key: str, region: str | None) -> None:
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
    hxio.add_table(sdata, pred, name=table_key, region=region, instance_key="tile_id")


# --------------------------------------------------------------------------------------------
# measured spots → tile grid (SPEC §4, SEQUOIA's EMD protocol)
# --------------------------------------------------------------------------------------------
def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def map_measured_to_tiles(
    measured: AnnData,
    tiles: AnnData,
    *,
    k: int = 4,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    median_filter: bool = False,
    min_unique: int | None = None,
    max_distance: float | None = None,
) -> AnnData:
    """Put measured spot expression on the tile grid: mean of the ``k`` nearest spots to each tile centre.

    This is SEQUOIA's protocol to compare predicted and measured maps (SPEC §4): 4 nearest spots by
    Euclidean distance between the tile centre and spot centres, an optional 3 × 3 median filter on the
    grid (over the tiles present in each neighbourhood), and a filter keeping genes with at least
    ``min_unique`` distinct values (the paper: 10).

    Parameters
    ----------
    measured
        Spots AnnData with expression in ``X`` (or ``layer``) and centres in ``obsm["spatial"]``, in the
        same pixel coordinates as the tiles (level-0 pixels of the same image).
    tiles
        Tiles AnnData (``obsm["spatial"]`` centres; ``obs["row"]``/``obs["col"]`` for the median filter).
    k
        Number of nearest spots averaged.
    layer
        Layer of ``measured`` to use instead of ``X`` (e.g. log-normalised values).
    genes
        Subset of genes (default all).
    median_filter
        Apply the 3 × 3 median filter on the tile grid.
    min_unique
        Keep only genes with at least this many unique values on the grid.
    max_distance
        Optional: raise if some tile's nearest spot is farther than this (pixels), a sign of mismatched
        coordinate systems.

    Returns
    -------
    AnnData tiles × genes with the tiles' ``obs``/``obsm["spatial"]``/``uns["spatial"]``;
    ``obs["nearest_spot_distance"]`` in pixels.

    Examples
    --------
    >>> truth = hx.tl.map_measured_to_tiles(visium, tiles, median_filter=True, min_unique=10)  # doctest: +SKIP
    """
    import anndata as ad
    from scipy.spatial import cKDTree

    for name, a in (("measured", measured), ("tiles", tiles)):
        if SPATIAL_KEY not in a.obsm:
            raise ValueError(f"`{name}` has no obsm['spatial'] coordinates.")
        if a.n_obs == 0:
            raise ValueError(f"`{name}` is empty.")
    if k < 1 or k > measured.n_obs:
        raise ValueError(f"k must be in [1, {measured.n_obs}] (number of spots); got {k}.")
    if len(_split_slides(tiles)) > 1:  # pixel coordinates and grids of different slides must not mix
        raise ValueError(
            f"`tiles` holds several slides ({list(pd.unique(tiles.obs['slide_id'].astype(str)))[:5]}); map one "
            "slide at a time: tiles[tiles.obs['slide_id'] == sid] with that slide's measured spots."
        )
    spots_xy = np.asarray(measured.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    tiles_xy = np.asarray(tiles.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    lo, hi = spots_xy.min(0), spots_xy.max(0)
    tlo, thi = tiles_xy.min(0), tiles_xy.max(0)
    if np.any(thi < lo) or np.any(tlo > hi):
        raise ValueError(
            f"tiles (x,y in [{tlo.round(1)}, {thi.round(1)}]) and spots ([{lo.round(1)}, {hi.round(1)}]) do "
            "not overlap: are both in level-0 pixels of the same image? Convert the spot coordinates first."
        )
    dist, nn = cKDTree(spots_xy).query(tiles_xy, k=k)
    dist, nn = dist.reshape(len(tiles_xy), k), nn.reshape(len(tiles_xy), k)
    if max_distance is not None and dist[:, 0].max() > max_distance:
        raise ValueError(
            f"{int((dist[:, 0] > max_distance).sum())} tiles have no spot within {max_distance} px "
            f"(farthest: {dist[:, 0].max():.1f} px): check the coordinate systems."
        )
    src = measured if genes is None else measured[:, [str(g) for g in genes]]
    x = _dense(src.layers[layer] if layer is not None else src.X)
    values = x[nn].mean(axis=1)
    if median_filter:
        from ..metrics import median_filter_grid

        rows, cols = _grid_coords(tiles)
        values = median_filter_grid(values, np.column_stack([rows, cols]))
    var = src.var.copy()
    if min_unique is not None:
        n_unique = np.array([np.unique(values[:, j]).size for j in range(values.shape[1])])
        keep = n_unique >= min_unique
        values, var = values[:, keep], var.iloc[keep]
        var["n_unique"] = n_unique[keep]
    obs = tiles.obs.copy()
    obs["nearest_spot_distance"] = dist[:, 0]
    out = ad.AnnData(X=values.astype(np.float32), obs=obs, var=var)
    out.obsm[SPATIAL_KEY] = tiles_xy.copy()
    if "spatial" in tiles.uns:
        out.uns["spatial"] = _copy.deepcopy(tiles.uns["spatial"])
    info = _copy.deepcopy(dict(tiles.uns.get(UNS_KEY, {})))
    info["measured_to_tiles"] = {
        "k": k, "median_filter": median_filter, "min_unique": min_unique, "layer": layer,
    }
    out.uns[UNS_KEY] = info
    return out


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
    epochs: int = 300,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    patience: int = 30,
    max_tiles: int = 4096,
    seed: int = 0,
    device: Any = None,
    checkpoint_dir: str | Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
):
    """Train the HistoPrism-style direct model (SPEC §3.4) on spot-level data.

    Each step sees one training slide (all its spots, or a random subset of ``max_tiles``): features
    ``obsm[use_rep]`` → ``log1p`` counts, masked MSE (genes a slide does not measure are left out of its
    loss), AdamW, gradient clipping. After every epoch the mean MSE on the validation slides decides
    early stopping (``patience`` epochs without improvement); the best weights are restored. Without
    validation slides it trains for ``epochs`` epochs and keeps the last weights.

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
        no validation (then training runs ``epochs`` epochs).
    epochs, lr, weight_decay, grad_clip, patience
        Optimisation (SPEC §3.4 defaults: AdamW lr 5e-5, weight decay 0.01, clip 1.0).
    max_tiles
        Largest number of tiles per training step (random subset of larger slides).
    seed
        Seeds torch and numpy: same data + seed = same model (on CPU).
    device
        Torch device; default CUDA when available.
    checkpoint_dir
        If given, the best model is saved there (``config.json`` + ``model.safetensors``) whenever the
        validation loss improves (without validation: once, at the end); reload with
        :meth:`HistoPrism.from_pretrained`.
    model_kwargs
        Extra :class:`~histoexpr.models.HistoPrism` arguments (``hidden_dim``, ``depth``, ``dropout``...).
    progress
        Show a progress bar over epochs; default ``histoexpr.settings.progress`` (on when interactive).
        Runs with ``histoexpr.settings.n_threads`` CPU threads (default 1: a small model).

    Returns
    -------
    The trained :class:`~histoexpr.models.HistoPrism` (best validation epoch) in eval mode, with
    ``.genes``, ``.conditions``, ``.units`` and ``.history`` (dict with per-epoch ``train_loss`` and
    ``val_loss``, ``best_epoch``, ``test_loss``, the splits).

    Examples
    --------
    >>> model = hx.tl.train_spatial({"C2": c2, "C3": c3, "C4": c4}, use_rep="X_hed_stats",
    ...                             train=["C2", "C3"], val=["C4"], epochs=300)  # doctest: +SKIP
    >>> pred = hx.tl.predict_spatial(tiles_b4, model, method="direct")  # doctest: +SKIP
    """
    import torch

    from ..models.histoprism import HistoPrism

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
    if int(epochs) < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}.")
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

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dev = get_device(device)
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

    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "train": train, "val": val, "test": test}
    best = (math.inf, -1, None)
    stale = 0
    epoch_iter = progress_bar(range(epochs), enabled=progress, desc="train_spatial epochs")
    meta = {"use_rep": use_rep, "train": train, "val": val, "test": test, "seed": seed}
    for epoch in epoch_iter:
        model.train()
        losses = []
        for s in rng.permutation(train):
            n = data[s]["x"].shape[0]
            take = torch.from_numpy(np.sort(rng.choice(n, max_tiles, replace=False))) if n > max_tiles else None
            loss = forward(data[s], take)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        history["train_loss"].append(float(np.mean(losses)))
        val_loss = evaluate(val)
        history["val_loss"].append(val_loss)
        if val_loss is None:  # no validation slides: train for `epochs` epochs, keep the last weights
            best = (history["train_loss"][-1], epoch, None)
            continue
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
            stale = 0
            if checkpoint_dir is not None:
                model.save_pretrained(checkpoint_dir, metadata={**meta, "epoch": epoch, "val_loss": val_loss})
        else:
            stale += 1
            if stale >= patience:
                break
    epoch_iter.close()
    if best[2] is not None:
        model.load_state_dict(best[2])
    elif checkpoint_dir is not None:
        model.save_pretrained(checkpoint_dir, metadata={**meta, "epoch": best[1], "train_loss": best[0]})
    model.eval()
    history["best_epoch"] = best[1]
    history["epochs_run"] = len(history["train_loss"])
    history["test_loss"] = evaluate(test)
    model.history = history
    return model
