"""HistoPrism-style direct spatial model.

Per-tile features ``(B, N, D)`` plus a slide-level condition (e.g. cancer type) → per-tile genes
``(B, N, G)``:

1. **Condition injection** by cross-attention: the tiles are the queries, a single context token
   (``Linear(num_conditions → D)`` of the one-hot condition) gives keys and values. With one key the
   softmax weight is exactly 1, so the attention output is ``out_proj(v_proj(c_emb))`` for every tile —
   a learned per-condition bias. It is added to the features (residual) and followed by a LayerNorm.
   We keep the ``nn.MultiheadAttention`` parameters (so the module tree matches the paper) but compute
   that closed form, which saves a ``D × D`` query projection per tile and is numerically identical.
2. ``Linear(D → hidden)`` then a standard ``nn.TransformerEncoder`` (2 layers, 8 heads, no positional
   encoding) across the slide's tiles.
3. MLP head ``Linear, LayerNorm, ReLU, Dropout(0.1), Linear → G``.

Full attention over ``N`` tiles costs ``O(N²)``. When ``N > attention_chunk_size`` the tiles are
ordered along a Z-order (Morton) curve of their coordinates (or kept in the given order when no
coordinates are passed), split into contiguous, nearly equal chunks of at most
``attention_chunk_size`` tiles, and attention runs within each chunk. Everything else in the model
is per tile, so peak memory is bounded by one chunk whatever the slide size. Training
(:func:`histoexpr.tl.train_spatial`) draws one of the same chunks per step
(:func:`attention_chunks`), so training and inference see the same tile groups.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._base import ExpressionModule
from .layers import ConditionCrossAttention

__all__ = ["HistoPrism", "HISTOPRISM_DEFAULTS", "morton_order", "attention_chunks"]


def morton_order(coords: torch.Tensor) -> torch.Tensor:
    """Permutation that sorts 2-D points along a Z-order (Morton) curve.

    Parameters
    ----------
    coords
        ``(N, 2)`` coordinates (any units; grid indices or pixels).

    Returns
    -------
    ``(N,)`` long tensor of indices; consecutive indices are spatially close.
    """
    c = coords.detach().to(torch.float64)
    c = c - c.min(dim=0).values
    span = float(c.max()) if c.numel() else 0.0
    scale = (2**16 - 1) / span if span > 0 else 0.0
    q = (c * scale).round().to(torch.int64)
    key = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    for bit in range(16):
        key |= ((q[:, 0] >> bit) & 1) << (2 * bit)
        key |= ((q[:, 1] >> bit) & 1) << (2 * bit + 1)
    return torch.argsort(key, stable=True)


def attention_chunks(n: int, chunk_size: int | None, coords: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The groups of tiles that attend to each other: Morton-contiguous, nearly equal chunks.

    One chunk of all ``n`` tiles when ``chunk_size`` is ``None`` or ``n ≤ chunk_size``; otherwise the
    tiles in Z-order of ``coords`` (given order without coordinates) split into ``ceil(n / chunk_size)``
    contiguous chunks. :class:`HistoPrism` uses these chunks at inference and
    :func:`histoexpr.tl.train_spatial` trains on them, so a large slide is seen the same way in both.

    Parameters
    ----------
    n
        Number of tiles.
    chunk_size
        Largest chunk (``attention_chunk_size`` of the model).
    coords
        Optional ``(n, 2)`` tile coordinates.

    Returns
    -------
    List of long tensors of tile indices (a partition of ``range(n)``).

    Example
    -------
    >>> import torch
    >>> parts = attention_chunks(10, 4, torch.rand(10, 2))
    >>> [len(p) for p in parts]
    [4, 3, 3]
    """
    device = coords.device if coords is not None else None
    if chunk_size is None or n <= chunk_size:
        return [torch.arange(n, device=device)]
    order = morton_order(coords) if coords is not None else torch.arange(n)
    return list(torch.tensor_split(order, math.ceil(n / chunk_size)))


HISTOPRISM_DEFAULTS: dict[str, Any] = {
    "input_dim": 1024,
    "num_outputs": None,
    "num_conditions": 0,
    "conditions": None,
    "hidden_dim": 256,
    "depth": 2,
    "nheads": 8,
    "cross_attention_heads": 4,
    "dim_feedforward": 1024,
    "dropout": 0.1,
    "attention_chunk_size": 4096,
}


