"""Checks shared by the core tests: comparing pytrees of arrays, and a loss that probes every
output element and every final state with distinct weights."""

import jax
import jax.numpy as jnp
import numpy as np


def assert_trees_close(actual, expected, **tol):
    """Same tree structure, and every leaf ``np.testing.assert_allclose`` with ``tol``."""
    assert jax.tree.structure(jax.tree.map(np.asarray, actual)) == jax.tree.structure(
        jax.tree.map(np.asarray, expected)
    )
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tol)


def probe_loss(outputs, finals):
    """A scalar whose gradient reaches every output element (a distinct weight each, so mixed-up
    positions show) and every final state (through cos, so its own gradient is not constant)."""
    weights = jnp.sin(jnp.arange(outputs.size, dtype=outputs.dtype)).reshape(outputs.shape)
    return jnp.sum(outputs * weights) + sum(jnp.sum(jnp.cos(s)) for s in jax.tree.leaves(finals))
