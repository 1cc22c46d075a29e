"""The parity grid, shared by the golden generator (tests/golden/make_golden.py) and the tests.

A `Case` names one torch configuration. `make_arrays` draws its weights, inputs, initial state and
the fixed loss weights from numpy alone (so jlstm-only tests can use it), and `torch_reference`
runs torch on them and returns outputs, final states and the gradients of

    loss = sum(output * R.output) + sum(h_n * R.h_n) [+ sum(c_n * R.c_n)]

with respect to every parameter, the input and the initial state. torch is imported lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

RECURRENT = ("lstm", "gru", "rnn_tanh", "rnn_relu")
CELLS = ("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # one of RECURRENT or CELLS
    batch: int | None  # None: unbatched input, (L, H_in) or (H_in,) for cells
    length: int = 5  # ignored by cells
    input_size: int = 4
    hidden_size: int = 3
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    batch_first: bool = False
    given_state: bool = True  # False: state=None (zeros)
    proj_size: int = 0
    lengths: tuple[int, ...] | None = None  # packed sequence lengths, one per batch element
    const: float | None = None  # every weight equals this, every input and state element 1

    @property
    def base(self) -> str:
        """lstm / gru / rnn, the family without the nonlinearity and cell suffix."""
        return self.kind.removesuffix("_cell").removesuffix("_tanh").removesuffix("_relu")

    @property
    def is_cell(self) -> bool:
        return self.kind in CELLS

    @property
    def nonlinearity(self) -> str:
        return "relu" if "relu" in self.kind else "tanh"

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def h_out(self) -> int:
        return self.proj_size or self.hidden_size

    @property
    def id(self) -> str:
        parts = [self.kind, "unbatched" if self.batch is None else f"N{self.batch}"]
        if not self.is_cell:
            parts.append(f"L{self.length}")
        parts += [f"I{self.input_size}", f"H{self.hidden_size}"]
        if self.num_layers > 1:
            parts.append(f"layers{self.num_layers}")
        if self.bidirectional:
            parts.append("bi")
        if not self.bias:
            parts.append("nobias")
        if self.batch_first:
            parts.append("batchfirst")
        parts.append("state" if self.given_state else "nostate")
        if self.proj_size:
            parts.append(f"proj{self.proj_size}")
        if self.lengths is not None:
            parts.append("len" + ".".join(map(str, self.lengths)))
        if self.const is not None:
            parts.append(f"const{self.const}")
        return "-".join(parts)


def _grid() -> list[Case]:
    cases = []
    for kind in ("lstm", "gru", "rnn_tanh"):
        c = functools.partial(Case, kind)
        cases += [
            c(batch=1, length=1, input_size=1, hidden_size=1, given_state=False),
            c(batch=1, length=1, input_size=1, hidden_size=1, num_layers=3, bidirectional=True),
            c(batch=3),
            c(batch=3, num_layers=2, bidirectional=True, batch_first=True, given_state=False),
            c(batch=3, input_size=1, num_layers=3, bias=False),
            c(
                batch=1,
                hidden_size=1,
                num_layers=2,
                bidirectional=True,
                bias=False,
                batch_first=True,
            ),
            c(batch=None, num_layers=2, bidirectional=True),
            c(batch=None, length=1, input_size=1, given_state=False),
            c(batch=3, length=1, num_layers=2, bias=False, batch_first=True),
            c(batch=3, num_layers=2, bidirectional=True, lengths=(5, 1, 3)),
            c(batch=3, batch_first=True, given_state=False, lengths=(1, 5, 5)),
            c(batch=1, input_size=1, hidden_size=1, bidirectional=True, lengths=(3,)),
            c(batch=3, length=1, num_layers=2, bidirectional=True, lengths=(1, 1, 1)),
            c(
                batch=3,
                num_layers=3,
                bidirectional=True,
                bias=False,
                batch_first=True,
                lengths=(2, 5, 4),
            ),
        ]
    c = functools.partial(Case, "rnn_relu")
    cases += [
        c(batch=1, length=1, input_size=1, hidden_size=1),
        c(batch=3, num_layers=2, bidirectional=True),
        c(batch=3, num_layers=3, bias=False, batch_first=True, given_state=False),
        c(batch=None, hidden_size=1, num_layers=2, bidirectional=True),
        c(batch=3, bidirectional=True, batch_first=True, lengths=(4, 5, 1)),
        c(batch=3, num_layers=2, given_state=False, lengths=(5, 2, 1)),
    ]
    c = functools.partial(Case, "lstm")
    cases += [
        c(batch=3, proj_size=1),
        c(batch=3, num_layers=2, bidirectional=True, proj_size=2),
        c(batch=3, input_size=1, num_layers=3, bias=False, batch_first=True, proj_size=1),
        c(batch=None, num_layers=2, bidirectional=True, given_state=False, proj_size=2),
        c(batch=1, length=1, num_layers=2, bidirectional=True, proj_size=1),
        c(batch=3, num_layers=2, bidirectional=True, proj_size=2, lengths=(5, 1, 3)),
        c(batch=3, batch_first=True, given_state=False, proj_size=1, lengths=(2, 1, 5)),
        # The NaiveLSTM tutorial check: weights 0.5, input/h0/c0 all ones, input 10, hidden 20.
        c(batch=1, length=3, input_size=10, hidden_size=20, const=0.5),
    ]
    for kind in ("lstm_cell", "gru_cell", "rnn_tanh_cell"):
        c = functools.partial(Case, kind)
        cases += [
            c(batch=1, input_size=1, hidden_size=1),
            c(batch=3, given_state=False),
            c(batch=None, bias=False),
            c(batch=3, hidden_size=1, bias=False),
        ]
    c = functools.partial(Case, "rnn_relu_cell")
    cases += [c(batch=3), c(batch=None, input_size=1, hidden_size=1, given_state=False)]
    return cases


CASES: list[Case] = _grid()
assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


def _features(case: Case) -> set[tuple[str, str]]:
    """(kind, feature value) pairs that a case exercises."""
    values = {
        "unbatched" if case.batch is None else "batched",
        "state" if case.given_state else "nostate",
        "bi" if case.bidirectional else "uni",
        "bias" if case.bias else "nobias",
        "batch_first" if case.batch_first else "time_major",
        "packed" if case.lengths else "padded",
        "proj" if case.proj_size else "noproj",
        f"layers{case.num_layers}",
    }
    return {(case.kind, value) for value in values}


def covering_subset(cases: list[Case]) -> list[Case]:
    """A small subset (greedy set cover) in which every kind still meets every feature value that
    it meets in `cases`: for checks too slow to run on the whole grid."""
    needed, chosen = set().union(*map(_features, cases)), []
    while needed:
        best = max(cases, key=lambda case: len(_features(case) & needed))
        chosen.append(best)
        needed -= _features(best)
    return chosen


def param_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    """torch's state_dict names and shapes, in torch's order."""
    g, h = _GATES[case.base], case.hidden_size
    if case.is_cell:
        shapes = {"weight_ih": (g * h, case.input_size), "weight_hh": (g * h, h)}
        if case.bias:
            shapes |= {"bias_ih": (g * h,), "bias_hh": (g * h,)}
        return shapes
    shapes = {}
    for layer in range(case.num_layers):
        layer_in = case.input_size if layer == 0 else case.num_directions * case.h_out
        for sfx in ("", "_reverse")[: case.num_directions]:
            shapes[f"weight_ih_l{layer}{sfx}"] = (g * h, layer_in)
            shapes[f"weight_hh_l{layer}{sfx}"] = (g * h, case.h_out)
            if case.bias:
                shapes[f"bias_ih_l{layer}{sfx}"] = (g * h,)
                shapes[f"bias_hh_l{layer}{sfx}"] = (g * h,)
            if case.proj_size:
                shapes[f"weight_hr_l{layer}{sfx}"] = (case.proj_size, h)
    return shapes


def state_names(case: Case) -> tuple[str, ...]:
    return ("h0", "c0") if case.base == "lstm" else ("h0",)


def output_names(case: Case) -> tuple[str, ...]:
    if case.is_cell:
        return ("h", "c") if case.base == "lstm" else ("h",)
    return ("output", "h_n", "c_n") if case.base == "lstm" else ("output", "h_n")


def output_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    n = () if case.batch is None else (case.batch,)
    if case.is_cell:
        return {name: n + (case.hidden_size,) for name in output_names(case)}
    d, layers = case.num_directions, case.num_directions * case.num_layers
    if case.batch is None:
        out = (case.length,)
    elif case.batch_first:
        out = (case.batch, case.length)
    else:
        out = (case.length, case.batch)
    shapes = {"output": out + (d * case.h_out,), "h_n": (layers, *n, case.h_out)}
    if case.base == "lstm":
        shapes["c_n"] = (layers, *n, case.hidden_size)
    return shapes


def make_arrays(case: Case, dtype=np.float64) -> dict[str, np.ndarray]:
    """Weights ("param.<name>"), "x", initial states, loss weights ("R.<output>"), "lengths"."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    out: dict[str, np.ndarray] = {}
    bound = 1.0 / np.sqrt(case.hidden_size)
    for name, shape in param_shapes(case).items():
        out[f"param.{name}"] = rng.uniform(-bound, bound, shape)
    n = () if case.batch is None else (case.batch,)
    if case.is_cell:
        out["x"] = rng.standard_normal(n + (case.input_size,))
    elif case.batch is None:
        out["x"] = rng.standard_normal((case.length, case.input_size))
    elif case.batch_first:
        out["x"] = rng.standard_normal((case.batch, case.length, case.input_size))
    else:
        out["x"] = rng.standard_normal((case.length, case.batch, case.input_size))
    if case.given_state:
        layers = () if case.is_cell else (case.num_directions * case.num_layers,)
        out["h0"] = 0.5 * rng.standard_normal(layers + n + (case.h_out,))
        if case.base == "lstm":
            out["c0"] = 0.5 * rng.standard_normal(layers + n + (case.hidden_size,))
    if case.const is not None:
        out = {
            k: np.full_like(v, case.const if k.startswith("param.") else 1.0)
            for k, v in out.items()
        }
    for name, shape in output_shapes(case).items():
        out[f"R.{name}"] = rng.standard_normal(shape)
    out = {k: v.astype(dtype) for k, v in out.items()}
    if case.lengths is not None:
        assert case.batch == len(case.lengths) and max(case.lengths) <= case.length
        out["lengths"] = np.asarray(case.lengths, np.int64)
    return out


