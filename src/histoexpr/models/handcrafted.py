"""A deterministic, weight-free H&E tile encoder (``"hed_stats"``).

This is **not** a foundation model. It exists so that the whole pipeline (tiling → features →
models → evaluation) can run where no pretrained weights can be downloaded, and as a transparent
baseline: every feature is a named, hand-written statistic of the tile's colour and texture.

Features (all computed in torch on a batch; 103 dimensions for the defaults):

* **Stain channels** – RGB, grey level, and haematoxylin / eosin / DAB optical densities from
  Ruifrok & Johnston colour deconvolution (the same matrix as ``skimage.color.rgb2hed``).
  For each of the 7 channels: mean, standard deviation and the 5/10/25/50/75/90/95 % quantiles (63).
* **Texture** – for grey, H and E at scales 1, 2 and 4 (average pooling): mean and standard
  deviation of the Sobel gradient magnitude and mean absolute Laplacian (27).
* **Nuclei proxies** – fraction of pixels with H optical density above 0.05, 0.10, 0.15, 0.20, and
  the density of local maxima of the smoothed H channel above 0.1 (blob-like nuclei) (5).
* **Heterogeneity** – standard deviation over a 4 × 4 grid of block means for each channel (7).
* **Background** – fraction of near-white pixels (grey > 0.85) (1).

Input: ``(B, 3, S, S)`` RGB in [0, 1] (the registered transform only scales uint8 by 1/255).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:  # pragma: no cover
    from .encoders import Encoder

__all__ = ["HEDStats", "hed_stats_encoder"]

# Ruifrok & Johnston stain vectors, inverted (identical to skimage.color.hed_from_rgb).
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
_H_THRESHOLDS = (0.05, 0.10, 0.15, 0.20)


def _hed_from_rgb() -> torch.Tensor:
    return torch.linalg.inv(_RGB_FROM_HED).to(torch.float32)


class HEDStats(nn.Module):
    """Weight-free H&E features: stain colour statistics, texture and nuclei proxies (see module doc).

    Parameters
    ----------
    scales
        Average-pooling factors at which texture is measured.
    grid
        Blocks per side for the heterogeneity features.

    Examples
    --------
    >>> import torch
    >>> from histoexpr.models.handcrafted import HEDStats
    >>> enc = HEDStats()
    >>> enc(torch.rand(2, 3, 224, 224)).shape
    torch.Size([2, 103])
    """

    channel_names = ("R", "G", "B", "H", "E", "D", "grey")

    def __init__(self, scales: tuple[int, ...] = (1, 2, 4), grid: int = 4):
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.grid = int(grid)
        self.register_buffer("hed_from_rgb", _hed_from_rgb(), persistent=False)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("sobel", torch.stack([sobel, sobel.T]).unsqueeze(1), persistent=False)
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", lap.view(1, 1, 3, 3), persistent=False)
        self.num_features = 7 * (2 + len(_QUANTILES)) + 3 * 3 * len(self.scales) + len(_H_THRESHOLDS) + 1 + 7 + 1

    def channels(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` RGB in [0, 1] → ``(B, 7, S, S)``: R, G, B, H, E, D, grey."""
        x = x.float().clamp(0.0, 1.0)
        log_rgb = torch.log(x.clamp_min(1e-6)) / torch.log(torch.tensor(1e-6))
        hed = torch.einsum("bchw,cd->bdhw", log_rgb, self.hed_from_rgb).clamp_min(0.0)
        grey = (0.2125 * x[:, 0] + 0.7154 * x[:, 1] + 0.0721 * x[:, 2]).unsqueeze(1)
        return torch.cat([x, hed, grey], dim=1)

    def _texture(self, ch: torch.Tensor) -> torch.Tensor:
        feats = []
        b, c = ch.shape[:2]
        for s in self.scales:
            img = F.avg_pool2d(ch, s) if s > 1 else ch
            flat = img.reshape(b * c, 1, *img.shape[-2:])
            grad = F.conv2d(flat, self.sobel)
            mag = grad.pow(2).sum(1).sqrt().reshape(b, c, -1)
            lap = F.conv2d(flat, self.laplacian).abs().reshape(b, c, -1)
            feats += [mag.mean(-1), mag.std(-1), lap.mean(-1)]
        return torch.stack(feats, dim=-1).reshape(b, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB tiles (B, 3, S, S) in [0, 1]; got shape {tuple(x.shape)}")
        ch = self.channels(x)
        b = ch.shape[0]
        flat = ch.reshape(b, 7, -1)
        q = torch.quantile(flat, torch.tensor(_QUANTILES, device=x.device), dim=-1).permute(1, 2, 0)
        stats = torch.cat([flat.mean(-1, keepdim=True), flat.std(-1, keepdim=True), q], dim=-1).reshape(b, -1)
        texture = self._texture(ch[:, [6, 3, 4]])
        h = ch[:, 3:4]
        h_frac = torch.stack([(h > t).float().mean((1, 2, 3)) for t in _H_THRESHOLDS], dim=1)
        smooth = F.avg_pool2d(h, 5, stride=1, padding=2)
        peaks = (smooth == F.max_pool2d(smooth, 9, stride=1, padding=4)) & (smooth > 0.1)
        blob_density = peaks.float().mean((1, 2, 3)).unsqueeze(1) * 1000.0  # per 1000 px
        blocks = F.adaptive_avg_pool2d(ch, self.grid).reshape(b, 7, -1).std(-1)
        white = (ch[:, 6] > 0.85).float().mean((1, 2)).unsqueeze(1)
        return torch.cat([stats, texture, h_frac, blob_density, blocks, white], dim=1)


def hed_stats_encoder(input_size: int = 224) -> Encoder:
    """The ``"hed_stats"`` encoder ready for :func:`histoexpr.pp.extract_features` (no weights needed).

    ``get_encoder("hed_stats")`` asks for weights like every registered encoder; this helper builds the
    :class:`~histoexpr.models.encoders.Encoder` directly and records ``encoder_weights="none (weight-free)"``.

    Examples
    --------
    >>> from histoexpr.models.handcrafted import hed_stats_encoder
    >>> enc = hed_stats_encoder()
    >>> enc.dim, enc.weights
    (103, 'none (weight-free)')
    >>> hx.pp.extract_features(tiles, slide, encoder=enc)  # doctest: +SKIP
    """
    from .encoders import Encoder, TileTransform

    module = HEDStats().eval()
    return Encoder(
        name="hed_stats", module=module, transform=TileTransform(input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        dim=module.num_features, precision="fp32", input_size=int(input_size), weights="none (weight-free)",
    )


def _register() -> None:
    from .encoders import list_encoders, register_encoder

    if "hed_stats" not in list_encoders():
        register_encoder(
            "hed_stats",
            HEDStats,
            input_size=224,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            dim=HEDStats().num_features,
            precision="fp32",
        )


_register()
