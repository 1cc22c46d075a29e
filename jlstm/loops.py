"""What jlstm's hand-written time loops share: derivative rules, whole-sequence gradient GEMMs,
the plain ``lax.scan`` reference, and the ``shard_map`` helpers.

A fast loop (:mod:`jlstm.fused`, :mod:`jlstm.native`, :mod:`jlstm.pallas`) is a forward that can
save what its backward needs, and that backward. :func:`loop_with_backward` turns such a pair into
a function that survives every JAX transformation:

- ``loop`` is a ``jax.custom_jvp`` whose plain call runs the forward that saves nothing.
- Its JVP runs the forward that saves (``forward_saving``, itself a ``custom_jvp``) and returns as
  tangent ``lin_p(args, saved, tangents)``, a primitive linear in the tangents. ``jax.grad``
  transposes ``lin_p`` into the fast backward, so a training step runs the saving forward once and
  the backward once, as a ``custom_vjp`` would.
- ``lin_p`` evaluates (forward mode) as the JVP of :func:`lstm_reference` / :func:`gru_reference`,
  and its own JVP is pure JAX too; the backward is a ``custom_jvp`` whose rule differentiates the
  reference's VJP. Forward mode and every higher order are thus exact, only not fast; the tangent
  of ``saved`` is declared zero, which is right because every rule reads the derivative through
  the arguments, of which ``saved`` is a function.
- ``lin_p`` batches as a ``lax.map`` over the mapped axis, which stays transposable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import ad, batching, mlir

# --------------------------------------------------------------------------------------------
# shard_map


def varying_axes(a) -> frozenset:
    """The ``shard_map`` mesh axes over which ``a`` varies (empty outside ``shard_map``).

    >>> import jax.numpy as jnp
    >>> varying_axes(jnp.ones(3))
    frozenset()
    """
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary_like(tree, *others):
    """``tree`` cast to vary over every ``shard_map`` axis any leaf of ``tree`` or ``others`` varies
    over. A scan's carry must keep its type, and a custom derivative's cotangents must match its
    inputs; with a batch-sharded ``x`` and replicated weights or zero states, neither holds unless
    everything is made varying first. The cast's transpose is a ``psum``, so gradients w.r.t.
    replicated weights come out summed over the shards, as autodiff gives them. No-op outside
    ``shard_map``.

    >>> import jax.numpy as jnp
    >>> vary_like((jnp.ones(2), jnp.zeros(3)))[1].shape
    (3,)
    """
    axes = frozenset().union(*map(varying_axes, jax.tree.leaves((tree, others))))

    def cast(a):
        missing = tuple(sorted(axes - varying_axes(a)))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree) if axes else tree


def like(shape, ref) -> jax.ShapeDtypeStruct:
    """A result of ``shape`` in ``ref``'s dtype, varying over ``ref``'s ``shard_map`` axes (the
    layer made every operand of a loop vary alike, :func:`vary_like`).

    >>> import jax.numpy as jnp
    >>> like((2, 3), jnp.ones(1, jnp.float32))
    ShapeDtypeStruct(shape=(2, 3), dtype=float32)
    """
    aval = jax.typeof(ref)
    if aval.manual_axis_type.empty:
        return jax.ShapeDtypeStruct(shape, ref.dtype)
    sharding = jax.sharding.NamedSharding(aval.sharding.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(
        shape, ref.dtype, sharding=sharding, manual_axis_type=aval.manual_axis_type
    )


# --------------------------------------------------------------------------------------------
# Whole-sequence pieces of the backward passes


def weight_grad(d: jax.Array, v: jax.Array, transpose_first: bool = False) -> jax.Array:
    """``sum_t d_t^T v_t`` for ``d (L, N, G)``, ``v (L, N, K)`` as one ``(K, L*N) @ (L*N, G)`` GEMM
    with the large operand on the right, the layout XLA CPU runs fastest (a 3-D einsum makes it
    transpose the whole buffer first). The barrier keeps the final small transpose out of the dot:
    fused into it, XLA CPU takes a slower GEMM (1.1-2.1x at these sizes, BENCHMARKS.md).

    ``transpose_first`` writes ``v``'s transpose out before the GEMM instead of folding it into
    the dot (one ``(K, L*N)`` copy): the faster form on CPUs without AVX-512 (see
    :data:`jlstm.native.TRANSPOSE_FIRST`).

    >>> import jax.numpy as jnp
    >>> weight_grad(jnp.ones((5, 2, 8)), jnp.ones((5, 2, 3))).shape
    (8, 3)
    >>> bool(jnp.all(weight_grad(jnp.ones((5, 2, 8)), jnp.ones((5, 2, 3)), transpose_first=True) == 10))
    True
    """
    vt = v.reshape(-1, v.shape[-1]).T
    if transpose_first:
        vt = lax.optimization_barrier(vt)
    return lax.optimization_barrier(vt @ d.reshape(-1, d.shape[-1])).T


def input_grads(dxw: jax.Array, x: jax.Array, w_ih: jax.Array, transpose_first: bool = False):
    """``(dW_ih, dbias, dx)`` of ``x @ W_ih.T + bias`` from every step's gate gradients ``dxw (L, N,
    G)``, as whole-sequence matmuls (``transpose_first`` as in :func:`weight_grad`).

    >>> import jax.numpy as jnp
    >>> [a.shape for a in input_grads(jnp.ones((5, 2, 8)), jnp.ones((5, 2, 3)), jnp.ones((8, 3)))]
    [(8, 3), (8,), (5, 2, 3)]
    """
    return weight_grad(dxw, x, transpose_first), jnp.sum(dxw, axis=(0, 1)), dxw @ w_ih


def outputs(hs: jax.Array, valid, reverse: bool):
    """``(ys, h_n)`` from every step's carried ``hs (L, N, H)``: outputs past a sequence's length
    are zero, and the last step processed holds h_n.

    >>> import jax.numpy as jnp
    >>> ys, h_n = outputs(jnp.arange(3.0)[:, None, None], None, reverse=True)
    >>> h_n
    Array([[0.]], dtype=float32)
    """
    ys = hs if valid is None else jnp.where(valid, hs, jnp.zeros_like(hs))
    return ys, hs[0] if reverse else hs[-1]


def previous(hs: jax.Array, h0: jax.Array, reverse: bool) -> jax.Array:
    """h_{t-1} of every step, in time order: ``h0`` sits before the first step processed.

    >>> import jax.numpy as jnp
    >>> previous(jnp.arange(1.0, 4.0)[:, None], jnp.zeros(1), reverse=False)[:, 0]
    Array([0., 1., 2.], dtype=float32)
    """
    return jnp.concatenate([hs[1:], h0[None]]) if reverse else jnp.concatenate([h0[None], hs[:-1]])


# --------------------------------------------------------------------------------------------
# The reference: one direction as plain lax.scan, in the loops' argument layout


def masked_scan(step, carry, xs, valid, reverse, unroll=1):
    """``lax.scan(step, carry, xs)`` with torch's packed-sequence semantics where ``valid`` (``(L,
    N, 1)`` bool, or None for none) is False: the carry stays as it was and the output is zero, so a
    sequence's state freezes after its last element (forward) or stays initial until its last
    element is reached (reverse).

    >>> import jax.numpy as jnp
    >>> step = lambda c, x: (c + x, c + x)
    >>> valid = jnp.array([True, True, False])[:, None, None]
    >>> c, ys = masked_scan(step, jnp.zeros((1, 1)), jnp.ones((3, 1, 1)), valid, False)
    >>> c[0, 0], ys[:, 0, 0]
    (Array(2., dtype=float32), Array([1., 2., 0.], dtype=float32))
    """

    def masked(carry, inputs):
        x_t, valid_t = inputs
        new, y = step(carry, x_t)
        keep = jax.tree.map(lambda n, o: jnp.where(valid_t, n, o), new, carry)
        return keep, jnp.where(valid_t, y, jnp.zeros_like(y))

    if valid is None:
        return lax.scan(step, carry, xs, reverse=reverse, unroll=unroll)
    return lax.scan(masked, carry, (xs, valid), reverse=reverse, unroll=unroll)


def lstm_reference(w_ih, w_hh, bias, x, h0, c0, valid, reverse=False):
    """``(ys, h_n, c_n)`` of one LSTM direction as a plain ``lax.scan``, the arguments of
    :func:`jlstm.fused.lstm_recurrence`: what the fast loops' derivative rules differentiate.

    >>> import jax.numpy as jnp
    >>> w = jnp.zeros((8, 2))
    >>> ys, h, c = lstm_reference(w, w, jnp.zeros(8), jnp.ones((3, 1, 2)), *2 * (jnp.zeros((1, 2)),), None)
    >>> ys.shape
    (3, 1, 2)
    """

    def step(carry, x_t):
        h, c = carry
        i, f, g, o = jnp.split(x_t @ w_ih.T + bias[None, :] + h @ w_hh.T, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    (h, c), ys = masked_scan(step, (h0, c0), x, valid, reverse)
    return ys, h, c


def gru_reference(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse=False):
    """``(ys, h_n)`` of one GRU direction as a plain ``lax.scan``, the arguments of
    :func:`jlstm.fused.gru_recurrence`.

    >>> import jax.numpy as jnp
    >>> w = jnp.zeros((6, 2))
    >>> ys, h = gru_reference(w, w, jnp.zeros(6), jnp.zeros(2), jnp.ones((3, 1, 2)), jnp.ones((1, 2)), None)
    >>> h
    Array([[0.125, 0.125]], dtype=float32)
    """

    def step(h, x_t):
        xr, xz, xn = jnp.split(x_t @ w_ih.T + bias[None, :], 3, axis=-1)
        hr, hz, hn = jnp.split(h @ w_hh.T, 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * (hn + b_hn[None, :]))
        h = n + z * (h - n)
        return h, h

    h, ys = masked_scan(step, h0, x, valid, reverse)
    return ys, h


# --------------------------------------------------------------------------------------------
# The derivative rules


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What ``lin_p`` needs besides its operands (a hashable primitive parameter)."""

    reference: Callable
    # The custom_jvp-wrapped backward: (arrays, valid, saved, cts, static, needed).
    backward: Callable
    static: tuple
    num_arrays: int
    masked: bool
    saved: Any  # the treedef of saved
    out: Any  # the treedef of the loop's output

    def split(self, flat):
        n, m = self.num_arrays, int(self.masked)
        arrays, valid = tuple(flat[:n]), (flat[n] if self.masked else None)
        count = self.saved.num_leaves
        saved = jax.tree.unflatten(self.saved, flat[n + m : n + m + count])
        return arrays, valid, saved, tuple(flat[n + m + count :])

    def tangents(self, arrays, valid, tangents):
        """The reference's JVP: what ``lin_p`` computes."""
        ref = partial(self.reference, valid=valid, reverse=self.static[0])
        return jax.jvp(lambda *a: ref(*a), arrays, tangents)[1]


