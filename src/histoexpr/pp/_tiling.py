"""Grid tiling of a slide into an AnnData with tiles as observations."""

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
from .._utils import check_positive, renamed_kwargs
from ._tissue import TissueMask, detect_tissue

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..io import Slide

#: Side, in pixels, at which tiles are read for the low-contrast check (read from the pyramid).
_CONTRAST_READ_SIZE = 64
#: Longer side of the thumbnail stored in ``uns["spatial"]`` for scanpy/squidpy plots.
_THUMBNAIL_SIZE = 2000
#: Tile selection rules of :func:`tile`.
TILE_RULES = ("fraction", "sequoia-bulk", "sequoia-spatial")


@renamed_kwargs(seed="random_state")
def tile(
    slide: Slide | Any,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    mpp: float = DEFAULT_MPP,
    tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD,
    filter_low_contrast: bool = True,
    max_tiles: int | None = None,
    random_state: int | None = None,
    rule: str = "fraction",
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
    scale); on a 40× slide (0.25 µm/px) each tile spans 512 level-0 px and is read at 256 px.
    Which grid cells are kept is set by ``rule``:

    ``"fraction"`` (default, histoexpr's rule)
        A tile is kept when more than ``tissue_threshold`` of it is tissue in the
        :func:`detect_tissue` mask and, with ``filter_low_contrast``,
        :func:`skimage.exposure.is_low_contrast` is False for it. Tiles lie inside the image.
    ``"sequoia-bulk"``
        The published SEQUOIA rule for bulk features (``pre_processing/patch_gen_hdf5.py``): mask on
        the slide's lowest-resolution level (SciPy's erosion border 0); candidates on the grid from
        ``(0, 0)`` including partial tiles past the right/bottom edge (read as black outside); stage 1
        keeps a candidate whose top-left mask pixel is tissue; stage 2 recomputes the colour rule on
        the tile itself (its own Otsu thresholds, 3 dilations) and keeps it when more than 20 % of its
        pixels are tissue and it is not low-contrast. With ``max_tiles``, candidates are visited in the
        order of ``np.random.RandomState(random_state).shuffle`` (upstream: seed 5, the default here) and the
        first ``max_tiles`` passing ones are kept. ``obs["partial"]`` marks tiles running past the edge.
    ``"sequoia-spatial"``
        The published SEQUOIA rule for spatial maps (``spatial_vis/visualize.py``): the same mask; tiles
        that end before the right/bottom edge; the mask block under a tile, dilated 3×, must be at
        least half tissue; no contrast check. Tiles come in upstream's table order (by column, then
        row).

    For the two SEQUOIA rules the tile side is ``int(AppMag · mpp / 10 · tile_size)`` level-0 px when
    the slide records its objective power (upstream: ``int(AppMag / 20 · 256)``), else
    ``round(tile_size · mpp / slide_mpp)``; ``tissue_threshold`` and ``filter_low_contrast`` do not
    apply. Tile sets of these rules match the published code exactly on CMU-1 (see the fidelity page).

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
        Keep at most this many tiles, drawn at random with ``random_state`` (SEQUOIA used 4000).
    random_state
        Seed of the random cap (default 0; 5 for ``rule="sequoia-bulk"``, as upstream).
    rule
        ``"fraction"``, ``"sequoia-bulk"`` or ``"sequoia-spatial"`` (see above).
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
        from ..io import pick_image_key
        from ..io._spatialdata import _check_free

        shapes_key = key_added or f"{pick_image_key(sdata, image_key)}_tiles"
        _check_free(sdata, [shapes_key, f"{shapes_key}_table"], overwrite=overwrite)
    if not hasattr(slide, "read_tile"):
        slide = open_slide(slide, mpp=slide_mpp, image_key=image_key)
    _check_tiling_args(tile_size=tile_size, mpp=mpp, tissue_threshold=tissue_threshold, max_tiles=max_tiles)
    if rule not in TILE_RULES:
        raise ValueError(f"rule must be one of {TILE_RULES}; got {rule!r}.")
    if rule != "fraction":
        adata = _tile_sequoia(slide, rule=rule, tile_size=tile_size, mpp=mpp, max_tiles=max_tiles,
                              seed=5 if random_state is None else random_state, tissue=tissue, slide_id=slide_id,
                              n_threads=n_threads)
        _add_to_sdata(sdata, adata, image_key, key_added=key_added, overwrite=overwrite)
        return adata
    random_state = 0 if random_state is None else random_state
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
    keep = _select_tiles(slide, keep, x0, y0, side0, filter_low_contrast, max_tiles, random_state, n_threads)
    if keep.size == 0:
        raise ValueError(f"all tissue tiles of {slide.slide_id!r} are low-contrast; try filter_low_contrast=False")
    adata = _tiles_anndata(
        slide, rows[keep], cols[keep], x0[keep], y0[keep], frac[keep], side0=side0, tile_size=tile_size,
        mpp=mpp, slide_id=slide_id or slide.slide_id, thumbnail=tissue.thumbnail,
    )
    adata.uns[UNS_KEY].update(tissue_threshold=tissue_threshold, max_tiles=max_tiles, random_state=random_state,
                              filter_low_contrast=filter_low_contrast, tile_rule=rule)
    _add_to_sdata(sdata, adata, image_key, key_added=key_added, overwrite=overwrite)
    return adata


