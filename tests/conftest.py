"""Shared test setup: float64 available everywhere (float32 paths pass dtypes explicitly), data locations."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

REPO = Path(__file__).resolve().parents[1]


def mnist_dir() -> Path | None:
    """The MNIST IDX directory: $HESSIAN_APPROX_DATA, else ../shared/data/mnist beside the repo."""
    for cand in (os.environ.get("HESSIAN_APPROX_DATA"), REPO.parent / "shared" / "data" / "mnist"):
        if cand and (Path(cand) / "train-labels-idx1-ubyte.gz").exists():
            return Path(cand)
    return None


@pytest.fixture
def mnist_path():
    d = mnist_dir()
    if d is None:
        pytest.skip("MNIST IDX files not found (set HESSIAN_APPROX_DATA or place ../shared/data/mnist)")
    return d


@pytest.fixture
def x64():
    """64-bit JAX for one test only (``jax.enable_x64``), so float32 tests run as in production."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
