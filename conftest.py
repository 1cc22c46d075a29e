"""Doctests of jlstm/ run as a user runs them, with JAX's defaults (float32 and int32), whatever
tests/conftest.py switched on for the parity grid (``jax_enable_x64``) in the same process."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _jax_defaults_in_doctests(request):
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", x64)
