"""Training, prediction and evaluation for Xenium early fusion and its baselines .

Workflow::

    crops = hx.pp.xenium_crops(sdata, core_genes=core, addon_genes=addon)
    crops.obs["split"] = hx.tl.fusion_split(crops, test_fraction=0.25, random_state=0)
    fit = hx.tl.train_fusion(crops, hx.models.FusionViT(n_core_genes=len(core), n_targets=len(addon)),
                             sdata=sdata, split="split")
    scores = hx.tl.evaluate_fusion({"early-add": fit}, crops, split="split", sdata=sdata)
    pred = hx.tl.fuse_xenium(sdata, fit.model, crops=crops)   # AnnData + table in sdata
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .._docs import doc_params
from .._threads import threads_limited
from .._utils import check_targets, renamed_kwargs
from ..pp._xenium import core_counts, open_crop_slide, xenium_crop_images
from ._runtime import Patience, TrainResult, autocast, batched_inference, fit, load_models, resolve_device

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

SPLIT_LABELS = ("train", "val", "test", "purged")


class FusionError(ValueError):
    """Bad input to fusion training / prediction."""


# ---------------------------------------------------------------------------- splits
def _crop_info(crops) -> dict:
    info = crops.uns.get("histoexpr", {})
    needed = {"core_genes", "addon_genes", "n_patches", "tile_size", "tile_size_level0"}
    missing = needed - set(info)
    if missing or "X_core_tokens" not in crops.obsm:
        raise FusionError("crops must come from histoexpr.pp.xenium_crops (missing "
                          f"{sorted(missing) or ['obsm[X_core_tokens]']})")
    return info


def spatial_blocks(crops, *, block_size_um: float | None = None) -> np.ndarray:
    """Integer label of the square spatial block (side ``block_size_um``) holding each crop centre.

    Default block side: 2 × the crop side. Use as ``groups`` so that neighbouring crops share a split.
    """
    info = _crop_info(crops)
    block = float(block_size_um or 2 * info["tile_size_um"])
    if block <= 0:
        raise FusionError(f"block_size_um must be positive, got {block_size_um}")
    xy = np.asarray(crops.obsm["spatial_um"], dtype=float)
    cell = np.floor((xy - xy.min(0)) / block).astype(np.int64)
    return cell[:, 1] * (cell[:, 0].max() + 1) + cell[:, 0]


def _resolve_groups(crops, groups) -> np.ndarray:
    if groups is None:
        return spatial_blocks(crops)
    if isinstance(groups, str):
        if groups not in crops.obs.columns:
            raise FusionError(f"groups={groups!r} is not an obs column ({list(crops.obs.columns)})")
        return crops.obs[groups].to_numpy()
    groups = np.asarray(groups)
    if len(groups) != crops.n_obs:
        raise FusionError(f"groups has {len(groups)} entries for {crops.n_obs} crops")
    return groups


def _group_split(idx: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import GroupShuffleSplit

    n_groups = len(np.unique(groups[idx]))
    if n_groups < 2:
        raise FusionError(f"only {n_groups} group(s) to split; use smaller spatial blocks (block_size_um) "
                          "or pass groups=")
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    a, b = next(gss.split(idx, groups=groups[idx]))
    return idx[a], idx[b]


@renamed_kwargs(seed="random_state")
def fusion_split(crops, *, groups: str | Sequence | np.ndarray | None = None,
                 block_size_um: float | None = None, test_fraction: float = 0.25,
                 val_fraction: float = 0.2, purge: bool | str = True, random_state: int = 0) -> pd.Series:
    """Group-aware train/val/test split of crops (scikit-learn ``GroupShuffleSplit``).

    Parameters
    ----------
    crops
        Crops from :func:`histoexpr.pp.xenium_crops`.
    groups
        Obs column or array of group labels (e.g. patient, section); default: spatial blocks
        (:func:`spatial_blocks` with ``block_size_um``).
    test_fraction, val_fraction
        Fractions of the groups held out for test and validation (``test_fraction=0``: no test).
    purge
        Label ``"purged"`` the training crops that overlap a validation or test crop (overlapping crops
        share pixels and transcripts, which would leak); ``"test"``: only those overlapping a test crop
        (validation then slightly favours the training area, the test score stays clean).
    random_state
        Random seed.

    Returns
    -------
    Series over ``crops.obs_names`` with ``"train"``, ``"val"``, ``"test"`` or ``"purged"``.

    Example
    -------
    >>> crops.obs["split"] = hx.tl.fusion_split(crops, test_fraction=0.25, random_state=0)  # doctest: +SKIP
    """
    info = _crop_info(crops)
    g = groups if groups is not None else spatial_blocks(crops, block_size_um=block_size_um)
    g = _resolve_groups(crops, g)
    labels = np.full(crops.n_obs, "train", dtype=object)
    rest = np.arange(crops.n_obs)
    if test_fraction > 0:
        rest, test = _group_split(rest, g, test_fraction, random_state)
        labels[test] = "test"
    if val_fraction > 0:
        frac = min(val_fraction / max(1 - test_fraction, 1e-9), 0.9)
        _, val = _group_split(rest, g, frac, random_state + 1)
        labels[val] = "val"
    if purge:
        from scipy.spatial import cKDTree

        pos = crops.obs[["x0", "y0"]].to_numpy(dtype=float)
        held = np.flatnonzero(labels == "test") if purge == "test" else np.flatnonzero(labels != "train")
        train = np.flatnonzero(labels == "train")
        if len(held) and len(train):
            tree = cKDTree(pos[train])
            hits = tree.query_ball_point(pos[held], r=info["tile_size_level0"] - 1e-6, p=np.inf)
            near = np.unique(np.concatenate([np.asarray(h, dtype=np.int64) for h in hits]))
            labels[train[near]] = "purged"
    if not (labels == "train").any():
        raise FusionError("no training crops left after the split (and purging overlaps); lower "
                          "test_fraction/val_fraction, use a larger stride or smaller blocks")
    return pd.Series(pd.Categorical(labels, categories=list(SPLIT_LABELS)), index=crops.obs_names,
                     name="split")


def _split_labels(crops, split) -> np.ndarray:
    if isinstance(split, str):
        if split not in crops.obs.columns:
            raise FusionError(f"split={split!r} is not an obs column; make one with hx.tl.fusion_split")
        labels = crops.obs[split].astype(str).to_numpy()
    else:
        labels = np.asarray(pd.Series(split).astype(str))
        if len(labels) != crops.n_obs:
            raise FusionError(f"split has {len(labels)} entries for {crops.n_obs} crops")
    bad = set(labels) - set(SPLIT_LABELS)
    if bad:
        raise FusionError(f"split labels must be in {SPLIT_LABELS}, got {sorted(bad)}")
    return labels


# ---------------------------------------------------------------------------- batches
class _CropBatches:
    """Assembles (images, core tokens, targets) tensors for crop indices; images read once if small."""

    def __init__(self, crops, model, *, sdata=None, indices: np.ndarray, max_preload_bytes: float = 2e9):
        import torch

        info = _crop_info(crops)
        self.crops, self.info = crops, info
        self.uses_image = bool(getattr(model, "uses_image", True))
        self.tokens = sparse.csr_matrix(crops.obsm["X_core_tokens"], dtype=np.float32)
        self.targets = np.asarray(crops.X, dtype=np.float32) if not sparse.issparse(crops.X) else \
            crops.X.toarray().astype(np.float32)
        self.n_patches, self.n_core = int(info["n_patches"]), len(info["core_genes"])
        self.images = None
        self.slide = None
        if self.uses_image:
            cfg = model.data_config()
            size = int(info["tile_size"])
            if cfg["img_size"] is not None and tuple(cfg["img_size"]) != (size, size):
                raise FusionError(f"the crops are {size} px but the ViT expects {cfg['img_size']}; cut "
                                  f"crops with crop_size={cfg['img_size'][0]} or build the model with "
                                  f"img_size={size}")
            self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
            self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
            n_model = getattr(model, "n_patches", None)
            if n_model is not None and n_model != self.n_patches:
                raise FusionError(f"the crops have {self.n_patches} patches per crop, the ViT {n_model}: cut "
                                  "crops with the backbone's patch size (patch_size=) and img_size")
            self.slide = open_crop_slide(crops, sdata)
            if len(indices) * size * size * 3 <= max_preload_bytes:
                self.images = {int(i): k for k, i in enumerate(indices)}
                self.pixels = xenium_crop_images(crops, indices=indices, slide=self.slide)

    def __call__(self, idx: np.ndarray, device, *, with_targets: bool = True):
        import torch

        tok = self.tokens[idx].toarray().reshape(len(idx), self.n_patches, self.n_core)
        tokens = torch.from_numpy(tok).to(device)
        images = None
        if self.uses_image:
            if self.images is not None and all(int(i) in self.images for i in idx):
                px = self.pixels[[self.images[int(i)] for i in idx]]
            else:
                px = xenium_crop_images(self.crops, indices=idx, slide=self.slide)
            x = torch.from_numpy(px).permute(0, 3, 1, 2).float()
            images = ((x - self.mean) / self.std).to(device)
        targets = torch.from_numpy(self.targets[idx]).to(device) if with_targets else None
        return images, tokens, targets


def _predict_torch(model, batches: _CropBatches, idx: np.ndarray, device, batch_size: int,
                   embeddings: bool = False):
    def step(rows: slice):
        images, tokens, _ = batches(idx[rows], device, with_targets=False)
        z = model.embed(images, tokens)
        y = model.head(z)
        return y.float().cpu().numpy(), (z.float().cpu().numpy() if embeddings else None)

    outs = batched_inference(len(idx), batch_size, step, models=[model], device=device)
    n_t = model.head.out_features
    pred = np.concatenate([y for y, _ in outs]) if outs else np.zeros((0, n_t), np.float32)
    if embeddings:
        return pred, (np.concatenate([z for _, z in outs]) if outs else np.zeros((0, 0), np.float32))
    return pred


# ---------------------------------------------------------------------------- training
#: Old name of :class:`~histoexpr.tl.TrainResult` (what ``train_fusion`` returned), kept for one release.
FusionFit = TrainResult


def _check_panels(model, info) -> None:
    core, addon = list(info["core_genes"]), list(info["addon_genes"])
    cfg = getattr(model, "config", {}) or {}
    n_core = cfg.get("n_core_genes")
    if n_core is not None and getattr(model, "uses_expression", True) and n_core != len(core):
        raise FusionError(f"the model takes {n_core} core genes, the crops have {len(core)}")
    n_t = cfg.get("n_targets")
    if n_t is not None and n_t != len(addon):
        raise FusionError(f"the model predicts {n_t} genes, the crops have {len(addon)} add-on genes")
    for attr, panel, name in (("core_genes", core, "core"), ("target_genes", addon, "add-on")):
        known = getattr(model, attr, None)
        if known is not None and list(known) != panel and (attr != "core_genes" or
                                                           getattr(model, "uses_expression", True)):
            raise FusionError(f"gene panel mismatch: the model was trained on other {name} genes "
                              f"({len(known)} genes, e.g. {list(known)[:3]}) than these crops "
                              f"({len(panel)}, e.g. {panel[:3]}); cut crops with the model's panels")


def _param_groups(model, lr_backbone: float, lr_head: float, weight_decay: float):
    no_decay_names = ("pos_embed", "cls_token", "reg_token", "modality_embed")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for params, lr in ((model.backbone_parameters(), lr_backbone), (model.head_parameters(), lr_head)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2 and not any(k in names[id(p)] for k in no_decay_names)]
        other = [p for p in params if all(p is not q for q in decay)]
        for ps, wd in ((decay, weight_decay), (other, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": wd})
    return groups


def _lr_lambda(base_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    floor = min(min_lr / base_lr, 1.0) if base_lr > 0 else 0.0

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


@doc_params()
@renamed_kwargs(epochs="max_epochs", early_stopping="patience", seed="random_state")
@threads_limited(small=False)
def train_fusion(
    crops,
    model,
    *,
    sdata=None,
    split: str | Sequence | None = None,
    groups: str | Sequence | np.ndarray | None = None,
    val_fraction: float = 0.2,
    max_epochs: int = 35,
    lr_backbone: float = 1e-5,
    lr_head: float = 1e-4,
    min_lr: float = 1e-6,
    weight_decay: float = 1e-3,
    warmup: float = 5,
    grad_clip: float | None = 1.0,
    batch_size: int = 64,
    patience: int | None = 10,
    random_state: int = 0,
    device: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train a fusion model or baseline on Xenium crops (MSE on log1p add-on counts).

    AdamW with separate learning rates for the ViT backbone and everything else (expression MLP,
    modality embedding, head), linear warm-up then cosine decay to ``min_lr`` (per step), gradient
    clipping, bf16 autocast on CUDA, early stopping on validation MSE (the best epoch's weights are
    restored). :class:`~histoexpr.models.MinMAEBaseline` is fitted on the training crops instead.
    Defaults follow the paper (lr 1e-5 / 1e-4, wd 1e-3, 5 warm-up epochs, ≤ 35 epochs, patience 10).

    Parameters
    ----------
    crops
        Crops from :func:`histoexpr.pp.xenium_crops`.
    model
        A model from :mod:`histoexpr.models.fusion` (modified in place), a checkpoint directory of one
        (``save_pretrained``), or a ``MinMAEBaseline``.
    sdata
        The SpatialData of the crops, for the image pixels (default: re-read from the zarr path).
    split
        Obs column or array with ``train``/``val``/``test``/``purged`` (see :func:`fusion_split`); only
        ``train`` crops are trained on and ``val`` drives early stopping. Default: a group-aware
        train/val split (``groups``, ``val_fraction``, ``random_state``) without test.
    max_epochs, lr_backbone, lr_head, min_lr, weight_decay, warmup, grad_clip, batch_size
        Optimisation settings (``warmup`` in epochs, may be fractional).
    patience
        Early-stopping patience in epochs (``None``: train all epochs, still keep the best).
    {random_state}
    {device}
    checkpoint_dir
        If given, the best model so far is saved there (``save_pretrained`` layout; reload with
        ``FusionViT.from_pretrained`` or :func:`histoexpr.models.load_model`).
    {progress}

    Returns
    -------
    :class:`~histoexpr.tl.TrainResult` with ``model`` (also set: ``model.core_genes``/``model.target_genes``),
    ``history`` (per-epoch train loss, validation MSE, learning rate, seconds), ``split``,
    ``best_epoch``, ``best_score`` (validation MSE; old name ``best_val_mse``).

    Example
    -------
    >>> model = hx.models.FusionViT(n_core_genes=150, n_targets=50, fusion="add")  # doctest: +SKIP
    >>> fit = hx.tl.train_fusion(crops, model, sdata=sdata, split="split", max_epochs=20)  # doctest: +SKIP
    >>> fit.history[["train_loss", "val_mse"]].plot()  # doctest: +SKIP
    """
    import torch

    from ..models.fusion import MinMAEBaseline

    model = _unwrap(model)  # a checkpoint directory (fine-tuning) or an earlier TrainResult
    check_targets(crops, what="crop targets (crops.X)")  # a NaN target would make the whole model NaN
    info = _crop_info(crops)
    _check_panels(model, info)
    if split is None:
        labels = fusion_split(crops, groups=groups, test_fraction=0.0, val_fraction=val_fraction,
                              random_state=random_state).astype(str).to_numpy()
    else:
        labels = _split_labels(crops, split)
    split_series = pd.Series(pd.Categorical(labels, categories=list(SPLIT_LABELS)), index=crops.obs_names,
                             name="split")
    train_idx = np.flatnonzero(labels == "train")
    val_idx = np.flatnonzero(labels == "val")
    if len(train_idx) == 0:
        raise FusionError("no 'train' crops in the split")

    if isinstance(model, MinMAEBaseline):
        t0 = time.perf_counter()
        core = np.log1p(core_counts(crops))
        targets = crops.X.toarray() if sparse.issparse(crops.X) else np.asarray(crops.X)
        model.fit(core[train_idx], targets[train_idx], core_genes=info["core_genes"],
                  target_genes=info["addon_genes"])
        val_mse = float(np.mean((model.predict(core[val_idx]) - targets[val_idx]) ** 2)) \
            if len(val_idx) else None
        return TrainResult(model=model, models=[model], split=split_series, best_score=val_mse,
                           seconds=time.perf_counter() - t0, device="cpu")
    if len(val_idx) == 0 and patience is not None:
        raise FusionError("early stopping needs 'val' crops; set val_fraction > 0 or patience=None")

    dev = resolve_device(device)
    torch.manual_seed(random_state)
    rng = np.random.default_rng(random_state)
    model.to(dev)
    model.core_genes, model.target_genes = list(info["core_genes"]), list(info["addon_genes"])
    batches = _CropBatches(crops, model, sdata=sdata, indices=np.concatenate([train_idx, val_idx]))

    groups_ = _param_groups(model, lr_backbone, lr_head, weight_decay)
    optimizer = torch.optim.AdamW(groups_)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total = steps_per_epoch * max_epochs
    warm = int(round(warmup * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_lr_lambda(g["lr"], min_lr, warm, total) for g in groups_])

    def train_epoch(epoch: int) -> dict:
        order = rng.permutation(train_idx)
        losses = []
        for start in range(0, len(order), batch_size):
            b = order[start:start + batch_size]
            images, tokens, targets = batches(b, dev)
            with autocast(dev):
                pred = model(images, tokens)
            loss = torch.nn.functional.mse_loss(pred.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()) * len(b))
        return {"train_loss": sum(losses) / len(order), "lr_head": optimizer.param_groups[-1]["lr"]}

    def validate() -> dict:
        pv = _predict_torch(model, batches, val_idx, dev, batch_size)
        return {"val_mse": float(np.mean((pv - batches.targets[val_idx]) ** 2))}

    def save(epoch: int, row: dict) -> None:
        model.save_pretrained(checkpoint_dir, metadata={"epoch": epoch, "val_mse": row.get("val_mse"),
                                                        "random_state": random_state})

    t_start = time.perf_counter()
    log = fit(model, train_epoch, max_epochs=max_epochs, validate=validate if len(val_idx) else None,
              stopper=Patience(patience, "val_mse" if len(val_idx) else "train_loss"),
              on_save=save if checkpoint_dir is not None else None, timed=True, progress=progress,
              desc="train_fusion")
    best = log.best_row or {}
    return TrainResult(model=model, models=[model], split=split_series,
                       history=pd.DataFrame(log.rows).drop(columns="saved"), best_epoch=log.best_epoch,
                       best_score=best.get("val_mse") if len(val_idx) else None, epochs_run=len(log.rows),
                       seconds=time.perf_counter() - t_start, device=str(dev))


