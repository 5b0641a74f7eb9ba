"""Tissue detection on a low-resolution view of a slide."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd

    from ..io import Slide


@dataclass
class TissueMask:
    """A boolean tissue mask of a slide at low resolution.

    Attributes
    ----------
    mask
        ``(h, w)`` boolean array; ``True`` where there is tissue.
    downsample
        Level-0 pixels per mask pixel, ``(x, y)``.
    thumbnail
        The RGB image the mask was computed on.
    polygons
        Tissue regions as a :class:`geopandas.GeoDataFrame` in level-0 pixel coordinates
        (computed on first access).
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    thumbnail: np.ndarray
    _polygons: gpd.GeoDataFrame | None = field(default=None, repr=False)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area covered by tissue."""
        return float(self.mask.mean())

    @property
    def polygons(self) -> gpd.GeoDataFrame:
        if self._polygons is None:
            self._polygons = mask_to_polygons(self.mask, self.downsample)
        return self._polygons

    def fraction_in_boxes(self, x0: np.ndarray, y0: np.ndarray, size0: float) -> np.ndarray:
        """Tissue fraction of squares of side ``size0`` (level-0 px) with top-left corners ``(x0, y0)``.

        Uses a summed-area table, so any number of boxes costs one pass over the mask.
        """
        h, w = self.mask.shape
        sat = np.zeros((h + 1, w + 1), dtype=np.int64)
        sat[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        dx, dy = self.downsample
        c0 = np.clip(np.round(np.asarray(x0) / dx).astype(int), 0, w)
        r0 = np.clip(np.round(np.asarray(y0) / dy).astype(int), 0, h)
        c1 = np.clip(np.round((np.asarray(x0) + size0) / dx).astype(int), 0, w)
        r1 = np.clip(np.round((np.asarray(y0) + size0) / dy).astype(int), 0, h)
        c1 = np.maximum(c1, np.minimum(c0 + 1, w))
        r1 = np.maximum(r1, np.minimum(r0 + 1, h))
        area = np.maximum((r1 - r0) * (c1 - c0), 1)
        inside = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
        return inside / area


def tissue_mask_from_rgb(rgb: np.ndarray, *, min_channel: int = 50, n_morph: int = 3) -> np.ndarray:
    """SEQUOIA's tissue rule on an RGB image.

    A pixel is tissue when it is not above all three per-channel Otsu thresholds (i.e. not bright
    background), its HSV saturation is above the saturation Otsu threshold, and every channel is
    above ``min_channel`` (drops black pen and scanner artefacts); then ``n_morph`` dilations
    followed by ``n_morph`` erosions.
    """
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    rgb = np.asarray(rgb)[..., :3]
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    if np.ptp(rgb) == 0:  # a blank image has no Otsu threshold and no tissue
        return np.zeros(rgb.shape[:2], dtype=bool)
    above = np.ones(rgb.shape[:2], dtype=bool)
    for c in range(3):
        ch = rgb[..., c]
        above &= ch > (threshold_otsu(ch) if np.ptp(ch) > 0 else ch.max())
    sat = rgb2hsv(rgb)[..., 1]
    sat_ok = sat > (threshold_otsu(sat) if np.ptp(sat) > 0 else sat.max())
    mask = ~above & sat_ok & (rgb > min_channel).all(axis=-1)
    if n_morph:
        mask = ndimage.binary_dilation(mask, iterations=n_morph)
        mask = ndimage.binary_erosion(mask, iterations=n_morph, border_value=1)
    return mask


def detect_tissue(slide: Slide, *, max_size: int = 2048, min_channel: int = 50, n_morph: int = 3) -> TissueMask:
    """Detect tissue on a low-resolution view of ``slide``.

    Parameters
    ----------
    slide
        A :class:`~histoexpr.io.Slide` (see :func:`histoexpr.io.open_slide`).
    max_size
        Longer side, in pixels, of the view the mask is computed on; read from the pyramid, so the
        full-resolution image is never loaded.
    min_channel
        Every RGB channel must exceed this value for a pixel to be tissue.
    n_morph
        Number of dilations, then erosions, to close small gaps.

    Returns
    -------
    A :class:`TissueMask` with the mask, its downsample and tissue polygons (level-0 pixels).

    Examples
    --------
    >>> import histoexpr as hx
    >>> slide = hx.io.open_slide("cmu-1-small-region.svs")  # doctest: +SKIP
    >>> tissue = hx.pp.detect_tissue(slide)  # doctest: +SKIP
    >>> tissue.tissue_fraction, len(tissue.polygons)  # doctest: +SKIP
    """
    thumb = slide.thumbnail(max_size)
    mask = tissue_mask_from_rgb(thumb, min_channel=min_channel, n_morph=n_morph)
    w0, h0 = slide.dimensions
    downsample = (w0 / mask.shape[1], h0 / mask.shape[0])
    return TissueMask(mask=mask, downsample=downsample, thumbnail=thumb)


def mask_to_polygons(mask: np.ndarray, downsample: tuple[float, float], *, min_pixels: int = 4):
    """Connected tissue regions of ``mask`` as polygons (with holes) in level-0 pixel coordinates."""
    import geopandas as gpd
    from scipy import ndimage
    from shapely.affinity import scale
    from shapely.geometry import Polygon
    from skimage.measure import find_contours, label

    labels = label(mask, connectivity=2)
    geoms = []
    for region, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        comp = labels[box] == region
        if comp.sum() < min_pixels:
            continue
        contours = find_contours(np.pad(comp, 1).astype(np.uint8), 0.5)
        # contours pass through pixel centres; +0.5 moves them to pixel edges (level-0 = mask × ds)
        offset = np.array([box[1].start - 0.5, box[0].start - 0.5])
        rings = [Polygon(c[:, ::-1] + offset) for c in contours if len(c) >= 4]
        rings = [r for r in rings if r.is_valid and r.area > 0]
        if not rings:
            continue
        rings.sort(key=lambda r: r.area, reverse=True)
        outer = rings[0]
        holes = [r.exterior.coords for r in rings[1:] if outer.contains(r)]
        poly = Polygon(outer.exterior.coords, holes).buffer(0)
        geoms.append(scale(poly, xfact=downsample[0], yfact=downsample[1], origin=(0, 0)))
    return gpd.GeoDataFrame({"region": np.arange(len(geoms), dtype=int)}, geometry=geoms)