lin_p = Primitive("jlstm_loop_tangent")
lin_p.multiple_results = True


def _lin(spec: _Spec, arrays, valid, saved, tangents):
    flat = (*arrays, *([] if valid is None else [valid]), *jax.tree.leaves(saved), *tangents)
    return jax.tree.unflatten(spec.out, lin_p.bind(*flat, spec=spec))


def _lin_impl(*flat, spec):
    arrays, valid, _, tangents = spec.split(flat)
    return jax.tree.leaves(spec.tangents(arrays, valid, tangents))


def _lin_abstract_eval(*avals, spec):
    arrays, valid, _, _ = spec.split(avals)
    plain = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
    shapes = jax.eval_shape(lambda *a: spec.reference(*a, valid=None, reverse=False), *plain)
    # Every operand varies alike (vary_like); results vary like the widest of them.
    ref = max(avals, key=lambda a: len(a.manual_axis_type.varying))
    if ref.manual_axis_type.empty:
        return [jax.core.ShapedArray(s.shape, s.dtype) for s in jax.tree.leaves(shapes)]
    sharding = jax.sharding.NamedSharding(ref.sharding.mesh, jax.sharding.PartitionSpec())
    return [
        jax.core.ShapedArray(
            s.shape, s.dtype, sharding=sharding, manual_axis_type=ref.manual_axis_type
        )
        for s in jax.tree.leaves(shapes)
    ]


