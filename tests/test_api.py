"""API consistency: shared parameter docs, deprecated names, moved functions, return types."""

from __future__ import annotations

import inspect
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histoexpr as hx
from histoexpr._docs import DOC_PARAMS, doc_params
from histoexpr._utils import renamed_kwargs


def test_shared_parameter_docs_are_injected():
    for fn, names in ((hx.tl.predict_spatial, ["use_rep", "device"]), (hx.tl.predict_bulk, ["use_rep", "device"]),
                      (hx.tl.train_spatial, ["random_state", "device", "progress"]),
                      (hx.tl.train_fusion, ["random_state", "device", "progress"]),
                      (hx.pp.cluster_features, ["use_rep", "copy"]), (hx.tl.leiden, ["copy"])):
        for name in names:
            first_line = DOC_PARAMS[name].splitlines()[1].strip()
            assert first_line in fn.__doc__, (fn.__name__, name)
        assert "{" + names[0] + "}" not in fn.__doc__
    with pytest.raises(KeyError, match="no shared documentation for parameter 'nope'"):
        doc_params()(type("X", (), {"__doc__": "    {nope}\n", "__qualname__": "X"}))


def test_renamed_kwargs_warn_and_refuse_both():
    @renamed_kwargs(seed="random_state")
    def f(*, random_state=0):
        return random_state

    with pytest.warns(DeprecationWarning, match=r"f\(seed=...\) is deprecated; use random_state="):
        assert f(seed=5) == 5
    with pytest.raises(TypeError, match="both seed="):
        f(seed=1, random_state=2)
    assert "random_state" in inspect.signature(f).parameters


def test_old_names_still_work_with_a_warning():
    from histoexpr.tl._bulk import patient_folds

    with pytest.warns(DeprecationWarning):
        old = patient_folds(["a", "b", "c", "d"], n_folds=2, seed=3)
    np.testing.assert_array_equal(old, patient_folds(["a", "b", "c", "d"], n_folds=2, random_state=3))
    assert hx.tl.BulkCVResult is hx.tl.TrainResult and hx.tl.FusionFit is hx.tl.TrainResult
    res = hx.tl.TrainResult(best_score=0.5)
    assert res.best_val_mse == 0.5


def test_moved_functions_keep_a_warning_alias():
    spots = ad.AnnData(np.ones((3, 2), np.float32), obs=pd.DataFrame(index=["s0", "s1", "s2"]),
                       var=pd.DataFrame(index=["A", "B"]))
    spots.obsm["spatial"] = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    tiles = ad.AnnData(np.zeros((2, 0), np.float32), obs=pd.DataFrame({"row": [0, 0], "col": [0, 1]},
                                                                        index=["t0", "t1"]))
    tiles.obsm["spatial"] = np.array([[1.0, 1.0], [9.0, 1.0]])
    new = hx.pp.map_measured_to_tiles(spots, tiles, k=1)
    with pytest.warns(DeprecationWarning, match="moved to histoexpr.pp.map_measured_to_tiles"):
        old = hx.tl.map_measured_to_tiles(spots, tiles, k=1)
    np.testing.assert_array_equal(old.X, new.X)
    with pytest.warns(DeprecationWarning, match="moved to histoexpr.tl.score_gene_sets"), pytest.raises(ValueError):
        hx.metrics.score_gene_sets(tiles, gene_sets={"S": ["A", "B"]})


def test_public_functions_have_return_types():
    missing = []
    for sub in ("io", "pp", "tl", "models"):
        module = getattr(hx, sub)
        for name in dir(module):
            obj = getattr(module, name)
            if name.startswith("_") or not inspect.isfunction(obj):
                continue
            if inspect.signature(obj).return_annotation is inspect.Signature.empty:
                missing.append(f"{sub}.{name}")
    assert not missing, missing


def test_verbs_take_the_data_first():
    for fn in (hx.tl.predict_spatial, hx.tl.predict_bulk, hx.tl.predict_fusion, hx.tl.fuse_xenium,
               hx.tl.train_fusion):
        params = list(inspect.signature(fn).parameters)
        assert params[1] == "model", fn.__name__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (hx.tl.train_bulk, hx.tl.train_spatial, hx.tl.train_fusion, hx.pp.tile, hx.tl.fusion_split):
            assert "random_state" in inspect.signature(fn).parameters and "seed" not in inspect.signature(fn).parameters
