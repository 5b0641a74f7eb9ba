"""Finding things in a SpatialData: the H&E image element and its pyramid levels.

One rule for every function that takes ``image_key=None`` (tiling, slides, Xenium crops, writers):

1. an ``image_key`` given by the caller (it must exist);
2. else the H&E image recorded by :func:`histoexpr.io.read_xenium` (``sdata.attrs["histoexpr"]["he_key"]``);
3. else the only image of the SpatialData;
4. else the only RGB image (3 channels), or the only RGB image whose name says H&E (``he``, ``h&e``);
5. else a ``ValueError`` listing the images and asking for ``image_key=``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["image_levels", "pick_image_key"]


def image_levels(element: Any) -> list:
    """The image arrays ``(c, y, x)`` of a SpatialData image element (single scale or pyramid), finest first."""
    import xarray as xr

    if isinstance(element, xr.DataTree):
        levels = []
        for name in sorted(element.children, key=lambda k: int(str(k).replace("scale", "") or 0)):
            node = element[name]
            levels.append(next(iter(node.ds.data_vars.values())))
        return levels
    return [element]


def pick_image_key(sdata: Any, image_key: str | None = None, *, error: type[Exception] = ValueError) -> str:
    """The key of the H&E image in ``sdata`` by the rule of this module; ``error`` is raised when unclear.

    Example
    -------
    >>> import numpy as np, spatialdata as sd
    >>> from spatialdata.models import Image2DModel
    >>> img = Image2DModel.parse(np.zeros((3, 8, 8), np.uint8), dims=("c", "y", "x"))
    >>> pick_image_key(sd.SpatialData(images={"he_image": img}))
    'he_image'
    """
    keys = list(sdata.images.keys())
    if image_key is not None:
        if image_key not in sdata.images:
            raise error(f"image {image_key!r} not in this SpatialData; images: {keys}")
        return image_key
    recorded = ((getattr(sdata, "attrs", None) or {}).get("histoexpr") or {}).get("he_key")
    if recorded in sdata.images:
        return recorded
    if len(keys) == 1:
        return keys[0]
    rgb = [k for k in keys if image_levels(sdata.images[k])[0].sizes.get("c") == 3]
    he = [k for k in rgb if "he" in k.lower() or "h&e" in k.lower()]
    for candidates in (rgb, he):
        if len(candidates) == 1:
            return candidates[0]
    raise error(f"cannot tell which image is the H&E: this SpatialData has images {keys}; pass image_key= "
                "to name it")
