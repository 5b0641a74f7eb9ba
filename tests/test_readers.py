"""Readers for measured data (Visium, legacy ST, Xenium) on the real samples in ../shared/data."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from skimage.color import rgb2gray
from skimage.filters import gaussian, threshold_otsu

from histoexpr.io import ReaderError, read_st, read_visium, read_xenium

HER2ST_SECTIONS = ["C2", "C3", "C4", "B4"]
XENIUM = Path("xenium_segtraq/tests/data/xenium_sp_subset.zarr")
VISIUM = Path("visium_scmuscle/Vis5A_2dpi")


# ---------------------------------------------------------------------------- helpers
def tissue_mask(image: np.ndarray, spot_radius_px: float) -> np.ndarray:
    """Independent tissue mask: Otsu on the grey image smoothed at the spot scale (tissue is darker).

    Computed on every 4th pixel when the image is large and expanded back, for speed."""
    step = 4 if max(image.shape[:2]) > 1000 else 1
    grey = gaussian(rgb2gray(image[::step, ::step]), sigma=max(spot_radius_px / step, 1.0))
    mask = grey < threshold_otsu(grey)
    return np.repeat(np.repeat(mask, step, axis=0), step, axis=1)[: image.shape[0], : image.shape[1]]


def fraction_on_tissue(mask: np.ndarray, xy: np.ndarray) -> float:
    ij = np.clip(np.round(xy).astype(int), 0, np.array(mask.shape[::-1]) - 1)
    return float(mask[ij[:, 1], ij[:, 0]].mean())


def median_neighbour_px(table: pd.DataFrame, step: tuple[int, int]) -> float:
    """Brute force over all pairs: median pixel distance of spots exactly ``step`` apart in array coordinates."""
    xy = table[["x", "y"]].to_numpy(int)
    px = table[["pixel_x", "pixel_y"]].to_numpy(float)
    delta = np.abs(xy[:, None, :] - xy[None, :, :])
    is_step = ((delta[..., 0] == step[0]) & (delta[..., 1] == step[1])) | (
        (delta[..., 0] == step[1]) & (delta[..., 1] == step[0])
    )
    dist = np.linalg.norm(px[:, None, :] - px[None, :, :], axis=-1)
    return float(np.median(dist[is_step]))


def st_files(root: Path, section: str) -> tuple[Path, Path, Path]:
    if section == "MOB1":
        d = root / "st_stutility_mob"
        return d / "MOB1.tsv", d / "alignment_table_MOB1.tsv", d / "MOB1.jpg"
    d = root / "her2st"
    return d / f"{section}.tsv.gz", d / f"{section}_selection.tsv", d / f"{section}_HE.jpg"


@pytest.fixture(scope="module")
def her2st_adata(shared_data):
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for s in HER2ST_SECTIONS:
            out[s] = read_st(*st_files(shared_data, s))
    return out


@pytest.fixture(scope="module")
def mob_adata(shared_data):
    with pytest.warns(UserWarning, match="estimated"):
        return read_st(*st_files(shared_data, "MOB1"))


# ============================================================================ legacy ST
@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_read_st_her2st_counts_and_coordinates(shared_data, her2st_adata, section):
    adata = her2st_adata[section]
    counts_path, spots_path, image_path = st_files(shared_data, section)
    # Independent parse: every spot id and gene name, and all values of the first rows (all rows for C2).
    ids = pd.read_csv(counts_path, sep="\t", usecols=[0]).iloc[:, 0].astype(str)
    head = pd.read_csv(counts_path, sep="\t", index_col=0, nrows=None if section == "C2" else 5)
    spots = pd.read_csv(spots_path, sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    common = pd.Index(ids).intersection(spots.index[spots["selected"] == 1])

    assert adata.shape == (len(common), head.shape[1])
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert list(adata.var_names) == list(head.columns)
    checked = head.index.intersection(adata.obs_names)
    assert len(checked) >= 1
    np.testing.assert_array_equal(adata[checked].X.toarray(), head.loc[checked].to_numpy())
    np.testing.assert_allclose(adata.obsm["spatial"], spots.loc[adata.obs_names, ["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_array_equal(adata.obs["x"], spots.loc[adata.obs_names, "x"])
    np.testing.assert_array_equal(adata.obs["array_row"], spots.loc[adata.obs_names, "y"])

    info = adata.uns["histoexpr"]
    assert info["slide_path"] == str(image_path.resolve()) and Path(info["slide_path"]).is_absolute()
    assert info["mpp_source"] == "estimated from spot lattice"
    sf = adata.uns["spatial"][section]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(100.0 / info["slide_mpp"])
    hires = adata.uns["spatial"][section]["images"]["hires"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ~92 Mpx scans
        with Image.open(image_path) as im:
            full_w, full_h = im.size
    assert max(hires.shape[:2]) <= 2000 and hires.dtype == np.uint8 and hires.shape[2] == 3
    assert sf["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / full_w)
    assert hires.shape[0] == pytest.approx(full_h * sf["tissue_hires_scalef"], abs=1)


@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_read_st_her2st_mpp_estimate(shared_data, her2st_adata, section):
    adata = her2st_adata[section]
    spots = pd.read_csv(st_files(shared_data, section)[1], sep="\t")
    pitch_px = median_neighbour_px(spots, (1, 0))  # brute force over axis neighbours
    mpp = adata.uns["histoexpr"]["slide_mpp"]
    assert mpp == pytest.approx(200.0 / pitch_px, rel=0.01)
    assert 0.68 < mpp < 0.70  # ~290 px per 200 µm


@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_read_st_her2st_spots_on_tissue(her2st_adata, section):
    adata = her2st_adata[section]
    lib = adata.uns["spatial"][section]
    scale = lib["scalefactors"]["tissue_hires_scalef"]
    mask = tissue_mask(lib["images"]["hires"], lib["scalefactors"]["spot_diameter_fullres"] * scale / 2)
    xy = adata.obsm["spatial"] * scale
    on = fraction_on_tissue(mask, xy)
    mirrored = fraction_on_tissue(mask, np.array(mask.shape[::-1]) - 1 - xy)
    assert on > 0.9
    assert on > mirrored + 0.3


def test_read_st_mob(shared_data, mob_adata):
    adata = mob_adata
    counts_path, spots_path, image_path = st_files(shared_data, "MOB1")
    counts = pd.read_csv(counts_path, sep="\t", index_col=0)
    spots = pd.read_csv(spots_path, sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    selected = spots[spots["selected"] == 1]
    assert adata.shape == (379, 1000) == (len(counts.index.intersection(selected.index)), counts.shape[1])
    np.testing.assert_array_equal(adata.X.toarray(), counts.loc[adata.obs_names].to_numpy())
    assert adata.var_names[0].startswith("ENSMUSG")

    # 2k array: checkerboard lattice of 100 µm array units, nearest spots are diagonal (141 µm)
    diag_px = median_neighbour_px(selected, (1, 1))
    info = adata.uns["histoexpr"]
    assert info["spot_pitch_um"] == pytest.approx(100 * np.sqrt(2))
    assert info["slide_mpp"] == pytest.approx(100 * np.sqrt(2) / diag_px, rel=0.03)

    lib = adata.uns["spatial"]["MOB1"]
    assert lib["scalefactors"]["tissue_hires_scalef"] == 1.0  # 1905 px image is kept whole
    mask = tissue_mask(lib["images"]["hires"], lib["scalefactors"]["spot_diameter_fullres"] / 2)
    unselected = spots.loc[spots["selected"] == 0, ["pixel_x", "pixel_y"]].to_numpy()
    assert fraction_on_tissue(mask, adata.obsm["spatial"]) > 0.9
    assert fraction_on_tissue(mask, unselected) < 0.3


def test_read_st_given_mpp_no_warning(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adata = read_st(*st_files(shared_data, "MOB1"), mpp=4.0, library_id="mob")
    assert adata.uns["histoexpr"]["slide_mpp"] == 4.0
    assert adata.uns["histoexpr"]["mpp_source"] == "given"
    assert adata.uns["spatial"]["mob"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(25.0)


def test_read_st_genes_by_spots_and_gzip(shared_data, tmp_path, mob_adata):
    counts_path, spots_path, image_path = st_files(shared_data, "MOB1")
    some = mob_adata.obs_names[::4]  # a subset of spots keeps the round trip fast
    transposed = pd.read_csv(counts_path, sep="\t", index_col=0).loc[some].T
    out = tmp_path / "mob_t.tsv.gz"
    with gzip.open(out, "wt") as fh:
        transposed.to_csv(fh, sep="\t")
    adata = read_st(out, spots_path, image_path, mpp=mob_adata.uns["histoexpr"]["slide_mpp"])
    assert adata.uns["histoexpr"]["slide_id"] == "mob_t"
    assert list(adata.obs_names) == list(some)
    np.testing.assert_array_equal(adata.X.toarray(), mob_adata[some].X.toarray())


def test_read_st_tiff_image_uses_metadata_mpp(shared_data, tmp_path, mob_adata):
    import tifffile

    counts_path, spots_path, image_path = st_files(shared_data, "MOB1")
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    with_res, without_res = tmp_path / "with_res.tif", tmp_path / "without_res.tif"
    tifffile.imwrite(with_res, rgb, tile=(256, 256), compression="zlib",
                     resolution=(1e4 / 4.0, 1e4 / 4.0), resolutionunit="CENTIMETER")
    tifffile.imwrite(without_res, rgb, tile=(256, 256), compression="zlib")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mpp comes from the file: no estimate, no warning
        adata = read_st(counts_path, spots_path, with_res)
    assert adata.uns["histoexpr"]["slide_mpp"] == pytest.approx(4.0)
    assert adata.uns["histoexpr"]["mpp_source"] == "slide metadata"
    np.testing.assert_array_equal(adata.uns["spatial"]["MOB1"]["images"]["hires"], rgb)  # lossless, ≤ 2000 px

    with pytest.warns(UserWarning, match="estimated"):
        adata = read_st(counts_path, spots_path, without_res)
    assert adata.uns["histoexpr"]["slide_mpp"] == pytest.approx(mob_adata.uns["histoexpr"]["slide_mpp"])


def test_read_st_and_visium_write_h5ad(mob_adata, visium, tmp_path):
    import anndata as ad

    for name, adata in (("st", mob_adata), ("visium", visium)):
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)
        back = ad.read_h5ad(path)
        assert back.uns["histoexpr"]["slide_mpp"] == pytest.approx(adata.uns["histoexpr"]["slide_mpp"])
        np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])


def test_read_st_errors(shared_data, tmp_path):
    mob_counts, mob_spots, mob_image = st_files(shared_data, "MOB1")
    c2_counts, c2_spots, c2_image = st_files(shared_data, "C2")
    with pytest.raises(ReaderError, match="not found"):
        read_st(tmp_path / "missing.tsv", mob_spots, mob_image, mpp=1)
    with pytest.raises(ReaderError, match="outside"):  # C2 spot pixels do not fit the 1905 px MOB image
        read_st(mob_counts, c2_spots, mob_image, mpp=1)
    bad = tmp_path / "bad_spots.tsv"
    pd.read_csv(mob_spots, sep="\t").drop(columns=["pixel_x"]).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ReaderError, match="pixel_x"):
        read_st(mob_counts, bad, mob_image, mpp=1)
    no_ids = tmp_path / "no_ids.tsv"
    pd.DataFrame({"g1": [1, 2]}, index=["a", "b"]).to_csv(no_ids, sep="\t")
    with pytest.raises(ReaderError, match="spot ids"):
        read_st(no_ids, mob_spots, mob_image, mpp=1)
    with pytest.raises(ReaderError, match="mpp"):
        read_st(mob_counts, mob_spots, mob_image, mpp=-1)


# ============================================================================ Visium
@pytest.fixture(scope="module")
def visium(shared_data):
    return read_visium(shared_data / VISIUM)


def test_read_visium_counts(shared_data, visium):
    import h5py

    adata = visium
    h5 = next((shared_data / VISIUM).glob("*filtered_feature_bc_matrix.h5"))
    with h5py.File(h5, "r") as f:
        n_genes, n_spots = f["matrix/shape"][:]
        total = f["matrix/data"][:].sum()
        types = set(f["matrix/features/feature_type"][:].astype(str))
    assert types == {"Gene Expression"}
    assert adata.shape == (n_spots, n_genes) == (982, 33217)
    assert sp.isspmatrix_csr(adata.X)
    assert adata.X.sum() == pytest.approx(total)
    assert adata.var_names.is_unique
    assert {"gene_ids", "feature_types"} <= set(adata.var)
    assert (adata.obs["in_tissue"] == 1).all()


def test_read_visium_spatial(shared_data, visium):
    adata = visium
    positions = pd.read_csv(shared_data / VISIUM / "spatial/tissue_positions_list.csv", header=None, index_col=0)
    pos = positions.loc[adata.obs_names]
    np.testing.assert_array_equal(adata.obsm["spatial"], pos[[5, 4]].to_numpy(float))  # (x=col, y=row)
    np.testing.assert_array_equal(adata.obs["array_row"], pos[2])
    np.testing.assert_array_equal(adata.obs["array_col"], pos[3])

    info = adata.uns["histoexpr"]
    lib = adata.uns["spatial"][info["slide_id"]]
    assert info["slide_id"] == "Vis5A_spaceranger_count"  # library id stored in the .h5
    # spot_diameter_fullres spans a theoretical 65 µm spot (Space Ranger), not the 55 µm capture area
    assert info["slide_mpp"] == pytest.approx(65.0 / 180.27785999999995)
    # independent check: Visium spot centres are 100 µm apart
    from scipy.spatial import cKDTree

    nn_px = np.median(cKDTree(adata.obsm["spatial"]).query(adata.obsm["spatial"], k=2)[0][:, 1])
    assert info["slide_mpp"] * nn_px == pytest.approx(100.0, rel=0.01)
    assert "slide_path" not in info  # the full-resolution image is not part of the folder
    assert set(lib["images"]) == {"lowres"}  # hires is absent in this Space Ranger 1.0 output
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.027017292)

    scale = lib["scalefactors"]["tissue_lowres_scalef"]
    mask = tissue_mask(lib["images"]["lowres"], lib["scalefactors"]["spot_diameter_fullres"] * scale / 2)
    off = positions.loc[positions[1] == 0, [5, 4]].to_numpy(float) * scale
    assert fraction_on_tissue(mask, adata.obsm["spatial"] * scale) > 0.85
    assert fraction_on_tissue(mask, off) < 0.05


def _link_tree(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    """Recreate ``src`` under ``dst`` with symlinked files (the real folder is read-only)."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if rel.as_posix() in skip:
            continue
        target = dst / rel
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(p)


