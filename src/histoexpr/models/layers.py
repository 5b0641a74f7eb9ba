"""Building blocks shared by the models: feed-forward and attention blocks.

* :class:`FeedForward` – ``LayerNorm -> Linear -> GELU -> Linear`` (SEQUOIA's parameter names).
* :class:`LinearizedTransformer` – SEQUOIA's summary-mixing ("linearized") attention blocks.
* :class:`Transformer` – standard pre-norm multi-head self-attention blocks.
* :class:`ConditionCrossAttention` – tiles attending to one slide-condition token (HistoPrism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConditionCrossAttention",
    "FeedForward",
    "LinearizedMixer",
    "LinearizedTransformer",
    "ResidualBlocks",
    "SelfAttention",
    "SummaryMixingHead",
    "Transformer",
]


class SummaryMixingHead(nn.Module):
    """One head of the linearized attention: local branch, mean summary broadcast to all tokens, combiner."""

    def __init__(self, dim: int, dim_f: int, dim_s: int, dim_c: int):
        super().__init__()
        self.f = nn.Linear(dim, dim_f)
        self.local_norm = nn.LayerNorm(dim_f)
        self.s = nn.Linear(dim, dim_s)
        self.summary_norm = nn.LayerNorm(dim_s)
        self.c = nn.Linear(dim_f + dim_s, dim_c)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.act(self.local_norm(self.f(x)))
        summary = self.act(self.summary_norm(self.s(x).mean(dim=1, keepdim=True)))
        summary = summary.expand(-1, x.shape[1], -1)
        return self.act(self.c(torch.cat([local, summary], dim=-1)))


class LinearizedMixer(nn.Module):
    """``nheads`` summary-mixing heads, concatenated and projected back to the token width."""

    def __init__(self, dim: int, nheads: int, dim_f: int, dim_s: int, dim_c: int):
        super().__init__()
        self.mixers = nn.ModuleList([SummaryMixingHead(dim, dim_f, dim_s, dim_c) for _ in range(nheads)])
        self.projection = nn.Linear(nheads * dim_c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # All heads at once (same result as ``cat([head(x) for head in self.mixers])``): one matmul
        # for the local branches, the summary from the token mean (mean_t s(x_t) = s(mean_t x_t),
        # s being affine), and the per-head combiners as a batched einsum.
        heads = list(self.mixers)
        n_heads = len(heads)
        b, t, _ = x.shape
        dim_f = heads[0].f.out_features
        dim_s = heads[0].s.out_features

        def stacked(get) -> torch.Tensor:
            return torch.stack([get(h) for h in heads])

        w_f = torch.cat([h.f.weight for h in heads])
        b_f = torch.cat([h.f.bias for h in heads])
        local = F.linear(x, w_f, b_f).view(b, t, n_heads, dim_f)
        local = F.layer_norm(local, (dim_f,), eps=heads[0].local_norm.eps)
        local = F.gelu(local * stacked(lambda h: h.local_norm.weight) + stacked(lambda h: h.local_norm.bias))

        w_s = torch.cat([h.s.weight for h in heads])
        b_s = torch.cat([h.s.bias for h in heads])
        summary = F.linear(x.mean(dim=1), w_s, b_s).view(b, n_heads, dim_s)
        summary = F.layer_norm(summary, (dim_s,), eps=heads[0].summary_norm.eps)
        summary = F.gelu(summary * stacked(lambda h: h.summary_norm.weight) + stacked(lambda h: h.summary_norm.bias))

        w_c = stacked(lambda h: h.c.weight)  # (H, d_c, d_f + d_s)
        out = torch.einsum("bthf,hcf->bthc", local, w_c[:, :, :dim_f])
        out = out + (torch.einsum("bhs,hcs->bhc", summary, w_c[:, :, dim_f:]) + stacked(lambda h: h.c.bias)).unsqueeze(1)
        return self.projection(F.gelu(out).reshape(b, t, -1))


class FeedForward(nn.Module):
    """``LayerNorm(D) -> Linear(D, H) -> GELU -> Linear(H, D)`` (``net.{0,1,3}``)."""

    def __init__(self, dim: int, hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden_dim = hidden_dim or dim
        layers: list[nn.Module] = [nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlocks(nn.Module):
    """``x = mix(x) + x; x = ff(x) + x`` for each ``(mix, ff)`` block (``layers.{i}.{0,1}``)."""

    def __init__(self, blocks):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList(block) for block in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mix, ff in self.layers:
            x = mix(x) + x
            x = ff(x) + x
        return x


class LinearizedTransformer(ResidualBlocks):
    """``depth`` blocks of ``x = mixer(x) + x; x = ff(x) + x`` (no norm before the mixer, no dropout)."""

    def __init__(self, dim: int, depth: int, nheads: int, dim_f: int, dim_s: int, dim_c: int):
        super().__init__([LinearizedMixer(dim, nheads, dim_f, dim_s, dim_c), FeedForward(dim)] for _ in range(depth))


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention: ``LayerNorm -> qkv -> softmax(qk/sqrt(d)) v -> out``."""

    def __init__(self, dim: int, nheads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = nheads * dim_head
        self.nheads = nheads
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.nheads, -1).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


class Transformer(ResidualBlocks):
    """``depth`` pre-norm blocks of ``x = attn(x) + x; x = ff(x) + x``."""

    def __init__(self, dim: int, depth: int, nheads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__(
            [SelfAttention(dim, nheads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout)] for _ in range(depth)
        )


class ConditionCrossAttention(nn.Module):
    """Tiles attend to one condition token; residual + LayerNorm (see module docstring)."""

    def __init__(self, dim: int, num_conditions: int, num_heads: int = 4):
        super().__init__()
        self.num_conditions = num_conditions
        self.embed = nn.Linear(num_conditions, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def condition_bias(self, condition: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` attention output for a one-hot ``(B, C)`` condition (softmax over one key = 1)."""
        c_emb = self.embed(condition)
        d = c_emb.shape[-1]
        w_v = self.attn.in_proj_weight[2 * d :]
        b_v = self.attn.in_proj_bias[2 * d :] if self.attn.in_proj_bias is not None else None
        v = nn.functional.linear(c_emb, w_v, b_v)
        return self.attn.out_proj(v)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.condition_bias(condition).unsqueeze(1))

    def forward_full_attention(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The literal cross-attention (used in tests to check the closed form)."""
        ctx = self.embed(condition).unsqueeze(1)
        out, _ = self.attn(x, ctx, ctx, need_weights=False)
        return self.norm(x + out)
