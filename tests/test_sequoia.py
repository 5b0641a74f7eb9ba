"""SEQUOIA and baseline aggregators: official checkpoint layout, parameter names, reference outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import erf

from histoexpr.models import HE2RNA, Sequoia, TransformerAggregator, load_bulk_model, sequoia_genes

TINY = {
    "num_outputs": 37,
    "input_dim": 24,
    "depth": 2,
    "nheads": 3,
    "dimensions_f": 8,
    "dimensions_s": 5,
    "dimensions_c": 6,
    "num_clusters": 10,
    "device": "cuda:0",  # as in the released configs: must not stop CPU use
}


# ---------------------------------------------------------------------------------------------
# An independent description of the released checkpoints (SPEC §3.1), written without the module
# ---------------------------------------------------------------------------------------------


def official_parameter_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    D, G, K = cfg["input_dim"], cfg["num_outputs"], cfg["num_clusters"]
    df, ds, dc, H = cfg["dimensions_f"], cfg["dimensions_s"], cfg["dimensions_c"], cfg["nheads"]
    shapes: dict[str, tuple[int, ...]] = {"pos_emb1D": (K, D)}
    for i in range(cfg["depth"]):
        p = f"transformer.layers.{i}"
        for h in range(H):
            m = f"{p}.0.mixers.{h}"
            shapes |= {
                f"{m}.f.weight": (df, D),
                f"{m}.f.bias": (df,),
                f"{m}.local_norm.weight": (df,),
                f"{m}.local_norm.bias": (df,),
                f"{m}.s.weight": (ds, D),
                f"{m}.s.bias": (ds,),
                f"{m}.summary_norm.weight": (ds,),
                f"{m}.summary_norm.bias": (ds,),
                f"{m}.c.weight": (dc, df + ds),
                f"{m}.c.bias": (dc,),
            }
        shapes |= {
            f"{p}.0.projection.weight": (D, H * dc),
            f"{p}.0.projection.bias": (D,),
            f"{p}.1.net.0.weight": (D,),
            f"{p}.1.net.0.bias": (D,),
            f"{p}.1.net.1.weight": (D, D),
            f"{p}.1.net.1.bias": (D,),
            f"{p}.1.net.3.weight": (D, D),
            f"{p}.1.net.3.bias": (D,),
        }
    shapes |= {
        "linear_head.0.weight": (D,),
        "linear_head.0.bias": (D,),
        "linear_head.1.weight": (G, D),
        "linear_head.1.bias": (G,),
    }
    return shapes


def random_state_dict(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in official_parameter_shapes(cfg).items():
        scale = 1.0 / np.sqrt(shape[-1]) if len(shape) == 2 else 0.3
        base = 1.0 if name.endswith("norm.weight") or name.endswith("net.0.weight") or name == "linear_head.0.weight" else 0.0
        out[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_official_checkpoint(folder, cfg: dict, state: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "model.safetensors"))


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T.astype(np.float64) + sd[f"{name}.bias"]


def reference_sequoia(x: np.ndarray, sd: dict[str, np.ndarray], cfg: dict) -> np.ndarray:
    """Plain numpy SEQUOIA forward in float64, straight from SPEC §3.1 and the state dict."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = x.astype(np.float64) + sd["pos_emb1D"]
    for i in range(cfg["depth"]):
        p = f"transformer.layers.{i}"
        heads = []
        for h in range(cfg["nheads"]):
            m = f"{p}.0.mixers.{h}"
            local = _gelu(_ln(_lin(x, sd, f"{m}.f"), sd[f"{m}.local_norm.weight"], sd[f"{m}.local_norm.bias"]))
            summ = _lin(x, sd, f"{m}.s").mean(axis=1, keepdims=True)
            summ = _gelu(_ln(summ, sd[f"{m}.summary_norm.weight"], sd[f"{m}.summary_norm.bias"]))
            summ = np.broadcast_to(summ, local.shape[:2] + summ.shape[2:])
            heads.append(_gelu(_lin(np.concatenate([local, summ], axis=-1), sd, f"{m}.c")))
        x = _lin(np.concatenate(heads, axis=-1), sd, f"{p}.0.projection") + x
        y = _ln(x, sd[f"{p}.1.net.0.weight"], sd[f"{p}.1.net.0.bias"])
        x = _lin(_gelu(_lin(y, sd, f"{p}.1.net.1")), sd, f"{p}.1.net.3") + x
    pooled = x.mean(axis=1)
    pooled = _ln(pooled, sd["linear_head.0.weight"], sd["linear_head.0.bias"])
    return _lin(pooled, sd, "linear_head.1")


