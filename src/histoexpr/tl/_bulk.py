"""Slide-level (bulk) expression: prediction with SEQUOIA-type models and cross-validated training.

``predict_bulk`` turns tile features into one expression profile per slide; ``train_bulk`` runs
the SEQUOIA training protocol: patient-level K-fold cross-validation, a validation
split of the training patients, MSE loss, the MSE-then-correlation early-stopping rule and an
untrained "random model" baseline on the same test folds.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._docs import doc_params
from .._settings import progress_bar
from .._threads import threads_limited
from .._utils import (
    check_finite,
    check_targets,
    iter_slides,
    means_fingerprint,
    renamed_kwargs,
    resolve_feature_key,
)
from ._runtime import TrainResult, batched_inference, fit, load_models, model_id, model_info, resolve_device

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from anndata import AnnData
    from torch import nn

__all__ = ["predict_bulk", "train_bulk", "BulkCVResult", "EarlyStopping", "patient_folds"]

_MODEL_TYPES = ("sequoia", "he2rna", "transformer")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _load_models(model: Any) -> list[nn.Module]:
    models = load_models(model)
    dims = {(model_info(m, "input_dim"), model_info(m, "num_clusters"), model_info(m, "num_outputs")) for m in models}
    if len(dims) > 1:
        raise ValueError(f"the fold models differ in (input_dim, num_clusters, num_outputs): {sorted(dims, key=str)}")
    return models


def _kmeans_means(features: np.ndarray, n_clusters: int, random_state: int) -> np.ndarray:
    from histoexpr.pp import kmeans_means

    return np.asarray(kmeans_means(features, n_clusters=n_clusters, random_state=random_state), dtype=np.float32)


def _slide_metadata(obs: pd.DataFrame, slide_key: str, slide_ids: list[str]) -> pd.DataFrame:
    """Per-slide obs: the columns that are constant within every slide, plus the tile count."""
    grouped = obs.groupby(slide_key, observed=True, sort=False)
    constant = [c for c in obs.columns if c != slide_key and (grouped[c].nunique(dropna=False) <= 1).all()]
    meta = grouped[constant].first() if constant else pd.DataFrame(index=grouped.size().index)
    meta["n_tiles"] = grouped.size()
    meta.index = meta.index.astype(str)
    meta = meta.loc[slide_ids]
    meta.insert(0, "slide_id", meta.index)
    return meta


def _tiles_to_inputs(
    adata: AnnData,
    *,
    use_rep: str | None,
    n_clusters: int,
    input_dim: int | None,
    cluster_key: str,
    random_state: int,
    slide_key: str,
) -> tuple[np.ndarray, pd.DataFrame]:
    rep = resolve_feature_key(adata, use_rep)
    feats = np.asarray(adata.obsm[rep])
    if input_dim is not None and feats.shape[1] != input_dim:
        raise ValueError(_dim_error(feats.shape[1], input_dim, f"obsm[{rep!r}]"))
    slides = iter_slides(adata, slide_key)
    slide_col = np.empty(adata.n_obs, dtype=object)
    for sid, pos in slides:
        slide_col[pos] = sid
    obs = adata.obs.copy()
    obs[slide_key] = slide_col
    slide_ids = [sid for sid, _ in slides]
    cached, cached_fp = {}, {}
    stored = adata.uns.get(cluster_key)
    if isinstance(stored, Mapping) and isinstance(stored.get("means"), Mapping):
        cached = stored["means"]
        cached_fp = stored.get("fingerprints") if isinstance(stored.get("fingerprints"), Mapping) else {}
    inputs = []
    for sid, mask in slides:
        means = cached.get(sid) if isinstance(cached, Mapping) else None
        if means is not None and cached_fp.get(sid) is None:
            warnings.warn(
                f"using the cluster means in uns[{cluster_key!r}]['means'][{sid!r}] as given: they carry no "
                "fingerprint, so whether they belong to these tiles and features cannot be checked. Delete them "
                "to have them recomputed, or make them with pp.cluster_features.",
                UserWarning,
                stacklevel=4,
            )
        elif means is not None and cached_fp[sid] != means_fingerprint(
            feats[mask], adata.obs_names[mask], use_rep=rep, n_clusters=n_clusters, random_state=random_state
        ):
            # computed from other tiles, other features or other k-means settings: stale
            warnings.warn(
                f"uns[{cluster_key!r}]['means'][{sid!r}] was computed from other tiles, features or k-means "
                f"settings than obsm[{rep!r}] and this call; the cluster means are recomputed (run "
                f"pp.cluster_features again to update uns[{cluster_key!r}]).",
                UserWarning,
                stacklevel=4,
            )
            means = None
        if means is not None and np.shape(means) == (n_clusters, feats.shape[1]):
            means = np.asarray(means, dtype=np.float32)
            check_finite(means, what=f"cluster means of slide {sid!r} in uns[{cluster_key!r}]")
        else:
            slide_feats = feats[mask]
            check_finite(slide_feats, what=f"tile features of slide {sid!r} (obsm[{rep!r}])")
            if slide_feats.shape[0] < n_clusters:
                raise ValueError(
                    f"slide {sid!r} has {slide_feats.shape[0]} tiles, fewer than the {n_clusters} clusters the model "
                    f"needs; tile with a lower tissue threshold / smaller tiles, or use a model trained with fewer clusters"
                )
            means = _kmeans_means(slide_feats.astype(np.float32), n_clusters, random_state)
        inputs.append(means)
    return np.stack(inputs).astype(np.float32), _slide_metadata(obs, slide_key, slide_ids)


def _dim_error(got: int, expected: int, what: str) -> str:
    return (
        f"{what} has feature dimension {got} but the model expects input_dim={expected}; use features from the "
        f"encoder the model was trained with (SEQUOIA: UNI = 1024, ResNet-50 = 2048)"
    )


def _gather_inputs(data: Any, **kwargs: Any) -> tuple[np.ndarray, pd.DataFrame]:
    """Cluster-mean inputs of tiles AnnData (one or a list; ``kwargs`` of :func:`_tiles_to_inputs`) or an array."""
    from anndata import AnnData

    input_dim, n_clusters = kwargs["input_dim"], kwargs["n_clusters"]
    if isinstance(data, AnnData):
        return _tiles_to_inputs(data, **kwargs)
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, AnnData) for d in data):
        parts = [_tiles_to_inputs(d, **kwargs) for d in data]
        x = np.concatenate([p[0] for p in parts])
        obs = pd.concat([p[1] for p in parts])
        if obs.index.duplicated().any():
            raise ValueError(f"slide ids occur in several inputs: {obs.index[obs.index.duplicated()].unique().tolist()}")
        return x, obs
    arr = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected a tiles AnnData, a list of them, or an array (n_slides, K, D); got shape {arr.shape}")
    if arr.shape[1] != n_clusters:
        raise ValueError(
            f"the input has {arr.shape[1]} feature vectors per slide but the model needs {n_clusters} (one per K-means "
            "cluster); pass tile features as an AnnData to have them clustered, or use pp.kmeans_means"
        )
    if input_dim is not None and arr.shape[2] != input_dim:
        raise ValueError(_dim_error(arr.shape[2], input_dim, "the input"))
    check_finite(arr.reshape(arr.shape[0], -1), what="the input features (per slide)")
    obs = pd.DataFrame(index=pd.Index([f"slide_{i}" for i in range(arr.shape[0])]))
    obs.insert(0, "slide_id", obs.index)
    return arr, obs


def _forward_batched(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Eval-mode forward in batches on ``device``; the model's device and train/eval mode are restored."""
    import torch

    def step(rows: slice) -> np.ndarray:
        return model(torch.as_tensor(x[rows], dtype=torch.float32).to(device)).float().cpu().numpy()

    # fp32: bulk predictions stay identical across devices (the CUDA test compares with the CPU at 1e-3)
    outs = batched_inference(len(x), batch_size, step, models=[model], device=device, precision="fp32")
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


