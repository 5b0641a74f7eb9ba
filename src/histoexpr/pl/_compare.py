"""Side-by-side maps of predicted and measured expression on the tissue thumbnail."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def _image_and_scale(adata, library_id: str | None, img_key: str):
    """(image or None, scale from level-0 px to image px, tile side in level-0 px or None)."""
    spatial = adata.uns.get("spatial", {})
    side = None
    hx_uns = adata.uns.get("histoexpr", {})
    if "tile_size_level0" in hx_uns:
        side = float(hx_uns["tile_size_level0"])
    if not spatial:
        return None, 1.0, side
    if library_id is None:
        if len(spatial) > 1:
            raise ValueError(f"adata.uns['spatial'] has several libraries {list(spatial)}; pass library_id=.")
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise KeyError(f"library_id {library_id!r} not in adata.uns['spatial'] ({list(spatial)}).")
    lib = spatial[library_id]
    scalefactors = lib.get("scalefactors", {})
    side = float(scalefactors.get("spot_diameter_fullres", side or 0)) or side
    image = lib.get("images", {}).get(img_key)
    if image is None:
        return None, 1.0, side
    scale = float(scalefactors.get(f"tissue_{img_key}_scalef", 1.0))
    return np.asarray(image), scale, side


def _tile_polygons(centres: np.ndarray, side: float) -> np.ndarray:
    half = side / 2.0
    offsets = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    return centres[:, None, :] + offsets[None, :, :]


def spatial_compare(
    pred,
    truth,
    genes: Sequence[str] | str,
    *,
    slide: str | None = None,
    slide_key: str = "slide_id",
    library_id: str | None = None,
    img_key: str = "hires",
    show_emd: bool = True,
    median_filter: bool = False,
    cmap: str = "coolwarm",
    alpha: float = 0.9,
    panel_size: float = 3.5,
    layer_pred: str | None = None,
    layer_truth: str | None = None,
):
    """Predicted next to measured percentile maps on the tissue thumbnail, PCC and EMD in the titles.

    Each tile is drawn as a square at its centre (``obsm["spatial"]``, level-0 px) over the
    thumbnail in ``uns["spatial"][library_id]["images"][img_key]``; values are percentiles within the
    slide (0–100, as in SEQUOIA Fig. 5). Without a thumbnail the squares are drawn on a blank canvas.

    Parameters
    ----------
    pred, truth
        Predicted and measured AnnData on the same tiles (see :func:`histoexpr.metrics.emd`).
    genes
        One gene or a list; one row of panels per gene.
    slide
        Slide to draw when the AnnData hold several (``obs[slide_key]``).
    library_id, img_key
        Which thumbnail of ``pred.uns["spatial"]`` to draw on.
    show_emd
        Compute the EMD (exact; :func:`histoexpr.metrics.emd`) for the titles.
    median_filter
        Median-filter the measured map before the EMD (as :func:`histoexpr.metrics.emd`).
    cmap, alpha
        Colour map and opacity of the squares.
    panel_size
        Inches per panel.
    layer_pred, layer_truth
        Layers to read instead of ``X``.

    Returns
    -------
    :class:`matplotlib.figure.Figure` with 2 axes per gene (predicted, measured) and a colour bar.

    Example
    -------
    >>> fig = hx.pl.spatial_compare(pred_tiles, measured_tiles, ["ERBB2", "IGKC"])  # doctest: +SKIP
    >>> fig.savefig("maps.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from ..metrics._emd import emd as emd_fn
    from ..metrics._emd import pair_maps, percentile_scores
    from ..metrics._gpc import pearson_columns

    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("Pass at least one gene.")
    maps = pair_maps(pred, truth, genes=genes, slide_key=slide_key, layer_pred=layer_pred, layer_truth=layer_truth)
    if maps.missing:
        raise KeyError(f"Genes not in both maps: {maps.missing}")
    slides = list(dict.fromkeys(maps.slides))
    if slide is None:
        if len(slides) > 1:
            raise ValueError(f"The maps hold several slides {slides}; pass slide=.")
        slide = slides[0]
    rows = maps.slides == str(slide)
    if not rows.any():
        raise ValueError(f"Slide {slide!r} not found; slides: {slides}.")
    P, T = maps.pred[rows], maps.truth[rows]
    tiles = pred[maps.rows_pred[rows]]
    if "spatial" in tiles.obsm:
        centres = np.asarray(tiles.obsm["spatial"], dtype=np.float64)[:, :2]
        if library_id is None and str(slide) in tiles.uns.get("spatial", {}):
            library_id = str(slide)
        image, scale, side = _image_and_scale(tiles, library_id, img_key)
        if side is None:
            side = _grid_pitch(centres)
    elif {"row", "col"} <= set(tiles.obs.columns):
        centres = tiles.obs[["col", "row"]].to_numpy(dtype=np.float64)
        image, scale, side = None, 1.0, 1.0
    else:
        raise ValueError("The predicted AnnData needs obsm['spatial'] (tile centres) or obs['row'/'col'] to draw maps.")

    r = pearson_columns(P, T)
    emd_values = np.full(len(genes), np.nan)
    if show_emd:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = emd_fn(
                P,
                T,
                genes=genes,
                coords=maps.coords[rows] if maps.coords is not None else centres / side,
                median_filter=median_filter,
                n_jobs=1,
            )
        emd_values = res["emd"].reindex(genes).to_numpy()

    fig, axes = plt.subplots(len(genes), 2, figsize=(2 * panel_size + 0.8, panel_size * len(genes)), squeeze=False)
    polys = _tile_polygons(centres * scale, side * scale)
    mappable = None
    for i, gene in enumerate(genes):
        for j, (values, label) in enumerate(((P[:, i], "predicted"), (T[:, i], "measured"))):
            ax = axes[i, j]
            if image is not None:
                ax.imshow(image)
            pct = percentile_scores(values[:, None])[:, 0]
            ok = ~np.isnan(pct)
            coll = PolyCollection(polys[ok], array=pct[ok], cmap=cmap, alpha=alpha, linewidths=0)
            coll.set_clim(0, 100)
            ax.add_collection(coll)
            mappable = coll
            lo, hi = polys.reshape(-1, 2).min(0), polys.reshape(-1, 2).max(0)
            pad = side * scale
            ax.set_xlim(lo[0] - pad, hi[0] + pad)
            ax.set_ylim(hi[1] + pad, lo[1] - pad)  # image orientation: y down
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                title = f"{gene} {label}\nPCC={r[i]:.2f}"
                if show_emd:
                    title += f", EMD={emd_values[i]:.3f}"
            else:
                title = f"{gene} {label}"
            ax.set_title(title, fontsize=10)
    fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.6, label="percentile within slide")
    return fig


def _grid_pitch(centres: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(centres) < 2:
        return 1.0
    dist = cKDTree(centres).query(centres, k=2)[0][:, 1]
    return float(np.median(dist)) or 1.0
