"""Cut H&E crops from a Xenium SpatialData and pool its transcripts per crop and per ViT patch.

The transcripts (SpatialData points, x/y in µm) are mapped into the H&E image's level-0 pixels through
the two elements' transformations to a shared coordinate system. Crops are squares of ``crop_size`` px
at ``mpp`` µm/px laid on the image's pixel grid; each crop is cut into ``patch_size`` px ViT patches
(16 px = 8 µm at 0.5 µm/px → 14 × 14 = 196 tokens for a 224 px crop).

* **add-on** transcripts per crop → the targets (``X`` = log1p counts, ``layers["counts"]``);
* **core** transcripts per crop and patch → ``obsm["X_core_tokens"]``, a sparse CSR matrix
  ``(n_crops, n_patches * n_core_genes)`` laid out patch-major (``row.reshape(n_patches, n_core_genes)``);
  tokens are numbered row-major over the patch grid, as timm's ``PatchEmbed`` flattens them.

Pixels are never copied into the AnnData: :func:`xenium_crop_images` reads them on demand from the image
element (best pyramid level, resized when the image is not at ``mpp``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..io import Slide

#: Xenium feature names that are controls, not genes.
CONTROL_PREFIXES = (
    "NegControl",
    "BLANK",
    "Unassigned",
    "Deprecated",
    "antisense",
    "Intergenic",
    "UnassignedCodeword",
    "NegativeControl",
)


class XeniumCropError(ValueError):
    """Bad input for Xenium crop extraction (panels, coordinate systems, empty crops)."""


# ---------------------------------------------------------------------------- element lookup
def _pick_image_key(sdata, image_key: str | None) -> str:
    from histoexpr.io import pick_image_key

    return pick_image_key(sdata, image_key, error=XeniumCropError)


def _pick_points_key(sdata, points_key: str | None) -> str:
    keys = list(sdata.points.keys())
    if points_key is None:
        points_key = (getattr(sdata, "attrs", None) or {}).get("histoexpr", {}).get("points_key")
    if points_key is not None:
        if points_key not in sdata.points:
            raise XeniumCropError(f"points {points_key!r} not in this SpatialData; points: {keys}")
        return points_key
    if "transcripts" in keys:
        return "transcripts"
    if len(keys) == 1:
        return keys[0]
    raise XeniumCropError(f"cannot tell which points element holds the transcripts (points: {keys}); "
                          "pass points_key=")


def _gene_column(points, gene_key: str | None) -> str:
    if gene_key is not None:
        if gene_key not in points.columns:
            raise XeniumCropError(f"column {gene_key!r} not in the transcripts ({list(points.columns)})")
        return gene_key
    attrs_key = points.attrs.get("spatialdata_attrs", {}).get("feature_key")
    for key in (attrs_key, "feature_name", "gene"):
        if key is not None and key in points.columns:
            return key
    raise XeniumCropError(f"no gene column in the transcripts ({list(points.columns)}); pass gene_key=")


def points_to_image_matrix(sdata, *, image_key: str, points_key: str,
                           coordinate_system: str | None = None) -> tuple[np.ndarray, str]:
    """3 × 3 affine matrix mapping points ``(x, y, 1)`` to the image's level-0 pixels ``(x, y, 1)``.

    Both elements must have a transformation to a shared coordinate system; the map is
    ``inv(image → cs) @ (points → cs)``.
    """
    from spatialdata.transformations import get_transformation

    t_img = get_transformation(sdata.images[image_key], get_all=True) or {}
    t_pts = get_transformation(sdata.points[points_key], get_all=True) or {}
    common = [cs for cs in t_img if cs in t_pts]
    if coordinate_system is not None:
        if coordinate_system not in common:
            raise XeniumCropError(
                f"image {image_key!r} (coordinate systems {sorted(t_img)}) and points {points_key!r} "
                f"({sorted(t_pts)}) do not both have a transformation to {coordinate_system!r}; "
                "register them to one coordinate system with spatialdata.transformations.set_transformation")
        common = [coordinate_system]
    if not common:
        raise XeniumCropError(
            f"image {image_key!r} (coordinate systems {sorted(t_img)}) and points {points_key!r} "
            f"({sorted(t_pts)}) share no coordinate system, so transcripts cannot be placed on the H&E; "
            "add the alignment with spatialdata.transformations.set_transformation (e.g. an Affine from "
            "the Xenium alignment file) to a coordinate system both elements use")
    cs = "global" if "global" in common else common[0]
    xy = ("x", "y")
    m_img = np.asarray(t_img[cs].to_affine_matrix(input_axes=xy, output_axes=xy), dtype=float)
    m_pts = np.asarray(t_pts[cs].to_affine_matrix(input_axes=xy, output_axes=xy), dtype=float)
    if abs(np.linalg.det(m_img[:2, :2])) < 1e-12:
        raise XeniumCropError(f"the transformation of image {image_key!r} to {cs!r} is singular")
    return np.linalg.solve(m_img, m_pts), cs


def _pixel_size_um(points_to_px: np.ndarray) -> float:
    """µm per image pixel, given the µm → px map (isotropic up to 1 %)."""
    lin = points_to_px[:2, :2]
    sx, sy = np.hypot(lin[0, 0], lin[1, 0]), np.hypot(lin[0, 1], lin[1, 1])
    if not np.isclose(sx, sy, rtol=1e-2):
        raise XeniumCropError(f"the points → image map is anisotropic ({sx:.4g} vs {sy:.4g} px/µm); "
                              "crops need square pixels")
    return float(2.0 / (sx + sy))


# ---------------------------------------------------------------------------- panels
def _panel_genes(points, gene_col: str) -> list[str]:
    col = points[gene_col]
    is_dask = hasattr(col, "compute")
    known = isinstance(col.dtype, pd.CategoricalDtype) and (not is_dask or col.cat.known)
    if known:
        names = list(col.cat.categories)
    else:
        names = list(pd.unique(np.asarray(col.compute() if is_dask else col).astype(str)))
    return sorted(str(g) for g in names if not str(g).startswith(CONTROL_PREFIXES))


def _check_panels(core_genes: Sequence[str], addon_genes: Sequence[str], available: list[str]):
    core, addon = [str(g) for g in core_genes], [str(g) for g in addon_genes]
    if not core or not addon:
        raise XeniumCropError("core_genes and addon_genes must both be non-empty")
    for name, panel in (("core_genes", core), ("addon_genes", addon)):
        dup = pd.Index(panel)[pd.Index(panel).duplicated()].unique().tolist()
        if dup:
            raise XeniumCropError(f"{name} lists genes more than once: {dup[:10]}")
    both = sorted(set(core) & set(addon))
    if both:
        raise XeniumCropError(f"{len(both)} genes are in both the core and the add-on panel ({both[:10]}); "
                              "a target cannot also be an input — remove them from one panel")
    known = set(available)
    unknown = [g for g in core + addon if g not in known]
    if unknown:
        raise XeniumCropError(f"{len(unknown)} panel genes are not among the transcripts' genes "
                              f"({unknown[:10]}); known genes (controls excluded): {len(known)}, "
                              f"e.g. {sorted(known)[:5]}")
    return core, addon


# ---------------------------------------------------------------------------- grid and tissue
def _grid_origins(extent0: float, size0: float, stride0: float) -> np.ndarray:
    """Integer level-0 origins of the crops along one axis (crops lie fully inside the image)."""
    n = int(math.floor((extent0 - size0) / stride0 + 1e-9)) + 1
    return np.floor(np.arange(max(n, 0)) * stride0).astype(np.int64)


def _tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """Tissue = coloured (HSV saturation > 0.05) and not white (value < 0.92)."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(thumb[..., :3])
    return (hsv[..., 1] > 0.05) & (hsv[..., 2] < 0.92)


