# ruff: noqa: N806, B023  (D as in the layer docs; loop closures run within their iteration)
"""In-process A/B of jlstm's internal choices on the benchmark cases, fwd and train, round-robin:

    python -m experiments.prototypes.knobs hoist mnist,medium,long,wide,gru
        input projection inside each step (the CPU default) vs hoisted out of the loop
    python -m experiments.prototypes.knobs checkpoint long,long-8k,medium
        checkpoint_every None (the default) vs 8, 16, 32; adds XLA's temp MiB of the train step
    python -m experiments.prototypes.knobs weights mnist,medium,long,wide
        jlstm.native's backward: weight gradients summed in the loop vs gate gradients to XLA

Every variant's outputs and gradients are checked against the default's before timing. "train" is
the gradient of sum(output * cotangent) w.r.t. the parameters and the input.
"""

import contextlib
import sys
from unittest import mock

import jax
import jax.numpy as jnp

import jlstm
from experiments.bench import CASES, Case
from experiments.prototypes.common import rel_err, report, round_robin
from jlstm import layers, native

EXTRA_CASES = {"long-8k": Case("lstm", 8, 8192, 32, 64, 1, False)}


def _with_hoist(hoist):
    """While tracing, the fused path (the lax.scan loop; the C++ loop has no such choice) places
    the input projection as ``hoist`` says."""
    original = layers._recurrence

    def recurrence(kind, w, x, carry, valid, reverse, unroll, _hoist=None, _impl=None):
        return original(kind, w, x, carry, valid, reverse, unroll, hoist, "fused")

    return mock.patch.object(layers, "_recurrence", recurrence)


def variants(experiment):
    """name -> (context manager active while tracing, keyword arguments of the layer call)."""
    none = contextlib.nullcontext()
    if experiment == "hoist":
        return {"inside (default)": (_with_hoist(False), {}), "hoisted": (_with_hoist(True), {})}
    if experiment == "checkpoint":
        out = {"checkpoint_every=None": (none, {})}
        return out | {f"checkpoint_every={k}": (none, {"checkpoint_every": k}) for k in (8, 16, 32)}
    if experiment == "weights":
        return {
            "in the loop": (mock.patch.object(native, "WEIGHTS_IN_LOOP_BYTES", 2**62), {}),
            "gates to XLA": (mock.patch.object(native, "WEIGHTS_IN_LOOP_BYTES", 0), {}),
        }
    raise SystemExit(f"unknown experiment {experiment!r}; choose hoist, checkpoint or weights")


def main(experiment, names):
    for name in names:
        case = CASES.get(name) or EXTRA_CASES[name]
        fn, init = (
            (jlstm.lstm, jlstm.init_lstm) if case.cell == "lstm" else (jlstm.gru, jlstm.init_gru)
        )
        key = jax.random.key(0)
        params = init(
            key,
            case.input_size,
            case.hidden_size,
            num_layers=case.num_layers,
            bidirectional=case.bidirectional,
        )
        D = 2 if case.bidirectional else 1
        x = jax.random.normal(key, (case.seq_len, case.batch, case.input_size))
        cot = jax.random.normal(jax.random.key(1), (case.seq_len, case.batch, D * case.hidden_size))
        fwd_fns, train_fns, temp, reference = {}, {}, {}, None
        for label, (context, kw) in variants(experiment).items():
            # The layer stack is itself jitted: without clearing, its cached trace from the first
            # variant would be reused and every variant would time the same program.
            jax.clear_caches()
            with context:  # trace and compile under the variant
                fwd = jax.jit(lambda p, x, kw=kw: fn(p, x, **kw)[0]).lower(params, x).compile()
                train = jax.jit(
                    jax.grad(lambda p, x, c, kw=kw: jnp.sum(fn(p, x, **kw)[0] * c), (0, 1))
                )
                train = train.lower(params, x, cot).compile()
            got = [fwd(params, x), *jax.tree.leaves(train(params, x, cot))]
            reference = reference or got
            err = max(rel_err(a, b) for a, b in zip(got, reference, strict=True))
            assert err < 1e-4, (name, label, err)
            temp[label] = train.memory_analysis().temp_size_in_bytes / 2**20
            fwd_fns[label] = lambda f=fwd: f(params, x)
            train_fns[label] = lambda f=train: f(params, x, cot)
        base = next(iter(fwd_fns))
        report(f"{name} fwd {tuple(case)}", round_robin(fwd_fns), base)
        report(f"{name} train {tuple(case)}", round_robin(train_fns), base)
        if experiment == "checkpoint":
            print("  train temp MiB: " + ", ".join(f"{k} {v:.1f}" for k, v in temp.items()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
