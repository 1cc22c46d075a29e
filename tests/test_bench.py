"""experiments/bench end to end on the smallest case (every implementation is checked against torch
before timing; the JSON holds medians, the load and the train-step memory table), and its parts:
the case table, the flags, the load marks, the CPU description and the cuDNN weight layout."""

import doctest
import itertools
import json
import time
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")
pytest.importorskip("optax")

import jlstm  # noqa: E402
from experiments import results  # noqa: E402
from experiments.bench import (  # noqa: E402
    adapters,
    cases,
    cli,
    machine,
    peak,
    report,
    timing,
)
from tools.perf import compare  # noqa: E402


def test_bench_writes_checked_timings_and_memory(tmp_path, capsys, monkeypatch):
    # A quiet machine: no load, and no CPU time but the benchmark's own, so nothing is marked.
    monkeypatch.setattr(machine, "load_average", lambda: 0.0)
    monkeypatch.setattr(machine, "others_cores", lambda start, end: 0.0)
    # The GEMM peak, measured before and after the cases: the first at half speed, as in a slow
    # minute, which the final judgments must not be held to.
    measure, measured = peak.measure, []

    def measure_slow_first(*args):
        result = measure(*args)
        if not measured:
            result["square"] = {lib: rate / 2 for lib, rate in result["square"].items()}
            result["peak_gflops"] /= 2
            for step in result["steps"].values():
                step["gflops"] = {lib: rate / 2 for lib, rate in step["gflops"].items()}
                step["best_gflops"] /= 2
        measured.append(result)
        return result

    monkeypatch.setattr(peak, "measure", measure_slow_first)

    # The machine's speed probe, timed in every sample: at full speed through the forward case, at
    # about a quarter of it through the train case and through its second try, which must both
    # come out marked slow.
    pauses = [0.004, 0.004, 0.001]  # one per measurement, taken from the end

    def probe():
        pause = pauses.pop()
        return timing.Timed(lambda: time.sleep(pause), lambda r: r)

    monkeypatch.setattr(machine, "gemm_probe", probe)
    out = tmp_path / "bench.json"
    argv = ["--cases", "mnist", "--samples", "2", "--sample-s", "0.01", "--no-epoch"]
    argv += ["--impls", "torch,jlstm,flax", "--memory-cases", "mnist", "--out", str(out)]
    argv += ["--retries", "1", "--results-dir", str(tmp_path / "results")]
    assert cli.main(argv) == 0
    assert not (tmp_path / "results").exists()  # one case: not a full run, no CPU result file
    report_ = json.loads(out.read_text())
    assert [(r["case"], r["mode"]) for r in report_["results"]] == [
        ("mnist", "fwd"),
        ("mnist", "train"),
    ]
    for record in report_["results"]:
        load = (record["load_avg_1m"], record["load_avg_1m_end"], record["others_cores"])
        assert load == (0, 0, 0) and record["loaded"] is False
        for name in ("torch", "jlstm", "flax"):
            impl = record["impls"][name]
            assert impl["max_rel_err"] < 1e-4 and "error" not in impl
            assert len(impl["samples_s"]) == 2 and impl["median_s"] > 0
            assert impl["cpu_median_s"] > 0
        # held against the machine's GEMM peak, measured first (in a child process)
        assert 0 < record["torch_of_peak"] < 2 and 0 < record["jlstm_of_peak"] < 2
        assert record["target"].startswith(("≤ 0.85: ", "≤ 1, ≥ 90 % of step GEMM: "))
        # jlstm timed again right after each of torch's calls, whose time is not counted
        after = record["impls"][adapters.AFTER_TORCH]
        assert len(after["samples_s"]) == 2 and after["median_s"] > 0
        assert set(record["gflops"]) == {"torch", "jlstm", "flax", adapters.AFTER_TORCH}
        assert len(record["probe_samples_s"]) == 2 and record["probe_gflops"] > 0
    fwd, train = report_["results"]
    assert (fwd["speed"], fwd["slow"]) == (1.0, False) and "tries" not in fwd
    assert train["speed"] < 0.5 and train["slow"] is True and train["tries"] == 2
    (other,) = train["other_tries"]
    assert other["slow"] is True and {train["try"], other["try"]} == {1, 2}
    gemm = report_["gemm_peak"]
    assert "speed" not in gemm and "slow" not in gemm  # the peak is measured apart
    assert set(gemm["square"]) == {"torch.mm", "xla dot", "numpy @"}
    assert gemm["peak_gflops"] == max(gemm["square"].values()) > 0
    # measured before the cases and after them; the final judgments hold to the better of the two
    assert len(measured) == 2 and len(gemm["measured"]) == 2
    assert gemm["peak_gflops"] == max(measured[1]["square"].values())
    for record in report_["results"]:
        assert record["torch_of_peak"] == record["gflops"]["torch"] / gemm["peak_gflops"]
        best = gemm["steps"]["mnist"]["best_gflops"]
        assert record["jlstm_of_step_best"] == record["gflops"]["jlstm"] / best
    assert gemm["steps"]["mnist"]["shape"] == [64, 28 + 64, 4 * 64]
    memory = report_["peak_memory"]["mnist"]
    assert set(memory) == {"torch", "jlstm", "jlstm checkpoint_every=16", "flax"}
    assert all(v > 0 for v in memory.values()), memory
    assert set(report_["device"]["cpu_features"]) == {"avx2", "avx512f", "amx"}
    assert report_["command"].endswith(" -m experiments.bench " + " ".join(argv))
    printed = capsys.readouterr().out
    assert "| mnist | train |" in printed and "jlstm/torch" in printed
    assert "jlstm % of step GEMM" in printed and "-> peak" in printed
    assert "(after the cases; load " in printed
    assert "| mnist |" in printed.split("Memory of one train step")[1]
    table = printed.split("| case | mode |")[-1]
    assert "| mnist | fwd |" in table and "; speed 1.00 |" in table
    assert f" of 2 {report.SLOW_MARK} |" in table.split("| mnist | train |")[1].splitlines()[0]
    assert "marked, measured again (try 2): mnist train\n" in printed
    assert "try k of n: measured again" in printed
    assert report.LOADED_MARK not in printed
    assert "~ measured while the machine ran slow" in printed
    assert "WARNING: of 3 measurements, 1 while the machine ran slow (~); rerun on" in printed
    assert (
        f"not a full run (every case and mode, peak and epoch): {tmp_path / 'results'}" in printed
    )


