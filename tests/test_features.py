"""Encoder registry, weights loading and the feature-extraction pipeline (SPEC §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import histoexpr as hx
from histoexpr.models.encoders import (
    EncoderWeightsError,
    TileTransform,
    get_encoder,
    list_encoders,
    read_state_dict,
)

TINY = "test_resnet"  # timm test model: 160 px input, 96-d output, ~0.4 M parameters


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cmu_slide(shared_data):
    return hx.io.open_slide(shared_data / "slides" / "cmu-1-small-region.svs")


@pytest.fixture(scope="module")
def cmu_tiles(cmu_slide):
    """Real tissue tiles of the CMU-1 small region (256 px at 0.5 µm/px), first 18 of them."""
    tiles = hx.pp.tile(cmu_slide)
    assert tiles.n_obs >= 18
    return tiles[:18].copy()


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return get_encoder(TINY, weights="random")


def _direct_features(encoder, slide, tiles) -> np.ndarray:
    """Independent reference: read each tile, normalise with numpy, one forward per tile."""
    size0 = tiles.uns["histoexpr"]["tile_size_level0"]
    mean, std = np.array(encoder.transform.mean), np.array(encoder.transform.std)
    out = []
    with torch.no_grad():
        for x0, y0 in zip(tiles.obs["x0"], tiles.obs["y0"]):
            img = slide.read_tile(x0, y0, size0, encoder.input_size).astype(np.float64) / 255.0
            x = torch.from_numpy(((img - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
            out.append(encoder.module(x)[0].numpy())
    return np.stack(out)


class CrashingEncoder(nn.Module):
    """Wraps a module; raises after ``crash_after`` forward calls (a simulated crash), counts calls."""

    def __init__(self, base: nn.Module, crash_after: int | None = None):
        super().__init__()
        self.base = base
        self.crash_after = crash_after
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise RuntimeError("simulated crash")
        return self.base(x)


class NaNForSomeRows(nn.Module):
    """Returns NaN features for the tiles at ``bad`` positions of the whole run (batch-aware)."""

    def __init__(self, base: nn.Module, bad: set[int], batch_size: int):
        super().__init__()
        self.base, self.bad, self.batch_size, self.seen = base, bad, batch_size, 0

    def forward(self, x):
        out = self.base(x).clone()
        for j in range(len(x)):
            if self.seen + j in self.bad:
                out[j] = float("nan") if (self.seen + j) % 2 else float("inf")
        self.seen += len(x)
        return out


# ---------------------------------------------------------------------------- registry and transform
def test_registry_builtins():
    assert {"uni", "resnet50"} <= set(list_encoders())
    spec = hx.models.encoders._REGISTRY["uni"]
    assert (spec.input_size, spec.dim, spec.precision, spec.hf_hub_id) == (224, 1024, "bf16", "MahmoodLab/UNI")
    assert hx.models.encoders._REGISTRY["resnet50"].dim == 2048


def test_uni_architecture_matches_spec():
    from histoexpr.models.encoders import _resnet50_factory, _uni_factory

    with torch.device("meta"):  # architecture only, no memory or init time
        uni = _uni_factory()
        rn = _resnet50_factory()
    assert uni.num_features == 1024 and uni.num_classes == 0 and len(uni.blocks) == 24
    assert uni.patch_embed.patch_size == (16, 16) and uni.dynamic_img_size and uni.global_pool == "token"
    assert uni.blocks[0].ls1.gamma.shape == (1024,)  # init_values set → LayerScale present
    assert rn.num_features == 2048 and rn.num_classes == 0


def test_timm_name_and_transform(tiny_encoder):
    import timm

    assert tiny_encoder.dim == 96 and tiny_encoder.input_size == 160 and tiny_encoder.weights == "random"
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, size=(160, 160, 3), dtype=np.uint8)
    got = tiny_encoder.transform(tile).numpy()
    cfg = timm.data.resolve_data_config({}, model=timm.create_model(TINY))  # the model's own normalisation
    assert tiny_encoder.transform.mean == tuple(cfg["mean"]) and tiny_encoder.transform.std == tuple(cfg["std"])
    expected = ((tile / 255.0 - np.array(cfg["mean"])) / np.array(cfg["std"])).transpose(2, 0, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # resize to the encoder's input size
    assert tiny_encoder.transform(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)).shape == (3, 160, 160)
    with pytest.raises(ValueError, match="unknown encoder"):
        get_encoder("not_a_model_xyz", weights="random")


def test_register_encoder():
    from histoexpr.models import register_encoder

    register_encoder("tiny_custom", lambda: nn.Sequential(nn.Conv2d(3, 8, 8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                     input_size=64, precision="fp32", overwrite=True)
    enc = get_encoder("tiny_custom", weights="random")
    assert (enc.dim, enc.input_size, enc.precision) == (8, 64, "fp32")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("tiny_custom", nn.Identity)


def test_user_module_with_transform():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 5)

        def forward(self, x):
            return self.proj(x.mean(dim=(2, 3)))

    enc = get_encoder(Tiny(), transform=TileTransform(32))
    assert (enc.name, enc.dim, enc.input_size, enc.weights) == ("tiny", 5, 32, "user")


# ---------------------------------------------------------------------------- weights
def _outputs(module, seed=1):
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return module.eval()(x)


@pytest.mark.parametrize("layout", ["safetensors", "bin_wrapped", "hf_dir", "with_head"])
def test_weights_roundtrip(tmp_path, layout):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    ref = timm.create_model(TINY, pretrained=False, num_classes=0)
    sd = ref.state_dict()
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    elif layout == "bin_wrapped":  # DDP checkpoint: {"state_dict": {"module.<key>": ...}}
        path = tmp_path / "ckpt.bin"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    elif layout == "hf_dir":
        path = tmp_path / "repo"
        path.mkdir()
        torch.save(sd, path / "pytorch_model.bin")
    else:  # a classification checkpoint: its head is dropped for the headless encoder
        torch.manual_seed(123)
        full = timm.create_model(TINY, pretrained=False, num_classes=10)
        path = tmp_path / "model.safetensors"
        save_file(full.state_dict(), str(path))
        ref = full.reset_classifier(0) or full
    torch.manual_seed(999)  # a different random init, overwritten by the weights
    enc = get_encoder(TINY, weights=path)
    torch.testing.assert_close(_outputs(enc.module), _outputs(ref), rtol=0, atol=0)
    assert enc.weights.endswith((".safetensors", ".bin"))


def test_weights_key_mismatch_is_clear(tmp_path):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), str(path))
    with pytest.raises(EncoderWeightsError, match="do not fit this encoder.*missing keys"):
        get_encoder(TINY, weights=path)
    with pytest.raises(EncoderWeightsError, match="not found"):
        get_encoder(TINY, weights=tmp_path / "nope.bin")
    assert set(read_state_dict(path)) == set(timm.create_model("test_vit", num_classes=0).state_dict())


def test_missing_weights_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HISTOEXPR_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(EncoderWeightsError) as err:
        get_encoder("uni")
    msg = str(err.value)
    for needle in ("MahmoodLab/UNI", "pytorch_model.bin", "weights=", str(tmp_path / "weights" / "uni"), "random"):
        assert needle in msg
    with pytest.raises(EncoderWeightsError, match=r"offline.*https://huggingface.co/org/model"):
        get_encoder(TINY, weights="hf-hub:org/model")
    with pytest.raises(EncoderWeightsError, match="cannot be reached"):
        get_encoder("hf-hub:MahmoodLab/UNI")


def test_default_weights_folder(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HISTOEXPR_WEIGHTS", str(tmp_path))
    torch.manual_seed(5)
    ref = timm.create_model(TINY, pretrained=False, num_classes=0)
    (tmp_path / TINY).mkdir()
    save_file(ref.state_dict(), str(tmp_path / TINY / "model.safetensors"))
    enc = get_encoder(TINY)
    torch.testing.assert_close(_outputs(enc.module), _outputs(ref), rtol=0, atol=0)


# ---------------------------------------------------------------------------- pipeline
def test_extract_features_matches_direct(cmu_slide, cmu_tiles, tiny_encoder):
    tiles = cmu_tiles.copy()
    hx.pp.extract_features(tiles, cmu_slide, encoder=tiny_encoder, batch_size=8, num_workers=0, progress=False)
    feats = tiles.obsm["X_test_resnet"]
    assert feats.dtype == np.float32 and feats.shape == (18, 96)
    np.testing.assert_allclose(feats, _direct_features(tiny_encoder, cmu_slide, tiles), rtol=1e-4, atol=1e-5)
    info = tiles.uns["histoexpr"]
    assert info["encoder"] == TINY and info["encoder_weights"] == "random" and info["feature_key"] == "X_test_resnet"
    assert info["encoder_dim"] == 96 and "tile_size_level0" in info  # tiling metadata kept
    assert info["encoder_precision"] == "fp32"  # what actually ran (the CPU never autocasts)


def test_extract_features_defaults_and_workers(cmu_tiles, tiny_encoder):
    # slide from uns["histoexpr"]["slide_path"], one DataLoader worker, copy=True leaves the input alone
    ref = hx.pp.extract_features(cmu_tiles, encoder=tiny_encoder, batch_size=8, num_workers=0, progress=False,
                                 copy=True)
    got = hx.pp.extract_features(cmu_tiles, encoder=tiny_encoder, batch_size=8, num_workers=1, progress=False,
                                 key_added="X_feat", copy=True)
    assert "X_test_resnet" not in cmu_tiles.obsm
    np.testing.assert_array_equal(got.obsm["X_feat"], ref.obsm["X_test_resnet"])


def test_extract_features_bad_input(cmu_tiles, tiny_encoder, shared_data):
    import anndata as ad

    with pytest.raises(ValueError, match="pp.tile"):
        hx.pp.extract_features(ad.AnnData(np.zeros((3, 0))), "x.svs", encoder=tiny_encoder)
    other = hx.io.open_slide(shared_data / "slides" / "tcga-lung-rgb.png", mpp=0.5)
    with pytest.raises(ValueError, match="not the one these tiles were cut from"):
        hx.pp.extract_features(cmu_tiles, other, encoder=tiny_encoder, copy=True)


def test_resume_after_crash(cmu_slide, cmu_tiles, tmp_path):
    import zarr

    torch.manual_seed(0)
    tiny = get_encoder(TINY, weights="random")
    reference = hx.pp.extract_features(cmu_tiles, cmu_slide, encoder=tiny, batch_size=4, num_workers=0,
                                       progress=False, copy=True).obsm["X_test_resnet"]
    model = CrashingEncoder(tiny.module, crash_after=3)  # 18 tiles / 4 = 5 batches; dies in the 4th
    enc = get_encoder(model, name="crashy", transform=tiny.transform)
    model.calls = 0  # (dimension inference ran one forward)
    cache = tmp_path / "feats.zarr"
    tiles = cmu_tiles.copy()
    with pytest.raises(RuntimeError, match="simulated crash"):
        hx.pp.extract_features(tiles, cmu_slide, encoder=enc, batch_size=4, num_workers=0, cache=cache,
                               progress=False)
    assert "X_crashy" not in tiles.obsm
    done = zarr.open_group(str(cache), mode="r")["done"][:]
    assert done.sum() == 12 and done[:12].all()

    model.crash_after, model.calls = None, 0
    hx.pp.extract_features(tiles, cmu_slide, encoder=enc, batch_size=16, num_workers=0, cache=cache,
                           progress=False)
    assert model.calls == 2  # only the 2 unfinished batches (of the cache's 4 tiles) were computed
    np.testing.assert_array_equal(tiles.obsm["X_crashy"], reference)

    # a finished cache gives the same features without any forward pass
    model.calls = 0
    again = hx.pp.extract_features(cmu_tiles, cmu_slide, encoder=enc, num_workers=0, cache=cache,
                                   progress=False, copy=True)
    assert model.calls == 0
    np.testing.assert_array_equal(again.obsm["X_crashy"], reference)

    # a cache made for other tiles is recomputed (with a warning), never reused
    with pytest.warns(UserWarning, match="computed from other tiles"):
        fewer = hx.pp.extract_features(cmu_tiles[:10].copy(), cmu_slide, encoder=enc, num_workers=0, cache=cache,
                                       progress=False, copy=True)
    np.testing.assert_array_equal(fewer.obsm["X_crashy"], reference[:10])


def test_nan_features_are_reported(cmu_slide, cmu_tiles, tiny_encoder):
    model = NaNForSomeRows(tiny_encoder.module, bad={5, 13}, batch_size=8)
    enc = get_encoder(model, dim=96, transform=tiny_encoder.transform)
    with pytest.raises(ValueError, match="2 of 18 tiles got NaN/inf") as err:
        hx.pp.extract_features(cmu_tiles, cmu_slide, encoder=enc, batch_size=8, num_workers=0, progress=False,
                               copy=True)
    for i in (5, 13):
        assert cmu_tiles.obs_names[i] in str(err.value)
    assert err.value.tiles == [cmu_tiles.obs_names[5], cmu_tiles.obs_names[13]]


def test_spatialdata_input(shared_data, tiny_encoder):
    import spatialdata as sd
    from PIL import Image
    from spatialdata.models import Image2DModel

    img = np.asarray(Image.open(shared_data / "slides" / "tcga-lung-rgb.png").convert("RGB"))
    sdata = sd.SpatialData(images={"he": Image2DModel.parse(img.transpose(2, 0, 1), dims=("c", "y", "x"))})
    hx.pp.tile(sdata, image_key="he", slide_mpp=0.5, tile_size=128, tissue_threshold=0.0,
               filter_low_contrast=False)
    (key,) = list(sdata.tables)
    hx.pp.extract_features(sdata, encoder=tiny_encoder, batch_size=4, num_workers=0, progress=False)
    table = sdata.tables[key]
    assert table.obsm["X_test_resnet"].shape == (table.n_obs, 96)
    slide = hx.io.open_slide(sdata, image_key="he", mpp=0.5)
    expected = _direct_features(tiny_encoder, slide, table)
    np.testing.assert_allclose(table.obsm["X_test_resnet"], expected, rtol=1e-4, atol=1e-5)


def test_cohort_skips_finished_slides(shared_data, tmp_path, tiny_encoder):
    import anndata as ad

    slides = {
        "cmu": shared_data / "slides" / "cmu-1-small-region.svs",  # SVS (tiffslide)
        "mob": shared_data / "st_stutility_mob" / "MOB1.jpg",  # JPEG (PIL), no µm/px in the file
        "gone": tmp_path / "missing.svs",
    }
    kwargs = dict(out_dir=tmp_path / "out", encoder=tiny_encoder, tile_kwargs={"max_tiles": 6}, mpp={"mob": 1.0},
                  batch_size=4, num_workers=0, progress=False)
    with pytest.warns(UserWarning, match="failed"):
        summary = hx.pp.extract_features_cohort(slides, **kwargs)
    assert summary["slide_id"].tolist() == ["cmu", "mob", "gone"]
    assert summary["status"].tolist() == ["done", "done", "failed"]
    assert "not found" in summary["error"].iloc[2]
    for i in (0, 1):
        out = ad.read_h5ad(summary["output"].iloc[i])
        assert out.obsm["X_test_resnet"].shape == (6, 96) and out.n_obs == summary["n_tiles"].iloc[i]
        assert np.isfinite(out.obsm["X_test_resnet"]).all() and out.uns["histoexpr"]["encoder"] == TINY
    assert not list((tmp_path / "out").glob(".*.zarr"))  # caches removed once the slides are written
    again = hx.pp.extract_features_cohort({"cmu": slides["cmu"]}, **kwargs)
    assert again["status"].tolist() == ["skipped"]


def test_cohort_ids_and_closing(shared_data, tmp_path, tiny_encoder, monkeypatch):
    """A Slide given under an id gets that id in its tiles; slides the cohort opened are closed."""
    import anndata as ad

    from histoexpr.io import Slide

    closed = []
    original_close = Slide.close
    monkeypatch.setattr(Slide, "close", lambda self: (closed.append(self.slide_id), original_close(self))[1])
    path = shared_data / "slides" / "cmu-1-small-region.svs"
    kwargs = dict(out_dir=tmp_path, encoder=tiny_encoder, tile_kwargs={"max_tiles": 2}, batch_size=2,
                  num_workers=0, progress=False, errors="raise")
    summary = hx.pp.extract_features_cohort({"renamed": hx.io.open_slide(path), "from_path": path}, **kwargs)
    assert summary["status"].tolist() == ["done", "done"]
    for sid in ("renamed", "from_path"):
        out = ad.read_h5ad(tmp_path / f"{sid}.h5ad")
        assert out.obs["slide_id"].unique().tolist() == [sid] and out.uns["histoexpr"]["slide_id"] == sid
        assert list(out.uns["spatial"]) == [sid]
    assert closed == ["from_path"]  # the caller's Slide stays open, the one opened here is closed


@pytest.mark.slow
def test_cohort_on_dask(shared_data, tmp_path):
    """The pattern of docs/features.md: client.map over slides, one task per slide."""
    from functools import partial

    distributed = pytest.importorskip("dask.distributed")

    import dask

    run_one = partial(hx.pp.extract_features_cohort, out_dir=tmp_path, encoder=TINY, weights="random",
                      tile_kwargs={"max_tiles": 4}, batch_size=4, num_workers=1, progress=False)
    paths = [str(shared_data / "slides" / "cmu-1-small-region.svs")]
    # DataLoader workers are child processes: Dask worker processes must not be daemonic.
    with dask.config.set({"distributed.worker.daemon": False}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster, \
            distributed.Client(cluster) as client:
        futures = client.map(lambda path: run_one([path]), paths, pure=False)
        results = [f.result() for f in distributed.as_completed(futures)]
    assert [r["status"].iloc[0] for r in results] == ["done"]
    assert (tmp_path / "cmu-1-small-region.h5ad").exists()


@pytest.mark.gpu
def test_cuda_matches_cpu(cmu_slide, cmu_tiles, tiny_encoder, tmp_path):
    """CUDA path (pinned memory, channels-last, autocast, overlapped copies) against the CPU result."""
    cpu = hx.pp.extract_features(cmu_tiles, cmu_slide, encoder=tiny_encoder, batch_size=4, num_workers=0,
                                 device="cpu", progress=False, copy=True).obsm["X_test_resnet"]
    fp32 = hx.pp.extract_features(cmu_tiles, cmu_slide, encoder=tiny_encoder, batch_size=4, num_workers=1,
                                  device="cuda", precision="fp32", progress=False, copy=True)
    np.testing.assert_allclose(fp32.obsm["X_test_resnet"], cpu, rtol=1e-2, atol=1e-3)
    bf16 = hx.pp.extract_features(cmu_tiles, cmu_slide, encoder=tiny_encoder, batch_size=4, num_workers=1,
                                  device="cuda", cache=tmp_path / "c.zarr", progress=False, copy=True)
    x, y = bf16.obsm["X_test_resnet"], cpu
    corr = np.corrcoef(x.ravel(), y.ravel())[0, 1]
    assert corr > 0.99 and bf16.uns["histoexpr"]["encoder_precision"] == "bf16"
    assert next(tiny_encoder.module.parameters()).device.type == "cpu"  # module handed back
