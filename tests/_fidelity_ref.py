"""Locate the upstream reference fixtures (``../shared/reference`` or ``$HISTOEXPR_SHARED_REFERENCE``).

Each fixture folder holds inputs and the outputs of the published SEQUOIA / HistoPrism code run on
them (see its ``README.md`` and ``case.json``); tests that use one skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_reference() -> Path | None:
    env = os.environ.get("HISTOEXPR_SHARED_REFERENCE")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "reference", REPO / "shared" / "reference"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


REFERENCE = _find_reference()


def reference_case(name: str) -> Path:
    """Folder of one fixture case; skips the test when the fixtures are not available."""
    if REFERENCE is None:
        pytest.skip("upstream reference fixtures ../shared/reference not found (set HISTOEXPR_SHARED_REFERENCE)")
    path = REFERENCE / name
    if not path.is_dir():
        pytest.skip(f"reference fixture {name!r} not found in {REFERENCE}")
    return path