def _tissue_fractions(slide, xs0, ys0, size0) -> np.ndarray:
    """Tissue fraction of each crop (row-major over ys0 × xs0), from a thumbnail mask."""
    from ._tissue import TissueMask

    thumb = slide.thumbnail(max_size=2048)
    w0, h0 = slide.dimensions
    tissue = TissueMask(mask=_tissue_mask(thumb), downsample=(w0 / thumb.shape[1], h0 / thumb.shape[0]),
                        thumbnail=thumb)
    y0, x0 = (a.ravel() for a in np.meshgrid(ys0, xs0, indexing="ij"))
    return tissue.fraction_in_boxes(x0, y0, size0)


def _memberships(u: np.ndarray, origins: np.ndarray, size0: float, stride0: float):
    """All (transcript, crop index) pairs along one axis with ``0 <= u - origin < size0``."""
    n = len(origins)
    k = int(math.ceil(size0 / stride0)) + 1
    last = np.floor(u / stride0).astype(np.int64)
    pts, idx = [], []
    for off in range(k + 1):
        c = last - off + 1
        ok = (c >= 0) & (c < n)
        c_ok = np.where(ok, c, 0)
        d = u - origins[c_ok]
        ok &= (d >= 0) & (d < size0)
        sel = np.flatnonzero(ok)
        pts.append(sel)
        idx.append(c[sel])
    return np.concatenate(pts), np.concatenate(idx)