def _lin_jvp(primals, tangents, *, spec):
    arrays, valid, _, t = spec.split(primals)
    d_arrays, _, _, d_t = spec.split([ad.instantiate_zeros(x) for x in tangents])
    out = lin_p.bind(*primals, spec=spec)
    _, d_out = jax.jvp(lambda a, t: spec.tangents(a, valid, t), (arrays, t), (d_arrays, d_t))
    return out, jax.tree.leaves(d_out)


def _lin_transpose(cotangents, *flat, spec):
    arrays, valid, saved, tangents = spec.split(flat)
    cotangents = jax.tree.unflatten(spec.out, [ad.instantiate_zeros(ct) for ct in cotangents])
    # A tangent that is a value here, not an undefined primal, belongs to an argument nothing
    # differentiates (the data fed to a first layer, zero initial states): its gradient is not
    # needed, and the backward may skip it.
    needed = tuple(isinstance(t, ad.UndefinedPrimal) for t in tangents)
    grads = spec.backward(arrays, valid, saved, cotangents, spec.static, needed)
    grads = [g if want else None for g, want in zip(grads, needed, strict=True)]
    return [None] * (len(flat) - spec.num_arrays) + grads


def _lin_batch(args, dims, *, spec):
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def one(leaves):
        flat = list(args)
        for i, leaf in zip(mapped, leaves, strict=True):
            flat[i] = leaf
        return lin_p.bind(*flat, spec=spec)

    leaves = [jnp.moveaxis(args[i], dims[i], 0) for i in mapped]
    outs = lax.map(one, leaves)
    return outs, [0] * len(outs)


