"""The LSTM and GRU time loops as Pallas kernels (Triton on CUDA GPUs, interpreted on CPU).

A ``lax.scan`` over a small recurrent layer on a GPU launches a few kernels per time step, and
those launches, not the arithmetic, set its speed. Here each direction's whole time loop is one
kernel: a program per block of 16 sequences keeps ``h`` and ``c`` in registers across all steps,
reads the hoisted input projection of step ``t`` (one large XLA GEMM before the loop) and forms the
four gates as ``h @ W_hh[k].T`` from the gate's ``(H, H)`` weights. The backward is a second
kernel that runs the loop in reverse and writes every step's gate gradients; XLA then forms
``dW_ih``, ``dW_hh``, the biases and ``dx`` as whole-sequence GEMMs (:mod:`jlstm.fused`), as
cuDNN does. Sequences are independent, so the blocks need no synchronisation at all.

Triton wants power-of-two tiles of at least 16: hidden units and sequences are zero-padded to
that inside the wrappers. Padding is exact: a padded unit sees zero weights and zero states, so its
gates are sigmoid(0) or tanh(0) and its ``c`` and ``h`` stay zero, and padded sequences are cut off.
The state is held as chunks of :data:`TILE` units and each gate's product as one
``(BLOCK, TILE) @ (TILE, TILE)`` dot per pair of chunks, unrolled, so that no operand outgrows
the registers of a program; the kernels take hidden sizes up to :data:`MAX_HIDDEN` (16 such dots
per gate and step), past which the step is a large GEMM that XLA's own loop already runs well.

On CPU the same kernels run in Pallas' interpret mode, slowly but exactly, which is how the test
suite checks them against the other paths and torch without a GPU; ``lowered_for_cuda`` lowers
them to Triton IR for CUDA without one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jlstm import loops
from jlstm.loops import input_grads, outputs, previous, weight_grad

DTYPES = (jnp.float32, jnp.float64)
MAX_HIDDEN = 256  # (256 / TILE)^2 = 16 tile dots per gate and step
BLOCK = 16  # sequences per program: Triton's smallest dot operand
TILE = 64  # units per chunk of a state and side of a weight tile (64 x 64 float32: 16 KiB)


def _compiler_params():
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=8, num_stages=1)


def lowered_for_cuda(fun, *args) -> str:
    """The StableHLO text of ``jax.jit(fun)(*args)`` lowered for CUDA: the kernels as Triton IR
    (``impl="pallas"`` lowers them so for a ``cuda`` lowering on any host). Checks on a machine
    without a GPU that they lower (tile shapes, dtypes, the ops Triton has); compiling the IR to
    PTX still needs the GPU's XLA.

    >>> import jax, jax.numpy as jnp, jlstm
    >>> p = jlstm.init_gru(jax.random.key(0), 2, 4)
    >>> text = lowered_for_cuda(lambda p: jlstm.gru(p, jnp.ones((3, 2)), impl="pallas")[0], p)
    >>> text.count("__gpu$xla.gpu.triton")
    1
    """
    return jax.jit(fun).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _pow2(n: int) -> int:
    return max(BLOCK, 1 << (n - 1).bit_length())


def _pad(a, shape):
    """``a`` zero-padded at the end of every axis to ``shape``."""
    return jnp.pad(a, [(0, s - d) for s, d in zip(shape, a.shape, strict=True)])


def _gate_major(a, gates, hidden_p, batch_p):
    """``(L, N, G*H)`` -> ``(L, G, Np, Hp)``: one ``(Np, Hp)`` tile per gate, as the kernels load."""
    length, batch, width = a.shape
    a = a.reshape(length, batch, gates, width // gates).transpose(0, 2, 1, 3)
    return _pad(a, (length, gates, batch_p, hidden_p))


def _from_gate_major(a, batch, hidden):
    """Inverse of :func:`_gate_major`: ``(L, G, Np, Hp)`` -> ``(L, N, G*H)``."""
    length, gates = a.shape[:2]
    return a[:, :, :batch, :hidden].transpose(0, 2, 1, 3).reshape(length, batch, gates * hidden)


def _tiles(w_hh, hidden_p, transpose):
    """``W_hh (G*H, H)`` as ``(G, Hp, Hp)`` gate tiles: ``W_k.T`` (forward: ``h @ W_k.T``) or
    ``W_k`` (backward: ``dgates_k @ W_k``)."""
    gates, hidden = w_hh.shape[0] // w_hh.shape[1], w_hh.shape[1]
    w = w_hh.reshape(gates, hidden, hidden)
    return _pad(w.transpose(0, 2, 1) if transpose else w, (gates, hidden_p, hidden_p))


def _dot(a, b):
    # IEEE float32 on the GPU (not TF32), as the other paths and torch's CPU kernels compute.
    return jnp.dot(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=a.dtype)


def _sigmoid(x):
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def _time(s, length, backwards):
    """Step ``s`` of a loop that walks time forwards, or backwards from the last step."""
    return length - 1 - s if backwards else s


def _previous_state(ref, init_ref, t, length, reverse, cols):
    """Columns ``cols`` of the carry entering step ``t``: the one saved after the step processed
    before it, or the initial state at the first step processed."""
    first = length - 1 if reverse else 0
    before = jnp.clip(t + 1 if reverse else t - 1, 0, length - 1)
    return jnp.where(t == first, init_ref[:, cols], ref[before, :, cols])


def _chunks(hidden_p: int) -> list:
    """The column slices of :data:`TILE` units the kernels work in (all of them below that)."""
    size = min(hidden_p, TILE)
    return [pl.ds(j * size, size) for j in range(hidden_p // size)]


def _product(vs, w_ref, k, out, chunks):
    """Columns ``chunks[out]`` of ``v @ w_ref[k]``, ``v`` given as its column chunks ``vs``: one
    ``(BLOCK, TILE) @ (TILE, TILE)`` dot per chunk, so no tile outgrows the registers."""
    return sum(_dot(v, w_ref[k, rows, chunks[out]]) for v, rows in zip(vs, chunks, strict=True))


def _keep(valid_ref, t, new, old):
    """``new`` where step ``t`` is inside a sequence, else ``old`` (packed-sequence semantics)."""
    return new if valid_ref is None else jnp.where(valid_ref[t] > 0, new, old)


def _call(kernel, ins, outs, valid, compiled, shared=(), **static):
    """``kernel`` over blocks of :data:`BLOCK` sequences, with ``valid`` (``(L, N, 1)`` bool or
    None) as its last input. Every input and output holds the sequences on its second-to-last
    axis, padded to a whole number of blocks, but the inputs at the indices in ``shared`` (the
    weights), which every program reads whole. ``compiled``: Triton (a CUDA lowering), else
    Pallas' interpreter."""
    batch_p = outs[0].shape[-2]
    if valid is not None:  # as (L, Np, 1) numbers: Triton loads no bools
        ins = [*ins, _pad(valid.astype(outs[0].dtype), (valid.shape[0], batch_p, 1))]

    def spec(shape, blocked):
        index, axis = [0] * len(shape), len(shape) - 2
        if not blocked:
            return pl.BlockSpec(shape, lambda b: tuple(index))
        block = (*shape[:axis], BLOCK, shape[-1])
        return pl.BlockSpec(block, lambda b: (*index[:axis], b, 0))

    interpret = not compiled
    return pl.pallas_call(
        functools.partial(kernel, masked=valid is not None, **static),
        out_shape=outs,
        grid=(batch_p // BLOCK,),
        in_specs=[spec(a.shape, i not in shared) for i, a in enumerate(ins)],
        out_specs=[spec(o.shape, True) for o in outs],
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(),
    )(*ins)


def _sizes(x, hidden):
    return _pow2(x.shape[1]), _pow2(hidden)


# --------------------------------------------------------------------------------------------
# LSTM


def _lstm_forward_kernel(xw_ref, w_ref, h0_ref, c0_ref, *refs, masked, reverse, save):
    valid_ref, refs = (refs[0], refs[1:]) if masked else (None, refs)
    hs_ref, c_n_ref, *saved = refs
    length, chunks = xw_ref.shape[0], _chunks(xw_ref.shape[-1])

    def step(s, carry):
        hs, cs = carry  # column chunks of h and c
        t = _time(s, length, reverse)
        hs_new, cs_new = [], []
        for j, cols in enumerate(chunks):
            pre = [xw_ref[t, k, :, cols] + _product(hs, w_ref, k, j, chunks) for k in range(4)]
            i, f, o = _sigmoid(pre[0]), _sigmoid(pre[1]), _sigmoid(pre[3])
            g = jnp.tanh(pre[2])
            c_new = _keep(valid_ref, t, f * cs[j] + i * g, cs[j])
            h_new = _keep(valid_ref, t, o * jnp.tanh(c_new), hs[j])
            hs_ref[t, :, cols] = h_new
            if save:
                acts_ref, cs_ref = saved
                for k, a in enumerate((i, f, g, o)):
                    acts_ref[t, k, :, cols] = a
                cs_ref[t, :, cols] = c_new
            hs_new.append(h_new)
            cs_new.append(c_new)
        return tuple(hs_new), tuple(cs_new)

    init = tuple(tuple(ref[:, cols] for cols in chunks) for ref in (h0_ref, c0_ref))
    _, cs = lax.fori_loop(0, length, step, init)
    for c, cols in zip(cs, chunks, strict=True):
        c_n_ref[:, cols] = c


def _lstm_backward_kernel(
    dys_ref, acts_ref, cs_ref, c0_ref, w_ref, dh_ref, dc_ref, *refs, masked, reverse
):
    valid_ref, refs = (refs[0], refs[1:]) if masked else (None, refs)
    dgates_ref, dh0_ref, dc0_ref = refs
    length, chunks = dys_ref.shape[0], _chunks(dys_ref.shape[-1])

    def step(s, carry):
        dhs, dcs = carry  # column chunks of dh and dc
        t = _time(s, length, not reverse)
        dgates, dcs_prev = [[] for _ in range(4)], []
        for j, cols in enumerate(chunks):
            i, f, g, o = (acts_ref[t, k, :, cols] for k in range(4))
            c_prev = _previous_state(cs_ref, c0_ref, t, length, reverse, cols)
            tanh_c = jnp.tanh(cs_ref[t, :, cols])
            dh_total = dhs[j] + dys_ref[t, :, cols]
            dc_total = dcs[j] + dh_total * o * (1 - tanh_c * tanh_c)
            for k, d in enumerate(
                (
                    dc_total * g * i * (1 - i),
                    dc_total * c_prev * f * (1 - f),
                    dc_total * i * (1 - g * g),
                    dh_total * tanh_c * o * (1 - o),
                )
            ):
                d = _keep(valid_ref, t, d, jnp.zeros_like(d))
                dgates_ref[t, k, :, cols] = d
                dgates[k].append(d)
            dcs_prev.append(_keep(valid_ref, t, dc_total * f, dcs[j]))
        dhs_prev = []
        for j in range(len(chunks)):
            dh_prev = sum(_product(dgates[k], w_ref, k, j, chunks) for k in range(4))
            dhs_prev.append(_keep(valid_ref, t, dh_prev, dhs[j]))
        return tuple(dhs_prev), tuple(dcs_prev)

    init = tuple(tuple(ref[:, cols] for cols in chunks) for ref in (dh_ref, dc_ref))
    dhs, dcs = lax.fori_loop(0, length, step, init)
    for dh, dc, cols in zip(dhs, dcs, chunks, strict=True):
        dh0_ref[:, cols], dc0_ref[:, cols] = dh, dc


def _lstm_forward(w_ih, w_hh, bias, x, h0, c0, valid, reverse, compiled, save):
    length, batch, hidden = x.shape[0], x.shape[1], h0.shape[-1]
    batch_p, hidden_p = _sizes(x, hidden)
    xw = _gate_major(x @ w_ih.T + bias[None, None], 4, hidden_p, batch_p)
    states = [_pad(s, (batch_p, hidden_p)) for s in (h0, c0)]
    seq = jax.ShapeDtypeStruct((length, batch_p, hidden_p), x.dtype)
    outs = [seq, jax.ShapeDtypeStruct((batch_p, hidden_p), x.dtype)]
    if save:
        outs += [jax.ShapeDtypeStruct(xw.shape, x.dtype), seq]
    ins = [xw, _tiles(w_hh, hidden_p, True), *states]
    hs, c_n, *saved = _call(
        _lstm_forward_kernel, ins, outs, valid, compiled, shared=(1,), reverse=reverse, save=save
    )
    ys, h_n = outputs(hs[:, :batch, :hidden], valid, reverse)
    return (ys, h_n, c_n[:batch, :hidden]), (hs, *saved)


def _lstm_bwd(reverse, compiled, residuals, cotangents, needed):
    del needed  # what is not needed is XLA's to drop (dead code)
    w_ih, w_hh, _, x, h0, c0, valid, (hs, acts, cs) = residuals
    dys, dh_n, dc_n = cotangents
    batch, hidden = h0.shape
    batch_p, hidden_p = hs.shape[1:]
    states = [_pad(a, (batch_p, hidden_p)) for a in (c0, dh_n, dc_n)]
    ins = [_pad(dys, hs.shape), acts, cs, states[0], _tiles(w_hh, hidden_p, False), *states[1:]]
    state = jax.ShapeDtypeStruct((batch_p, hidden_p), x.dtype)
    outs = [jax.ShapeDtypeStruct(acts.shape, x.dtype), state, state]
    dgates, dh0, dc0 = _call(
        _lstm_backward_kernel, ins, outs, valid, compiled, shared=(4,), reverse=reverse
    )
    dgates = _from_gate_major(dgates, batch, hidden)
    dw_ih, dbias, dx = input_grads(dgates, x, w_ih)
    hs_prev = previous(hs[:, :batch, :hidden], h0, reverse)
    dw_hh = weight_grad(dgates, hs_prev)
    return dw_ih, dw_hh, dbias, dx, dh0[:batch, :hidden], dc0[:batch, :hidden], None


lstm_recurrence = loops.loop_with_backward(
    _lstm_forward,
    _lstm_bwd,
    loops.lstm_reference,
    """``(ys, h_n, c_n)`` of one LSTM direction without projection, as
    :func:`jlstm.fused.lstm_recurrence` (same arguments, but ``compiled`` for ``unroll``/``hoist``: Triton, else interpreted).""",
)


# --------------------------------------------------------------------------------------------
# GRU


def _gru_forward_kernel(xw_ref, w_ref, b_hn_ref, h0_ref, *refs, masked, reverse, save):
    valid_ref, refs = (refs[0], refs[1:]) if masked else (None, refs)
    hs_ref, *saved = refs
    length, chunks = xw_ref.shape[0], _chunks(xw_ref.shape[-1])

    def step(s, hs):
        t = _time(s, length, reverse)
        hs_new = []
        for j, cols in enumerate(chunks):
            r = _sigmoid(xw_ref[t, 0, :, cols] + _product(hs, w_ref, 0, j, chunks))
            z = _sigmoid(xw_ref[t, 1, :, cols] + _product(hs, w_ref, 1, j, chunks))
            hn = _product(hs, w_ref, 2, j, chunks) + b_hn_ref[:, cols]
            n = jnp.tanh(xw_ref[t, 2, :, cols] + r * hn)
            h_new = _keep(valid_ref, t, n + z * (hs[j] - n), hs[j])
            hs_ref[t, :, cols] = h_new
            if save:
                (acts_ref,) = saved
                for k, a in enumerate((r, z, n, hn)):
                    acts_ref[t, k, :, cols] = a
            hs_new.append(h_new)
        return tuple(hs_new)

    lax.fori_loop(0, length, step, tuple(h0_ref[:, cols] for cols in chunks))


def _gru_backward_kernel(dys_ref, acts_ref, hs_ref, h0_ref, w_ref, dh_ref, *refs, masked, reverse):
    valid_ref, refs = (refs[0], refs[1:]) if masked else (None, refs)
    dxw_ref, dhw_ref, dh0_ref = refs
    length, chunks = dys_ref.shape[0], _chunks(dys_ref.shape[-1])

    def step(s, dhs):
        t = _time(s, length, not reverse)
        dhw, carried = [[] for _ in range(3)], []
        for j, cols in enumerate(chunks):
            r, z, n, hn = (acts_ref[t, k, :, cols] for k in range(4))
            h_prev = _previous_state(hs_ref, h0_ref, t, length, reverse, cols)
            dh_total = dhs[j] + dys_ref[t, :, cols]
            d_n = dh_total * (1 - z) * (1 - n * n)
            d_r = d_n * hn * r * (1 - r)
            d_z = dh_total * (h_prev - n) * z * (1 - z)
            for k, (dx, dh) in enumerate(((d_r, d_r), (d_z, d_z), (d_n, d_n * r))):
                dxw_ref[t, k, :, cols] = _keep(valid_ref, t, dx, jnp.zeros_like(dx))
                dh = _keep(valid_ref, t, dh, jnp.zeros_like(dh))
                dhw_ref[t, k, :, cols] = dh
                dhw[k].append(dh)
            carried.append(dh_total * z)
        dhs_prev = []
        for j in range(len(chunks)):
            dh_prev = carried[j] + sum(_product(dhw[k], w_ref, k, j, chunks) for k in range(3))
            dhs_prev.append(_keep(valid_ref, t, dh_prev, dhs[j]))
        return tuple(dhs_prev)

    dhs = lax.fori_loop(0, length, step, tuple(dh_ref[:, cols] for cols in chunks))
    for dh, cols in zip(dhs, chunks, strict=True):
        dh0_ref[:, cols] = dh


def _gru_forward(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse, compiled, save):
    length, batch, hidden = x.shape[0], x.shape[1], h0.shape[-1]
    batch_p, hidden_p = _sizes(x, hidden)
    xw = _gate_major(x @ w_ih.T + bias[None, None], 3, hidden_p, batch_p)
    outs = [jax.ShapeDtypeStruct((length, batch_p, hidden_p), x.dtype)]
    if save:
        outs.append(jax.ShapeDtypeStruct((length, 4, batch_p, hidden_p), x.dtype))
    ins = [xw, _tiles(w_hh, hidden_p, True), _pad(b_hn[None], (1, hidden_p))]
    ins.append(_pad(h0, (batch_p, hidden_p)))
    hs, *saved = _call(
        _gru_forward_kernel, ins, outs, valid, compiled, shared=(1, 2), reverse=reverse, save=save
    )
    return outputs(hs[:, :batch, :hidden], valid, reverse), (hs, *saved)


def _gru_bwd(reverse, compiled, residuals, cotangents, needed):
    del needed  # what is not needed is XLA's to drop (dead code)
    w_ih, w_hh, _, _, x, h0, valid, (hs, acts) = residuals
    dys, dh_n = cotangents
    batch, hidden = h0.shape
    batch_p, hidden_p = hs.shape[1:]
    ins = [_pad(dys, hs.shape), acts, hs, _pad(h0, (batch_p, hidden_p))]
    ins += [_tiles(w_hh, hidden_p, False), _pad(dh_n, (batch_p, hidden_p))]
    gates = jax.ShapeDtypeStruct((hs.shape[0], 3, batch_p, hidden_p), x.dtype)
    outs = [gates, gates, jax.ShapeDtypeStruct((batch_p, hidden_p), x.dtype)]
    dxw, dhw, dh0 = _call(
        _gru_backward_kernel, ins, outs, valid, compiled, shared=(4,), reverse=reverse
    )
    dxw, dhw = (_from_gate_major(a, batch, hidden) for a in (dxw, dhw))
    dw_ih, dbias, dx = input_grads(dxw, x, w_ih)
    dw_hh = weight_grad(dhw, previous(hs[:, :batch, :hidden], h0, reverse))
    db_hn = jnp.sum(dhw[..., 2 * hidden :], axis=(0, 1))
    return dw_ih, dw_hh, dbias, db_hn, dx, dh0[:batch, :hidden], None


gru_recurrence = loops.loop_with_backward(
    _gru_forward,
    _gru_bwd,
    loops.gru_reference,
    """``(ys, h_n)`` of one GRU direction, as :func:`jlstm.fused.gru_recurrence` (same
    arguments, no ``unroll``/``hoist``).""",
)