def _pool_partition(df: pd.DataFrame, *, gene_col, gene_index, n_core, to_px, xs0, ys0, size0, stride0,
                    patch0, n_side, n_cols, qv_min):
    if qv_min is not None and qv_min > 0 and "qv" in df.columns:
        df = df[df["qv"].to_numpy() >= qv_min]
    g = pd.Series(np.asarray(df[gene_col]).astype(str)).map(gene_index).to_numpy()
    keep = ~pd.isna(g)
    if not keep.any():
        return None
    g = g[keep].astype(np.int64)
    xy = np.c_[np.asarray(df["x"], float)[keep], np.asarray(df["y"], float)[keep], np.ones(keep.sum())]
    px = xy @ to_px.T
    u, v = px[:, 0], px[:, 1]
    ti, ci = _memberships(u, xs0, size0, stride0)
    tj, rj = _memberships(v, ys0, size0, stride0)
    # join the per-axis memberships on transcript id: every (col, row) combination of one transcript
    col_df = pd.DataFrame({"t": ti, "col": ci})
    row_df = pd.DataFrame({"t": tj, "row": rj})
    pairs = col_df.merge(row_df, on="t")
    t = pairs["t"].to_numpy()
    col, row = pairs["col"].to_numpy(), pairs["row"].to_numpy()
    crop = row * n_cols + col
    pc = np.minimum(((u[t] - xs0[col]) / patch0).astype(np.int64), n_side - 1)
    pr = np.minimum(((v[t] - ys0[row]) / patch0).astype(np.int64), n_side - 1)
    gene = g[t]
    is_core = gene < n_core
    token = pr * n_side + pc
    core = (crop[is_core], token[is_core] * n_core + gene[is_core])
    addon = (crop[~is_core], gene[~is_core] - n_core)
    return core, addon


