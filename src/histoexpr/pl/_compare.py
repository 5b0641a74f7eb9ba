"""Side-by-side maps of predicted and measured expression on the tissue thumbnail."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from ._maps import geometry, metric_values, resolve_genes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _tile_polygons(centres: np.ndarray, side: float) -> np.ndarray:
    half = side / 2.0
    offsets = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    return centres[:, None, :] + offsets[None, :, :]


def _nice_length(um: float) -> float:
    """A round length (1, 2 or 5 × 10^k µm) close to ``um``."""
    exp = np.floor(np.log10(um))
    for m in (5, 2, 1):
        if m * 10**exp <= um:
            return float(m * 10**exp)
    return float(10**exp)


def spatial_compare(
    pred,
    truth,
    genes: Sequence[str] | str,
    *,
    slide: str | None = None,
    slide_key: str = "slide_id",
    library_id: str | None = None,
    img_key: str = "hires",
    values: Literal["percentile", "raw"] = "percentile",
    vmin: float | None = None,
    vmax: float | None = None,
    emd=None,
    r=None,
    show_emd: bool = True,
    median_filter: bool = False,
    gene_symbols: str | None = None,
    cmap: str = "viridis",
    alpha: float = 0.65,
    outline: bool = False,
    scalebar: bool = True,
    mpp: float | None = None,
    colorbar: Literal["auto", "row", "figure"] = "auto",
    panel_size: float = 3.0,
    layer_pred: str | None = None,
    layer_truth: str | None = None,
) -> Figure:
    """Predicted next to measured maps on the H&E thumbnail, one row per gene, r and EMD in the titles.

    Each tile is drawn as a square at its centre (``obsm["spatial"]``, level-0 px) over the thumbnail
    ``uns["spatial"][library_id]["images"][img_key]``; the H&E shows through (``alpha``) or only the
    tile outlines are coloured (``outline=True``). The figure uses matplotlib's constrained layout,
    so titles, panels and colour bars never overlap, and draws a scale bar in µm when the slide's
    µm/px is known (``uns["histoexpr"]["slide_mpp"]`` or ``mpp=``).

    Parameters
    ----------
    pred, truth
        Predicted and measured AnnData on the same tiles (matched as in :func:`histoexpr.metrics.emd`).
    genes
        One gene or a list (var_names, or symbols when ``gene_symbols`` is given); one row per gene.
    slide, slide_key
        Slide to draw when the AnnData hold several (``obs[slide_key]``).
    library_id, img_key
        Which thumbnail of ``pred.uns["spatial"]`` to draw on.
    values
        ``"percentile"``: percentile within the slide (0–100, as in SEQUOIA Fig. 5; one colour bar for
        the figure). ``"raw"``: the values themselves (one colour bar per row, shared by the predicted
        and measured map of a gene, range ``vmin``–``vmax`` or the 1st–99th percentile of both maps).
    vmin, vmax
        Colour range (default 0–100 for percentiles; see ``values`` for raw).
    emd
        Precomputed EMD values (the output of :func:`histoexpr.metrics.emd`, a Series / dict gene →
        value, or an array in the order of ``genes``). When None and ``show_emd``, the EMD of the drawn
        genes is computed with :func:`histoexpr.metrics.emd`.
    r
        Precomputed Pearson r (a DataFrame with an ``r`` column, Series, dict or array); computed
        when None.
    show_emd
        Put the EMD in the titles. Its unit is the tile pitch: the ground distance is the distance
        between tile centres in grid units.
    median_filter
        Median-filter the measured map when the EMD is computed here.
    gene_symbols
        Column of ``pred.var`` with gene symbols to show (and accept in ``genes``), as in scanpy.
    cmap, alpha
        Colour map, and opacity of the squares over the H&E.
    outline
        Colour only the outline of each tile so the tissue under it stays visible.
    scalebar, mpp
        Draw a scale bar in µm on each predicted panel; ``mpp`` overrides the slide's level-0 µm/px.
    colorbar
        ``"figure"``: one colour bar; ``"row"``: one per gene; ``"auto"``: figure for percentiles, row
        for raw values.
    panel_size
        Inches per panel.
    layer_pred, layer_truth
        Layers to read instead of ``X``.

    Returns
    -------
    :class:`matplotlib.figure.Figure`
        Multi-panel figure: 2 map axes per gene (predicted, measured) and the colour bar axes.

    Example
    -------
    >>> fig = hx.pl.spatial_compare(pred_tiles, measured_tiles, ["ERBB2", "IGKC"], emd=emd_table)  # doctest: +SKIP
    >>> fig.savefig("maps.png", dpi=150)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from ..metrics._emd import pair_maps, percentile_scores
    from ..metrics._gpc import pearson_columns

    if values not in ("percentile", "raw"):
        raise ValueError(f"values must be 'percentile' or 'raw', got {values!r}.")
    if colorbar not in ("auto", "row", "figure"):
        raise ValueError(f"colorbar must be 'auto', 'row' or 'figure', got {colorbar!r}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be within 0–1, got {alpha}.")
    names, labels = resolve_genes(pred, genes, gene_symbols)
    maps = pair_maps(pred, truth, genes=names, slide_key=slide_key, layer_pred=layer_pred, layer_truth=layer_truth)
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
    geo = geometry(tiles, library_id=library_id, slide=str(slide), img_key=img_key, mpp=mpp)

    r_values = metric_values(r, names, "r", slide=str(slide))
    if r_values is None:
        r_values = pearson_columns(P, T)
    emd_values = metric_values(emd, names, "emd", slide=str(slide)) if show_emd else None
    if show_emd and emd_values is None:
        from ..metrics._emd import emd as emd_fn

        coords = maps.coords[rows] if maps.coords is not None else geo.centres / geo.side
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = emd_fn(P, T, genes=names, coords=coords, median_filter=median_filter, n_jobs=1)
        emd_values = res["emd"].reindex(names).to_numpy()

    per_row = colorbar == "row" or (colorbar == "auto" and values == "raw")
    n = len(names)
    polys = _tile_polygons(geo.centres, geo.side)
    lo, hi = polys.reshape(-1, 2).min(0), polys.reshape(-1, 2).max(0)
    pad = geo.side
    aspect = (hi[0] - lo[0] + 2 * pad) / (hi[1] - lo[1] + 2 * pad)  # width / height of a map
    # panel_size is a map's longer side; maps narrower than 2 in are scaled up to leave room for titles
    w, h = (panel_size * aspect, panel_size) if aspect < 1 else (panel_size, panel_size / aspect)
    if w < 2.0:
        w, h = 2.0, 2.0 / aspect
    cbar_w = 1.0
    fig = plt.figure(figsize=(2 * w + cbar_w + 0.2, n * (h + 0.55) + 0.15), layout="constrained")
    axes = fig.subplots(n, 2, squeeze=False)
    mappable = None
    for i, label in enumerate(labels):
        p, t = P[:, i], T[:, i]
        if values == "percentile":
            p, t = percentile_scores(p[:, None])[:, 0], percentile_scores(t[:, None])[:, 0]
            lo_c = 0.0 if vmin is None else vmin
            hi_c = 100.0 if vmax is None else vmax
            unit = "percentile within slide"
        else:
            both = np.concatenate([p, t])
            both = both[np.isfinite(both)]
            lo_c = vmin if vmin is not None else (float(np.percentile(both, 1)) if both.size else 0.0)
            hi_c = vmax if vmax is not None else (float(np.percentile(both, 99)) if both.size else 1.0)
            units = pred.uns.get("histoexpr", {}).get("units")
            unit = f"expression ({units})" if units else "expression"
        for j, vals in enumerate((p, t)):
            ax = axes[i, j]
            if geo.image is not None:
                ax.imshow(geo.image)
            ok = np.isfinite(vals)
            if outline:  # facecolor "none": matplotlib maps the values to the edges instead
                coll = PolyCollection(polys[ok], array=vals[ok], cmap=cmap, facecolors="none", linewidths=1.2)
            else:
                coll = PolyCollection(polys[ok], array=vals[ok], cmap=cmap, alpha=alpha, linewidths=0)
            coll.set_clim(lo_c, hi_c)
            ax.add_collection(coll)
            mappable = coll
            ax.set_xlim(lo[0] - pad, hi[0] + pad)
            ax.set_ylim(hi[1] + pad, lo[1] - pad)  # image orientation: y down
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                stats = f"r = {r_values[i]:.2f}"
                if show_emd and emd_values is not None:
                    stats += f", EMD = {emd_values[i]:.2f} tiles"
                ax.set_title(f"{label}\npredicted\n{stats}", fontsize=8)
                if scalebar and geo.um_per_px:
                    _add_scalebar(ax, geo.um_per_px, (hi[0] - lo[0] + 2 * pad))
            else:
                ax.set_title(f"{label}\nmeasured\n", fontsize=8)
        if per_row:
            fig.colorbar(mappable, ax=axes[i, :].tolist(), shrink=0.8, label=unit, aspect=15)
    if not per_row:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=min(0.8, 0.4 + 0.1 * n), label=unit,
                     aspect=12 + 8 * n)
    return fig


def _add_scalebar(ax, um_per_px: float, width_px: float) -> None:
    """Scale bar in µm (matplotlib-scalebar), about a fifth of the panel wide."""
    from matplotlib_scalebar.scalebar import ScaleBar

    length = _nice_length(um_per_px * width_px / 5)
    bar = ScaleBar(um_per_px, units="um", location="lower right", fixed_value=length, fixed_units="um",
                   box_alpha=0.6, font_properties={"size": 7}, border_pad=0.3, sep=2,
                   scale_formatter=lambda value, unit: f"{value:g} {unit}")
    bar.set_gid("scalebar")
    ax.add_artist(bar)
