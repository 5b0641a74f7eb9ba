"""Shared parameter documentation, injected into docstrings (as scanpy's ``doc_params`` does).

A docstring line holding only ``{name}`` (indented like the other parameters) is replaced by the
shared text of that parameter, so that every function documents ``use_rep``, ``device``,
``random_state``, ``key_added``, ``copy`` and ``progress`` with the same words.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

__all__ = ["doc_params", "DOC_PARAMS"]

F = TypeVar("F", bound=Callable)

DOC_PARAMS: dict[str, str] = {
    "use_rep": """\
use_rep
    ``obsm`` key of the tile features. Default: the key :func:`histoexpr.pp.extract_features`
    recorded in ``uns["histoexpr"]["feature_key"]``, else ``X_<encoder>`` for the recorded encoder,
    else the only ``X_*`` key of ``obsm``.""",
    "device": """\
device
    Torch device. Default: CUDA when available, else CPU. A device that is asked for but not
    available (e.g. ``"cuda"`` without CUDA) is an error, never a silent fallback.""",
    "random_state": """\
random_state
    Seed of every random choice the function makes; the same data and ``random_state`` give the same
    result (on the CPU). ``seed=`` is the deprecated old name.""",
    "key_added": """\
key_added
    Name of the entry the result is written to (see "API naming rules" in the design notes).""",
    "copy": """\
copy
    Return an annotated copy instead of writing into the given AnnData (then ``None`` is returned).""",
    "progress": """\
progress
    Show a progress bar; ``None`` (default) follows ``histoexpr.settings.progress`` (on when the
    session is interactive).""",
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)\{(?P<name>\w+)\}[ \t]*$", re.MULTILINE)


def doc_params(**overrides: str) -> Callable[[F], F]:
    """Decorator: replace ``{name}`` lines of the docstring by the shared parameter docs.

    Keyword arguments add or override texts for this one function.

    Example
    -------
    >>> @doc_params()
    ... def f(*, random_state=0):
    ...     '''Do something.
    ...
    ...     Parameters
    ...     ----------
    ...     {random_state}
    ...     '''
    >>> "Seed of every random choice" in f.__doc__
    True
    """
    texts = {**DOC_PARAMS, **overrides}

    def decorate(obj: F) -> F:
        doc = obj.__doc__
        if doc:
            def fill(match: re.Match) -> str:
                name = match["name"]
                if name not in texts:
                    raise KeyError(f"no shared documentation for parameter {name!r} in {obj.__qualname__}")
                return textwrap.indent(texts[name], match["indent"])

            obj.__doc__ = _PLACEHOLDER.sub(fill, doc)
        return obj

    return decorate
