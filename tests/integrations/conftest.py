"""Fixtures of the integration tests (helpers: ``integration_corpus``)."""

from __future__ import annotations

import pytest
from integration_corpus import build_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """The corpus as one ``train`` split (path of the dataset directory)."""
    return build_corpus(tmp_path_factory.mktemp("integrations") / "corpus")
