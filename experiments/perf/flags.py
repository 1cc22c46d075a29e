"""Backs BENCHMARKS.md's XLA-flags line: ``XLA_FLAGS=<flag> python -m experiments.perf.flags long``.
Times jlstm (impl="auto", fwd and train) under this process' settings, which can only be chosen
before JAX starts: XLA_FLAGS and JLSTM_NATIVE_THREADS (the C++ loop's thread count):

    for f in "" "--xla_cpu_use_thunk_runtime=false" ...; do
        XLA_FLAGS="$f" python -m experiments.perf.flags long
    done
    for n in 1 2; do JLSTM_NATIVE_THREADS=$n python -m experiments.perf.flags mnist,long; done

Prints one line per run: the settings, then per case the median process CPU time of a call (on a
shared machine far steadier than wall time), its relative error against torch and the compile time.
"""

import os
import sys
import time

import numpy as np

from experiments.bench import adapters
from experiments.bench.cases import CASES
from experiments.bench.timing import max_rel_err


def cpu_time(run, sync, n: int) -> float:
    """Median over 5 samples of the process CPU time of one of ``n`` consecutive calls."""
    sync(run())
    samples = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            r = run()
        sync(r)
        samples.append((time.process_time() - start) / n)
    return float(np.median(samples))


def main(names: list[str]) -> None:
    out = []
    for name in names:
        case = CASES[name]
        module, x, cot = adapters.setup(case, "cpu")
        times, err, compile_s = {}, 0.0, 0.0
        for mode in ("fwd", "train"):
            torch_ = adapters.make_torch(module, x, cot, mode, "cpu")
            impl = adapters.make_impl("jlstm", case, mode, module, x, cot, "cpu")
            want = torch_.result(torch_.sync(torch_.run()))
            err = max(err, max_rel_err(impl.result(impl.sync(impl.run())), want))
            compile_s += impl.compile_s
            n = max(1, int(0.3 / cpu_time(impl.run, impl.sync, 1)))
            times[mode] = cpu_time(impl.run, impl.sync, n)
        out.append(
            f"{name}: fwd {times['fwd'] * 1e3:7.2f} ms  train {times['train'] * 1e3:7.2f} ms"
            f"  (err {err:.0e}, compile {compile_s:.1f}s)"
        )
    settings = {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "JLSTM_NATIVE_THREADS")}
    described = " ".join(f"{k}={v!r}" for k, v in settings.items() if v) or "(default)"
    print(f"{described:58s} " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main([name for arg in sys.argv[1:] for name in arg.split(",")] or ["long"])
