"""The benchmark cases: one table, used by ``make bench`` and by the tools in tools/perf.

A case is a torch configuration (``torch.nn.LSTM`` or ``torch.nn.GRU``, time-major input of shape
``(seq_len, batch, input_size)``); every benchmark gives every implementation the same weights and
input. This module imports nothing heavy, so a tool can read it before JAX starts.
"""

from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    cell: str  # "lstm" or "gru"
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool


CASES = {
    "mnist": Case("lstm", 64, 28, 28, 64, 1, False),  # row-by-row MNIST (experiments/mnist.py)
    "medium": Case("lstm", 32, 128, 128, 256, 2, True),
    "long": Case("lstm", 16, 1024, 64, 128, 1, False),  # many cheap steps
    "wide": Case("lstm", 128, 64, 512, 1024, 1, False),  # GEMM-bound
    "gru": Case("gru", 32, 128, 128, 256, 2, True),
    # Streaming / serving: one sequence at a time, each step a matrix-vector product.
    "small": Case("lstm", 1, 256, 64, 256, 1, False),
    "small-gru": Case("gru", 1, 256, 64, 256, 1, False),
}
BENCH_CASES = list(CASES)  # make bench
QUICK_CASES = ["mnist", "long", "gru"]  # make bench-quick
MODES = ["fwd", "train"]


def num_directions(case: Case) -> int:
    return 2 if case.bidirectional else 1


def flops(case: Case, mode: str) -> float:
    """Floating-point operations of the gate GEMMs, ``2 * multiply-adds`` of ``x_t @ W_ih.T`` and
    ``h @ W_hh.T`` over every step, layer and direction; a train step ("train") adds twice that
    again for the gradients of the input, the state and the weights.

    >>> flops(Case("lstm", 1, 1, 2, 3, 1, False), "fwd")  # 2 * 1 * 4 gates * 3 * (2 + 3)
    120.0
    """
    gates = 4 if case.cell == "lstm" else 3
    total = 0.0
    for layer in range(case.num_layers):
        inp = case.input_size if layer == 0 else num_directions(case) * case.hidden_size
        per_step = 2 * case.batch * gates * case.hidden_size * (inp + case.hidden_size)
        total += num_directions(case) * case.seq_len * per_step
    return total * (3 if mode == "train" else 1)
