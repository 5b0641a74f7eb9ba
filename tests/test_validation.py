"""Validation at the API boundary: bad inputs get a clear error or warning naming the input and the fix.

Each test here failed on the code before these checks: it returned a wrong result without a word,
or raised a deep library error that did not name the input.
"""

from __future__ import annotations

import math
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import histoexpr as hx
from histoexpr._utils import check_positive, check_targets
from histoexpr.io import ReaderError, SlideError

CMU = "slides/cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def cmu_tiles(shared_data):
    with hx.io.open_slide(shared_data / CMU) as slide:
        return hx.pp.tile(slide)


# ---------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    ("value", "kwargs", "match"),
    [
        ("0.5", {}, r"got the string '0.5'; pass x=0.5 without quotes"),
        ("abc", {}, "got the string 'abc'"),
        (math.nan, {}, "got nan"),
        (math.inf, {}, "got inf"),
        (-4, {"integer": True}, "whole number > 0, got -4"),
        (2.5, {"integer": True}, "whole number > 0, got 2.5"),
        (0, {}, "> 0, got 0"),
        (True, {}, r"got True \(bool\)"),
        (None, {}, r"got None \(NoneType\)"),
    ],
)
def test_check_positive_rejects(value, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_positive(value, "x", **kwargs)


def test_check_positive_accepts():
    assert check_positive(np.float32(0.5), "x") == 0.5
    assert check_positive(4.0, "x", integer=True) == 4 and isinstance(check_positive(4.0, "x", integer=True), int)
    assert check_positive(0, "x", integer=True, allow_zero=True) == 0


# ---------------------------------------------------------------------------- slides: mpp
@pytest.mark.parametrize("mpp", ["0.5", math.nan, -0.5, 0, math.inf])
def test_open_slide_bad_user_mpp(shared_data, mpp):
    with pytest.raises(SlideError, match="mpp must be a number > 0"):
        hx.io.open_slide(shared_data / CMU, mpp=mpp)


@pytest.mark.parametrize("text", [b"MPP = 0.000", b"MPP = -0.49", b"MPP = nan  "])
def test_open_slide_bad_metadata_mpp(shared_data, tmp_path, text):
    """An SVS whose metadata says mpp 0, negative or NaN is refused (it used to be accepted)."""
    data = (shared_data / CMU).read_bytes()
    assert b"MPP = 0.499" in data  # one description per page
    path = tmp_path / "bad-mpp.svs"
    path.write_bytes(data.replace(b"MPP = 0.499", text))  # same length: the TIFF stays valid
    with pytest.raises(SlideError, match=r"bad-mpp.svs: its metadata says mpp=.*Pass.*mpp=") as err:
        hx.io.open_slide(path)
    assert "open_slide(path, mpp=" in str(err.value)
    assert hx.io.open_slide(path, mpp=0.499).mpp == 0.499  # the fix the message gives works


# ---------------------------------------------------------------------------- slides: corrupt files
def test_truncated_slide_is_a_slide_error(shared_data, tmp_path):
    data = (shared_data / CMU).read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"truncated.svs.*truncated or corrupt"):
        hx.io.open_slide(path)
    assert issubclass(SlideError, ValueError) and hx.io.SlideError is SlideError


def test_corrupt_tile_data_is_a_slide_error_naming_the_region(shared_data, tmp_path, cmu_tiles):
    data = bytearray((shared_data / CMU).read_bytes())
    n = len(data)
    rng = np.random.default_rng(0)
    for off in range(n // 3, 2 * n // 3, 4096):  # scribble over the JPEG tiles of level 0, not the header
        data[off : off + 512] = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.svs"
    path.write_bytes(bytes(data))
    good = cmu_tiles
    with hx.io.open_slide(path) as slide:  # the structure is intact
        with pytest.raises(SlideError, match=r"cannot read the region x=\d+\.\.\d+, y=\d+\.\.\d+ .* of .*corrupt.svs"):
            slide.read_region((0, 0), 0, slide.dimensions)
        with pytest.raises(SlideError, match="corrupt.svs"):
            hx.pp.tile(slide)
        # tiles read by DataLoader workers raise the same error type
        with pytest.raises(SlideError, match="corrupt.svs"):
            hx.pp.extract_features(good, slide, encoder=hx.models.get_encoder("test_resnet", weights="random"),
                                   num_workers=1, progress=False, copy=True)


# ---------------------------------------------------------------------------- parameters
def test_tile_parameters(shared_data):
    slide = hx.io.open_slide(shared_data / CMU)
    with pytest.raises(ValueError, match="tile_size must be a whole number > 0, got nan"):
        hx.pp.tile(slide, tile_size=math.nan)
    with pytest.raises(ValueError, match="pass tile_size=256.0 without quotes"):
        hx.pp.tile(slide, tile_size="256")
    with pytest.raises(ValueError, match="pass mpp=0.5 without quotes"):
        hx.pp.tile(slide, mpp="0.5")
    with pytest.raises(ValueError, match="max_tiles must be a whole number > 0, got nan"):
        hx.pp.tile(slide, max_tiles=math.nan)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": -4}, "batch_size must be a whole number > 0, got -4"),
        ({"batch_size": math.nan}, "batch_size must be a whole number > 0, got nan"),
        ({"num_workers": -1}, "num_workers must be a whole number ≥ 0, got -1"),
        ({"num_workers": "2"}, "pass num_workers=2.0 without quotes"),
        ({"num_workers": 1.5}, "num_workers must be a whole number ≥ 0, got 1.5"),
    ],
)
def test_extract_features_parameters(cmu_tiles, kwargs, match):
    """batch_size=-4 used to fail as 'NaN features'; now the parameter is named."""
    tiles = cmu_tiles[:4].copy()
    with pytest.raises(ValueError, match=match):
        hx.pp.extract_features(tiles, encoder="test_resnet", weights="random", progress=False, copy=True, **kwargs)