def torch_module(case: Case, arrays: dict[str, np.ndarray]):
    """The torch module of `case`, loaded (strictly) with the weights in `arrays`."""
    import torch

    nn = torch.nn
    sizes = (case.input_size, case.hidden_size)
    if case.is_cell:
        cls = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[case.base]
        kw = {"nonlinearity": case.nonlinearity} if case.base == "rnn" else {}
        module = cls(*sizes, bias=case.bias, **kw)
    else:
        kw = dict(
            num_layers=case.num_layers,
            bias=case.bias,
            batch_first=case.batch_first,
            bidirectional=case.bidirectional,
        )
        if case.base == "lstm":
            module = nn.LSTM(*sizes, proj_size=case.proj_size, **kw)
        elif case.base == "gru":
            module = nn.GRU(*sizes, **kw)
        else:
            module = nn.RNN(*sizes, nonlinearity=case.nonlinearity, **kw)
    x = arrays["x"]
    module = module.to(torch.from_numpy(x).dtype)
    weights = {k.removeprefix("param."): v for k, v in arrays.items() if k.startswith("param.")}
    module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return module


def torch_reference(case: Case, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch's outputs (named as in `output_names`) and gradients ("grad.param.<name>",
    "grad.x", "grad.h0", "grad.c0") of the fixed loss, in the dtype of `arrays`."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    module = torch_module(case, arrays)
    leaves = {
        name: torch.tensor(arrays[name], requires_grad=True)
        for name in ("x", *state_names(case))
        if name in arrays
    }
    state = [leaves[name] for name in state_names(case) if name in leaves]
    hx = (tuple(state) if case.base == "lstm" else state[0]) if state else None
    x = leaves["x"]
    if case.is_cell:
        result = module(x, hx)
        outputs = dict(
            zip(output_names(case), result if case.base == "lstm" else (result,), strict=True)
        )
    else:
        if case.lengths is not None:
            lengths = torch.as_tensor(case.lengths, dtype=torch.int64)
            x = pack_padded_sequence(x, lengths, batch_first=case.batch_first, enforce_sorted=False)
        output, h_n = module(x, hx)
        if case.lengths is not None:
            output, _ = pad_packed_sequence(
                output, batch_first=case.batch_first, total_length=case.length
            )
        finals = h_n if case.base == "lstm" else (h_n,)
        outputs = dict(zip(output_names(case), (output, *finals), strict=True))
    loss = sum((out * torch.from_numpy(arrays[f"R.{k}"])).sum() for k, out in outputs.items())
    loss.backward()
    result = {k: v.detach().numpy().copy() for k, v in outputs.items()}
    result["loss"] = loss.detach().numpy().copy()
    for name, p in module.named_parameters():
        result[f"grad.param.{name}"] = p.grad.numpy().copy()
    for name, leaf in leaves.items():
        result[f"grad.{name}"] = leaf.grad.numpy().copy()
    return result