lin_p.def_impl(_lin_impl)
lin_p.def_abstract_eval(_lin_abstract_eval)
mlir.register_lowering(lin_p, mlir.lower_fun(_lin_impl, multiple_results=True))
ad.primitive_jvps[lin_p] = _lin_jvp
ad.primitive_transposes[lin_p] = _lin_transpose
batching.primitive_batchers[lin_p] = _lin_batch


def _zero_tangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def loop_with_backward(
    forward: Callable, backward: Callable, reference: Callable, doc: str, num_arrays: int = 6
) -> Callable:
    """One direction's loop from a fast forward and backward, differentiable in every way.

    The result is a function of ``(*arrays, valid, *static)``: ``num_arrays`` arrays it is
    differentiable in, ``valid`` (``(L, N, 1)`` bool or None) and hashable ``static`` arguments
    of which the first is ``reverse``. ``forward(*arrays, valid, *static, save) -> (out, saved)``
    runs the loop, saving what the backward needs when ``save``; ``backward(*static, (*arrays,
    valid, saved), cotangents, needed)`` returns one gradient per array (and None for ``valid``);
    ``reference(*arrays, valid, reverse) -> out`` computes the same in plain JAX (e.g.
    :func:`lstm_reference`). ``needed``, one bool per array, says which gradients will be used: a
    gradient that is not may be returned as None, and work done only for it skipped (an argument
    nothing differentiates, such as the data a first layer reads). How each transformation is
    served is in this module's docstring.

    >>> import jax, jax.numpy as jnp
    >>> def forward(w, x, valid, reverse, save):
    ...     return w * x, (x,) if save else ()
    >>> def backward(reverse, residuals, ct, needed):
    ...     w, x, valid, (saved_x,) = residuals
    ...     return (jnp.sum(ct * saved_x), ct * w if needed[1] else None, None)
    >>> loop = loop_with_backward(
    ...     forward, backward, lambda w, x, valid, reverse: w * x, "w * x", num_arrays=2
    ... )
    >>> jax.grad(lambda w: jnp.sum(loop(w, jnp.arange(3.0), None, False)))(2.0)
    Array(3., dtype=float32)
    """
    n = num_arrays

    def make_spec(static, valid, saved, out):
        structure = jax.tree.structure
        return _Spec(
            reference, _backward, static, n, valid is not None, structure(saved), structure(out)
        )

    @partial(jax.custom_jvp, nondiff_argnums=(4, 5))
    def _backward(arrays, valid, saved, cotangents, static, needed):
        grads = backward(*static, (*arrays, valid, saved), cotangents, needed)[:n]
        # A gradient not needed may come back as None; a custom_jvp returns arrays (unused ones).
        return tuple(
            jnp.zeros_like(a) if g is None else g for g, a in zip(grads, arrays, strict=True)
        )

    @_backward.defjvp
    def _backward_jvp(static, needed, primals, tangents):
        arrays, valid, saved, cotangents = primals
        d_arrays, _, _, d_cotangents = tangents

        def vjp(arrays, cotangents):
            ref = partial(reference, valid=valid, reverse=static[0])
            grads = jax.vjp(lambda *a: ref(*a), *arrays)[1](cotangents)
            return tuple(
                g if want else jnp.zeros_like(g) for g, want in zip(grads, needed, strict=True)
            )

        out = _backward(arrays, valid, saved, cotangents, static, needed)
        _, d_out = jax.jvp(vjp, (arrays, cotangents), (d_arrays, d_cotangents))
        return out, tuple(d_out)

    @partial(jax.custom_jvp, nondiff_argnums=(2,))
    def forward_saving(arrays, valid, static):
        return forward(*arrays, valid, *static, save=True)

    @forward_saving.defjvp
    def _forward_saving_jvp(static, primals, tangents):
        arrays, valid = primals
        out, saved = forward_saving(arrays, valid, static)
        t_out = _lin(make_spec(static, valid, saved, out), arrays, valid, saved, tangents[0])
        return (out, saved), (t_out, jax.tree.map(_zero_tangent, saved))

    @partial(jax.custom_jvp, nondiff_argnums=(2,))
    def inference(arrays, valid, static):
        return forward(*arrays, valid, *static, save=False)[0]

    @inference.defjvp
    def _inference_jvp(static, primals, tangents):
        arrays, valid = primals
        out, saved = forward_saving(arrays, valid, static)
        spec = make_spec(static, valid, saved, out)
        return out, _lin(spec, arrays, valid, saved, tangents[0])

    def loop(*args):
        return inference(tuple(args[:n]), args[n], tuple(args[n + 1 :]))

    loop.__doc__ = doc
    return loop


