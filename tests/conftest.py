"""Strict test settings: implicit rank promotion raises, float64 is available everywhere.

x64 is on so that float64 parity with torch is possible; tests that mean float32 pass the dtype
explicitly (and check that it is kept).
"""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def torch():
    """The torch module, single-threaded; skips the test where torch is not installed."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch
