"""HistoPrism on large slides: training uses the same Morton-contiguous attention chunks as inference."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import histoexpr as hx
from histoexpr.models import HistoPrism
from histoexpr.models.histoprism import attention_chunks, morton_order
from histoexpr.tl._spatial import _training_chunk

CHUNK = 16


def _slide(n=70, d=8, g=5, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 5000, size=(n, 2))
    a = ad.AnnData(rng.poisson(3.0, size=(n, g)).astype(np.float32),
                   obs=pd.DataFrame(index=[f"t{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))
    a.obsm["X_enc"] = rng.normal(size=(n, d)).astype(np.float32)
    a.obsm["spatial"] = xy
    return a


def _groups(chunks):
    return sorted(tuple(sorted(c.tolist())) for c in chunks)


def test_attention_chunks_partition_in_morton_order():
    coords = torch.rand(70, 2)
    chunks = attention_chunks(70, CHUNK, coords)
    assert [len(c) for c in chunks] == [14] * 5  # ceil(70/16) = 5 nearly equal chunks
    assert torch.equal(torch.cat(chunks), morton_order(coords))
    assert len(attention_chunks(10, CHUNK, coords[:10])) == 1
    assert len(attention_chunks(70, None, coords)) == 1


def test_inference_attends_within_the_chunks():
    """Perturbing one tile changes exactly the outputs of the tiles in its chunk."""
    torch.manual_seed(0)
    model = HistoPrism(input_dim=8, num_outputs=5, hidden_dim=16, nheads=2, depth=1, dim_feedforward=16,
                       attention_chunk_size=CHUNK).eval()
    x, coords = torch.randn(70, 8), torch.rand(70, 2) * 1000
    chunks = attention_chunks(70, CHUNK, coords)
    with torch.no_grad():
        base = model(x, coords=coords)
        for chunk in chunks:
            x2 = x.clone()
            x2[chunk[0]] += 5.0
            changed = (model(x2, coords=coords) - base).abs().amax(1) > 1e-6
            assert set(torch.nonzero(changed).squeeze(1).tolist()) == set(chunk.tolist())


def test_training_steps_use_the_inference_chunks(monkeypatch):
    """Every training step on a large slide sees exactly one of the chunks inference attends over."""
    slide = _slide()
    coords = torch.from_numpy(slide.obsm["spatial"].astype(np.float32))
    expected = _groups(attention_chunks(slide.n_obs, CHUNK, coords))
    lookup = {tuple(map(float, xy)): i for i, xy in enumerate(coords.numpy())}
    seen = []
    original = HistoPrism.forward

    def recording(self, x, condition=None, *, coords=None, padding_mask=None):
        if self.training:
            seen.append(tuple(sorted(lookup[tuple(map(float, xy))] for xy in coords[0].cpu().numpy())))
        return original(self, x, condition, coords=coords, padding_mask=padding_mask)

    monkeypatch.setattr(HistoPrism, "forward", recording)
    model = hx.tl.train_spatial(
        {"S1": slide}, use_rep="X_enc", epochs=12, seed=0, device="cpu",
        model_kwargs={"hidden_dim": 16, "nheads": 2, "depth": 1, "dim_feedforward": 16,
                      "attention_chunk_size": CHUNK},
    )
    assert model.config["attention_chunk_size"] == CHUNK
    assert len(seen) == 12
    assert set(seen) <= set(expected)  # each step: one whole inference chunk, nothing else
    assert len(set(seen)) > 1  # and the chunk drawn varies between steps


def test_training_chunk_helper():
    rng = np.random.default_rng(0)
    coords = torch.rand(70, 2)
    model = HistoPrism(input_dim=8, num_outputs=5, hidden_dim=16, nheads=2, depth=1, attention_chunk_size=CHUNK)
    groups = _groups(attention_chunks(70, CHUNK, coords))
    for _ in range(5):
        take = _training_chunk(model, coords, 70, 4096, rng)
        assert tuple(sorted(take.tolist())) in groups
    assert _training_chunk(model, coords[:10], 10, 4096, rng) is None
    full = HistoPrism(input_dim=8, num_outputs=5, hidden_dim=16, nheads=2, depth=1, attention_chunk_size=None)
    take = _training_chunk(full, coords, 70, 20, rng)  # full attention: max_tiles-sized Morton chunks
    assert tuple(sorted(take.tolist())) in _groups(attention_chunks(70, 20, coords))


@pytest.mark.parametrize("n", [4097, 9000])
def test_default_chunk_size_is_4096(n):
    parts = attention_chunks(n, HistoPrism(input_dim=8, num_outputs=2).config["attention_chunk_size"])
    assert max(len(p) for p in parts) <= 4096 and sum(len(p) for p in parts) == n