def _add_to_sdata(sdata, adata, image_key, *, key_added=None, overwrite=False) -> None:
    if sdata is not None:
        from ..io import add_tiles_to_spatialdata, pick_image_key

        # recorded before the table is copied into sdata: predict_spatial finds the shapes to annotate
        # and extract_features the image through these keys (also in the SpatialData table)
        key = pick_image_key(sdata, image_key)
        shapes_key = key_added or f"{key}_tiles"
        keys = {"image_key": key, "shapes_key": shapes_key, "table_key": f"{shapes_key}_table"}
        adata.uns[UNS_KEY].update(keys)
        add_tiles_to_spatialdata(sdata, adata, image_key=key, shapes_key=keys["shapes_key"],
                                 table_key=keys["table_key"], overwrite=overwrite)


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


# ---------------------------------------------------------------------------- SEQUOIA's rules
def _objective_power(slide) -> float | None:
    """Objective power recorded in the slide's metadata (``aperio.AppMag`` etc.), if any."""
    if getattr(slide, "backend", None) not in ("tiffslide", "openslide"):
        return None
    try:
        props = slide._open_handle().properties
    except Exception:  # noqa: BLE001 - metadata is optional
        return None
    for key in ("aperio.AppMag", "openslide.objective-power", "tiffslide.objective-power"):
        try:
            value = float(props[key])
        except (KeyError, TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def _sequoia_side0(slide, tile_size: int, mpp: float) -> int:
    power = _objective_power(slide)
    if power is not None:
        return int(round(power * mpp / 10 * tile_size, 6))
    return int(round(tile_size * mpp / slide.mpp))


def _read_black_padded(slide, x: int, y: int, side0: int) -> np.ndarray:
    """Level-0 square at ``(x, y)``; pixels outside the slide are black (as OpenSlide returns them)."""
    w0, h0 = slide.dimensions
    out = np.zeros((side0, side0, 3), dtype=np.uint8)
    w, h = min(side0, w0 - x), min(side0, h0 - y)
    if w > 0 and h > 0:
        out[:h, :w] = slide.read_region((x, y), 0, (w, h))
    return out


def _sequoia_patch_ok(patch: np.ndarray, tile_size: int) -> tuple[bool, float]:
    """Stage 2 of SEQUOIA's bulk rule on one tile: own-Otsu colour rule, 3 dilations, > 20 %, contrast."""
    from scipy import ndimage
    from skimage.exposure import is_low_contrast

    from ._tissue import tissue_mask_from_rgb

    if patch.shape[0] != tile_size:
        from PIL import Image

        patch = np.asarray(Image.fromarray(patch).resize((tile_size, tile_size), Image.BILINEAR))
    mask = ndimage.binary_dilation(tissue_mask_from_rgb(patch, n_morph=0), iterations=3)
    count = int(mask.sum())
    ok = count > 0.2 * tile_size * tile_size and not is_low_contrast(patch)
    return ok, count / (tile_size * tile_size)


def _dilated_block_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, ds: int, p: int) -> np.ndarray:
    """Tissue fraction of the ``p × p`` mask block under each tile after 3 dilations (border 0).

    Each block is dilated on its own (SEQUOIA's ``binary_dilation(patch_in_mask, iterations=3)``):
    all blocks are stacked and dilated at once with a structure that does not reach across blocks.
    """
    from scipy import ndimage

    r0 = (y0 / ds).astype(np.int64)
    c0 = (x0 / ds).astype(np.int64)
    frac = np.zeros(x0.size)
    if x0.size == 0 or p < 1:
        return frac
    h, w = mask.shape
    full = (r0 + p <= h) & (c0 + p <= w)
    cross = np.zeros((1, 3, 3), dtype=bool)
    cross[0] = ndimage.generate_binary_structure(2, 1)
    todo = np.flatnonzero(full)
    step = max(1, (1 << 24) // (p * p))  # ≤ 16 M mask pixels per batch
    for start in range(0, todo.size, step):
        idx = todo[start : start + step]
        rr = r0[idx, None, None] + np.arange(p)[None, :, None]
        cc = c0[idx, None, None] + np.arange(p)[None, None, :]
        dilated = ndimage.binary_dilation(mask[rr, cc], structure=cross, iterations=3)  # (n, p, p)
        frac[idx] = dilated.reshape(idx.size, -1).mean(1)
    for i in np.flatnonzero(~full):  # blocks cut by the mask's edge
        block = mask[r0[i] : r0[i] + p, c0[i] : c0[i] + p]
        if block.size:
            frac[i] = ndimage.binary_dilation(block, iterations=3).sum() / block.size
    return frac


def _tile_sequoia(slide, *, rule, tile_size, mpp, max_tiles, seed, tissue, slide_id, n_threads) -> AnnData:
    side0 = _sequoia_side0(slide, tile_size, mpp)
    w0, h0 = slide.dimensions
    if side0 < 1 or side0 > min(w0, h0):
        raise ValueError(
            f"the slide ({w0}×{h0} px) is smaller than one tile of {side0} level-0 px; use a smaller tile_size"
        )
    if tissue is None:  # SEQUOIA's mask: the lowest-resolution level, erosion border 0
        tissue = detect_tissue(slide, max_size=None, erosion_border=0)
    mask = tissue.mask
    partial = None
    if rule == "sequoia-bulk":
        xs, ys = np.meshgrid(np.arange(0, w0, side0), np.arange(0, h0, side0), indexing="ij")
        xs, ys = xs.ravel(), ys.ravel()  # x outer, y inner: upstream's candidate list
        order = np.random.RandomState(seed).permutation(xs.size)
        xs, ys = xs[order], ys[order]
        mh, mw = mask.shape
        ratio_x, ratio_y = w0 / mw, h0 / mh
        stage1 = mask[(ys / ratio_y).astype(np.int64), (xs / ratio_x).astype(np.int64)]
        xs, ys = xs[stage1], ys[stage1]
        limit = xs.size if max_tiles is None else max_tiles

        def check(i: int) -> tuple[bool, float]:
            return _sequoia_patch_ok(_read_black_padded(slide, int(xs[i]), int(ys[i]), side0), tile_size)

        kept, frac = [], []
        chunk = max(16, 4 * n_threads)
        with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
            for start in range(0, xs.size, chunk):
                block = range(start, min(start + chunk, xs.size))
                for i, (ok, f) in zip(block, pool.map(check, block)):
                    if ok and len(kept) < limit:
                        kept.append(i)
                        frac.append(f)
                if len(kept) >= limit:
                    break
        kept = np.asarray(kept, dtype=np.int64)
        frac = np.asarray(frac, dtype=np.float64)
        x0, y0 = xs[kept], ys[kept]
        order = np.lexsort((x0, y0))  # row-major, like the other rules
        x0, y0, frac = x0[order], y0[order], frac[order]
        partial = (x0 + side0 > w0) | (y0 + side0 > h0)
    else:
        ds = int(w0 / mask.shape[1])
        p = int(side0 / ds)
        cols0, rows0 = np.meshgrid(np.arange(0, w0 - side0, side0), np.arange(0, h0 - side0, side0), indexing="ij")
        x0, y0 = cols0.ravel(), rows0.ravel()  # column-major: upstream's table order
        frac = _dilated_block_fractions(mask, x0, y0, ds, p)
        keep = frac >= 0.5
        x0, y0, frac = x0[keep], y0[keep], frac[keep]
    if x0.size == 0:
        raise ValueError(
            f"no tissue tile on {slide.slide_id!r} with rule={rule!r} (tissue covers "
            f"{tissue.tissue_fraction:.1%} of the mask). Check the slide or pass a tissue mask of your own."
        )
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    adata = _tiles_anndata(
        slide, y0 // side0, x0 // side0, x0, y0, frac, side0=float(side0), tile_size=tile_size, mpp=mpp,
        slide_id=slide_id or slide.slide_id, thumbnail=tissue.thumbnail,
    )
    if partial is not None:
        adata.obs["partial"] = np.asarray(partial, dtype=bool)
    adata.uns[UNS_KEY].update(tile_rule=rule, max_tiles=max_tiles, random_state=seed)
    return adata


# ---------------------------------------------------------------------------- internals
def _check_tiling_args(*, tile_size, mpp, tissue_threshold, max_tiles) -> None:
    if check_positive(tile_size, "tile_size", integer=True, hint="It is the tile side in pixels (≥ 8).") < 8:
        raise ValueError(f"tile_size must be an integer number of pixels ≥ 8, got {tile_size!r}")
    check_positive(mpp, "mpp", hint="It is the µm per pixel the tiles are cut at (e.g. 0.5).")
    if not 0 <= check_positive(tissue_threshold, "tissue_threshold", allow_zero=True) < 1:
        raise ValueError(f"tissue_threshold must be in [0, 1), got {tissue_threshold!r}")
    if max_tiles is not None:
        check_positive(max_tiles, "max_tiles", integer=True, hint="Pass None to keep every tile.")


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