# ---------------------------------------------------------------------------------------------


def test_official_layout_loads_unchanged_and_matches_reference(tmp_path):
    state = random_state_dict(TINY, seed=1)
    ckpt = tmp_path / "sequoia-tiny-0"
    write_official_checkpoint(ckpt, TINY, state)

    model = Sequoia.from_pretrained(ckpt)
    assert next(model.parameters()).device.type == "cpu"
    assert not model.training
    # exact parameter-name compatibility, both ways
    assert set(model.state_dict()) == set(official_parameter_shapes(TINY))
    for name, shape in official_parameter_shapes(TINY).items():
        assert tuple(model.state_dict()[name].shape) == shape, name
    assert model.config["device"] == "cuda:0"

    x = np.random.default_rng(2).standard_normal((5, TINY["num_clusters"], TINY["input_dim"])).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    ref = reference_sequoia(x, state, TINY)
    assert out.shape == (5, TINY["num_outputs"])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # a batch of slides is not mixed: each slide's output only depends on its own tokens
    with torch.no_grad():
        single = model(torch.from_numpy(x[3])).numpy()
    np.testing.assert_allclose(single[0], out[3], rtol=1e-5, atol=1e-5)


def test_full_size_parameter_names_match_spec():
    cfg = {
        "num_outputs": 20820,
        "input_dim": 1024,
        "depth": 6,
        "nheads": 16,
        "dimensions_f": 64,
        "dimensions_s": 64,
        "dimensions_c": 64,
        "num_clusters": 100,
        "device": "cuda:0",
    }
    with torch.device("meta"):
        model = Sequoia(cfg)
    expected = official_parameter_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert model.genes == sequoia_genes()
    assert model.units == "log2(FPKM-UQ+1)"


def test_bundled_gene_list_is_the_official_one(shared_data):
    official = (shared_data / "sequoia_reference" / "gene_list.csv").read_text().split()
    assert official[0] == "gene"
    assert sequoia_genes() == official[1:]
    assert len(sequoia_genes()) == 20820


def test_save_pretrained_round_trip_with_genes(tmp_path):
    cfg = {**TINY, "device": "cpu"}
    genes = [f"G{i}" for i in range(cfg["num_outputs"])]
    torch.manual_seed(0)
    model = Sequoia(cfg, genes=genes, units="log1p")
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "gene_list.csv"}
    assert set(json.loads((folder / "config.json").read_text())) == set(TINY)  # exactly the official keys
    loaded = Sequoia.from_pretrained(folder)
    assert loaded.genes == genes and loaded.units == "log1p"
    x = torch.randn(2, cfg["num_clusters"], cfg["input_dim"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), loaded(x))
    assert isinstance(load_bulk_model(folder), Sequoia)


def test_checkpoint_dir_gene_file_and_mismatch(tmp_path):
    ckpt = tmp_path / "c"
    write_official_checkpoint(ckpt, TINY, random_state_dict(TINY))
    (ckpt / "gene_list.csv").write_text("gene\n" + "\n".join(f"g{i}" for i in range(TINY["num_outputs"])) + "\n")
    assert Sequoia.from_pretrained(ckpt).genes[:2] == ["g0", "g1"]
    (ckpt / "gene_list.csv").write_text("gene\nA\nB\n")
    with pytest.raises(ValueError, match="gene list has 2 genes"):
        Sequoia.from_pretrained(ckpt)


def test_wrong_architecture_checkpoint_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "c"
    state = random_state_dict(TINY)
    state["extra.weight"] = np.zeros(3, np.float32)
    del state["pos_emb1D"]
    write_official_checkpoint(ckpt, TINY, state)
    with pytest.raises(ValueError, match="missing parameters.*pos_emb1D.*unexpected parameters.*extra.weight"):
        Sequoia.from_pretrained(ckpt)