def test_read_visium_spaceranger2_layout_and_mtx(shared_data, visium, tmp_path):
    """Header-ed tissue_positions.csv (Space Ranger 2) and a Matrix Market count folder."""
    from scipy.io import mmwrite

    src = shared_data / VISIUM
    dst = tmp_path / "sr2"
    _link_tree(src, dst, skip={"spatial/tissue_positions_list.csv", "Vis5A_filtered_feature_bc_matrix.h5"})
    positions = pd.read_csv(src / "spatial/tissue_positions_list.csv", header=None)
    positions.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    positions.to_csv(dst / "spatial/tissue_positions.csv", index=False)
    mtx = dst / "filtered_feature_bc_matrix"
    mtx.mkdir()
    subset = visium[:, :1500]  # a gene subset keeps the Matrix Market round trip fast
    with gzip.open(mtx / "matrix.mtx.gz", "wb") as fh:
        mmwrite(fh, sp.csr_matrix(subset.X.T.astype(np.int64)))
    with gzip.open(mtx / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(subset.obs_names) + "\n")
    with gzip.open(mtx / "features.tsv.gz", "wt") as fh:
        for gid, name in zip(subset.var["gene_ids"], subset.var_names):
            fh.write(f"{gid}\t{name}\tGene Expression\n")

    adata = read_visium(dst, library_id="lib")
    assert adata.shape == subset.shape
    assert list(adata.var_names) == list(subset.var_names)
    assert (adata.X != subset.X).nnz == 0
    np.testing.assert_array_equal(adata.obsm["spatial"], visium.obsm["spatial"])
    assert set(adata.uns["spatial"]) == {"lib"}


