"""Readers for measured spatial expression: 10x Visium, legacy Spatial Transcriptomics, 10x Xenium.

Every reader returns data in the histoexpr / scanpy conventions:

* spots (or cells) are observations, raw counts in ``X`` (sparse CSR),
* ``obsm["spatial"]``: spot centres in full-resolution image pixels, columns ``(x, y)``,
* ``uns["spatial"][library_id]``: ``images`` and ``scalefactors`` as written by Space Ranger, so
  ``sc.pl.spatial`` / ``sq.pl.spatial_scatter`` work unchanged,
* ``uns["histoexpr"]``: ``slide_id``, ``slide_path`` (full-resolution H&E, when known) and
  ``slide_mpp`` (µm per full-resolution pixel), ready for :func:`histoexpr.io.open_slide`.

Heavy libraries (scanpy, spatialdata, PIL) are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import UNS_KEY

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("histoexpr")

#: Diameter of a 10x Visium spot (µm).
VISIUM_SPOT_DIAMETER_UM = 55.0
#: Space Ranger's ``spot_diameter_fullres`` spans a theoretical 65 µm spot, not the 55 µm capture
#: area (checked on real data: it equals 0.65 × the 100 µm centre-to-centre spot distance in px).
VISIUM_SCALEFACTOR_SPOT_UM = 65.0
#: Legacy ST (1k array): 100 µm spots, 200 µm centre-to-centre along the array axes.
ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0
#: Largest side of the downsampled ``hires`` image stored in ``uns["spatial"]``.
HIRES_MAX_SIZE = 2000

_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
_SPOT_ID = re.compile(r"^\s*(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)\s*$")
#: Xenium features that are not genes (not part of ``cell_feature_matrix`` "Gene Expression").
_XENIUM_CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_Region_",
    "antisense_",
)


class ReaderError(ValueError):
    """Input files for a reader are missing, incomplete or inconsistent."""


# ============================================================================ Visium
def read_visium(
    path: str | os.PathLike,
    *,
    counts_file: str | os.PathLike | None = None,
    library_id: str | None = None,
    image_path: str | os.PathLike | None = None,
    load_images: bool = True,
) -> AnnData:
    """Read a 10x Visium Space Ranger output folder (Space Ranger 1.x and 2.x layouts).

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder: a filtered count matrix and a ``spatial/`` folder with
        ``tissue_positions_list.csv`` (Space Ranger 1.x, no header) or ``tissue_positions.csv``
        (2.x, with header) or ``tissue_positions.parquet``, and ``scalefactors_json.json``.
    counts_file
        Count matrix, relative to ``path`` or absolute: a 10x ``.h5`` file or a Matrix Market folder
        (``filtered_feature_bc_matrix/``). Default: ``filtered_feature_bc_matrix.h5``, else the one
        ``*filtered_feature_bc_matrix.h5`` in the folder (prefixed names as in GEO uploads), else the
        ``filtered_feature_bc_matrix/`` folder.
    library_id
        Key in ``uns["spatial"]``. Default: the library id stored in the ``.h5`` file, else the
        folder name.
    image_path
        Optional full-resolution H&E the spots were aligned to (not part of the Space Ranger
        output). Stored as ``uns["histoexpr"]["slide_path"]`` so the slide can be tiled with
        :func:`histoexpr.io.open_slide`; ``None`` leaves ``slide_path`` unset.
    load_images
        Load ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` (whichever exist) into
        ``uns["spatial"][library_id]["images"]``.

    Returns
    -------
    AnnData with spots as observations (only barcodes of the filtered matrix, i.e. under tissue):

    * ``X``: raw UMI counts (``float32`` CSR); ``var`` has ``gene_ids``, ``feature_types``, ``genome``;
      duplicated gene symbols are made unique (``Gm1``, ``Gm1-1``).
    * ``obs``: ``in_tissue``, ``array_row``, ``array_col``.
    * ``obsm["spatial"]``: spot centres ``(x, y)`` in full-resolution pixels.
    * ``uns["spatial"][library_id]``: ``images``, ``scalefactors``, ``metadata``.
    * ``uns["histoexpr"]``: ``slide_id``, ``slide_mpp`` (= 65 µm / ``spot_diameter_fullres``, the
      theoretical 65 µm spot Space Ranger measures it on; spots are 100 µm apart),
      ``slide_path`` (only when ``image_path`` is given), ``technology="visium"``, ``spot_diameter_um=55``.

    With only a low-resolution image (as in some Space Ranger 1.0 uploads) ``images`` has just
    ``"lowres"``: pass ``img_res_key="lowres"`` to ``squidpy.pl.spatial_scatter``.

    Examples
    --------
    >>> import histoexpr as hx
    >>> adata = hx.io.read_visium("Vis5A_2dpi")  # doctest: +SKIP
    >>> adata.shape, round(adata.uns["histoexpr"]["slide_mpp"], 3)  # doctest: +SKIP
    ((982, 33217), 0.361)
    """
    import scanpy as sc

    folder = _existing_dir(path, what="Space Ranger output folder")
    spatial_dir = folder / "spatial"
    if not spatial_dir.is_dir():
        raise ReaderError(
            f"{folder} has no 'spatial/' folder. read_visium needs the Space Ranger 'outs' folder with "
            "spatial/tissue_positions_list.csv (or tissue_positions.csv) and spatial/scalefactors_json.json."
        )
    counts_path = _find_visium_counts(folder, counts_file)
    positions_path = _find_visium_positions(spatial_dir)
    scalefactors_path = spatial_dir / "scalefactors_json.json"
    if not scalefactors_path.is_file():
        raise ReaderError(f"missing {scalefactors_path}: it holds spot_diameter_fullres and the image scales.")

    h5_attrs: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not unique.*")
        if counts_path.is_dir():
            adata = sc.read_10x_mtx(counts_path, var_names="gene_symbols", cache=False, gex_only=True)
        else:
            adata = sc.read_10x_h5(counts_path, gex_only=True)
            h5_attrs = _h5_attrs(counts_path)
    adata.var_names_make_unique()
    if library_id is None:
        ids = h5_attrs.get("library_ids")
        library_id = str(ids[0]) if ids else folder.name

    positions = _read_visium_positions(positions_path)
    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        raise ReaderError(
            f"{len(missing)} of {adata.n_obs} barcodes of {counts_path.name} are not in {positions_path.name} "
            f"(first: {list(missing[:3])}); the count matrix and the spatial folder belong to different runs."
        )
    positions = positions.loc[adata.obs_names]
    adata.obs = adata.obs.join(positions[["in_tissue", "array_row", "array_col"]])
    adata.obsm["spatial"] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    scalefactors = json.loads(scalefactors_path.read_text())
    spot_diameter = float(scalefactors.get("spot_diameter_fullres", float("nan")))
    if not (spot_diameter > 0):
        raise ReaderError(f"{scalefactors_path} has no positive 'spot_diameter_fullres'; cannot derive µm/px.")
    images = {}
    if load_images:
        for res in ("hires", "lowres"):
            img_file = spatial_dir / f"tissue_{res}_image.png"
            if img_file.is_file():
                images[res] = _read_rgb(img_file)
        if not images:
            warnings.warn(f"no tissue_hires_image.png / tissue_lowres_image.png in {spatial_dir}; "
                          "uns['spatial'] has no images.", UserWarning, stacklevel=2)
    metadata = {k: str(h5_attrs[k]) for k in ("chemistry_description", "software_version") if k in h5_attrs}
    adata.uns["spatial"] = {library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}}
    adata.uns[UNS_KEY] = {
        "slide_id": library_id,
        "slide_mpp": VISIUM_SCALEFACTOR_SPOT_UM / spot_diameter,
        "technology": "visium",
        "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM,
        "units": "counts",
    }
    if image_path is not None:  # left out otherwise: AnnData cannot write None into uns
        adata.uns[UNS_KEY]["slide_path"] = str(_abs_path(image_path, what="image_path"))
    return adata


def _find_visium_counts(folder: Path, counts_file: str | os.PathLike | None) -> Path:
    if counts_file is not None:
        p = Path(counts_file).expanduser()
        p = p if p.is_absolute() else folder / p
        if not p.exists():
            raise ReaderError(f"counts_file not found: {p}")
        return p
    default = folder / "filtered_feature_bc_matrix.h5"
    if default.is_file():
        return default
    prefixed = sorted(folder.glob("*filtered_feature_bc_matrix.h5"))
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        raise ReaderError(f"several count matrices in {folder}: {[p.name for p in prefixed]}; pass counts_file=.")
    mtx = folder / "filtered_feature_bc_matrix"
    if mtx.is_dir():
        return mtx
    raise ReaderError(
        f"no filtered count matrix in {folder}: expected filtered_feature_bc_matrix.h5 (or <prefix>_"
        "filtered_feature_bc_matrix.h5, or the filtered_feature_bc_matrix/ folder). Pass counts_file= "
        "if it has another name."
    )


def _find_visium_positions(spatial_dir: Path) -> Path:
    for name in ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"):
        if (spatial_dir / name).is_file():
            return spatial_dir / name
    raise ReaderError(
        f"no spot positions in {spatial_dir}: expected tissue_positions_list.csv (Space Ranger 1.x), "
        "tissue_positions.csv (2.x) or tissue_positions.parquet."
    )


def _read_visium_positions(path: Path) -> pd.DataFrame:
    import pandas as pd

    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        # Space Ranger 1.x writes no header; 2.x writes one. Decide from the first line.
        first = path.open().readline()
        has_header = "barcode" in first
        df = pd.read_csv(path, header=0 if has_header else None)
    if df.shape[1] != len(_POSITION_COLUMNS):
        raise ReaderError(f"{path} has {df.shape[1]} columns; expected {len(_POSITION_COLUMNS)}: {_POSITION_COLUMNS}")
    df.columns = _POSITION_COLUMNS
    return df.set_index("barcode")


def _h5_attrs(path: Path) -> dict[str, Any]:
    import h5py

    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, np.ndarray) and value.dtype.kind == "S":
                value = [v.decode() for v in value]
            out[key] = value
    return out


# ============================================================================ legacy ST
def read_st(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike,
    *,
    mpp: float | None = None,
    spot_pitch_um: float | None = None,
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
    library_id: str | None = None,
    hires_max_size: int = HIRES_MAX_SIZE,
) -> AnnData:
    """Read legacy Spatial Transcriptomics data: counts table + spot-detector table + H&E image.

    Reads the layout of the ST spot detector / ST Pipeline used by the HER2+ breast cancer study
    (``<s>.tsv.gz`` + ``<s>_selection.tsv`` + ``<s>_HE.jpg``) and by STUtility's examples
    (``MOB1.tsv`` + ``alignment_table_MOB1.tsv`` + ``MOB1.jpg``). The layout is detected from the
    files: the counts may be spots × genes or genes × spots (spot ids ``"<x>x<y>"``), plain or
    gzipped; the spot table needs the columns ``x``, ``y``, ``pixel_x`` (column) and ``pixel_y``
    (row) in pixels of ``image``; when it has a ``selected`` column only spots with
    ``selected == 1`` (under tissue) are kept. Spots with counts that the spot table does not list
    at all mean the files disagree: more than 2 % of them gives a warning with the number dropped,
    more than half a :class:`ReaderError` (the spot table of another section).

    Parameters
    ----------
    counts
        Tab-separated counts; spot ids ``"<x>x<y>"`` (array coordinates, integers or adjusted
        floats, matched to the spot table after rounding).
    spots
        Tab-separated spot table (``x, y, [new_x, new_y,] pixel_x, pixel_y[, selected]``).
    image
        The full-resolution H&E the pixel coordinates refer to: JPEG/PNG (read with PIL; JPEGs are
        decoded at reduced size for the thumbnail) or any slide :func:`histoexpr.io.open_slide` reads
        (SVS, pyramidal TIFF; read lazily).
    mpp
        µm per image pixel. Default: from the slide metadata for SVS/TIFF images that have it, else
        estimated from the spot lattice as
        ``spot_pitch_um / (pixel distance between nearest neighbouring spots)``, where the pixel
        distance comes from a least-squares fit of pixel positions on array coordinates (robust to
        the per-spot jitter of adjusted positions); a warning states the estimate.
    spot_pitch_um
        Centre-to-centre distance (µm) between nearest neighbouring spots, used only to estimate
        ``mpp``. Default: 200 µm when spots fill a square grid of array coordinates (1k array), and
        200/√2 ≈ 141 µm when they sit on a checkerboard (``x + y`` always even: the 2k array, whose
        array units are 100 µm).
    spot_diameter_um
        Spot diameter (µm), for ``scalefactors["spot_diameter_fullres"]``.
    library_id
        Key in ``uns["spatial"]`` and ``uns["histoexpr"]["slide_id"]``. Default: the counts file
        name without ``.tsv``/``.gz``.
    hires_max_size
        Largest side (px) of the downsampled image stored as ``images["hires"]``.

    Returns
    -------
    AnnData with spots (present in both tables, under tissue) as observations:

    * ``X``: raw counts, ``float32`` CSR; ``var_names`` as in the counts file.
    * ``obs``: ``x``, ``y`` (array coordinates), ``array_col`` (= x), ``array_row`` (= y),
      ``pixel_x``, ``pixel_y``, plus ``new_x``/``new_y`` when present; ``obs_names`` ``"<x>x<y>"``.
    * ``obsm["spatial"]``: ``(pixel_x, pixel_y)`` in full-resolution image pixels.
    * ``uns["spatial"][library_id]``: ``images["hires"]`` (≤ ``hires_max_size`` px) and
      ``scalefactors`` (``tissue_hires_scalef``, ``spot_diameter_fullres`` = diameter / mpp).
    * ``uns["histoexpr"]``: ``slide_id``, ``slide_path`` (absolute image path), ``slide_mpp``,
      ``mpp_source`` (``"given"``, ``"slide metadata"`` or ``"estimated from spot lattice"``), ``spot_pitch_um``,
      ``spot_diameter_um``, ``technology="legacy_st"``.

    Examples
    --------
    >>> import histoexpr as hx
    >>> adata = hx.io.read_st("her2st/C2.tsv.gz", "her2st/C2_selection.tsv", "her2st/C2_HE.jpg")  # doctest: +SKIP
    >>> adata.shape, round(adata.uns["histoexpr"]["slide_mpp"], 2)  # doctest: +SKIP
    ((187, 15706), 0.69)
    >>> slide = hx.io.open_slide(adata.uns["histoexpr"]["slide_path"],
    ...                          mpp=adata.uns["histoexpr"]["slide_mpp"])  # doctest: +SKIP
    """
    import pandas as pd
    import scipy.sparse as sp
    from anndata import AnnData

    counts_path = _abs_path(counts, what="counts file")
    spots_path = _abs_path(spots, what="spot table")
    image_path = _abs_path(image, what="H&E image")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise ReaderError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    if library_id is None:
        library_id = re.sub(r"(\.tsv|\.txt|\.csv)?(\.gz)?$", "", counts_path.name)

    table = _read_st_counts(counts_path)
    spot_table, listed = _read_st_spots(spots_path)
    keep = spot_table.index.intersection(table.index)
    if len(keep) == 0:
        raise ReaderError(
            f"no spot of {counts_path.name} (ids like {list(table.index[:3])}) is in {spots_path.name} "
            f"(ids like {list(spot_table.index[:3])}, selected spots only): the files belong to different sections."
        )
    counted = table.index
    spot_table = spot_table.loc[keep]
    table = table.loc[keep]

    image_reader = _StImage(image_path)
    width, height = image_reader.size
    px = spot_table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    if (px[:, 0].max() > width * 1.02) or (px[:, 1].max() > height * 1.02) or (px.min() < -0.02 * max(width, height)):
        raise ReaderError(
            f"spot pixel coordinates (x up to {px[:, 0].max():.0f}, y up to {px[:, 1].max():.0f}) fall outside "
            f"{image_path.name} ({width} × {height} px): the spot table refers to another image or resolution."
        )
    _check_st_spot_agreement(counted, listed, keep, counts_path, spots_path)

    mpp_source = "given"
    lattice_pitch_um = spot_pitch_um
    if mpp is None and image_reader.file_mpp is not None:
        mpp, mpp_source = image_reader.file_mpp, "slide metadata"
    if mpp is None:
        mpp, lattice_pitch_um, pitch_px = _estimate_st_mpp(spot_table, spot_pitch_um)
        mpp_source = "estimated from spot lattice"
        msg = (f"{library_id}: mpp not given; estimated {mpp:.4f} µm/px from the spot lattice "
               f"({pitch_px:.1f} px between neighbouring spots = {lattice_pitch_um:.1f} µm). Pass mpp= if known.")
        logger.info(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)

    X = sp.csr_matrix(table.to_numpy(dtype=np.float32))
    obs = pd.DataFrame(index=pd.Index(keep.astype(str), name=None))
    obs["x"] = spot_table["x"].to_numpy().astype(int)
    obs["y"] = spot_table["y"].to_numpy().astype(int)
    obs["array_col"] = obs["x"]
    obs["array_row"] = obs["y"]
    for col in ("new_x", "new_y", "pixel_x", "pixel_y"):
        if col in spot_table:
            obs[col] = spot_table[col].to_numpy(dtype=np.float64)
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=table.columns.astype(str)))
    adata.obsm["spatial"] = px

    hires, scalef = image_reader.downsampled(hires_max_size)
    adata.uns["spatial"] = {
        library_id: {
            "images": {"hires": hires},
            "scalefactors": {
                "tissue_hires_scalef": scalef,
                "spot_diameter_fullres": spot_diameter_um / mpp,
            },
            "metadata": {"source_image_path": str(image_path)},
        }
    }
    adata.uns[UNS_KEY] = {
        "slide_id": library_id,
        "slide_path": str(image_path),
        "slide_mpp": float(mpp),
        "mpp_source": mpp_source,
        "technology": "legacy_st",
        "spot_diameter_um": float(spot_diameter_um),
        "units": "counts",
    }
    if lattice_pitch_um is not None:
        adata.uns[UNS_KEY]["spot_pitch_um"] = float(lattice_pitch_um)
    return adata


def _read_st_counts(path: Path) -> pd.DataFrame:
    import pandas as pd

    df = pd.read_csv(path, sep="\t", index_col=0)
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    if not _looks_like_spot_ids(df.index):
        if _looks_like_spot_ids(df.columns):
            df = df.T
        else:
            raise ReaderError(
                f"{path}: neither the rows ({list(df.index[:3])}) nor the columns ({list(df.columns[:3])}) "
                "are spot ids '<x>x<y>'. Expected a spots × genes (or genes × spots) count table."
            )
    if df.index.duplicated().any():
        raise ReaderError(f"{path}: duplicated spot ids {list(df.index[df.index.duplicated()][:3])}.")
    coords = df.index.str.extract(_SPOT_ID).astype(float).round().astype(int)
    df.index = pd.Index(coords[0].astype(str) + "x" + coords[1].astype(str))
    if df.index.duplicated().any():
        raise ReaderError(f"{path}: spot ids collide after rounding to array coordinates.")
    non_numeric = [c for c, t in df.dtypes.items() if not np.issubdtype(t, np.number)]
    if non_numeric:
        raise ReaderError(f"{path}: non-numeric count columns {non_numeric[:3]}.")
    return df


def _looks_like_spot_ids(index: pd.Index) -> bool:
    sample = index[: min(len(index), 50)]
    return len(sample) > 0 and all(_SPOT_ID.match(str(s)) for s in sample)


def _read_st_spots(path: Path) -> pd.DataFrame:
    import pandas as pd

    df = pd.read_csv(path, sep="\t")
    df.columns = [str(c).strip() for c in df.columns]
    required = ["x", "y", "pixel_x", "pixel_y"]
    missing = [c for c in required if c not in df]
    if missing:
        raise ReaderError(
            f"{path}: spot table lacks columns {missing} (has {list(df.columns)}). Expected the ST spot "
            "detector output: x, y, [new_x, new_y,] pixel_x, pixel_y[, selected]."
        )
    df = df.dropna(subset=required)
    df.index = pd.Index(df["x"].round().astype(int).astype(str) + "x" + df["y"].round().astype(int).astype(str))
    listed = df.index  # every spot the table knows, selected or not
    if "selected" in df:
        df = df[df["selected"].astype(int) == 1]
    if df.index.duplicated().any():
        raise ReaderError(f"{path}: duplicated array coordinates {list(df.index[df.index.duplicated()][:3])}.")
    return df, listed


#: read_st warns when more than this fraction of the counts file's spots are missing from the spot table
#: (a few spots at the array's edge are common: STUtility's MOB1 lists 1923 of its 1934 spots, 0.6 %)
#: and raises when more than the second fraction are (another section's table).
ST_WARN_UNLISTED_FRACTION, ST_MAX_UNLISTED_FRACTION = 0.02, 0.5


def _check_st_spot_agreement(counted: pd.Index, listed: pd.Index, keep: pd.Index, counts_path: Path,
                             spots_path: Path) -> None:
    """Spots with counts that the spot table does not list at all mean the two files disagree.

    Spots listed but not ``selected`` are dropped on purpose (outside the tissue) and not counted
    here. Matching sections of the HER2+ study lose 0 spots this way, STUtility's MOB1 0.6 %
    (edge spots); another section's table loses most of them (C2 counts with C3's table: 155 of 187).
    """
    unlisted = counted.difference(listed)
    if len(unlisted) <= ST_WARN_UNLISTED_FRACTION * len(counted):
        return
    msg = (
        f"{len(unlisted)} of the {len(counted)} spots in {counts_path.name} (e.g. {list(unlisted[:5])}) are not in "
        f"{spots_path.name} at all, so only {len(keep)} spots are kept"
    )
    if len(unlisted) > ST_MAX_UNLISTED_FRACTION * len(counted):
        raise ReaderError(
            msg + ": the spot table most likely belongs to another section. Pass the spot table (and image) of "
            f"the same section as {counts_path.name}."
        )
    warnings.warn(
        msg + ". Check that the spot table belongs to the same section as the counts; the missing spots are dropped.",
        UserWarning,
        stacklevel=3,
    )


def _estimate_st_mpp(spot_table: pd.DataFrame, spot_pitch_um: float | None) -> tuple[float, float, float]:
    """µm/px from the spot lattice: returns (mpp, pitch_um, pitch_px)."""
    from scipy.spatial import cKDTree

    xy_array = spot_table[["x", "y"]].to_numpy(dtype=np.float64)
    xy_px = spot_table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    if len(xy_px) < 3:
        raise ReaderError("fewer than 3 spots: cannot estimate µm/px from the spot lattice; pass mpp=.")
    parity = (np.round(xy_array).astype(int).sum(axis=1)) % 2
    checkerboard = bool(np.all(parity == parity[0]))
    neighbour_units = math.sqrt(2.0) if checkerboard else 1.0
    if spot_pitch_um is None:
        spot_pitch_um = ST_SPOT_PITCH_UM / neighbour_units
    design = np.column_stack([xy_array, np.ones(len(xy_array))])
    coef, *_ = np.linalg.lstsq(design, xy_px, rcond=None)
    det = abs(float(np.linalg.det(coef[:2])))
    if det > 0 and np.linalg.matrix_rank(design) == 3:
        pitch_px = math.sqrt(det) * neighbour_units
    else:  # spots on one line: fall back to the median nearest-neighbour distance
        dist, _ = cKDTree(xy_px).query(xy_px, k=2)
        pitch_px = float(np.median(dist[:, 1]))
    if not (pitch_px > 0):
        raise ReaderError("spot pixel positions are degenerate; cannot estimate µm/px. Pass mpp=.")
    return float(spot_pitch_um) / pitch_px, float(spot_pitch_um), pitch_px


# ============================================================================ Xenium
def read_xenium(
    path: str | os.PathLike | SpatialData,
    *,
    table_key: str = "table",
    points_key: str | None = None,
    he_key: str | None = None,
) -> SpatialData:
    """Read a Xenium SpatialData zarr and check that it is usable with H&E.

    The zarr is read with :func:`spatialdata.read_zarr` (lazily; nothing on disk is changed). Then:

    * **Table repair.** When the table lost its ``var`` (gene names read back as ``"0"``, ``"1"``, …),
      the gene names are rebuilt from the transcripts: the ``feature_name`` categories of the points
      minus Xenium's control features (``NegControlProbe_``, ``NegControlCodeword_``, ``BLANK_``,
      ``UnassignedCodeword_``, ``DeprecatedCodeword_``, ``Intergenic_Region_``, ``antisense_``), in
      the points' category order, which is the order of Xenium's ``cell_feature_matrix``. Their
      number must equal the table's columns. The repaired table is a copy placed in the returned
      object only.
    * **H&E check.** An RGB image element (``he_key``, else the one 3-channel ``uint8`` image whose
      channels are named r, g, b or whose name says H&E, e.g. ``he_image``) must
      have a transformation to a coordinate system of the transcripts; otherwise a
      :class:`ReaderError` says what is missing.

    Parameters
    ----------
    path
        The ``.zarr`` folder written by ``spatialdata-io``'s Xenium reader (plus an aligned H&E), or
        an already loaded :class:`spatialdata.SpatialData` (checked and repaired the same way; its
        table is replaced by a repaired copy when the gene names are lost).
    table_key
        Table element with the cells × genes counts.
    points_key
        Transcripts element; default: the only points element.
    he_key
        H&E image element; default: the one RGB ``uint8`` image named like H&E or with r, g, b channels.

    Returns
    -------
    A :class:`spatialdata.SpatialData` (the one read from ``path``; for a SpatialData input, a new
    object sharing its elements, so the input is left untouched) whose ``attrs["histoexpr"]``
    records ``he_key``, ``points_key``, ``table_key``, ``gene_column``, ``coordinate_system``
    (shared by H&E and transcripts), ``um_per_unit`` (µm per unit of that system; transcripts are
    stored in µm, so this is the inverse scale of their transformation — Xenium's ``"global"``
    system is often in morphology pixels of 0.2125 µm, not µm), ``he_mpp`` (µm per H&E level-0
    pixel), ``var_rebuilt`` and, when rebuilt, ``var_check_r``.

    Open the H&E with its physical scale via
    ``hx.io.open_slide(sdata, image_key=info["he_key"], mpp=info["he_mpp"])``.

    Examples
    --------
    >>> import histoexpr as hx
    >>> sdata = hx.io.read_xenium("xenium_sp_subset.zarr")  # doctest: +SKIP
    >>> info = sdata.attrs["histoexpr"]  # doctest: +SKIP
    >>> info["he_key"], info["coordinate_system"], round(info["he_mpp"], 3)  # doctest: +SKIP
    ('he_image', 'global', 0.364)
    """
    import pandas as pd
    import spatialdata as sd

    if isinstance(path, sd.SpatialData):
        # A new container sharing the (lazy) elements: repairs and metadata never touch the input.
        sdata = sd.SpatialData(images=dict(path.images), labels=dict(path.labels), points=dict(path.points),
                               shapes=dict(path.shapes), tables=dict(path.tables), attrs=dict(path.attrs))
        sdata.path = path.path
        zarr_path = path.path if path.path is not None else Path("<in-memory SpatialData>")
    else:
        zarr_path = _existing_dir(path, what="Xenium SpatialData zarr")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not stored in the most current format.*")
                sdata = sd.read_zarr(zarr_path)
        except Exception as err:  # re-raised with context
            raise ReaderError(f"cannot read {zarr_path} as a SpatialData zarr: {err}") from err

    points_key = _pick_element(sdata.points, points_key, what="points (transcripts)", path=zarr_path)
    points = sdata.points[points_key]
    gene_col = next((c for c in ("feature_name", "gene", "target") if c in points.columns), None)
    if gene_col is None:
        raise ReaderError(f"transcripts '{points_key}' have no feature_name/gene column (columns: {list(points.columns)}).")
    if table_key not in sdata.tables:
        raise ReaderError(f"no table '{table_key}' in {zarr_path} (tables: {list(sdata.tables)}).")

    table = sdata.tables[table_key]
    var_rebuilt = _var_is_lost(table)
    if var_rebuilt:
        table = table.copy()
        table.var = pd.DataFrame(index=pd.Index(_xenium_genes(points, gene_col, table.n_vars, zarr_path)))
        table.var["feature_types"] = "Gene Expression"
        sdata.tables[table_key] = table
        check_r = _gene_order_check(table, points, gene_col)
        if not (check_r > 0.9):
            warnings.warn(
                f"{zarr_path}: rebuilt gene names agree poorly with the transcripts (Pearson r = {check_r:.2f} "
                "between per-gene table totals and transcript counts); the gene order may be wrong.",
                UserWarning, stacklevel=2,
            )

    he_key = _pick_he_image(sdata, he_key, zarr_path)
    cs, um_per_unit, he_mpp = _check_he_alignment(sdata, he_key, points_key, zarr_path)
    sdata.attrs[UNS_KEY] = {
        **dict(sdata.attrs.get(UNS_KEY, {})),
        "he_key": he_key,
        "points_key": points_key,
        "table_key": table_key,
        "gene_column": gene_col,
        "coordinate_system": cs,
        "um_per_unit": um_per_unit,
        "he_mpp": he_mpp,
        "var_rebuilt": var_rebuilt,
        **({"var_check_r": check_r} if var_rebuilt else {}),
        "technology": "xenium",
    }
    return sdata


def _var_is_lost(table) -> bool:
    names = table.var_names
    return table.var.shape[1] == 0 and list(names) == [str(i) for i in range(table.n_vars)]


def _xenium_genes(points, gene_col: str, n_vars: int, path: Path) -> list[str]:
    import pandas as pd

    col = points[gene_col]
    if isinstance(col.dtype, pd.CategoricalDtype):
        # The parquet dictionary holds the whole panel, also genes without a transcript in this crop.
        known = col.cat.as_known() if hasattr(col.cat, "as_known") else col
        names = [str(c) for c in known.cat.categories]
    else:
        values = col.unique()
        names = sorted(str(c) for c in (values.compute() if hasattr(values, "compute") else values))
    genes = [n for n in names if not n.startswith(_XENIUM_CONTROL_PREFIXES)]
    if len(genes) != n_vars:
        raise ReaderError(
            f"{path}: the table lost its gene names and the transcripts list {len(genes)} non-control "
            f"features for {n_vars} table columns; cannot rebuild var. Re-export the table from the Xenium "
            "output (cell_feature_matrix)."
        )
    return genes


def _gene_order_check(table, points, gene_col: str) -> float:
    """Pearson r between per-gene table totals and per-gene counts of cell-assigned, Q20 transcripts."""
    import scipy.sparse as sp

    cols = [gene_col] + [c for c in ("qv", "cell_id") if c in points.columns]
    df = points[cols]
    df = df.compute() if hasattr(df, "compute") else df
    keep = np.ones(len(df), dtype=bool)
    if "qv" in df:
        keep &= df["qv"].to_numpy() >= 20  # Xenium counts only Q20 transcripts
    if "cell_id" in df:
        cell = df["cell_id"]
        keep &= ~cell.isin([-1, "UNASSIGNED", ""]).to_numpy()
    observed = df.loc[keep, gene_col].astype(str).value_counts().reindex(table.var_names, fill_value=0)
    totals = np.asarray(table.X.sum(axis=0)).ravel() if sp.issparse(table.X) else np.asarray(table.X).sum(axis=0)
    if observed.std() == 0 or totals.std() == 0:
        return float("nan")
    return float(np.corrcoef(totals, observed.to_numpy(dtype=float))[0, 1])


def _pick_element(elements, key: str | None, *, what: str, path: Path) -> str:
    keys = list(elements)
    if key is not None:
        if key not in elements:
            raise ReaderError(f"no {what} element '{key}' in {path} (available: {keys}).")
        return key
    if len(keys) != 1:
        raise ReaderError(f"{path} has {len(keys)} {what} elements ({keys}); pass the key explicitly.")
    return keys[0]


def _pick_he_image(sdata, he_key: str | None, path: Path) -> str:
    """The H&E: ``he_key``, else the one 3-channel uint8 image whose channels are named r, g, b or whose
    name says H&E (``he``, ``h&e``, ``hne``) — a 3-channel uint8 immunofluorescence image is not taken."""
    from spatialdata.models import get_axes_names

    if he_key is not None:
        if he_key not in sdata.images:
            raise ReaderError(f"no image '{he_key}' in {path} (images: {list(sdata.images)}).")
        return he_key
    rgb, candidates = [], []
    for key in sdata.images:
        level0 = _image_level0(sdata.images[key])
        if "c" in get_axes_names(level0) and level0.sizes["c"] == 3 and level0.dtype == np.uint8:
            rgb.append(key)
            channels = [str(c).lower() for c in level0.coords["c"].values] if "c" in level0.coords else []
            he_name = re.search(r"(^|_)(he|h&e|hne)(_|$)", key.lower()) is not None
            if channels == ["r", "g", "b"] or he_name:
                candidates.append(key)
    if len(candidates) == 1:
        return candidates[0]
    raise ReaderError(
        f"{path}: cannot tell which image is the H&E (3-channel uint8 images: {rgb or 'none'}; H&E-like by "
        f"name or r/g/b channels: {candidates or 'none'}; all images: {list(sdata.images)}). Add the aligned "
        "H&E image element, or pass he_key=."
    )


def _image_level0(element):
    if hasattr(element, "children") and "scale0" in getattr(element, "children", {}):
        return next(iter(element["scale0"].ds.data_vars.values()))
    return element


def _check_he_alignment(sdata, he_key: str, points_key: str, path: Path) -> tuple[str, float, float]:
    from spatialdata.transformations import get_transformation

    he_cs = get_transformation(sdata.images[he_key], get_all=True)
    pt_cs = get_transformation(sdata.points[points_key], get_all=True)
    shared = [cs for cs in pt_cs if cs in he_cs]
    if not shared:
        raise ReaderError(
            f"{path}: the H&E image '{he_key}' (coordinate systems {list(he_cs)}) has no transformation to "
            f"a coordinate system of the transcripts '{points_key}' ({list(pt_cs)}). Align the H&E first "
            "(e.g. spatialdata-io xenium_aligned_image with the alignment matrix) and add the transformation."
        )
    cs = "global" if "global" in shared else shared[0]
    points_scale = _linear_scale(pt_cs[cs])
    he_scale = _linear_scale(he_cs[cs])
    um_per_unit = 1.0 / points_scale  # transcripts are stored in µm (Xenium convention)
    return cs, float(um_per_unit), float(he_scale * um_per_unit)


def _linear_scale(transformation) -> float:
    """Isotropic scale (units of the target system per unit of the element) of a transformation in x, y."""
    matrix = np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
    return math.sqrt(abs(float(np.linalg.det(matrix[:2, :2]))))


# ============================================================================ shared helpers
def _abs_path(p: str | os.PathLike, *, what: str) -> Path:
    path = Path(p).expanduser().resolve()
    if not path.exists():
        raise ReaderError(f"{what} not found: {path}")
    return path


def _existing_dir(p: str | os.PathLike, *, what: str) -> Path:
    path = _abs_path(p, what=what)
    if not path.is_dir():
        raise ReaderError(f"{what} must be a folder, got the file {path}")
    return path


def _open_image(path: Path):
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # H&E scans legitimately exceed PIL's bomb limit
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


class _StImage:
    """Size, metadata µm/px and a thumbnail of an ST image, without decoding a large image in full."""

    _PIL_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}

    def __init__(self, path: Path):
        self.path = path
        self.file_mpp: float | None = None
        self._slide = None
        if path.suffix.lower() in self._PIL_SUFFIXES:
            try:
                with _open_image(path) as im:
                    self.size = im.size
            except Exception as err:
                raise ReaderError(f"cannot read image {path}: {err}") from err
        else:
            from ._slide import SlideError, open_slide

            try:
                self._slide = open_slide(path)
                self.file_mpp = self._slide.mpp
            except SlideError:
                try:  # readable, but without µm/px in the metadata: the size is all we need here
                    self._slide = open_slide(path, mpp=1.0)
                except SlideError as err:
                    raise ReaderError(f"cannot read image {path}: {err}") from err
            self.size = tuple(self._slide.dimensions)

    def downsampled(self, max_size: int) -> tuple[np.ndarray, float]:
        if self._slide is not None:
            try:
                thumb = np.asarray(self._slide.thumbnail(max_size=max_size))[..., :3].astype(np.uint8)
            finally:
                self._slide.close()
            return thumb, thumb.shape[1] / self.size[0]
        return _downsampled_image(self.path, max_size)


def _read_rgb(path: Path) -> np.ndarray:
    with _open_image(path) as im:
        return np.asarray(im.convert("RGB"))


def _downsampled_image(path: Path, max_size: int) -> tuple[np.ndarray, float]:
    """RGB uint8 image with its larger side ≤ ``max_size`` and the scale factor (small / full)."""
    from PIL import Image

    with _open_image(path) as im:
        full_w, full_h = im.size
        scale = min(1.0, max_size / max(full_w, full_h))
        target = (max(1, round(full_w * scale)), max(1, round(full_h * scale)))
        if im.format == "JPEG":
            im.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 size: fast and memory-light
        im = im.convert("RGB")
        if im.size != target:
            im = im.resize(target, Image.Resampling.LANCZOS)
        arr = np.asarray(im)
    return arr, arr.shape[1] / full_w
