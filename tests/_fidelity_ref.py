"""Locate the upstream reference fixtures (``../shared/reference`` or ``$HISTOEXPR_SHARED_REFERENCE``).

Each fixture folder holds inputs and the outputs of the published SEQUOIA / HistoPrism code run on
them (see its ``README.md`` and ``case.json``); tests that use one skip when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import find_shared

REFERENCE = find_shared("reference", "HISTOEXPR_SHARED_REFERENCE")


def reference_case(name: str) -> Path:
    """Folder of one fixture case; skips the test when the fixtures are not available."""
    if REFERENCE is None:
        pytest.skip("upstream reference fixtures ../shared/reference not found (set HISTOEXPR_SHARED_REFERENCE)")
    path = REFERENCE / name
    if not path.is_dir():
        pytest.skip(f"reference fixture {name!r} not found in {REFERENCE}")
    return path