class HistoPrism(ExpressionModule):
    """HistoPrism-style direct model: tile features + slide condition → per-tile expression.

    Parameters
    ----------
    config
        Dict with any of the keys below; keyword arguments override it (same convention as
        :class:`~histoexpr.models.Sequoia`).

        ``input_dim`` (D of the tile encoder, default 1024 = UNI), ``num_outputs`` (G, required),
        ``num_conditions`` (number of slide conditions, e.g. cancer types; 0 disables conditioning,
        the paper's ablation), ``conditions`` (their labels; sets ``num_conditions``), ``hidden_dim``
        (256), ``depth`` (2 transformer layers), ``nheads`` (8), ``cross_attention_heads`` (4; must
        divide ``input_dim``), ``dim_feedforward`` (1024), ``dropout`` (0.1), ``attention_chunk_size``
        (4096: largest number of tiles attending to each other; ``None`` = always full attention).
    genes
        Output gene names (length G).
    units
        Units of the outputs; default ``"log1p(counts)"`` (what :func:`histoexpr.tl.train_spatial` fits).

    Examples
    --------
    >>> import torch
    >>> from histoexpr.models import HistoPrism
    >>> model = HistoPrism(input_dim=32, num_outputs=50, num_conditions=3)
    >>> x = torch.randn(1, 200, 32)
    >>> model(x, condition=torch.tensor([1])).shape
    torch.Size([1, 200, 50])
    """

    model_type = "histoprism"
    config_defaults = HISTOPRISM_DEFAULTS
    default_units = "log1p(counts)"

    def _build(self, cfg: dict[str, Any]) -> None:
        if cfg["num_outputs"] is None:
            raise ValueError("HistoPrism needs num_outputs (the number of genes it predicts).")
        if cfg["conditions"] is not None:
            cfg["conditions"] = [str(c) for c in cfg["conditions"]]
            cfg["num_conditions"] = len(cfg["conditions"])
        for key in ("input_dim", "num_outputs", "num_conditions", "hidden_dim", "depth", "nheads",
                    "cross_attention_heads", "dim_feedforward"):
            cfg[key] = int(cfg[key])
        input_dim, hidden_dim = cfg["input_dim"], cfg["hidden_dim"]
        if cfg["num_conditions"] and input_dim % cfg["cross_attention_heads"]:
            raise ValueError(
                f"input_dim={input_dim} must be divisible by cross_attention_heads={cfg['cross_attention_heads']}. "
                "With a single condition token the number of heads does not change the result: "
                "cross_attention_heads=1 works for any input_dim."
            )
        self.conditioning = (
            ConditionCrossAttention(input_dim, cfg["num_conditions"], cfg["cross_attention_heads"])
            if cfg["num_conditions"]
            else None
        )
        self.input_proj = nn.Linear(input_dim, hidden_dim)
        layer = nn.TransformerEncoderLayer(
            hidden_dim, cfg["nheads"], dim_feedforward=cfg["dim_feedforward"], dropout=cfg["dropout"],
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg["depth"], enable_nested_tensor=False)
        self.head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            nn.Dropout(cfg["dropout"]),
            nn.Linear(hidden_dim, cfg["num_outputs"]),
        )

    @property
    def conditions(self) -> list[str] | None:
        return self.config["conditions"]

    def _one_hot(self, condition: torch.Tensor | None, batch: int, ref: torch.Tensor) -> torch.Tensor:
        n_cond = self.config["num_conditions"]
        if condition is None:
            raise ValueError(
                f"This model was trained with num_conditions={n_cond}: pass `condition` (an index in "
                f"[0, {n_cond}) or a one-hot vector per slide)."
            )
        condition = torch.as_tensor(condition, device=ref.device)
        if condition.dim() == 0:
            condition = condition.expand(batch)
        if condition.dtype in (torch.int32, torch.int64) and condition.dim() == 1:
            if condition.numel() and (condition.min() < 0 or condition.max() >= n_cond):
                raise ValueError(f"condition index out of range [0, {n_cond}): {condition.tolist()}")
            condition = nn.functional.one_hot(condition, n_cond)
        if condition.shape != (batch, n_cond):
            raise ValueError(
                f"condition must be (B,) indices or (B, {n_cond}) one-hot; got shape {tuple(condition.shape)}."
            )
        return condition.to(ref.dtype)

    def _encode(self, h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.encoder(h, src_key_padding_mask=padding_mask)

    def _encode_chunked(
        self, h: torch.Tensor, coords: torch.Tensor | None, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        chunk = self.config["attention_chunk_size"]
        b, n, _ = h.shape
        if chunk is None or n <= chunk:
            return self._encode(h, padding_mask)
        out = torch.empty_like(h)
        for i in range(b):
            keep = (
                torch.nonzero(~padding_mask[i]).squeeze(1)
                if padding_mask is not None
                else torch.arange(n, device=h.device)
            )
            for part in attention_chunks(keep.numel(), chunk, coords[i, keep] if coords is not None else None):
                part = keep[part.to(keep.device)]
                out[i, part] = self._encode(h[i, part].unsqueeze(0), None)[0]
            if padding_mask is not None:
                out[i, padding_mask[i]] = 0
        return out

    def forward(
        self,
        x: torch.Tensor,
        condition: torch.Tensor | None = None,
        *,
        coords: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict expression for every tile.

        Parameters
        ----------
        x
            ``(B, N, D)`` (or ``(N, D)``) tile features of ``B`` slides.
        condition
            ``(B,)`` condition indices or ``(B, num_conditions)`` one-hot; required when the model has
            conditions.
        coords
            Optional ``(B, N, 2)`` (or ``(N, 2)``) tile coordinates, used only to form spatially
            coherent attention chunks for slides larger than ``attention_chunk_size``.
        padding_mask
            Optional ``(B, N)`` bool, ``True`` for padded positions (slides of different sizes).

        Returns
        -------
        ``(B, N, G)`` (or ``(N, G)``) predictions in the units of the training targets (log1p counts).
        """
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
            coords = coords.unsqueeze(0) if coords is not None else None
            padding_mask = padding_mask.unsqueeze(0) if padding_mask is not None else None
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"expected features of shape (B, N, {self.input_dim}) or (N, {self.input_dim}); got "
                f"{tuple(x.shape)}. Use the encoder the model was trained with."
            )
        if self.conditioning is not None:
            x = self.conditioning(x, self._one_hot(condition, x.shape[0], x))
        h = self._encode_chunked(self.input_proj(x), coords, padding_mask)
        out = self.head(h)
        return out[0] if squeeze else out
