"""Putting tiles and prediction tables into a SpatialData object, and writing them safely."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import UNS_KEY
from ._elements import pick_image_key

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    from anndata import AnnData
    from spatialdata import SpatialData


def tiles_to_shapes(adata: AnnData, *, size0: float | None = None) -> gpd.GeoDataFrame:
    """Square polygons of the tiles (level-0 pixel coordinates), indexed by ``tile_id``.

    Parameters
    ----------
    adata
        Tiles AnnData from :func:`histoexpr.pp.tile` (``obs`` ``x0``, ``y0``).
    size0
        Tile side in level-0 px; default ``uns["histoexpr"]["tile_size_level0"]``.
    """
    import geopandas as gpd
    import shapely

    if size0 is None:
        try:
            size0 = float(adata.uns[UNS_KEY]["tile_size_level0"])
        except KeyError as e:
            raise ValueError(
                "tiles have no uns['histoexpr']['tile_size_level0']; make them with histoexpr.pp.tile "
                "or pass size0="
            ) from e
    missing = {"x0", "y0"} - set(adata.obs.columns)
    if missing:
        raise ValueError(f"tiles AnnData lacks obs columns {sorted(missing)} (see histoexpr.pp.tile)")
    x0 = adata.obs["x0"].to_numpy(dtype=float)
    y0 = adata.obs["y0"].to_numpy(dtype=float)
    boxes = shapely.box(x0, y0, x0 + size0, y0 + size0)
    return gpd.GeoDataFrame(geometry=boxes, index=_tile_index(adata))


def add_tiles_to_spatialdata(
    sdata: SpatialData,
    adata: AnnData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    overwrite: bool = False,
) -> tuple[str, str]:
    """Add the tiles as square polygons plus an annotating table to ``sdata``.

    The polygons get the image's transformations, so they align with it in every coordinate system.
    When ``sdata`` is backed by a zarr store, both elements are written to it safely (see
    :func:`write_element_safely`).

    Parameters
    ----------
    sdata
        The SpatialData holding the H&E image.
    adata
        Tiles AnnData (:func:`histoexpr.pp.tile`).
    image_key
        The H&E image element; required when ``sdata`` has several images.
    shapes_key, table_key
        Element names; default ``"<image_key>_tiles"`` and ``"<image_key>_tiles_table"``.
    overwrite
        Replace existing elements of the same names.

    Returns
    -------
    ``(shapes_key, table_key)``.

    Examples
    --------
    >>> tiles = hx.pp.tile(sdata, image_key="he_image")  # doctest: +SKIP
    >>> sdata["he_image_tiles"], sdata["he_image_tiles_table"]  # doctest: +SKIP
    """
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    image_key = pick_image_key(sdata, image_key)
    shapes_key = shapes_key or f"{image_key}_tiles"
    table_key = table_key or f"{image_key}_tiles_table"
    _check_free(sdata, [shapes_key, table_key], overwrite=overwrite)  # before writing either element
    transformations = get_transformation(sdata.images[image_key], get_all=True)
    shapes = ShapesModel.parse(tiles_to_shapes(adata), transformations=dict(transformations))
    _put(sdata, shapes_key, shapes, overwrite=overwrite)
    add_table(sdata, adata, name=table_key, region=shapes_key, overwrite=overwrite)
    return shapes_key, table_key


def add_table(
    sdata: SpatialData,
    table: AnnData,
    *,
    name: str,
    region: str,
    instance_key: str = "tile_id",
    overwrite: bool = False,
) -> AnnData:
    """Add ``table`` to ``sdata`` as a table annotating the shapes element ``region``.

    The table is copied (the caller's object is not modified), gets ``obs["region"]`` and is parsed
    with :class:`spatialdata.models.TableModel`. Rows are matched to shapes by ``obs[instance_key]``.
    Written to disk safely when ``sdata`` is backed.

    Examples
    --------
    >>> hx.io.add_table(sdata, predictions, name="sequoia_predictions", region="he_image_tiles")  # doctest: +SKIP
    """
    from spatialdata.models import TableModel

    if region not in sdata.shapes:
        raise ValueError(f"shapes element {region!r} not in this SpatialData; shapes: {list(sdata.shapes)}")
    table = table.copy()
    if instance_key not in table.obs.columns:
        table.obs[instance_key] = table.obs_names.astype(str)
    missing = ~table.obs[instance_key].astype(str).isin(sdata.shapes[region].index.astype(str))
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} table rows have no matching shape in {region!r} "
            f"(e.g. {table.obs[instance_key][missing].iloc[0]!r}); tables must annotate existing tiles"
        )
    table.obs["region"] = region
    table.obs["region"] = table.obs["region"].astype("category")
    # Thumbnails stay in the tiles AnnData; the SpatialData image element is the image.
    table.uns.pop("spatial", None)
    table = TableModel.parse(table, region=region, region_key="region", instance_key=instance_key)
    _put(sdata, name, table, overwrite=overwrite)
    return table


def write_element_safely(sdata: SpatialData, name: str, *, overwrite: bool = True) -> dict | None:
    """Write element ``name`` of a backed ``sdata`` into its zarr store so that no crash can damage the store.

    The element is written in the store's own format (zarr v2 or v3) into a hidden staging folder
    of the store, a journal records the intent, and the element is then renamed into place
    atomically; an element of the same name on disk is swapped out in the same step and deleted
    afterwards. Consolidated metadata is kept up to date. Leftovers of an earlier interrupted write
    are finished or undone first (:func:`recover_store`). See the "Data safety" page of the docs.

    Parameters
    ----------
    sdata
        A SpatialData object; nothing is written unless it is backed by a zarr store (``sdata.path``).
    name
        The element (already in ``sdata``) to write.
    overwrite
        Replace an element of that name already in the store (otherwise raise ``ValueError``).

    Returns
    -------
    ``None`` for an in-memory ``sdata``; otherwise a report ``{"element", "replaced", "recovered"}``.

    Raises
    ------
    PermissionError
        A folder or file the write needs is read-only (checked before anything is written).
    histoexpr.io.StoreFormatError
        The store's format cannot be written by the installed spatialdata.

    Examples
    --------
    >>> sdata["my_table"] = table  # doctest: +SKIP
    >>> hx.io.write_element_safely(sdata, "my_table")  # doctest: +SKIP
    """
    from spatialdata._io._utils import _backed_elements_contained_in_path

    from ._store import write_element

    if not sdata.is_backed() or sdata.path is None:
        return None
    root = Path(sdata.path)
    element = sdata[name]
    element_type = _element_type(sdata, name)
    report = write_element(element, root, element_type=element_type, name=name, overwrite=overwrite)
    if report["replaced"] and element_type != "tables":
        # an element read lazily from the files just replaced: read it again from its new files
        with contextlib.suppress(Exception):
            if any(_backed_elements_contained_in_path(path=root / element_type / name, object=element)):
                import spatialdata

                sdata[name] = spatialdata.read_zarr(root, selection=(element_type,))[name]
    return report


# ---------------------------------------------------------------------------- internals
def _check_writable(root: Path) -> None:
    """Refuse to write into a store marked read-only (permission bits are checked even for root)."""
    from ._store import check_writable

    check_writable(root)


def _check_free(sdata, names: list[str], *, overwrite: bool) -> None:
    """Raise unless ``overwrite`` when any of ``names`` is already an element (in memory or in the store)."""
    if overwrite:
        return
    taken = _all_element_names(sdata) | _names_on_disk(sdata)
    for name in names:
        if name in taken:
            raise ValueError(
                f"element {name!r} already exists in this SpatialData; pass overwrite=True to replace it "
                "(or key_added= to write under another name)"
            )


def _put(sdata, name: str, element: Any, *, overwrite: bool) -> None:
    _check_free(sdata, [name], overwrite=overwrite)
    previous = sdata.get(name)
    sdata[name] = element
    try:
        write_element_safely(sdata, name)
    except BaseException:
        # the store was left as it was; leave the in-memory object as it was, too
        if previous is not None:
            sdata[name] = previous
        else:
            del sdata[name]
        raise


def _names_on_disk(sdata) -> set[str]:
    if not sdata.is_backed() or sdata.path is None:
        return set()
    root = Path(sdata.path)
    from ._store import ELEMENT_TYPES

    return {p.name for t in ELEMENT_TYPES if (root / t).is_dir() for p in (root / t).iterdir() if p.is_dir()}


def _all_element_names(sdata) -> set[str]:
    return {name for _, name, _ in sdata.gen_elements()}


def _element_type(sdata, name: str) -> str:
    for element_type, element_name, _ in sdata.gen_elements():
        if element_name == name:
            return element_type
    raise KeyError(name)


def _tile_index(adata) -> np.ndarray:
    ids = adata.obs["tile_id"] if "tile_id" in adata.obs.columns else adata.obs_names
    return np.asarray(ids.astype(str))