def test_read_visium_errors(shared_data, tmp_path):
    src = shared_data / VISIUM
    with pytest.raises(ReaderError, match="not found"):
        read_visium(tmp_path / "nope")
    with pytest.raises(ReaderError, match="must be a folder"):
        read_visium(next(src.glob("*.h5")))
    no_spatial = tmp_path / "no_spatial"
    _link_tree(src, no_spatial, skip={"spatial"} | {f"spatial/{p.name}" for p in (src / "spatial").iterdir()})
    with pytest.raises(ReaderError, match="spatial/"):
        read_visium(no_spatial)
    no_scale = tmp_path / "no_scale"
    _link_tree(src, no_scale, skip={"spatial/scalefactors_json.json"})
    with pytest.raises(ReaderError, match="scalefactors_json.json"):
        read_visium(no_scale)
    no_counts = tmp_path / "no_counts"
    _link_tree(src, no_counts, skip={"Vis5A_filtered_feature_bc_matrix.h5"})
    with pytest.raises(ReaderError, match="filtered_feature_bc_matrix"):
        read_visium(no_counts)
    no_pos = tmp_path / "no_pos"
    _link_tree(src, no_pos, skip={"spatial/tissue_positions_list.csv"})
    with pytest.raises(ReaderError, match="tissue_positions"):
        read_visium(no_pos)


