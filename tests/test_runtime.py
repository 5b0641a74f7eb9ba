"""The shared torch runtime of ``tl``: device policy, eval/device restore, mixed precision, paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import grid_tiles, tiny_histoprism, tiny_sequoia

import histoexpr as hx
from histoexpr.tl._runtime import autocast, batched_inference, eval_on, inference, load_models, resolve_device


def test_device_policy_is_explicit(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None).type == "cpu"
    with pytest.raises(RuntimeError, match="CUDA is not available; pass device='cpu'"):
        resolve_device("cuda")
    tiles = grid_tiles(*np.divmod(np.arange(144), 12))
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        hx.tl.predict_spatial(tiles, tiny_sequoia(), device="cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        hx.tl.predict_bulk(np.zeros((1, 100, 16), np.float32), tiny_sequoia(), device="cuda:0")


def test_eval_on_restores_mode_even_after_an_error():
    model = tiny_sequoia().train()
    with pytest.raises(ZeroDivisionError), eval_on([model], torch.device("cpu")):
        assert not model.training
        1 / 0  # noqa: B018
    assert model.training


def test_cpu_bf16_autocast_matches_fp32():
    """The mixed-precision path (bf16 autocast, as on CUDA) on the CPU stays close to fp32."""
    model = tiny_sequoia(K=16, D=32, G=20, seed=1)
    x = torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(0))
    with inference([model], torch.device("cpu"), "fp32"):
        ref = model(x).float()
    with inference([model], torch.device("cpu"), "bf16"):
        mixed = model(x)
    assert mixed.dtype == torch.bfloat16  # autocast really ran
    torch.testing.assert_close(mixed.float(), ref, rtol=5e-2, atol=5e-2)
    assert not torch.equal(mixed.float(), ref)
    # the default policy: no autocast on the CPU
    with autocast("cpu"):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32


def test_batched_inference_covers_every_row_once():
    net = torch.nn.Linear(3, 2)
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    out = batched_inference(7, 3, lambda s: net(torch.from_numpy(x[s])).numpy(), models=[net],
                            device=torch.device("cpu"))
    assert [len(o) for o in out] == [3, 3, 1]
    with torch.no_grad():
        np.testing.assert_allclose(np.concatenate(out), net(torch.from_numpy(x)).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        batched_inference(7, 0, lambda s: None, models=[net], device=torch.device("cpu"))


def test_verbs_accept_a_checkpoint_directory(tmp_path):
    """README: ``hx.tl.predict_spatial(tiles, "path/to/sequoia-brca-0/")``."""
    tiles = grid_tiles(*np.divmod(np.arange(144), 12))
    model = tiny_sequoia(genes=[f"g{i}" for i in range(6)])
    folder = model.save_pretrained(tmp_path / "sequoia-tiny-0")
    from_obj = hx.tl.predict_spatial(tiles, model, device="cpu")
    from_dir = hx.tl.predict_spatial(tiles, str(folder) + "/", device="cpu")
    np.testing.assert_allclose(from_dir.X, from_obj.X, rtol=1e-6, atol=1e-6)
    assert list(from_dir.var_names) == model.genes
    assert from_dir.uns["histoexpr"]["model"] == str(folder) + "/"
    both = hx.tl.predict_spatial(tiles, [folder, model], device="cpu")
    np.testing.assert_allclose(both.X, from_obj.X, rtol=1e-5, atol=1e-6)

    hp = tiny_histoprism(genes=list("ABCDEFG"))
    direct = hx.tl.predict_spatial(tiles, hp.save_pretrained(tmp_path / "hp"), method="direct", device="cpu")
    np.testing.assert_allclose(direct.X, hx.tl.predict_spatial(tiles, hp, method="direct", device="cpu").X,
                               rtol=1e-5, atol=1e-6)


def test_load_models_rejects_other_things():
    with pytest.raises(TypeError, match="checkpoint directory"):
        load_models(42)
    with pytest.raises(ValueError, match="empty list"):
        load_models([])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_models("no/such/dir")


def test_a_training_result_stands_for_its_models():
    from test_bulk import planted_cohort

    X, Y, patients = planted_cohort(n_patients=9)
    res = hx.tl.train_bulk(X, Y, patients, model_kwargs={"depth": 1, "nheads": 2, "dimensions_f": 8,
                                                         "dimensions_s": 8, "dimensions_c": 8},
                           n_folds=3, max_epochs=1, progress=False, device="cpu")
    assert isinstance(res, hx.tl.TrainResult) and len(res.models) == 3 and res.model is None
    from_result = hx.tl.predict_bulk(X[:2], res, device="cpu")
    from_models = hx.tl.predict_bulk(X[:2], res.models, device="cpu")
    np.testing.assert_allclose(from_result.X, from_models.X)
    with pytest.raises(AttributeError, match="no attribute 'genes'"):
        res.genes  # noqa: B018 - nothing to delegate to for cross-validation