# ---------------------------------------------------------------------------- NaN targets in every trainer
def _spot_slide(seed: int, n: int = 40, genes: int = 6, nan_at: tuple[int, int] | None = None) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n, genes)).astype(np.float32)
    if nan_at is not None:
        x[nan_at] = np.nan
    a = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"s{seed}_{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"gene{j}" for j in range(genes)]))
    a.obsm["X_enc"] = rng.normal(size=(n, 8)).astype(np.float32)
    a.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
    return a


def test_train_spatial_nan_target_raises_and_saves_nothing(tmp_path):
    """One NaN target used to return (and save) an all-NaN model without a word."""
    slides = {"A": _spot_slide(0, nan_at=(7, 2)), "B": _spot_slide(1)}
    ckpt = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=r"slide 'A': 1 values in 1 genes \(e.g. \['gene2'\]\).*\['s0_7'\]"):
        hx.tl.train_spatial(slides, use_rep="X_enc", epochs=2, device="cpu", checkpoint_dir=ckpt,
                            model_kwargs={"hidden_dim": 16, "nheads": 2, "dim_feedforward": 16})
    assert not ckpt.exists()
    # the same call without the NaN trains a finite model
    slides["A"] = _spot_slide(0)
    model = hx.tl.train_spatial(slides, use_rep="X_enc", epochs=2, device="cpu",
                                model_kwargs={"hidden_dim": 16, "nheads": 2, "dim_feedforward": 16})
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_spatial_inf_in_a_layer_raises():
    a = _spot_slide(0)
    a.layers["counts"] = a.X.copy()
    a.layers["counts"][3, 4] = np.inf
    a.obs["slide_id"] = "A"
    with pytest.raises(ValueError, match=r"1 NaN/inf values.*gene4.*s0_3"):
        hx.tl.train_spatial(a, use_rep="X_enc", layer="counts", epochs=1, device="cpu")


def test_train_bulk_nan_target_names_genes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4, 8)).astype(np.float32)
    y = pd.DataFrame(rng.normal(size=(10, 3)), columns=["ERBB2", "ESR1", "MKI67"],
                     index=[f"slide{i}" for i in range(10)])
    y.iloc[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 values in 1 genes \(e.g. \['ESR1'\]\) of 1 spots/samples \(e.g. \['slide4'\]\)"):
        hx.tl.train_bulk(x, y, patients=[f"p{i}" for i in range(10)], max_epochs=1, device="cpu", progress=False)


def test_train_fusion_nan_target_raises():
    import scipy.sparse as sp

    x = sp.random(20, 5, density=0.5, format="csr", random_state=0, dtype=np.float32)
    x.data[3] = np.nan
    crops = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"cell{i}" for i in range(20)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(5)]))
    with pytest.raises(ValueError, match=r"crop targets \(crops.X\) contain 1 NaN/inf"):
        hx.tl.train_fusion(crops, torch.nn.Linear(2, 2), epochs=1, device="cpu", progress=False)


def test_check_targets_accepts_finite_and_integer():
    check_targets(np.arange(6).reshape(3, 2))
    check_targets({"a": _spot_slide(0)})
    check_targets(torch.ones(2, 3))


