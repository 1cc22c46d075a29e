"""Backs BENCHMARKS.md's checkpoint_every table: ``python -m experiments.perf.knobs checkpoint
long,long-8k,medium``. In-process A/B of jlstm's public options on the benchmark cases, fwd and
train, round-robin (wall and process CPU time):

    python -m experiments.perf.knobs checkpoint long,long-8k,medium
        checkpoint_every None (the default) vs 8, 16, 32; adds XLA's temp + output MiB of the train
        step
    python -m experiments.perf.knobs impl mnist,medium,long,wide,gru,small
        impl="auto" (on CPU the C++ loop, jlstm.native) vs impl="fused" (the lax.scan path)

Cases are experiments.bench's. Every variant's outputs and gradients are checked against torch's
before timing. "train" is the gradient of sum(output * cotangent) w.r.t. the parameters and the
input. A variant is a set of keyword arguments of jlstm.lstm / jlstm.gru, so each compiles its own
program. Knobs that are process-wide (JLSTM_NATIVE_THREADS, XLA_FLAGS) are compared by running
experiments.perf.flags once per setting.
"""

import sys

from experiments.bench import adapters
from experiments.bench.cases import CASES
from experiments.bench.timing import max_rel_err
from experiments.perf.common import report, round_robin

VARIANTS = {  # experiment -> label -> (bench column, checkpoint_every)
    "checkpoint": {
        "checkpoint_every=None": ("jlstm", None),
        **{f"checkpoint_every={k}": ("jlstm", k) for k in (8, 16, 32)},
    },
    "impl": {'impl="auto"': ("jlstm", None), 'impl="fused"': ("jlstm-fused", None)},
}


def main(experiment: str, names: list[str]) -> None:
    if experiment not in VARIANTS:
        raise SystemExit(f"unknown experiment {experiment!r}; choose from {list(VARIANTS)}")
    if bad := [n for n in names if n not in CASES]:
        raise SystemExit(f"unknown cases {bad}; choose from {list(CASES)}")
    for name in names:
        case = CASES[name]
        module, x, cot = adapters.setup(case, "cpu")
        memory = {}
        for mode in ("fwd", "train"):
            torch_ = adapters.make_torch(module, x, cot, mode, "cpu")
            want = torch_.result(torch_.sync(torch_.run()))
            fns = {}
            for label, (column, every) in VARIANTS[experiment].items():
                impl = adapters.make_impl(column, case, mode, module, x, cot, "cpu", every)
                err = max_rel_err(impl.result(impl.sync(impl.run())), want)
                if err > adapters.tolerance():
                    raise SystemExit(
                        f"{name} {mode} {label}: max relative error {err:.1e} vs torch"
                    )
                fns[label] = impl.run
                if mode == "train":
                    memory[label] = impl.memory_mib
            report(f"{name} {mode} {tuple(case)}", round_robin(fns), next(iter(fns)))
        if experiment == "checkpoint":
            print("  train MiB: " + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
