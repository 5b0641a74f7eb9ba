"""io.open_slide / Slide on the real slides in ../shared/data/slides and her2st."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import histoexpr as hx
from histoexpr.io import SlideError


@pytest.fixture(scope="module")
def slides_dir(shared_data):
    return shared_data / "slides"


def test_svs_metadata(slides_dir):
    slide = hx.io.open_slide(slides_dir / "cmu-1-small-region.svs")
    assert slide.mpp == pytest.approx(0.499)
    assert slide.dimensions == (2220, 2967)
    assert slide.slide_id == "cmu-1-small-region"
    assert slide.level_count == 1


def test_missing_mpp_is_a_clear_error(slides_dir):
    with pytest.raises(SlideError, match="mpp"):
        hx.io.open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs")
    slide = hx.io.open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.25)
    assert slide.level_count == 2 and slide.mpp == 0.25


@pytest.mark.parametrize("bad_mpp", [0, -1, float("nan")])
def test_bad_mpp(slides_dir, bad_mpp):
    with pytest.raises(SlideError, match="mpp"):
        hx.io.open_slide(slides_dir / "cmu-1-small-region.svs", mpp=bad_mpp)


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(SlideError, match="cannot read"):
        hx.io.open_slide(junk, mpp=0.5)
    with pytest.raises(SlideError, match="not found"):
        hx.io.open_slide(tmp_path / "nope.svs")
    bad_jpg = tmp_path / "bad.jpg"
    bad_jpg.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(SlideError, match="cannot read"):
        hx.io.open_slide(bad_jpg, mpp=0.5)


def test_read_region_matches_raw_pixels_and_pads_outside(slides_dir):
    import tiffslide

    path = slides_dir / "cmu-1-small-region.svs"
    slide = hx.io.open_slide(path)
    raw = tiffslide.TiffSlide(path).read_region((100, 200), 0, (64, 32), as_array=True)
    np.testing.assert_array_equal(slide.read_region((100, 200), 0, (64, 32)), raw)
    # half outside the image on the left/top: white there, image pixels inside
    patch = slide.read_region((-10, -20), 0, (30, 40))
    assert (patch[:20] == 255).all() and (patch[:, :10] == 255).all()
    np.testing.assert_array_equal(patch[20:, 10:], slide.read_region((0, 0), 0, (20, 20)))
    assert (slide.read_region((5000, 5000), 0, (8, 8)) == 255).all()


def test_read_tile_uses_pyramid_at_40x(slides_dir):
    slide = hx.io.open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.25)
    # 256 px at 0.5 µm/px = 512 level-0 px; level 1 (downsample ~2) holds it at 256 px
    assert slide.get_best_level_for_downsample(2.0) == 1
    tile = slide.read_tile(1024, 1024, 512, 256)
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    from PIL import Image

    full = slide.read_region((1024, 1024), 0, (512, 512))
    ref = np.asarray(Image.fromarray(full).resize((256, 256), Image.BILINEAR)).astype(float)
    # different pyramid level (JPEG2000 re-encoded) but the same tissue
    assert np.corrcoef(ref.ravel(), tile.astype(float).ravel())[0, 1] > 0.9


def test_read_tile_rejects_empty_sizes(slides_dir):
    slide = hx.io.open_slide(slides_dir / "cmu-1-small-region.svs")
    with pytest.raises(SlideError, match="positive"):
        slide.read_tile(0, 0, 256, 0)
    with pytest.raises(SlideError, match="positive"):
        slide.read_tile(0, 0, 0, 224)


def test_pickle_roundtrip_reads_same_pixels(slides_dir):
    slide = hx.io.open_slide(slides_dir / "cmu-1-small-region.svs")
    tile = slide.read_tile(300, 400, 256, 224)
    clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(clone.read_tile(300, 400, 256, 224), tile)


def test_large_jpeg(shared_data):
    slide = hx.io.open_slide(shared_data / "her2st" / "C3_HE.jpg", mpp=0.69)
    assert slide.backend == "pil" and slide.dimensions == (9270, 9936)
    assert slide.level_count >= 2  # virtual pyramid for thumbnails
    thumb = slide.thumbnail(512)
    assert max(thumb.shape[:2]) == 512
    with pytest.raises(SlideError, match="mpp"):
        hx.io.open_slide(shared_data / "her2st" / "C3_HE.jpg")


def test_spatialdata_image_element(shared_data):
    sd = pytest.importorskip("spatialdata")
    sdata = sd.read_zarr(shared_data / "xenium_segtraq/tests/data/xenium_sp_subset.zarr")
    with pytest.warns(UserWarning, match="assuming"):
        raw = hx.io.open_slide(sdata, image_key="he_image")
    assert raw.dimensions == (527, 448) and raw.level_count == 5
    # read_xenium records that "global" is in 0.2125 µm morphology pixels here, not µm
    slide = hx.io.open_slide(hx.io.read_xenium(sdata), image_key="he_image")
    assert slide.mpp == pytest.approx(raw.mpp * 0.2125, rel=1e-3)
    assert 0.3 < slide.mpp < 0.45
    patch = slide.read_region((10, 20), 0, (16, 8))
    expected = np.moveaxis(np.asarray(sdata.images["he_image"]["scale0"]["image"][:, 20:28, 10:26]), 0, -1)
    np.testing.assert_array_equal(patch, expected)
    # the one image-key rule (histoexpr.io.pick_image_key): the only RGB image is the H&E
    assert hx.io.open_slide(sdata, mpp=1.0).slide_id == "he_image"
    with pytest.raises(SlideError, match="coordinate system"):
        hx.io.open_slide(sdata, image_key="he_image", coordinate_system="nope")


def test_thumbnail_in_strips_when_no_small_level(slides_dir, monkeypatch):
    """A slide without a small pyramid level is thumbnailed strip by strip (bounded memory)."""
    import histoexpr.io._slide as slide_module

    slide = hx.io.open_slide(slides_dir / "cmu-1-small-region.svs")
    whole = slide.thumbnail(500).astype(float)
    monkeypatch.setattr(slide_module, "_THUMBNAIL_READ_PIXELS", 2220 * 100)
    strips = slide.thumbnail(500).astype(float)
    assert strips.shape == whole.shape
    assert np.abs(strips - whole).mean() < 4  # BOX vs bilinear resampling only
    assert np.corrcoef(strips.ravel(), whole.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("name,mpp", [("cmu-1-small-region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25)])
def test_direct_tile_decoding_equals_tiffslide(slides_dir, name, mpp):
    """The fast tifffile tile decoder returns exactly tiffslide's pixels, on every level."""
    import tiffslide

    slide = hx.io.open_slide(slides_dir / name, mpp=mpp)
    assert slide._tiff_levels() is not None, "tiled pyramid uses the direct decoder"
    reference = tiffslide.TiffSlide(slides_dir / name)
    rng = np.random.default_rng(0)
    for level in range(slide.level_count):
        lw, lh = slide.level_dimensions[level]
        ds = reference.level_downsamples[level]
        for _ in range(15):
            w, h = (int(v) for v in rng.integers(1, 400, 2))
            x, y = int(rng.integers(0, lw - w)), int(rng.integers(0, lh - h))
            ours = slide._read_level_box(level, x, y, w, h)
            loc = (int(np.ceil(x * ds - 1e-6)), int(np.ceil(y * ds - 1e-6)))
            np.testing.assert_array_equal(ours, reference.read_region(loc, level, (w, h), as_array=True))


