"""Xenium crops: transcript → H&E pixel alignment, sparse per-patch pooling, crop pixels, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import copy_writable
from scipy import sparse

import histoexpr as hx
from histoexpr.pp._xenium import XeniumCropError, _panel_genes

XENIUM = "xenium_segtraq/tests/data/xenium_sp_subset.zarr"


# ---------------------------------------------------------------------------- synthetic data
def _synthetic(points_um: np.ndarray, genes: list[str], *, image_matrix: np.ndarray, um_to_global: float,
               size=(3, 200, 240), points_cs="global", qv=None, seed=0):
    """SpatialData with an RGB image (px → global by ``image_matrix``) and points (µm → global by scale)."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, PointsModel
    from spatialdata.transformations import Affine, Scale

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, size=size, dtype=np.uint8)
    img = Image2DModel.parse(pixels, dims=("c", "y", "x"), transformations={
        "global": Affine(image_matrix, input_axes=("x", "y"), output_axes=("x", "y"))})
    df = pd.DataFrame({"x": points_um[:, 0], "y": points_um[:, 1],
                       "gene": pd.Categorical(genes, categories=sorted(set(GENES) | set(genes))),
                       "qv": np.full(len(genes), 30.0) if qv is None else np.asarray(qv, float)})
    pts = PointsModel.parse(df, coordinates={"x": "x", "y": "y"}, feature_key="gene",
                            transformations={points_cs: Scale([um_to_global, um_to_global], axes=("x", "y"))})
    return SpatialData(images={"he": img}, points={"transcripts": pts}), pixels


def _rotation_flip_matrix(scale_global_per_px: float, theta: float = 0.4) -> np.ndarray:
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = np.eye(3)
    m[:2, :2] = scale_global_per_px * rot @ np.diag([1.0, -1.0])  # rotation and a mirror
    m[:2, 2] = [350.0, -120.0]
    return m


def _px_to_um(px: np.ndarray, image_matrix: np.ndarray, um_to_global: float) -> np.ndarray:
    """Independent inverse map: image px → global → µm."""
    g = np.c_[px, np.ones(len(px))] @ image_matrix.T
    return g[:, :2] / um_to_global


GENES = ["CORE1", "CORE2", "ADD1", "ADD2"]


@pytest.fixture(scope="module")
def geometry():
    # image at 0.25 µm/px: 4 global units per µm, 1 px = 0.25 µm → 1 global unit per px
    um_to_global = 4.0
    image_matrix = _rotation_flip_matrix(1.0)
    return um_to_global, image_matrix


def test_transcript_lands_in_expected_patch(geometry):
    um_to_global, m = geometry
    # crops of 32 px at 0.5 µm/px = 64 image px; patches 16 px = 32 image px → 2 × 2 tokens per crop
    # target: crop (row 1, col 2), patch (row 1, col 0); a point well inside that patch
    x0, y0 = 2 * 64, 1 * 64
    px = np.array([[x0 + 0 * 32 + 10.3, y0 + 1 * 32 + 21.7],   # CORE2 in token 2 of crop (1, 2)
                   [5.0, 5.0],                                # ADD1 in crop (0, 0)
                   [x0 + 40.0, y0 + 3.0]])                    # ADD2 in crop (1, 2), token 1
    sdata, _ = _synthetic(_px_to_um(px, m, um_to_global), ["CORE2", "ADD1", "ADD2"],
                          image_matrix=m, um_to_global=um_to_global)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crops = hx.pp.xenium_crops(sdata, core_genes=["CORE1", "CORE2"], addon_genes=["ADD1", "ADD2"],
                                   crop_size=32, patch_size=16, mpp=0.5, min_tissue=0.0)
    info = crops.uns["histoexpr"]
    assert info["slide_mpp"] == pytest.approx(0.25)
    assert info["n_patches"] == 4 and info["tile_size_level0"] == pytest.approx(64)
    assert sparse.issparse(crops.obsm["X_core_tokens"])
    crop = crops["he_1_2"]
    tok = crop.obsm["X_core_tokens"].toarray().reshape(4, 2)
    expected = np.zeros((4, 2))
    expected[1 * 2 + 0, 1] = 1  # token row 1, col 0 (row-major), gene CORE2
    np.testing.assert_array_equal(tok, expected)
    np.testing.assert_array_equal(crop.layers["counts"].toarray(), [[0, 1]])
    np.testing.assert_allclose(crop.X, np.log1p([[0, 1]]))
    np.testing.assert_array_equal(crops["he_0_0"].layers["counts"].toarray(), [[1, 0]])
    # crop centres: level-0 px and µm (independent inverse map)
    assert crop.obs[["x0", "y0"]].to_numpy().tolist() == [[128, 64]]
    np.testing.assert_allclose(crop.obsm["spatial"], [[160, 96]])
    np.testing.assert_allclose(crop.obsm["spatial_um"], _px_to_um(np.array([[160.0, 96.0]]), m, um_to_global))
    # only crops with transcripts were kept, and the drop was reported
    assert crops.n_obs == 2 and info["n_crops_low_transcripts"] == info["n_crops_grid"] - 2


