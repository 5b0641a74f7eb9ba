"""One entry point that loads any histoexpr checkpoint directory into the right model class."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ._base import read_config, read_meta, resolve_checkpoint_dir

__all__ = ["load_model"]


def _classes() -> dict[str, type]:
    from .aggregators import HE2RNA, TransformerAggregator
    from .fusion import _FusionModel
    from .histoprism import HistoPrism
    from .sequoia import Sequoia

    return {"sequoia": Sequoia, "he2rna": HE2RNA, "transformer": TransformerAggregator,
            "histoprism": HistoPrism, "fusion": _FusionModel}


def load_model(path_or_repo: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a checkpoint directory written by ``save_pretrained`` (or an official SEQUOIA one).

    The class comes from ``model_type`` in ``config.json`` (or ``histoexpr.json``): ``"sequoia"``,
    ``"he2rna"``, ``"transformer"``, ``"histoprism"`` or ``"fusion"``; checkpoints without it are
    SEQUOIA checkpoints. Keyword arguments go to ``from_pretrained`` (``device``, ``strict``, ...).

    Example
    -------
    >>> import tempfile
    >>> from histoexpr.models import HE2RNA, load_model
    >>> folder = HE2RNA(num_outputs=3, input_dim=8, num_clusters=4).save_pretrained(tempfile.mkdtemp())
    >>> type(load_model(folder)).__name__
    'HE2RNA'
    """
    folder = resolve_checkpoint_dir(path_or_repo, local_files_only=kwargs.get("local_files_only", False))
    model_type = read_config(folder).get("model_type") or read_meta(folder).get("model_type")
    classes = _classes()
    cls = classes.get(model_type or "sequoia")
    if cls is None:
        raise ValueError(f"unknown model_type {model_type!r} in {folder}; expected one of {sorted(classes)}")
    model = cls.from_pretrained(folder, **kwargs)
    model.checkpoint = str(path_or_repo)
    return model