@doc_params()
@threads_limited(small=True)
def predict_bulk(
    data: Any,
    model: Any,
    *,
    use_rep: str | None = None,
    n_clusters: int | None = None,
    cluster_key: str = "kmeans",
    random_state: int = 0,
    slide_key: str = "slide_id",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    genes: Sequence[str] | None = None,
    units: str | None = None,
    average_folds: bool = True,
    progress: bool | None = None,
) -> AnnData | list[AnnData]:
    """Predict slide-level (bulk) expression from tile features with SEQUOIA or another bulk aggregator.

    Parameters
    ----------
    data
        A tiles AnnData (one or many slides, told apart by ``obs[slide_key]``) with features in
        ``obsm["X_<encoder>"]``; a list of such AnnData; or an array ``(n_slides, K, D)`` of
        cluster-mean features. Tiles are clustered per slide with K-means (K = the model's
        ``num_clusters``) unless ``uns[cluster_key]["means"][slide_id]`` already holds the means
        (written by :func:`histoexpr.pp.cluster_features`) and their fingerprint still matches the
        slide's tiles, features and K-means settings; stale means are recomputed with a warning, and
        means without a fingerprint (placed by hand) are used with a warning.
    model
        A :class:`~histoexpr.models.Sequoia` (or any ``nn.Module`` mapping (B, K, D) -> (B, G)),
        a checkpoint directory, ``"hf-hub:gevaertlab/sequoia-brca-0"``, or a list of those
        (e.g. the 5 fold models of a release).
    {use_rep}
    n_clusters
        K; default the model's ``num_clusters`` (100).
    cluster_key, random_state
        Where cached cluster means are looked up, and the K-means seed.
    slide_key
        ``obs`` column with the slide id.
    batch_size
        Slides per forward pass.
    {device}
    genes
        Output gene names (default: the model's gene list, e.g. the 20,820 official SEQUOIA genes).
    units
        Units to record (default: the model's, ``"log2(FPKM-UQ+1)"`` for the released SEQUOIA models).
    average_folds
        With several models, return one AnnData with their mean (``True``) or a list with one
        AnnData per model (``False``).
    progress
        Progress bar over the fold models; default ``histoexpr.settings.progress``. Runs with
        ``histoexpr.settings.n_threads`` CPU threads (default 1: per-slide k-means and one forward pass).

    Returns
    -------
    AnnData slides × genes: ``obs`` = slide metadata (``slide_id``, ``n_tiles`` and the tile
    ``obs`` columns that are constant within a slide), ``uns["histoexpr"]`` with ``units``,
    ``model``, ``n_models``, ``n_clusters``, ``use_rep``. SEQUOIA has no output activation, so
    values can be negative even though the units are log2(FPKM-UQ+1).

    Example
    -------
    >>> import numpy as np, histoexpr as hx
    >>> from histoexpr.models import Sequoia
    >>> model = Sequoia(num_outputs=3, input_dim=8, depth=1, nheads=2, num_clusters=10)
    >>> bulk = hx.tl.predict_bulk(np.zeros((2, 10, 8), np.float32), model, device="cpu")  # 2 slides
    >>> bulk.shape, list(bulk.obs_names)
    ((2, 3), ['slide_0', 'slide_1'])
    >>> bulk = hx.tl.predict_bulk(tiles, "sequoia-brca-0/")  # doctest: +SKIP
    >>> folds = [f"sequoia-brca-{i}/" for i in range(5)]
    >>> bulk = hx.tl.predict_bulk(tiles, folds, use_rep="X_uni")  # doctest: +SKIP
    """
    from anndata import AnnData

    dev = resolve_device(device)
    models = _load_models(model)
    ref = models[0]
    input_dim = model_info(ref, "input_dim")
    k_model = model_info(ref, "num_clusters")
    if n_clusters is None:
        n_clusters = k_model or 100
    elif k_model is not None and n_clusters != k_model:
        raise ValueError(f"n_clusters={n_clusters} but the model was built for num_clusters={k_model}")
    rep = None
    if isinstance(data, AnnData):
        rep = resolve_feature_key(data, use_rep)
    x, obs = _gather_inputs(
        data,
        use_rep=use_rep,
        n_clusters=n_clusters,
        input_dim=input_dim,
        cluster_key=cluster_key,
        random_state=random_state,
        slide_key=slide_key,
    )
    preds = [_forward_batched(m, x, batch_size, dev)
             for m in progress_bar(models, enabled=progress, desc="predict_bulk models", unit="model")]
    n_out = preds[0].shape[1]
    gene_names = list(genes) if genes is not None else model_info(ref, "genes")
    if gene_names is None:
        gene_names = [f"gene_{i}" for i in range(n_out)]
    if len(gene_names) != n_out:
        raise ValueError(f"{len(gene_names)} gene names for a model with {n_out} outputs")
    unit = units or model_info(ref, "units") or "unknown"
    var = pd.DataFrame(index=pd.Index([str(g) for g in gene_names]))

    def _make(values: np.ndarray, model_ids: list[str]) -> AnnData:
        out = AnnData(X=values.astype(np.float32), obs=obs.copy(), var=var.copy())
        out.uns["histoexpr"] = {
            "units": unit,
            "model": model_ids if len(model_ids) > 1 else model_ids[0],
            "n_models": len(model_ids),
            "n_clusters": int(n_clusters),
            "use_rep": rep or "",
        }
        return out

    ids = [model_id(m) for m in models]
    if average_folds or len(models) == 1:
        return _make(np.mean(preds, axis=0), ids)
    return [_make(p, [i]) for p, i in zip(preds, ids)]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class EarlyStopping:
    """The SEQUOIA checkpoint/stop rule (paper Methods).

    Save on every new best validation MSE. Once the MSE has not improved for ``patience`` epochs,
    training goes on only while the validation MSE stays below ``best_mse + delta`` and the
    validation correlation keeps improving: an epoch whose correlation beats the best so far is
    saved; training stops at the first epoch with MSE >= ``best_mse + delta``, or when the
    correlation has not improved for ``patience`` epochs.

    (The reference code instead tolerates ``patience`` consecutive epochs above the MSE threshold
    and saves correlation improvements without checking the MSE; here the MSE bound is strict.)

    Example
    -------
    >>> stop = EarlyStopping(patience=2, delta=0.5)
    >>> history = [(1.0, 0.1), (1.1, 0.2), (1.2, 0.3), (1.2, 0.4), (1.3, 0.35), (1.4, 0.3)]
    >>> [stop.step(mse, corr) for mse, corr in history]
    [(True, False), (False, False), (True, False), (True, False), (False, False), (False, True)]
    """

    def __init__(self, patience: int = 20, delta: float = 0.5):
        self.patience = int(patience)
        self.delta = float(delta)
        self.best_mse = np.inf
        self.best_corr = -np.inf
        self.epochs_without_mse_improvement = 0
        self.epochs_without_corr_improvement = 0

    def update(self, row: Mapping[str, Any]) -> tuple[bool, bool]:
        """:meth:`step` on an epoch's ``val_mse`` and ``val_corr`` (the interface of the fit loop)."""
        return self.step(row["val_mse"], row["val_corr"])

    def step(self, val_mse: float, val_corr: float) -> tuple[bool, bool]:
        """Record one epoch; return ``(save, stop)``."""
        corr_improved = bool(np.isfinite(val_corr) and val_corr > self.best_corr)
        if corr_improved:
            self.best_corr = float(val_corr)
            self.epochs_without_corr_improvement = 0
        else:
            self.epochs_without_corr_improvement += 1
        if val_mse < self.best_mse:
            self.best_mse = float(val_mse)
            self.epochs_without_mse_improvement = 0
            return True, False
        self.epochs_without_mse_improvement += 1
        if self.epochs_without_mse_improvement < self.patience:
            return False, False
        if not val_mse < self.best_mse + self.delta:
            return False, True
        if corr_improved:
            return True, False
        return False, self.epochs_without_corr_improvement >= self.patience


