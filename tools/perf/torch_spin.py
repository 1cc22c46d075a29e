"""The CPU time torch's OpenMP team burns after each of its calls returns: the process' CPU time
over a pause right after a forward call of a benchmark case, while nothing else of the process runs
(``python -m tools.perf.torch_spin [CASES] [CALLS]``, e.g. ``mnist,medium 15``). With torch's
default wait policy its worker threads keep spinning for milliseconds, and a jlstm call made then
shares the cores with them (``make bench``'s *jlstm after torch / alone* column); run it again
under ``OMP_WAIT_POLICY=PASSIVE`` to see them sleep at once. Needs torch.
"""

import statistics
import sys
import time

import torch

from experiments.bench import adapters
from experiments.bench.cases import CASES

PAUSE_S = 0.05  # longer than the spin: the whole of it falls inside


def main(names: str = "mnist,medium", calls: int = 15) -> None:
    for name in names.split(","):
        case = CASES[name]
        module, x, cot = adapters.setup(case, "cpu")
        call = adapters.make_impl("torch", case, "fwd", module, x, cot, "cpu")
        call.sync(call.run())
        time.sleep(4 * PAUSE_S)
        burnt = []
        for _ in range(calls):
            call.sync(call.run())
            start = time.process_time()
            time.sleep(PAUSE_S)
            burnt.append((time.process_time() - start) * 1e3)
        print(
            f"{name} fwd: {statistics.median(burnt):.1f} ms of CPU time in the {PAUSE_S * 1e3:.0f} ms"
            f" after each call (min {min(burnt):.1f}, max {max(burnt):.1f}; {calls} calls,"
            f" torch threads {torch.get_num_threads()})"
        )


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(a) for a in sys.argv[2:3]))
