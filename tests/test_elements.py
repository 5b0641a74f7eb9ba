"""One rule for the H&E image of a SpatialData, one rule for the slides of an AnnData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histoexpr as hx
from histoexpr._utils import iter_slides


def _sdata(**channels):
    sd = pytest.importorskip("spatialdata")
    from spatialdata.models import Image2DModel

    images = {k: Image2DModel.parse(np.zeros((c, 8, 8), np.uint8), dims=("c", "y", "x")) for k, c in channels.items()}
    return sd.SpatialData(images=images)


def test_pick_image_key_rule():
    pick = hx.io.pick_image_key
    assert pick(_sdata(anything=3)) == "anything"  # the only image
    assert pick(_sdata(morphology=1, he_image=3)) == "he_image"  # the only RGB image
    assert pick(_sdata(he=3, overlay=3, dapi=1)) == "he"  # the only RGB image named H&E
    sdata = _sdata(a=3, b=3)
    with pytest.raises(ValueError, match=r"images \['a', 'b'\]; pass image_key="):
        pick(sdata)
    sdata.attrs["histoexpr"] = {"he_key": "b"}  # recorded by io.read_xenium
    assert pick(sdata) == "b"
    assert pick(sdata, "a") == "a"
    with pytest.raises(hx.io.SlideError, match="image 'c' not in this SpatialData"):
        pick(sdata, "c", error=hx.io.SlideError)


def test_iter_slides_rule():
    a = ad.AnnData(obs=pd.DataFrame({"slide_id": ["s2", "s1", "s2"], "patient": ["p", "p", "q"]},
                                    index=["t0", "t1", "t2"]))
    assert [(s, p.tolist()) for s, p in iter_slides(a)] == [("s2", [0, 2]), ("s1", [1])]
    assert [(s, p.tolist()) for s, p in iter_slides(a, "patient")] == [("p", [0, 1]), ("q", [2])]
    b = ad.AnnData(obs=pd.DataFrame(index=["t0", "t1"]))
    assert [(s, p.tolist()) for s, p in iter_slides(b)] == [("slide_0", [0, 1])]
    b.uns["histoexpr"] = {"slide_id": "CRC-7"}
    assert iter_slides(b)[0][0] == "CRC-7"