# ============================================================================ Xenium
@pytest.fixture(scope="module")
def xenium(shared_data):
    return read_xenium(shared_data / XENIUM)


def test_read_xenium_rebuilds_gene_names(shared_data, xenium):
    import pyarrow.parquet as pq

    table = xenium.tables["table"]
    info = xenium.attrs["histoexpr"]
    assert info["var_rebuilt"] is True
    assert table.shape == (122, 313)
    assert table.var_names.is_unique and table.var_names[0] == "ABCC11"

    # Independent: the panel from the parquet dictionary, minus control features, in order.
    transcripts = pq.read_table(shared_data / XENIUM / "points/transcripts/points.parquet").to_pandas()
    panel = [str(c) for c in transcripts["feature_name"].astype("category").cat.categories]
    controls = ("NegControl", "BLANK_", "Unassigned", "Deprecated", "antisense_", "Intergenic")
    assert list(table.var_names) == [g for g in panel if not g.startswith(controls)]

    # Per-gene totals of the table agree with the Q20, cell-assigned transcript counts.
    q20 = transcripts[(transcripts["qv"] >= 20) & (transcripts["cell_id"] != -1)]
    per_gene = q20["feature_name"].astype(str).value_counts().reindex(table.var_names, fill_value=0)
    totals = np.asarray(table.X.sum(axis=0)).ravel()
    assert np.corrcoef(totals, per_gene.to_numpy())[0, 1] > 0.99
    assert info["var_check_r"] > 0.99
    # a shifted gene order would not agree
    assert abs(np.corrcoef(totals, np.roll(per_gene.to_numpy(), 1))[0, 1]) < 0.2