def fake_record(case, mode, probe_gflops, jlstm_s, loaded=False):
    impls = {"jlstm": {"median_s": jlstm_s}}
    return {"case": case, "mode": mode, "loaded": loaded, "probe_gflops": probe_gflops} | {
        "impls": impls
    }


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_marked_measurements_are_taken_again_keeping_the_fastest_machine(
    retries, monkeypatch, capsys
):
    """A try is kept for its probe, never for its times: the second try of mnist train ran on a
    faster machine but measured jlstm slower, and it is the one kept."""
    tries = iter(
        [fake_record("mnist", "train", 150.0, 0.003), fake_record("mnist", "train", 120.0, 0.001)]
    )
    epochs = iter([fake_record("epoch", "", 200.0, 2.0)])
    calls = []

    def bench_case(name, case, mode, *_):
        calls.append((name, mode))
        return next(tries)

    monkeypatch.setattr(cli, "bench_case", bench_case)
    monkeypatch.setattr(cli, "bench_epoch", lambda args: next(epochs))
    monkeypatch.setattr(report, "table", lambda records: "a row")
    results = [
        fake_record("mnist", "fwd", 200.0, 0.001),
        fake_record("mnist", "train", 100.0, 0.002),
    ]
    epoch = fake_record("epoch", "", 190.0, 2.5, loaded=True)

    def measurements(epoch):
        return [*results, epoch]

    machine.mark_slow(measurements(epoch))
    args = cli.parse_args(["--retries", str(retries)])
    epoch = cli.measure_marked_again(results, epoch, measurements, args, None)
    fwd, train = results
    assert calls == [("mnist", "train")] * retries and "tries" not in fwd
    if retries == 0:
        assert train["slow"] and epoch["loaded"] and "tries" not in epoch
        return
    # the epoch: its first try ran under load, the second did not; once unmarked, never again
    assert (epoch["try"], epoch["tries"], epoch["loaded"]) == (2, 2, False)
    assert (epoch["impls"]["jlstm"]["median_s"], epoch["other_tries"][0]["loaded"]) == (2.0, True)
    assert (train["try"], train["tries"], train["probe_gflops"]) == (2, retries + 1, 150.0)
    assert train["impls"]["jlstm"]["median_s"] == 0.003  # the slowest jlstm of the tries
    assert train["speed"] == 0.75 and train["slow"]  # still marked: 150 of the run's 200
    assert sorted(t["try"] for t in train["other_tries"]) == [1, 3][:retries]
    assert all(t["slow"] for t in train["other_tries"])
    printed = capsys.readouterr().out
    assert "marked, measured again (try 2): mnist train, the MNIST epoch\n" in printed
    assert ("marked, measured again (try 3): mnist train\n" in printed) is (retries == 2)