def test_missing_dir_and_offline_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="hf-hub:gevaertlab/sequoia-brca-0"):
        Sequoia.from_pretrained("gevaertlab/sequoia-brca-0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OSError, match="huggingface-cli download gevaertlab/sequoia-brca-0"):
        Sequoia.from_pretrained("hf-hub:gevaertlab/sequoia-brca-0", local_files_only=True)


def test_hub_path_loads_from_cache(tmp_path, monkeypatch):
    import histoexpr.models.sequoia as sq

    ckpt = tmp_path / "cached"
    state = random_state_dict(TINY, seed=3)
    write_official_checkpoint(ckpt, TINY, state)
    calls = []

    def fake_download(repo_id, filename, local_files_only=False):
        calls.append((repo_id, filename))
        if not (ckpt / filename).exists():
            raise FileNotFoundError(filename)
        return str(ckpt / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    model = sq.Sequoia.from_pretrained("hf-hub:gevaertlab/sequoia-brca-0")
    assert ("gevaertlab/sequoia-brca-0", "model.safetensors") in calls
    torch.testing.assert_close(model.pos_emb1D.detach(), torch.from_numpy(state["pos_emb1D"]))


def test_bad_input_shape():
    model = Sequoia({**TINY, "device": "cpu"})
    with pytest.raises(ValueError, match=r"\(batch, 10, 24\)"):
        model(torch.randn(2, 10, 25))
    with pytest.raises(TypeError, match="unknown Sequoia config keys"):
        Sequoia({"dim": 3})


def test_he2rna_matches_bruteforce_topk():
    torch.manual_seed(0)
    model = HE2RNA({"num_outputs": 7, "input_dim": 12, "hidden_dims": [9], "ks": [1, 3, 10], "num_clusters": 10}).eval()
    x = torch.randn(4, 10, 12)
    with torch.no_grad():
        out = model(x).numpy()
        scores = model.mlp(x).numpy()  # (B, K, G) per-token scores
    expected = np.zeros((4, 7))
    for b in range(4):
        for g in range(7):
            s = np.sort(scores[b, :, g])[::-1]
            expected[b, g] = np.mean([s[:k].mean() for k in (1, 3, 10)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    model.train()
    assert model(x).shape == (4, 7)


def test_transformer_aggregator_matches_reference_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = TransformerAggregator(num_outputs=6, input_dim=16, depth=2, nheads=2, dim_head=4, num_clusters=5).eval()
    assert {k.split(".")[0] for k in model.state_dict()} == {"pos_emb1D", "transformer", "linear_head"}
    assert "transformer.layers.0.0.to_out.bias" not in model.state_dict()
    x = torch.randn(3, 5, 16)
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    h = x.double().numpy() + sd["pos_emb1D"]
    for i in range(2):
        p = f"transformer.layers.{i}"
        y = _ln(h, sd[f"{p}.0.norm.weight"], sd[f"{p}.0.norm.bias"])
        q, k, v = np.split(y @ sd[f"{p}.0.to_qkv.weight"].T, 3, axis=-1)
        heads = []
        for hh in range(2):
            sl = slice(4 * hh, 4 * hh + 4)
            a = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / 2.0
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            heads.append(a @ v[..., sl])
        h = np.concatenate(heads, -1) @ sd[f"{p}.0.to_out.weight"].T + h  # no bias, as in the reference code
        y = _ln(h, sd[f"{p}.1.net.0.weight"], sd[f"{p}.1.net.0.bias"])
        h = _lin(_gelu(_lin(y, sd, f"{p}.1.net.1")), sd, f"{p}.1.net.3") + h
    ref = _lin(_ln(h.mean(1), sd["linear_head.0.weight"], sd["linear_head.0.bias"]), sd, "linear_head.1")
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), ref, rtol=1e-4, atol=1e-5)
    folder = model.save_pretrained(tmp_path / "t")
    loaded = load_bulk_model(folder)
    assert isinstance(loaded, TransformerAggregator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
