"""The implementations a case is timed on, each built from the same torch module.

torch's ``nn.LSTM``/``nn.GRU`` is the reference; jlstm runs from ``jlstm.from_torch`` of its
``state_dict`` on each ``impl``; flax.linen.RNN and cuDNN (``jax.experimental.rnn``) get the same
weights mapped into their own layouts. Both maps are linear, so gradients come back to torch's
names through ``jax.vjp`` and every implementation is compared with torch on the same arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jlstm
import jlstm.cudnn
import jlstm.params
from experiments.bench.cases import Case, num_directions

# jlstm: impl="auto" (on CPU the C++ loop of jlstm.native); jlstm-fused: the pure-JAX lax.scan path
# with the hand-written backward (impl="fused", what auto takes on GPU/TPU).
# jlstm-pallas, jlstm-cudnn: impl="pallas" (one Pallas kernel per time loop, H <= 256) and
# impl="cudnn" (LSTM); both run on a GPU only (Pallas would run interpreted here, far too slowly).
IMPLS = ["torch", "jlstm", "jlstm-fused", "flax", "cudnn", "jlstm-pallas", "jlstm-cudnn"]
JLSTM_IMPLS = {
    "jlstm": "auto",
    "jlstm-fused": "fused",
    "jlstm-pallas": "pallas",
    "jlstm-cudnn": "cudnn",
}
GPU_ONLY = ("cudnn", "jlstm-pallas", "jlstm-cudnn")
# jlstm timed right after each of torch's calls (timing.Beside), on CPU: its time beside a thread
# pool that still spins.
AFTER_TORCH = "jlstm-after-torch"


class Impl(NamedTuple):
    run: Callable[[], Any]  # one iteration, synchronous only after `sync`
    sync: Callable[[Any], Any]  # waits for the result of `run`
    result: Callable[[Any], dict[str, np.ndarray]]  # named arrays compared with torch's
    compile_s: float | None
    memory_mib: float | None = None  # JAX: XLA's temp + output buffers of one call


def layer(case: Case):
    return jlstm.lstm if case.cell == "lstm" else jlstm.gru


def setup(case: Case, device: str):
    """The torch module (seeded weights), input and output cotangent of a case."""
    torch.manual_seed(0)
    module_cls = torch.nn.LSTM if case.cell == "lstm" else torch.nn.GRU
    module = module_cls(
        case.input_size, case.hidden_size, case.num_layers, bidirectional=case.bidirectional
    ).to(device)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.seq_len, case.batch, case.input_size), np.float32)
    out = num_directions(case) * case.hidden_size
    cot = rng.standard_normal((case.seq_len, case.batch, out), np.float32)
    return module, x, cot


def tolerance() -> float:
    """Largest relative error vs torch an implementation may have and still be timed."""
    return 1e-4 if jax.default_backend() == "cpu" else 5e-3  # GPUs may use TF32 for float32


def jlstm_refusal(impl: str, case: Case) -> str | None:
    """Why ``jlstm.lstm``/``jlstm.gru`` refuses ``impl`` on this case here, or None: its own
    error message, from tracing the call abstractly (nothing is compiled or run)."""
    params = jax.eval_shape(
        lambda: (jlstm.init_lstm if case.cell == "lstm" else jlstm.init_gru)(
            jax.random.key(0),
            case.input_size,
            case.hidden_size,
            num_layers=case.num_layers,
            bidirectional=case.bidirectional,
        )
    )
    x = jax.ShapeDtypeStruct((case.seq_len, case.batch, case.input_size), jnp.float32)
    try:
        jax.eval_shape(lambda p, x: layer(case)(p, x, impl=impl), params, x)
    except ValueError as e:
        return str(e)
    return None


def applies(impl_name: str, case: Case) -> bool:
    """Whether a column runs on this backend and case: GPU-only columns on a GPU, cuDNN for LSTMs,
    and a jlstm impl wherever jlstm itself accepts it."""
    if impl_name in GPU_ONLY and jax.default_backend() != "gpu":
        return False
    if impl_name == "cudnn":
        return case.cell == "lstm"
    return impl_name not in JLSTM_IMPLS or jlstm_refusal(JLSTM_IMPLS[impl_name], case) is None


# ---------------------------------------------------------------------------------------------
# Parameter trees: torch names (jlstm's params) -> flax.linen.RNN / cuDNN's flat vector.


def to_flax(params: dict[str, jax.Array], case: Case) -> dict:
    """torch-named weights -> params of `FlaxStack` (kernels are transposed, biases folded)."""
    tree, D = {}, num_directions(case)
    for layer_index in range(case.num_layers):
        for sfx, name in zip(["", "_reverse"][:D], ["fwd", "bwd"][:D], strict=True):
            w_ih, w_hh, b_ih, b_hh = (
                params[f"{kind}_l{layer_index}{sfx}"]
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            )
            if (
                case.cell == "lstm"
            ):  # flax: input kernels without bias, hidden ones with b_ih + b_hh
                wi, wh, b = (jnp.split(a, 4) for a in (w_ih, w_hh, b_ih + b_hh))
                cell = {f"i{g}": {"kernel": wi[k].T} for k, g in enumerate("ifgo")}
                cell |= {f"h{g}": {"kernel": wh[k].T, "bias": b[k]} for k, g in enumerate("ifgo")}
            else:  # GRU: r, z biases folded; n keeps b_in outside and b_hn inside r * (...)
                wi, wh, bi, bh = (jnp.split(a, 3) for a in (w_ih, w_hh, b_ih, b_hh))
                cell = {
                    "ir": {"kernel": wi[0].T, "bias": bi[0] + bh[0]},
                    "iz": {"kernel": wi[1].T, "bias": bi[1] + bh[1]},
                    "in": {"kernel": wi[2].T, "bias": bi[2]},
                    "hr": {"kernel": wh[0].T},
                    "hz": {"kernel": wh[1].T},
                    "hn": {"kernel": wh[2].T, "bias": bh[2]},
                }
            tree[f"{name}_{layer_index}"] = cell
    return {"params": tree}


class FlaxStack(nn.Module):
    """torch's stacked (bi)directional RNN out of flax.linen.RNN, time-major like torch."""

    cell: str
    hidden_size: int
    num_layers: int
    bidirectional: bool

    @nn.compact
    def __call__(self, x):
        make = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[self.cell]
        for layer_index in range(self.num_layers):
            y = nn.RNN(make(self.hidden_size, name=f"fwd_{layer_index}"), time_major=True)(x)
            if self.bidirectional:
                rnn = nn.RNN(make(self.hidden_size, name=f"bwd_{layer_index}"), time_major=True)
                y = jnp.concatenate([y, rnn(x, reverse=True, keep_order=True)], axis=-1)
            x = y
        return x


