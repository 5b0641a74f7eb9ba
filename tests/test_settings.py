"""hx.settings, the shared progress bar and thread limits."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import histoexpr as hx
from histoexpr._settings import progress_bar, resolve_progress
from histoexpr._threads import limit_threads, resolve_threads


def test_settings_defaults_and_validation():
    s = hx.settings
    assert s.device == "auto" and s.progress is None
    with pytest.raises(ValueError):
        s.verbosity = "loud"
    with pytest.raises(ValueError):
        s.n_threads = 0
    with pytest.raises(TypeError):
        s.progress = "yes"
    with pytest.raises(AttributeError):
        with s.override(colour="red"):
            pass


def test_verbosity_sets_the_histoexpr_logger():
    logger = logging.getLogger("histoexpr")
    with hx.settings.override(verbosity="info"):
        assert logger.level == logging.INFO and hx.settings.verbosity == "info"
    assert logger.level == logging.WARNING
    with hx.settings.override(verbosity=3):
        assert logger.level == logging.DEBUG


def test_progress_follows_settings(capsys):
    with hx.settings.override(progress=False):
        assert resolve_progress(None) is False
        assert resolve_progress(True) is True
        bar = progress_bar(range(3), desc="x")
        assert bar.disable and list(bar) == [0, 1, 2]
    with hx.settings.override(progress=True):
        assert resolve_progress(None) is True
        list(progress_bar(range(3), desc="visible bar"))
    assert "visible bar" in capsys.readouterr().err
    # not interactive under pytest (stderr captured): auto means off
    assert resolve_progress(None) is False


def test_device_setting_is_used():
    from histoexpr._utils import get_device

    with hx.settings.override(device="cpu"):
        assert get_device(None).type == "cpu" and get_device("auto").type == "cpu"
    assert get_device("cpu").type == "cpu"


def test_limit_threads_restores_torch_and_blas():
    import torch
    from threadpoolctl import threadpool_info

    torch.set_num_threads(2)
    before = [p["num_threads"] for p in threadpool_info()]
    with limit_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert torch.get_num_threads() == 2
    assert [p["num_threads"] for p in threadpool_info()] == before
    assert resolve_threads(None, small=True) == 1
    with hx.settings.override(n_threads=3):
        assert resolve_threads(None, small=True) == 3


def test_train_and_predict_spatial_leave_torch_threads_alone():
    """Small-model calls run on 1 thread (settings.n_threads) and put the caller's count back."""
    import anndata as ad
    import pandas as pd
    import torch

    rng = np.random.default_rng(0)
    n = 40
    a = ad.AnnData(X=rng.poisson(3, (n, 5)).astype(np.float32),
                   obs=pd.DataFrame({"slide_id": ["s1"] * 20 + ["s2"] * 20, "row": np.arange(n) % 20,
                                     "col": np.arange(n) // 20}, index=[f"t{i}" for i in range(n)]))
    a.obsm["X_f"] = rng.normal(size=(n, 8)).astype(np.float32)
    a.obsm["spatial"] = rng.uniform(0, 100, (n, 2))
    seen = []
    orig = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return orig(self, *args, **kwargs)

    torch.set_num_threads(2)
    torch.optim.AdamW.step = spy
    try:
        model = hx.tl.train_spatial(a, use_rep="X_f", train=["s1"], val=["s2"], epochs=2, progress=False,
                                    model_kwargs={"hidden_dim": 8, "depth": 1, "nheads": 2, "dim_feedforward": 16})
    finally:
        torch.optim.AdamW.step = orig
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    hx.tl.predict_spatial(a, model, method="direct", use_rep="X_f")
    assert torch.get_num_threads() == 2
