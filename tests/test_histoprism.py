"""HistoPrism-style direct model (SPEC §3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_histoprism as _tiny

from histoexpr.models import HistoPrism
from histoexpr.models.histoprism import morton_order


def test_architecture_matches_spec():
    m = HistoPrism(input_dim=64, num_outputs=10, num_conditions=3)
    assert m.config["hidden_dim"] == 256 and m.config["depth"] == 2 and m.config["nheads"] == 8
    assert m.conditioning.attn.num_heads == 4
    assert isinstance(m.input_proj, torch.nn.Linear) and m.input_proj.out_features == 256
    assert len(m.encoder.layers) == 2 and m.encoder.layers[0].self_attn.num_heads == 8
    kinds = [type(layer).__name__ for layer in m.head]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Dropout", "Linear"]
    assert m.head[3].p == 0.1 and m.head[-1].out_features == 10
    # no positional encoding: the model is permutation-equivariant over tiles
    m.eval()
    x = torch.randn(1, 40, 64)
    perm = torch.randperm(40)
    with torch.no_grad():
        y = m(x, torch.tensor([2]))
        y_perm = m(x[:, perm], torch.tensor([2]))
    torch.testing.assert_close(y[:, perm], y_perm, atol=1e-5, rtol=1e-5)


def test_condition_cross_attention_closed_form_equals_attention():
    m = _tiny(num_conditions=5)
    x = torch.randn(3, 20, 16)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 3, 4]), 5).float()
    with torch.no_grad():
        fast = m.conditioning(x, onehot)
        full = m.conditioning.forward_full_attention(x, onehot)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # index and one-hot conditions are the same input
        torch.testing.assert_close(m(x, torch.tensor([0, 3, 4])), m(x, onehot))
        # the condition changes the prediction
        assert not torch.allclose(m(x, torch.tensor([0, 0, 0])), m(x, torch.tensor([1, 1, 1])))


def test_condition_errors():
    m = _tiny(num_conditions=2)
    x = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="pass `condition`"):
        m(x)
    with pytest.raises(ValueError, match="out of range"):
        m(x, torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\(B, N, 16\)"):
        m(torch.randn(1, 5, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_outputs"):
        HistoPrism(input_dim=16)


def test_padding_mask_matches_unpadded():
    m = _tiny()
    a, b = torch.randn(30, 16), torch.randn(18, 16)
    x = torch.zeros(2, 30, 16)
    x[0], x[1, :18] = a, b
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 18:] = True
    with torch.no_grad():
        batched = m(x, padding_mask=mask)
        torch.testing.assert_close(batched[0], m(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1, :18], m(b), atol=1e-5, rtol=1e-5)


def test_morton_order_is_local_permutation():
    g = torch.stack(torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij"), -1).reshape(-1, 2).float()
    order = morton_order(g[torch.randperm(len(g))])
    assert sorted(order.tolist()) == list(range(len(g)))
    order = morton_order(g)
    # consecutive chunks of 256 along the Z curve are 16 × 16 blocks
    for chunk in order.split(256):
        span = g[chunk].max(0).values - g[chunk].min(0).values
        assert span.tolist() == [15.0, 15.0]


def test_chunked_attention_equals_per_chunk_encoder():
    m = _tiny(attention_chunk_size=100)
    n = 350
    x = torch.randn(1, n, 16)
    xy = torch.rand(1, n, 2) * 1000
    with torch.no_grad():
        out = m(x, coords=xy)
        # independent: split the Morton order into ceil(n / 100) = 4 near-equal chunks by hand
        order = morton_order(xy[0])
        ref = torch.empty(n, 7)
        sizes = [n // 4 + (i < n % 4) for i in range(4)]  # 88, 88, 87, 87
        bounds = np.cumsum([0, *sizes])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            idx = order[lo:hi]
            h = m.encoder(m.input_proj(x[:, idx]))
            ref[idx] = m.head(h)[0]
        torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
        # below the chunk size it is full attention over all tiles
        full = _tiny(attention_chunk_size=None)
        torch.testing.assert_close(m(x[:, :90]), full(x[:, :90]), atol=1e-5, rtol=1e-5)


def test_fifty_thousand_tiles_bounded_memory():
    """A 50k-tile slide runs on CPU: attention only ever sees chunks of ≤ attention_chunk_size tiles."""
    m = _tiny(input_dim=8, num_outputs=4, hidden_dim=16, nheads=2, dim_feedforward=32, attention_chunk_size=512)
    seen = []
    hook = m.encoder.layers[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    n = 50_000
    torch.manual_seed(1)
    x, xy = torch.randn(n, 8), torch.rand(n, 2) * 50_000
    with torch.inference_mode():
        out = m(x, coords=xy)
    hook.remove()
    assert out.shape == (n, 4) and torch.isfinite(out).all()
    # full attention would hold 50k × 50k scores per head (10 GB in fp32); chunks hold ≤ 512²
    assert max(seen) <= 512 and sum(seen) == n and len(seen) == 98


def test_save_load_round_trip(tmp_path):
    m = _tiny(conditions=["BRCA", "LUAD"])
    m.genes = [f"g{i}" for i in range(7)]
    m.save_pretrained(tmp_path / "ckpt")
    m2 = HistoPrism.from_pretrained(tmp_path / "ckpt")
    assert m2.genes == m.genes and m2.conditions == ["BRCA", "LUAD"] and m2.units == "log1p(counts)"
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x, torch.tensor([1])), m2(x, torch.tensor([1])))
