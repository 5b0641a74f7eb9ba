"""Early fusion of Xenium transcripts into a ViT, and the baselines it is compared with .

Every torch model here has the same interface, so one training loop serves them all:

* ``forward(images, core_tokens) -> (B, n_targets)`` with ``images`` ``(B, 3, H, W)`` (normalised) and
  ``core_tokens`` ``(B, n_patches, n_core_genes)`` raw core counts per ViT patch (row-major patch
  order, as timm's ``PatchEmbed`` flattens); log1p is applied inside.
* ``embed(images, core_tokens) -> (B, D)`` the representation the linear head reads.
* ``uses_image`` / ``uses_expression`` tell the data loader what to read;
  ``backbone_parameters()`` / ``head_parameters()`` split parameters for separate learning rates.

Models: :class:`FusionViT` (early fusion, ``add`` or ``concat``), :class:`LateFusion` (tile- or
token-pooled expression, ``add`` or ``concat``), :class:`MorphologyOnly`, :class:`ExpressionMLP`
(tile or token level) and the non-torch :class:`MinMAEBaseline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ._base import PretrainedMixin

__all__ = ["FusionViT", "LateFusion", "MorphologyOnly", "ExpressionMLP", "MinMAEBaseline", "create_vit"]


# ---------------------------------------------------------------------------- backbone
def _load_weights(vit: nn.Module, weights: str | Path) -> None:
    """Load a local timm-style state dict (.safetensors, .pth, .bin) into ``vit`` (heads ignored)."""
    from ._base import match_prefixes, read_state_dict

    path = Path(weights)
    state = match_prefixes(read_state_dict(path), list(vit.state_dict()))
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or
             k in vit.state_dict()}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing:
        raise ValueError(f"weights {path} do not fit this backbone: {len(missing)} missing keys "
                         f"(e.g. {missing[:5]}); unexpected: {unexpected[:5]}")


def create_vit(backbone: str = "vit_small_patch16_224", *, pretrained_weights: str | Path | None = None,
               **backbone_kwargs: Any) -> nn.Module:
    """A timm VisionTransformer without classifier head (``num_classes=0``).

    Parameters
    ----------
    backbone
        Any timm model name whose class is (a subclass of) ``timm.models.vision_transformer.VisionTransformer``.
    pretrained_weights
        ``None`` (random init), a local state-dict file, or ``"timm"`` / ``"hf-hub:<repo>"`` to download
        timm's weights (needs internet; fails with a clear message offline).
    **backbone_kwargs
        Passed to ``timm.create_model`` (e.g. ``img_size=64, depth=2``).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {"num_classes": 0, **backbone_kwargs}
    hub = isinstance(pretrained_weights, str) and (pretrained_weights == "timm"
                                                   or pretrained_weights.startswith("hf-hub:"))
    name = pretrained_weights if hub and pretrained_weights.startswith("hf-hub:") else backbone
    try:
        vit = timm.create_model(name, pretrained=hub, **kwargs)
    except Exception as err:  # network errors surface as many types
        if hub:
            raise RuntimeError(f"could not download pretrained weights for {name!r} ({err}); offline, pass "
                               "pretrained_weights=<local .safetensors/.pth file>") from err
        raise
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"{backbone!r} builds a {type(vit).__name__}; fusion needs a timm VisionTransformer "
                        "(patch_embed, _pos_embed, blocks, norm, num_prefix_tokens)")
    if pretrained_weights is not None and not hub:
        if not Path(pretrained_weights).is_file():
            raise FileNotFoundError(f"pretrained_weights {pretrained_weights!r} is not a file")
        _load_weights(vit, pretrained_weights)
    return vit


def _expr_mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


