"""Peak memory of one train step (forward + backward) per case, torch against the JAX paths.

JAX: XLA's buffer assignment for the compiled step, temp + output bytes (what one call allocates
beyond its inputs; exact, and an upper bound on what it touches). torch: measured in a fresh
process from the kernel's count of resident memory: glibc is told to serve every allocation of
64 KiB or more with its own mmap and to hand it back on free (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_), so resident memory follows live buffers; after two warm-up steps the
peak counter is reset (/proc/self/clear_refs) and the peak over one more step, less the resident
memory before it, is what the step needed (saved activations, oneDNN workspaces, gradients).
The resident-memory method is not used for JAX: in a process that has run other XLA programs it
reported far less than XLA's buffer assignment (memory already resident was reused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from experiments.bench import adapters
from experiments.bench.cases import CASES
from experiments.bench.report import fmt
from experiments.bench.timing import max_rel_err

CHECKPOINT_EVERY = 16  # jlstm's memory-bounded variant in the memory table
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def torch_memory_child(case_name: str, device: str) -> dict:
    """Runs in the child process: the peak extra resident memory of one torch train step."""
    module, x, cot = adapters.setup(CASES[case_name], device)
    impl = adapters.make_torch(module, x, cot, "train", device)
    impl.sync(impl.run())
    impl.sync(impl.run())
    base = _proc_status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident memory, to the current resident memory
    impl.sync(impl.run())
    return {"peak_mib": (_proc_status("VmHWM:") - base) / 2**20}


def _torch_memory(case_name: str, args) -> float | None:
    if args.torch_device != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, "-m", "experiments.bench", "--memory-child", case_name]
    cmd += ["--torch-threads", str(args.torch_threads)]
    env = os.environ | MALLOC_ENV
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        print(f"  train-step memory {case_name}/torch failed: {proc.stderr.strip()[-300:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def bench_memory(args) -> dict:
    """Train-step memory (MiB) of torch, jlstm, jlstm with checkpoint_every, flax, per case; every
    JAX variant is checked against torch's gradients first."""
    results = {}
    for case_name in args.memory_cases:
        case = CASES[case_name]
        module, x, cot = adapters.setup(case, args.torch_device)
        reference = adapters.make_torch(module, x, cot, "train", args.torch_device)
        want = reference.result(reference.sync(reference.run()))
        row = {"torch": _torch_memory(case_name, args)}
        for label, name, every in [
            ("jlstm", "jlstm", None),
            (f"jlstm checkpoint_every={CHECKPOINT_EVERY}", "jlstm", CHECKPOINT_EVERY),
            ("flax", "flax", None),
        ]:
            if name not in args.impls:
                continue
            impl = adapters.make_impl(name, case, "train", module, x, cot, args.torch_device, every)
            err = max_rel_err(impl.result(impl.sync(impl.run())), want)
            if err > adapters.tolerance():
                raise RuntimeError(f"{case_name}/{label}: max relative error {err:.1e} vs torch")
            row[label] = impl.memory_mib
        results[case_name] = row
        print(
            f"  train-step memory {case_name}: "
            + ", ".join(f"{k} {fmt(v, '.1f')} MiB" for k, v in row.items()),
            flush=True,
        )
    return results
