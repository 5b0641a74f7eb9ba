"""Interactive explorer of predicted (and measured) maps: one self-contained HTML file (bokeh)."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._maps import geometry

_MAX_IMAGE_SIDE = 700


def _thumbnail_rgba(image: np.ndarray, x0: float, x1: float, y0: float, y1: float):
    """Crop the thumbnail to the drawn extent, shrink it, and pack it as bokeh's uint32 RGBA image."""
    from PIL import Image

    h, w = image.shape[:2]
    cx0, cy0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    cx1, cy1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    crop = np.asarray(image[cy0:cy1, cx0:cx1])
    if crop.dtype != np.uint8:
        crop = np.clip(crop * (255.0 if crop.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    pil = Image.fromarray(crop[..., :3] if crop.ndim == 3 else crop).convert("RGBA")
    factor = max(pil.size) / _MAX_IMAGE_SIDE
    if factor > 1:
        pil = pil.resize((max(1, round(pil.width / factor)), max(1, round(pil.height / factor))), Image.LANCZOS)
    rgba = np.ascontiguousarray(np.asarray(pil, dtype=np.uint8))
    return rgba.view(np.uint32)[..., 0], (cx0, cy0, cx1 - cx0, cy1 - cy0)


def explore(
    pred,
    measured=None,
    *,
    image: np.ndarray | None | str = "auto",
    path: str | os.PathLike = "explorer.html",
    metrics: pd.DataFrame | None = None,
    genes: Sequence[str] | None = None,
    gene_symbols: str | None = None,
    slide: str | None = None,
    slide_key: str = "slide_id",
    library_id: str | None = None,
    img_key: str = "hires",
    max_genes: int = 500,
    title: str = "histoexpr explorer",
) -> Path:
    """Write an interactive explorer of predicted (and measured) maps as ONE self-contained HTML file.

    The page holds a gene search box and a gene menu, the predicted map next to the measured map
    over the H&E thumbnail (hover shows each tile's value and percentile; pan and zoom are linked),
    and a sortable per-gene metrics table: clicking a row shows that gene. Tiles are coloured by
    their percentile within the slide (0–100). Built with bokeh, its JavaScript inlined into the
    file: it opens offline, with no server, and fetches nothing.

    Parameters
    ----------
    pred
        Predicted AnnData (tiles × genes) with ``obsm["spatial"]`` (level-0 px) or ``obs["row"/"col"]``.
    measured
        Measured AnnData on the same tiles (matched as in :func:`histoexpr.metrics.emd`); without
        it only the predicted map is shown.
    image
        Background image in the coordinates of the thumbnail: ``"auto"`` takes
        ``pred.uns["spatial"][library_id]["images"][img_key]``; an array (then ``obsm["spatial"]``
        must be in its pixels); ``None``: no image.
    path
        Output HTML file.
    metrics
        Per-gene table indexed by gene (e.g. ``r``, ``emd``, and a GPC set membership column); every
        column is shown. Default: Pearson r against ``measured`` (nothing else is computed).
    genes
        Genes to include (default: all genes of ``pred`` shared with ``measured``, at most
        ``max_genes``: the first ones of ``metrics`` when given, else in var order).
    gene_symbols
        Column of ``pred.var`` with the symbols to show and search.
    slide, slide_key
        Slide to show when the AnnData hold several.
    library_id, img_key
        Which thumbnail of ``pred.uns["spatial"]`` to use.
    max_genes
        Cap on the number of genes (the file holds every map; ~8 bytes per tile and gene).
    title
        Page title.

    Returns
    -------
    :class:`pathlib.Path`
        The path of the written HTML file.

    Example
    -------
    >>> hx.pl.explore(pred, measured, metrics=per_gene, path="explorer.html")  # doctest: +SKIP
    PosixPath('explorer.html')
    """
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import (
        AutocompleteInput,
        ColumnDataSource,
        CustomJS,
        DataTable,
        Div,
        HoverTool,
        NumberFormatter,
        Range1d,
        ScientificFormatter,
        Select,
        TableColumn,
    )
    from bokeh.plotting import figure
    from bokeh.resources import INLINE
    from bokeh.transform import linear_cmap

    from ..metrics._emd import pair_maps, percentile_scores
    from ..metrics._gpc import pearson_columns

    # ---- genes and values
    if genes is None:
        pool = list(pred.var_names)
        if measured is not None:
            shared = set(measured.var_names)
            pool = [g for g in pool if g in shared]
        if metrics is not None:
            first = [g for g in metrics.index if g in set(pool)]
            pool = first + [g for g in pool if g not in set(first)]
        if not pool:
            raise ValueError("No gene to show: pred and measured share no var_names.")
        genes = pool[:max_genes]
    else:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in pred.var_names]
        if missing:
            raise KeyError(f"Genes not in pred.var_names: {missing[:5]}.")
    if measured is not None:
        maps = pair_maps(pred, measured, genes=genes, slide_key=slide_key)
        if maps.missing:
            raise KeyError(f"Genes not in both maps: {maps.missing}")
        P, T, slides, rows_pred = maps.pred, maps.truth, maps.slides, maps.rows_pred
    else:
        from ..metrics._emd import _dense_columns

        P, T = _dense_columns(pred, genes, None), None
        slides = pred.obs[slide_key].astype(str).to_numpy() if slide_key in pred.obs else np.full(pred.n_obs, "")
        rows_pred = np.arange(pred.n_obs)
    present = list(dict.fromkeys(slides))
    if slide is None:
        if len(present) > 1:
            raise ValueError(f"The maps hold several slides {present}; pass slide=.")
        slide = present[0]
    keep = slides == str(slide)
    if not keep.any():
        raise ValueError(f"Slide {slide!r} not found; slides: {present}.")
    P = P[keep]
    T = T[keep] if T is not None else None
    tiles = pred[rows_pred[keep]]
    labels = list(genes)
    if gene_symbols is not None:
        if gene_symbols not in pred.var.columns:
            raise KeyError(f"gene_symbols={gene_symbols!r} is not a column of pred.var.")
        sym = pred.var.loc[genes, gene_symbols].astype(str)
        labels = [s if s and s != "nan" else g for g, s in zip(genes, sym)]

    # ---- geometry and background
    geo = geometry(tiles, library_id=library_id, slide=str(slide), img_key=img_key)
    background = geo.image
    if isinstance(image, str):
        if image != "auto":
            raise ValueError(f"image must be 'auto', an array or None, got {image!r}.")
    elif image is None:
        background = None
    else:
        background = np.asarray(image)
    x, y, side = geo.centres[:, 0], geo.centres[:, 1], geo.side
    x0, x1 = x.min() - side, x.max() + side
    y0, y1 = y.min() - side, y.max() + side

    # ---- per-gene metrics
    if metrics is None:
        table = pd.DataFrame(index=pd.Index(genes, name="gene"))
        if T is not None:
            table["r"] = pearson_columns(P, T)
    else:
        table = metrics.reindex(genes)
    table = table.copy()
    table.insert(0, "gene", labels)

    # ---- data sources
    store = {}
    pct_p = percentile_scores(P)
    pct_t = percentile_scores(T) if T is not None else None
    for i, g in enumerate(genes):
        store[f"p:{g}"] = P[:, i].astype(np.float32)
        store[f"pq:{g}"] = pct_p[:, i].astype(np.float32)
        if T is not None:
            store[f"m:{g}"] = T[:, i].astype(np.float32)
            store[f"mq:{g}"] = pct_t[:, i].astype(np.float32)
    store_src = ColumnDataSource(store, name="store")
    g0 = genes[0]
    maps_data = {"x": x, "y": y, "tile": [str(t) for t in tiles.obs_names],
                 "pred": store[f"p:{g0}"], "pred_pct": store[f"pq:{g0}"]}
    if T is not None:
        maps_data.update(meas=store[f"m:{g0}"], meas_pct=store[f"mq:{g0}"])
    src = ColumnDataSource(maps_data, name="maps")

    x_range, y_range = Range1d(x0, x1), Range1d(y1, y0)  # y down, as in the image
    width = 420
    height = int(np.clip(width * (y1 - y0) / max(x1 - x0, 1e-9), 200, 700))
    thumb = _thumbnail_rgba(background, x0, x1, y0, y1) if background is not None else None
    panels, titles = [], {}
    for key, kind in (("pred", "predicted"), ("meas", "measured")):
        if key == "meas" and T is None:
            continue
        fig = figure(width=width, height=height, x_range=x_range, y_range=y_range, match_aspect=True,
                     tools="pan,wheel_zoom,box_zoom,reset,save", title=f"{labels[0]}: {kind}", name=f"map_{key}")
        if thumb is not None:
            img, (ix, iy, iw, ih) = thumb
            fig.image_rgba(image=[img], x=ix, y=iy, dw=iw, dh=ih)
        mapper = linear_cmap(f"{key}_pct", "Viridis256", 0, 100)
        rend = fig.rect(x="x", y="y", width=side, height=side, source=src, fill_color=mapper, fill_alpha=0.7,
                        line_color=None)
        fig.add_tools(HoverTool(renderers=[rend], tooltips=[("tile", "@tile"), (kind, f"@{key}{{0.000}}"),
                                                              ("percentile", f"@{key}_pct{{0}}")]))
        fig.axis.visible = False
        fig.grid.visible = False
        panels.append(fig)
        titles[key] = fig.title

    select = Select(title="gene", value=g0, options=[(g, lab) for g, lab in zip(genes, labels)], name="gene_select",
                    width=260)
    search = AutocompleteInput(title="search", completions=labels, placeholder="type a gene name",
                               case_sensitive=False, search_strategy="includes", name="gene_search", width=260)
    columns = []
    gene_width = int(np.clip(7.5 * max(len(lab) for lab in labels) + 16, 80, 260))
    for c in table.columns:
        name = str(c)
        if pd.api.types.is_numeric_dtype(table[c]):
            is_p = name == "p" or name.startswith(("p_", "pval")) or name.endswith(("_p", "_pval"))
            fmt = ScientificFormatter(precision=2) if is_p else NumberFormatter(format="0.000")
            columns.append(TableColumn(field=name, title=name, formatter=fmt, width=90))
        else:
            columns.append(TableColumn(field=name, title=name, width=gene_width if name == "gene" else 160))
    table_data = {str(c): (table[c].astype(float).to_numpy() if pd.api.types.is_numeric_dtype(table[c])
                           else table[c].fillna("").astype(str).tolist()) for c in table.columns}
    table_data["_gene_id"] = list(genes)
    table_src = ColumnDataSource(table_data, name="metrics")
    data_table = DataTable(source=table_src, columns=columns, sortable=True, selectable=True,
                           width=max(width * len(panels), sum(c.width for c in columns) + 20),
                           height=min(600, 28 + 25 * len(genes)), name="metrics_table", index_position=None)

    label_of = dict(zip(genes, labels))
    gene_of = {lab.lower(): g for g, lab in zip(genes, labels)} | {g.lower(): g for g in genes}
    select.js_on_change("value", CustomJS(args={"src": src, "store": store_src, "titles": titles,
                                                 "labels": label_of, "measured": T is not None}, code="""
const g = cb_obj.value;
const d = Object.assign({}, src.data);
d.pred = store.data['p:' + g]; d.pred_pct = store.data['pq:' + g];
if (measured) { d.meas = store.data['m:' + g]; d.meas_pct = store.data['mq:' + g]; }
src.data = d;
titles.pred.text = labels[g] + ': predicted';
if (measured) { titles.meas.text = labels[g] + ': measured'; }
"""))
    search.js_on_change("value", CustomJS(args={"select": select, "genes": gene_of}, code="""
const g = genes[String(cb_obj.value).trim().toLowerCase()];
if (g !== undefined) { select.value = g; }
"""))
    table_src.selected.js_on_change("indices", CustomJS(args={"select": select, "table": table_src}, code="""
const i = cb_obj.indices[0];
if (i !== undefined) { select.value = table.data['_gene_id'][i]; }
"""))
    note = Div(text=(f"<b>{html.escape(title)}</b> &middot; slide {html.escape(str(slide))} &middot; "
                     f"{len(genes)} genes, {len(x)} tiles &middot; colour: percentile within the slide (0&ndash;100)"
                     "; hover a tile for its value; click a table row to show that gene."))
    layout = column(note, row(select, search), row(*panels), data_table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(file_html(layout, INLINE, title), encoding="utf-8")
    return path
