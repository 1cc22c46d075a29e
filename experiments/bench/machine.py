"""What the benchmark ran on and alongside: CPU model and vector extensions, versions, threads,
the command line, and the machine's load, by which a measurement is marked as taken under load.

A figure is published only from a run in which no case is marked: other processes on the cores
slow torch's OpenMP team (which waits for its slowest thread) far more than XLA, so ratios to
torch measured under load come out too low.

The 1-minute load average is recorded before and after every measurement, but it cannot decide the
mark: the benchmark itself keeps every core busy, so on a quiet 2-core machine the load reads about
2. What decides is how many cores *other* processes kept busy during the measurement: the machine's
busy CPU time (``/proc/stat``, steal included) minus this process's own, over the wall time.

A shared machine can also run slow with no other process in sight: a neighbour on the host's cores
does not show in this guest's ``/proc/stat``, nor always as steal time (a 2-core Zen 3 EPYC under
KVM, 2026-12-03, measured its float32 2048^3 GEMM at 87-179 GFLOP/s within a quarter of an hour,
load under 0.3 and no steal, against 190 when quiet). So every round-robin sample also times a
fixed probe, a float32 GEMM (:func:`gemm_probe`), and a measurement whose probe ran below
:data:`SLOW_FRACTION` of the run's fastest probe is marked slow (:func:`mark_slow`). Published
figures come from runs with neither mark.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import platform
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import torch

from experiments import results
from experiments.bench import adapters
from experiments.bench.cases import CASES
from experiments.bench.timing import Timed

OTHERS_FRACTION = 0.25  # marked when other processes kept more than this x the cores busy
PROBE_SIZE = 1024  # the speed probe: a float32 GEMM of this size cubed (2.1 GFLOP)
PROBE_S = 0.05  # seconds of probe in each round-robin sample
PROBE_SETTLE_S = 0.2  # the pause before it, for whatever ran before to settle
SLOW_FRACTION = 0.9  # marked slow when its probe ran below this x the run's fastest probe


def load_average() -> float:
    """The 1-minute load average: processes running or waiting for a core, over the last minute."""
    return os.getloadavg()[0]


def cpu_times() -> tuple[float, float, float] | None:
    """``(machine busy, own, wall)`` seconds: CPU time every core spent busy (steal included), CPU
    time of this process and its waited-for children, and a monotonic clock; None without
    ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = os.times()
    own_s = own.user + own.system + own.children_user + own.children_system
    return busy / os.sysconf("SC_CLK_TCK"), own_s, time.monotonic()


def others_cores(start, end) -> float | None:
    """How many cores other processes kept busy on average between two :func:`cpu_times`.

    >>> others_cores((100.0, 10.0, 50.0), (104.0, 12.0, 52.0))  # 4 s busy, 2 s ours, over 2 s
    1.0
    """
    if start is None or end is None or end[2] <= start[2]:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def is_loaded(others: float | None, cores: int) -> bool:
    """Whether other processes kept more than :data:`OTHERS_FRACTION` of the cores busy.

    >>> is_loaded(0.4, cores=2), is_loaded(0.6, cores=2), is_loaded(None, cores=2)
    (False, True, False)
    """
    return others is not None and others > OTHERS_FRACTION * cores


def load_record(start: float, end: float, others: float | None, cores: int | None = None) -> dict:
    """The JSON fields of a measurement's load: the 1-minute load before and after, the cores
    other processes kept busy, and whether it counts as loaded.

    >>> load_record(1.5, 2.0, 0.1, cores=2)
    {'load_avg_1m': 1.5, 'load_avg_1m_end': 2.0, 'others_cores': 0.1, 'loaded': False}
    """
    cores = cores or os.cpu_count() or 1
    rounded = None if others is None else round(others, 2)
    return {
        "load_avg_1m": start,
        "load_avg_1m_end": end,
        "others_cores": rounded,
        "loaded": is_loaded(others, cores),
    }


def load_now() -> tuple:
    """What :func:`load_since` needs from the start of a measurement."""
    return load_average(), cpu_times()


def load_since(start: tuple, cores: int | None = None) -> dict:
    """The :func:`load_record` of a measurement that began at ``start = load_now()``."""
    others = others_cores(start[1], cpu_times())
    return load_record(start[0], load_average(), others, cores)


@functools.cache
def gemm_probe() -> Timed:
    """The machine's speed, timed beside the implementations in every sample: XLA's dot of two
    :data:`PROBE_SIZE` square float32 matrices, on the same thread pool as jlstm and flax."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((PROBE_SIZE,) * 2, np.float32))
    dot = jax.jit(jnp.dot)
    return Timed(lambda: dot(a, a), lambda r: r.block_until_ready())


def probe_record(timing: dict) -> dict:
    """The JSON fields of a measurement's probe, from its ``time_round_robin`` timing.

    >>> probe_record({"median_s": 0.01, "samples_s": [0.01, 0.02]})
    {'probe_gflops': 214.7, 'probe_samples_s': [0.01, 0.02]}
    """
    gflops = 2 * PROBE_SIZE**3 / timing["median_s"] / 1e9
    return {"probe_gflops": round(gflops, 1), "probe_samples_s": timing["samples_s"]}


def mark_slow(records: list[dict]) -> None:
    """Sets ``speed``, a record's probe GFLOP/s over the fastest of the run, and ``slow`` (below
    :data:`SLOW_FRACTION`) on every record that has a probe, and on the tries each replaced.

    >>> records = [{"probe_gflops": 180.0}, {"probe_gflops": 161.5}, {"peak_gflops": 190.0}]
    >>> mark_slow(records)
    >>> [(r.get("speed"), r.get("slow")) for r in records]
    [(1.0, False), (0.89, True), (None, None)]
    """
    every = [t for r in records for t in (r, *r.get("other_tries", ()))]  # discarded tries too
    probed = [r for r in every if r.get("probe_gflops")]
    fastest = max((r["probe_gflops"] for r in probed), default=None)
    for r in probed:
        speed = r["probe_gflops"] / fastest
        # Rounded down, so that a slow one never reads as the threshold itself (0.897 as 0.90).
        shown = math.floor(speed * 100 + 1e-9) / 100
        r |= {"speed": shown, "slow": speed < SLOW_FRACTION}


def environment(args, argv: list[str]) -> dict:
    """The JSON header of a run; ``argv`` is the command line's flags."""
    cpu = results.this_cpu()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "experiments.bench", *argv]),
        "git_commit": results.commit(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "device": {
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "torch_device": args.torch_device,
            "cpu": cpu["model"],
            "cpu_features": {k: v for k, v in cpu.items() if k != "model"},
            "cpu_count": os.cpu_count(),
            "load_avg_1m_at_start": load_average(),
        },
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))},
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "xla_cpu_threads": "XLA default (one per core)",
            "jlstm_native_threads": os.environ.get("JLSTM_NATIVE_THREADS", "one per core"),
        },
        # Whether jlstm's C++ loop (impl="native", what "auto" takes on CPU) runs here, or why not.
        "jlstm_native": adapters.jlstm_refusal("native", CASES["mnist"]) or "available",
        "config": dict(vars(args)),
    }