# --------------------------------------------------------------------------------------------
# A fast path that a jax.export lowers portably


def unless_exported(fast: Callable, portable: Callable, *args):
    """``fast(*args)``, lowered as ``portable(*args)`` in a program lowered for ``jax.export``.

    A custom call of jlstm's C++ library has no compatibility guarantee and runs only where that
    library is registered: an exported program must not hold one unless asked to. JAX tells a
    lowering rule that it lowers for export (``LoweringParameters.for_export``), so this is a
    primitive holding both functions' jaxprs, whose lowering takes one. Both must return arrays of
    the same shapes and dtypes (``None`` leaves in the same places); the types are ``fast``'s. Neither is differentiated through it: it
    sits inside the fast loops' custom derivative rules, whose own rules say how each
    transformation runs (:func:`loop_with_backward`); it batches under ``vmap`` as both functions
    do.

    >>> import jax, jax.numpy as jnp
    >>> f = jax.jit(lambda x: unless_exported(jnp.sin, jnp.cos, x))
    >>> float(f(0.0)), float(jax.export.export(f)(0.0).call(0.0))
    (0.0, 1.0)
    """
    flat, tree = jax.tree.flatten(args)
    (fast_jaxpr, out), (portable_jaxpr, portable_out) = (
        jax.make_jaxpr(lambda *flat, fn=fn: fn(*jax.tree.unflatten(tree, flat)), return_shape=True)(
            *flat
        )
        for fn in (fast, portable)
    )
    types = lambda jaxpr: [(a.shape, a.dtype) for a in jaxpr.out_avals]  # noqa: E731
    if types(fast_jaxpr) != types(portable_jaxpr) or (
        jax.tree.structure(out) != jax.tree.structure(portable_out)
    ):
        raise TypeError(
            "unless_exported: fast and portable must return the same types, got "
            f"{jax.tree.structure(out)} {fast_jaxpr.out_avals} and "
            f"{jax.tree.structure(portable_out)} {portable_jaxpr.out_avals}"
        )
    outs = _unless_exported_p.bind(*flat, fast=fast_jaxpr, portable=portable_jaxpr)
    return jax.tree.unflatten(jax.tree.structure(out), outs)


_unless_exported_p = Primitive("jlstm_unless_exported")
_unless_exported_p.multiple_results = True
_unless_exported_p.def_impl(lambda *args, fast, portable: jaxpr_as_fun(fast)(*args))
_unless_exported_p.def_abstract_eval(lambda *avals, fast, portable: fast.out_avals)


def _unless_exported_lowering(ctx, *args, fast, portable):
    chosen = portable if ctx.module_context.lowering_parameters.for_export else fast
    return mlir.lower_fun(jaxpr_as_fun(chosen), multiple_results=True)(ctx, *args)


def _unless_exported_batch(args, dims, *, fast, portable):
    def batched(jaxpr):
        return lambda *args: jax.vmap(jaxpr_as_fun(jaxpr), in_axes=tuple(dims))(*args)

    outs = unless_exported(batched(fast), batched(portable), *args)
    return outs, [0] * len(outs)


mlir.register_lowering(_unless_exported_p, _unless_exported_lowering)
batching.primitive_batchers[_unless_exported_p] = _unless_exported_batch