def test_read_xenium_does_not_modify_disk(shared_data, xenium):
    table_dir = shared_data / XENIUM / "tables/table"
    assert not (table_dir / "var").exists()  # still lost on disk: the repair is in memory only
    assert xenium.path is not None and Path(xenium.path).resolve() == (shared_data / XENIUM).resolve()


def test_read_xenium_he_alignment(xenium):
    info = xenium.attrs["histoexpr"]
    assert info["he_key"] == "he_image" and info["points_key"] == "transcripts" and info["table_key"] == "table"
    assert info["coordinate_system"] == "global"
    # transcripts carry Scale(1/0.2125) to "global" (morphology pixels), so one global unit is 0.2125 µm
    assert info["um_per_unit"] == pytest.approx(0.2125, rel=1e-6)
    # H&E level 0 -> global is an affine with scale ~1.7125 global units per pixel
    assert info["he_mpp"] == pytest.approx(1.7125 * 0.2125, rel=1e-3)


def test_read_xenium_in_memory_and_errors(shared_data, xenium):
    import spatialdata as sd
    from spatialdata.transformations import (
        Identity,
        get_transformation,
        remove_transformation,
        set_transformation,
    )

    # a repaired object passes through unchanged
    again = read_xenium(xenium)
    assert again.attrs["histoexpr"]["var_rebuilt"] is False
    assert again.tables["table"] is xenium.tables["table"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sd.read_zarr(shared_data / XENIUM)

    # an in-memory input is repaired in the returned object only
    repaired = read_xenium(sdata)
    assert repaired.attrs["histoexpr"]["var_rebuilt"] is True
    assert repaired.tables["table"].var_names[0] == "ABCC11"
    assert sdata.tables["table"].var_names[0] == "0" and "histoexpr" not in sdata.attrs
    assert repaired.images["he_image"] is sdata.images["he_image"]  # elements shared, not copied

    with pytest.raises(ReaderError, match="no image 'nope'"):
        read_xenium(sdata, he_key="nope")

    he = sdata.images["he_image"]
    set_transformation(he, Identity(), to_coordinate_system="he_pixels")
    remove_transformation(he, "global")
    assert set(get_transformation(he, get_all=True)) == {"he_pixels"}
    with pytest.raises(ReaderError, match="no transformation"):
        read_xenium(sdata)

    # without the H&E, the 3-channel uint8 immunofluorescence image must not be taken for it
    del sdata.images["he_image"]
    with pytest.raises(ReaderError, match="H&E"):
        read_xenium(sdata)


def test_read_xenium_not_a_zarr(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ReaderError):
        read_xenium(tmp_path / "empty.zarr")
    with pytest.raises(ReaderError, match="not found"):
        read_xenium(tmp_path / "missing.zarr")
