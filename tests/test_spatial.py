"""Spatial prediction (SPEC §3.3, §3.4) and measured-to-tile alignment (SPEC §4)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import grid_tiles as _tiles
from conftest import tiny_sequoia

import histoexpr as hx
from histoexpr.models import HistoPrism, Sequoia
from histoexpr.tl._spatial import _masked_mse, _sliding_window_loop, window_index


def _tiny_sequoia(seed: int, d: int = 16, g: int = 6, genes=None):
    return tiny_sequoia(K=100, D=d, G=g, seed=seed, genes=genes)


@pytest.fixture(scope="module")
def her2st_c2(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = shared_data / "her2st"
        return hx.io.read_st(d / "C2.tsv.gz", d / "C2_selection.tsv", d / "C2_HE.jpg")


@pytest.fixture(scope="module")
def her2st_c3(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = shared_data / "her2st"
        return hx.io.read_st(d / "C3.tsv.gz", d / "C3_selection.tsv", d / "C3_HE.jpg")


# ------------------------------------------------------------------------------ window index
def test_window_index_brute_force():
    rng = np.random.default_rng(3)
    r, c = np.divmod(np.arange(15 * 17), 17)
    keep = rng.random(r.size) < 0.7
    r, c = r[keep] + 2, c[keep] + 1
    idx, corners = window_index(r, c, window=4, stride=2, min_tissue_tiles=5, windows="grid", grid_shape=(20, 21))
    n = r.size
    where = {(a, b): i for i, (a, b) in enumerate(zip(r, c))}
    expected = {}
    for r0 in range(0, 20 - 4 + 1, 2):  # from the slide's top-left, inside the 20 × 21 grid
        for c0 in range(0, 21 - 4 + 1, 2):
            t = [where[(a, b)] for a in range(r0, r0 + 4) for b in range(c0, c0 + 4) if (a, b) in where]
            if len(t) > 5:
                expected[(r0, c0)] = t + [n] * (16 - len(t))
    got = {tuple(k): v.tolist() for k, v in zip(corners, idx)}
    assert got == expected


def test_window_index_errors():
    with pytest.raises(ValueError, match="same \\(row, col\\)"):
        window_index(np.array([0, 0]), np.array([1, 1]), window=2, min_tissue_tiles=0)
    with pytest.raises(ValueError, match="never be exceeded"):
        window_index(np.array([0]), np.array([0]), window=10, min_tissue_tiles=100)
    with pytest.raises(ValueError, match="must be ≥ 0"):
        window_index(np.array([-1, 0]), np.array([0, 0]), window=2, min_tissue_tiles=0)


# ------------------------------------------------------------------------------ sliding window
def test_sliding_window_equals_loop_on_real_grid(her2st_c2):
    """Batched windows == one window at a time (SEQUOIA procedure) on the real C2 spot grid."""
    rows, cols = her2st_c2.obs["array_row"].to_numpy(), her2st_c2.obs["array_col"].to_numpy()
    tiles = _tiles(rows, cols)
    models = [_tiny_sequoia(0), _tiny_sequoia(1)]
    pred = hx.tl.predict_spatial(tiles, models, min_tissue_tiles=50, batch_size=7, device="cpu")
    ref = _sliding_window_loop(tiles.obsm["X_enc"], rows, cols, models, min_tissue_tiles=50)
    covered = pred.obs["n_windows"].to_numpy() > 0
    assert covered.sum() > 100
    np.testing.assert_allclose(pred.X[covered], ref[covered], atol=1e-5, rtol=0)
    assert np.isnan(pred.X[~covered]).all() and np.isnan(ref[~covered]).all()
    # the result is a new AnnData on the same tiles with units recorded
    assert list(pred.obs_names) == list(tiles.obs_names)
    np.testing.assert_array_equal(pred.obsm["spatial"], tiles.obsm["spatial"])
    assert pred.uns["spatial"] == tiles.uns["spatial"]
    assert pred.uns["histoexpr"]["units"] == "log2(FPKM-UQ+1)" and pred.uns["histoexpr"]["n_models"] == 2
    assert "X_enc" in tiles.obsm and tiles.n_vars == 0  # input untouched


def test_sliding_window_uses_all_tiles_of_a_window():
    """Upstream bug: without a batch axis only the first tile mattered. Ours depends on every slot."""
    r, c = np.divmod(np.arange(100), 10)
    tiles = _tiles(r, c)
    model = _tiny_sequoia(0)
    before = hx.tl.predict_spatial(tiles, model, windows="grid", device="cpu").X.copy()
    tiles.obsm["X_enc"][57] += 3.0  # not the first tile of the only window
    after = hx.tl.predict_spatial(tiles, model, windows="grid", device="cpu").X
    assert np.abs(after - before).max() > 1e-3
    # one window: every tile gets the window's prediction
    x = torch.from_numpy(tiles.obsm["X_enc"][None])
    with torch.no_grad():
        np.testing.assert_allclose(after, np.repeat(model(x).numpy(), 100, axis=0), atol=1e-5)


def test_sliding_window_slot_order_is_row_major():
    """windows="grid": tiles fill the slots by row then column; the rest of the 100 slots are zeros."""
    rng = np.random.default_rng(0)
    cells = rng.choice(100, size=70, replace=False)
    r, c = np.divmod(cells, 10)
    tiles = _tiles(r, c)
    model = _tiny_sequoia(2)
    got = hx.tl.predict_spatial(tiles, model, windows="grid", device="cpu").X
    order = np.lexsort((c, r))
    x = np.zeros((1, 100, 16), np.float32)
    x[0, :70] = tiles.obsm["X_enc"][order]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.repeat(expected, 70, axis=0), atol=1e-5)


def test_gene_selection_and_panel_errors():
    r, c = np.divmod(np.arange(144), 12)
    tiles = _tiles(r, c)
    genes = ["A", "B", "C", "D", "E", "F"]
    model = _tiny_sequoia(0, genes=genes)
    full = hx.tl.predict_spatial(tiles, model, device="cpu")
    assert list(full.var_names) == genes
    sub = hx.tl.predict_spatial(tiles, model, genes=["E", "B"], device="cpu")
    np.testing.assert_allclose(sub.X, full[:, ["E", "B"]].X, atol=1e-6)
    with pytest.raises(ValueError, match="none of the 2 requested genes"):
        hx.tl.predict_spatial(tiles, model, genes=["ENSG1", "ENSG2"], device="cpu")
    with pytest.warns(UserWarning, match="not in the model's panel"):
        part = hx.tl.predict_spatial(tiles, model, genes=["A", "ZZZ"], device="cpu")
    assert list(part.var_names) == ["A"]
    unnamed = _tiny_sequoia(0)
    unnamed.genes = None
    with pytest.raises(ValueError, match="pass the model's full gene list"):
        hx.tl.predict_spatial(tiles, unnamed, genes=["A"], device="cpu")


def test_bad_input_errors():
    r, c = np.divmod(np.arange(144), 12)
    tiles = _tiles(r, c)
    model = _tiny_sequoia(0)
    no_grid = tiles.copy()
    del no_grid.obs["row"]
    with pytest.raises(ValueError, match="integer grid coordinates"):
        hx.tl.predict_spatial(no_grid, model)
    sparse = _tiles(np.arange(40) * 3, np.arange(40) * 3)  # a diagonal: no window has > 50 tiles
    with pytest.raises(ValueError, match="no 10×10 window holds more than 50"):
        hx.tl.predict_spatial(sparse, model)
    wrong_dim = _tiles(r, c, d=8)
    with pytest.raises(ValueError, match="input_dim=16"):
        hx.tl.predict_spatial(wrong_dim, model)
    nan = tiles.copy()
    nan.obsm["X_enc"][3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hx.tl.predict_spatial(nan, model)
    with pytest.raises(ValueError, match="takes 100 tokens"):
        hx.tl.predict_spatial(tiles, model, window=8, min_tissue_tiles=10)
    with pytest.raises(KeyError, match="X_uni"):
        hx.tl.predict_spatial(tiles, model, use_rep="X_uni")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    r, c = np.divmod(np.arange(144), 12)
    with pytest.raises(RuntimeError, match="CUDA is not available; pass device='cpu'"):
        hx.tl.predict_spatial(_tiles(r, c), _tiny_sequoia(0), device="cuda")


def test_default_features_follow_feature_key_like_predict_bulk():
    # pp.extract_features(..., key_added=) records the key in uns["histoexpr"]["feature_key"];
    # predict_spatial must pick the same features as predict_bulk / pp.cluster_features
    r, c = np.divmod(np.arange(144), 12)
    tiles = _tiles(r, c)
    tiles.obsm["X_other"] = tiles.obsm["X_enc"] + 1.0
    tiles.uns["histoexpr"].update({"encoder": "resnet50", "feature_key": "X_other"})
    model = _tiny_sequoia(0)
    pred = hx.tl.predict_spatial(tiles, model, device="cpu")
    assert pred.uns["histoexpr"]["use_rep"] == "X_other"
    np.testing.assert_allclose(pred.X, hx.tl.predict_spatial(tiles, model, use_rep="X_other", device="cpu").X)


def test_model_id_is_the_checkpoint_as_in_predict_bulk(tmp_path):
    r, c = np.divmod(np.arange(144), 12)
    tiles = _tiles(r, c)
    _tiny_sequoia(0).save_pretrained(tmp_path / "ckpt")
    model = Sequoia.from_pretrained(tmp_path / "ckpt")
    spatial = hx.tl.predict_spatial(tiles, model, device="cpu")
    bulk = hx.tl.predict_bulk(tiles, model, device="cpu")
    assert spatial.uns["histoexpr"]["model"] == bulk.uns["histoexpr"]["model"] == str(tmp_path / "ckpt")


def test_several_slides_processed_separately():
    r, c = np.divmod(np.arange(144), 12)
    a, b = _tiles(r, c, seed=0, slide_id="a"), _tiles(r, c, seed=1, slide_id="b")
    both = ad.concat([a, b], uns_merge="first")
    both.obsm["X_enc"] = np.vstack([a.obsm["X_enc"], b.obsm["X_enc"]])
    model = _tiny_sequoia(0)
    joint = hx.tl.predict_spatial(both, model, device="cpu")
    np.testing.assert_allclose(joint.X[:144], hx.tl.predict_spatial(a, model, device="cpu").X, atol=1e-6)
    np.testing.assert_allclose(joint.X[144:], hx.tl.predict_spatial(b, model, device="cpu").X, atol=1e-6)


@pytest.mark.parametrize("method", ["sliding_window", "direct"])
def test_user_model_mode_is_restored(method):
    # predictions run in eval mode, but a model the user is training stays in train mode
    r, c = np.divmod(np.arange(150), 15)
    tiles = _tiles(r, c)
    if method == "direct":
        torch.manual_seed(0)
        model = HistoPrism(input_dim=16, num_outputs=5, hidden_dim=32, nheads=4, dim_feedforward=64, dropout=0.5)
    else:
        model = _tiny_sequoia(0)
    expected = hx.tl.predict_spatial(tiles, model.eval(), method=method, device="cpu").X
    model.train()
    got = hx.tl.predict_spatial(tiles, model, method=method, device="cpu").X
    assert model.training and all(m.training for m in model.modules())
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_predictions_written_to_spatialdata():
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel

    r, c = np.divmod(np.arange(144), 12)
    tiles = _tiles(r, c)
    sdata = SpatialData(shapes={"he_tiles": ShapesModel.parse(hx.io.tiles_to_shapes(tiles, size0=256.0))})
    pred = hx.tl.predict_spatial(tiles, _tiny_sequoia(0), sdata=sdata, table_key="sequoia", device="cpu")
    table = sdata.tables["sequoia"]
    assert table.uns["spatialdata_attrs"]["region"] == "he_tiles"
    np.testing.assert_allclose(table.X, pred.X)
    assert list(table.obs["tile_id"]) == list(tiles.obs["tile_id"])


# ------------------------------------------------------------------------------ direct model
def test_direct_prediction_matches_model():
    r, c = np.divmod(np.arange(150), 15)
    tiles = _tiles(r, c)
    torch.manual_seed(0)
    model = HistoPrism(input_dim=16, num_outputs=5, conditions=["BRCA", "LUAD"], hidden_dim=32, nheads=4,
                       dim_feedforward=64).eval()
    pred = hx.tl.predict_spatial(tiles, model, method="direct", condition="LUAD", device="cpu")
    with torch.no_grad():
        expected = model(torch.from_numpy(tiles.obsm["X_enc"]), torch.tensor([1])).numpy()
    np.testing.assert_allclose(pred.X, expected, atol=1e-5)
    assert pred.uns["histoexpr"]["units"] == "log1p(counts)"
    with pytest.raises(ValueError, match="pass `condition=`"):
        hx.tl.predict_spatial(tiles, model, method="direct")
    with pytest.raises(ValueError, match="unknown condition"):
        hx.tl.predict_spatial(tiles, model, method="direct", condition="GBM")


# ------------------------------------------------------------------------------ measured → tiles
def test_map_measured_to_tiles_matches_sklearn(her2st_c2):
    from sklearn.neighbors import NearestNeighbors

    spots = her2st_c2[:, :50].copy()
    # a regular tile grid over the section, pitch 128 px
    xy = spots.obsm["spatial"]
    xs = np.arange(xy[:, 0].min(), xy[:, 0].max(), 128.0)
    ys = np.arange(xy[:, 1].min(), xy[:, 1].max(), 128.0)
    gx, gy = np.meshgrid(np.arange(xs.size), np.arange(ys.size))
    tiles = _tiles(gy.ravel(), gx.ravel())
    tiles.obsm["spatial"] = np.c_[xs[gx.ravel()], ys[gy.ravel()]]
    truth = hx.pp.map_measured_to_tiles(spots, tiles, k=4)
    _, nn = NearestNeighbors(n_neighbors=4).fit(xy).kneighbors(tiles.obsm["spatial"])
    x = spots.X.toarray() if hasattr(spots.X, "toarray") else spots.X
    np.testing.assert_allclose(truth.X, x[nn].mean(1), rtol=1e-5, atol=1e-6)
    assert list(truth.var_names) == list(spots.var_names)

    # 3 × 3 median filter over the tiles present around each tile, brute force
    filt = hx.pp.map_measured_to_tiles(spots, tiles, k=4, median_filter=True)
    where = {(a, b): i for i, (a, b) in enumerate(zip(tiles.obs.row, tiles.obs.col))}
    for i in [0, 17, len(where) // 2, len(where) - 1]:
        a, b = tiles.obs.row.iloc[i], tiles.obs.col.iloc[i]
        nb = [where[(a + da, b + db)] for da in (-1, 0, 1) for db in (-1, 0, 1) if (a + da, b + db) in where]
        np.testing.assert_allclose(filt.X[i], np.median(truth.X[nb], axis=0), rtol=1e-5, atol=1e-6)

    uniq = hx.pp.map_measured_to_tiles(spots, tiles, k=4, min_unique=10)
    n_unique = np.array([np.unique(truth.X[:, j]).size for j in range(truth.n_vars)])
    assert list(uniq.var_names) == list(truth.var_names[n_unique >= 10])


def test_map_measured_to_tiles_coordinate_mismatch(her2st_c2):
    r, c = np.divmod(np.arange(16), 4)
    tiles = _tiles(r, c)
    tiles.obsm["spatial"] = tiles.obsm["spatial"] + 1e6
    with pytest.raises(ValueError, match="do not overlap"):
        hx.pp.map_measured_to_tiles(her2st_c2, tiles)


def test_map_measured_to_tiles_refuses_several_slides():
    # tiles of two slides share pixel frames and grid cells: mapping them together would mix slides
    r, c = np.divmod(np.arange(16), 4)
    both = ad.concat([_tiles(r, c, slide_id="a"), _tiles(r, c, slide_id="b")], uns_merge="first")
    both.obsm["spatial"] = np.vstack([_tiles(r, c).obsm["spatial"]] * 2)
    spots = ad.AnnData(np.random.default_rng(0).poisson(3, size=(30, 4)).astype(np.float32))
    spots.obsm["spatial"] = np.random.default_rng(1).uniform(0, 1024, size=(30, 2))
    with pytest.raises(ValueError, match="several slides"):
        hx.pp.map_measured_to_tiles(spots, both)
    one = hx.pp.map_measured_to_tiles(spots, both[both.obs["slide_id"] == "a"])
    assert one.n_obs == 16


# ------------------------------------------------------------------------------ training
def test_masked_mse_ignores_missing_genes():
    pred, y = torch.randn(10, 4), torch.randn(10, 4)
    mask = torch.tensor([True, False, True, True])
    loss = _masked_mse(pred, y, mask)
    expected = ((pred[:, mask] - y[:, mask]) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    y2 = y.clone()
    y2[:, 1] = 1e6
    torch.testing.assert_close(_masked_mse(pred, y2, mask), loss)


def _with_features(spots, genes, seed):
    """Real counts; features = noisy log1p expression of the panel (learnable, not an image encoder)."""
    rng = np.random.default_rng(seed)
    a = spots[:, genes].copy()
    y = np.log1p(a.X.toarray() if hasattr(a.X, "toarray") else a.X)
    proj = np.random.default_rng(0).normal(size=(len(genes), 16)) / np.sqrt(len(genes))
    a.obsm["X_enc"] = (y @ proj + 0.1 * rng.normal(size=(a.n_obs, 16))).astype(np.float32)
    a.obs["cancer"] = "BRCA"
    return a


def test_train_spatial_on_her2st(her2st_c2, her2st_c3, tmp_path):
    x = her2st_c2.X.toarray() if hasattr(her2st_c2.X, "toarray") else her2st_c2.X
    genes = list(her2st_c2.var_names[np.argsort(-x.sum(0))[:40]])
    c2 = _with_features(her2st_c2, genes, 0)
    c3 = _with_features(her2st_c3, genes, 1)
    c3 = c3[:, genes[:35]].copy()  # C3 "does not measure" 5 panel genes: masked in its loss
    kw = dict(use_rep="X_enc", genes=genes, condition_key="cancer", train=["C2"], val=["C3"], epochs=30, lr=1e-2,
              patience=10, device="cpu", model_kwargs={"hidden_dim": 32, "nheads": 4, "dim_feedforward": 64})
    res = hx.tl.train_spatial({"C2": c2, "C3": c3}, checkpoint_dir=tmp_path / "ckpt", random_state=0, **kw)
    model, h = res.model, res.model.history
    assert res.best_epoch == h["best_epoch"] and res.epochs_run == h["epochs_run"] == len(res.history)
    assert res.best_score == pytest.approx(res.history["val_loss"].min())
    assert model.genes == genes and model.conditions == ["BRCA"]
    assert h["best_epoch"] == int(np.argmin(h["val_loss"])) and len(h["train_loss"]) == h["epochs_run"]
    # same seed → same model (short runs)
    short = {**kw, "epochs": 3}
    one, two = (hx.tl.train_spatial({"C2": c2, "C3": c3}, random_state=5, **short).model for _ in range(2))
    for (k, v), (_, w) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(v, w, msg=k)
    # checkpoint round trip → same predictions through predict_spatial
    loaded = HistoPrism.from_pretrained(tmp_path / "ckpt")
    assert loaded.genes == genes and loaded.conditions == ["BRCA"]
    p1 = hx.tl.predict_spatial(c3, model, method="direct", use_rep="X_enc", condition="BRCA", device="cpu")
    p2 = hx.tl.predict_spatial(c3, loaded, method="direct", use_rep="X_enc", condition="BRCA", device="cpu")
    np.testing.assert_allclose(p1.X, p2.X, atol=1e-6)
    # learns: better than predicting the training mean on the held-out section (masked genes excluded)
    truth = np.log1p(c3.X.toarray() if hasattr(c3.X, "toarray") else c3.X)
    mean = np.log1p(c2[:, genes[:35]].X.toarray()).mean(0)
    mse = ((p1[:, genes[:35]].X - truth) ** 2).mean()
    assert mse < 0.8 * ((mean - truth) ** 2).mean()
    np.testing.assert_allclose(mse, h["val_loss"][h["best_epoch"]], rtol=1e-4)


def test_train_spatial_bad_splits(her2st_c2):
    a = _with_features(her2st_c2, list(her2st_c2.var_names[:5]), 0)
    with pytest.raises(ValueError, match="more than one split"):
        hx.tl.train_spatial({"C2": a}, use_rep="X_enc", train=["C2"], val=["C2"], epochs=1)
    with pytest.raises(ValueError, match="unknown slide ids"):
        hx.tl.train_spatial({"C2": a}, use_rep="X_enc", train=["C9"], epochs=1)
    with pytest.raises(ValueError, match="measures none"):
        hx.tl.train_spatial({"C2": a}, use_rep="X_enc", genes=["NOT_A_GENE"], epochs=1)


def test_train_spatial_without_validation_keeps_last_epoch(her2st_c2, tmp_path):
    a = _with_features(her2st_c2, list(her2st_c2.var_names[:8]), 0)
    kw = dict(use_rep="X_enc", epochs=3, lr=1e-3, device="cpu", seed=1,
              model_kwargs={"hidden_dim": 16, "nheads": 2, "dim_feedforward": 32})
    model = hx.tl.train_spatial({"C2": a}, checkpoint_dir=tmp_path / "ckpt", **kw).model
    assert model.history["best_epoch"] == 2 and model.history["epochs_run"] == 3
    assert model.history["val_loss"] == [None, None, None]
    loaded = HistoPrism.from_pretrained(tmp_path / "ckpt")
    for (k, v), (_, w) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(v, w, msg=k)
    with pytest.raises(ValueError, match="epochs must be"):
        hx.tl.train_spatial({"C2": a}, use_rep="X_enc", epochs=0)


@pytest.mark.gpu
def test_sliding_window_cuda_bf16_close_to_cpu():
    r, c = np.divmod(np.arange(400), 20)
    tiles = _tiles(r, c)
    models = [_tiny_sequoia(0), _tiny_sequoia(1)]
    cpu = hx.tl.predict_spatial(tiles, models, device="cpu")
    gpu = hx.tl.predict_spatial(tiles, models, device="cuda")  # bf16 autocast
    np.testing.assert_allclose(gpu.X, cpu.X, atol=5e-2, rtol=5e-2)
    assert np.corrcoef(gpu.X.ravel(), cpu.X.ravel())[0, 1] > 0.999