def test_overlapping_crops_count_each_transcript_once_per_crop(geometry):
    um_to_global, m = geometry
    rng = np.random.default_rng(1)
    px = rng.uniform(0, [240, 200], size=(400, 2))
    genes = list(rng.choice(GENES, size=400))
    qv = rng.uniform(10, 40, size=400)
    sdata, _ = _synthetic(_px_to_um(px, m, um_to_global), genes, image_matrix=m, um_to_global=um_to_global,
                          qv=qv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crops = hx.pp.xenium_crops(sdata, core_genes=["CORE1", "CORE2"], addon_genes=["ADD1", "ADD2"],
                                   crop_size=32, stride=8, min_tissue=0.0, qv_min=20)
    # brute force: loop over crops and transcripts in image px
    size, patch = 64.0, 32.0
    keep = qv >= 20
    core = {"CORE1": 0, "CORE2": 1}
    for name in crops.obs_names[::7]:
        x0, y0 = crops.obs.loc[name, ["x0", "y0"]].to_numpy(float)
        tok = np.zeros((4, 2))
        add = np.zeros(2)
        for (u, v), g, k in zip(px, genes, keep):
            if not k or not (x0 <= u < x0 + size and y0 <= v < y0 + size):
                continue
            if g in core:
                tok[int((v - y0) // patch) * 2 + int((u - x0) // patch), core[g]] += 1
            else:
                add[int(g[-1]) - 1] += 1
        np.testing.assert_array_equal(crops[name].obsm["X_core_tokens"].toarray().reshape(4, 2), tok)
        np.testing.assert_array_equal(crops[name].layers["counts"].toarray().ravel(), add)


def test_crop_pixels_exact_and_resized(geometry):
    um_to_global, m = geometry
    px = np.array([[20.0, 20.0], [100.0, 150.0]])
    sdata, pixels = _synthetic(_px_to_um(px, m, um_to_global), ["CORE1", "ADD1"], image_matrix=m,
                               um_to_global=um_to_global)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = hx.pp.xenium_crops(sdata, core_genes=["CORE1"], addon_genes=["ADD1"], crop_size=32, mpp=0.25,
                                  min_tissue=0.0)
        half = hx.pp.xenium_crops(sdata, core_genes=["CORE1"], addon_genes=["ADD1"], crop_size=32, mpp=0.5,
                                  min_tissue=0.0)
    imgs = hx.pp.xenium_crop_images(same, sdata=sdata)
    for k, (x0, y0) in enumerate(same.obs[["x0", "y0"]].to_numpy()):
        np.testing.assert_array_equal(imgs[k], pixels[:, y0:y0 + 32, x0:x0 + 32].transpose(1, 2, 0))
    imgs = hx.pp.xenium_crop_images(half, sdata=sdata)
    assert imgs.shape == (half.n_obs, 32, 32, 3)
    x0, y0 = half.obs[["x0", "y0"]].to_numpy()[0]
    block = pixels[:, y0:y0 + 64, x0:x0 + 64].transpose(1, 2, 0).astype(float)
    block_mean = block.reshape(32, 2, 32, 2, 3).mean((1, 3))
    assert np.abs(imgs[0].astype(float) - block_mean).mean() < 20  # resized, not cropped


def test_bad_input(geometry):
    um_to_global, m = geometry
    px = np.array([[20.0, 20.0], [100.0, 150.0]])
    sdata, _ = _synthetic(_px_to_um(px, m, um_to_global), ["CORE1", "ADD1"], image_matrix=m,
                          um_to_global=um_to_global)
    kw = {"crop_size": 32, "min_tissue": 0.0}
    with pytest.raises(XeniumCropError, match="both the core and the add-on"):
        hx.pp.xenium_crops(sdata, core_genes=["CORE1", "ADD1"], addon_genes=["ADD1"], **kw)
    with pytest.raises(XeniumCropError, match="not among the transcripts"):
        hx.pp.xenium_crops(sdata, core_genes=["CORE1", "NOPE"], addon_genes=["ADD1"], **kw)
    with pytest.raises(XeniumCropError, match="multiple of patch_size"):
        hx.pp.xenium_crops(sdata, core_genes=["CORE1"], addon_genes=["ADD1"], crop_size=40)
    with pytest.raises(XeniumCropError, match="smaller than one crop"):
        hx.pp.xenium_crops(sdata, core_genes=["CORE1"], addon_genes=["ADD1"], crop_size=512)
    # points in another coordinate system, no transform linking them
    other, _ = _synthetic(_px_to_um(px, m, um_to_global), ["CORE1", "ADD1"], image_matrix=m,
                          um_to_global=um_to_global, points_cs="xenium_um")
    with pytest.raises(XeniumCropError, match="share no coordinate system"):
        hx.pp.xenium_crops(other, core_genes=["CORE1"], addon_genes=["ADD1"], **kw)
    # all transcripts outside the image → no crop left
    outside, _ = _synthetic(_px_to_um(np.array([[-500.0, -500.0], [-400, -600]]), m, um_to_global),
                            ["CORE1", "ADD1"], image_matrix=m, um_to_global=um_to_global)
    with pytest.raises(XeniumCropError, match="no crop left"):
        hx.pp.xenium_crops(outside, core_genes=["CORE1"], addon_genes=["ADD1"], **kw)
    # low-quality transcripts only → filtered by qv
    lowq, _ = _synthetic(_px_to_um(px, m, um_to_global), ["CORE1", "ADD1"], image_matrix=m,
                         um_to_global=um_to_global, qv=[5, 5])
    with pytest.raises(XeniumCropError, match="no crop left"):
        hx.pp.xenium_crops(lowq, core_genes=["CORE1"], addon_genes=["ADD1"], **kw)
    # crops without transcripts are dropped with a warning that counts them
    with pytest.warns(UserWarning, match=r"dropped \d+ of \d+ crops"):
        hx.pp.xenium_crops(sdata, core_genes=["CORE1"], addon_genes=["ADD1"], **kw)


# ---------------------------------------------------------------------------- real Xenium crop
@pytest.fixture(scope="module")
def xenium(shared_data, tmp_path_factory):
    import spatialdata as sd

    # a private copy: nothing may ever be written into the shared data
    dst = tmp_path_factory.mktemp("xenium") / "xenium.zarr"
    copy_writable(shared_data / XENIUM, dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sd.read_zarr(dst)


def test_real_xenium_matches_spatialdata_transform(xenium):
    """Pooling equals a brute-force count with spatialdata's own transform of the transcripts."""
    from spatialdata import transform
    from spatialdata.transformations import get_transformation

    genes = _panel_genes(xenium.points["transcripts"], "feature_name")
    assert len(genes) > 250 and not any(g.startswith("BLANK") for g in genes)
    core, addon = genes[::2], genes[1::2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crops = hx.pp.xenium_crops(xenium, core_genes=core, addon_genes=addon, crop_size=64, stride=32,
                                   qv_min=20)
        pts = transform(xenium.points["transcripts"], to_coordinate_system="global").compute()
    info = crops.uns["histoexpr"]
    assert info["slide_mpp"] == pytest.approx(0.2125 * 1.7125, rel=1e-3)  # H&E px = 1.7125 DAPI px
    # global → H&E px with spatialdata's inverse of the image transformation
    inv = get_transformation(xenium.images["he_image"], "global").inverse()
    m = inv.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    pts = pts[(pts["qv"] >= 20) & pts["feature_name"].astype(str).isin(core + addon)]
    uv = np.c_[pts["x"], pts["y"], np.ones(len(pts))] @ m.T
    g = pts["feature_name"].astype(str).to_numpy()
    size, patch = info["tile_size_level0"], info["patch_size"] * info["mpp"] / info["slide_mpp"]
    core_index = {x: i for i, x in enumerate(core)}
    add_index = {x: i for i, x in enumerate(addon)}
    checked = 0
    for name in crops.obs_names[:: max(1, crops.n_obs // 6)]:
        x0, y0 = crops.obs.loc[name, ["x0", "y0"]].to_numpy(float)
        inside = (uv[:, 0] >= x0) & (uv[:, 0] < x0 + size) & (uv[:, 1] >= y0) & (uv[:, 1] < y0 + size)
        tok = np.zeros((info["n_patches"], len(core)))
        add = np.zeros(len(addon))
        for (u, v, _), gene in zip(uv[inside], g[inside]):
            if gene in core_index:
                t = min(int((v - y0) // patch), 3) * 4 + min(int((u - x0) // patch), 3)
                tok[t, core_index[gene]] += 1
            else:
                add[add_index[gene]] += 1
        np.testing.assert_array_equal(crops[name].obsm["X_core_tokens"].toarray().reshape(tok.shape), tok)
        np.testing.assert_array_equal(crops[name].layers["counts"].toarray().ravel(), add)
        checked += inside.sum()
    assert checked > 1000
    assert crops.obsm["X_core_tokens"].shape == (crops.n_obs, 16 * len(core))
    np.testing.assert_allclose(hx.pp.core_counts(crops).sum(1), crops.obs["n_core"])
    imgs = hx.pp.xenium_crop_images(crops, sdata=xenium, indices=[0, 1])
    assert imgs.shape == (2, 64, 64, 3) and imgs.std() > 5  # real H&E content, not blank


def test_real_xenium_default_geometry(xenium):
    """Default 224 px crops (112 µm, 196 tokens): the crop is only ~160 × 190 µm, so few crops."""
    genes = _panel_genes(xenium.points["transcripts"], "feature_name")
    crops = hx.pp.xenium_crops(xenium, core_genes=genes[:100], addon_genes=genes[100:150], stride=56)
    assert crops.uns["histoexpr"]["n_patches"] == 196
    assert crops.obsm["X_core_tokens"].shape[1] == 196 * 100
    assert crops.n_obs >= 1
    assert (crops.obs["n_transcripts"] > 0).all()


def test_works_on_read_xenium_output(shared_data, tmp_path):
    read_xenium = getattr(hx.io, "read_xenium", None)
    if read_xenium is None:
        pytest.skip("histoexpr.io.read_xenium not available")
    dst = tmp_path / "x.zarr"
    copy_writable(shared_data / XENIUM, dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = read_xenium(dst)
    genes = _panel_genes(sdata.points["transcripts"], "feature_name")
    crops = hx.pp.xenium_crops(sdata, core_genes=genes[:50], addon_genes=genes[50:60], crop_size=64, stride=64)
    assert crops.uns["histoexpr"]["image_key"] == "he_image" and crops.n_obs > 5
