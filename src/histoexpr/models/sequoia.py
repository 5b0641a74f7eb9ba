"""SEQUOIA: the linearized-transformer aggregator of Pizurica et al. (Nat Commun 2024).

The module tree and parameter names match the released checkpoints
(``gevaertlab/sequoia-{cancer}-{fold}`` on the Hugging Face Hub: ``config.json`` +
``model.safetensors``), so those load unchanged with :meth:`Sequoia.from_pretrained`.

Outputs are log2(FPKM-UQ + 1) for the official checkpoints. There is no output activation, so a
prediction can be (slightly) negative; this is how the published model behaves and is kept as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._base import ExpressionModule, PretrainedMixin, read_gene_file
from .layers import FeedForward, LinearizedMixer, LinearizedTransformer, SummaryMixingHead  # noqa: F401 - re-exported

__all__ = ["Sequoia", "sequoia_genes", "PretrainedMixin", "load_bulk_model"]

OFFICIAL_UNITS = "log2(FPKM-UQ+1)"
_BUNDLED_GENES = Path(__file__).parent / "data" / "sequoia_genes.csv.gz"


def sequoia_genes() -> list[str]:
    """The 20,820 genes, in output order, of the released SEQUOIA checkpoints.

    The list is bundled with histoexpr (``models/data/sequoia_genes.csv.gz``, copied from
    github.com/gevaertlab/sequoia-pub ``examples/gene_list.csv``, MIT licence).

    Example
    -------
    >>> from histoexpr.models import sequoia_genes
    >>> genes = sequoia_genes()
    >>> len(genes), genes[0]
    (20820, 'A1BG')
    """
    return read_gene_file(_BUNDLED_GENES)


SEQUOIA_DEFAULTS: dict[str, Any] = {
    "num_outputs": 20820,
    "input_dim": 1024,
    "depth": 6,
    "nheads": 16,
    "dimensions_f": 64,
    "dimensions_s": 64,
    "dimensions_c": 64,
    "num_clusters": 100,
    "device": "cpu",
}


class Sequoia(ExpressionModule):
    """SEQUOIA linearized transformer: (B, K, D) cluster-mean tile features -> (B, G) bulk expression.

    Parameters
    ----------
    config
        Dict with any of ``num_outputs`` (G, default 20,820), ``input_dim`` (D, 1024 for UNI,
        2048 for ResNet-50), ``depth`` (6), ``nheads`` (16), ``dimensions_f``/``_s``/``_c`` (64),
        ``num_clusters`` (K, 100) and ``device`` (kept in the config for compatibility with the
        released files; it does not decide where the model lives). Keyword arguments override it.
    genes
        Output gene names (length G). ``None`` and G = 20,820 -> the official SEQUOIA gene list.
    units
        Units of the outputs; default ``"log2(FPKM-UQ+1)"`` (the released models).

    Notes
    -----
    ``pos_emb1D`` (K, D) is added to the K input tokens, so slot order matters. There is no output
    activation: predictions may be negative.

    Example
    -------
    >>> import torch
    >>> from histoexpr.models import Sequoia
    >>> model = Sequoia({"num_outputs": 50, "input_dim": 32, "depth": 1, "nheads": 2, "num_clusters": 10})
    >>> model(torch.randn(4, 10, 32)).shape
    torch.Size([4, 50])
    """

    model_type = "sequoia"
    config_defaults = SEQUOIA_DEFAULTS
    default_units = OFFICIAL_UNITS

    int_keys = tuple(k for k in SEQUOIA_DEFAULTS if k != "device")

    def _build(self, cfg: dict[str, Any]) -> None:
        dim = cfg["input_dim"]
        self.pos_emb1D = nn.Parameter(torch.randn(cfg["num_clusters"], dim))
        self.transformer = LinearizedTransformer(
            dim, cfg["depth"], cfg["nheads"], cfg["dimensions_f"], cfg["dimensions_s"], cfg["dimensions_c"]
        )
        self.linear_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, cfg["num_outputs"]))

    def _default_genes(self, cfg: dict[str, Any], genes: Sequence[str] | None) -> Sequence[str] | None:
        if genes is None and cfg["num_outputs"] == SEQUOIA_DEFAULTS["num_outputs"]:
            return sequoia_genes()
        return genes

    def _config_to_save(self) -> dict[str, Any]:
        return dict(self.config)  # the released layout: no model_type key

    @property
    def num_clusters(self) -> int:
        return self.config["num_clusters"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, K, D) -> (B, G). A single (K, D) slide is also accepted and returns (1, G)."""
        if x.dim() == 2:  # the upstream spatial code forgot the batch axis; never silently mis-batch
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[1] != self.num_clusters or x.shape[2] != self.input_dim:
            raise ValueError(
                f"Sequoia expects input of shape (batch, {self.num_clusters}, {self.input_dim}); got {tuple(x.shape)}"
            )
        x = x + self.pos_emb1D
        x = self.transformer(x)
        return self.linear_head(x.mean(dim=1))


def load_bulk_model(path_or_repo, **kwargs: Any) -> nn.Module:
    """Load any bulk aggregator checkpoint written by histoexpr (or an official SEQUOIA one).

    Same as :func:`histoexpr.models.load_model`; kept for backward compatibility.
    """
    from ._load import load_model

    return load_model(path_or_repo, **kwargs)
