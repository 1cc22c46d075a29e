"""``python -m experiments.bench``: flags, the run over cases and modes, and the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import torch

from experiments import bench
from experiments import results as committed
from experiments.bench import adapters, machine, peak, report
from experiments.bench.adapters import AFTER_TORCH, IMPLS
from experiments.bench.cases import BENCH_CASES, CASES, MODES, QUICK_CASES, Case
from experiments.bench.epoch import bench_epoch
from experiments.bench.memory import bench_memory, torch_memory_child
from experiments.bench.timing import Beside, max_rel_err, time_round_robin


def bench_case(
    name: str, case: Case, mode: str, impl_names: list[str], args, gemm_peak: dict | None
) -> dict:
    """One (case, mode): every implementation that applies is checked against torch (the first
    of `impl_names`), and those that agree are timed side by side, and held against the machine's
    GEMM peak where it was measured."""
    load = machine.load_now()
    module, x, cot = adapters.setup(case, args.torch_device)
    tol = adapters.tolerance()

    impls, record = {}, {"case": name, "mode": mode, "shape": case._asdict(), "impls": {}}
    reference = None
    for impl_name in impl_names:
        if not adapters.applies(impl_name, case):
            continue
        impl = adapters.make_impl(impl_name, case, mode, module, x, cot, args.torch_device)
        got = impl.result(impl.sync(impl.run()))
        if reference is None:
            reference = got
        err = max_rel_err(got, reference)
        rec = record["impls"][impl_name] = {"max_rel_err": err, "compile_s": impl.compile_s}
        print(f"  {impl_name}: max relative error vs torch {err:.1e}", flush=True)
        if err > tol:
            rec["error"] = f"disagrees with torch: max relative error {err:.2e} > {tol:.0e}"
            print(f"  {name}/{mode}/{impl_name}: {rec['error']} -- not timed", flush=True)
            continue
        impls[impl_name] = impl
    if args.torch_device == "cpu" and {"torch", "jlstm"} <= impls.keys():
        # jlstm again, each call right after one of torch's, while torch's OpenMP team still spins.
        impls[AFTER_TORCH] = Beside(impls["jlstm"], impls["torch"])
        record["impls"][AFTER_TORCH] = {}
    # The probe runs in every sample beside them: how fast the machine ran meanwhile.
    probe = machine.gemm_probe()
    timings = time_round_robin(
        impls, args.samples, args.sample_s, probe, machine.PROBE_S, machine.PROBE_SETTLE_S
    )
    record |= machine.probe_record(timings.pop("probe"))
    for impl_name, timing in timings.items():
        record["impls"][impl_name] |= timing
    if gemm_peak is not None:
        record |= peak.judge(record, case, mode, gemm_peak)
    # Other processes on the cores skew the ratios (torch's OpenMP team loses more than XLA).
    return record | machine.load_since(load)


def keep_faster(tries: list[dict]) -> dict:
    """Of one case's tries, the one measured while the machine ran fastest: unloaded before loaded,
    then the fastest probe. Which try is kept depends on the machine's speed only, never on the
    times measured; the others go under its ``"other_tries"``.

    >>> kept = keep_faster([{"loaded": False, "probe_gflops": 120.0}, {"loaded": True,
    ...     "probe_gflops": 170.0}, {"loaded": False, "probe_gflops": 160.0}])
    >>> kept["probe_gflops"], kept["try"], kept["tries"], len(kept["other_tries"])
    (160.0, 3, 3, 2)
    """
    tries = [
        {k: v for k, v in r.items() if k not in ("try", "tries", "other_tries")} for r in tries
    ]
    for number, record in enumerate(tries, 1):
        record["try"] = number
    best = max(tries, key=lambda r: (not r["loaded"], r.get("probe_gflops") or 0.0))
    others = [r for r in tries if r is not best]
    return best | {"tries": len(tries), "other_tries": others}


def measure_marked_again(
    results: list[dict], epoch: dict | None, measurements, args, gemm_peak
) -> dict | None:
    """Measures again, up to ``args.retries`` times, each case and mode (and the MNIST epoch) that
    came out marked, under load or slow, and keeps of its tries the one :func:`keep_faster` picks;
    the marks are set again over ``measurements(epoch)``, the whole run, after each round. Returns
    the epoch's record."""
    tries = {}
    for attempt in range(2, args.retries + 2):
        marked = [i for i, r in enumerate(results) if report.marks(r)]
        epoch_marked = epoch is not None and report.marks(epoch)
        if not marked and not epoch_marked:
            break
        names = [f"{results[i]['case']} {results[i]['mode']}" for i in marked]
        names += ["the MNIST epoch"] if epoch_marked else []
        print(f"\nmarked, measured again (try {attempt}): {', '.join(names)}", flush=True)
        for i in marked:
            name, mode = results[i]["case"], results[i]["mode"]
            print(f"{name} {mode} {tuple(CASES[name])}, try {attempt}", flush=True)
            again = bench_case(name, CASES[name], mode, args.impls, args, gemm_peak)
            tries.setdefault(i, [results[i]]).append(again)
            results[i] = keep_faster(tries[i])
            print(report.table([again]).splitlines()[-1], flush=True)
        if epoch_marked:
            tries.setdefault("epoch", [epoch]).append(bench_epoch(args))
            epoch = keep_faster(tries["epoch"])
        machine.mark_slow(measurements(epoch))
    return epoch


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=bench.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"cases {QUICK_CASES}, 3 short samples")
    p.add_argument(
        "--cases", help=f"comma-separated subset of {list(CASES)} (default {BENCH_CASES})"
    )
    p.add_argument("--modes", default="fwd,train", help="comma-separated subset of fwd,train")
    p.add_argument("--impls", default=",".join(IMPLS), help="cudnn runs only on a GPU backend")
    p.add_argument("--samples", type=int, help="round-robin samples per case (default 9, quick 3)")
    p.add_argument("--sample-s", type=float, help="seconds per sample (default 0.2, quick 0.05)")
    p.add_argument("--epoch-samples", type=int, help="MNIST epochs per framework (default 3)")
    p.add_argument(
        "--retries",
        type=int,
        help="times a measurement marked under load or slow is taken again (default 2, quick 0)",
    )
    p.add_argument("--no-epoch", action="store_true", help="skip the MNIST training epoch")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/bench/bench.json", help="where the JSON goes")
    p.add_argument(
        "--results-dir",
        help="a full run also replaces its CPU's result file here (make bench: benchmarks/results)",
    )
    p.add_argument(
        "--memory-cases", default="long", help="cases whose train-step peak memory is measured"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--no-peak", action="store_true", help="skip measuring the machine's float32 GEMM peak"
    )
    p.add_argument("--memory-child", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return args
    args.cases = args.cases.split(",") if args.cases else QUICK_CASES if args.quick else BENCH_CASES
    args.modes, args.impls = args.modes.split(","), args.impls.split(",")
    args.samples = args.samples or (3 if args.quick else 9)
    args.sample_s = args.sample_s or (0.05 if args.quick else 0.2)
    args.epoch_samples = args.epoch_samples or (1 if args.quick else 3)
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    elif args.retries < 0:
        p.error(f"--retries must be 0 or more (how often to measure again), got {args.retries}")
    args.memory_cases = [] if args.no_memory else args.memory_cases.split(",")
    for value, allowed in [
        (args.cases, CASES),
        (args.modes, MODES),
        (args.impls, IMPLS),
        (args.memory_cases, CASES),
    ]:
        if bad := [v for v in value if v not in allowed]:
            p.error(f"unknown {bad}; choose from {list(allowed)}")
    if "torch" not in args.impls or args.impls[0] != "torch":
        args.impls = ["torch", *(i for i in args.impls if i != "torch")]  # torch is the reference
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.memory_child:
        print(json.dumps(torch_memory_child(args.memory_child, args.torch_device)))
        return 0
    env = machine.environment(args, sys.argv[1:] if argv is None else argv)
    versions, device = env["versions"], env["device"]
    print(
        f"{env['date']}  jax {jax.__version__} ({jax.default_backend()})  torch {torch.__version__}"
        f" ({args.torch_device}, {torch.get_num_threads()} threads)  {device['cpu']}"
        f"  jlstm.native: {env['jlstm_native']}"
    )
    cpu = committed.describe_cpu({"model": device["cpu"], **device["cpu_features"]})
    print(
        f"{cpu}, {device['cpu_count']} cores, load {device['load_avg_1m_at_start']:.2f}; "
        f"jaxlib {versions['jaxlib']}, flax {versions['flax']}; {env['command']}"
    )
    results, start, gemm_peak = [], time.perf_counter(), None
    if args.torch_device == "cpu" and not args.no_peak:
        load = machine.load_now()
        gemm_peak = peak.measure(args.cases, args.samples, args.sample_s)
        gemm_peak |= machine.load_since(load)
        print(peak.line(gemm_peak) + f" (load {report.load_cell(gemm_peak)})", flush=True)
    for name in args.cases:
        for mode in args.modes:
            print(f"{name} {mode} {tuple(CASES[name])}", flush=True)
            results.append(bench_case(name, CASES[name], mode, args.impls, args, gemm_peak))
            print(report.table(results[-1:]).splitlines()[-1], flush=True)
    if gemm_peak is not None:  # again after the cases; the final table holds them to the better
        load = machine.load_now()
        again = peak.measure(args.cases, args.samples, args.sample_s) | machine.load_since(load)
        print(peak.line(again) + f" (after the cases; load {report.load_cell(again)})", flush=True)
        gemm_peak = peak.best_of(gemm_peak, again)
        for record in results:
            record |= peak.judge(record, CASES[record["case"]], record["mode"], gemm_peak)
    epoch = None if args.no_epoch else bench_epoch(args)
    memory = bench_memory(args)

    def measurements(epoch):  # every one with a load record, the GEMM peak's included
        return results + ([epoch] if epoch else []) + ([gemm_peak] if gemm_peak else [])

    machine.mark_slow(measurements(epoch))
    epoch = measure_marked_again(results, epoch, measurements, args, gemm_peak)
    timed = measurements(epoch)
    env["total_s"] = time.perf_counter() - start
    cores = os.cpu_count() or 1
    print("\n" + report.table(results))
    if gemm_peak is not None:
        print("\n" + peak.line(gemm_peak))
    if memory:
        print(
            "\nMemory of one train step, MiB beyond its inputs (JAX: XLA temp + output buffers;"
            " torch: peak resident memory):"
        )
        print(report.memory_table(memory))
    if epoch:
        print("\n" + report.epoch_line(epoch))
    if footnote := report.load_footnote(timed, cores):
        print("\n" + footnote)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = env | {"results": results, "mnist_epoch": epoch, "peak_memory": memory}
    record["gemm_peak"] = gemm_peak
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out} ({env['total_s']:.0f} s)")
    if args.results_dir is not None:
        saved = committed.save_bench(record, Path(args.results_dir))
        print(
            f"replaced this CPU's result file: {saved}"
            if saved
            else f"not a full run (every case and mode, peak and epoch): {args.results_dir} unchanged"
        )
    loaded, slow = sum(r["loaded"] for r in timed), sum(bool(r.get("slow")) for r in timed)
    if loaded or slow:
        marked = [f"{loaded} ran under load ({report.LOADED_MARK})"] if loaded else []
        marked += [f"{slow} while the machine ran slow ({report.SLOW_MARK})"] if slow else []
        print(
            f"WARNING: of {len(timed)} measurements, {' and '.join(marked)}; rerun on a quiet "
            "machine" + (" or with --torch-threads 1" if loaded and args.torch_threads > 1 else "")
        )
    failed = [r for r in results if any("error" in v for v in r["impls"].values())]
    return 1 if failed else 0