# ---------------------------------------------------------------------------- prediction
def _unwrap(model):
    if isinstance(model, FusionFit):
        return model.model
    if isinstance(model, (str, os.PathLike)):
        return load_models(model)[0]
    return model


@threads_limited(small=False)
def predict_fusion(crops, model, *, sdata=None, indices: np.ndarray | None = None, batch_size: int = 64,
                   device: str | None = None,
                   embeddings: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """Predictions (log1p add-on counts) of a fusion model or baseline for crops.

    Parameters
    ----------
    crops
        Crop AnnData from :func:`histoexpr.pp.xenium_crops`.
    model
        A trained model, a :class:`~histoexpr.tl.TrainResult` of :func:`train_fusion`, or a checkpoint
        directory written by ``save_pretrained``. The old order ``predict_fusion(model, crops)`` still
        works, with a ``DeprecationWarning``.
    sdata
        The SpatialData the crops were cut from (for the pixels).
    indices
        Positions of the crops to predict (default: all).
    batch_size, device
        Inference settings.
    embeddings
        Also return the fused embedding.

    Returns
    -------
    ``pred`` ``(n, n_addon)``, or ``(pred, embedding)`` with ``embeddings=True`` (``None`` for
    Min-MAE, which has no embedding).
    """
    import anndata as ad

    from ..models.fusion import MinMAEBaseline

    if isinstance(model, ad.AnnData) and not isinstance(crops, ad.AnnData):
        warnings.warn("predict_fusion(model, crops) is deprecated; pass the data first: "
                      "predict_fusion(crops, model)", DeprecationWarning, stacklevel=2)
        crops, model = model, crops
    model = _unwrap(model)
    info = _crop_info(crops)
    _check_panels(model, info)
    idx = np.arange(crops.n_obs) if indices is None else np.asarray(indices)
    if isinstance(model, MinMAEBaseline):
        pred = model.predict(np.log1p(core_counts(crops)[idx]))
        return (pred, None) if embeddings else pred
    dev = resolve_device(device)
    batches = _CropBatches(crops, model, sdata=sdata, indices=idx)
    return _predict_torch(model, batches, idx, dev, batch_size, embeddings=embeddings)


def fuse_xenium(
    data,
    model,
    *,
    crops=None,
    sdata=None,
    batch_size: int = 64,
    device: str | None = None,
    key_added: str | None = "fusion",
    overwrite: bool = False,
    **crop_kwargs: Any,
) -> AnnData:
    """Predict add-on genes for every crop with a trained fusion model; embeddings for clustering.

    Parameters
    ----------
    data
        A SpatialData (crops are cut with :func:`histoexpr.pp.xenium_crops` using the model's gene
        panels and ``crop_kwargs``, unless ``crops=`` is given) or a crop AnnData (then pass ``sdata=``
        for the pixels and to write the table back).
    model
        A trained model or :class:`FusionFit` (from :func:`train_fusion`).
    crops
        Pre-cut crops for a SpatialData ``data``.
    batch_size, device
        Inference settings.
    key_added
        Write the crops as square polygons ``"<key_added>_crops"`` (in the image's coordinate systems)
        and the result as table ``"<key_added>_table"`` annotating them into the SpatialData
        (``None``: do not write).
    overwrite
        Replace existing elements of those names.
    **crop_kwargs
        Passed to :func:`histoexpr.pp.xenium_crops` (``crop_size``, ``stride``, ``image_key``…).

    Returns
    -------
    AnnData crops × add-on genes: ``X`` predictions (log1p), ``layers["measured"]`` the measured
    log1p counts, ``obsm["X_fusion"]`` the fused embedding (ready for
    ``sc.pp.neighbors(use_rep="X_fusion")`` / :func:`histoexpr.tl.leiden` / UMAP), ``obs``/``obsm["spatial"]``/``uns`` from the crops.

    Example
    -------
    >>> pred = hx.tl.fuse_xenium(sdata, fit, stride=112)  # doctest: +SKIP
    >>> sc.pp.neighbors(pred, use_rep="X_fusion"); sc.tl.leiden(pred)  # doctest: +SKIP
    """
    import anndata as ad

    from ..pp._xenium import xenium_crops

    model_ = _unwrap(model)
    if isinstance(data, ad.AnnData):
        crops = data
    else:
        sdata = data
        if crops is None:
            core, addon = getattr(model_, "core_genes", None), getattr(model_, "target_genes", None)
            if core is None or addon is None:
                raise FusionError("the model does not know its gene panels (train it with train_fusion "
                                  "or pass crops=)")
            vit = getattr(model_, "vit", None)
            if vit is not None:
                crop_kwargs.setdefault("crop_size", int(vit.patch_embed.img_size[0]))
                crop_kwargs.setdefault("patch_size", int(vit.patch_embed.patch_size[0]))
            crops = xenium_crops(sdata, core_genes=core, addon_genes=addon, **crop_kwargs)
    info = _crop_info(crops)
    pred, emb = predict_fusion(crops, model_, sdata=sdata, batch_size=batch_size, device=device,
                               embeddings=True)
    out = ad.AnnData(X=pred.astype(np.float32), obs=crops.obs.copy(), var=crops.var.copy())
    measured = crops.X.toarray() if sparse.issparse(crops.X) else np.asarray(crops.X)
    out.layers["measured"] = measured.astype(np.float32)
    for key in ("spatial", "spatial_um"):
        if key in crops.obsm:
            out.obsm[key] = np.asarray(crops.obsm[key]).copy()
    if emb is not None:
        out.obsm["X_fusion"] = emb.astype(np.float32)
    uns = copy.deepcopy(dict(crops.uns))
    cfg = dict(getattr(model_, "config", {}) or {"model": type(model_).__name__})
    uns.setdefault("histoexpr", {})["model"] = {k: (str(v) if isinstance(v, dict) else v)
                                                for k, v in cfg.items()}
    out.uns.update(uns)
    out.obs["tile_id"] = out.obs_names.astype(str)
    if key_added is not None and sdata is not None:
        from ..io import add_tiles_to_spatialdata

        add_tiles_to_spatialdata(sdata, out, image_key=info["image_key"], shapes_key=f"{key_added}_crops",
                                 table_key=f"{key_added}_table", overwrite=overwrite)
    return out


# ---------------------------------------------------------------------------- evaluation
def _per_gene_scores(pred: np.ndarray, truth: np.ndarray, genes: list[str]) -> pd.DataFrame:
    from ..metrics import pearson, spearman

    return pd.DataFrame({
        "gene": genes,
        "pearson": np.asarray(pearson(pred, truth, return_pvalue=False), dtype=float),
        "spearman": np.asarray(spearman(pred, truth, return_pvalue=False), dtype=float),
        "mse": ((pred - truth) ** 2).mean(0),
    })


def evaluate_fusion(models: Mapping[str, Any], crops, split: str | Sequence, *, subset: str = "test",
                    sdata=None, batch_size: int = 64, device: str | None = None) -> pd.DataFrame:
    """Per-gene Pearson, Spearman and MSE of several models on the same crops of a split.

    Parameters
    ----------
    models
        ``{name: model}``: trained torch models, :class:`FusionFit` results, fitted ``MinMAEBaseline``, or
        precomputed predictions (array ``(n_crops, n_addon)`` over all crops).
    crops
        Crops from :func:`histoexpr.pp.xenium_crops` (targets in ``X``).
    split
        Obs column or array of split labels (:func:`fusion_split`); scored on ``subset``.
    subset
        Which split label to score (default ``"test"``).

    Returns
    -------
    Long DataFrame: ``model``, ``gene``, ``pearson``, ``spearman``, ``mse`` (constant genes give NaN
    correlations). Summarise with ``df.groupby("model")[["pearson", "spearman", "mse"]].mean()``.

    Example
    -------
    >>> df = hx.tl.evaluate_fusion({"early": fit, "min-mae": base}, crops, "split")  # doctest: +SKIP
    """
    info = _crop_info(crops)
    labels = _split_labels(crops, split)
    idx = np.flatnonzero(labels == subset)
    if len(idx) < 3:
        raise FusionError(f"only {len(idx)} crops labelled {subset!r}; need at least 3 to correlate")
    truth = crops.X.toarray() if sparse.issparse(crops.X) else np.asarray(crops.X)
    truth = truth[idx].astype(np.float64)
    frames = []
    for name, m in models.items():
        if isinstance(m, np.ndarray | pd.DataFrame):
            pred = np.asarray(m, dtype=np.float64)
            if pred.shape != (crops.n_obs, len(info["addon_genes"])):
                raise FusionError(f"predictions for {name!r} must be (n_crops, n_addon) = "
                                  f"{(crops.n_obs, len(info['addon_genes']))}, got {pred.shape}")
            pred = pred[idx]
        else:
            pred = predict_fusion(crops, m, sdata=sdata, indices=idx, batch_size=batch_size,
                                  device=device).astype(np.float64)
        df = _per_gene_scores(pred, truth, list(info["addon_genes"]))
        df.insert(0, "model", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