def _pooled(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The ViT's own pooling (CLS / avg / map) of the normed token sequence, always (B, D)."""
    z = vit.forward_head(tokens, pre_logits=True)
    if z.ndim == 3:  # global_pool="" returns the tokens
        z = z[:, vit.num_prefix_tokens:].mean(1)
    return z


class _FusionModel(PretrainedMixin, nn.Module):
    """Shared interface (see module docstring), saved and loaded like every histoexpr model."""

    uses_image: bool = True
    uses_expression: bool = True
    n_patches: int | None = None
    model_type = "fusion"
    default_units = "log1p(counts)"

    def __init__(self):
        super().__init__()
        self.config: dict[str, Any] = {}
        #: gene panels, set by :func:`histoexpr.tl.train_fusion` (checked when predicting)
        self.core_genes: list[str] | None = None
        self.target_genes: list[str] | None = None
        self.units = self.default_units
        self.checkpoint: str | None = None

    # the ExpressionModel contract: outputs are the add-on (target) genes, inputs the core panel
    @property
    def genes(self) -> list[str] | None:
        return self.target_genes

    @genes.setter
    def genes(self, value) -> None:
        self.target_genes = None if value is None else [str(g) for g in value]

    @property
    def input_dim(self) -> int | None:
        return self.config.get("n_core_genes")

    @property
    def num_outputs(self) -> int | None:
        return self.config.get("n_targets")

    def _metadata_to_save(self) -> dict[str, Any]:
        return {"core_genes": self.core_genes}

    @classmethod
    def _from_checkpoint(cls, config: dict[str, Any], *, genes, meta: dict[str, Any], folder: Path):
        classes = {c.__name__: c for c in (FusionViT, LateFusion, MorphologyOnly, ExpressionMLP)}
        name = config.get("model")
        klass = classes.get(name)
        if klass is None or not issubclass(klass, cls):
            raise ValueError(f"{folder} holds a {name!r} fusion model, not a {cls.__name__}")
        kwargs = {k: v for k, v in config.items() if k not in ("model", "model_type", "backbone_kwargs")}
        kwargs.update(config.get("backbone_kwargs") or {})
        if "pretrained_weights" in kwargs:  # the saved state dict has the weights
            kwargs["pretrained_weights"] = None
        model = klass(**kwargs)
        if "pretrained_weights" in config:  # provenance only
            model.config["pretrained_weights"] = config["pretrained_weights"]
        model.genes = genes
        model.core_genes = meta.get("core_genes")
        model.units = meta.get("units") or model.units
        return model

    def backbone_parameters(self) -> list[nn.Parameter]:
        vit = getattr(self, "vit", None)
        return list(vit.parameters()) if vit is not None else []

    def head_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def data_config(self) -> dict[str, Any]:
        """Input size and normalisation of the image backbone (timm's pretrained config)."""
        vit = getattr(self, "vit", None)
        cfg = dict(getattr(vit, "pretrained_cfg", {}) or {})
        size = tuple(vit.patch_embed.img_size) if vit is not None else None
        return {"img_size": size, "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}

    def embed(self, images: torch.Tensor | None, core_tokens: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor | None, core_tokens: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.embed(images, core_tokens))

    def _check_tokens(self, core_tokens: torch.Tensor, n_patches: int | None) -> None:
        if core_tokens is None:
            raise ValueError(f"{type(self).__name__} needs core_tokens (B, n_patches, n_core_genes)")
        if core_tokens.ndim != 3 or core_tokens.shape[-1] != self.config["n_core_genes"]:
            raise ValueError(f"core_tokens must be (B, n_patches, {self.config['n_core_genes']}), "
                             f"got {tuple(core_tokens.shape)}")
        if n_patches is not None and core_tokens.shape[1] != n_patches:
            raise ValueError(f"core_tokens has {core_tokens.shape[1]} patches, the ViT has {n_patches}: "
                             "the crop size / patch size of the crops and the backbone's img_size differ")


class FusionViT(_FusionModel):
    """Early fusion: core-transcript tokens injected into a timm ViT after its positional embedding.

    Per patch ``i``, ``h_core[i] = MLP(log1p(counts[i]))`` (width of the ViT). ``fusion="add"`` adds
    ``h_core[i]`` to image patch token ``i``; ``fusion="concat"`` appends the ``N`` expression tokens
    after the image tokens, each with the positional embedding of its patch plus a learned modality
    embedding. Class/register tokens stay in front; then the ViT blocks, norm, the ViT's own pooling
    (CLS by default) and a linear head to the add-on genes.

    Parameters
    ----------
    backbone
        timm ViT name (default ``vit_small_patch16_224``).
    n_core_genes, n_targets
        Width of the transcript input and of the output.
    fusion
        ``"add"`` or ``"concat"``.
    pretrained_weights
        See :func:`create_vit`.
    expr_hidden
        Hidden width of the expression MLP (default: the ViT width).
    **backbone_kwargs
        Passed to ``timm.create_model`` (e.g. ``img_size=64`` for smaller crops, ``depth=2``).

    Example
    -------
    >>> import torch
    >>> from histoexpr.models import FusionViT
    >>> model = FusionViT("vit_tiny_patch16_224", n_core_genes=5, n_targets=3, fusion="concat", img_size=32, depth=1)
    >>> images, core_tokens = torch.randn(2, 3, 32, 32), torch.ones(2, 4, 5)  # 4 patches of 16 px
    >>> model(images, core_tokens).shape
    torch.Size([2, 3])
    """

    def __init__(self, backbone: str = "vit_small_patch16_224", *, n_core_genes: int, n_targets: int,
                 fusion: Literal["add", "concat"] = "add", pretrained_weights: str | Path | None = None,
                 expr_hidden: int | None = None, **backbone_kwargs: Any):
        super().__init__()
        if fusion not in ("add", "concat"):
            raise ValueError(f"fusion must be 'add' or 'concat', got {fusion!r}")
        self.vit = create_vit(backbone, pretrained_weights=pretrained_weights, **backbone_kwargs)
        dim = self.vit.embed_dim
        self.n_patches = int(self.vit.patch_embed.num_patches)
        self.fusion = fusion
        self.expr_mlp = _expr_mlp(n_core_genes, expr_hidden or dim, dim)
        if fusion == "concat":
            self.modality_embed = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.head = nn.Linear(dim, n_targets)
        self.config = {"model": "FusionViT", "backbone": backbone, "n_core_genes": n_core_genes,
                       "n_targets": n_targets, "fusion": fusion, "expr_hidden": expr_hidden or dim,
                       "backbone_kwargs": backbone_kwargs,
                       "pretrained_weights": None if pretrained_weights is None else str(pretrained_weights)}

    def fused_tokens(self, images: torch.Tensor, core_tokens: torch.Tensor) -> torch.Tensor:
        """The token sequence entering the ViT blocks: ``[prefix, image patches (+ expression)]``
        for ``add``, ``[prefix, image patches, expression tokens]`` for ``concat``."""
        vit = self.vit
        self._check_tokens(core_tokens, self.n_patches)
        x = vit.patch_embed(images)  # (B, N, D), or (B, H, W, D) with dynamic_img_size
        h = self.expr_mlp(torch.log1p(core_tokens.float())).to(x.dtype).reshape(x.shape)
        x = vit._pos_embed(x)  # prefix tokens prepended, positions added
        npt = vit.num_prefix_tokens
        if self.fusion == "add":
            return torch.cat([x[:, :npt], x[:, npt:] + h.reshape(x.shape[0], -1, x.shape[-1])], dim=1)
        # _pos_embed on the expression tokens adds exactly the image patches' positional embeddings;
        # the prefix tokens it prepends are dropped.
        h = vit._pos_embed(h)[:, npt:] + self.modality_embed.to(x.dtype)
        return torch.cat([x, h], dim=1)

    def embed(self, images: torch.Tensor, core_tokens: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = self.fused_tokens(images, core_tokens)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        return _pooled(vit, x)


class LateFusion(_FusionModel):
    """Late fusion: pooled ViT embedding combined with an expression embedding, then a linear head.

    ``pooling="tile"``: ``z_core = MLP(log1p(sum of core counts over the crop))``;
    ``pooling="token"`` (tokenised late fusion): ``z_core = mean_i MLP(log1p(counts[i]))``.
    ``fusion="add"``: ``z_img + z_core``; ``"concat"``: ``[z_img, z_core]``.
    """

    def __init__(self, backbone: str = "vit_small_patch16_224", *, n_core_genes: int, n_targets: int,
                 fusion: Literal["add", "concat"] = "concat", pooling: Literal["tile", "token"] = "tile",
                 pretrained_weights: str | Path | None = None, expr_hidden: int | None = None,
                 **backbone_kwargs: Any):
        super().__init__()
        if fusion not in ("add", "concat"):
            raise ValueError(f"fusion must be 'add' or 'concat', got {fusion!r}")
        if pooling not in ("tile", "token"):
            raise ValueError(f"pooling must be 'tile' or 'token', got {pooling!r}")
        self.vit = create_vit(backbone, pretrained_weights=pretrained_weights, **backbone_kwargs)
        dim = self.vit.embed_dim
        self.n_patches = int(self.vit.patch_embed.num_patches)
        self.fusion, self.pooling = fusion, pooling
        self.expr_mlp = _expr_mlp(n_core_genes, expr_hidden or dim, dim)
        self.head = nn.Linear(2 * dim if fusion == "concat" else dim, n_targets)
        self.config = {"model": "LateFusion", "backbone": backbone, "n_core_genes": n_core_genes,
                       "n_targets": n_targets, "fusion": fusion, "pooling": pooling,
                       "expr_hidden": expr_hidden or dim, "backbone_kwargs": backbone_kwargs,
                       "pretrained_weights": None if pretrained_weights is None else str(pretrained_weights)}

    def embed(self, images: torch.Tensor, core_tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(core_tokens, self.n_patches)
        z_img = _pooled(self.vit, self.vit.forward_features(images))
        x = core_tokens.float()
        if self.pooling == "tile":
            z_core = self.expr_mlp(torch.log1p(x.sum(1)))
        else:
            z_core = self.expr_mlp(torch.log1p(x)).mean(1)
        z_core = z_core.to(z_img.dtype)
        return z_img + z_core if self.fusion == "add" else torch.cat([z_img, z_core], dim=-1)


class MorphologyOnly(_FusionModel):
    """Morphology-only baseline: the ViT's pooled embedding and a linear head."""

    uses_expression = False

    def __init__(self, backbone: str = "vit_small_patch16_224", *, n_targets: int,
                 pretrained_weights: str | Path | None = None, n_core_genes: int | None = None,
                 **backbone_kwargs: Any):
        super().__init__()
        self.vit = create_vit(backbone, pretrained_weights=pretrained_weights, **backbone_kwargs)
        self.n_patches = int(self.vit.patch_embed.num_patches)
        self.head = nn.Linear(self.vit.embed_dim, n_targets)
        self.config = {"model": "MorphologyOnly", "backbone": backbone, "n_targets": n_targets,
                       "n_core_genes": n_core_genes, "backbone_kwargs": backbone_kwargs,
                       "pretrained_weights": None if pretrained_weights is None else str(pretrained_weights)}

    def embed(self, images: torch.Tensor, core_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return _pooled(self.vit, self.vit.forward_features(images))


class ExpressionMLP(_FusionModel):
    """Expression-only baseline: a 1-hidden-layer MLP (32 units) on log1p core counts.

    ``level="tile"`` reads the crop's pooled counts; ``level="token"`` embeds each patch's counts and
    mean-pools the hidden units before the output layer.
    """

    uses_image = False

    def __init__(self, *, n_core_genes: int, n_targets: int, level: Literal["tile", "token"] = "tile",
                 hidden: int = 32):
        super().__init__()
        if level not in ("tile", "token"):
            raise ValueError(f"level must be 'tile' or 'token', got {level!r}")
        self.level = level
        self.hidden = nn.Sequential(nn.Linear(n_core_genes, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_targets)
        self.config = {"model": "ExpressionMLP", "n_core_genes": n_core_genes, "n_targets": n_targets,
                       "level": level, "hidden": hidden}

    def embed(self, images: torch.Tensor | None, core_tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(core_tokens, None)
        x = core_tokens.float()
        if self.level == "tile":
            return self.hidden(torch.log1p(x.sum(1)))
        return self.hidden(torch.log1p(x)).mean(1)


class MinMAEBaseline:
    """Copy, for each target gene, the core gene with the lowest training MAE (on log1p counts).

    Equivalent to a linear model with one coefficient fixed to 1 per target. Fitted with
    :meth:`fit`; ``source_index_`` / ``source_genes_`` hold the chosen core gene per target.

    Example
    -------
    >>> import numpy as np
    >>> from histoexpr.models import MinMAEBaseline
    >>> core = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 0.0]])
    >>> base = MinMAEBaseline().fit(core, core[:, [1]] + 0.1, core_genes=["A", "B"])
    >>> base.source_genes_, base.predict(core).ravel().tolist()
    (['B'], [1.0, 2.0, 0.0])
    """

    uses_image = False
    uses_expression = True

    def __init__(self):
        self.source_index_: np.ndarray | None = None
        self.source_genes_: list[str] | None = None
        self.train_mae_: np.ndarray | None = None
        self.core_genes: list[str] | None = None
        self.target_genes: list[str] | None = None

    def fit(self, core: np.ndarray, targets: np.ndarray, *, core_genes=None, target_genes=None,
            chunk: int = 4096) -> MinMAEBaseline:
        core = np.asarray(core, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.float64)
        if core.ndim != 2 or targets.ndim != 2 or core.shape[0] != targets.shape[0] or core.shape[0] == 0:
            raise ValueError(f"core (n, G_core) and targets (n, G_add) must share a non-zero n; got "
                             f"{core.shape} and {targets.shape}")
        if not (np.isfinite(core).all() and np.isfinite(targets).all()):
            raise ValueError("core and targets must be finite (no NaN/inf)")
        mae = np.zeros((core.shape[1], targets.shape[1]))
        for start in range(0, core.shape[0], chunk):
            c, t = core[start:start + chunk], targets[start:start + chunk]
            mae += np.abs(c[:, :, None] - t[:, None, :]).sum(0)
        mae /= core.shape[0]
        self.source_index_ = mae.argmin(0)
        self.train_mae_ = mae.min(0)
        self.core_genes = None if core_genes is None else [str(g) for g in core_genes]
        self.target_genes = None if target_genes is None else [str(g) for g in target_genes]
        if self.core_genes is not None:
            self.source_genes_ = [self.core_genes[i] for i in self.source_index_]
        return self

    def predict(self, core: np.ndarray) -> np.ndarray:
        if self.source_index_ is None:
            raise RuntimeError("MinMAEBaseline is not fitted; call fit() first")
        return np.asarray(core, dtype=np.float32)[:, self.source_index_]