# ---------------------------------------------------------------------------- public API
def xenium_crops(
    sdata,
    *,
    core_genes: Sequence[str],
    addon_genes: Sequence[str],
    image_key: str | None = None,
    points_key: str | None = None,
    coordinate_system: str | None = None,
    gene_key: str | None = None,
    crop_size: int = 224,
    mpp: float = 0.5,
    patch_size: int = 16,
    stride: int | None = None,
    min_tissue: float = 0.1,
    min_transcripts: int = 1,
    qv_min: float | None = 20,
) -> AnnData:
    """Cut H&E crops from a Xenium SpatialData and pool core/add-on transcripts.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image element and Xenium transcripts (points with ``x``, ``y`` in µm, a
        gene column and ``qv``), both with a transformation to a shared coordinate system.
    core_genes, addon_genes
        Input panel (pooled per ViT patch) and target panel (pooled per crop). Disjoint; controls
        (``BLANK_*``, ``NegControl*``…) are not genes.
    image_key, points_key
        Elements to use (default: the only RGB / ``he`` image, the ``transcripts`` points).
    coordinate_system
        Shared coordinate system to align through (default ``"global"`` or the first shared one).
    gene_key
        Gene column of the points (default: the points' ``feature_key``, ``feature_name`` or ``gene``).
    crop_size, mpp, patch_size
        Crop side in px at ``mpp`` µm/px and ViT patch side in px: 224 px at 0.5 µm/px with 16 px
        patches → 112 µm crops of 14 × 14 = 196 tokens of 8 µm.
    stride
        Crop step in px at ``mpp`` (default ``crop_size``: no overlap).
    min_tissue
        Minimum tissue fraction of a crop (saturation mask of a thumbnail).
    min_transcripts
        Minimum core + add-on transcripts (after the ``qv`` filter) of a crop; crops below it are
        dropped with a warning giving their number. No crop left is an error.
    qv_min
        Keep transcripts with ``qv >= qv_min`` (Xenium's default Q20); ``None`` keeps all.

    Returns
    -------
    AnnData crops × add-on genes: ``X`` log1p add-on counts (float32), ``layers["counts"]`` raw counts;
    ``obs``: ``crop_id``, ``slide_id``, ``row``, ``col``, ``x0``, ``y0`` (level-0 image px),
    ``tissue_fraction``, ``n_transcripts``, ``n_core``, ``n_addon``; ``obsm["spatial"]`` crop centres in
    level-0 image px, ``obsm["spatial_um"]`` in the points' µm; ``obsm["X_core_tokens"]`` the sparse
    per-patch core counts; ``uns["histoexpr"]`` the geometry, panels and element keys.

    Example
    -------
    >>> import spatialdata as sd, histoexpr as hx
    >>> sdata = sd.read_zarr("xenium.zarr")  # doctest: +SKIP
    >>> crops = hx.pp.xenium_crops(sdata, core_genes=core, addon_genes=addon, stride=112)  # doctest: +SKIP
    >>> crops.obsm["X_core_tokens"].shape  # (n_crops, 196 * len(core))  # doctest: +SKIP
    """
    import anndata as ad

    from histoexpr.io import open_slide

    if crop_size % patch_size:
        raise XeniumCropError(f"crop_size ({crop_size}) must be a multiple of patch_size ({patch_size})")
    if mpp <= 0:
        raise XeniumCropError(f"mpp must be positive, got {mpp}")
    stride = crop_size if stride is None else int(stride)
    if stride <= 0:
        raise XeniumCropError(f"stride must be positive, got {stride}")

    image_key = _pick_image_key(sdata, image_key)
    points_key = _pick_points_key(sdata, points_key)
    to_px, cs = points_to_image_matrix(sdata, image_key=image_key, points_key=points_key,
                                       coordinate_system=coordinate_system)
    slide_mpp = _pixel_size_um(to_px)
    slide = open_slide(sdata, image_key=image_key, mpp=slide_mpp)

    points = sdata.points[points_key]
    gene_col = _gene_column(points, gene_key)
    core, addon = _check_panels(core_genes, addon_genes, _panel_genes(points, gene_col))
    n_core, n_addon = len(core), len(addon)
    gene_index = {g: i for i, g in enumerate(core + addon)}

    factor = mpp / slide_mpp  # level-0 px per px at target mpp
    size0, stride0, patch0 = crop_size * factor, stride * factor, patch_size * factor
    n_side = crop_size // patch_size
    n_patches = n_side * n_side
    width0, height0 = slide.dimensions
    xs0 = _grid_origins(width0, size0, stride0)
    ys0 = _grid_origins(height0, size0, stride0)
    if len(xs0) == 0 or len(ys0) == 0:
        raise XeniumCropError(f"the image ({width0} × {height0} px at {slide_mpp:.3g} µm/px) is smaller than "
                              f"one crop ({crop_size} px at {mpp} µm/px = {size0:.0f} image px); "
                              "use a smaller crop_size")
    n_rows, n_cols = len(ys0), len(xs0)
    n_grid = n_rows * n_cols

    core_r, core_c, add_r, add_c = [], [], [], []
    frames = points.partitions if hasattr(points, "partitions") else [points]
    for part in frames:
        df = part.compute() if hasattr(part, "compute") else part
        pooled = _pool_partition(df, gene_col=gene_col, gene_index=gene_index, n_core=n_core, to_px=to_px,
                                 xs0=xs0, ys0=ys0, size0=size0, stride0=stride0, patch0=patch0,
                                 n_side=n_side, n_cols=n_cols, qv_min=qv_min)
        if pooled is None:
            continue
        (cr, cc), (ar, ac) = pooled
        core_r.append(cr), core_c.append(cc), add_r.append(ar), add_c.append(ac)

    def _coo(rows, cols, shape):
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        m = sparse.coo_matrix((np.ones(len(r), np.float32), (r, c)), shape=shape).tocsr()
        m.sum_duplicates()
        return m

    tokens = _coo(core_r, core_c, (n_grid, n_patches * n_core))
    counts = _coo(add_r, add_c, (n_grid, n_addon))
    n_core_tx = np.asarray(tokens.sum(1)).ravel()
    n_addon_tx = np.asarray(counts.sum(1)).ravel()
    n_tx = n_core_tx + n_addon_tx

    rows, cols = np.divmod(np.arange(n_grid), n_cols)
    x0, y0 = xs0[cols], ys0[rows]
    tissue = _tissue_fractions(slide, xs0, ys0, size0)
    tissue_ok = tissue >= min_tissue
    tx_ok = n_tx >= max(min_transcripts, 1)
    keep = tissue_ok & tx_ok
    n_low_tx = int((tissue_ok & ~tx_ok).sum())
    if not keep.any():
        raise XeniumCropError(
            f"no crop left: {n_grid} crops, {int((~tissue_ok).sum())} below min_tissue={min_tissue}, "
            f"{n_low_tx} of the rest with fewer than {max(min_transcripts, 1)} panel transcripts (qv >= "
            f"{qv_min}); check the image/points alignment, the panels, or lower the thresholds")
    if n_low_tx:
        warnings.warn(f"dropped {n_low_tx} of {n_grid} crops with fewer than {max(min_transcripts, 1)} "
                      f"core/add-on transcripts (qv >= {qv_min})", UserWarning, stacklevel=2)

    idx = np.flatnonzero(keep)
    slide_id = image_key
    crop_ids = [f"{slide_id}_{r}_{c}" for r, c in zip(rows[idx], cols[idx])]
    centres = np.c_[x0[idx] + size0 / 2, y0[idx] + size0 / 2]
    centres_um = np.c_[centres, np.ones(len(idx))] @ np.linalg.inv(to_px).T
    obs = pd.DataFrame({
        "crop_id": crop_ids,
        "slide_id": pd.Categorical([slide_id] * len(idx)),
        "row": rows[idx].astype(np.int64), "col": cols[idx].astype(np.int64),
        "x0": x0[idx].astype(np.int64), "y0": y0[idx].astype(np.int64),
        "tissue_fraction": tissue[idx].astype(np.float32),
        "n_transcripts": n_tx[idx].astype(np.int64),
        "n_core": n_core_tx[idx].astype(np.int64), "n_addon": n_addon_tx[idx].astype(np.int64),
    }, index=pd.Index(crop_ids, name=None))
    counts_kept = counts[idx].astype(np.float32)
    adata = ad.AnnData(
        X=np.log1p(counts_kept.toarray()).astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(addon)),
        layers={"counts": counts_kept},
    )
    adata.obsm["spatial"] = centres.astype(np.float64)
    adata.obsm["spatial_um"] = centres_um[:, :2].astype(np.float64)
    adata.obsm["X_core_tokens"] = tokens[idx].astype(np.float32)
    sdata_path = getattr(sdata, "path", None)
    adata.uns["histoexpr"] = {
        "slide_id": slide_id, "image_key": image_key, "points_key": points_key,
        "coordinate_system": cs, "gene_key": gene_col,
        "sdata_path": str(sdata_path) if sdata_path is not None else None,
        "slide_mpp": slide_mpp, "mpp": float(mpp), "tile_size": int(crop_size),
        "tile_size_um": float(crop_size * mpp), "tile_size_level0": float(size0),
        "stride": int(stride), "patch_size": int(patch_size), "patch_size_um": float(patch_size * mpp),
        "n_patches_side": int(n_side), "n_patches": int(n_patches),
        "level0_dimensions": [int(width0), int(height0)],
        "points_to_image": to_px.tolist(),
        "core_genes": core, "addon_genes": addon, "units": "log1p",
        "qv_min": None if qv_min is None else float(qv_min),
        "n_crops_grid": int(n_grid), "n_crops_low_tissue": int((~tissue_ok).sum()),
        "n_crops_low_transcripts": n_low_tx,
    }
    _add_squidpy_bridge(adata, slide, slide_id, size0)
    return adata