def to_cudnn(params: dict[str, jax.Array]) -> jax.Array:
    """torch-named LSTM weights -> ``jax.experimental.rnn.lstm``'s flat vector for the whole stack:
    every layer's matrices, then every layer's biases. ``jlstm.cudnn.pack`` lays out one layer as
    its matrices followed by its biases, so the stack takes the two halves of each layer's."""
    layers = jlstm.params.layer_structure("to_cudnn", "lstm", params).layers
    packed = [jlstm.cudnn.pack(directions) for directions in layers]
    n_mats = [sum(w.w_ih.size + w.w_hh.size for w in directions) for directions in layers]
    mats = [p[:n] for p, n in zip(packed, n_mats, strict=True)]
    biases = [p[n:] for p, n in zip(packed, n_mats, strict=True)]
    return jnp.concatenate(mats + biases)


# ---------------------------------------------------------------------------------------------
# Implementations of one (case, mode): each returns an Impl that has already been compiled.


def jax_impl(fn, args, result) -> Impl:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    memory_mib = None if m is None else (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
    return Impl(lambda: compiled(*args), jax.block_until_ready, result, compile_s, memory_mib)


def make_torch(module, x, cot, mode, device) -> Impl:
    xt = torch.from_numpy(x).to(device)
    gt = torch.from_numpy(cot).to(device)
    sync = (lambda r: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda r: r)
    if mode == "fwd":

        def run():
            with torch.inference_mode():
                return module(xt)

        return Impl(run, sync, lambda r: {"output": r[0].cpu().numpy()}, None)
    xt.requires_grad_(True)

    def run():
        module.zero_grad(set_to_none=True)
        xt.grad = None
        out, _ = module(xt)
        out.backward(gt)
        return xt.grad

    def result(_):
        grads = {k: p.grad.cpu().numpy() for k, p in module.named_parameters()}
        return grads | {"x": xt.grad.cpu().numpy()}

    return Impl(run, sync, result, None)


def make_jax(forward, params, x, cot, mode, to_torch_names=None) -> Impl:
    """`forward(params, x) -> output`; a train step's gradients come back torch-named through
    `to_torch_names` (for parameters in another layout) and are timed in `params`' own layout."""
    if mode == "fwd":
        return jax_impl(forward, (params, x), lambda r: {"output": r})

    def loss(p, x, cot):
        return jnp.sum(forward(p, x) * cot)

    def result(g):
        gp = g[0] if to_torch_names is None else to_torch_names(g[0])[0]
        return {k: np.asarray(v) for k, v in gp.items()} | {"x": np.asarray(g[1])}

    return jax_impl(jax.grad(loss, argnums=(0, 1)), (params, x, cot), result)


def make_impl(name, case, mode, module, x, cot, torch_device, checkpoint_every=None) -> Impl:
    params = jlstm.from_torch(module.state_dict())
    xj, cotj = jnp.asarray(x), jnp.asarray(cot)
    if name == "torch":
        return make_torch(module, x, cot, mode, torch_device)
    if name in JLSTM_IMPLS:
        impl = JLSTM_IMPLS[name]

        def forward(p, x):
            return layer(case)(p, x, impl=impl, checkpoint_every=checkpoint_every)[0]

        return make_jax(forward, params, xj, cotj, mode)
    if name == "flax":
        model = FlaxStack(case.cell, case.hidden_size, case.num_layers, case.bidirectional)
        _, to_torch_names = jax.vjp(lambda p: to_flax(p, case), params)
        return make_jax(model.apply, to_flax(params, case), xj, cotj, mode, to_torch_names)
    if name == "cudnn":  # batch-major input, as jax.experimental.rnn.lstm wants
        from jax.experimental import rnn

        D = num_directions(case)
        zeros = jnp.zeros((D * case.num_layers, case.batch, case.hidden_size), jnp.float32)
        lengths = jnp.full((case.batch,), case.seq_len, jnp.int32)
        sizes = dict(input_size=case.input_size, hidden_size=case.hidden_size)
        sizes |= dict(num_layers=case.num_layers, dropout=0.0, bidirectional=case.bidirectional)

        def forward(w, xb):
            return rnn.lstm(xb, zeros, zeros, w, lengths, **sizes)[0]

        w, xb, cotb = to_cudnn(params), jnp.swapaxes(xj, 0, 1), jnp.swapaxes(cotj, 0, 1)
        if mode == "fwd":
            return jax_impl(forward, (w, xb), lambda r: {"output": np.swapaxes(r, 0, 1)})

        def loss(w, xb, cot):
            return jnp.sum(forward(w, xb) * cot)

        _, to_torch_names = jax.vjp(to_cudnn, params)

        def result(g):
            (gp,) = to_torch_names(g[0])
            return {k: np.asarray(v) for k, v in gp.items()} | {"x": np.swapaxes(g[1], 0, 1)}

        return jax_impl(jax.grad(loss, argnums=(0, 1)), (w, xb, cotb), result)
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}")