@renamed_kwargs(seed="random_state")
def patient_folds(patients: Sequence[Any], *, n_folds: int = 5, random_state: int = 0) -> np.ndarray:
    """Assign every slide a fold so that all slides of a patient share one fold.

    Patients are shuffled with ``random_state`` and dealt round-robin into ``n_folds`` folds (patient
    counts per fold differ by at most one). Deterministic for a given ``random_state``.

    Example
    -------
    >>> from histoexpr.tl._bulk import patient_folds
    >>> patient_folds(["a", "a", "b", "c", "d"], n_folds=2, random_state=0).tolist()
    [1, 1, 0, 0, 1]
    """
    patients = np.asarray(patients).astype(str)
    unique = np.unique(patients)
    if len(unique) < n_folds:
        raise ValueError(f"{len(unique)} patients cannot be split into n_folds={n_folds} folds")
    order = np.random.default_rng(random_state).permutation(len(unique))
    fold_of = {unique[i]: pos % n_folds for pos, i in enumerate(order)}
    return np.array([fold_of[p] for p in patients], dtype=int)


def _check_folds(folds: Sequence[Any], patients: np.ndarray) -> np.ndarray:
    folds = np.asarray(folds)
    if folds.shape != patients.shape:
        raise ValueError(f"`folds` has {folds.shape[0]} entries for {patients.shape[0]} slides")
    table = pd.DataFrame({"patient": patients, "fold": folds})
    per_patient = table.groupby("patient")["fold"].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        examples = {p: sorted(table.loc[table.patient == p, "fold"].unique().tolist()) for p in leaking.index[:5]}
        raise ValueError(
            f"{len(leaking)} patient(s) have slides in several folds, which leaks test patients into training: "
            f"{examples}. Give all slides of a patient the same fold (or leave `folds=None`)"
        )
    return folds


