"""Shared helpers in histoexpr._utils."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from histoexpr._utils import check_finite, resolve_feature_key


def _tiles(**obsm):
    a = ad.AnnData(np.zeros((3, 0), dtype=np.float32))
    for k, v in obsm.items():
        a.obsm[k] = v
    return a


def test_resolve_feature_key_precedence():
    a = _tiles(X_uni=np.zeros((3, 2)), X_resnet50=np.zeros((3, 2)), spatial=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="use_rep='X_<encoder>'"):
        resolve_feature_key(a)  # two candidates and nothing recorded
    a.uns["histoexpr"] = {"encoder": "resnet50"}
    assert resolve_feature_key(a) == "X_resnet50"
    a.uns["histoexpr"]["feature_key"] = "X_uni"  # what pp.extract_features records wins
    assert resolve_feature_key(a) == "X_uni"
    assert resolve_feature_key(a, "X_resnet50") == "X_resnet50"  # explicit wins
    with pytest.raises(KeyError, match="X_missing"):
        resolve_feature_key(a, "X_missing")
    assert resolve_feature_key(_tiles(X_only=np.zeros((3, 2)))) == "X_only"


def test_check_finite_names_rows_and_hint():
    x = np.ones((5, 2))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/inf values \(in 1 of 5 rows, first rows: \[3\]\)\. Fix"):
        check_finite(x, what="the targets", hint="Fix them.")
    check_finite(np.ones(4), what="fine")
