"""The comparison in jlstm/csrc/gate_math.h's header: ``python -m tools.perf.gate_accuracy``.
The largest error, in units in the last place of the exact value,
of XLA CPU's own float32 ``tanh`` and sigmoid (``jnp.tanh``, ``jax.nn.sigmoid``: what the
``lax.scan`` paths compute) and of torch's (when installed), over the floats that
tests/gate_math_check.cc sweeps for the C++ loop's own: every 97th bit pattern of either sign,
against float64 numpy. The sigmoid is judged where x >= -87 (below, the exact value is under 1e-38).
"""

import jax
import jax.numpy as jnp
import numpy as np


def sweep() -> np.ndarray:
    x = np.arange(0, 0x7F800000, 97, dtype=np.uint32).view(np.float32)
    return np.concatenate([x, -x])


def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    nearest = exact.astype(np.float32)
    ulp = np.spacing(np.abs(nearest)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / ulp


def main() -> None:
    x = sweep()
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(-x) is inf below x = -709: the sigmoid is 0 there
        exact = {"tanh": np.tanh(x64), "sigmoid": 1 / (1 + np.exp(-x64))}
    judged = {"tanh": np.ones_like(x, bool), "sigmoid": x >= -87}
    fns = {
        "XLA (jnp.tanh, jax.nn.sigmoid)": {
            "tanh": lambda v: np.asarray(jax.jit(jnp.tanh)(v)),
            "sigmoid": lambda v: np.asarray(jax.jit(jax.nn.sigmoid)(v)),
        }
    }
    try:
        import torch

        fns["torch (torch.tanh, torch.sigmoid)"] = {
            "tanh": lambda v: torch.tanh(torch.from_numpy(v)).numpy(),
            "sigmoid": lambda v: torch.sigmoid(torch.from_numpy(v)).numpy(),
        }
    except ImportError:
        pass
    print(f"{x.size} float32 values, jax {jax.__version__}")
    for name, pair in fns.items():
        for fn_name, fn in pair.items():
            keep = judged[fn_name]
            err = ulp_error(fn(x)[keep], exact[fn_name][keep])
            i = int(err.argmax())
            print(f"  {name} {fn_name}: {err[i]:.3f} ulp at {x[keep][i]:.9g}")


if __name__ == "__main__":
    main()