def test_bench_refuses_a_negative_retry_count(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--retries", "-1"])
    assert (
        "--retries must be 0 or more (how often to measure again), got -1"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--cases", "huge", cases.CASES),
        ("--modes", "bwd", cases.MODES),
        ("--impls", "torch,keras", adapters.IMPLS),
        ("--memory-cases", "huge", cases.CASES),
    ],
)
def test_bench_refuses_an_unknown_name(flag, value, allowed, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args([flag, value])
    assert exit_.value.code == 2
    bad = [v for v in value.split(",") if v not in allowed]
    assert f"error: unknown {bad}; choose from {list(allowed)}" in capsys.readouterr().err


def test_bench_refuses_an_unknown_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--sample-count", "3"])  # --samples is the flag
    assert exit_.value.code == 2
    assert "unrecognized arguments: --sample-count 3" in capsys.readouterr().err


def test_bench_defaults():
    args = cli.parse_args([])
    assert args.cases == cases.BENCH_CASES and args.modes == cases.MODES
    assert args.impls == adapters.IMPLS and (args.samples, args.sample_s) == (9, 0.2)
    quick = cli.parse_args(["--quick", "--impls", "jlstm"])
    assert quick.cases == cases.QUICK_CASES and quick.impls == ["torch", "jlstm"]
    assert (quick.samples, quick.sample_s, quick.epoch_samples) == (3, 0.05, 1)
    assert (args.retries, quick.retries) == (2, 0)


def test_every_case_is_a_valid_torch_configuration():
    for name, case in cases.CASES.items():
        assert isinstance(case, cases.Case), name
        assert case.cell in ("lstm", "gru"), name
        sizes = (case.batch, case.seq_len, case.input_size, case.hidden_size, case.num_layers)
        assert all(isinstance(v, int) and v >= 1 for v in sizes), name
        assert isinstance(case.bidirectional, bool), name
    assert len(set(cases.CASES.values())) == len(cases.CASES), "two names for one configuration"
    for subset in (cases.BENCH_CASES, cases.QUICK_CASES):
        assert len(set(subset)) == len(subset) and set(subset) <= set(cases.CASES)
    assert any(case.batch == 1 for case in map(cases.CASES.get, cases.BENCH_CASES))  # serving


@pytest.mark.parametrize(
    "others, cores, loaded",
    [
        (0.0, 2, False),
        (0.5, 2, False),
        (0.51, 2, True),
        (2.0, 8, False),
        (2.1, 8, True),
        (None, 2, False),
    ],
)
def test_a_measurement_is_marked_when_other_processes_use_a_quarter_of_the_cores(
    others, cores, loaded
):
    """The 1-minute load (2.0 here: the benchmark's own threads on a quiet 2-core machine) is
    recorded but does not decide; what other processes used does."""
    assert machine.is_loaded(others, cores) is loaded
    record = machine.load_record(2.0, 2.0, others, cores)
    assert record == {
        "load_avg_1m": 2.0,
        "load_avg_1m_end": 2.0,
        "others_cores": others,
        "loaded": loaded,
    }


def test_others_cores_is_the_machines_busy_time_less_this_process_over_the_wall_time():
    assert machine.others_cores((10.0, 1.0, 0.0), (13.0, 2.0, 2.0)) == 1.0
    assert machine.others_cores((10.0, 1.0, 0.0), (11.0, 2.5, 1.0)) == 0.0  # never below 0
    assert machine.others_cores(None, (1.0, 1.0, 1.0)) is None  # no /proc/stat
    # Live: this process's busy loop shows in its own CPU time; the machine's counters only grow.
    # (Nothing sharper holds on a shared machine, nor where /proc/stat is refreshed coarsely.)
    start = machine.cpu_times()
    busy_until = time.monotonic() + 0.3
    while time.monotonic() < busy_until:
        pass
    end = machine.cpu_times()
    own, busy, wall = (e - s for s, e in zip(start, end, strict=True))
    assert own > 0.2 and busy >= 0 and wall >= 0.3


def _record(case, loaded):
    timing = {"median_s": 1e-3, "compile_s": 0.5}
    impls = {"torch": timing, "jlstm": timing, "flax": timing}
    load = machine.load_record(2.0, 2.1, 0.9 if loaded else 0.1, cores=2)
    return {"case": case, "mode": "fwd", "impls": impls} | load


def test_the_table_marks_loaded_rows_and_explains_the_mark():
    rows = [_record("quiet", False), _record("busy", True)]
    lines = report.table(rows).splitlines()
    assert lines[0].endswith("| load; speed |")
    assert lines[2].startswith("| quiet | fwd |") and lines[2].endswith("| 2.0–2.1, others 0.10 |")
    assert lines[3].startswith("| busy | fwd |") and lines[3].endswith("| 2.0–2.1, others 0.90 * |")
    assert "more than 0.25 x 2 cores busy" in report.load_footnote(rows, cores=2)
    assert "ran slow" not in report.load_footnote(rows, cores=2)
    assert report.load_footnote(rows[:1], cores=2) == ""


def test_a_measurement_is_marked_slow_when_its_probe_ran_below_0_9_of_the_runs_fastest():
    rows = [
        _record(case, False) | {"probe_gflops": rate}
        for case, rate in [("fast", 180.0), ("edge", 162.0), ("slow", 161.0), ("just", 161.9)]
    ]
    machine.mark_slow(rows)
    # 161.9 / 180 = 0.8994: shown as 0.89, never as the threshold it missed
    assert [(r["speed"], r["slow"]) for r in rows] == [
        (1.0, False),
        (0.9, False),
        (0.89, True),
        (0.89, True),
    ]
    lines = report.table(rows).splitlines()
    assert lines[2].endswith("| 2.0–2.1, others 0.10; speed 1.00 |")
    assert lines[4].endswith("| 2.0–2.1, others 0.10; speed 0.89 ~ |")
    footnote = report.load_footnote(rows, cores=2)
    assert (
        footnote.startswith("~ measured while the machine ran slow") and "x 2 cores" not in footnote
    )
    both = [rows[2] | {"loaded": True}]
    assert report.table(both).splitlines()[2].endswith("| 2.0–2.1, others 0.10; speed 0.89 *~ |")
    assert len(report.load_footnote(both, cores=2).splitlines()) == 2


@pytest.mark.parametrize("settle_s", [0.0, 0.1])
def test_the_probe_is_timed_in_every_sample_after_a_pause_and_one_untimed_call(settle_s):
    """Whatever ran before a call slows it for a while; the probe must not count that."""
    calls = []

    def impl():
        calls.append(("impl", time.monotonic()))

    def probe():  # slow on the call right after the impl, and within 0.05 s of the impl
        last, at = calls[-1] if calls else ("", 0.0)
        slow = last == "impl" or time.monotonic() - max(t for n, t in calls if n == "impl") < 0.05
        time.sleep(0.02 if slow else 0.001)
        calls.append(("probe", time.monotonic()))

    timings = timing.time_round_robin(
        {"impl": timing.Timed(impl, lambda r: r)},
        3,
        0.0,
        timing.Timed(probe, lambda r: r),
        0.0,
        settle_s,
    )
    assert len(timings["probe"]["samples_s"]) == 3 and len(timings["impl"]["samples_s"]) == 3
    # Without the pause, the untimed call alone does not get past the slow spell.
    assert (timings["probe"]["median_s"] < 0.01) is (settle_s > 0.05)
    assert set(timings) == {"impl", "probe"} and "probe" not in timing.time_round_robin({}, 1, 0)


def test_beside_times_each_call_right_after_its_neighbours_untimed_call():
    calls = []

    def neighbour():
        calls.append("neighbour")
        time.sleep(0.02)  # not in the time

    def impl():
        calls.append("impl")
        time.sleep(0.002)

    beside = timing.Beside(timing.Timed(impl, lambda r: r), timing.Timed(neighbour, lambda r: r))
    timings = timing.time_round_robin({"beside": beside}, 2, 0.0)
    assert 0.002 <= timings["beside"]["median_s"] < 0.015
    assert calls == ["neighbour", "impl"] * (len(calls) // 2)  # the neighbour before every call


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_each_implementation_follows_every_other_equally_often(n):
    """A fixed cyclic order would time B right after A in every sample, and never after C."""
    calls = []
    impls = {f"i{k}": timing.Timed(lambda k=k: calls.append(k), lambda r: r) for k in range(n)}
    cycle = n if n % 2 == 0 else 2 * n
    timing.time_round_robin(impls, 2 * cycle, 0.0)
    ran = calls[2 * n :]  # after the warm-up and timing calls of _iterations
    samples = [ran[s * n : (s + 1) * n] for s in range(2 * cycle)]
    assert all(sorted(sample) == list(range(n)) for sample in samples)
    firsts = Counter(sample[0] for sample in samples)
    follows = Counter((a, b) for sample in samples for a, b in itertools.pairwise(sample))
    assert firsts == {k: 2 * cycle // n for k in range(n)}
    assert follows == {(a, b): 2 * cycle // n for a in range(n) for b in range(n) if a != b}


def test_the_gemm_probe_times_a_real_product():
    probe = machine.gemm_probe()
    got = np.asarray(probe.sync(probe.run()))
    assert got.shape == (machine.PROBE_SIZE,) * 2 and np.isfinite(got).all()
    timed = timing.time_round_robin({}, 2, 0.0, probe, 0.0)["probe"]
    record = machine.probe_record(timed)
    assert record["probe_gflops"] > 0 and len(record["probe_samples_s"]) == 2


def test_cpu_info_reads_the_first_processor():
    text = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
        "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    info = results.cpu_info(text)
    assert info == {
        "model": "Intel(R) Xeon(R) Platinum 8488C",
        "avx2": True,
        "avx512f": True,
        "amx": True,
    }
    assert results.describe_cpu(info).endswith("(AVX2, AVX-512F, AMX)")


def test_to_cudnn_lays_out_a_stack_as_jax_experimental_rnn_reads_it():
    from jax import random
    from jax.experimental import rnn

    params = jlstm.init_lstm(random.key(0), 3, 5, num_layers=2, bidirectional=True)
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(
        adapters.to_cudnn(params), 3, 5, num_layers=2, bidirectional=True
    )
    for index, suffix in enumerate(["_l0", "_l0_reverse", "_l1", "_l1_reverse"]):
        for got, name in [(w_ih, "weight_ih"), (w_hh, "weight_hh"), (b_ih, "bias_ih")]:
            np.testing.assert_array_equal(got[index], params[name + suffix])
        np.testing.assert_array_equal(b_hh[index], params["bias_hh" + suffix])


def test_gpu_only_columns_are_left_out_on_cpu():
    if adapters.jax.default_backend() != "cpu":
        pytest.skip("checks the CPU backend")
    case = cases.CASES["mnist"]
    assert not any(adapters.applies(n, case) for n in adapters.GPU_ONLY)
    assert adapters.applies("jlstm-fused", case) and adapters.applies("flax", case)
    assert "impl='cudnn'" in adapters.jlstm_refusal("cudnn", case)


@pytest.mark.parametrize(
    "module", [cases, compare, machine, peak, report, results, timing], ids=lambda m: m.__name__
)
def test_docstring_examples(module):
    """experiments/ is outside the doctest paths (it needs torch); the bench's examples run here."""
    failed, attempted = doctest.testmod(module)
    assert (failed, attempted > 0) == (0, True)


def test_compare_reports_the_spread_between_two_runs(tmp_path, capsys):
    def run(jlstm_ms, date, slow=False):
        impls = {"torch": {"median_s": 2e-3}, "jlstm": {"median_s": jlstm_ms * 1e-3}, "flax": {}}
        record = {"case": "mnist", "mode": "fwd", "impls": impls, "loaded": False, "slow": slow}
        return {"date": date, "results": [record]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run(1.6, "A")))
    b.write_text(json.dumps(run(1.8, "B")))
    assert compare.main([str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "| mnist | fwd | jlstm/torch | 0.80 | 0.90 | +0.10 |  |" in printed
    assert "largest difference: +0.10 (mnist fwd jlstm/torch)" in printed
    assert "marked:" not in printed
    b.write_text(json.dumps(run(1.8, "B", slow=True)))
    assert compare.main([str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "| mnist | fwd | jlstm/torch | 0.80 | 0.90 | +0.10 | /~ |" in printed
    assert "marked: * under load, ~ while the machine ran slow" in printed
    assert compare.main([str(a)]) == 2


def test_compare_reports_the_spread_of_jlstm_after_torch(tmp_path, capsys):
    def run(after_ms):
        impls = {"jlstm": {"median_s": 1e-3}, "jlstm-after-torch": {"median_s": after_ms * 1e-3}}
        record = {"case": "mnist", "mode": "fwd", "impls": impls, "loaded": False, "slow": False}
        return {"date": "-", "results": [record]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run(1.1)))
    b.write_text(json.dumps(run(4.5)))
    assert compare.main([str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "| mnist | fwd | jlstm-after-torch/jlstm | 1.10 | 4.50 | +3.40 |  |" in printed