def _validation_split(train_idx: np.ndarray, patients: np.ndarray, fraction: float, rng: np.random.Generator):
    train_patients = np.unique(patients[train_idx])
    n_val = max(1, int(round(fraction * len(train_patients))))
    if n_val >= len(train_patients):
        raise ValueError(f"only {len(train_patients)} training patients in a fold; too few for a validation split")
    val_patients = rng.choice(train_patients, size=n_val, replace=False)
    is_val = np.isin(patients[train_idx], val_patients)
    return train_idx[~is_val], train_idx[is_val]


def _mean_gene_correlation(pred: np.ndarray, truth: np.ndarray) -> float:
    from histoexpr.metrics import pearson

    if pred.shape[0] < 2:
        return float("nan")
    r = np.asarray(pearson(pred, truth, return_pvalue=False))
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _build_model(model: str | Callable[..., nn.Module], num_outputs: int, input_dim: int, num_clusters: int, config, genes, units, device) -> nn.Module:
    from histoexpr.models import HE2RNA, Sequoia, TransformerAggregator

    if callable(model) and not isinstance(model, str):
        return model(num_outputs=num_outputs, input_dim=input_dim, num_clusters=num_clusters, **(config or {}))
    classes = {"sequoia": Sequoia, "he2rna": HE2RNA, "transformer": TransformerAggregator}
    if model not in classes:
        raise ValueError(f"model must be one of {list(classes)} or a callable; got {model!r}")
    cfg = {"num_outputs": num_outputs, "input_dim": input_dim, "num_clusters": num_clusters, **(config or {})}
    if model == "sequoia":
        cfg.setdefault("device", str(device))
    return classes[model](cfg, genes=genes, units=units)


