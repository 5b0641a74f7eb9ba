"""Fusion models (token bookkeeping, use of the expression input), training, prediction, evaluation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import copy_writable

import histoexpr as hx
from histoexpr.models import ExpressionMLP, FusionViT, LateFusion, MinMAEBaseline, MorphologyOnly
from histoexpr.pp._xenium import _panel_genes, core_tokens_dense
from histoexpr.tl._fusion import FusionError, _lr_lambda

TINY = "vit_tiny_patch16_224"
XENIUM = "xenium_segtraq/tests/data/xenium_sp_subset.zarr"


def _tiny(cls=FusionViT, **kw):
    torch.manual_seed(0)
    base = {"img_size": 48, "depth": 1}
    if cls is not ExpressionMLP:
        kw = {**base, **kw}
    return cls(TINY, **kw) if cls is not ExpressionMLP else cls(**kw)


def _inputs(b=2, n=9, g=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 48, 48, generator=gen), torch.poisson(torch.full((b, n, g), 2.0), generator=gen)


def _zero_content(model):
    """Image patch embedding and expression MLP output set to zero: tokens = positions (+ modality)."""
    with torch.no_grad():
        model.vit.patch_embed.proj.weight.zero_()
        model.vit.patch_embed.proj.bias.zero_()
        model.expr_mlp[-1].weight.zero_()
        model.expr_mlp[-1].bias.zero_()


# ---------------------------------------------------------------------------- token bookkeeping
@pytest.mark.parametrize("vit_kw", [{}, {"reg_tokens": 4, "no_embed_class": True}, {"class_token": False,
                                                                                     "global_pool": "avg"}])
def test_concat_expression_tokens_get_patch_positions(vit_kw):
    model = _tiny(n_core_genes=5, n_targets=3, fusion="concat", **vit_kw)
    model.eval()
    _zero_content(model)
    with torch.no_grad():
        model.modality_embed.zero_()
        images, tokens = _inputs()
        seq = model.fused_tokens(images, tokens)
        vit = model.vit
        npt, n = vit.num_prefix_tokens, 9
        assert seq.shape == (2, npt + 2 * n, vit.embed_dim)
        pos = vit.pos_embed[:, -n:]  # patch part of the positional embedding (both timm layouts)
        np.testing.assert_allclose(seq[:, npt:npt + n], pos.expand(2, -1, -1), atol=1e-6)
        np.testing.assert_allclose(seq[:, npt + n:], seq[:, npt:npt + n], atol=1e-6)  # token i ↔ patch i
        # with a modality embedding, expression token i = position i + modality (+ content)
        model.modality_embed.fill_(0.5)
        seq2 = model.fused_tokens(images, tokens)
        np.testing.assert_allclose(seq2[:, npt + n:] - 0.5, seq[:, npt:npt + n], atol=1e-6)


def test_add_fusion_adds_mlp_of_patch_counts_to_patch_tokens():
    model = _tiny(n_core_genes=5, n_targets=3, fusion="add")
    model.eval()
    images, tokens = _inputs()
    with torch.no_grad():
        seq = model.fused_tokens(images, tokens)
        vit = model.vit
        npt = vit.num_prefix_tokens
        image_seq = vit._pos_embed(vit.patch_embed(images))
        h = model.expr_mlp(torch.log1p(tokens))
    np.testing.assert_allclose(seq[:, :npt], image_seq[:, :npt], atol=1e-6)
    np.testing.assert_allclose(seq[:, npt:], image_seq[:, npt:] + h, atol=1e-5)


def test_patch_order_matches_token_order():
    """Image patch (row r, col c) is token r * n_side + c, the layout xenium_crops pools into."""
    model = _tiny(n_core_genes=5, n_targets=3, fusion="add")
    images = torch.zeros(1, 3, 48, 48)
    with torch.no_grad():
        base = model.vit.patch_embed(images)[0]
        images[:, :, 16:32, 32:48] = 5.0  # patch row 1, col 2
        changed = (model.vit.patch_embed(images)[0] - base).abs().sum(-1) > 0
    assert changed.nonzero().ravel().tolist() == [1 * 3 + 2]


@pytest.mark.parametrize("make", [
    lambda: _tiny(n_core_genes=5, n_targets=3, fusion="add"),
    lambda: _tiny(n_core_genes=5, n_targets=3, fusion="concat"),
    lambda: _tiny(LateFusion, n_core_genes=5, n_targets=3, fusion="add", pooling="tile"),
    lambda: _tiny(LateFusion, n_core_genes=5, n_targets=3, fusion="concat", pooling="token"),
    lambda: _tiny(ExpressionMLP, n_core_genes=5, n_targets=3, level="tile"),
    lambda: _tiny(ExpressionMLP, n_core_genes=5, n_targets=3, level="token"),
])
def test_predictions_depend_on_core_counts(make):
    model = make().eval()
    images, tokens = _inputs()
    other = tokens.clone()
    other[:, 4] += 7.0  # more transcripts in one patch
    with torch.no_grad():
        a, b = model(images, tokens), model(images, other)
    assert a.shape == (2, 3)
    assert (a - b).abs().max() > 1e-4


def test_token_level_models_see_where_transcripts_are():
    """Moving counts between patches changes early fusion but not the tile-pooled late fusion."""
    images, tokens = _inputs()
    moved = tokens.clone()
    moved[:, [0, 8]] = tokens[:, [8, 0]]
    early = _tiny(n_core_genes=5, n_targets=3, fusion="add").eval()
    late = _tiny(LateFusion, n_core_genes=5, n_targets=3, pooling="tile").eval()
    with torch.no_grad():
        assert (early(images, tokens) - early(images, moved)).abs().max() > 1e-4
        np.testing.assert_allclose(late(images, tokens), late(images, moved), atol=1e-5)


def test_morphology_only_ignores_expression():
    model = _tiny(MorphologyOnly, n_targets=3).eval()
    images, tokens = _inputs()
    with torch.no_grad():
        np.testing.assert_allclose(model(images, tokens), model(images, tokens * 5), atol=1e-6)
    assert model.uses_expression is False and ExpressionMLP.uses_image is False


def test_parameter_groups_split_backbone_and_head():
    model = _tiny(n_core_genes=5, n_targets=3, fusion="concat")
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert id(model.modality_embed) in head and id(model.vit.pos_embed) in backbone


def test_model_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="fusion must be"):
        _tiny(n_core_genes=5, n_targets=3, fusion="cross")
    with pytest.raises(TypeError, match="VisionTransformer"):
        FusionViT("resnet18", n_core_genes=5, n_targets=3)
    model = _tiny(n_core_genes=5, n_targets=3)
    images, tokens = _inputs()
    with pytest.raises(ValueError, match="patches"):
        model(images, tokens[:, :4])
    with pytest.raises(ValueError, match="core_tokens must be"):
        model(images, tokens[..., :4])
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in tests
    with pytest.raises(RuntimeError, match="could not download"):
        FusionViT(TINY, n_core_genes=5, n_targets=3, pretrained_weights="timm", img_size=48, depth=1)
    with pytest.raises(FileNotFoundError):
        FusionViT(TINY, n_core_genes=5, n_targets=3, pretrained_weights=tmp_path / "none.pth", img_size=48,
                  depth=1)


def test_local_pretrained_weights_are_loaded(tmp_path):
    from safetensors.torch import save_file

    src = _tiny(MorphologyOnly, n_targets=3)
    save_file({k: v.contiguous() for k, v in src.vit.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(src.vit.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        torch.manual_seed(123)
        dst = FusionViT(TINY, n_core_genes=5, n_targets=3, pretrained_weights=tmp_path / f, img_size=48,
                        depth=1)
        for k, v in src.vit.state_dict().items():
            torch.testing.assert_close(dst.vit.state_dict()[k], v)
    wrong = MorphologyOnly(TINY, n_targets=3, img_size=48, depth=2)
    torch.save(wrong.vit.state_dict(), tmp_path / "deep.pth")
    with pytest.raises(ValueError, match="unexpected|missing"):
        # depth-1 model loading depth-2 weights: extra keys are fine, but a depth-3 model misses keys
        FusionViT(TINY, n_core_genes=5, n_targets=3, pretrained_weights=tmp_path / "deep.pth", img_size=48,
                  depth=3)


def test_min_mae_matches_brute_force():
    rng = np.random.default_rng(0)
    core = rng.poisson(2, size=(60, 7)).astype(float)
    targets = np.c_[core[:, 3] + rng.normal(0, 0.1, 60), core[:, 5] * 0.9, rng.poisson(1, 60)]
    base = MinMAEBaseline().fit(core, targets, core_genes=list("abcdefg"), chunk=16)
    expected = [int(np.argmin([np.abs(targets[:, t] - core[:, s]).mean() for s in range(7)])) for t in range(3)]
    assert base.source_index_.tolist() == expected
    assert base.source_genes_[:2] == ["d", "f"]
    np.testing.assert_array_equal(base.predict(core), core[:, expected].astype(np.float32))
    with pytest.raises(RuntimeError, match="not fitted"):
        MinMAEBaseline().predict(core)
    with pytest.raises(ValueError, match="finite"):
        MinMAEBaseline().fit(np.full((3, 2), np.nan), np.zeros((3, 1)))


def test_lr_schedule_warmup_then_cosine():
    f = _lr_lambda(1e-4, 1e-6, warmup_steps=4, total_steps=20)
    vals = [f(s) for s in range(21)]
    np.testing.assert_allclose(vals[:4], [0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))
    assert vals[20] == pytest.approx(0.01)


# ---------------------------------------------------------------------------- real Xenium crops
@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory):
    import spatialdata as sd

    dst = tmp_path_factory.mktemp("xenium_fusion") / "xenium.zarr"
    copy_writable(shared_data / XENIUM, dst)  # never write into the shared data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sd.read_zarr(dst)
        genes = _panel_genes(sdata.points["transcripts"], "feature_name")
        rng = np.random.default_rng(0)
        perm = [str(g) for g in rng.permutation(genes)]
        core, addon = perm[:120], perm[120:160]
        crops = hx.pp.xenium_crops(sdata, core_genes=core, addon_genes=addon, crop_size=48, stride=24)
    crops.obs["split"] = hx.tl.fusion_split(crops, test_fraction=0.25, val_fraction=0.2, seed=0,
                                            block_size_um=48)
    return sdata, crops


def test_fusion_split_is_group_aware_and_purged(real):
    _, crops = real
    split = crops.obs["split"].astype(str).to_numpy()
    assert {"train", "val", "test"} <= set(split)
    blocks = hx.tl.spatial_blocks(crops, block_size_um=48)
    for b in np.unique(blocks):
        assert len(set(split[blocks == b]) - {"purged"}) == 1 or set(split[blocks == b]) <= {"train", "purged"}
    size = crops.uns["histoexpr"]["tile_size_level0"]
    pos = crops.obs[["x0", "y0"]].to_numpy(float)
    train, held = pos[split == "train"], pos[np.isin(split, ["val", "test"])]
    cheb = np.abs(train[:, None] - held[None]).max(-1)
    assert (cheb >= size - 1e-6).all()  # no training crop shares pixels with a val/test crop
    same = hx.tl.fusion_split(crops, test_fraction=0.25, val_fraction=0.2, seed=0, block_size_um=48)
    assert (same.astype(str).to_numpy() == split).all()


def test_train_predict_evaluate_write_back(real):
    sdata, crops = real
    n_core, n_add = len(crops.uns["histoexpr"]["core_genes"]), crops.n_vars
    model = FusionViT(TINY, n_core_genes=n_core, n_targets=n_add, fusion="concat", img_size=48, depth=1)
    fit = hx.tl.train_fusion(crops, model, sdata=sdata, split="split", epochs=2, batch_size=16, warmup=0.5,
                             lr_backbone=1e-4, lr_head=1e-3, progress=False, device="cpu")
    assert list(fit.history.columns[:3]) == ["epoch", "train_loss", "lr_head"]
    assert np.isfinite(fit.history["val_mse"]).all()
    assert fit.best_val_mse == pytest.approx(fit.history["val_mse"].min())
    assert model.core_genes == crops.uns["histoexpr"]["core_genes"]

    base = hx.tl.train_fusion(crops, MinMAEBaseline(), split="split").model
    expr = ExpressionMLP(n_core_genes=n_core, n_targets=n_add, level="token")
    expr_fit = hx.tl.train_fusion(crops, expr, split="split", epochs=2, batch_size=16, warmup=0,
                                  lr_head=1e-2, progress=False)
    scores = hx.tl.evaluate_fusion({"early": fit, "min-mae": base, "expr": expr_fit,
                                    "mean": np.tile(crops.X.mean(0), (crops.n_obs, 1))},
                                   crops, "split", sdata=sdata)
    assert set(scores["model"]) == {"early", "min-mae", "expr", "mean"}
    assert len(scores) == 4 * n_add
    test = crops.obs["split"].astype(str).to_numpy() == "test"
    # MSE and Pearson of Min-MAE against an independent computation
    pred = np.log1p(hx.pp.core_counts(crops))[:, base.source_index_][test]
    truth = crops.X[test]
    mm = scores[scores.model == "min-mae"].set_index("gene")
    np.testing.assert_allclose(mm["mse"].to_numpy(), ((pred - truth) ** 2).mean(0), rtol=1e-5)
    from scipy.stats import pearsonr

    ok = (pred.std(0) > 0) & (truth.std(0) > 0)
    assert ok.sum() >= 3
    expected = [pearsonr(pred[:, j], truth[:, j])[0] for j in np.flatnonzero(ok)]
    np.testing.assert_allclose(mm["pearson"].to_numpy()[ok], expected, atol=1e-6)
    assert mm["pearson"].to_numpy()[~ok].tolist() == [] or np.isnan(mm["pearson"].to_numpy()[~ok]).all()

    out = hx.tl.fuse_xenium(crops, fit, sdata=sdata, key_added="fusion_test")
    assert out.shape == crops.shape and out.obsm["X_fusion"].shape == (crops.n_obs, model.vit.embed_dim)
    np.testing.assert_allclose(out.layers["measured"], crops.X)
    assert "X_core_tokens" in crops.obsm and "X_fusion" not in crops.obsm  # input untouched
    table = sdata.tables["fusion_test_table"]
    assert table.uns["spatialdata_attrs"]["region"] == "fusion_test_crops"
    shapes = sdata.shapes["fusion_test_crops"]
    assert len(shapes) == crops.n_obs
    assert shapes.geometry.iloc[0].area == pytest.approx(crops.uns["histoexpr"]["tile_size_level0"] ** 2)

    # straight from the SpatialData: crops are re-cut with the model's panels and img_size
    out2 = hx.tl.fuse_xenium(sdata, fit, stride=24, key_added=None)
    np.testing.assert_allclose(out2.X, out.X, atol=1e-4)


def test_training_reduces_loss_on_real_targets(real):
    _, crops = real
    n_core = len(crops.uns["histoexpr"]["core_genes"])
    model = ExpressionMLP(n_core_genes=n_core, n_targets=crops.n_vars)
    fit = hx.tl.train_fusion(crops, model, split="split", epochs=15, batch_size=16, warmup=1, lr_head=1e-2,
                             early_stopping=None, progress=False)
    loss = fit.history["train_loss"].to_numpy()
    assert loss[-1] < 0.7 * loss[0]


def test_min_mae_accepts_sparse_targets(real):
    from scipy import sparse

    _, crops = real
    as_sparse = crops.copy()
    as_sparse.X = sparse.csr_matrix(crops.X)
    dense_fit = hx.tl.train_fusion(crops, MinMAEBaseline(), split="split")
    sparse_fit = hx.tl.train_fusion(as_sparse, MinMAEBaseline(), split="split")
    np.testing.assert_array_equal(sparse_fit.model.source_index_, dense_fit.model.source_index_)
    assert sparse_fit.best_val_mse == pytest.approx(dense_fit.best_val_mse)


def test_predict_keeps_the_model_mode(real):
    _, crops = real
    n_core = len(crops.uns["histoexpr"]["core_genes"])
    torch.manual_seed(0)
    model = ExpressionMLP(n_core_genes=n_core, n_targets=crops.n_vars).train()
    pred = hx.tl.predict_fusion(crops, model, indices=np.arange(5), device="cpu")
    assert model.training and pred.shape == (5, crops.n_vars)
    with torch.no_grad():
        expected = model.eval()(None, torch.from_numpy(core_tokens_dense(crops, np.arange(5)))).numpy()
    np.testing.assert_allclose(pred, expected, atol=1e-6)



def test_fusion_verbs_take_a_checkpoint_directory(real, tmp_path):
    _, crops = real
    info = crops.uns["histoexpr"]
    torch.manual_seed(0)
    model = ExpressionMLP(n_core_genes=len(info["core_genes"]), n_targets=crops.n_vars)
    model.core_genes, model.target_genes = list(info["core_genes"]), list(info["addon_genes"])
    folder = model.save_pretrained(tmp_path / "mlp")
    idx = np.arange(6)
    np.testing.assert_allclose(hx.tl.predict_fusion(crops, str(folder), indices=idx, device="cpu"),
                               hx.tl.predict_fusion(crops, model, indices=idx, device="cpu"), atol=1e-6)
    with pytest.warns(DeprecationWarning, match="data first"):
        old = hx.tl.predict_fusion(model, crops, indices=idx, device="cpu")
    np.testing.assert_allclose(old, hx.tl.predict_fusion(crops, model, indices=idx, device="cpu"), atol=1e-6)


def test_train_bad_input(real):
    sdata, crops = real
    n_core = len(crops.uns["histoexpr"]["core_genes"])
    with pytest.raises(FusionError, match="add-on genes"):
        hx.tl.train_fusion(crops, ExpressionMLP(n_core_genes=n_core, n_targets=3), split="split", epochs=1)
    with pytest.raises(FusionError, match="ViT expects"):
        hx.tl.train_fusion(crops, MorphologyOnly(TINY, n_targets=crops.n_vars, img_size=64, depth=1),
                           sdata=sdata, split="split", epochs=1)
    with pytest.raises(FusionError, match="split labels"):
        hx.tl.train_fusion(crops, MinMAEBaseline(), split=np.array(["x"] * crops.n_obs))
    other = ExpressionMLP(n_core_genes=n_core, n_targets=crops.n_vars)
    other.core_genes = list(reversed(crops.uns["histoexpr"]["core_genes"]))
    with pytest.raises(FusionError, match="gene panel mismatch"):
        hx.tl.predict_fusion(crops, other)
    with pytest.raises(FusionError, match="xenium_crops"):
        hx.tl.train_fusion(_without_tokens(crops), other, epochs=1)


def _without_tokens(crops):
    c = crops.copy()
    del c.obsm["X_core_tokens"]
    return c


@pytest.mark.gpu
def test_train_on_cuda_with_bf16_autocast(real):
    sdata, crops = real
    n_core = len(crops.uns["histoexpr"]["core_genes"])
    model = FusionViT(TINY, n_core_genes=n_core, n_targets=crops.n_vars, fusion="concat", img_size=48, depth=1)
    fit = hx.tl.train_fusion(crops, model, sdata=sdata, split="split", epochs=2, batch_size=16, warmup=0.5,
                             progress=False, device="cuda")
    assert fit.device.startswith("cuda") and np.isfinite(fit.history["val_mse"]).all()
    pred = hx.tl.predict_fusion(crops, fit, sdata=sdata, device="cuda")
    assert pred.shape == crops.shape and np.isfinite(pred).all()
