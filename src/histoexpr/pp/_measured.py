"""Measured expression on the tile grid: map measured spots / cells onto histology tiles."""

from __future__ import annotations

import copy as _copy
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._constants import SPATIAL_KEY, UNS_KEY
from .._utils import dense as _dense
from .._utils import grid_coords, iter_slides

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["map_measured_to_tiles"]

#: A tile whose nearest spot is farther than this many pitches (the larger of the tile side and the
#: spot spacing) is far from the measurements: map_measured_to_tiles warns.
FAR_SPOT_PITCHES = 1.5


def _check_spot_distance(nearest: np.ndarray, tiles: AnnData, spots_xy: np.ndarray, spot_tree,
                         max_distance: float | None) -> None:
    """Warn (or raise, with ``max_distance``) when tiles take values from spots far away."""
    from scipy.spatial import cKDTree

    info = tiles.uns.get(UNS_KEY, {}) if isinstance(tiles.uns.get(UNS_KEY), Mapping) else {}
    tiles_xy = np.asarray(tiles.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    tile_px = float(info.get("tile_size_level0") or 0.0)
    if not tile_px > 0 and len(tiles_xy) > 1:
        tile_px = float(np.median(cKDTree(tiles_xy).query(tiles_xy, k=2)[0][:, 1]))
    spot_px = float(np.median(spot_tree.query(spots_xy, k=2)[0][:, 1])) if len(spots_xy) > 1 else 0.0
    mpp = info.get("slide_mpp")

    def fmt(px: float) -> str:
        parts = [f"{px:.0f} px"]
        if tile_px > 0:
            parts.append(f"{px / tile_px:.1f} tiles")
        if mpp:
            parts.append(f"{px * float(mpp):.0f} µm")
        return " = ".join(parts)

    if max_distance is not None:
        limit, rule = float(max_distance), "max_distance"
    else:
        limit = FAR_SPOT_PITCHES * max(tile_px, spot_px)
        rule = f"{FAR_SPOT_PITCHES} × the larger of the tile side and the spot spacing"
    far = nearest > limit
    if not limit > 0 or not far.any():
        return
    msg = (
        f"{int(far.sum())} of {len(nearest)} tiles ({far.mean():.0%}) have no measured spot within {fmt(limit)} "
        f"({rule}): their values come from spots {fmt(float(np.median(nearest[far])))} away (median; farthest "
        f"{fmt(float(nearest.max()))}). Check that spots and tiles are in level-0 pixels of the same image and "
        "cover the same tissue; drop those tiles (see obs['nearest_spot_distance'])"
    )
    if max_distance is not None:
        raise ValueError(msg + ", or raise max_distance.")
    warnings.warn(msg + ", or pass max_distance=np.inf to silence this warning.", UserWarning, stacklevel=3)



# --------------------------------------------------------------------------------------------
# measured spots → tile grid (SEQUOIA's EMD protocol)
# --------------------------------------------------------------------------------------------
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

    SEQUOIA's ground truth for comparing predicted and measured maps (``spatial_vis/get_emd.py``
    ``get_average``): the mean of the 4 nearest spots by Euclidean distance between the tile centre and
    spot centres. Optional: a 3 × 3 median filter on the grid — histoexpr's rule, the median of the
    tiles present in each neighbourhood, which is *not* SEQUOIA's edge rule (see the fidelity page of
    the docs) — and a filter keeping genes with at least ``min_unique`` distinct values (the paper: 10).

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
        Largest allowed distance (level-0 pixels) from a tile centre to its nearest spot. Given: a
        tile farther away is an error. Default ``None``: a warning (how many tiles, how far, in tile
        units and µm) when any tile's nearest spot is more than 1.5 pitches away, the pitch being the
        larger of the tile side and the median spot-to-spot distance; such tiles take the values of
        spots that do not cover them (spots and tiles in different coordinates, or spots on part of
        the tissue only). ``np.inf`` turns the check off.

    Returns
    -------
    AnnData tiles × genes with the tiles' ``obs``/``obsm["spatial"]``/``uns["spatial"]``;
    ``obs["nearest_spot_distance"]`` in pixels.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd, histoexpr as hx
    >>> spots = ad.AnnData(np.array([[1.0], [3.0], [5.0]]), var=pd.DataFrame(index=["GENE"]))
    >>> spots.obsm["spatial"] = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    >>> tiles = ad.AnnData(obs=pd.DataFrame({"row": [0, 0], "col": [0, 1]}, index=["t0", "t1"]))
    >>> tiles.obsm["spatial"] = np.array([[4.0, 0.0], [16.0, 0.0]])
    >>> hx.pp.map_measured_to_tiles(spots, tiles, k=2).X.ravel().tolist()
    [2.0, 4.0]
    >>> truth = hx.pp.map_measured_to_tiles(visium, tiles, median_filter=True, min_unique=10)  # doctest: +SKIP
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
    slides = iter_slides(tiles)
    if len(slides) > 1:  # pixel coordinates and grids of different slides must not mix
        raise ValueError(
            f"`tiles` holds several slides ({[sid for sid, _ in slides][:5]}); map one "
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
    spot_tree = cKDTree(spots_xy)
    dist, nn = spot_tree.query(tiles_xy, k=k)
    dist, nn = dist.reshape(len(tiles_xy), k), nn.reshape(len(tiles_xy), k)
    _check_spot_distance(dist[:, 0], tiles, spots_xy, spot_tree, max_distance)
    src = measured if genes is None else measured[:, [str(g) for g in genes]]
    x = _dense(src.layers[layer] if layer is not None else src.X)
    values = x[nn].mean(axis=1)
    if median_filter:
        from ..metrics import median_filter_grid

        rows, cols = grid_coords(tiles)
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
