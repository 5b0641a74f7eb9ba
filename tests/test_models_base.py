"""The shared model plumbing: one state-dict reader, save/load for every model, the contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from histoexpr.models import (
    HE2RNA,
    CheckpointError,
    ExpressionMLP,
    ExpressionModel,
    FusionViT,
    HistoPrism,
    LateFusion,
    Sequoia,
    TransformerAggregator,
    load_bulk_model,
    load_model,
    read_state_dict,
)

MODELS_DIR = Path(__file__).resolve().parents[1] / "src" / "histoexpr" / "models"
SEQ = {"num_outputs": 4, "input_dim": 8, "depth": 1, "nheads": 2, "num_clusters": 3}


def test_models_package_has_no_import_cycle():
    """Module-level relative imports inside ``histoexpr.models`` form no cycle."""
    graph: dict[str, set[str]] = {}
    for path in MODELS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level only: lazy imports inside functions are fine
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
        graph[path.stem] = deps

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node])

    for name in graph:
        if name != "__init__":
            visit(name, [])


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_garbage_weights_file_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"\x00not a state dict at all" * 10)
    with pytest.raises(CheckpointError, match=f"cannot read the weights file .*weights{suffix}.*damaged"):
        read_state_dict(path)


def test_truncated_checkpoint_names_the_file(tmp_path):
    folder = Sequoia(SEQ).save_pretrained(tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Sequoia.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="does not contain a state dict"):
        read_state_dict(path)


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_wrapped_and_prefixed_state_dicts_load(tmp_path, wrap, prefix):
    torch.manual_seed(0)
    ref = Sequoia(SEQ)
    folder = ref.save_pretrained(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    torch.save({wrap: {prefix + k: v for k, v in ref.state_dict().items()}}, folder / "pytorch_model.bin")
    loaded = Sequoia.from_pretrained(folder)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref.eval()(x))


def test_load_model_picks_the_class(tmp_path):
    models = [Sequoia(SEQ), HE2RNA(num_outputs=4, input_dim=8, num_clusters=3),
              TransformerAggregator(num_outputs=4, input_dim=8, depth=1, nheads=2, dim_head=4, num_clusters=3),
              HistoPrism(input_dim=8, num_outputs=4, genes=list("ABCD"))]
    for i, model in enumerate(models):
        loaded = load_model(model.save_pretrained(tmp_path / str(i)))
        assert type(loaded) is type(model)
        assert loaded.genes == model.genes and loaded.units == model.units
        assert isinstance(loaded, ExpressionModel)
    assert type(load_bulk_model(tmp_path / "1")) is HE2RNA


@pytest.mark.parametrize("cls, kw", [(FusionViT, {"fusion": "concat"}), (FusionViT, {"fusion": "add"}),
                                     (LateFusion, {"pooling": "token"}), (ExpressionMLP, {"level": "token"})])
def test_fusion_models_round_trip(tmp_path, cls, kw):
    torch.manual_seed(0)
    backbone = {} if cls is ExpressionMLP else {"backbone": "vit_tiny_patch16_224", "img_size": 48, "depth": 1}
    model = cls(n_core_genes=5, n_targets=3, **backbone, **kw).eval()
    model.core_genes, model.target_genes = list("abcde"), ["X", "Y", "Z"]
    assert isinstance(model, ExpressionModel) and model.genes == ["X", "Y", "Z"] and model.input_dim == 5
    folder = model.save_pretrained(tmp_path / "fusion")
    loaded = cls.from_pretrained(folder)
    assert type(loaded) is cls and loaded.config == model.config
    assert loaded.core_genes == list("abcde") and loaded.target_genes == ["X", "Y", "Z"]
    images, tokens = torch.randn(2, 3, 48, 48), torch.poisson(torch.full((2, 9, 5), 2.0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, tokens), model(images, tokens))
    assert type(load_model(folder)) is cls


def test_fusion_wrong_class_is_refused(tmp_path):
    folder = ExpressionMLP(n_core_genes=5, n_targets=3).save_pretrained(tmp_path / "mlp")
    with pytest.raises(ValueError, match="'ExpressionMLP' fusion model, not a FusionViT"):
        FusionViT.from_pretrained(folder)


def test_unavailable_device_is_an_error(tmp_path, monkeypatch):
    folder = Sequoia(SEQ).save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Sequoia.from_pretrained(folder, device="cuda")