# ---------------------------------------------------------------------------- spots far from tiles
def _grid_tiles(n_side: int = 20, side: float = 100.0) -> ad.AnnData:
    r, c = np.divmod(np.arange(n_side * n_side), n_side)
    tiles = ad.AnnData(obs=pd.DataFrame({"row": r, "col": c}, index=[f"t{i}" for i in range(r.size)]))
    tiles.obsm["spatial"] = np.column_stack([c * side + side / 2, r * side + side / 2])
    tiles.uns["histoexpr"] = {"tile_size_level0": side, "slide_mpp": 0.5}
    return tiles


def _spots(xy: np.ndarray) -> ad.AnnData:
    rng = np.random.default_rng(0)
    m = ad.AnnData(X=rng.poisson(5, size=(len(xy), 3)).astype(np.float32),
                   var=pd.DataFrame(index=["a", "b", "c"]))
    m.obsm["spatial"] = xy
    return m


def test_spots_near_few_tiles_warn_with_how_many_and_how_far():
    """Spots near ~1 % of the tiles (a corner): every other tile silently took far-away values."""
    tiles = _grid_tiles()
    corner = np.array([[x, y] for x in (25.0, 75.0, 125.0) for y in (25.0, 75.0, 125.0)])  # 9 spots, ~2 tiles
    with pytest.warns(UserWarning, match=r"(\d+) of 400 tiles \(\d+%\) have no measured spot within 150 px = "
                                         r"1.5 tiles = 75 µm") as rec:
        out = hx.pp.map_measured_to_tiles(_spots(corner), tiles)
    msg = str(rec[0].message)
    n_far = int(msg.split(" of ")[0])
    assert n_far == int((out.obs["nearest_spot_distance"] > 150).sum()) > 350
    assert "tiles = " in msg.split("farthest")[1] and "µm" in msg.split("farthest")[1]
    with pytest.raises(ValueError, match="have no measured spot within 500 px"):
        hx.pp.map_measured_to_tiles(_spots(corner), tiles, max_distance=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hx.pp.map_measured_to_tiles(_spots(corner), tiles, max_distance=np.inf)


def test_spots_covering_the_tiles_do_not_warn():
    tiles = _grid_tiles()
    rng = np.random.default_rng(1)
    xy = np.array([[x, y] for x in np.arange(50, 2000, 140.0) for y in np.arange(50, 2000, 140.0)])
    xy += rng.normal(0, 5, xy.shape)  # a spot lattice with a 140 px pitch, jittered
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hx.pp.map_measured_to_tiles(_spots(xy), tiles)
    assert out.n_obs == 400


# ---------------------------------------------------------------------------- read_st with another section's files
def _her2st(shared_data, tmp_path, counts: str, selection: str, image: str, drop_rows: int = 0):
    d = shared_data / "her2st"
    sel = tmp_path / f"{selection}_selection.tsv"
    lines = (d / f"{selection}_selection.tsv").read_text().splitlines(keepends=True)
    sel.write_text("".join(lines[: len(lines) - drop_rows]))
    return d / f"{counts}.tsv.gz", sel, d / f"{image}_HE.jpg"


def test_read_st_other_sections_selection_raises(shared_data, tmp_path):
    """C2 counts + C3's selection file used to keep 32 of 187 spots silently."""
    with pytest.raises(ReaderError, match=r"155 of the 187 spots in C2.tsv.gz .* only 32 spots are kept.*another "
                                          "section"):
        hx.io.read_st(*_her2st(shared_data, tmp_path, "C2", "C3", "C2"), mpp=0.5)


def test_read_st_a_few_unlisted_spots_warn(shared_data, tmp_path):
    counts, sel, image = _her2st(shared_data, tmp_path, "C2", "C2", "C2", drop_rows=5)
    with pytest.warns(UserWarning, match=r"5 of the 187 spots in C2.tsv.gz .* so only 182 spots are kept"):
        adata = hx.io.read_st(counts, sel, image, mpp=0.5)
    assert adata.n_obs == 182


def test_read_st_matching_files_do_not_warn_about_spots(shared_data, tmp_path):
    counts, sel, image = _her2st(shared_data, tmp_path, "C3", "C3", "C3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adata = hx.io.read_st(counts, sel, image, mpp=0.5)
    assert adata.n_obs == 180
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_nan_outside_the_gene_panel_is_not_an_error():
    a, b = _spot_slide(0, nan_at=(7, 5)), _spot_slide(1)
    model = hx.tl.train_spatial({"A": a, "B": b}, use_rep="X_enc", genes=["gene0", "gene1"], epochs=1, device="cpu",
                                model_kwargs={"hidden_dim": 16, "nheads": 2, "dim_feedforward": 16})
    assert all(torch.isfinite(p).all() for p in model.parameters())
