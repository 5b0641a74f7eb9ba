"""What map plots share: the tile geometry, the H&E thumbnail, physical scale, gene labels, metrics input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class MapGeometry:
    """Tile centres and side in display pixels (the thumbnail's pixels when there is one)."""

    centres: np.ndarray  #: (n, 2) x, y in display px
    side: float  #: tile side in display px
    image: np.ndarray | None  #: thumbnail (h, w, 3|4) or None
    um_per_px: float | None  #: µm per display px, None when the slide has no physical scale


def _grid_pitch(centres: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(centres) < 2:
        return 1.0
    dist = cKDTree(centres).query(centres, k=2)[0][:, 1]
    return float(np.median(dist)) or 1.0


def _library(adata, library_id: str | None, slide: str | None) -> str | None:
    spatial = adata.uns.get("spatial", {})
    if not spatial:
        return None
    if library_id is None and slide is not None and str(slide) in spatial:
        library_id = str(slide)
    if library_id is None:
        if len(spatial) > 1:
            raise ValueError(f"adata.uns['spatial'] has several libraries {list(spatial)}; pass library_id=.")
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise KeyError(f"library_id {library_id!r} not in adata.uns['spatial'] ({list(spatial)}).")
    return library_id


def geometry(tiles, *, library_id: str | None = None, slide: str | None = None, img_key: str = "hires",
             mpp: float | None = None) -> MapGeometry:
    """Geometry of the tiles of ``tiles`` (AnnData) for drawing, in the thumbnail's pixels.

    ``obsm["spatial"]`` holds tile centres in level-0 px; ``uns["spatial"][library]`` the thumbnail
    and its scale factor; ``uns["histoexpr"]`` the tile side (``tile_size_level0``) and the slide's
    µm/px (``slide_mpp``). Without ``obsm["spatial"]`` the grid indices ``obs["col"/"row"]`` are used.
    """
    hx_uns = tiles.uns.get("histoexpr", {})
    level0_mpp = mpp if mpp is not None else hx_uns.get("slide_mpp")
    if "spatial" not in tiles.obsm:
        if {"row", "col"} <= set(tiles.obs.columns):
            centres = tiles.obs[["col", "row"]].to_numpy(dtype=np.float64)
            return MapGeometry(centres, 1.0, None, None)
        raise ValueError("The AnnData needs obsm['spatial'] (tile centres) or obs['row'/'col'] to draw maps.")
    centres = np.asarray(tiles.obsm["spatial"], dtype=np.float64)[:, :2]
    side = float(hx_uns["tile_size_level0"]) if "tile_size_level0" in hx_uns else None
    image, scale = None, 1.0
    lib = _library(tiles, library_id, slide)
    if lib is not None:
        entry = tiles.uns["spatial"][lib]
        scalefactors = entry.get("scalefactors", {})
        if side is None and scalefactors.get("spot_diameter_fullres"):
            side = float(scalefactors["spot_diameter_fullres"])
        img = entry.get("images", {}).get(img_key)
        if img is not None:
            image = np.asarray(img)
            scale = float(scalefactors.get(f"tissue_{img_key}_scalef", 1.0))
        if level0_mpp is None:
            level0_mpp = entry.get("metadata", {}).get("mpp") if isinstance(entry.get("metadata"), Mapping) else None
    pitch = _grid_pitch(centres)
    # overlapping tiles (stride < tile size) are drawn at the grid pitch so they do not cover each other
    side = pitch if side is None else min(side, pitch)
    um_per_px = float(level0_mpp) / scale if level0_mpp else None
    return MapGeometry(centres * scale, side * scale, image, um_per_px)


def resolve_genes(adata, genes: Sequence[str] | str, gene_symbols: str | None) -> tuple[list[str], list[str]]:
    """(var_names, display labels) of ``genes``; with ``gene_symbols`` genes may be given as symbols."""
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("Pass at least one gene.")
    if gene_symbols is None:
        return [str(g) for g in genes], [str(g) for g in genes]
    if gene_symbols not in adata.var.columns:
        raise KeyError(f"gene_symbols={gene_symbols!r} is not a column of var; columns: {list(adata.var.columns)}.")
    symbols = adata.var[gene_symbols].astype(str)
    by_symbol = {s: n for n, s in zip(adata.var_names, symbols) if s and s != "nan"}
    names, labels = [], []
    for g in genes:
        if g in adata.var_names:
            names.append(str(g))
            sym = symbols.loc[g]
            labels.append(sym if sym and sym != "nan" else str(g))
        elif g in by_symbol:
            names.append(by_symbol[g])
            labels.append(str(g))
        else:
            raise KeyError(f"Gene {g!r} is neither a var_name nor a value of var[{gene_symbols!r}].")
    return names, labels


def metric_values(given, genes: Sequence[str], name: str, slide: str | None = None) -> np.ndarray | None:
    """Values of a precomputed per-gene metric for ``genes`` (NaN where absent); None when not given.

    ``given``: a DataFrame with a ``name`` column (indexed by gene, or by (slide, gene)), a Series or
    mapping gene → value, or an array in the order of ``genes``.
    """
    if given is None:
        return None
    if isinstance(given, pd.DataFrame):
        if name not in given.columns:
            raise KeyError(f"The {name} table has no {name!r} column; columns: {list(given.columns)}.")
        given = given[name]
    if isinstance(given, pd.Series):
        if isinstance(given.index, pd.MultiIndex):
            if slide is None or slide not in given.index.get_level_values(0):
                slides = list(dict.fromkeys(given.index.get_level_values(0)))
                raise ValueError(f"The {name} values are per slide ({slides}); pass slide= or one slide's values.")
            given = given.xs(slide, level=0)
        return given.reindex(list(genes)).to_numpy(dtype=float)
    if isinstance(given, Mapping):
        return np.array([float(given.get(g, np.nan)) for g in genes])
    arr = np.asarray(given, dtype=float).ravel()
    if arr.size != len(genes):
        raise ValueError(f"{name} has {arr.size} values for {len(genes)} genes.")
    return arr