def _as_targets(Y: Any, genes: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    names = None
    if hasattr(Y, "var_names") and hasattr(Y, "X"):
        names = list(map(str, Y.var_names))
        Y = Y.X.toarray() if hasattr(Y.X, "toarray") else Y.X
    elif isinstance(Y, pd.DataFrame):
        names = list(map(str, Y.columns))
        Y = Y.to_numpy()
    y = np.asarray(Y, dtype=np.float32)
    if y.ndim != 2:
        raise ValueError(f"Y must be (n_slides, n_genes); got shape {y.shape}")
    if genes is not None:
        names = [str(g) for g in genes]
    names = names or [f"gene_{i}" for i in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} gene names for {y.shape[1]} genes")
    check_finite(y, what="the targets Y", hint="Fix or drop those samples before training.")
    return y, names


#: Old name of :class:`~histoexpr.tl.TrainResult` (what ``train_bulk`` returned), kept for one release.
BulkCVResult = TrainResult

_HISTORY_COLUMNS = ("epoch", "train_loss", "val_mse", "val_corr", "saved")


@doc_params()
@renamed_kwargs(seed="random_state", out_dir="checkpoint_dir", model_config="model_kwargs")
@threads_limited(small=False)
def train_bulk(
    X: Any,
    Y: Any,
    patients: Sequence[Any],
    *,
    model: str | Callable[..., nn.Module] = "sequoia",
    model_kwargs: Mapping[str, Any] | None = None,
    genes: Sequence[str] | None = None,
    folds: Sequence[Any] | None = None,
    n_folds: int = 5,
    val_fraction: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    batch_size: int = 16,
    max_epochs: int = 200,
    patience: int = 20,
    delta: float = 0.5,
    random_state: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    units: str | None = None,
    slide_ids: Sequence[str] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train a bulk aggregator with the SEQUOIA protocol: patient-level K-fold cross-validation.

    For each fold: the other folds' patients are split into training and validation
    (``val_fraction`` of the patients), the model is trained with MSE and Adam/AdamW, the best epoch
    is chosen by :class:`EarlyStopping` (best validation MSE; after ``patience`` epochs without
    improvement, training continues only while MSE < best + ``delta`` and the mean per-gene
    validation correlation keeps improving within ``patience`` epochs; correlation improvements
    are saved), and the best model predicts the held-out fold. An untrained
    model of the same architecture (the "random model") predicts the same fold as a baseline.

    Parameters
    ----------
    X
        ``(n_slides, K, D)`` cluster-mean features (e.g. stacked from :func:`histoexpr.pp.kmeans_means`).
    Y
        ``(n_slides, n_genes)`` targets (array, DataFrame or AnnData), e.g. log2(FPKM-UQ+1).
    patients
        Patient id of every slide; all slides of a patient go to the same fold.
    model
        ``"sequoia"``, ``"he2rna"``, ``"transformer"`` or a callable
        ``f(num_outputs=, input_dim=, num_clusters=, **model_kwargs) -> nn.Module``.
    model_kwargs
        Extra architecture options (e.g. ``{"depth": 2, "nheads": 4}``).
    genes
        Gene names (default: ``Y``'s columns / var_names).
    folds
        Explicit fold label per slide (checked: a patient may not span folds). Default: patients
        shuffled with ``random_state`` and dealt into ``n_folds`` folds.
    n_folds, val_fraction, lr, weight_decay, optimizer, batch_size, max_epochs, patience, delta
        Protocol settings; defaults are the paper's (5 folds, 10 %, 1e-3, Adam, 16, 200, 20, 0.5).
    random_state
        Seeds folds, validation split, initialisation, batch order and the random models.
    checkpoint_dir
        If given, each fold's best model is saved to ``checkpoint_dir/fold_<i>`` in the Hugging Face
        layout (reload with ``Sequoia.from_pretrained`` / ``models.load_bulk_model``), and the
        pooled predictions to ``checkpoint_dir/cv_predictions.h5ad``.
    {device}
    units
        Units of ``Y``, recorded with the predictions and checkpoints.
    slide_ids
        Names of the slides (``obs_names`` of the result).
    {progress}

    Returns
    -------
    :class:`~histoexpr.tl.TrainResult` with pooled test ``predictions`` (incl. random-model ones), per-fold
    summaries, training history and the trained models.

    Example
    -------
    >>> import histoexpr as hx
    >>> res = hx.tl.train_bulk(X, Y, patients, model="sequoia", checkpoint_dir="cv_brca")  # doctest: +SKIP
    >>> res.well_predicted_genes()["well_predicted"].sum()  # doctest: +SKIP
    """
    import torch
    from anndata import AnnData

    check_targets(Y)  # a NaN target would make the whole model NaN
    dev = resolve_device(device)
    units = units or "unknown"
    x = np.asarray(X.detach().cpu().numpy() if hasattr(X, "detach") else X, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"X must be (n_slides, K, D) cluster-mean features; got shape {x.shape}")
    check_finite(x.reshape(len(x), -1), what="the input features X (per slide)")
    y, gene_names = _as_targets(Y, genes)
    patients = np.asarray(patients).astype(str)
    if not (len(x) == len(y) == len(patients)):
        raise ValueError(f"X, Y and patients must have one entry per slide; got {len(x)}, {len(y)}, {len(patients)}")
    fold_of = (_check_folds(folds, patients) if folds is not None
               else patient_folds(patients, n_folds=n_folds, random_state=random_state))
    fold_labels = list(pd.unique(fold_of))
    n, k, d = x.shape
    g = y.shape[1]
    names = [str(s) for s in slide_ids] if slide_ids is not None else [f"slide_{i}" for i in range(n)]
    if optimizer not in ("adam", "adamw"):
        raise ValueError(f"optimizer must be 'adam' or 'adamw'; got {optimizer!r}")
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam

    x_t = torch.from_numpy(x)
    y_t = torch.from_numpy(y)
    test_pred = np.full((n, g), np.nan, np.float32)
    random_pred = np.full((n, g), np.nan, np.float32)
    fold_rows, history_rows, trained = [], [], []
    out_path = Path(checkpoint_dir) if checkpoint_dir is not None else None
    t_start = time.perf_counter()

    for fold_index, label in enumerate(fold_labels):
        test_idx = np.flatnonzero(fold_of == label)
        rest = np.flatnonzero(fold_of != label)
        rng = np.random.default_rng([random_state, fold_index])
        train_idx, val_idx = _validation_split(rest, patients, val_fraction, rng)

        torch.manual_seed(random_state * 1000 + fold_index)
        random_model = _build_model(model, g, d, k, model_kwargs, gene_names, units, dev).to(dev)
        random_pred[test_idx] = _forward_batched(random_model, x_t[test_idx], batch_size, dev)
        del random_model

        torch.manual_seed(random_state * 1000 + 500 + fold_index)
        net = _build_model(model, g, d, k, model_kwargs, gene_names, units, dev).to(dev)
        opt = opt_cls(net.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = torch.nn.MSELoss()
        gen = torch.Generator().manual_seed(random_state * 1000 + fold_index)
        y_val = y[val_idx]

        def train_epoch(epoch: int, net=net, opt=opt, gen=gen, train_idx=train_idx, loss_fn=loss_fn) -> dict:
            order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                xb, yb = x_t[idx].to(dev), y_t[idx].to(dev)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(xb), yb)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            return {"train_loss": total / len(train_idx)}

        def validate(net=net, val_idx=val_idx, y_val=y_val) -> dict:
            val = _forward_batched(net, x_t[val_idx], max(batch_size, 64), dev)
            return {"val_mse": float(np.mean((val - y_val) ** 2)), "val_corr": _mean_gene_correlation(val, y_val)}

        log = fit(net, train_epoch, max_epochs=max_epochs, validate=validate,
                  stopper=EarlyStopping(patience=patience, delta=delta), progress=progress,
                  desc=f"fold {fold_index + 1}/{len(fold_labels)}", leave=False)
        best_epoch = log.best_epoch
        best_mse = log.best_row["val_mse"] if log.best_row else np.nan
        best_corr = log.best_row["val_corr"] if log.best_row else np.nan
        last_epoch = log.rows[-1]["epoch"] if log.rows else -1
        history_rows += [{"fold": fold_index, **{c: r[c] for c in _HISTORY_COLUMNS}} for r in log.rows]
        test_pred[test_idx] = _forward_batched(net, x_t[test_idx], batch_size, dev)
        checkpoint = ""
        if out_path is not None and hasattr(net, "save_pretrained"):
            meta = {
                "fold": fold_index,
                "fold_label": str(label),
                "best_epoch": best_epoch,
                "best_val_mse": best_mse,
                "best_val_corr": best_corr,
                "random_state": random_state,
                "test_patients": sorted(np.unique(patients[test_idx]).tolist()),
            }
            checkpoint = str(net.save_pretrained(out_path / f"fold_{fold_index}", metadata=meta))
        fold_rows.append(
            {
                "fold": fold_index,
                "fold_label": str(label),
                "n_train": len(train_idx),
                "n_val": len(val_idx),
                "n_test": len(test_idx),
                "n_test_patients": len(np.unique(patients[test_idx])),
                "best_epoch": best_epoch,
                "best_val_mse": best_mse,
                "best_val_corr": best_corr,
                "stopped_epoch": last_epoch,
                "checkpoint": checkpoint,
            }
        )
        trained.append(net.cpu())

    obs = pd.DataFrame({"patient": patients, "fold": [fold_labels.index(f) for f in fold_of]}, index=pd.Index(names))
    result = AnnData(X=test_pred, obs=obs, var=pd.DataFrame(index=pd.Index(gene_names)))
    result.layers["random"] = random_pred
    result.layers["truth"] = y.copy()
    model_name = model if isinstance(model, str) else getattr(model, "__name__", "custom")
    result.uns["histoexpr"] = {"units": units, "model": model_name, "n_folds": len(fold_labels),
                               "random_state": random_state}
    folds_df = pd.DataFrame(fold_rows)
    history = pd.DataFrame(history_rows)
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
        result.write_h5ad(out_path / "cv_predictions.h5ad")
        folds_df.to_csv(out_path / "folds.csv", index=False)
        history.to_csv(out_path / "history.csv", index=False)
    return TrainResult(predictions=result, folds=folds_df, history=history, models=trained,
                       epochs_run=int(folds_df["stopped_epoch"].max()) + 1 if len(folds_df) else 0,
                       seconds=time.perf_counter() - t_start, device=str(dev))
