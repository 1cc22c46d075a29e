"""Moving parameters between torch ``state_dict``s and jlstm's params dicts, losslessly.

torch is never imported here: a torch tensor is recognised by its ``detach`` method, so this module
works (on numpy arrays) where torch is not installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Every name a torch RNN, GRU, LSTM or cell puts in its state_dict.
_NAME = re.compile(r"^(weight|bias)_(ih|hh|hr)(?:_l(\d+)(_reverse)?)?$")
_ORDER = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def _sort_key(name: str) -> tuple[int, int, int]:
    """torch's state_dict order: by layer, forward before reverse, then weight_ih ... weight_hr."""
    kind, which, layer, reverse = _NAME.match(name).groups()
    return int(layer or 0), int(bool(reverse)), _ORDER.index(f"{kind}_{which}")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if (
            str(value.dtype) == "torch.bfloat16"
        ):  # numpy has no bfloat16; go through float32 losslessly
            return value.float().numpy().astype(jnp.bfloat16)
        return value.numpy()
    return np.asarray(value)


def from_torch(state_dict: Mapping, *, prefix: str = "", dtype=None) -> dict[str, jax.Array]:
    """A torch RNN/GRU/LSTM (or cell) ``state_dict`` as a jlstm params dict of jax arrays.

    Args:
      state_dict: ``module.state_dict()``: torch tensors or numpy arrays.
      prefix: keep only the keys that start with it, and strip it: ``from_torch(model.state_dict(),
        prefix="lstm.")`` takes the LSTM out of a larger model.
      dtype: cast to this dtype; default keeps each tensor's dtype (float64 needs ``jax_enable_x64``).

    >>> import numpy as np, jlstm
    >>> p = jlstm.from_torch({"weight_ih": np.zeros((8, 3)), "weight_hh": np.zeros((8, 2))})
    >>> p["weight_ih"].shape
    (8, 3)
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"from_torch: expected a state_dict (a mapping of names to tensors), got "
            f"{type(state_dict).__name__}; call it as jlstm.from_torch(module.state_dict())"
        )
    params = {}
    for full_name, value in state_dict.items():
        if not full_name.startswith(prefix):
            continue
        name = full_name[len(prefix) :]
        if not _NAME.match(name):
            raise ValueError(
                f"from_torch: {full_name!r} is not a parameter name of torch's RNN/GRU/LSTM or their cells "
                "(weight_ih_l0, bias_hh_l1_reverse, weight_hr_l0, weight_ih, ...); pass "
                "prefix='<submodule>.' to take the recurrent layer out of a larger model's state_dict"
            )
        params[name] = jnp.asarray(_to_numpy(value), dtype=dtype)
    if not params:
        raise ValueError(
            f"from_torch: no keys start with prefix {prefix!r} (keys: {sorted(state_dict)[:8]}); "
            "check the prefix, e.g. 'lstm.' for a submodule named lstm"
        )
    return dict(sorted(params.items(), key=lambda item: _sort_key(item[0])))


def to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """jlstm params as a dict of numpy arrays in torch's ``state_dict`` order, ready for
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Values are copied exactly; bfloat16 becomes float32 (exactly representable), as torch cannot
    read numpy's bfloat16.

    >>> import jax, jlstm
    >>> list(jlstm.to_torch(jlstm.init_gru(jax.random.key(0), 2, 3)))
    ['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0']
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"to_torch: expected a params dict, got {type(params).__name__}")
    bad = [name for name in params if not _NAME.match(name)]
    if bad:
        raise ValueError(
            f"to_torch: {bad} are not torch RNN parameter names; expected names such as "
            "weight_ih_l0 or bias_hh (as made by jlstm.init_* or jlstm.from_torch)"
        )
    out = {}
    for name in sorted(params, key=_sort_key):
        # A writable copy: torch.from_numpy warns on the read-only views np.asarray gives.
        value = np.array(params[name])
        out[name] = value.astype(np.float32) if value.dtype == jnp.bfloat16 else value
    return out
