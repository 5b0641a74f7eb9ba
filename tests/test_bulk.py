"""tl.predict_bulk and tl.train_bulk: inputs, fold models, errors, SEQUOIA protocol, learning."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SEQUOIA_SMALL
from conftest import tiny_sequoia as _tiny_sequoia

from histoexpr.models import Sequoia
from histoexpr.tl import predict_bulk, train_bulk
from histoexpr.tl._bulk import EarlyStopping, patient_folds

SMALL = SEQUOIA_SMALL


def tiny_sequoia(K=6, D=8, G=5, seed=0, zero_pos=False):
    return _tiny_sequoia(K=K, D=D, G=G, seed=seed, genes=[f"g{i}" for i in range(G)], zero_pos=zero_pos)


def blob_tiles(slide_id, centres, copies=3, seed=0):
    """Tiles whose features are `copies` jittered copies of K far-apart centres (K-means is exact)."""
    rng = np.random.default_rng(seed)
    feats = np.repeat(centres, copies, axis=0) + 1e-3 * rng.normal(size=(len(centres) * copies, centres.shape[1]))
    n = len(feats)
    obs = pd.DataFrame(
        {"slide_id": pd.Categorical([slide_id] * n), "patient": "P_" + slide_id, "row": np.arange(n), "col": 0},
        index=[f"{slide_id}_{i}" for i in range(n)],
    )
    tiles = ad.AnnData(X=np.zeros((n, 0), np.float32), obs=obs)
    tiles.obsm["X_uni"] = feats.astype(np.float32)
    tiles.uns["histoexpr"] = {"encoder": "uni"}
    return tiles, feats


def test_predict_bulk_from_array_matches_forward():
    model = tiny_sequoia()
    x = np.random.default_rng(0).normal(size=(7, 6, 8)).astype(np.float32)
    model.train()
    out = predict_bulk(x, model, batch_size=3, device="cpu")
    assert model.training  # the user's model is left as it was
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out.X, expected, rtol=1e-5, atol=1e-6)
    assert out.shape == (7, 5) and list(out.var_names) == [f"g{i}" for i in range(5)]
    assert out.uns["histoexpr"]["units"] == "log2(FPKM-UQ+1)"
    assert list(out.obs["slide_id"]) == [f"slide_{i}" for i in range(7)]


def test_predict_bulk_from_tiles_clusters_each_slide():
    model = tiny_sequoia(zero_pos=True)
    rng = np.random.default_rng(1)
    centres_a = rng.normal(size=(6, 8)) * 10
    centres_b = rng.normal(size=(6, 8)) * 10
    ta, _ = blob_tiles("A", centres_a, seed=1)
    tb, _ = blob_tiles("B", centres_b, copies=4, seed=2)
    tiles = ad.concat([ta, tb], uns_merge="same")
    tiles.obs["slide_id"] = tiles.obs["slide_id"].astype("category")
    before = tiles.copy()
    out = predict_bulk(tiles, model, device="cpu")
    with torch.no_grad():
        expected = model(torch.from_numpy(np.stack([centres_a, centres_b]).astype(np.float32))).numpy()
    np.testing.assert_allclose(out.X, expected, rtol=1e-3, atol=1e-3)
    assert list(out.obs_names) == ["A", "B"]
    assert out.obs.loc["A", "n_tiles"] == 18 and out.obs.loc["B", "n_tiles"] == 24
    assert out.obs.loc["B", "patient"] == "P_B" and "row" not in out.obs  # per-slide metadata only
    assert out.uns["histoexpr"]["use_rep"] == "X_uni"
    # nothing the user gave us was changed
    np.testing.assert_array_equal(tiles.obsm["X_uni"], before.obsm["X_uni"])
    assert set(tiles.uns) == set(before.uns)
    # a list of per-slide AnnData gives the same
    out_list = predict_bulk([ta, tb], model, device="cpu")
    np.testing.assert_allclose(out_list.X, out.X, rtol=1e-5, atol=1e-5)


def test_predict_bulk_uses_cached_cluster_means():
    model = tiny_sequoia()
    tiles, _ = blob_tiles("S1", np.random.default_rng(2).normal(size=(6, 8)) * 10)
    means = np.random.default_rng(3).normal(size=(6, 8)).astype(np.float32)
    tiles.uns["kmeans"] = {"means": {"S1": means}}
    out = predict_bulk(tiles, model, device="cpu")
    with torch.no_grad():
        expected = model(torch.from_numpy(means[None])).numpy()
    np.testing.assert_allclose(out.X, expected, rtol=1e-5, atol=1e-6)


def test_predict_bulk_after_pp_cluster_features():
    from histoexpr.pp import cluster_features

    model = tiny_sequoia()
    tiles, _ = blob_tiles("S", np.random.default_rng(5).normal(size=(6, 8)) * 10)
    cluster_features(tiles, n_clusters=6)
    out = predict_bulk(tiles, model, device="cpu")
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(tiles.uns["kmeans"]["means"]["S"])[None])).numpy()
    np.testing.assert_allclose(out.X, expected, rtol=1e-5, atol=1e-6)
    fresh = tiles.copy()
    del fresh.uns["kmeans"]
    np.testing.assert_allclose(predict_bulk(fresh, model, device="cpu").X, out.X, rtol=1e-5, atol=1e-6)


def test_predict_bulk_fold_models_and_checkpoint_paths(tmp_path):
    models = [tiny_sequoia(seed=s) for s in range(3)]
    paths = [m.save_pretrained(tmp_path / f"fold_{i}") for i, m in enumerate(models)]
    x = np.random.default_rng(4).normal(size=(4, 6, 8)).astype(np.float32)
    mean = predict_bulk(x, [str(p) for p in paths], device="cpu")
    each = predict_bulk(x, models, average_folds=False, device="cpu")
    assert isinstance(each, list) and len(each) == 3
    np.testing.assert_allclose(mean.X, np.mean([a.X for a in each], axis=0), rtol=1e-5, atol=1e-6)
    assert mean.uns["histoexpr"]["n_models"] == 3
    assert mean.uns["histoexpr"]["model"] == [str(p) for p in paths]


def test_predict_bulk_bad_inputs():
    model = tiny_sequoia()
    with pytest.raises(ValueError, match="feature dimension 9 but the model expects input_dim=8"):
        predict_bulk(np.zeros((2, 6, 9), np.float32), model, device="cpu")
    with pytest.raises(ValueError, match="needs 6"):
        predict_bulk(np.zeros((2, 5, 8), np.float32), model, device="cpu")
    x = np.zeros((2, 6, 8), np.float32)
    x[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predict_bulk(x, model, device="cpu")
    few, _ = blob_tiles("few", np.random.default_rng(0).normal(size=(2, 8)), copies=2)
    with pytest.raises(ValueError, match="slide 'few' has 4 tiles, fewer than the 6 clusters"):
        predict_bulk(few, model, device="cpu")
    nan_tiles, _ = blob_tiles("nan", np.random.default_rng(0).normal(size=(6, 8)), copies=2)
    nan_tiles.obsm["X_uni"][3, 0] = np.nan
    with pytest.raises(ValueError, match="tile features of slide 'nan'.*NaN"):
        predict_bulk(nan_tiles, model, device="cpu")
    wrong_dim, _ = blob_tiles("w", np.random.default_rng(0).normal(size=(6, 4)), copies=2)
    with pytest.raises(ValueError, match="feature dimension 4"):
        predict_bulk(wrong_dim, model, device="cpu")


# --------------------------------------------------------------------------------------------
# Training protocol
# --------------------------------------------------------------------------------------------


def test_early_stopping_rule():
    stop = EarlyStopping(patience=3, delta=0.5)
    seq = [
        (1.0, 0.10),  # best MSE -> save
        (0.8, 0.05),  # best MSE -> save (corr did not improve: irrelevant while MSE improves)
        (0.9, 0.20),  # 1 epoch w/o MSE improvement
        (0.9, 0.30),  # 2
        (1.0, 0.40),  # 3 = patience: MSE < 0.8 + 0.5 and corr improved -> keep going, save
        (1.2, 0.45),  # still within delta, corr improved -> save
        (1.1, 0.44),  # corr not improved for 1 epoch -> go on, no save
        (1.1, 0.43),  # 2
        (1.1, 0.42),  # 3 = patience without a correlation improvement -> stop
    ]
    decisions = [stop.step(m, c) for m, c in seq]
    assert decisions == [
        (True, False), (True, False), (False, False), (False, False), (True, False), (True, False),
        (False, False), (False, False), (False, True),
    ]  # fmt: skip
    stop = EarlyStopping(patience=2, delta=0.5)
    decisions = [stop.step(m, c) for m, c in [(1.0, 0.1), (1.1, 0.2), (1.2, 0.3), (1.5, 0.9)]]
    assert decisions[-2:] == [(True, False), (False, True)]  # MSE >= best + delta stops despite a better corr
    stop = EarlyStopping(patience=2, delta=0.5)
    decisions = [stop.step(m, c) for m, c in [(1.0, 0.5), (1.1, 0.4), (1.1, 0.45)]]
    assert decisions[-1] == (False, True)  # patience reached, correlation not improved for 2 epochs
    stop = EarlyStopping(patience=2)
    decisions = [stop.step(m, c) for m, c in [(1.0, 0.5), (1.1, 0.4), (0.9, 0.3)]]
    assert decisions[-1] == (True, False)  # a new best MSE resets the count
    stop = EarlyStopping(patience=1)
    assert [stop.step(m, c) for m, c in [(1.0, float("nan")), (1.2, float("nan"))]][-1] == (False, True)


def test_patient_folds_group_and_deterministic():
    patients = np.repeat([f"p{i}" for i in range(23)], [1, 2, 3] * 7 + [1, 1])
    f1 = patient_folds(patients, n_folds=5, seed=0)
    assert np.array_equal(f1, patient_folds(patients, n_folds=5, seed=0))
    assert not np.array_equal(f1, patient_folds(patients, n_folds=5, seed=1))
    per_patient = pd.DataFrame({"p": patients, "f": f1}).groupby("p")["f"].nunique()
    assert (per_patient == 1).all()
    counts = pd.Series(f1).groupby(pd.Series(f1)).size()
    assert len(counts) == 5
    n_patients = pd.DataFrame({"p": patients, "f": f1}).groupby("f")["p"].nunique()
    assert n_patients.max() - n_patients.min() <= 1


def planted_cohort(n_patients=24, slides_per_patient=2, K=6, D=8, G=12, latent=3, seed=0):
    rng = np.random.default_rng(seed)
    n = n_patients * slides_per_patient
    z = rng.normal(size=(n, latent))
    X = z[:, None, :] @ rng.normal(size=(latent, D)) + 0.5 * rng.normal(size=(n, K, D))
    Y = z @ rng.normal(size=(latent, G)) + 0.3 * rng.normal(size=(n, G))
    patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], slides_per_patient)
    return X.astype(np.float32), Y.astype(np.float32), patients


def test_train_bulk_protocol_checkpoints_and_determinism(tmp_path):
    X, Y, patients = planted_cohort()
    genes = [f"G{i}" for i in range(Y.shape[1])]
    kwargs = dict(model_config=SMALL, n_folds=3, max_epochs=30, patience=4, batch_size=8, seed=7, progress=False, device="cpu")
    res = train_bulk(X, pd.DataFrame(Y, columns=genes), patients, out_dir=tmp_path / "cv", units="log1p", **kwargs)
    pred = res.predictions
    assert pred.shape == Y.shape and list(pred.var_names) == genes
    assert np.isfinite(pred.X).all() and np.isfinite(pred.layers["random"]).all()
    np.testing.assert_array_equal(pred.layers["truth"], Y)
    # every slide is tested exactly once, patients never straddle folds, val patients are not test patients
    assert (pred.obs.groupby("patient")["fold"].nunique() == 1).all()
    assert res.folds["n_test"].sum() == len(Y)
    assert (res.folds["n_train"] + res.folds["n_val"] + res.folds["n_test"] == len(Y)).all()
    assert (res.folds["n_val"] > 0).all()
    # history follows the early-stopping rule: the saved epoch is the reported best epoch
    for _, row in res.folds.iterrows():
        h = res.history[res.history.fold == row["fold"]]
        assert h.loc[h.saved, "epoch"].max() == row["best_epoch"]
        assert h["val_mse"].min() == pytest.approx(h.loc[h.epoch == h.loc[h.saved & (h.val_mse == h.val_mse.min()), "epoch"].iloc[0], "val_mse"].iloc[0])
    # checkpoints reload with the same loader and reproduce the test predictions
    for i in range(3):
        loaded = Sequoia.from_pretrained(tmp_path / "cv" / f"fold_{i}")
        assert loaded.genes == genes and loaded.units == "log1p"
        idx = np.flatnonzero(pred.obs["fold"].to_numpy() == i)
        with torch.no_grad():
            again = loaded(torch.from_numpy(X[idx])).numpy()
        np.testing.assert_allclose(again, pred.X[idx], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "cv" / "cv_predictions.h5ad").is_file()
    # learning: trained model beats the untrained one on the planted signal
    table = res.well_predicted_genes()
    assert table["r"].mean() > 0.5
    assert table["r"].mean() - 0.2 > table["r_random"].mean()
    assert table["well_predicted"].sum() >= Y.shape[1] // 2


def test_train_bulk_is_deterministic_with_a_seed():
    X, Y, patients = planted_cohort(n_patients=12)
    kwargs = dict(model_config=SMALL, n_folds=3, max_epochs=3, patience=2, seed=3, progress=False, device="cpu")
    a = train_bulk(X, Y, patients, **kwargs)
    b = train_bulk(X, Y, patients, **kwargs)
    np.testing.assert_array_equal(a.predictions.X, b.predictions.X)
    np.testing.assert_array_equal(a.predictions.layers["random"], b.predictions.layers["random"])
    pd.testing.assert_frame_equal(a.history, b.history)
    c = train_bulk(X, Y, patients, **{**kwargs, "seed": 4})
    assert not np.array_equal(a.predictions.X, c.predictions.X)


@pytest.mark.parametrize(
    ("model", "config"),
    [("he2rna", {"hidden_dims": [16], "ks": [1, 3, 6]}), ("transformer", {"depth": 1, "nheads": 2, "dim_head": 4})],
)
def test_train_bulk_baselines(model, config, tmp_path):
    from histoexpr.models import load_bulk_model

    X, Y, patients = planted_cohort(n_patients=12, slides_per_patient=1)
    res = train_bulk(X, Y, patients, model=model, model_config=config, n_folds=3, max_epochs=3, patience=2, progress=False, out_dir=tmp_path, device="cpu")
    assert np.isfinite(res.predictions.X).all()
    assert type(load_bulk_model(tmp_path / "fold_0")).__name__ == type(res.models[0]).__name__


def test_train_bulk_errors():
    X, Y, patients = planted_cohort(n_patients=6, slides_per_patient=2)
    folds = np.repeat([0, 1, 2], 4)
    folds[1] = 1  # patient P000 now has slides in folds 0 and 1
    with pytest.raises(ValueError, match="1 patient\\(s\\) have slides in several folds.*P000"):
        train_bulk(X, Y, patients, folds=folds, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="one entry per slide"):
        train_bulk(X, Y[:-1], patients, max_epochs=1, progress=False)
    bad = X.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_bulk(bad, Y, patients, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="cannot be split"):
        train_bulk(X, Y, patients, n_folds=10, max_epochs=1, progress=False)


@pytest.mark.slow
def test_train_bulk_realistic_cohort_learns():
    """300 slides × 100 cluster means × 1024 features, 2,000 genes, planted low-rank signal, CPU.

    150 patients with 2 slides each, 5-fold patient-level CV; a 1-block, 4-head SEQUOIA for
    10 epochs (about 5-10 min on 1 CPU thread).
    """
    import time

    rng = np.random.default_rng(0)
    n, K, D, G, L = 300, 100, 1024, 2000, 16
    z = rng.normal(size=(n, L)).astype(np.float32)
    # each slide: cluster means = slide latent mixed into features + cluster-specific noise
    X = np.einsum("nl,ld->nd", z, rng.normal(size=(L, D)).astype(np.float32) / np.sqrt(L))[:, None, :]
    X = (X + rng.normal(size=(n, K, D)).astype(np.float32)).astype(np.float32)
    loadings = rng.normal(size=(L, G)).astype(np.float32) / np.sqrt(L)
    Y = 5 + (z @ loadings) * rng.uniform(0.2, 1.0, G).astype(np.float32) + rng.normal(size=(n, G)).astype(np.float32)
    patients = np.array([f"TCGA-{i // 2:04d}" for i in range(n)])
    t0 = time.perf_counter()
    res = train_bulk(
        X, Y, patients,
        model="sequoia", model_config={"depth": 1, "nheads": 4},
        n_folds=5, max_epochs=10, patience=5, progress=False, device="cpu", seed=0,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    table = res.well_predicted_genes()
    print(res.folds.to_string())
    print(f"train_bulk {elapsed:.0f} s; pooled test r {table['r'].mean():.3f} vs random {table['r_random'].mean():.3f}; "
          f"well predicted {int(table['well_predicted'].sum())}/{G}")  # fmt: skip
    assert (res.folds["best_val_corr"] > 0.1).all()
    assert table["r"].mean() > table["r_random"].mean() + 0.1
    assert table["well_predicted"].sum() > 0.2 * G


@pytest.mark.gpu
def test_predict_and_train_on_cuda_match_cpu():
    model = tiny_sequoia()
    x = np.random.default_rng(0).normal(size=(5, 6, 8)).astype(np.float32)
    cpu = predict_bulk(x, model, device="cpu").X
    gpu = predict_bulk(x, model, device="cuda").X
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)
    X, Y, patients = planted_cohort(n_patients=12)
    res = train_bulk(X, Y, patients, model_config=SMALL, n_folds=3, max_epochs=2, progress=False, device="cuda")
    assert np.isfinite(res.predictions.X).all()