def _add_squidpy_bridge(adata, slide, slide_id: str, size0: float) -> None:
    thumb = slide.thumbnail(max_size=1024)
    adata.uns["spatial"] = {slide_id: {
        "images": {"hires": thumb},
        "scalefactors": {"tissue_hires_scalef": thumb.shape[1] / slide.dimensions[0],
                         "spot_diameter_fullres": float(size0)},
    }}


def core_tokens_dense(crops, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Core counts of the chosen crops as a dense ``(n, n_patches, n_core_genes)`` float32 array."""
    info = crops.uns["histoexpr"]
    tok = crops.obsm["X_core_tokens"]
    if indices is not None:
        tok = tok[np.asarray(indices)]
    tok = tok.toarray() if sparse.issparse(tok) else np.asarray(tok)
    return tok.reshape(tok.shape[0], info["n_patches"], len(info["core_genes"])).astype(np.float32)


def core_counts(crops) -> np.ndarray:
    """Core counts pooled per crop (tile level), dense ``(n_crops, n_core_genes)`` float32."""
    info = crops.uns["histoexpr"]
    n_core = len(info["core_genes"])
    tok = sparse.csr_matrix(crops.obsm["X_core_tokens"])
    summer = sparse.vstack([sparse.identity(n_core, format="csr")] * info["n_patches"]).tocsr()
    return np.asarray((tok @ summer).todense(), dtype=np.float32)


def open_crop_slide(crops, sdata=None) -> Slide:
    """The :class:`histoexpr.io.Slide` of the H&E image crops were cut from (``sdata`` or re-read from disk)."""
    from histoexpr.io import open_slide

    info = crops.uns["histoexpr"]
    if sdata is None:
        path = info.get("sdata_path")
        if not path:
            raise XeniumCropError("the crops were cut from an in-memory SpatialData; pass sdata= to read pixels")
        import spatialdata as sd

        sdata = sd.read_zarr(path)
    if info["image_key"] not in sdata.images:
        raise XeniumCropError(f"image {info['image_key']!r} of the crops is not in this SpatialData "
                              f"(images: {list(sdata.images)})")
    return open_slide(sdata, image_key=info["image_key"], mpp=info["slide_mpp"])


def xenium_crop_images(crops, *, sdata=None, indices: Sequence[int] | np.ndarray | None = None,
                       slide: Any = None) -> np.ndarray:
    """Read the H&E pixels of crops made by :func:`xenium_crops`.

    Parameters
    ----------
    crops
        The crop AnnData.
    sdata
        The SpatialData the crops were cut from (default: re-read from ``uns["histoexpr"]["sdata_path"]``).
    indices
        Positions of the crops to read (default: all).
    slide
        An already opened :class:`histoexpr.io.Slide` of the image (to avoid re-opening).

    Returns
    -------
    ``uint8`` array ``(n, crop_size, crop_size, 3)``, read from the best pyramid level and resized to
    ``mpp`` µm/px.

    Example
    -------
    >>> imgs = hx.pp.xenium_crop_images(crops, sdata=sdata, indices=[0, 1])  # doctest: +SKIP
    """
    info = crops.uns["histoexpr"]
    slide = slide if slide is not None else open_crop_slide(crops, sdata)
    idx = np.arange(crops.n_obs) if indices is None else np.asarray(indices)
    size = int(info["tile_size"])
    out = np.empty((len(idx), size, size, 3), dtype=np.uint8)
    x0, y0 = crops.obs["x0"].to_numpy(), crops.obs["y0"].to_numpy()
    for k, i in enumerate(idx):
        out[k] = slide.read_tile(float(x0[i]), float(y0[i]), float(info["tile_size_level0"]), size)
    return out


_open_crop_slide = open_crop_slide  # old private name
