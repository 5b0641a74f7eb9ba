"""Grid tiling of a slide into an AnnData with tiles as observations (SPEC §1, §2)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import (
    DEFAULT_MPP,
    DEFAULT_TILE_SIZE,
    DEFAULT_TISSUE_THRESHOLD,
    SPATIAL_KEY,
    UNS_KEY,
)
from ._tissue import TissueMask, detect_tissue

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..io import Slide

#: Side, in pixels, at which tiles are read for the low-contrast check (read from the pyramid).
_CONTRAST_READ_SIZE = 64
#: Longer side of the thumbnail stored in ``uns["spatial"]`` for scanpy/squidpy plots.
_THUMBNAIL_SIZE = 2000


def tile(
    slide: Slide | Any,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    mpp: float = DEFAULT_MPP,
    tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD,
    filter_low_contrast: bool = True,
    max_tiles: int | None = None,
    seed: int = 0,
    tissue: TissueMask | None = None,
    slide_id: str | None = None,
    image_key: str | None = None,
    slide_mpp: float | None = None,
    n_threads: int = 4,
    key_added: str | None = None,
    overwrite: bool = False,
) -> AnnData:
    """Cut a slide into a grid of tiles on tissue; tiles become the observations of an AnnData.

    Tiles are ``tile_size`` px at ``mpp`` µm/px (default 256 px at 0.5 µm/px = 128 µm, SEQUOIA's
    recipe); on a 40× slide (0.25 µm/px) each tile spans 512 level-0 px and is read at 256 px.
    A tile is kept when more than ``tissue_threshold`` of it is tissue and, with
    ``filter_low_contrast``, :func:`skimage.exposure.is_low_contrast` is False for it.

    Parameters
    ----------
    slide
        A :class:`~histoexpr.io.Slide`, a path (opened with :func:`~histoexpr.io.open_slide`), or a
        :class:`spatialdata.SpatialData` (then ``image_key`` names the H&E image, and the tiles are also
        added to it as square polygons with an annotating table; see
        :func:`~histoexpr.io.add_tiles_to_spatialdata`).
    tile_size
        Tile side in pixels at ``mpp``.
    mpp
        µm per pixel the tiles are cut at.
    tissue_threshold
        Minimum tissue fraction of a kept tile (strictly greater).
    filter_low_contrast
        Drop tiles flagged by :func:`skimage.exposure.is_low_contrast` (checked on a
        64 px view of each candidate tile, read from the pyramid).
    max_tiles
        Keep at most this many tiles, drawn at random with ``seed`` (SEQUOIA used 4000).
    seed
        Seed of the random cap.
    tissue
        A precomputed :class:`~histoexpr.pp.TissueMask` (default: :func:`detect_tissue`).
    slide_id
        Overrides the slide's identifier.
    image_key, slide_mpp
        For SpatialData / path input: the image element, and µm/px when the metadata has none.
    n_threads
        Threads reading tiles for the contrast check.
    key_added
        SpatialData input only: name of the tile shapes element (default ``"<image_key>_tiles"``); the
        annotating tiles table is ``"<key_added>_table"``.
    overwrite
        SpatialData input only: replace tile elements of those names already in ``sdata`` (and its
        store). Without it, existing elements raise an error and nothing is written.

    Returns
    -------
    AnnData with one observation per tile: ``obs`` ``slide_id``, ``tile_id``, ``row``, ``col``, ``x0``,
    ``y0``, ``tissue_fraction``; ``obsm["spatial"]`` tile centres (level-0 px); ``uns["histoexpr"]`` the
    tiling parameters and ``uns["spatial"]`` a thumbnail for :func:`squidpy.pl.spatial_scatter`.

    Examples
    --------
    >>> import histoexpr as hx
    >>> slide = hx.io.open_slide("cmu-1-small-region.svs")  # doctest: +SKIP
    >>> tiles = hx.pp.tile(slide, tile_size=256, mpp=0.5)  # doctest: +SKIP
    >>> tiles.obs[["row", "col", "tissue_fraction"]].head()  # doctest: +SKIP
    """
    from ..io import open_slide

    sdata = slide if hasattr(slide, "images") and hasattr(slide, "tables") else None
    if sdata is not None:  # refuse existing names before the work, not after it
        from ..io._spatialdata import _check_free, _resolve_image_key

        shapes_key = key_added or f"{_resolve_image_key(sdata, image_key)}_tiles"
        _check_free(sdata, [shapes_key, f"{shapes_key}_table"], overwrite=overwrite)
    if not hasattr(slide, "read_tile"):
        slide = open_slide(slide, mpp=slide_mpp, image_key=image_key)
    _check_tiling_args(tile_size=tile_size, mpp=mpp, tissue_threshold=tissue_threshold, max_tiles=max_tiles)
    side0 = tile_size * mpp / slide.mpp
    w0, h0 = slide.dimensions
    n_cols, n_rows = int(w0 // side0), int(h0 // side0)
    if n_cols == 0 or n_rows == 0:
        raise ValueError(
            f"the slide ({w0}×{h0} px at {slide.mpp:g} µm/px) is smaller than one tile of {tile_size} px "
            f"at {mpp:g} µm/px ({side0:.0f} level-0 px); use a smaller tile_size or mpp"
        )
    if tissue is None:
        tissue = detect_tissue(slide)
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    x0 = np.round(cols * side0).astype(np.int64)
    y0 = np.round(rows * side0).astype(np.int64)
    frac = tissue.fraction_in_boxes(x0, y0, side0)
    keep = np.flatnonzero(frac > tissue_threshold)
    if keep.size == 0:
        raise ValueError(
            f"no tissue found on {slide.slide_id!r}: no tile has more than {tissue_threshold:.0%} tissue "
            f"(tissue covers {tissue.tissue_fraction:.1%} of the slide). Check the slide (blank or "
            "out-of-focus?) or lower tissue_threshold / pass a tissue mask of your own."
        )
    keep = _select_tiles(slide, keep, x0, y0, side0, filter_low_contrast, max_tiles, seed, n_threads)
    if keep.size == 0:
        raise ValueError(f"all tissue tiles of {slide.slide_id!r} are low-contrast; try filter_low_contrast=False")
    adata = _tiles_anndata(
        slide, rows[keep], cols[keep], x0[keep], y0[keep], frac[keep], side0=side0, tile_size=tile_size,
        mpp=mpp, slide_id=slide_id or slide.slide_id, thumbnail=tissue.thumbnail,
    )
    adata.uns[UNS_KEY].update(tissue_threshold=tissue_threshold, max_tiles=max_tiles, seed=seed,
                              filter_low_contrast=filter_low_contrast)
    if sdata is not None:
        from ..io import add_tiles_to_spatialdata

        # recorded before the table is copied into sdata: predict_spatial finds the shapes to annotate
        # and extract_features the image through these keys (also in the SpatialData table)
        key = _resolve_image_key(sdata, image_key)
        shapes_key = key_added or f"{key}_tiles"
        keys = {"image_key": key, "shapes_key": shapes_key, "table_key": f"{shapes_key}_table"}
        adata.uns[UNS_KEY].update(keys)
        add_tiles_to_spatialdata(sdata, adata, image_key=key, shapes_key=keys["shapes_key"],
                                 table_key=keys["table_key"], overwrite=overwrite)
    return adata


def tiles_from_centers(
    slide: Slide,
    centers: np.ndarray,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    mpp: float = DEFAULT_MPP,
    tile_ids: list[str] | None = None,
    slide_id: str | None = None,
    tissue: TissueMask | None = None,
    allow_partial: bool = False,
) -> AnnData:
    """Tiles centred on given level-0 positions (e.g. measured Visium/ST spots).

    Grid indices ``row``/``col`` are those of the :func:`tile` grid cell holding each centre (centre
    divided by the tile side, floored), so tiles on a regular spot lattice keep their neighbourhood and
    the centres of a :func:`tile` grid give back its indices. Tiles reaching outside the image raise an error
    unless ``allow_partial`` (then the outside is read as white background).

    Examples
    --------
    >>> tiles = hx.pp.tiles_from_centers(slide, spots.obsm["spatial"], tile_size=224, mpp=0.5)  # doctest: +SKIP
    """
    _check_tiling_args(tile_size=tile_size, mpp=mpp, tissue_threshold=0.0, max_tiles=None)
    centers = np.asarray(centers, dtype=float)
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise ValueError(f"centers must be an (n, 2) array of level-0 (x, y) positions, got shape {centers.shape}")
    if not np.isfinite(centers).all():
        raise ValueError("centers contain NaN/inf positions")
    side0 = tile_size * mpp / slide.mpp
    x0 = np.round(centers[:, 0] - side0 / 2).astype(np.int64)
    y0 = np.round(centers[:, 1] - side0 / 2).astype(np.int64)
    w0, h0 = slide.dimensions
    outside = (x0 < 0) | (y0 < 0) | (x0 + side0 > w0 + 0.5) | (y0 + side0 > h0 + 0.5)
    if outside.any() and not allow_partial:
        bad = np.flatnonzero(outside)
        raise ValueError(
            f"{bad.size} tiles reach outside the {w0}×{h0} px image (first: index {bad[0]}, centre "
            f"{centers[bad[0]].round(1).tolist()}). Check that the positions are level-0 pixels of this "
            "slide (not a downsampled image or µm), or pass allow_partial=True."
        )
    # floor, not round: a grid centre sits at (k + 0.5) tiles, and numpy rounds halves to even
    cols = np.floor(centers[:, 0] / side0).astype(np.int64)
    rows = np.floor(centers[:, 1] / side0).astype(np.int64)
    if tissue is None:
        tissue = detect_tissue(slide)
    frac = tissue.fraction_in_boxes(x0, y0, side0)
    adata = _tiles_anndata(slide, rows, cols, x0, y0, frac, side0=side0, tile_size=tile_size, mpp=mpp,
                           slide_id=slide_id or slide.slide_id, thumbnail=tissue.thumbnail, tile_ids=tile_ids,
                           centers=centers)
    return adata


# ---------------------------------------------------------------------------- internals
def _check_tiling_args(*, tile_size, mpp, tissue_threshold, max_tiles) -> None:
    if int(tile_size) != tile_size or tile_size < 8:
        raise ValueError(f"tile_size must be an integer number of pixels ≥ 8, got {tile_size!r}")
    if not (mpp and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    if not 0 <= tissue_threshold < 1:
        raise ValueError(f"tissue_threshold must be in [0, 1), got {tissue_threshold!r}")
    if max_tiles is not None and max_tiles < 1:
        raise ValueError(f"max_tiles must be a positive integer or None, got {max_tiles!r}")


def _select_tiles(slide, candidates, x0, y0, side0, filter_low_contrast, max_tiles, seed, n_threads):
    """Apply the contrast filter and the random cap.

    Candidates are visited in a seeded random order and the contrast check stops once ``max_tiles``
    tiles have passed: the result is a uniform random subset of all passing tiles, as filtering
    everything first would give, without reading every tile of a large slide.
    """
    order = np.random.default_rng(seed).permutation(candidates) if max_tiles is not None else candidates
    if not filter_low_contrast:
        chosen = order[:max_tiles] if max_tiles is not None else order
        return np.sort(chosen)
    from skimage.exposure import is_low_contrast

    def passes(i: int) -> bool:
        patch = slide.read_tile(x0[i], y0[i], side0, _CONTRAST_READ_SIZE)
        return not is_low_contrast(patch)

    limit = max_tiles if max_tiles is not None else order.size
    kept: list[int] = []
    chunk = max(64, 4 * n_threads)
    with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
        for start in range(0, order.size, chunk):
            block = order[start : start + chunk]
            for i, ok in zip(block, pool.map(passes, block)):
                if ok and len(kept) < limit:
                    kept.append(int(i))
            if len(kept) >= limit:
                break
    return np.sort(np.asarray(kept, dtype=np.int64))


def _tiles_anndata(slide, rows, cols, x0, y0, frac, *, side0, tile_size, mpp, slide_id, thumbnail,
                   tile_ids=None, centers=None) -> AnnData:
    import anndata as ad

    n = len(rows)
    if tile_ids is None:
        tile_ids = [f"{slide_id}_{r}_{c}" for r, c in zip(rows, cols)]
    tile_ids = pd.Index([str(t) for t in tile_ids])
    if not tile_ids.is_unique:
        raise ValueError("tile ids are not unique (two tiles share a grid cell or an id); pass unique tile_ids")
    obs = pd.DataFrame(
        {
            "slide_id": pd.Categorical([slide_id] * n),
            "tile_id": tile_ids,
            "row": np.asarray(rows, dtype=np.int64),
            "col": np.asarray(cols, dtype=np.int64),
            "x0": np.asarray(x0, dtype=np.int64),
            "y0": np.asarray(y0, dtype=np.int64),
            "tissue_fraction": np.asarray(frac, dtype=np.float32),
        },
        index=tile_ids,
    )
    if centers is None:
        centers = np.column_stack([obs["x0"] + side0 / 2, obs["y0"] + side0 / 2])
    adata = ad.AnnData(obs=obs)
    adata.obsm[SPATIAL_KEY] = np.asarray(centers, dtype=np.float64)
    thumb = _thumbnail_for_uns(slide, thumbnail)
    adata.uns[UNS_KEY] = {
        "slide_id": slide_id,
        "slide_path": str(slide.path) if slide.path is not None else None,
        "slide_mpp": slide.mpp,
        "mpp": float(mpp),
        "tile_size": int(tile_size),
        "tile_size_um": float(tile_size * mpp),
        "tile_size_level0": float(side0),
        "level0_dimensions": [int(v) for v in slide.dimensions],
    }
    adata.uns["spatial"] = {
        slide_id: {
            "images": {"hires": thumb},
            "scalefactors": {
                "tissue_hires_scalef": slide.thumbnail_scale(thumb),
                "spot_diameter_fullres": float(side0),
            },
            "metadata": {"source": "histoexpr.pp.tile"},
        }
    }
    return adata


def _thumbnail_for_uns(slide, thumbnail: np.ndarray) -> np.ndarray:
    if max(thumbnail.shape[:2]) <= _THUMBNAIL_SIZE:
        return thumbnail
    from PIL import Image

    scale = _THUMBNAIL_SIZE / max(thumbnail.shape[:2])
    size = (round(thumbnail.shape[1] * scale), round(thumbnail.shape[0] * scale))
    return np.asarray(Image.fromarray(thumbnail).resize(size, Image.BILINEAR))
