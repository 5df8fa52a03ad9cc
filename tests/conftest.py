"""Shared fixtures: ``ranks(n)`` gives a live pool of n gloo ranks reused across the session."""

from __future__ import annotations

import pytest

from harness import PoolCache


@pytest.fixture(scope="session")
def ranks():
    cache = PoolCache()
    yield cache
    cache.close()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
