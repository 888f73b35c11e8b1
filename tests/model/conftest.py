"""The embedded real model (SmolLM2-135M-Instruct), loaded once for tests/model/.

Every test module here is marked ``slow``; ``python -m pytest -q tests -m "not slow"`` skips them.
"""

from __future__ import annotations

import pytest

import lmedit


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) from ``lmedit.load_model()``, float32, eval mode. Tests that edit it undo."""
    return lmedit.load_model()
