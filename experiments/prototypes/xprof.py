# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Per-op time of a compiled JAX function on CPU from jax.profiler's trace (no TensorBoard needed).

from experiments.prototypes.xprof import op_table
op_table(compiled_fn, args, runs=3)   # prints total µs per event name, top first
"""

import collections
import glob
import re
import tempfile

import jax


def op_events(fn, args, runs=3):
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(runs):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    totals, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's execution threads only
                continue
            for ev in line.events:
                totals[ev.name] += ev.duration_ns / runs
                counts[ev.name] += 1 / runs
    return totals, counts


def describe(hlo_text: str) -> dict:
    """instruction name -> 'shape = op(operand shapes)' from a compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*?)\)", line)
        if m:
            name, shape, op, _ = m.groups()
            out[name] = f"{shape} = {op}"
    # fusions: say what the fused computation holds (dots, transposes, DUS, tanh ...)
    comps = dict(re.findall(r"\n(%[\w.\-]+) \(.*?\n(.*?)\n\}", hlo_text, re.S))
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) fusion\(.*calls=(%[\w.\-]+)", line)
        if m and m.group(3) in comps:
            body = comps[m.group(3)]
            ops = re.findall(
                r"= (f32\[[\d,]*\])\S* (dot|transpose|dynamic-update-slice|dynamic-slice|tanh|concatenate|reduce)\(",
                body,
            )
            out[m.group(1)] = f"{m.group(2)} fusion: " + " ".join(
                sorted({f"{o}{s}" for s, o in ops})
            )
    return out


def op_table(fn, args, runs=3, top=25, steps=None):
    totals, counts = op_events(fn, args, runs)
    desc = describe(fn.as_text()) if hasattr(fn, "as_text") else {}
    for name, ns in totals.most_common(top):
        per = f"{ns / steps / 1e3:8.2f} µs/step" if steps else ""
        print(
            f"  {ns / 1e3:10.1f} µs  x{counts[name]:6.0f} {per}  {name[:38]:38s} {desc.get(name, '')[:110]}"
        )
