"""Baseline slide-level aggregators from the SEQUOIA paper: HE2RNA-style MLP and a
standard transformer. Both map (B, K, D) cluster-mean tile features to (B, G), save/load in the
same Hugging Face layout as :class:`~histoexpr.models.Sequoia`, and carry ``genes``/``units``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import ExpressionModule
from .layers import SelfAttention, Transformer  # noqa: F401 - SelfAttention re-exported

__all__ = ["HE2RNA", "TransformerAggregator"]


class _AggregatorBase(ExpressionModule):
    @property
    def num_clusters(self) -> int:
        return self.config["num_clusters"]

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[2] != self.input_dim:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (batch, tiles, {self.input_dim}); got {tuple(x.shape)}"
            )
        return x


HE2RNA_DEFAULTS: dict[str, Any] = {
    "num_outputs": 20820,
    "input_dim": 1024,
    "hidden_dims": [256, 256],
    "ks": [1, 2, 5, 10, 20, 50, 100],
    "dropout": 0.5,
    "num_clusters": 100,
}


class HE2RNA(_AggregatorBase):
    """HE2RNA-style MLP aggregation (Schmauch et al. 2020).

    Each of the K tokens goes through the same MLP (D -> 256 -> 256 -> G, ReLU, dropout 0.5, the
    settings of the SEQUOIA benchmark); the slide
    prediction for a gene is the mean of its top-k token scores. In training one ``k`` is drawn
    from ``ks`` per forward pass; in evaluation the top-k means are averaged over all ``ks`` —
    a data-dependent weighted average of the tokens.

    Example
    -------
    >>> import torch
    >>> from histoexpr.models import HE2RNA
    >>> model = HE2RNA({"num_outputs": 20, "input_dim": 16, "num_clusters": 10, "ks": [1, 5, 10]})
    >>> model.eval()(torch.randn(3, 10, 16)).shape
    torch.Size([3, 20])
    """

    model_type = "he2rna"
    config_defaults = HE2RNA_DEFAULTS

    def _build(self, cfg: dict[str, Any]) -> None:
        cfg["hidden_dims"] = [int(h) for h in cfg["hidden_dims"]]
        cfg["ks"] = sorted({int(k) for k in cfg["ks"]})
        dims = [cfg["input_dim"], *cfg["hidden_dims"]]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(cfg["dropout"])]
        layers.append(nn.Linear(dims[-1], cfg["num_outputs"]))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        scores = self.mlp(x)  # (B, K, G)
        n_tokens = scores.shape[1]
        ks = [min(k, n_tokens) for k in self.config["ks"]]
        sorted_scores = torch.sort(scores, dim=1, descending=True).values
        cumulative = sorted_scores.cumsum(dim=1)
        if self.training:
            k = ks[int(torch.randint(len(ks), (1,)).item())]
            return cumulative[:, k - 1] / k
        return torch.stack([cumulative[:, k - 1] / k for k in ks]).mean(dim=0)


TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "num_outputs": 20820,
    "input_dim": 1024,
    "depth": 6,
    "nheads": 16,
    "dim_head": 64,
    "mlp_dim": 1024,
    "dropout": 0.0,
    "num_clusters": 100,
}


class TransformerAggregator(_AggregatorBase):
    """Standard (quadratic) transformer aggregator, the 'tformer' baseline of the SEQUOIA paper.

    Same learned positional parameter ``pos_emb1D`` (K, D) and head ``linear_head`` =
    LayerNorm + Linear(D, G) as :class:`Sequoia`, with 6 pre-norm self-attention blocks of
    16 heads × 64 dims and a feed-forward of width ``mlp_dim``; mean over tokens before the head.

    Example
    -------
    >>> import torch
    >>> from histoexpr.models import TransformerAggregator
    >>> model = TransformerAggregator(num_outputs=20, input_dim=32, depth=1, nheads=2, dim_head=8, num_clusters=10)
    >>> model(torch.randn(3, 10, 32)).shape
    torch.Size([3, 20])
    """

    model_type = "transformer"
    config_defaults = TRANSFORMER_DEFAULTS

    int_keys = ("num_outputs", "input_dim", "depth", "nheads", "dim_head", "mlp_dim", "num_clusters")

    def _configure(self, config, kwargs, *, ints=()) -> dict[str, Any]:
        given = {**(config or {}), **kwargs}
        if "input_dim" in given and "mlp_dim" not in given:  # feed-forward width D, as in Sequoia
            kwargs = {**kwargs, "mlp_dim": given["input_dim"]}
        return super()._configure(config, kwargs, ints=ints)

    def _build(self, cfg: dict[str, Any]) -> None:
        dim = cfg["input_dim"]
        self.pos_emb1D = nn.Parameter(torch.randn(cfg["num_clusters"], dim))
        self.transformer = Transformer(dim, cfg["depth"], cfg["nheads"], cfg["dim_head"], cfg["mlp_dim"], cfg["dropout"])
        self.linear_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, cfg["num_outputs"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        if x.shape[1] != self.num_clusters:
            raise ValueError(f"TransformerAggregator expects {self.num_clusters} tokens; got {x.shape[1]}")
        x = self.transformer(x + self.pos_emb1D)
        return self.linear_head(x.mean(dim=1))