def _random_regions(slide, n, seed=0, size=256):
    w, h = slide.dimensions
    rng = np.random.default_rng(seed)
    return list(zip(rng.integers(0, w - size, n).tolist(), rng.integers(0, h - size, n).tolist()))


def test_concurrent_threads_read_the_same_pixels(slides_dir):
    """tile()'s contrast check reads from threads: seeks and reads of the shared file must not interleave."""
    from concurrent.futures import ThreadPoolExecutor

    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    regions = _random_regions(hx.io.open_slide(path, mpp=0.5), 120)
    reference = hx.io.open_slide(path, mpp=0.5)
    expected = [reference.read_region(xy, 0, (256, 256)) for xy in regions]
    shared = hx.io.open_slide(path, mpp=0.5)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda xy: shared.read_region(xy, 0, (256, 256)), regions))
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert shared._tiff_levels()[0].tif.filehandle.has_lock  # the race above is not always hit


def test_forked_dataloader_workers_open_their_own_files(slides_dir):
    """A slide already read in the parent is forked into DataLoader workers: they must not share its file offset."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    path = slides_dir / "cmu-1-small-region.svs"
    slide = hx.io.open_slide(path)
    regions = _random_regions(slide, 160)
    expected = np.stack([hx.io.open_slide(path).read_tile(x, y, 256, 128) for x, y in regions])
    slide.read_region((0, 0), 0, (8, 8))  # the parent now holds open file handles

    class Tiles(Dataset):
        def __len__(self):
            return len(regions)

        def __getitem__(self, i):
            return torch.from_numpy(slide.read_tile(*regions[i], 256, 128).copy())

    ctx = torch.multiprocessing.get_context("fork")
    got = torch.cat(list(DataLoader(Tiles(), batch_size=8, num_workers=2, multiprocessing_context=ctx))).numpy()
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
